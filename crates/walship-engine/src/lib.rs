//! walship's engine: replicate a live SQLite database into a replica, and restore it.
//!
//! - [`replicate::spawn`] starts a replicator task for one database and returns a
//!   [`ReplicatorHandle`] (`sync().await`, `snapshot().await`, `status()`, `shutdown()`).
//!   It holds a read transaction (the *pin*) so SQLite cannot restart the WAL past frames it
//!   has not shipped, tails new frames, ships whole transactions as segments, hands the pin
//!   off around checkpoints, writes snapshots, and starts a new generation whenever it
//!   cannot prove the log continuous.
//! - [`restore::restore`] rebuilds the newest (or a point-in-time) state into a file,
//!   verifying every object, and moves it into place only once `PRAGMA integrity_check`
//!   passed. A restore that cannot reach everything the replica holds is partial
//!   ([`RestoreReport::gap`]) and writes nothing unless [`RestoreOptions::allow_partial`];
//!   [`restore::plan`] tells what a restore would read, from the listing alone.
//! - [`Replica`] lists generations, snapshots and segments from keys alone.
//! - [`lease`]: writer fencing, one replicator per replica prefix (a lease object written
//!   with `if_none_match`); [`LeaseOptions`] and [`OnConflict`] say how long it lasts and
//!   what a newcomer does.
//! - [`retention`]: which snapshots and segments a replica keeps ([`RetentionPolicy`]),
//!   applied by the replicator after each snapshot upload.
//! - [`compact`]: runs of small segments merged into larger ones ([`CompactionOptions`]), so
//!   a restore fetches few objects; run by the replicator beside its syncs.
//! - [`inspect`]: reading databases for the tools: SQL dumps, row counts, schemas and
//!   their differences, copies of single tables, one snapshot decoded into a file.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use walship_engine::{Replica, ReplicateOptions, RestoreOptions};
//! let url: walship_storage::ReplicaUrl = "file:///var/backups/app".parse()?;
//! let replica = Replica::new(walship_storage::open(&url, &Default::default()).await?);
//! // At boot: restore if the database is missing.
//! let db = std::path::Path::new("/data/app.db");
//! if !db.exists() {
//!     walship_engine::restore::restore(&replica, db, &RestoreOptions::default()).await?;
//! }
//! // Then replicate in the background until shutdown.
//! let cancel = tokio_util::sync::CancellationToken::new();
//! let (handle, task) = walship_engine::replicate::spawn(
//!     db.to_path_buf(), replica, ReplicateOptions::default(), cancel.clone());
//! // ... serve ...
//! handle.sync().await?;   // everything committed so far is in the replica
//! cancel.cancel();        // final sync, then stop
//! task.await??;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod backoff;
pub mod compact;
pub mod db;
mod error;
pub mod inspect;
pub mod lease;
mod overlay;
pub mod replica;
pub mod replicate;
pub mod restore;
pub mod retention;
mod snapshot;
mod stall;
mod walfile;

pub use crate::error::{EngineError, EngineResult};

/// A background task that is aborted when its owner drops this (a file watcher, a restore's
/// downloads): nothing outlives the work it serves.
#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
pub use crate::compact::CompactionOptions;
pub use crate::lease::{LeaseOptions, OnConflict};
pub use crate::replica::Replica;
pub use crate::replicate::{ReplicateOptions, ReplicatorHandle, Status};
pub use crate::restore::{RestoreOptions, RestoreProgress, RestoreReport, TimesBackwards};
pub use crate::retention::RetentionPolicy;
