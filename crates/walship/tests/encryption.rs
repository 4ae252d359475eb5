//! Client-side encryption end to end: encrypted replicas restore only with the key, refuse
//! a missing or wrong key with one line and no output, hide the data from the bucket, and no
//! secret (encryption key, S3 secret key) ever reaches the output, even at trace level.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use rusqlite::Connection;
use walship_storage::testkit::MotoServer;

const KEY_HEX: &str = "7f3a9c0d4e5b6a718293a4b5c6d7e8f90123456789abcdeffedcba9876543210";
const OTHER_KEY_HEX: &str = "0000000000000000000000000000000000000000000000000000000000000001";
const MARKER: &str = "walship-plaintext-marker-4242";

#[test]
fn writer_child() {
    writer_main_if_child();
}

fn key_file(dir: &Path, name: &str, hex: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{hex}\n")).unwrap();
    p
}

/// A replica written with the key, holding rows that contain MARKER.
fn encrypted_replica(dir: &Path, url: &str, key: &Path) -> PathBuf {
    let db = dir.join("app.db");
    create_db(&db);
    let c = Connection::open(&db).unwrap();
    for i in 0..200 {
        c.execute(
            "INSERT INTO t(v) VALUES (?1)",
            [format!("{MARKER} row {i}").into_bytes()],
        )
        .unwrap();
    }
    let log = dir.join("rep.log");
    let key_arg = key.to_str().unwrap();
    let rep = Replicator::start(
        &db,
        url,
        &["--sync-interval", "100ms", "--encryption-key-file", key_arg],
        &log,
    );
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..50 {
        c.execute(
            "INSERT INTO t(v) VALUES (?1)",
            [format!("{MARKER} late {i}").into_bytes()],
        )
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(400));
    let st = rep.terminate(Duration::from_secs(20));
    assert!(st.success(), "{}", tail(&log));
    db
}

fn count(db: &Path) -> i64 {
    Connection::open(db)
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn one_error_line(o: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    lines[0].to_string()
}

#[test]
fn an_encrypted_local_replica_restores_only_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let rdir = dir.path().join("replica");
    let url = file_url(&rdir);
    let key = key_file(dir.path(), "key", KEY_HEX);
    let other = key_file(dir.path(), "other", OTHER_KEY_HEX);
    let db = encrypted_replica(dir.path(), &url, &key);

    // Nothing in the bucket shows the data.
    for f in files_under(&rdir) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
            "{} holds plaintext",
            f.display()
        );
    }

    let out = dir.path().join("out.db");
    let o = restore(&url, &out, &[]);
    assert!(!o.status.success());
    assert!(
        one_error_line(&o).contains("encrypted"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!out.exists());

    let o = restore(
        &url,
        &out,
        &["--encryption-key-file", other.to_str().unwrap()],
    );
    assert!(!o.status.success());
    assert!(one_error_line(&o).contains("none of the given keys"));
    assert!(!out.exists());

    let o = restore(
        &url,
        &out,
        &["--encryption-key-file", key.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(count(&out), count(&db));

    // Rotation: a new key for writing, the old one still accepted for reading.
    let out2 = dir.path().join("out2.db");
    let o = restore(
        &url,
        &out2,
        &[
            "--encryption-key-file",
            other.to_str().unwrap(),
            "--decryption-key-file",
            key.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(count(&out2), count(&db));
}

#[test]
fn decrypt_turns_a_snapshot_object_into_a_database_and_refuses_a_wrong_key() {
    let dir = tempfile::tempdir().unwrap();
    let rdir = dir.path().join("replica");
    let url = file_url(&rdir);
    let key = key_file(dir.path(), "key", KEY_HEX);
    let other = key_file(dir.path(), "other", OTHER_KEY_HEX);
    encrypted_replica(dir.path(), &url, &key);
    let snap = files_under(&rdir)
        .into_iter()
        .find(|p| p.to_string_lossy().ends_with(".wsnap"))
        .unwrap();
    let out = dir.path().join("plain.db");
    let o = walship()
        .args(["decrypt", "--encryption-key-file", other.to_str().unwrap()])
        .arg(&snap)
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(one_error_line(&o).contains("key"));
    assert!(!out.exists(), "a failed decrypt must write nothing");
    let o = walship()
        .args(["decrypt", "--encryption-key-file", key.to_str().unwrap()])
        .arg(&snap)
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c = Connection::open(&out).unwrap();
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    assert!(count(&out) >= 200);
}

#[test]
fn an_encrypted_s3_replica_round_trips_and_no_secret_reaches_the_output() {
    let moto = MotoServer::shared();
    let dir = tempfile::tempdir().unwrap();
    let url = moto
        .url(moto.bucket(), &MotoServer::unique_prefix("enc"))
        .to_string();
    let db = dir.path().join("app.db");
    create_db(&db);
    Connection::open(&db)
        .unwrap()
        .execute("INSERT INTO t(v) VALUES (x'00')", [])
        .unwrap();
    let secret_key = "wJalrXUtnFEMIK7MDENGbPxRfiCYSECRETKEYxyz";
    let run = |args: &[&str]| {
        walship()
            .env("WALSHIP_LOG", "trace")
            .env("AWS_SECRET_ACCESS_KEY", secret_key)
            .env("WALSHIP_ENCRYPTION_KEY", KEY_HEX)
            .args(args)
            .output()
            .unwrap()
    };
    let o = run(&["snapshot", db.to_str().unwrap(), &url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.path().join("out.db");
    let o2 = run(&["restore", "-o", out.to_str().unwrap(), &url]);
    assert!(
        o2.status.success(),
        "{}",
        String::from_utf8_lossy(&o2.stderr)
    );
    assert_eq!(count(&out), 1);
    let o3 = run(&["generations", &url]);
    for o in [&o, &o2, &o3] {
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(all.len() > 100, "trace logging produced output");
        for secret in [secret_key, KEY_HEX] {
            assert!(!all.contains(secret), "a secret reached the output");
        }
    }
}
