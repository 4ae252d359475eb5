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
//!
//! The parts: the pin and the write lock (`pin`), the WAL index read without a lock
//! (`shm`), the checkpoint lock walship holds against the app's checkpoints (`hold`), the
//! POSIX lock calls they share (`locks`), and the [`Copier`] that copies back beside the
//! replicator's loop (`copier`).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};

use crate::error::{EngineError, EngineResult};

mod copier;
mod hold;
mod locks;
mod pin;
mod shm;
#[cfg(test)]
mod tests;

pub use copier::Copier;
pub use shm::WalIndex;

use copier::checkpoint_on;
use pin::retry_until_deadline;
use shm::{Shm, shm_handle};

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
