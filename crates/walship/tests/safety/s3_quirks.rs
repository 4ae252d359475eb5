//! S3-compatible stores differ in small ways. A completion reply that cannot be read does
//! not make a whole object "failed": the store is asked (HEAD) before the upload is called
//! failed. And a snapshot that fails at start-up is retried while `/health` says so, rather
//! than ending the replicator.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;
use walship_storage::testkit::MotoServer;

use crate::common::{create_db, restore_ok, tail};
use crate::http_support::{count_rows, insert_rows};
use crate::stall::{
    db_status, get_json, moto_proxy, replicate_listening, url_through, wait_for, wait_synced_after,
};

/// A database whose snapshot is larger than the 5 MiB multipart threshold (incompressible
/// rows, so the LZ4 body stays that large).
fn large_db(dir: &Path) -> PathBuf {
    let db = dir.join("large.db");
    create_db(&db);
    let c = Connection::open(&db).unwrap();
    c.execute_batch("BEGIN").unwrap();
    for _ in 0..2_500 {
        c.execute("INSERT INTO t(v) VALUES (randomblob(4000))", [])
            .unwrap();
    }
    c.execute_batch("COMMIT").unwrap();
    drop(c);
    assert!(std::fs::metadata(&db).unwrap().len() > 8 << 20);
    db
}

#[test]
fn a_large_snapshot_whose_completion_reply_is_unreadable_is_checked_not_failed() {
    let dir = tempfile::tempdir().unwrap();
    let db = large_db(dir.path());
    // A server of its own: tens of MiB of objects would slow every other test's dumps of
    // the shared server's state.
    let moto = MotoServer::start();
    let proxy = moto_proxy(&moto);
    proxy.rename_complete_multipart_root(true);
    let url = url_through(&proxy, &moto, "quirk-complete");
    let log = dir.path().join("replicate.log");
    let (mut rep, base) = replicate_listening(&db, &url, &["--shutdown-timeout", "60s"], &log);
    wait_for(Duration::from_secs(60), "the first sync", &log, || {
        if let Some(st) = rep.child.try_wait().unwrap() {
            panic!(
                "replicate exited ({st}) instead of replicating:\n{}",
                tail(&log)
            );
        }
        let st = db_status(&base);
        if st["last_synced"].is_string() && st["snapshots"] == 1 {
            Ok(())
        } else {
            Err(st.to_string())
        }
    });
    let before = get_json(&base, "/api/v1/status")["now"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    insert_rows(&db, 10);
    wait_synced_after(&base, &before, &log, Duration::from_secs(60));
    let st = rep.terminate(Duration::from_secs(60));
    assert!(st.success(), "replicate failed:\n{}", tail(&log));
    // The upload was judged by the object the store holds, not by the reply.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("the store holds the whole object"),
        "no completion was checked:\n{}",
        tail(&log)
    );
    let out = dir.path().join("restored.db");
    restore_ok(&url, &out);
    assert_eq!(count_rows(&out), 2_510);
}

#[test]
fn a_snapshot_failing_at_start_up_is_retried_while_health_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let db = large_db(dir.path());
    let moto = MotoServer::start();
    let proxy = moto_proxy(&moto);
    // Every multipart upload fails at once (HTTP 503) until the proxy lets them through.
    proxy.refuse_multipart_uploads(true);
    let url = url_through(&proxy, &moto, "quirk-startup");
    let log = dir.path().join("replicate.log");
    let (mut rep, base) = replicate_listening(&db, &url, &["--shutdown-timeout", "60s"], &log);
    wait_for(
        Duration::from_secs(60),
        "/health to show the failing snapshot",
        &log,
        || {
            if let Some(st) = rep.child.try_wait().unwrap() {
                panic!(
                    "replicate exited ({st}) instead of retrying:\n{}",
                    tail(&log)
                );
            }
            let h = get_json(&base, "/health");
            let d = &h["databases"][0];
            if h["status"] != "healthy" && d["last_error"].is_string() {
                Ok(())
            } else {
                Err(h.to_string())
            }
        },
    );
    proxy.refuse_multipart_uploads(false);
    wait_for(Duration::from_secs(120), "the first sync", &log, || {
        if let Some(st) = rep.child.try_wait().unwrap() {
            panic!("replicate exited ({st}):\n{}", tail(&log));
        }
        let st = db_status(&base);
        if st["last_synced"].is_string() && st["snapshots"] == 1 && st["last_error"].is_null() {
            Ok(())
        } else {
            Err(st.to_string())
        }
    });
    insert_rows(&db, 10);
    let st = rep.terminate(Duration::from_secs(60));
    assert!(st.success(), "replicate failed:\n{}", tail(&log));
    let out = dir.path().join("restored.db");
    restore_ok(&url, &out);
    assert_eq!(count_rows(&out), 2_510);
}
