use super::shm::SHM_CKPT_LOCK;
use super::*;

fn wal_db(dir: &Path) -> PathBuf {
    let p = dir.join("a.db");
    let c = Connection::open(&p).expect("open");
    c.pragma_update(None, "journal_mode", "wal").expect("wal");
    c.execute_batch("CREATE TABLE t(x)").expect("create");
    p
}

#[test]
fn refuses_a_database_not_in_wal_mode_with_a_hint() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("d.db");
    Connection::open(&p)
        .expect("open")
        .execute_batch("CREATE TABLE t(x)")
        .expect("create");
    let err = Db::open(&p, false).expect_err("must refuse");
    let msg = err.to_string();
    assert!(
        msg.contains("journal_mode=WAL") && msg.contains("--enable-wal"),
        "{msg}"
    );
    // And with enable_wal it switches.
    Db::open(&p, true).expect("switches");
    let c = Connection::open(&p).expect("open");
    let mode: String = c
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("mode");
    assert_eq!(mode, "wal");
}

#[test]
fn refuses_a_missing_database() {
    let dir = tempfile::tempdir().expect("tmp");
    let err = Db::open(&dir.path().join("nope.db"), false).expect_err("missing");
    assert!(matches!(err, EngineError::MissingDatabase { .. }));
}

fn passive(app: &Connection) -> (i64, i64, i64) {
    app.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })
    .expect("ckpt")
}

/// Whether another process finds `len` lock bytes of `db`'s WAL index from `byte` on
/// taken (a POSIX lock is never seen as taken by the process that holds it).
fn taken_elsewhere(db: &Path, byte: i64, len: i64) -> bool {
    let probe = "import fcntl, sys\n\
                 f = open(sys.argv[1], 'r+b')\n\
                 try:\n    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, int(sys.argv[3]), int(sys.argv[2]))\n\
                 except OSError:\n    sys.exit(3)\n";
    let st = std::process::Command::new("python3")
        .arg("-c")
        .arg(probe)
        .arg(shm_path(db))
        .arg(byte.to_string())
        .arg(len.to_string())
        .status()
        .expect("python3");
    match st.code() {
        Some(0) => false,
        Some(3) => true,
        other => panic!("lock probe failed: {other:?}"),
    }
}

#[test]
fn a_held_checkpoint_lock_stops_other_processes_but_not_walships_own_checkpoints() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = wal_db(dir.path());
    let app = Connection::open(&p).expect("app");
    app.pragma_update(None, "wal_autocheckpoint", 0)
        .expect("ac");
    let mut a = Db::open(&p, false).expect("open a");
    let mut b = Db::open(&p, false).expect("open b");
    assert!(!taken_elsewhere(&p, SHM_CKPT_LOCK, 1));
    a.pin().expect("pin");
    assert!(a.hold_checkpoints());
    assert!(b.hold_checkpoints());
    assert!(taken_elsewhere(&p, SHM_CKPT_LOCK, 1));
    app.execute_batch("INSERT INTO t VALUES (1); INSERT INTO t VALUES (2);")
        .expect("write");
    // Walship's own checkpoint takes and releases the byte as its own; the hold stays.
    let r = a.checkpoint(CheckpointMode::Passive).expect("ckpt");
    assert!(!r.busy && r.log > 0, "{r:?}");
    assert!(taken_elsewhere(&p, SHM_CKPT_LOCK, 1));
    a.advance_pin().expect("advance");
    assert!(taken_elsewhere(&p, SHM_CKPT_LOCK, 1));
    // Held while any `Db` of the file holds it.
    a.release_checkpoints();
    assert!(!a.holds_checkpoints());
    assert!(taken_elsewhere(&p, SHM_CKPT_LOCK, 1));
    drop(b);
    assert!(!taken_elsewhere(&p, SHM_CKPT_LOCK, 1));
    // And the pin's read lock survived all of it (a released POSIX lock is the whole
    // process's).
    assert!(taken_elsewhere(&p, SHM_CKPT_LOCK + 2, 5));
    a.unpin().expect("unpin");
    assert!(!taken_elsewhere(&p, SHM_CKPT_LOCK + 2, 5));
}

#[test]
fn a_copier_copies_back_up_to_the_pin_and_the_checkpoint_hold_stays() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = wal_db(dir.path());
    let app = Connection::open(&p).expect("app");
    app.pragma_update(None, "wal_autocheckpoint", 0)
        .expect("ac");
    app.execute_batch("INSERT INTO t VALUES (1); INSERT INTO t VALUES (2);")
        .expect("write");
    let mut db = Db::open(&p, false).expect("open");
    db.pin().expect("pin");
    assert!(db.hold_checkpoints());
    let mut copier = db.copier().expect("copier");
    app.execute_batch("INSERT INTO t VALUES (3);")
        .expect("write past the pin");
    let r = copier.checkpoint().expect("copy");
    assert!(
        r.checkpointed > 0 && r.checkpointed < r.log,
        "up to the pin only: {r:?}"
    );
    // SQLite released the byte as the copier's own when the copy ended; the hold took it
    // again.
    assert!(taken_elsewhere(&p, SHM_CKPT_LOCK, 1));
    db.release_checkpoints();
    assert!(!taken_elsewhere(&p, SHM_CKPT_LOCK, 1));
}

#[test]
fn the_pin_moves_without_waiting_for_a_copy_back_in_flight() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = wal_db(dir.path());
    let app = Connection::open(&p).expect("app");
    let mut db = Db::open(&p, false).expect("open");
    db.pin().expect("pin");
    app.execute_batch("INSERT INTO t VALUES (1);")
        .expect("write");
    // A copier's checkpoint locks the file's hold state for the whole of its copy (up to
    // seconds under a heavy load); the loop moves the pin in the middle of shipping.
    let shm = db.shm.clone().expect("shm");
    let copying = shm.hold.lock().expect("hold state");
    let (tx, rx) = std::sync::mpsc::channel();
    let mover = std::thread::spawn(move || {
        let r = db.advance_pin();
        tx.send(r.is_ok()).expect("send");
        db
    });
    let moved = rx.recv_timeout(Duration::from_secs(5));
    drop(copying);
    let db = mover.join().expect("join");
    assert_eq!(moved, Ok(true), "the pin waited for the copy back");
    assert!(db.is_pinned());
}

#[test]
fn an_advanced_pin_lets_checkpoints_reach_it_but_never_lets_the_wal_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = wal_db(dir.path());
    let app = Connection::open(&p).expect("app");
    app.busy_timeout(Duration::from_millis(50)).expect("busy");
    app.pragma_update(None, "wal_autocheckpoint", 0)
        .expect("autockpt");
    app.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("truncate");
    let mut db = Db::open(&p, false).expect("open");
    // A pin taken on a completely checkpointed WAL is on mark 0: no checkpoint can copy
    // anything while it is held.
    db.pin().expect("pin");
    for i in 0..5 {
        app.execute("INSERT INTO t VALUES (?1)", [i])
            .expect("insert");
    }
    let (_, log, done) = passive(&app);
    assert!(log >= 5, "{log}");
    assert_eq!(done, 0, "mark 0 blocks every checkpoint");
    // Moved forward, the pin lets checkpoints copy up to it, not past it.
    db.advance_pin().expect("advance");
    assert!(db.is_pinned());
    for i in 5..10 {
        app.execute("INSERT INTO t VALUES (?1)", [i])
            .expect("insert");
    }
    let (_, log2, done2) = passive(&app);
    assert_eq!(done2, log, "copied up to the pin");
    assert!(log2 > done2, "not past it");
    // And the WAL cannot restart under it.
    let (busy, _, _): (i64, i64, i64) = app
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .expect("ckpt");
    assert_eq!(busy, 1, "a pinned WAL must not be truncated");
    // Advancing again moves the mark to the end; releasing lets everything go.
    db.advance_pin().expect("advance");
    let (_, log3, done3) = passive(&app);
    assert_eq!(done3, log3);
    db.unpin().expect("unpin");
    assert!(!db.is_pinned());
    let (busy, _, _): (i64, i64, i64) = app
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .expect("ckpt");
    assert_eq!(busy, 0);
}

#[test]
fn the_wal_index_reads_as_sqlite_keeps_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = wal_db(dir.path());
    let app = Connection::open(&p).expect("app");
    app.pragma_update(None, "wal_autocheckpoint", 0)
        .expect("autockpt");
    let db = Db::open(&p, false).expect("open");
    for i in 0..4 {
        app.execute("INSERT INTO t VALUES (?1)", [i])
            .expect("insert");
    }
    let h = crate::walfile::read_header(&wal_path(&p))
        .expect("read")
        .expect("a WAL");
    let ix = db.wal_index().expect("index");
    assert_eq!(ix.salts, (h.salt1, h.salt2));
    let (_, log, done) = passive(&app);
    assert_eq!(i64::from(ix.max_frame), log);
    let ix = db.wal_index().expect("index");
    assert_eq!(i64::from(ix.backfilled), done);
    assert_eq!(ix.backfilled, ix.max_frame);
    // This process's own checkpoint is never taken for the app's.
    assert!(!db.app_checkpoint_waiting());
}

#[test]
fn pin_blocks_an_app_truncate_checkpoint_and_lock_blocks_app_writes() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = wal_db(dir.path());
    let app = Connection::open(&p).expect("app");
    app.busy_timeout(Duration::from_millis(50)).expect("busy");
    app.execute("INSERT INTO t VALUES (1)", []).expect("insert");
    let mut db = Db::open(&p, false).expect("open");
    db.pin().expect("pin");
    app.execute("INSERT INTO t VALUES (2)", []).expect("insert");
    let (busy, _, _): (i64, i64, i64) = app
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .expect("ckpt");
    assert_eq!(busy, 1, "a pinned WAL must not be truncated");
    assert!(db.lock(Duration::from_millis(50)).expect("lock"));
    assert!(app.execute("INSERT INTO t VALUES (3)", []).is_err());
    db.unlock().expect("unlock");
    app.execute("INSERT INTO t VALUES (3)", [])
        .expect("insert after unlock");
    db.unpin().expect("unpin");
}
