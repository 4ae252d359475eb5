//! `walship verify` on local and S3 replicas: a good replica passes (and matches the live
//! database), a live database that moved on is reported, not failed; a replica that
//! differs from an unchanged live database fails; an empty replica, a corrupt newest point
//! and a missing live database fail with one line. And `replicate --verify-interval`
//! records verify runs, and schema changes, in the run history.

#![allow(clippy::unwrap_used)]

mod common;
mod tools_support;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use rusqlite::Connection;
use tools_support::*;

fn insert(db: &Path, from: i64, to: i64) {
    let c = Connection::open(db).unwrap();
    for i in from..to {
        c.execute("INSERT INTO t(id, v) VALUES (?1, randomblob(100))", [i])
            .unwrap();
    }
}

/// Replicates `db` for a while (a snapshot, then segments), then stops the replicator.
fn replicate_a_while(dir: &Path, db: &Path, url: &str) {
    let log = dir.join("replicate.log");
    let rep = Replicator::start(
        db,
        url,
        &["--sync-interval", "100ms", "--snapshot-interval", "1h"],
        &log,
    );
    std::thread::sleep(Duration::from_millis(600));
    for batch in 0..3 {
        insert(db, 1000 + batch * 10, 1010 + batch * 10);
        std::thread::sleep(Duration::from_millis(250));
    }
    let st = rep.terminate(Duration::from_secs(20));
    assert!(st.success(), "replicate failed: {}", tail(&log));
}

fn verify_json(url: &str, extra: &[&str]) -> (std::process::Output, serde_json::Value) {
    let mut args = vec!["verify", url, "--json"];
    args.extend_from_slice(extra);
    let o = run(&args);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", stdout(&o), stderr(&o)));
    (o, v)
}

#[test]
fn a_good_replica_verifies_and_matches_the_live_database_on_file_and_s3() {
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in backends(dir.path(), "verify") {
        let db = dir.path().join(format!("{name}.db"));
        create_db(&db);
        insert(&db, 1, 50);
        replicate_a_while(dir.path(), &db, &url);

        // Text.
        let o = ok(run(&["verify", &url, "--db", db.to_str().unwrap()]));
        let text = stdout(&o);
        assert!(text.contains("integrity    ok"), "{text}");
        assert!(text.contains("result       ok"), "{text}");
        assert!(text.contains("(match)"), "{text}");

        // JSON.
        let (o, v) = verify_json(&url, &["--db", db.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["integrity"], "ok");
        assert!(v["segments"].as_u64().unwrap() >= 1, "{v}");
        assert_eq!(v["live"]["comparison"], "match", "{v}");
        let t = v["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "t")
            .unwrap();
        assert_eq!(t["rows"], 79);
        assert_eq!(t["live_rows"], 79);
        assert!(v["page_count"].as_u64().unwrap() > 1);

        // Without a live database: counts only.
        let (o, v) = verify_json(&url, &[]);
        assert!(o.status.success());
        assert!(v["live"].is_null());

        // The live database moves on: reported, not a failure.
        std::thread::sleep(Duration::from_millis(20));
        insert(&db, 5000, 5010);
        let (o, v) = verify_json(&url, &["--db", db.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(v["live"]["comparison"], "changed_since", "{v}");
        assert!(
            v["live"]["differences"][0]
                .as_str()
                .unwrap()
                .contains("replica 79, live 89"),
            "{v}"
        );
    }
}

#[test]
fn a_replica_that_differs_from_an_unchanged_live_database_fails() {
    let dir = tempfile::tempdir().unwrap();
    let url = file_url(&dir.path().join("replica"));
    let db = dir.path().join("app.db");
    create_db(&db);
    insert(&db, 1, 20);
    snapshot(&db, &url);
    // Another database, last modified before the replica's point: it should have been in it.
    let other = dir.path().join("other.db");
    create_db(&other);
    insert(&other, 1, 25);
    Connection::open(&other)
        .unwrap()
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    for p in [other.clone(), dir.path().join("other.db-wal")] {
        if p.exists() {
            let st = std::process::Command::new("touch")
                .args(["-d", "2001-01-01T00:00:00Z"])
                .arg(&p)
                .status()
                .unwrap();
            assert!(st.success());
        }
    }
    let (o, v) = verify_json(&url, &["--db", other.to_str().unwrap()]);
    let line = error_line(&o);
    assert_eq!(v["ok"], false);
    assert_eq!(v["live"]["comparison"], "mismatch", "{v}");
    assert!(line.contains("table t: replica 19, live 24"), "{line}");
}

#[test]
fn bad_inputs_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    // An empty replica, on both backends.
    for (_, url) in backends(dir.path(), "verify-empty") {
        let line = error_line(&run(&["verify", &url]));
        assert!(line.contains("no restorable backup"), "{line}");
        let (o, v) = verify_json(&url, &[]);
        error_line(&o);
        assert_eq!(v["ok"], false);
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("no restorable backup")
        );
    }
    // A missing live database: named, before anything is downloaded.
    let url = file_url(&dir.path().join("replica"));
    let db = dir.path().join("app.db");
    create_db(&db);
    insert(&db, 1, 10);
    snapshot(&db, &url);
    let line = error_line(&run(&["verify", &url, "--db", "/nonexistent/live.db"]));
    assert!(
        line.contains("/nonexistent/live.db") && line.contains("does not exist"),
        "{line}"
    );
    // A malformed URL.
    let line = error_line(&run(&["verify", "ftp://x/y"]));
    assert!(line.contains("invalid replica URL"), "{line}");
}

#[test]
fn a_corrupt_newest_point_fails_verification_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let rdir = dir.path().join("replica");
    let url = file_url(&rdir);
    let db = dir.path().join("app.db");
    create_db(&db);
    insert(&db, 1, 10);
    snapshot(&db, &url);
    std::thread::sleep(Duration::from_millis(20));
    insert(&db, 10, 20);
    snapshot(&db, &url);
    let snaps = objects(&rdir, ".wsnap");
    assert_eq!(snaps.len(), 2);
    corrupt(&snaps[0]);
    let name = snaps[0].file_name().unwrap().to_string_lossy().into_owned();
    let (o, v) = verify_json(&url, &[]);
    let line = error_line(&o);
    assert!(line.contains("damaged") && line.contains(&name), "{line}");
    assert_eq!(v["ok"], false);
    assert_eq!(v["skipped"].as_array().unwrap().len(), 1, "{v}");
    // The older point was still restored and counted.
    let t = v["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "t")
        .unwrap();
    assert_eq!(t["rows"], 9);
}

/// Reads the run history through `walship history --json`.
fn history(db: &Path, state: &Path) -> Vec<serde_json::Value> {
    let o = run(&[
        "history",
        db.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--json",
        "--limit",
        "1000",
    ]);
    if !o.status.success() {
        return Vec::new();
    }
    stdout(&o)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn wait_for(what: &str, log: &Path, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < timeout,
            "timed out waiting for {what}; log:\n{}",
            tail(log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_daemon_verifies_on_schedule_and_records_schema_changes() {
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in backends(dir.path(), "verify-daemon") {
        let db = dir.path().join(format!("{name}.db"));
        let state = dir.path().join(format!("{name}-state"));
        create_db(&db);
        insert(&db, 1, 30);
        let log = dir.path().join(format!("{name}.log"));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = format!("127.0.0.1:{port}");
        let rep = Replicator::start(
            &db,
            &url,
            &[
                "--sync-interval",
                "100ms",
                "--snapshot-interval",
                "1s",
                "--verify-interval",
                "2s",
                "--state-dir",
                state.to_str().unwrap(),
                "--listen",
                listen.as_str(),
            ],
            &log,
        );
        // The schema watch records its baseline at the first snapshot it sees.
        wait_for("the schema baseline", &log, Duration::from_secs(30), || {
            state.join("schema.json").exists()
        });
        insert(&db, 30, 40);
        // A schema change, caught at the next snapshot.
        Connection::open(&db)
            .unwrap()
            .execute_batch("CREATE TABLE added(x); CREATE INDEX t_id2 ON t(id, v);")
            .unwrap();
        wait_for("a verify run", &log, Duration::from_secs(30), || {
            history(&db, &state).iter().any(|r| r["kind"] == "verify")
        });
        // Scheduled snapshots go with writes: keep writing until the next one.
        let mut next = 40;
        wait_for("a schema run", &log, Duration::from_secs(30), || {
            insert(&db, next, next + 1);
            next += 1;
            history(&db, &state).iter().any(|r| r["kind"] == "schema")
        });
        // /health shows the last verification.
        let health: serde_json::Value = serde_json::from_str(
            &reqwest::blocking::get(format!("http://{listen}/health"))
                .unwrap()
                .text()
                .unwrap(),
        )
        .unwrap();
        let lv = &health["databases"][0]["last_verify"];
        assert_eq!(lv["result"], "ok", "{health}");
        let st = rep.terminate(Duration::from_secs(20));
        assert!(st.success(), "replicate failed: {}", tail(&log));
        let runs = history(&db, &state);
        let v = runs.iter().find(|r| r["kind"] == "verify").unwrap();
        assert_eq!(v["result"], "ok", "{v}\n{}", tail(&log));
        let d = &v["detail"];
        assert_eq!(d["ok"], true, "{d}");
        assert!(
            ["match", "changed_during"].contains(&d["live"]["comparison"].as_str().unwrap()),
            "{d}"
        );
        let s = runs.iter().find(|r| r["kind"] == "schema").unwrap();
        let changes = s["detail"]["changes"].as_array().unwrap();
        let names: Vec<&str> = changes
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"added") && names.contains(&"t_id2"), "{s}");
        assert!(changes.iter().all(|c| c["change"] == "added"), "{s}");
        assert!(state.join("schema.json").exists());
        assert!(state.join("verify.json").exists());
        // The text history shows them too.
        let o = ok(run(&[
            "history",
            db.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ]));
        assert!(stdout(&o).contains("verify") && stdout(&o).contains("schema"));
        // Nothing left behind by the temporary restores.
        let left: Vec<String> = std::fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".walship"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        let _ = count(&db, "t");
    }
}
