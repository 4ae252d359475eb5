//! The pin (a read transaction that keeps SQLite from restarting the WAL past what walship
//! has not shipped) and the WAL write lock taken for the handoff around a checkpoint.

use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::Db;
use super::shm::checkpoint_waiting;
use crate::error::{EngineError, EngineResult};

impl Db {
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
}

/// Pause between two tries at a lock the app holds.
pub(super) const LOCK_RETRY: Duration = Duration::from_micros(50);

thread_local! {
    /// Until when `Db::lock` keeps trying (SQLite calls the busy handler on the thread that
    /// waits).
    static LOCK_DEADLINE: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
    /// The `-shm` file of the database `Db::lock` waits for.
    static LOCK_SHM: std::cell::RefCell<Option<Arc<File>>> = const { std::cell::RefCell::new(None) };
}

/// The write lock's busy handler: tries again every 50 µs until the deadline. SQLite's own
/// handler backs off to tens of milliseconds between tries, and an app that writes back to
/// back leaves the lock free only for microseconds between its transactions: it would
/// almost never be caught free. While pinned, gives up at once (checked every 20th try) when
/// the holder is an app's blocking checkpoint, which waits for the pin and would only wait
/// longer.
pub(super) fn retry_until_deadline(count: i32) -> bool {
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
