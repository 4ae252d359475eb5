//! The replicator's connections to the live database.
//!
//! Three connections, none of which ever writes:
//! - `reader` holds the **pin**: an open read transaction, so SQLite cannot restart the WAL
//!   past frames walship has not shipped (see docs/ARCHITECTURE.md, "The pin protocol");
//! - `locker` takes the WAL write lock (`BEGIN IMMEDIATE`) for the short handoff around a
//!   checkpoint, so no frame is appended while the pin is re-taken;
//! - `ckpt` runs checkpoints.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};

use crate::error::{EngineError, EngineResult};

/// Identity of a file: a database replaced under walship has another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    reader: Connection,
    locker: Connection,
    ckpt: Connection,
    pinned: bool,
    locked: bool,
}

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
        let reader = open_conn(path, Duration::from_secs(5))?;
        let locker = open_conn(path, Duration::from_millis(200))?;
        Ok(Db {
            path: path.to_path_buf(),
            id,
            file,
            reader,
            locker,
            ckpt,
            pinned: false,
            locked: false,
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

    /// Takes the pin: an open read transaction on `reader`.
    pub fn pin(&mut self) -> EngineResult<()> {
        if self.pinned {
            return Ok(());
        }
        self.reader
            .execute_batch("BEGIN DEFERRED")
            .map_err(|e| EngineError::sqlite("begin pin", e))?;
        let r: rusqlite::Result<i64> =
            self.reader
                .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0));
        if let Err(e) = r {
            let _ = self.reader.execute_batch("ROLLBACK");
            return Err(EngineError::sqlite("take pin (read transaction)", e));
        }
        self.pinned = true;
        Ok(())
    }

    /// Releases the pin.
    pub fn unpin(&mut self) -> EngineResult<()> {
        if !self.pinned {
            return Ok(());
        }
        self.pinned = false;
        self.reader
            .execute_batch("ROLLBACK")
            .map_err(|e| EngineError::sqlite("release pin", e))
    }

    /// Whether the pin is held.
    pub fn is_pinned(&self) -> bool {
        self.pinned
    }

    /// Takes the WAL write lock, waiting up to `timeout`. `Ok(false)` if another connection
    /// kept it that long.
    pub fn lock(&mut self, timeout: Duration) -> EngineResult<bool> {
        if self.locked {
            return Ok(true);
        }
        self.locker
            .busy_timeout(timeout)
            .map_err(|e| EngineError::sqlite("set busy timeout", e))?;
        match self.locker.execute_batch("BEGIN IMMEDIATE") {
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

    /// Runs a checkpoint on the checkpoint connection.
    pub fn checkpoint(&mut self, mode: CheckpointMode) -> EngineResult<CheckpointResult> {
        self.ckpt
            .query_row(mode.sql(), [], |r| {
                Ok(CheckpointResult {
                    busy: r.get::<_, i64>(0)? != 0,
                    log: r.get(1)?,
                    checkpointed: r.get(2)?,
                })
            })
            .map_err(|e| EngineError::sqlite("checkpoint", e))
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
        let _ = self.unlock();
        let _ = self.unpin();
    }
}

/// The WAL path of a database.
pub fn wal_path(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push("-wal");
    PathBuf::from(s)
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
