//! A store that stops answering: packets dropped, connections left open (a proxy that
//! stops forwarding). Every storage call has connect, first-byte and whole-operation
//! timeouts, and a stall shows within seconds in the log, in `/health` and in `/metrics`
//! (and so in the alerts, which follow health); once the store answers again, replication
//! catches up and everything committed is restorable.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use walship_storage::testkit::MotoServer;

use crate::common::{Replicator, create_db, restore_ok, tail};
use crate::http_support::{client, count_rows, insert_rows, listen_addr, sample, strip_ansi};
use crate::proxy::Proxy;

/// A replica URL on `moto`, reached through `proxy`.
pub fn url_through(proxy: &Proxy, moto: &MotoServer, tag: &str) -> String {
    format!(
        "s3://{}/{}?endpoint={}&region=us-east-1&force-path-style=true",
        moto.bucket(),
        MotoServer::unique_prefix(tag),
        proxy.endpoint()
    )
}

/// A proxy in front of `moto`.
pub fn moto_proxy(moto: &MotoServer) -> Proxy {
    Proxy::start(([127, 0, 0, 1], moto.port()).into())
}

/// `walship replicate DB URL --listen 127.0.0.1:0 EXTRA...`, and the base URL of its HTTP
/// server once it answers (not waiting for a first sync).
pub fn replicate_listening(
    db: &Path,
    url: &str,
    extra: &[&str],
    log: &Path,
) -> (Replicator, String) {
    let mut args = vec!["--listen", "127.0.0.1:0", "--sync-interval", "200ms"];
    args.extend_from_slice(extra);
    let mut rep = Replicator::start(db, url, &args, log);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = strip_ansi(&std::fs::read_to_string(log).unwrap_or_default());
        if let Some(a) = listen_addr(&text) {
            return (rep, format!("http://{a}"));
        }
        if let Some(st) = rep.child.try_wait().unwrap() {
            panic!(
                "replicate exited ({st}) before its HTTP server started:\n{}",
                tail(log)
            );
        }
        assert!(
            Instant::now() < deadline,
            "replicate did not start its HTTP server; log:\n{}",
            tail(log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn get_json(base: &str, path: &str) -> serde_json::Value {
    client()
        .get(format!("{base}{path}"))
        .timeout(Duration::from_secs(10))
        .send()
        .and_then(|r| r.json())
        .unwrap_or_default()
}

pub fn get_text(base: &str, path: &str) -> String {
    client()
        .get(format!("{base}{path}"))
        .timeout(Duration::from_secs(10))
        .send()
        .and_then(|r| r.text())
        .unwrap_or_default()
}

/// The first database's entry of `/api/v1/status`.
pub fn db_status(base: &str) -> serde_json::Value {
    get_json(base, "/api/v1/status")["databases"][0].clone()
}

/// Polls `cond` every 100 ms until it holds or `timeout` passes; panics with `what`, the
/// last value `cond` described and the end of the log.
pub fn wait_for(
    timeout: Duration,
    what: &str,
    log: &Path,
    mut cond: impl FnMut() -> Result<(), String>,
) -> Duration {
    let t0 = Instant::now();
    loop {
        let last = match cond() {
            Ok(()) => return t0.elapsed(),
            Err(e) => e,
        };
        if t0.elapsed() > timeout {
            panic!(
                "timed out after {timeout:?} waiting for {what}; last: {last}\nlog:\n{}",
                tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the replicator reports a sync that finished after `after` (RFC 3339 text
/// compares in time order for one offset).
pub fn wait_synced_after(base: &str, after: &str, log: &Path, timeout: Duration) {
    wait_for(timeout, "a sync", log, || {
        let st = db_status(base);
        match st["last_synced"].as_str() {
            Some(t) if t > after && st["unsynced_since"].is_null() => Ok(()),
            _ => Err(st.to_string()),
        }
    });
}

fn now_text(base: &str) -> String {
    get_json(base, "/api/v1/status")["now"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Every line of the log (a retried call is logged at INFO; the replicator warns once per
/// failure episode).
fn log_lines(log: &Path) -> Vec<String> {
    strip_ansi(&std::fs::read_to_string(log).unwrap_or_default())
        .lines()
        .map(str::to_string)
        .collect()
}

fn warn_lines(log: &Path) -> Vec<String> {
    strip_ansi(&std::fs::read_to_string(log).unwrap_or_default())
        .lines()
        .filter(|l| l.contains(" WARN "))
        .map(str::to_string)
        .collect()
}

fn fresh_db(dir: &Path, rows: usize) -> PathBuf {
    let db = dir.join("app.db");
    create_db(&db);
    insert_rows(&db, rows);
    db
}

#[test]
fn a_store_that_stops_answering_shows_within_seconds_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_db(dir.path(), 50);
    let moto = MotoServer::shared();
    let proxy = moto_proxy(moto);
    let url = url_through(&proxy, moto, "stall");
    let log = dir.path().join("replicate.log");
    let (rep, base) = replicate_listening(
        &db,
        &url,
        &[
            "--connect-timeout",
            "2s",
            "--read-timeout",
            "3s",
            "--operation-timeout",
            "20s",
            "--shutdown-timeout",
            "120s",
        ],
        &log,
    );
    wait_synced_after(&base, "", &log, Duration::from_secs(60));
    let health = get_json(&base, "/health");
    assert_eq!(health["status"], "healthy", "{health:#}");
    let warns_before = warn_lines(&log).len();

    // The store stops answering while there is something to upload.
    proxy.black_hole();
    insert_rows(&db, 30);

    // Within seconds (generous for a loaded machine): a WARN, health not healthy with the
    // error, and the metrics show it.
    let bound = Duration::from_secs(15);
    let in_log = wait_for(bound, "a WARN about the stalled store", &log, || {
        let w = warn_lines(&log);
        if w.len() > warns_before {
            Ok(())
        } else {
            Err(format!("{} WARN lines", w.len()))
        }
    });
    let in_health = wait_for(bound, "/health to show the stall", &log, || {
        let h = get_json(&base, "/health");
        let d = &h["databases"][0];
        if h["status"] != "healthy" && d["last_error"].is_string() {
            Ok(())
        } else {
            Err(h.to_string())
        }
    });
    let in_metrics = wait_for(bound, "/metrics to show the stall", &log, || {
        let m = get_text(&base, "/metrics");
        let stalled = sample(&m, "walship_storage_stalled_seconds{db=\"app\"}").unwrap_or(0.0);
        let health = sample(&m, "walship_health{db=\"app\"}").unwrap_or(0.0);
        if stalled > 0.0 && health >= 1.0 {
            Ok(())
        } else {
            Err(format!("stalled {stalled}, health {health}"))
        }
    });
    println!("stall seen: log {in_log:?}, /health {in_health:?}, /metrics {in_metrics:?}");
    let h = get_json(&base, "/health");
    let reasons = h["databases"][0]["reasons"].to_string();
    assert!(reasons.contains("storage"), "{h:#}");
    // The call itself ends at its read timeout (not minutes later) and is retried.
    let timed_out = wait_for(
        Duration::from_secs(30),
        "a timed-out call to be retried",
        &log,
        || {
            let w = log_lines(&log);
            if w.iter().any(|l| l.contains("did not answer in time")) {
                Ok(())
            } else {
                Err(format!("{} log lines", w.len()))
            }
        },
    );
    println!("first timeout retried after {:?}", in_log + timed_out);

    // The store answers again: replication catches up by itself, health recovers.
    let unblocked = now_text(&base);
    proxy.forward();
    wait_synced_after(&base, &unblocked, &log, Duration::from_secs(120));
    wait_for(Duration::from_secs(30), "/health to recover", &log, || {
        let h = get_json(&base, "/health");
        if h["status"] == "healthy" {
            Ok(())
        } else {
            Err(h.to_string())
        }
    });
    insert_rows(&db, 20);
    let after = now_text(&base);
    wait_synced_after(&base, &after, &log, Duration::from_secs(60));
    let st = rep.terminate(Duration::from_secs(120));
    assert!(
        st.success(),
        "replicate failed after the stall:\n{}",
        tail(&log)
    );

    let out = dir.path().join("restored.db");
    restore_ok(&url, &out);
    assert_eq!(count_rows(&out), 100, "every committed row restores");
}

#[test]
fn a_lease_renewal_against_a_silent_store_times_out_instead_of_hanging() {
    // The lease's renewal is a small PUT: it must give up within the timeouts, show in the
    // status, and succeed once the store answers again.
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_db(dir.path(), 10);
    let moto = MotoServer::shared();
    let proxy = moto_proxy(moto);
    let url = url_through(&proxy, moto, "stall-lease");
    let log = dir.path().join("replicate.log");
    let (rep, base) = replicate_listening(
        &db,
        &url,
        &[
            "--lease-ttl",
            "2s",
            "--read-timeout",
            "2s",
            "--operation-timeout",
            "10s",
            "--shutdown-timeout",
            "120s",
        ],
        &log,
    );
    wait_synced_after(&base, "", &log, Duration::from_secs(60));
    // Past half the lease's time-to-live, the next upload renews it first.
    std::thread::sleep(Duration::from_millis(1500));
    proxy.black_hole();
    insert_rows(&db, 5);
    wait_for(
        Duration::from_secs(15),
        "the status to show the stalled lease renewal",
        &log,
        || {
            let st = db_status(&base);
            let call = st["storage_stalled_call"].as_str().unwrap_or_default();
            if st["last_error"].is_string() && call.starts_with("put `lease/") {
                Ok(())
            } else {
                Err(st.to_string())
            }
        },
    );
    wait_for(
        Duration::from_secs(30),
        "the lease renewal to time out",
        &log,
        || {
            let w = log_lines(&log);
            if w.iter()
                .any(|l| l.contains("lease/") && l.contains("did not answer in time"))
            {
                Ok(())
            } else {
                Err(format!("{} log lines", w.len()))
            }
        },
    );
    let unblocked = now_text(&base);
    proxy.forward();
    wait_synced_after(&base, &unblocked, &log, Duration::from_secs(120));
    let st = rep.terminate(Duration::from_secs(120));
    assert!(st.success(), "replicate failed:\n{}", tail(&log));
    let out = dir.path().join("restored.db");
    restore_ok(&url, &out);
    assert_eq!(count_rows(&out), 15);
}
