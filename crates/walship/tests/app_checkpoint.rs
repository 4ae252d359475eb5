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

/// Waits up to 30 s for the replicator to start its first generation in `replica`.
fn wait_for_generation(replica: &Path, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while generations(replica) == 0 {
        assert!(
            Instant::now() < deadline,
            "no generation; log:\n{}",
            tail(log)
        );
        std::thread::sleep(Duration::from_millis(50));
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
    wait_for_generation(&rdir, &log);
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
    stop_and_compare(rep, &c, &url, dir.path());
}

/// Stops the replicator and checks that the replica holds one generation that restores to
/// exactly what the app's connection `c` sees.
fn stop_and_compare(rep: Replicator, c: &Connection, url: &str, dir: &Path) {
    let log = rep.log.clone();
    let st = rep.terminate(Duration::from_secs(30));
    assert!(
        st.success(),
        "replicator failed: {st:?}; log:\n{}",
        tail(&log)
    );
    assert_eq!(
        generations(&dir.join("replica")),
        1,
        "the app's checkpoints cost a new generation; log:\n{}",
        tail(&log)
    );
    let out = dir.join("restored.db");
    restore_ok(url, &out);
    let restored = Connection::open(&out).unwrap();
    assert_eq!(rows(&restored), rows(c));
}

/// What share of `n` PASSIVE checkpoints, one every 20 ms, found the checkpoint lock taken
/// (SQLite reports -1 frames then), and how many times the WAL restarted meanwhile.
fn lock_taken_share(probe: &Connection, db: &Path, n: usize) -> (f64, usize) {
    let (mut taken, mut restarts) = (0, 0);
    let mut salts = wal_salts(db);
    for _ in 0..n {
        let log: i64 = probe
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
            .unwrap();
        if log < 0 {
            taken += 1;
        }
        let now = wal_salts(db);
        if now != salts {
            restarts += 1;
            salts = now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (taken as f64 / n as f64, restarts)
}

/// The WAL header's salts: they change at every restart.
fn wal_salts(db: &Path) -> Option<[u8; 8]> {
    let mut p = db.as_os_str().to_owned();
    p.push("-wal");
    let b = std::fs::read(std::path::PathBuf::from(p)).ok()?;
    b.get(16..24).and_then(|s| s.try_into().ok())
}

/// An app writing back to back on its own thread until `stop`, with SQLite's automatic
/// checkpoints off so that the only checkpoints the probes can meet are walship's.
fn flat_out(
    db: &Path,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let c = app(db);
    std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            c.execute_batch("INSERT INTO t(v) VALUES (randomblob(64))")
                .unwrap();
        }
    })
}

/// Runs a replicator (with `extra` flags) beside an app writing flat out for a while, and
/// returns the share of the app's own checkpoints that found the lock taken, how many times
/// the WAL restarted meanwhile, and the replicator (still running, the app stopped).
fn heavy_load_probe(dir: &Path, extra: &[&str]) -> (f64, usize, Replicator, String) {
    let db = dir.join("app.db");
    let rdir = dir.join("replica");
    let log = dir.join("replicator.log");
    create_db(&db);
    let url = file_url(&rdir);
    // Handoffs (which restart the WAL) at most four times per sync interval.
    let mut args = vec!["--sync-interval", "250ms"];
    args.extend_from_slice(extra);
    let rep = Replicator::start(&db, &url, &args, &log);
    write(&app(&db), 1);
    wait_for_generation(&rdir, &log);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = flat_out(&db, stop.clone());
    // Walship sees the load after a round or two.
    std::thread::sleep(Duration::from_millis(1500));
    let probe = app(&db);
    let mut restarts = 0;
    let mut shares = Vec::new();
    for _ in 0..3 {
        let (share, r) = lock_taken_share(&probe, &db, 40);
        shares.push(share);
        restarts += r;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    shares.sort_by(f64::total_cmp);
    (shares[1], restarts, rep, url)
}

#[test]
fn under_a_heavy_write_load_walship_checkpoints_for_the_app_and_hands_back_when_it_slows() {
    let dir = tempfile::tempdir().unwrap();
    let (share, restarts, rep, url) = heavy_load_probe(dir.path(), &[]);
    let db = dir.path().join("app.db");
    let log = dir.path().join("replicator.log");
    // Walship's own checkpoints hold the lock a fraction of the time; the deferral all of it.
    assert!(
        share >= 0.9,
        "the app's checkpoints found the lock free {:.0} % of the time under a heavy load; log:\n{}",
        100.0 * (1.0 - share),
        tail(&log)
    );
    // Nobody else checkpoints, and the WAL still restarts: walship's handoffs.
    assert!(
        restarts >= 2,
        "the WAL restarted {restarts} times in 2.5 s of flat-out writes; log:\n{}",
        tail(&log)
    );
    // Once the app is quiet, its checkpoints (here a TRUNCATE) are its own again.
    let c = app(&db);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (busy, log_frames): (i64, i64) = c
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        if busy == 0 && log_frames >= 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the app still cannot checkpoint 15 s after it stopped writing; log:\n{}",
            tail(&log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(wal_len(&db), 0, "the WAL was not truncated");
    write(&c, 3);
    stop_and_compare(rep, &c, &url, dir.path());
}

#[test]
fn with_deferral_off_the_apps_checkpoints_stay_its_own_under_a_heavy_load() {
    let dir = tempfile::tempdir().unwrap();
    let (share, _, rep, _) = heavy_load_probe(dir.path(), &["--defer-app-checkpoints", "false"]);
    let log = dir.path().join("replicator.log");
    assert!(
        share < 0.6,
        "the app's checkpoints found the lock taken {:.0} % of the time; log:\n{}",
        100.0 * share,
        tail(&log)
    );
    let st = rep.terminate(Duration::from_secs(30));
    assert!(st.success(), "replicator failed: {st:?}");
}
