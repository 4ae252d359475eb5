//! Failures neither flood the log nor hide. A replica that fails for 20 s under an app
//! writing 50 transactions a second gets one warning, a reminder with a count and a line
//! when it works again (not a warning per write), and loses nothing. A replicator that lost
//! its lease to another one is critical at once in `/health` and `/metrics`, and an alert
//! says so, rather than looking healthy until its restorable point ages.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use walship_storage::testkit::MotoServer;

use crate::common::*;
use crate::proxy::Proxy;

use crate::http_support;

#[test]
fn writer_child() {
    writer_main_if_child();
}

/// How long the replica fails (an S3 round spends seconds in retries: longer there, so that
/// a reminder is due before it ends).
const OUTAGE: Duration = Duration::from_secs(20);
const S3_OUTAGE: Duration = Duration::from_secs(30);
/// At most this many warnings for one outage (one, a reminder or two, and room for one
/// unrelated line).
const MAX_WARNINGS: usize = 5;

#[test]
fn a_failing_local_replica_warns_once_reminds_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let replica = dir.path().join("replica");
    let url = file_url(&replica);
    let off = dir.path().join("replica.off");
    // Root ignores permissions: a file where the replica's directory was fails every put.
    let breaker = Breaker {
        stop: Box::new({
            let (replica, off) = (replica.clone(), off.clone());
            move || {
                std::fs::rename(&replica, &off).unwrap();
                std::fs::write(&replica, b"not a directory").unwrap();
            }
        }),
        start: Box::new(move || {
            std::fs::remove_file(&replica).unwrap();
            std::fs::rename(&off, &replica).unwrap();
        }),
    };
    failing_replica(dir.path(), &url, &url, OUTAGE, breaker, 0x666c_6f6f);
}

#[test]
fn a_failing_s3_replica_warns_once_reminds_and_recovers() {
    let moto = MotoServer::shared();
    let dir = tempfile::tempdir().unwrap();
    let prefix = MotoServer::unique_prefix("log-flood");
    let direct = moto.url(moto.bucket(), &prefix).to_string();
    // Through a proxy that refuses every connection during the outage (a store that is down).
    let proxy = Arc::new(Proxy::start(
        format!("127.0.0.1:{}", moto.port()).parse().unwrap(),
    ));
    let via = format!(
        "s3://{}/{prefix}?endpoint={}&region=us-east-1&force-path-style=true",
        moto.bucket(),
        proxy.endpoint()
    );
    let (down, up) = (proxy.clone(), proxy.clone());
    let breaker = Breaker {
        stop: Box::new(move || down.refuse()),
        start: Box::new(move || up.forward()),
    };
    failing_replica(dir.path(), &via, &direct, S3_OUTAGE, breaker, 0x666c_6f70);
}

/// Stops and starts the replica's store.
struct Breaker {
    stop: Box<dyn FnOnce()>,
    start: Box<dyn FnOnce()>,
}

fn failing_replica(
    dir: &Path,
    url: &str,
    restore_url: &str,
    outage: Duration,
    breaker: Breaker,
    seed: u64,
) {
    let db = dir.join("app.db");
    create_db(&db);
    let log = dir.join("replicate.log");
    let wlog = dir.join("writer.log");
    let spec = WriterSpec {
        db: db.clone(),
        seed,
        duration: outage + Duration::from_secs(12),
        rate: 50,
        autocheckpoint: 1000,
        checkpoint_every: 0,
        vacuum_every: 0,
        long_reader: false,
        reopen_every: 0,
        log: wlog.clone(),
    };
    let mut rep = Replicator::start(&db, url, &["--shutdown-timeout", "60s"], &log);
    wait_for_line(&log, "all replicators up", Duration::from_secs(60));
    let mut writer = spawn_writer(&spec, "log_flood::writer_child");
    std::thread::sleep(Duration::from_secs(3));

    (breaker.stop)();
    std::thread::sleep(outage);
    (breaker.start)();
    let recovered = find_line(&log, "sync works again", Duration::from_secs(90));
    assert!(writer.wait().unwrap().success(), "the writer failed");
    let committed = last_committed(&wlog);

    let text = http_support::strip_ansi(&std::fs::read_to_string(&log).unwrap());
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains(" WARN ")).collect();
    eprintln!(
        "{url}: {} warnings over a {}s outage with {committed} transactions written; \
         recovered: {recovered:?}",
        warnings.len(),
        outage.as_secs()
    );
    for w in &warnings {
        eprintln!("  {w}");
    }
    assert!(
        warnings.len() <= MAX_WARNINGS,
        "{} warnings for one outage:\n{}",
        warnings.len(),
        warnings.join("\n")
    );
    let first = warnings
        .iter()
        .filter(|l| l.contains("sync failed; retrying with back-off"))
        .count();
    assert_eq!(first, 1, "{}", warnings.join("\n"));
    let reminder = warnings
        .iter()
        .find(|l| l.contains("still failing:"))
        .unwrap_or_else(|| panic!("no reminder among:\n{}", warnings.join("\n")));
    assert!(reminder.contains(" attempts over "), "{reminder}");
    let recovered = recovered
        .unwrap_or_else(|| panic!("no line says the replica works again; log:\n{}", tail(&log)));
    assert!(recovered.contains(" INFO "), "{recovered}");
    assert!(
        recovered.contains("failed attempts over"),
        "the recovery line has no count: {recovered}"
    );

    // Nothing was lost.
    let st = rep_terminate(&mut rep);
    assert!(
        st.success(),
        "walship exited with {st}; log:\n{}",
        tail(&log)
    );
    let out = dir.join("restored.db");
    restore_ok(restore_url, &out);
    let got = assert_prefix_state(&out, seed, "after the outage");
    assert_eq!(got, committed, "the replica holds {got} of {committed}");
}

fn rep_terminate(rep: &mut Replicator) -> std::process::ExitStatus {
    signal(&rep.child, "-TERM");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(st) = rep.child.try_wait().unwrap() {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "walship did not stop; log:\n{}",
            tail(&rep.log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for a log line containing `what`; returns it.
fn wait_for_line(log: &Path, what: &str, within: Duration) -> String {
    find_line(log, what, within)
        .unwrap_or_else(|| panic!("no `{what}` in the log within {within:?}:\n{}", tail(log)))
}

/// The first log line containing `what`, waiting up to `within` for it.
fn find_line(log: &Path, what: &str, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    loop {
        let text = http_support::strip_ansi(&std::fs::read_to_string(log).unwrap_or_default());
        if let Some(l) = text.lines().find(|l| l.contains(what)) {
            return Some(l.to_string());
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------
// A lost lease

#[test]
fn a_replicator_that_lost_its_lease_on_a_local_dir_is_critical_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let contested = file_url(&dir.path().join("replica-a"));
    let other = file_url(&dir.path().join("replica-b"));
    lost_lease(dir.path(), &contested, &other);
}

#[test]
fn a_replicator_that_lost_its_lease_on_s3_is_critical_at_once() {
    let moto = MotoServer::shared();
    let dir = tempfile::tempdir().unwrap();
    let contested = moto
        .url(moto.bucket(), &MotoServer::unique_prefix("lease-lost-a"))
        .to_string();
    let other = moto
        .url(moto.bucket(), &MotoServer::unique_prefix("lease-lost-b"))
        .to_string();
    lost_lease(dir.path(), &contested, &other);
}

/// One process replicates `a.db` to `contested` and `b.db` to `other` (so it stays up when
/// one replicator stops); a second replicator of `a.db` takes `contested` over.
fn lost_lease(dir: &Path, contested: &str, other: &str) {
    let (a, b) = (dir.join("a.db"), dir.join("b.db"));
    create_db(&a);
    create_db(&b);
    let hooks = Hooks::start();
    let cfg = dir.join("walship.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"version = 1
listen = "127.0.0.1:0"
webhook = ["{}"]
[[db]]
path = "a.db"
  [[db.replica]]
  url = "{contested}"
  sync-interval = "200ms"
  lease-ttl = "2s"
[[db]]
path = "b.db"
  [[db.replica]]
  url = "{other}"
  sync-interval = "200ms"
"#,
            hooks.url
        ),
    )
    .unwrap();
    let log1 = dir.join("first.log");
    let first = start_walship(&["replicate", "--config", cfg.to_str().unwrap()], &log1);
    wait_for_line(&log1, "all replicators up", Duration::from_secs(60));
    let text = http_support::strip_ansi(&std::fs::read_to_string(&log1).unwrap());
    let base = format!("http://{}", http_support::listen_addr(&text).unwrap());
    let health = |path: &str| {
        let r = http_support::client()
            .get(format!("{base}{path}"))
            .timeout(Duration::from_secs(10))
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    let (code, body) = health("/health");
    assert_eq!(code, 200, "{body}");

    // The app writes; a second replicator takes the replica over.
    let stop_writing = Arc::new(AtomicBool::new(false));
    let writer = {
        let (a, stop) = (a.clone(), stop_writing.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                http_support::insert_rows(&a, 5);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let log2 = dir.join("second.log");
    let t0 = Instant::now();
    let second = start_walship(
        &[
            "replicate",
            a.to_str().unwrap(),
            contested,
            "--on-conflict",
            "takeover",
            "--lease-ttl",
            "2s",
            "--sync-interval",
            "200ms",
        ],
        &log2,
    );
    wait_for_line(&log2, "all replicators up", Duration::from_secs(60));

    // The first one's health turns critical as soon as it finds out.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (code, body) = loop {
        let (code, body) = health("/health");
        if code == 503 || Instant::now() > deadline {
            break (code, body);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let critical_after = t0.elapsed();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        code,
        503,
        "/health of the replicator that lost its lease: {v:#}\nlog:\n{}",
        tail(&log1)
    );
    let db_a = v["databases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "a")
        .unwrap();
    assert_eq!(db_a["status"], "critical", "{v:#}");
    let reasons = db_a["reasons"].to_string();
    assert!(reasons.contains("lost the replica's lease"), "{reasons}");
    let db_b = v["databases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "b")
        .unwrap();
    assert_eq!(db_b["status"], "healthy", "{v:#}");
    let (_, metrics) = health("/metrics");
    assert_eq!(
        http_support::sample(&metrics, "walship_lease_lost{db=\"a\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        http_support::sample(&metrics, "walship_health{db=\"a\"}"),
        Some(2.0)
    );
    assert_eq!(
        http_support::sample(&metrics, "walship_lease_lost{db=\"b\"}"),
        Some(0.0)
    );
    // And an alert says so.
    let alert = hooks.wait_event("lease_lost", Duration::from_secs(30), &log1);
    assert_eq!(alert["db"], "a", "{alert:#}");
    assert_eq!(alert["status"], "critical", "{alert:#}");
    eprintln!(
        "{contested}: critical {} ms after the second replicator started",
        critical_after.as_millis()
    );

    stop_writing.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    drop(first);
    drop(second);
}

fn start_walship(args: &[&str], log: &Path) -> Replicator {
    let f = std::fs::File::create(log).unwrap();
    Replicator {
        child: walship()
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap(),
        log: log.to_path_buf(),
    }
}

/// A webhook receiver on 127.0.0.1: keeps every JSON body posted to it.
struct Hooks {
    url: String,
    got: Arc<Mutex<Vec<serde_json::Value>>>,
    _rt: tokio::runtime::Runtime,
}

impl Hooks {
    fn start() -> Hooks {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let got: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let app = axum::Router::new()
            .route(
                "/hook",
                axum::routing::post(
                    |axum::extract::State(got): axum::extract::State<
                        Arc<Mutex<Vec<serde_json::Value>>>,
                    >,
                     body: axum::body::Bytes| async move {
                        got.lock()
                            .unwrap()
                            .push(serde_json::from_slice(&body).unwrap_or_default());
                        axum::http::StatusCode::NO_CONTENT
                    },
                ),
            )
            .with_state(got.clone());
        rt.spawn(async move { axum::serve(listener, app).await });
        Hooks { url, got, _rt: rt }
    }

    fn wait_event(&self, event: &str, within: Duration, log: &Path) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = self
                .got
                .lock()
                .unwrap()
                .iter()
                .find(|v| v["event"] == event)
            {
                return v.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no `{event}` alert within {within:?}; got {:?}; log:\n{}",
                self.got.lock().unwrap(),
                tail(log)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
