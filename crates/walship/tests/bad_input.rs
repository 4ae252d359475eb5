//! Bad input gets one clear line and loses nothing: databases not in WAL mode or missing,
//! malformed URLs, empty replicas, existing outputs, garbage / truncated / bit-flipped /
//! foreign objects in the replica, a missing bucket, an unreachable endpoint.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use rusqlite::Connection;
use walship_storage::testkit::MotoServer;

fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The error line: exactly one line starting with `error:`.
fn error_line(o: &std::process::Output) -> String {
    let err = stderr_of(o);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{err}");
    lines[0].to_string()
}

fn insert_rows(db: &Path, from: i64, to: i64) {
    let c = Connection::open(db).unwrap();
    for i in from..to {
        c.execute("INSERT INTO t(id, v) VALUES (?1, randomblob(200))", [i])
            .unwrap();
    }
}

/// A replica with two generations' worth of objects: a snapshot, segments, a later snapshot
/// and more segments. Returns the row count of the source at the end.
fn build_replica(dir: &Path, url: &str) -> (PathBuf, i64) {
    let db = dir.join("app.db");
    create_db(&db);
    insert_rows(&db, 1, 100);
    let log = dir.join("rep.log");
    let rep = Replicator::start(
        &db,
        url,
        &["--sync-interval", "100ms", "--snapshot-interval", "500ms"],
        &log,
    );
    std::thread::sleep(Duration::from_millis(700));
    for batch in 0..6 {
        insert_rows(&db, 100 + batch * 10, 110 + batch * 10);
        std::thread::sleep(Duration::from_millis(250));
    }
    let st = rep.terminate(Duration::from_secs(20));
    assert!(st.success(), "replicate failed: {}", tail(&log));
    let n = count(&db);
    assert_eq!(n, 159);
    (db, n)
}

fn count(db: &Path) -> i64 {
    Connection::open(db)
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap()
}

fn objects(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(ext) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn writer_child() {
    writer_main_if_child();
}

#[test]
fn a_database_not_in_wal_mode_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rollback.db");
    let c = Connection::open(&db).unwrap();
    c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (42);")
        .unwrap();
    drop(c);
    let before = std::fs::read(&db).unwrap();
    let o = walship()
        .args(["replicate"])
        .arg(&db)
        .arg(file_url(&dir.path().join("r")))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let line = error_line(&o);
    assert!(
        line.contains("journal_mode=WAL") && line.contains("--enable-wal"),
        "{line}"
    );
    assert_eq!(
        std::fs::read(&db).unwrap(),
        before,
        "the database must not change"
    );
}

#[test]
fn a_missing_database_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let o = walship()
        .args(["replicate"])
        .arg(dir.path().join("nope.db"))
        .arg(file_url(&dir.path().join("r")))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let line = error_line(&o);
    assert!(
        line.contains("nope.db") && line.contains("does not exist"),
        "{line}"
    );
}

#[test]
fn malformed_replica_urls_say_what_is_wrong() {
    for url in [
        "ftp://x/y",
        "file://relative/dir",
        "s3://",
        "s3://bucket/p?colour=blue",
    ] {
        let o = walship().args(["generations", url]).output().unwrap();
        assert!(!o.status.success(), "{url} accepted");
        let line = error_line(&o);
        assert!(line.contains("invalid replica URL"), "{url}: {line}");
    }
}

#[test]
fn an_empty_replica_restores_nothing_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let url = file_url(&dir.path().join("empty"));
    let out = dir.path().join("out.db");
    let o = restore(&url, &out, &[]);
    assert!(!o.status.success());
    assert!(
        error_line(&o).contains("no restorable backup"),
        "{}",
        stderr_of(&o)
    );
    assert!(!out.exists());
    let o = restore(&url, &out, &["--if-replica-exists"]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(!out.exists());
}

#[test]
fn an_existing_output_is_kept_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let url = file_url(&dir.path().join("replica"));
    let (db, n) = build_replica(dir.path(), &url);
    let out = dir.path().join("out.db");
    std::fs::write(&out, b"precious").unwrap();
    let o = restore(&url, &out, &[]);
    assert!(!o.status.success());
    assert!(error_line(&o).contains("already exists"));
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let o = restore(&url, &out, &["--if-db-not-exists"]);
    assert!(o.status.success());
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let o = restore(&url, &out, &["--force"]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!(count(&out), n);
    assert_eq!(count(&db), n);
}

#[test]
fn a_truncated_newest_segment_is_skipped_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let rdir = dir.path().join("replica");
    let url = file_url(&rdir);
    let (_db, n) = build_replica(dir.path(), &url);
    // The newest segment by key (log order), not by directory order.
    let mut segs = objects(&rdir, ".wseg");
    segs.sort_by_key(|p| p.file_name().unwrap().to_owned());
    let newest = segs.last().unwrap().clone();
    let name = newest.file_name().unwrap().to_string_lossy().into_owned();
    let end = u64::from_str_radix(&name[17..33], 16).unwrap();
    // A snapshot taken after it would make it unnecessary: keep only older ones, so the
    // restore has to read it.
    for snap in objects(&rdir, ".wsnap") {
        let sname = snap.file_name().unwrap().to_string_lossy().into_owned();
        let position = u64::MAX - u64::from_str_radix(&sname[..16], 16).unwrap();
        if position >= end {
            std::fs::remove_file(&snap).unwrap();
        }
    }
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    let out = dir.path().join("out.db");
    let name = newest.file_name().unwrap().to_string_lossy().into_owned();
    // What it held is missing: a partial restore, refused (nothing written) unless accepted.
    let o = restore(&url, &out, &[]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr_of(&o));
    let line = error_line(&o);
    assert!(line.contains("partial") && line.contains(&name), "{line}");
    assert!(!out.exists());
    let o = restore(&url, &out, &["--allow-partial"]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    let err = stderr_of(&o);
    assert!(err.contains("skipped") && err.contains(&name), "{err}");
    assert!(err.contains("PARTIAL"), "{err}");
    let got = count(&out);
    assert!(got < n && got >= 99, "restored {got} rows");
    let ok: String = Connection::open(&out)
        .unwrap()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
}

#[test]
fn a_bit_flipped_newest_snapshot_falls_back_to_an_older_one() {
    let dir = tempfile::tempdir().unwrap();
    let rdir = dir.path().join("replica");
    let url = file_url(&rdir);
    let (_db, n) = build_replica(dir.path(), &url);
    let snaps = objects(&rdir, ".wsnap");
    assert!(snaps.len() >= 2, "need two snapshots, have {snaps:?}");
    // Keys sort newest first.
    let newest = snaps.first().unwrap().clone();
    let mut bytes = std::fs::read(&newest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&newest, &bytes).unwrap();
    let out = dir.path().join("out.db");
    let o = restore(&url, &out, &[]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(stderr_of(&o).contains("skipped"), "{}", stderr_of(&o));
    // The older snapshot plus its segments still reach the newest state.
    assert_eq!(count(&out), n);
}

#[test]
fn foreign_and_garbage_objects_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let rdir = dir.path().join("replica");
    let url = file_url(&rdir);
    let (_db, n) = build_replica(dir.path(), &url);
    std::fs::create_dir_all(rdir.join("backups")).unwrap();
    std::fs::write(
        rdir.join("backups/app_20240101.db"),
        b"SQLite format 3\0junk",
    )
    .unwrap();
    std::fs::create_dir_all(rdir.join("generations/not-a-generation")).unwrap();
    std::fs::write(rdir.join("generations/not-a-generation/x"), b"junk").unwrap();
    let gen_dir = std::fs::read_dir(rdir.join("generations"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().len() == 16 && p.join("snapshots").is_dir())
        .unwrap();
    std::fs::write(gen_dir.join("snapshots/garbage.wsnap"), b"junk").unwrap();
    std::fs::write(gen_dir.join("notes.txt"), b"junk").unwrap();
    let out = dir.path().join("out.db");
    let o = restore(&url, &out, &[]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert_eq!(count(&out), n);
    let o = walship().args(["generations", &url]).output().unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("not written by walship"));
}

#[test]
fn when_every_object_is_corrupt_restore_fails_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rdir = dir.path().join("replica");
    let url = file_url(&rdir);
    build_replica(dir.path(), &url);
    for p in objects(&rdir, ".wsnap") {
        std::fs::write(&p, b"garbage").unwrap();
    }
    let out = dir.path().join("out.db");
    let o = restore(&url, &out, &[]);
    assert!(!o.status.success());
    assert!(
        error_line(&o).contains("no restorable backup"),
        "{}",
        stderr_of(&o)
    );
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("walship-restore"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn a_missing_bucket_and_an_unreachable_endpoint_say_what_to_do() {
    let moto = MotoServer::shared();
    let url = moto.url("no-such-bucket-here", "p").to_string();
    let o = walship().args(["generations", &url]).output().unwrap();
    assert!(!o.status.success());
    let line = error_line(&o);
    assert!(
        line.contains("no-such-bucket-here") && line.contains("does not exist"),
        "{line}"
    );

    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url =
        format!("s3://b/p?endpoint=http://127.0.0.1:{port}&region=us-east-1&force-path-style=true");
    let o = walship().args(["generations", &url]).output().unwrap();
    assert!(!o.status.success());
    let line = error_line(&o);
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
}

#[test]
fn restore_on_s3_round_trips() {
    let moto = MotoServer::shared();
    let dir = tempfile::tempdir().unwrap();
    let url = moto
        .url(moto.bucket(), &MotoServer::unique_prefix("roundtrip"))
        .to_string();
    let (db, n) = build_replica(dir.path(), &url);
    let out = dir.path().join("out.db");
    restore_ok(&url, &out);
    assert_eq!(count(&out), n);
    assert_eq!(count(&db), n);
}

#[test]
fn an_empty_s3_prefix_restores_nothing_and_says_so() {
    let moto = MotoServer::shared();
    let dir = tempfile::tempdir().unwrap();
    let url = moto
        .url(moto.bucket(), &MotoServer::unique_prefix("empty"))
        .to_string();
    let out = dir.path().join("out.db");
    let o = restore(&url, &out, &[]);
    assert!(!o.status.success());
    assert!(
        error_line(&o).contains("no restorable backup"),
        "{}",
        stderr_of(&o)
    );
    assert!(!out.exists());
    let o = restore(&url, &out, &["--if-replica-exists"]);
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(!out.exists());
}
