//! Daemon operations end to end, with real `walship` processes and a real S3 server:
//! walship.toml (many databases, many replicas, strict errors, `config check`), a failing
//! replica that catches up, retention, `--exec`, one-shot snapshots while `replicate` runs,
//! and writer fencing between two replicators.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use rusqlite::Connection;
use walship_engine::Replica;
use walship_engine::replica::GenerationObjects;
use walship_format::key::{GenerationId, ObjectKey};
use walship_storage::testkit::MotoServer;
use walship_storage::{ReplicaUrl, StoreOptions};

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exactly one line starting with `error:`.
fn error_line(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{stderr}");
    lines[0].to_string()
}

/// Starts `walship ARGS` with its stderr in `log`.
fn start(args: &[&str], log: &Path) -> Replicator {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = walship()
        .args(args)
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap();
    Replicator {
        child,
        log: log.to_path_buf(),
    }
}

fn insert_rows(db: &Path, from: i64, to: i64) {
    let c = Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    for i in from..to {
        c.execute("INSERT INTO t(id, v) VALUES (?1, randomblob(200))", [i])
            .unwrap();
    }
}

fn count(db: &Path) -> i64 {
    Connection::open(db)
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap()
}

fn max_id(db: &Path) -> i64 {
    Connection::open(db)
        .unwrap()
        .query_row("SELECT coalesce(max(id), 0) FROM t", [], |r| r.get(0))
        .unwrap()
}

/// Restores `url` into a fresh file in `dir` and returns its path.
fn restored(url: &str, dir: &Path) -> PathBuf {
    let out = dir.join(format!(
        "restored-{}.db",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    restore_ok(url, &out);
    out
}

/// Polls `cond` until it holds or `timeout` passes (then fails with the end of `log`).
fn wait_until(timeout: Duration, what: &str, log: &Path, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < timeout,
            "timed out waiting for {what}; log:\n{}",
            tail(log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

type Headers = std::collections::HashMap<String, walship_format::object::ObjectHeader>;

/// Every generation of a replica with its objects, listed in-process; with `headers`, also
/// every segment's header.
fn read_replica(url: &str, headers: bool) -> Vec<(GenerationId, GenerationObjects, Headers)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let u: ReplicaUrl = url.parse().unwrap();
        let mut opts = StoreOptions::default();
        if matches!(u, ReplicaUrl::S3 { .. }) {
            opts.s3 = MotoServer::shared().options();
        }
        let replica = Replica::new(walship_storage::open(&u, &opts).await.unwrap());
        let mut out = Vec::new();
        for g in replica.generations().await.unwrap() {
            let objs = replica.objects(g).await.unwrap();
            let mut h = Headers::new();
            for s in objs.segments.iter().filter(|_| headers) {
                h.insert(s.name.clone(), replica.read_header(&s.name).await.unwrap());
            }
            out.push((g, objs, h));
        }
        out
    })
}

/// Every generation of a replica with its objects, listed in-process.
fn listing(url: &str) -> Vec<(GenerationId, GenerationObjects)> {
    read_replica(url, false)
        .into_iter()
        .map(|(g, o, _)| (g, o))
        .collect()
}

/// Asserts no generation holds two segments continuing the same position with different
/// WAL histories (the trace two writers interleaving in one generation would leave: a merged
/// segment and its first part share a start and a start checksum) and that its segments
/// form one chain from a snapshot.
fn assert_one_writer_per_generation(url: &str) {
    for (g, objs, headers) in read_replica(url, true) {
        let mut starts = std::collections::HashMap::new();
        let mut ends: std::collections::HashSet<u64> = objs
            .snapshots
            .iter()
            .filter_map(|s| match s.key {
                ObjectKey::Snapshot { position, .. } => Some(position),
                _ => None,
            })
            .collect();
        for s in &objs.segments {
            let ObjectKey::Segment { start, end, .. } = s.key else {
                continue;
            };
            let h = &headers[&s.name];
            // The checksum a segment's first frame continues from: salted per WAL, so two
            // writers' segments at one position differ in it; a merged segment has its first
            // part's.
            let history = h.start_checksum;
            assert_eq!(
                *starts.entry(start).or_insert(history),
                history,
                "generation {g}: two segments continue position {start:#x} differently (interleaved writers)"
            );
            assert!(
                ends.contains(&start),
                "generation {g}: segment {} continues nothing",
                s.name
            );
            ends.insert(end);
        }
    }
}

/// Writes a row every `every` in a thread until stopped; returns the last id written.
struct BackgroundWriter {
    stop: Arc<AtomicBool>,
    last: Arc<AtomicI64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundWriter {
    fn start(db: &Path, first_id: i64, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let last = Arc::new(AtomicI64::new(first_id - 1));
        let (s, l, db) = (stop.clone(), last.clone(), db.to_path_buf());
        let thread = std::thread::spawn(move || {
            let c = Connection::open(&db).unwrap();
            c.busy_timeout(Duration::from_secs(5)).unwrap();
            let mut id = first_id;
            while !s.load(Ordering::Acquire) {
                c.execute("INSERT INTO t(id, v) VALUES (?1, randomblob(300))", [id])
                    .unwrap();
                l.store(id, Ordering::Release);
                id += 1;
                std::thread::sleep(every);
            }
        });
        BackgroundWriter {
            stop,
            last,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> i64 {
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().unwrap();
        self.last.load(Ordering::Acquire)
    }
}

impl Drop for BackgroundWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Waits until a restore of `url` has `n` rows (replication is asynchronous).
fn wait_restored_count(url: &str, dir: &Path, n: i64, log: &Path) {
    let out = dir.join("poll.db");
    let mut last = -1;
    wait_until(
        Duration::from_secs(20),
        &format!("{n} rows in {url}"),
        log,
        || {
            let _ = std::fs::remove_file(&out);
            last = if restore(url, &out, &[]).status.success() {
                count(&out)
            } else {
                -1
            };
            last == n
        },
    );
    let _ = std::fs::remove_file(&out);
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("walship.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn snapshots_in(url: &str) -> usize {
    listing(url).iter().map(|(_, o)| o.snapshots.len()).sum()
}

// ---------------------------------------------------------------------------------------
// walship.toml

#[test]
fn one_process_replicates_many_databases_to_many_replicas_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = (d.join("a.db"), d.join("b.db"));
    create_db(&a);
    create_db(&b);
    insert_rows(&a, 1, 50);
    insert_rows(&b, 1000, 1030);
    let moto = MotoServer::shared();
    let s3 = moto
        .url(moto.bucket(), &MotoServer::unique_prefix("cfg-many"))
        .to_string();
    let (ra1, ra2, rb) = (
        file_url(&d.join("rep-a1")),
        s3.clone(),
        file_url(&d.join("rep-b")),
    );
    let cfg = write_config(
        d,
        &format!(
            r#"version = 1
[[db]]
path = "a.db"
  [[db.replica]]
  url = "{ra1}"
  sync-interval = "100ms"
  [[db.replica]]
  name = "s3"
  url = "${{A_S3_URL}}"
  sync-interval = "100ms"
[[db]]
path = "{}"
name = "bee"
  [[db.replica]]
  url = "{rb}"
  sync-interval = "100ms"
"#,
            b.display()
        ),
    );
    let log = d.join("rep.log");
    let mut cmd_log = std::fs::File::create(&log).unwrap();
    use std::io::Write;
    writeln!(
        cmd_log,
        "config:\n{}",
        std::fs::read_to_string(&cfg).unwrap()
    )
    .unwrap();
    // The URL comes from the environment (`${A_S3_URL}`), the file through WALSHIP_CONFIG.
    let child = walship()
        .arg("replicate")
        .env("WALSHIP_CONFIG", &cfg)
        .env("A_S3_URL", &ra2)
        .stdout(Stdio::null())
        .stderr(cmd_log)
        .spawn()
        .unwrap();
    let rep = Replicator {
        child,
        log: log.clone(),
    };
    wait_until(
        Duration::from_secs(20),
        "three replicas to hold a snapshot",
        &log,
        || [&ra1, &ra2, &rb].iter().all(|u| snapshots_in(u) > 0),
    );
    insert_rows(&a, 50, 120);
    insert_rows(&b, 1030, 1100);
    // Mid-way, every replica gets the data while the process runs (each pair has its own
    // task).
    wait_restored_count(&ra1, d, 119, &log);
    wait_restored_count(&ra2, d, 119, &log);
    wait_restored_count(&rb, d, 100, &log);
    insert_rows(&a, 120, 130);
    insert_rows(&b, 1100, 1110);
    let st = rep.terminate(Duration::from_secs(30));
    assert!(st.success(), "replicate failed: {}", tail(&log));
    assert_eq!(count(&restored(&ra1, d)), 129);
    assert_eq!(count(&restored(&ra2, d)), 129);
    assert_eq!(count(&restored(&rb, d)), 110);
    // Each replicator logs in its own span, naming its database and replica.
    let text = strip_ansi(&std::fs::read_to_string(&log).unwrap());
    for url in [&ra1, &rb] {
        assert!(text.contains(&format!("replica={url}}}")), "{}", tail(&log));
    }
    assert!(text.contains("replicator{db="), "{}", tail(&log));
}

#[test]
fn a_failing_replica_never_stops_the_others_and_catches_up_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("app.db");
    create_db(&db);
    insert_rows(&db, 1, 20);
    let (good_dir, flaky_dir) = (d.join("good"), d.join("flaky"));
    let (good, flaky) = (file_url(&good_dir), file_url(&flaky_dir));
    let cfg = write_config(
        d,
        &format!(
            "version = 1\n[[db]]\npath = \"app.db\"\n  [[db.replica]]\n  url = \"{good}\"\n  sync-interval = \"100ms\"\n  [[db.replica]]\n  url = \"{flaky}\"\n  sync-interval = \"100ms\"\n"
        ),
    );
    let log = d.join("rep.log");
    let rep = start(&["replicate", "--config", cfg.to_str().unwrap()], &log);
    wait_until(
        Duration::from_secs(20),
        "both replicas to start",
        &log,
        || {
            std::fs::read_to_string(&log)
                .unwrap()
                .contains("all replicators up")
        },
    );
    // The flaky replica's directory disappears; a file takes its place.
    let aside = d.join("flaky-aside");
    std::fs::rename(&flaky_dir, &aside).unwrap();
    std::fs::write(&flaky_dir, b"not a directory").unwrap();
    insert_rows(&db, 20, 80);
    // The good one gets everything, while the other fails.
    wait_restored_count(&good, d, 79, &log);
    wait_until(
        Duration::from_secs(20),
        "the flaky replica to fail",
        &log,
        || {
            std::fs::read_to_string(&log)
                .unwrap()
                .contains("sync failed")
        },
    );
    // It comes back and catches up without a restart.
    std::fs::remove_file(&flaky_dir).unwrap();
    std::fs::rename(&aside, &flaky_dir).unwrap();
    insert_rows(&db, 80, 90);
    wait_until(
        Duration::from_secs(20),
        "the flaky replica to catch up",
        &log,
        || {
            let out = d.join("catch-up.db");
            let _ = std::fs::remove_file(&out);
            restore(&flaky, &out, &[]).status.success() && count(&out) == 89
        },
    );
    let st = rep.terminate(Duration::from_secs(30));
    assert!(st.success(), "replicate failed: {}", tail(&log));
    assert_one_writer_per_generation(&flaky);
}

#[test]
fn bad_configs_fail_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("app.db");
    create_db(&db);
    let rep = file_url(&d.join("rep"));
    let cases: Vec<(String, &str)> = vec![
        (
            format!("version = 1\n[[db]]\npath = \"app.db\"\n  [[db.replica]]\n  url = \"{rep}\"\n  snc-interval = \"1s\"\n"),
            "db[0].replica[0].snc-interval: unknown field",
        ),
        (
            format!("version = 1\n[[db]]\npath = \"app.db\"\n  [[db.replica]]\n  url = \"{rep}\"\n  snapshot-interval = \"often\"\n"),
            "db[0].replica[0].snapshot-interval: `often` is not a duration",
        ),
        (
            format!("version = 1\n[[db]]\npath = \"app.db\"\n  [[db.replica]]\n  url = \"{rep}\"\n[[db]]\npath = \"./app.db\"\n  [[db.replica]]\n  url = \"{rep}2\"\n"),
            "db[1].path:",
        ),
        (
            "version = 1\n[[db]]\npath = \"app.db\"\n  [[db.replica]]\n  url = \"s3://${WALSHIP_TEST_UNSET_BUCKET}/x\"\n".to_string(),
            "db[0].replica[0].url: environment variable `WALSHIP_TEST_UNSET_BUCKET` is not set",
        ),
        (
            format!("version = 7\n[[db]]\npath = \"app.db\"\n  [[db.replica]]\n  url = \"{rep}\"\n"),
            "version: unsupported config version 7",
        ),
    ];
    for (text, want) in cases {
        let cfg = write_config(d, &text);
        for args in [
            vec!["config", "check", "--offline", cfg.to_str().unwrap()],
            vec!["replicate", "--config", cfg.to_str().unwrap()],
        ] {
            let o = walship().args(&args).output().unwrap();
            assert!(!o.status.success(), "{args:?} accepted:\n{text}");
            let line = error_line(&stderr_of(&o));
            assert!(line.contains(want), "{args:?}: want `{want}` in: {line}");
        }
    }
    // Nothing was written anywhere.
    assert!(!d.join("rep").exists());
}

#[test]
fn config_check_contacts_every_replica_unless_offline_and_replicate_refuses_an_unreachable_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("app.db");
    create_db(&db);
    let moto = MotoServer::shared();
    let s3 = moto
        .url(moto.bucket(), &MotoServer::unique_prefix("cfg-check"))
        .to_string();
    let good = format!(
        "version = 1\n[[db]]\npath = \"app.db\"\n  [[db.replica]]\n  url = \"{}\"\n  [[db.replica]]\n  url = \"{s3}\"\n",
        file_url(&d.join("rep"))
    );
    let cfg = write_config(d, &good);
    let o = walship()
        .args(["config", "check", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}{}", out, stderr_of(&o));
    assert!(out.contains("db[0].replica[1]: s3://"), "{out}");
    assert!(out.contains("reachable"), "{out}");
    assert!(out.contains("ok (1 databases, 2 replicas)"), "{out}");

    // A bucket that does not exist: check fails naming the replica; --offline passes;
    // replicate refuses to start and writes nothing.
    let missing = moto.url("no-such-walship-bucket", "x").to_string();
    let bad = good.replace(&s3, &missing);
    let cfg = write_config(d, &bad);
    let o = walship()
        .args(["config", "check", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let line = error_line(&stderr_of(&o));
    assert!(line.contains("db[0].replica[1]"), "{line}");
    assert!(line.contains("does not exist"), "{line}");
    let o = walship()
        .args(["config", "check", "--offline", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    let o = walship()
        .args(["replicate", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let line = error_line(&stderr_of(&o));
    assert!(
        line.contains("db[0].replica[1]: cannot reach the replica"),
        "{line}"
    );
    assert!(!d.join("rep").join("generations").exists());
}

// ---------------------------------------------------------------------------------------
// Retention

#[test]
fn retention_keeps_the_newest_snapshots_drops_what_they_do_not_need_and_old_generations() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("app.db");
    create_db(&db);
    insert_rows(&db, 1, 30);
    let url = file_url(&d.join("rep"));
    let args = [
        "replicate",
        db.to_str().unwrap(),
        url.as_str(),
        "--sync-interval",
        "100ms",
        "--snapshot-interval",
        "300ms",
        "--keep-last",
        "2",
    ];
    let log = d.join("rep.log");
    let rep = start(&args, &log);
    let w = BackgroundWriter::start(&db, 100, Duration::from_millis(20));
    wait_until(Duration::from_secs(30), "four snapshots", &log, || {
        std::fs::read_to_string(&log)
            .unwrap()
            .matches("snapshot uploaded")
            .count()
            >= 4
    });
    let last = w.stop();
    let st = rep.terminate(Duration::from_secs(30));
    assert!(st.success(), "{}", tail(&log));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.matches("snapshot uploaded").count() >= 4,
        "{}",
        tail(&log)
    );
    assert!(text.contains("retention"), "{}", tail(&log));
    let gens = listing(&url);
    assert_eq!(gens.len(), 1);
    let objs = &gens[0].1;
    assert_eq!(objs.snapshots.len(), 2, "{:?}", objs.snapshots);
    let oldest_kept = objs
        .snapshots
        .iter()
        .filter_map(|s| match s.key {
            ObjectKey::Snapshot { position, .. } => Some(position),
            _ => None,
        })
        .min()
        .unwrap();
    for s in &objs.segments {
        if let ObjectKey::Segment { end, .. } = s.key {
            assert!(
                end > oldest_kept,
                "segment {} is before every kept snapshot",
                s.name
            );
        }
    }
    let out = restored(&url, d);
    assert_eq!(max_id(&out), last);
    assert_eq!(count(&out), count(&db));

    // A new database in the same place: a new generation; once it has two snapshots, the
    // old generation is superseded and goes.
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
    create_db(&db);
    insert_rows(&db, 5000, 5010);
    let uploaded = || {
        std::fs::read_to_string(&log)
            .unwrap()
            .matches("snapshot uploaded")
            .count()
    };
    let before = uploaded();
    let rep = start(&args, &log);
    let w = BackgroundWriter::start(&db, 6000, Duration::from_millis(20));
    // The new generation's first snapshot and two more.
    wait_until(Duration::from_secs(30), "three snapshots", &log, || {
        uploaded() >= before + 3
    });
    let last = w.stop();
    let st = rep.terminate(Duration::from_secs(30));
    assert!(st.success(), "{}", tail(&log));
    let gens = listing(&url);
    assert_eq!(gens.len(), 1, "the old generation should be gone");
    assert_eq!(gens[0].1.snapshots.len(), 2);
    let out = restored(&url, d);
    assert_eq!(max_id(&out), last);
    assert_eq!(count(&out), count(&db));
}

#[test]
fn an_idle_database_triggers_no_retention() {
    // Retention runs only after a snapshot upload, and snapshots only after changes: with a
    // tiny snapshot interval and an idle database, the replica stops changing.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("app.db");
    create_db(&db);
    insert_rows(&db, 1, 10);
    let url = file_url(&d.join("rep"));
    let log = d.join("rep.log");
    let rep = start(
        &[
            "replicate",
            db.to_str().unwrap(),
            url.as_str(),
            "--sync-interval",
            "100ms",
            "--snapshot-interval",
            "200ms",
            "--keep-last",
            "1",
        ],
        &log,
    );
    wait_until(Duration::from_secs(20), "a snapshot", &log, || {
        snapshots_in(&url) > 0
    });
    std::thread::sleep(Duration::from_millis(800));
    let before = std::fs::read_to_string(&log).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let after = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        before.matches("snapshot uploaded").count(),
        after.matches("snapshot uploaded").count()
    );
    assert_eq!(
        before.matches("retention").count(),
        after.matches("retention").count()
    );
    let st = rep.terminate(Duration::from_secs(30));
    assert!(st.success(), "{}", tail(&log));
}

// ---------------------------------------------------------------------------------------
// --exec

#[test]
fn exec_starts_the_app_after_the_first_sync_forwards_sigterm_and_exits_with_its_status() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("app.db");
    create_db(&db);
    insert_rows(&db, 1, 40);
    let rep_dir = d.join("rep");
    let url = file_url(&rep_dir);
    let (started, got_term) = (d.join("started"), d.join("got-term"));
    // The app: records what the replica held when it started, then waits for SIGTERM and
    // exits with status 7.
    let app = r#"trap 'echo term > "$APP_TERM"; exit 7' TERM
ls "$APP_REPLICA"/generations/*/snapshots/ > "$APP_STARTED.tmp" 2>&1
mv "$APP_STARTED.tmp" "$APP_STARTED"
while :; do sleep 0.05; done"#;
    let log = d.join("rep.log");
    let f = std::fs::File::create(&log).unwrap();
    let child = walship()
        .args([
            "replicate",
            db.to_str().unwrap(),
            url.as_str(),
            "--sync-interval",
            "100ms",
            "--exec",
            app,
        ])
        .env("APP_REPLICA", &rep_dir)
        .env("APP_STARTED", &started)
        .env("APP_TERM", &got_term)
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap();
    let rep = Replicator {
        child,
        log: log.clone(),
    };
    wait_until(Duration::from_secs(20), "the app to start", &log, || {
        started.exists()
    });
    let seen = std::fs::read_to_string(&started).unwrap();
    assert!(
        seen.contains(".wsnap"),
        "the app started before the first snapshot was in the replica: {seen}"
    );
    // Commit more, and stop at once: the final sync after the app exits ships them.
    insert_rows(&db, 40, 90);
    let st = rep.terminate(Duration::from_secs(30));
    assert!(
        got_term.exists(),
        "SIGTERM was not forwarded: {}",
        tail(&log)
    );
    assert_eq!(st.code(), Some(7), "{}", tail(&log));
    assert_eq!(count(&restored(&url, d)), 89);
}

#[test]
fn exec_exit_of_the_app_ends_walship_with_its_status_after_a_final_sync() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("app.db");
    create_db(&db);
    let url = file_url(&d.join("rep"));
    // The app writes (through the test binary, re-executed as a writer) and exits 3.
    let exe = std::env::current_exe().unwrap();
    let app = format!(
        "'{}' --exact exec_writer_child --nocapture --test-threads 1 >/dev/null; exit 3",
        exe.display()
    );
    let o = walship()
        .args([
            "replicate",
            db.to_str().unwrap(),
            url.as_str(),
            "--sync-interval",
            "1h",
            "--exec",
            &app,
        ])
        .env("EXEC_WRITER_DB", &db)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr_of(&o));
    // Everything the app committed before it exited is in the replica.
    assert_eq!(count(&restored(&url, d)), 25);
}

/// The app of the test above.
#[test]
fn exec_writer_child() {
    let Ok(db) = std::env::var("EXEC_WRITER_DB") else {
        return;
    };
    insert_rows(Path::new(&db), 1, 26);
}

#[test]
fn exec_never_starts_the_app_when_replication_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("rollback.db");
    let c = Connection::open(&db).unwrap();
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        .unwrap();
    drop(c);
    let mark = d.join("app-ran");
    let url = file_url(&d.join("rep"));
    let app = format!("touch '{}'", mark.display());
    let o = walship()
        .args([
            "replicate",
            db.to_str().unwrap(),
            url.as_str(),
            "--exec",
            &app,
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let line = error_line(&stderr_of(&o));
    assert!(line.contains("not WAL"), "{line}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(!mark.exists(), "the app was started");
}

// ---------------------------------------------------------------------------------------
// One-shot snapshots while `replicate` runs

#[test]
fn a_snapshot_from_the_config_while_replicate_runs_keeps_the_newest_data_restorable() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("app.db");
    create_db(&db);
    insert_rows(&db, 1, 100);
    let url = file_url(&d.join("rep"));
    let cfg = write_config(
        d,
        &format!(
            "version = 1\n[[db]]\npath = \"app.db\"\nname = \"main\"\n  [[db.replica]]\n  url = \"{url}\"\n  sync-interval = \"100ms\"\n"
        ),
    );
    let cfg_s = cfg.to_str().unwrap();
    let log = d.join("rep.log");
    let rep = start(&["replicate", "--config", cfg_s], &log);
    wait_until(Duration::from_secs(20), "the first snapshot", &log, || {
        snapshots_in(&url) > 0
    });
    insert_rows(&db, 100, 150);
    std::thread::sleep(Duration::from_millis(400));
    let o = walship()
        .args(["snapshot", "--config", cfg_s, "--db", "main"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("(db[0].replica[0])"),
        "{}",
        stderr_of(&o)
    );
    assert_eq!(
        listing(&url).len(),
        2,
        "the one-shot snapshot has its own generation"
    );
    // The replicator goes on in its own generation, which the one-shot snapshot's (newer
    // id) must not hide.
    insert_rows(&db, 150, 200);
    wait_restored_count(&url, d, 199, &log);
    let st = rep.terminate(Duration::from_secs(30));
    assert!(st.success(), "{}", tail(&log));
    assert_eq!(count(&restored(&url, d)), 199);
    assert_one_writer_per_generation(&url);

    // `--db` must name a configured database.
    let o = walship()
        .args(["snapshot", "--config", cfg_s, "--db", "other"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(error_line(&stderr_of(&o)).contains("--db other: no such database"));
    // Without --db: every database.
    let o = walship()
        .args(["snapshot", "--config", cfg_s])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
}

// ---------------------------------------------------------------------------------------
// Writer fencing

fn fencing(url: &str, d: &Path) {
    let (db_a, db_b) = (d.join("a.db"), d.join("b.db"));
    create_db(&db_a);
    create_db(&db_b);
    insert_rows(&db_a, 1, 10);
    insert_rows(&db_b, 1_000_000, 1_000_010);
    let common = ["--sync-interval", "100ms", "--lease-ttl", "3s"];
    let args = |db: &Path, extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            "replicate".to_string(),
            db.display().to_string(),
            url.to_string(),
        ];
        v.extend(common.iter().chain(extra).map(|s| s.to_string()));
        v
    };
    let run = |v: &[String], log: &Path| {
        let refs: Vec<&str> = v.iter().map(String::as_str).collect();
        start(&refs, log)
    };
    // A holds the replica and stays busy (so it renews its lease).
    let log_a = d.join("a.log");
    let a = run(&args(&db_a, &[]), &log_a);
    wait_until(
        Duration::from_secs(20),
        "A's first snapshot",
        &log_a,
        || snapshots_in(url) > 0,
    );
    let wa = BackgroundWriter::start(&db_a, 100, Duration::from_millis(30));

    // B with --on-conflict fail: refused at once, with one line naming the holder.
    let o = walship()
        .args(args(&db_b, &["--on-conflict", "fail"]))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let line = error_line(&stderr_of(&o));
    assert!(line.contains("is held by another replicator"), "{line}");
    assert!(line.contains(&format!("pid {}", a.child.id())), "{line}");

    // B with --on-conflict wait: waits while A is alive and renewing, longer than a TTL.
    let log_b = d.join("b.log");
    let b = run(&args(&db_b, &[]), &log_b);
    std::thread::sleep(Duration::from_millis(4000));
    let text = std::fs::read_to_string(&log_b).unwrap();
    assert!(text.contains("waiting"), "{text}");
    assert!(
        !text.contains("lease acquired"),
        "B took a live lease: {text}"
    );
    // A stops (SIGTERM: final sync, lease released); B goes on at once.
    let last_a = wa.stop();
    let st = a.terminate(Duration::from_secs(30));
    assert!(st.success(), "{}", tail(&log_a));
    wait_until(
        Duration::from_secs(10),
        "B to take the lease",
        &log_b,
        || {
            std::fs::read_to_string(&log_b)
                .unwrap()
                .contains("lease acquired")
        },
    );
    let wb = BackgroundWriter::start(&db_b, 2_000_000, Duration::from_millis(30));
    std::thread::sleep(Duration::from_millis(1000));

    // C with --on-conflict takeover: takes it at once; B, busy, notices at its next renewal
    // and stops with one line.
    let log_c = d.join("c.log");
    let db_c = d.join("c.db");
    create_db(&db_c);
    insert_rows(&db_c, 3_000_000, 3_000_005);
    let c = run(&args(&db_c, &["--on-conflict", "takeover"]), &log_c);
    let mut b = b;
    let t0 = Instant::now();
    let st_b = loop {
        if let Some(st) = b.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "B did not stop after the takeover: {}",
            tail(&log_b)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    wb.stop();
    assert!(!st_b.success());
    let line = error_line(&std::fs::read_to_string(&log_b).unwrap());
    assert!(line.contains("lost the lease"), "{line}");
    insert_rows(&db_c, 3_000_005, 3_000_050);
    std::thread::sleep(Duration::from_millis(500));
    let st = c.terminate(Duration::from_secs(30));
    assert!(st.success(), "{}", tail(&log_c));

    // Three writers, each in generations of its own; the newest state is C's.
    assert_one_writer_per_generation(url);
    assert!(listing(url).len() >= 3);
    let out = restored(url, d);
    assert_eq!(max_id(&out), 3_000_049);
    assert_eq!(count(&out), count(&db_c));
    assert!(last_a >= 100);
}

#[test]
fn two_replicators_on_one_local_replica_never_share_a_generation() {
    let dir = tempfile::tempdir().unwrap();
    let url = file_url(&dir.path().join("rep"));
    fencing(&url, dir.path());
}

#[test]
fn two_replicators_on_one_s3_replica_never_share_a_generation() {
    let dir = tempfile::tempdir().unwrap();
    let moto = MotoServer::shared();
    let url = moto
        .url(moto.bucket(), &MotoServer::unique_prefix("fencing"))
        .to_string();
    fencing(&url, dir.path());
}

#[test]
fn a_replicator_restarted_after_kill_9_takes_its_own_lease_back_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("app.db");
    create_db(&db);
    // The app stays up across the replicator's crash and writes through one connection that
    // it never closes: a last connection closing while no replicator holds the database
    // would checkpoint and remove the WAL, and rightly start a new generation.
    let app = Connection::open(&db).unwrap();
    app.busy_timeout(Duration::from_secs(5)).unwrap();
    let insert = |from: i64, to: i64| {
        for i in from..to {
            app.execute("INSERT INTO t(id, v) VALUES (?1, randomblob(200))", [i])
                .unwrap();
        }
    };
    insert(1, 20);
    let url = file_url(&d.join("rep"));
    let args = [
        "replicate",
        db.to_str().unwrap(),
        url.as_str(),
        "--sync-interval",
        "100ms",
        "--lease-ttl",
        "1h",
    ];
    let log = d.join("rep.log");
    let rep = start(&args, &log);
    wait_until(Duration::from_secs(20), "a snapshot", &log, || {
        snapshots_in(&url) > 0
    });
    insert(20, 40);
    std::thread::sleep(Duration::from_millis(400));
    rep.kill9();
    // The lease would last an hour, but its holder is provably gone: no wait, and the
    // generation continues.
    let t0 = Instant::now();
    let rep = start(&args, &log);
    insert(40, 60);
    wait_until(
        Duration::from_secs(10),
        "the restarted replicator",
        &log,
        || {
            std::fs::read_to_string(&log)
                .unwrap()
                .matches("resuming replica")
                .count()
                >= 1
        },
    );
    assert!(t0.elapsed() < Duration::from_secs(10));
    let st = rep.terminate(Duration::from_secs(30));
    assert!(st.success(), "{}", tail(&log));
    assert_eq!(listing(&url).len(), 1, "{}", tail(&log));
    assert_eq!(count(&restored(&url, d)), 59);
}
