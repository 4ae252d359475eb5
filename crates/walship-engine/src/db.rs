//! The replicator's connections to the live database.
//!
//! Four connections, none of which ever writes:
//! - `readers[0]` and `readers[1]` hold the **pin**, one at a time: an open read
//!   transaction, so SQLite cannot restart the WAL past frames walship has not shipped (see
//!   docs/ARCHITECTURE.md, "The pin protocol"). Two, so the pin can move forward without a
//!   moment unpinned: the next one is taken before the last one is let go;
//! - `locker` takes the WAL write lock (`BEGIN IMMEDIATE`) for the short handoff around a
//!   checkpoint, so no frame is appended while the pin is re-taken;
//! - `ckpt` runs checkpoints.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};

use crate::error::{EngineError, EngineResult};

/// Identity of a file: a database replaced under walship has another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The identity of the file at `path`, or `None` if it does not exist.
    pub fn of(path: &Path) -> Option<FileId> {
        std::fs::metadata(path).ok().map(|m| FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// Checkpoint modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointMode {
    /// Copies what it can without waiting for anyone.
    Passive,
    /// Waits for writers and readers; the next writer restarts the WAL.
    Restart,
}

impl CheckpointMode {
    fn sql(self) -> &'static str {
        match self {
            CheckpointMode::Passive => "PRAGMA wal_checkpoint(PASSIVE)",
            CheckpointMode::Restart => "PRAGMA wal_checkpoint(RESTART)",
        }
    }
}

/// Result of a checkpoint: `(busy, frames in the log, frames checkpointed)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointResult {
    /// The checkpoint could not finish.
    pub busy: bool,
    /// Frames in the WAL.
    pub log: i64,
    /// Frames copied back into the database.
    pub checkpointed: i64,
}

/// The replicator's handle on the live database.
#[derive(Debug)]
pub struct Db {
    path: PathBuf,
    id: FileId,
    /// The one descriptor of the database file walship reads through. POSIX record locks
    /// belong to the process and are all dropped when *any* descriptor of the file is
    /// closed, so walship never opens and closes the database file behind SQLite's back:
    /// that would silently release SQLite's shared lock and let an app that closes its last
    /// connection checkpoint and delete the WAL under the pin.
    file: Arc<File>,
    readers: [Connection; 2],
    locker: Connection,
    ckpt: Connection,
    /// Which of `readers` holds the pin, if any.
    pinned: Option<usize>,
    locked: bool,
    /// The WAL index (`-shm`), read to see an app's checkpoint waiting (see `shm_handle`).
    shm: Option<Arc<Shm>>,
    /// Whether walship holds the WAL's checkpoint lock (see `Db::hold_checkpoints`).
    ckpt_held: bool,
}

/// What the WAL index (the `-shm` file) says, read without taking any lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalIndex {
    /// Salts of the WAL incarnation the index describes.
    pub salts: (u32, u32),
    /// Frames of committed transactions published to readers.
    pub max_frame: u32,
    /// Frames copied back into the database file.
    pub backfilled: u32,
}

/// Byte offsets in the `-shm` file (SQLite's wal.c and os_unix.c): two copies of the
/// 48-byte index header, then the checkpoint info, whose `nBackfill` comes first; the POSIX
/// locks SQLite takes are at 120 + lock number.
const SHM_HEADER: usize = 48;
const SHM_BACKFILL: usize = 2 * SHM_HEADER;
const SHM_WRITE_LOCK: i64 = 120;
const SHM_CKPT_LOCK: i64 = 121;

fn open_conn(path: &Path, busy: Duration) -> EngineResult<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| EngineError::sqlite(format!("open {}", path.display()), e))?;
    conn.busy_timeout(busy)
        .map_err(|e| EngineError::sqlite("set busy timeout", e))?;
    // Closing our connection must never checkpoint and delete the WAL: that would restart it
    // behind the replica's back.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
        .map_err(|e| EngineError::sqlite("disable checkpoint on close", e))?;
    Ok(conn)
}

impl Db {
    /// Opens the database, refusing one that is missing or not in WAL mode (unless
    /// `enable_wal`, which switches it).
    pub fn open(path: &Path, enable_wal: bool) -> EngineResult<Db> {
        let id = FileId::of(path).ok_or_else(|| EngineError::MissingDatabase {
            path: path.to_path_buf(),
        })?;
        let file = Arc::new(
            File::open(path).map_err(|e| EngineError::io(format!("open {}", path.display()), e))?,
        );
        let ckpt = open_conn(path, Duration::from_secs(5))?;
        let mode: String = ckpt
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(|e| {
                EngineError::sqlite("read journal_mode (is this a SQLite database?)", e)
            })?;
        if !mode.eq_ignore_ascii_case("wal") {
            if !enable_wal {
                return Err(EngineError::NotWalMode {
                    path: path.to_path_buf(),
                    mode,
                });
            }
            let now: String = ckpt
                .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
                .map_err(|e| EngineError::sqlite("switch to WAL mode", e))?;
            if !now.eq_ignore_ascii_case("wal") {
                return Err(EngineError::NotWalMode {
                    path: path.to_path_buf(),
                    mode: now,
                });
            }
            tracing::info!(db = %path.display(), "switched database to WAL mode");
        }
        let readers = [
            open_conn(path, Duration::from_secs(5))?,
            open_conn(path, Duration::from_secs(5))?,
        ];
        let locker = open_conn(path, Duration::from_millis(200))?;
        locker
            .busy_handler(Some(retry_until_deadline))
            .map_err(|e| EngineError::sqlite("set busy handler", e))?;
        let shm = shm_handle(&shm_path(path));
        if shm.is_none() {
            tracing::debug!(db = %path.display(), "no -shm file to read; an app's own blocking checkpoints will wait for the pin");
        }
        Ok(Db {
            path: path.to_path_buf(),
            id,
            file,
            readers,
            locker,
            ckpt,
            pinned: None,
            locked: false,
            shm,
            ckpt_held: false,
        })
    }

    /// A `Copier` for this database: a connection of its own.
    pub fn copier(&self) -> EngineResult<Copier> {
        Ok(Copier {
            conn: open_conn(&self.path, Duration::from_secs(5))?,
            shm: self.shm.clone(),
            path: self.path.clone(),
        })
    }

    /// The database's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The long-lived handle of the database file (see the field's comment).
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// The WAL's path.
    pub fn wal_path(&self) -> PathBuf {
        wal_path(&self.path)
    }

    /// True if the file at the path is still the one opened.
    pub fn still_same_file(&self) -> bool {
        FileId::of(&self.path) == Some(self.id)
    }

    /// Takes the pin: an open read transaction on one of `readers`.
    pub fn pin(&mut self) -> EngineResult<()> {
        if self.pinned.is_some() {
            return Ok(());
        }
        self.keeping_checkpoint_hold_unless_copying(|db| begin_read(&db.readers[0]))?;
        self.pinned = Some(0);
        Ok(())
    }

    /// Moves the pin to the WAL's current end: takes a read transaction on the other reader
    /// first, then ends the old one, so the WAL is never unpinned in between. Which read
    /// mark the new transaction gets is SQLite's choice; the caller makes sure it cannot be
    /// the "WAL ignored" one (see `Replicator::maybe_advance_pin`).
    pub fn advance_pin(&mut self) -> EngineResult<()> {
        let Some(old) = self.pinned else {
            return self.pin();
        };
        let next = 1 - old;
        self.keeping_checkpoint_hold_unless_copying(|db| begin_read(&db.readers[next]))?;
        self.pinned = Some(next);
        self.readers[old]
            .execute_batch("ROLLBACK")
            .map_err(|e| EngineError::sqlite("release the previous pin", e))
    }

    /// Releases the pin.
    pub fn unpin(&mut self) -> EngineResult<()> {
        let Some(i) = self.pinned.take() else {
            return Ok(());
        };
        self.readers[i]
            .execute_batch("ROLLBACK")
            .map_err(|e| EngineError::sqlite("release pin", e))
    }

    /// Whether the pin is held.
    pub fn is_pinned(&self) -> bool {
        self.pinned.is_some()
    }

    /// Takes the WAL write lock, waiting up to `timeout`. `Ok(false)` if another connection
    /// kept it that long.
    pub fn lock(&mut self, timeout: Duration) -> EngineResult<bool> {
        if self.locked {
            return Ok(true);
        }
        LOCK_DEADLINE.with(|d| d.set(Some(Instant::now() + timeout)));
        // An app's blocking checkpoint holding the lock waits for the pin: give up on it at
        // once while pinned (the caller lets it through); unpinned, it finishes by itself.
        let shm = self.pinned.and(self.shm.as_ref().map(|s| s.file.clone()));
        LOCK_SHM.with(|s| *s.borrow_mut() = shm);
        let r = self.locker.execute_batch("BEGIN IMMEDIATE");
        LOCK_DEADLINE.with(|d| d.set(None));
        LOCK_SHM.with(|s| *s.borrow_mut() = None);
        match r {
            Ok(()) => {
                self.locked = true;
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.sqlite_error_code(),
                    Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(EngineError::sqlite("take write lock", e)),
        }
    }

    /// Releases the write lock.
    pub fn unlock(&mut self) -> EngineResult<()> {
        if !self.locked {
            return Ok(());
        }
        self.locked = false;
        self.locker
            .execute_batch("ROLLBACK")
            .map_err(|e| EngineError::sqlite("release write lock", e))
    }

    /// Runs a checkpoint on the checkpoint connection. A PASSIVE one never waits, so it is
    /// retried for a few milliseconds while another connection's checkpoint holds the
    /// checkpoint lock (an app whose WAL is past its autocheckpoint threshold tries one at
    /// every commit).
    pub fn checkpoint(&mut self, mode: CheckpointMode) -> EngineResult<CheckpointResult> {
        self.keeping_checkpoint_hold(|db| db.checkpoint_now(mode))
    }

    fn checkpoint_now(&mut self, mode: CheckpointMode) -> EngineResult<CheckpointResult> {
        let deadline = Instant::now() + Duration::from_millis(20);
        loop {
            let r = checkpoint_on(&self.ckpt, mode)?;
            // (1, -1, -1): the checkpoint lock was taken.
            if !(r.busy && r.log < 0) || Instant::now() >= deadline {
                return Ok(r);
            }
            std::thread::sleep(LOCK_RETRY);
        }
    }

    /// Takes the WAL's checkpoint lock and keeps it, so that the app's checkpoints give up at
    /// once (SQLite never waits for that lock) until `release_checkpoints`. While walship's
    /// pin keeps a busy WAL from restarting, every commit of an app past its autocheckpoint
    /// threshold would otherwise run a checkpoint of its own: a round of lock calls on the
    /// WAL index for nothing, or, right after the pin moved, a copy back and an fsync in the
    /// middle of the app's commit. `false` if another process holds the lock for longer
    /// than a couple of milliseconds (an app's blocking checkpoint).
    ///
    /// The lock is a POSIX lock of this process on the `-shm` descriptor that is never
    /// closed (see `shm_handle`), so it is this process's as SQLite's own locks are: walship's
    /// checkpoints (and the recovery a read may run) take and release the same byte as
    /// their own without waiting, and `keeping_checkpoint_hold` takes it again after them.
    /// The kernel drops it if walship dies.
    pub fn hold_checkpoints(&mut self) -> bool {
        let Some(shm) = self.shm.clone() else {
            return false;
        };
        let Ok(mut hold) = shm.hold.lock() else {
            return false;
        };
        if !self.ckpt_held {
            self.ckpt_held = true;
            hold.holders += 1;
        }
        // Taken again even when it should be held: a recovery run by one of walship's own
        // reads or writes may have taken and released it as SQLite's own.
        hold.locked = take_checkpoint_lock(&shm.file, &self.path);
        hold.locked
    }

    /// Lets the app checkpoint again (see `hold_checkpoints`), once no other `Db` of this
    /// process on the same file holds it either.
    pub fn release_checkpoints(&mut self) {
        if !self.ckpt_held {
            return;
        }
        self.ckpt_held = false;
        let Some(shm) = self.shm.clone() else {
            return;
        };
        let Ok(mut hold) = shm.hold.lock() else {
            return;
        };
        hold.holders = hold.holders.saturating_sub(1);
        if hold.holders == 0 && hold.locked {
            hold.locked = false;
            if let Err(e) = set_lock(&shm.file, SHM_CKPT_LOCK, false) {
                tracing::warn!(db = %self.path.display(), error = %e, "could not release the checkpoint lock");
            }
        }
    }

    /// Whether walship means to hold the checkpoint lock (it may have lost it for a moment
    /// to an app's checkpoint; the next `hold_checkpoints` takes it again).
    pub fn holds_checkpoints(&self) -> bool {
        self.ckpt_held
    }

    /// Runs `f`, which may take and release the checkpoint lock through SQLite, and takes
    /// the lock again after it if held. A POSIX lock is not counted: SQLite's release of the
    /// byte is this process's, and so would be a release by another `Db` on the same file
    /// in the middle of `f` — which would let an app's checkpoint run beside walship's. The
    /// file's hold state is locked for the whole of `f` so that none happens.
    fn keeping_checkpoint_hold<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        self.keeping_hold(true, f)
    }

    /// `keeping_checkpoint_hold` for a read transaction, which takes the checkpoint lock only
    /// to recover a WAL index: while a `Copier` (or another `Db`) holds the hold state, the
    /// read goes ahead without waiting for it (the pin moves in the middle of shipping,
    /// which must not wait out a copy back). Nothing is lost: the lock is SQLite's own
    /// during a copy, so no recovery can take and release it meanwhile, and whoever holds
    /// the state takes the lock again when it ends.
    fn keeping_checkpoint_hold_unless_copying<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        self.keeping_hold(false, f)
    }

    fn keeping_hold<T>(&mut self, wait: bool, f: impl FnOnce(&mut Self) -> T) -> T {
        let Some(shm) = self.shm.clone() else {
            return f(self);
        };
        let Some(mut hold) = shm.hold_state(wait) else {
            return f(self);
        };
        let r = f(self);
        shm.take_again_if_held(&mut hold, &self.path);
        r
    }

    /// True while another process runs a blocking checkpoint (FULL, RESTART or TRUNCATE):
    /// it holds both the WAL write lock and the checkpoint lock, and waits for readers —
    /// walship's pin among them. A PASSIVE checkpoint holds no write lock, and an app
    /// transaction no checkpoint lock. Locks of this process are never reported.
    pub fn app_checkpoint_waiting(&self) -> bool {
        self.shm
            .as_deref()
            .is_some_and(|s| checkpoint_waiting(&s.file))
    }

    /// The WAL index's header and checkpoint progress, if the `-shm` file can be read and
    /// its two header copies agree (a writer updating it makes them differ for a moment).
    pub fn wal_index(&self) -> Option<WalIndex> {
        let shm = self.shm.as_ref()?;
        let mut b = [0u8; SHM_BACKFILL + 4];
        for _ in 0..100 {
            std::os::unix::fs::FileExt::read_exact_at(&*shm.file, &mut b, 0).ok()?;
            let (h1, rest) = b.split_at(SHM_HEADER);
            if h1 != &rest[..SHM_HEADER] {
                std::hint::spin_loop();
                continue;
            }
            // isInit: the index was built from the WAL.
            if h1[12] != 1 {
                return None;
            }
            let ne = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
            // The salts are kept as the WAL header's big-endian bytes.
            let be = |o: usize| u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
            return Some(WalIndex {
                salts: (be(32), be(36)),
                max_frame: ne(16),
                backfilled: ne(SHM_BACKFILL),
            });
        }
        None
    }

    /// Waits (up to `timeout`) until another process's blocking checkpoint has copied the
    /// whole WAL back while the index still shows `salts` and `frames`. False as soon as
    /// the checkpoint is gone or the WAL moved on.
    pub fn wait_for_app_backfill(&self, salts: (u32, u32), frames: u32, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(ix) = self.wal_index() else {
                return false;
            };
            if ix.salts != salts || ix.max_frame != frames {
                return false;
            }
            if ix.backfilled == frames {
                return true;
            }
            if !self.app_checkpoint_waiting() || Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The database's page size.
    pub fn page_size(&self) -> EngineResult<u32> {
        self.ckpt
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(|e| EngineError::sqlite("read page_size", e))
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        self.release_checkpoints();
        let _ = self.unlock();
        let _ = self.unpin();
    }
}

/// Pause between two tries at a lock the app holds.
const LOCK_RETRY: Duration = Duration::from_micros(50);

thread_local! {
    /// Until when `Db::lock` keeps trying (SQLite calls the busy handler on the thread that
    /// waits).
    static LOCK_DEADLINE: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
    /// The `-shm` file of the database `Db::lock` waits for.
    static LOCK_SHM: std::cell::RefCell<Option<Arc<File>>> = const { std::cell::RefCell::new(None) };
}

/// See `Db::app_checkpoint_waiting`.
fn checkpoint_waiting(shm: &File) -> bool {
    match (
        lock_holder(shm, SHM_WRITE_LOCK),
        lock_holder(shm, SHM_CKPT_LOCK),
    ) {
        (Ok(Some(w)), Ok(Some(c))) => w == c,
        _ => false,
    }
}

/// The write lock's busy handler: tries again every 50 µs until the deadline. SQLite's own
/// handler backs off to tens of milliseconds between tries, and an app that writes back to
/// back leaves the lock free only for microseconds between its transactions: it would
/// almost never be caught free. While pinned, gives up at once (checked every 20th try) when
/// the holder is an app's blocking checkpoint, which waits for the pin and would only wait
/// longer.
fn retry_until_deadline(count: i32) -> bool {
    let Some(deadline) = LOCK_DEADLINE.with(|d| d.get()) else {
        return false;
    };
    if Instant::now() >= deadline {
        return false;
    }
    if count % 20 == 0 && LOCK_SHM.with(|s| s.borrow().as_deref().is_some_and(checkpoint_waiting)) {
        return false;
    }
    std::thread::sleep(LOCK_RETRY);
    true
}

/// Starts a read transaction on `conn` and reads, so SQLite takes a read mark.
fn begin_read(conn: &Connection) -> EngineResult<()> {
    conn.execute_batch("BEGIN DEFERRED")
        .map_err(|e| EngineError::sqlite("begin pin", e))?;
    let r: rusqlite::Result<i64> =
        conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0));
    if let Err(e) = r {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(EngineError::sqlite("take pin (read transaction)", e));
    }
    Ok(())
}

/// The WAL path of a database.
pub fn wal_path(db: &Path) -> PathBuf {
    sibling(db, "-wal")
}

fn shm_path(db: &Path) -> PathBuf {
    sibling(db, "-shm")
}

/// The database's path with `suffix` appended, as SQLite names its `-wal` and `-shm` files.
fn sibling(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// A connection of its own that copies the WAL back (PASSIVE checkpoints) on a blocking
/// thread beside the replicator's loop, so that a long copy back never holds up shipping
/// (see docs/design/replicator.md, "Copying back beside the loop"). Like `Db`'s connections it
/// never writes a transaction and never checkpoints on close.
pub struct Copier {
    conn: Connection,
    shm: Option<Arc<Shm>>,
    path: PathBuf,
}

impl std::fmt::Debug for Copier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Copier").field("path", &self.path).finish()
    }
}

impl Copier {
    /// A PASSIVE checkpoint: copies the WAL back up to the oldest reader's mark (walship's
    /// pin). The file's checkpoint-hold state is locked for the whole copy and the lock
    /// taken again after it if held, as for `Db::checkpoint`. One try: a checkpoint of the
    /// app's that holds the lock is doing the same work.
    pub fn checkpoint(&mut self) -> EngineResult<CheckpointResult> {
        let shm = self.shm.clone();
        let mut hold = shm.as_deref().and_then(|s| s.hold_state(true));
        let r = checkpoint_on(&self.conn, CheckpointMode::Passive);
        if let (Some(shm), Some(hold)) = (shm.as_deref(), hold.as_mut()) {
            shm.take_again_if_held(hold, &self.path);
        }
        r
    }
}

fn checkpoint_on(conn: &Connection, mode: CheckpointMode) -> EngineResult<CheckpointResult> {
    conn.query_row(mode.sql(), [], |r| {
        Ok(CheckpointResult {
            busy: r.get::<_, i64>(0)? != 0,
            log: r.get(1)?,
            checkpointed: r.get(2)?,
        })
    })
    .map_err(|e| EngineError::sqlite("checkpoint", e))
}

/// A database's `-shm` file as this process keeps it (see `shm_handle`).
#[derive(Debug)]
struct Shm {
    /// Never closed: closing any descriptor of a file drops every POSIX lock the process
    /// holds on it, and SQLite's locks on the `-shm` file are the pin's read mark.
    file: Arc<File>,
    /// Which `Db`s of this process hold the checkpoint lock (`Db::hold_checkpoints`).
    hold: std::sync::Mutex<CheckpointHold>,
}

impl Shm {
    /// The file's hold state, locked: waiting for it, or `None` at once while another holds
    /// it (`wait` false). `None` too if it is poisoned.
    fn hold_state(&self, wait: bool) -> Option<std::sync::MutexGuard<'_, CheckpointHold>> {
        if wait {
            self.hold.lock().ok()
        } else {
            self.hold.try_lock().ok()
        }
    }

    /// After SQLite may have taken and released the checkpoint lock as this process's own:
    /// takes it again while any `Db` holds it.
    fn take_again_if_held(&self, hold: &mut CheckpointHold, db: &Path) {
        if hold.holders > 0 {
            hold.locked = take_checkpoint_lock(&self.file, db);
        }
    }
}

#[derive(Debug, Default)]
struct CheckpointHold {
    /// `Db`s that want the lock held.
    holders: u32,
    /// Whether this process holds it now.
    locked: bool,
}

/// Takes the checkpoint lock for this process, trying again for up to 2 ms: an app past
/// its autocheckpoint threshold holds it for a moment at every commit.
fn take_checkpoint_lock(shm: &File, db: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_millis(2);
    loop {
        match set_lock(shm, SHM_CKPT_LOCK, true) {
            Ok(true) => return true,
            Ok(false) if Instant::now() < deadline => std::thread::sleep(Duration::from_micros(20)),
            Ok(false) => return false,
            Err(e) => {
                tracing::debug!(db = %db.display(), error = %e, "cannot hold the checkpoint lock");
                return false;
            }
        }
    }
}

/// The `-shm` file at `path`, opened at most once per file for the life of the process and
/// never closed (see `Shm::file`). (A database replaced under walship may keep its `-shm`
/// file, which a fresh `Db` then shares.)
fn shm_handle(path: &Path) -> Option<Arc<Shm>> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static OPEN: OnceLock<Mutex<HashMap<FileId, Arc<Shm>>>> = OnceLock::new();
    let mut open = OPEN.get_or_init(Default::default).lock().ok()?;
    if let Some(f) = FileId::of(path).and_then(|id| open.get(&id)) {
        return Some(f.clone());
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .ok()?;
    let meta = f.metadata().ok()?;
    let id = FileId {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    if let Some(known) = open.get(&id) {
        // Replaced between the look-up and the open: keep the known one, and never close
        // this one either.
        let known = known.clone();
        std::mem::forget(f);
        return Some(known);
    }
    let shm = Arc::new(Shm {
        file: Arc::new(f),
        hold: Default::default(),
    });
    open.insert(id, shm.clone());
    Some(shm)
}

/// The process holding a lock that conflicts with an exclusive lock on `byte` of `f`, if
/// any (`fcntl(F_GETLK)`; the caller's own locks never conflict).
#[allow(unsafe_code)]
fn lock_holder(f: &File, byte: i64) -> std::io::Result<Option<i32>> {
    use std::os::fd::AsRawFd;
    // SAFETY: `flock` is a plain C struct for which all zeroes is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    // SAFETY: F_GETLK reads and fills in the `flock` we own, on a descriptor kept open by
    // `f` for the whole call.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut fl) };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((fl.l_type != libc::F_UNLCK as libc::c_short).then_some(fl.l_pid))
}

/// Takes (`lock`) or releases this process's exclusive POSIX lock on `byte` of `f`, without
/// waiting. `Ok(false)`: another process holds it.
#[allow(unsafe_code)]
fn set_lock(f: &File, byte: i64, lock: bool) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: `flock` is a plain C struct for which all zeroes is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if lock { libc::F_WRLCK } else { libc::F_UNLCK } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    // SAFETY: F_SETLK reads the `flock` we own, on a descriptor kept open by `f`.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl) };
    if r == -1 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EACCES) => Ok(false),
            _ => Err(e),
        };
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
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
}
