//! Golden fixtures: a replica written by format version 1 (a snapshot and segments, one
//! plain and one encrypted replica) is committed under `tests/fixtures/`, and every later
//! walship must restore it to the same rows.
//!
//! Regenerate (only when adding a new format version's fixtures, never to make this pass):
//! `cargo test -p walship-engine --test golden -- --ignored regenerate`.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;
use tokio_util::sync::CancellationToken;
use walship_engine::{Replica, ReplicateOptions, RestoreOptions};
use walship_format::crypto::{Key, KeyRing};
use walship_storage::{LocalStore, ObjectStore};

const KEY_HEX: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn replica(dir: &Path, encrypted: bool) -> Replica {
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.to_path_buf()).unwrap());
    let r = Replica::new(store);
    if encrypted {
        r.with_keys(KeyRing::new(Key::parse(KEY_HEX).unwrap()))
    } else {
        r
    }
}

/// The rows the fixture's database holds.
fn expected() -> Vec<(i64, String)> {
    (1..=120).map(|i| (i, format!("golden row {i}"))).collect()
}

fn rows(db: &Path) -> Vec<(i64, String)> {
    let c = Connection::open(db).unwrap();
    let mut st = c.prepare("SELECT id, v FROM t ORDER BY id").unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_1_replicas_still_restore() {
    for (name, encrypted) in [("replica-v1", false), ("replica-v1-encrypted", true)] {
        let src = fixtures().join(name);
        assert!(src.is_dir(), "missing fixture {}", src.display());
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.db");
        let report = walship_engine::restore::restore(
            &replica(&src, encrypted),
            &out,
            &RestoreOptions::default(),
        )
        .await
        .unwrap();
        assert!(
            report.segments >= 2,
            "{name}: the fixture must exercise segments"
        );
        assert!(report.skipped.is_empty(), "{name}: {:?}", report.skipped);
        assert_eq!(rows(&out), expected(), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes the committed fixtures"]
async fn regenerate() {
    for (name, encrypted) in [("replica-v1", false), ("replica-v1-encrypted", true)] {
        let target = fixtures().join(name);
        let _ = std::fs::remove_dir_all(&target);
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("golden.db");
        let c = Connection::open(&db).unwrap();
        c.pragma_update(None, "journal_mode", "wal").unwrap();
        c.pragma_update(None, "page_size", 1024).unwrap();
        c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
            .unwrap();
        for i in 1..=40 {
            c.execute(
                "INSERT INTO t(id, v) VALUES (?1, ?2)",
                rusqlite::params![i, format!("golden row {i}")],
            )
            .unwrap();
        }
        let cancel = CancellationToken::new();
        let opts = ReplicateOptions {
            sync_interval: Duration::from_millis(50),
            ..Default::default()
        };
        let (h, task) = walship_engine::replicate::spawn(
            db.clone(),
            replica(&target, encrypted),
            opts,
            cancel.clone(),
        );
        h.sync().await.unwrap();
        for batch in 0..2 {
            for i in 41 + batch * 40..=80 + batch * 40 {
                c.execute(
                    "INSERT INTO t(id, v) VALUES (?1, ?2)",
                    rusqlite::params![i, format!("golden row {i}")],
                )
                .unwrap();
            }
            h.sync().await.unwrap();
        }
        cancel.cancel();
        task.await.unwrap().unwrap();
    }
}
