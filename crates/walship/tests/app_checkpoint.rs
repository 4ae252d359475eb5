//! The app's own blocking checkpoints (FULL, RESTART, TRUNCATE) while `walship replicate`
//! runs in its own process: they complete instead of waiting out their busy timeout on the
//! pin, and nothing is lost or re-snapshotted because of them.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use rusqlite::Connection;

fn wal_len(db: &Path) -> u64 {
    let mut p = db.as_os_str().to_owned();
    p.push("-wal");
    std::fs::metadata(std::path::PathBuf::from(p)).map_or(0, |m| m.len())
}

fn app(db: &Path) -> Connection {
    let c = Connection::open(db).unwrap();
    // Long enough that a checkpoint stopped by the pin cannot pass by waiting it out.
    c.busy_timeout(Duration::from_secs(8)).unwrap();
    c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    c
}

fn write(c: &Connection, txns: usize) {
    for _ in 0..txns {
        c.execute_batch(
            "BEGIN; INSERT INTO t(v) VALUES (randomblob(700)); \
             INSERT INTO t(v) VALUES (randomblob(700)); COMMIT;",
        )
        .unwrap();
    }
}

fn generations(replica: &Path) -> usize {
    std::fs::read_dir(replica.join("generations"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn the_apps_blocking_checkpoints_complete_while_replicating_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let rdir = dir.path().join("replica");
    let log = dir.path().join("replicator.log");
    create_db(&db);
    let url = file_url(&rdir);
    // No handoffs of walship's own: whatever empties the WAL is the app's checkpoint.
    let rep = Replicator::start(
        &db,
        &url,
        &["--sync-interval", "500ms", "--checkpoint-frames", "1000000"],
        &log,
    );
    let mut c = app(&db);
    write(&c, 5);
    let deadline = Instant::now() + Duration::from_secs(30);
    while generations(&rdir) == 0 {
        assert!(
            Instant::now() < deadline,
            "no generation; log:\n{}",
            tail(&log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let modes = [
        "TRUNCATE", "RESTART", "TRUNCATE", "FULL", "TRUNCATE", "TRUNCATE",
    ];
    for (round, mode) in modes.iter().enumerate() {
        // Some rounds through a connection opened afresh: after a TRUNCATE, such a
        // connection starts the new WAL with random salts.
        if round % 2 == 1 {
            c = app(&db);
        }
        write(&c, 40);
        // Let walship ship some of it, or not.
        std::thread::sleep(Duration::from_millis(100 * (round as u64 % 3)));
        let t0 = Instant::now();
        let (busy, frames, copied): (i64, i64, i64) = c
            .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        let took = t0.elapsed();
        assert_eq!(
            busy,
            0,
            "round {round}: the app's {mode} checkpoint gave up after {took:?} ({copied} of {frames} frames); log:\n{}",
            tail(&log)
        );
        assert_eq!(copied, frames, "round {round}: {mode}");
        if *mode == "TRUNCATE" {
            assert_eq!(wal_len(&db), 0, "round {round}: the WAL was not truncated");
        }
    }
    let c = app(&db);
    write(&c, 7);
    let st = rep.terminate(Duration::from_secs(30));
    assert!(
        st.success(),
        "replicator failed: {st:?}; log:\n{}",
        tail(&log)
    );
    assert_eq!(
        generations(&rdir),
        1,
        "the app's checkpoints cost a new generation; log:\n{}",
        tail(&log)
    );
    let out = dir.path().join("restored.db");
    restore_ok(&url, &out);
    let restored = Connection::open(&out).unwrap();
    assert_eq!(rows(&restored), rows(&c));
}
