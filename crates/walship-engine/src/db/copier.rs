//! The copier: PASSIVE checkpoints on a connection of their own, beside the loop.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;

use super::shm::Shm;
use super::{CheckpointMode, CheckpointResult, Db, open_conn};
use crate::error::{EngineError, EngineResult};

/// A connection of its own that copies the WAL back (PASSIVE checkpoints) on a blocking
/// thread beside the replicator's loop, so that a long copy back never holds up shipping
/// (see docs/design/replicator.md, "Copying back beside the loop"). Like `Db`'s connections it
/// never writes a transaction and never checkpoints on close.
pub struct Copier {
    conn: Connection,
    shm: Option<Arc<Shm>>,
    path: PathBuf,
}

impl Db {
    /// A `Copier` for this database: a connection of its own.
    pub fn copier(&self) -> EngineResult<Copier> {
        Ok(Copier {
            conn: open_conn(&self.path, Duration::from_secs(5))?,
            shm: self.shm.clone(),
            path: self.path.clone(),
        })
    }
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

pub(super) fn checkpoint_on(
    conn: &Connection,
    mode: CheckpointMode,
) -> EngineResult<CheckpointResult> {
    conn.query_row(mode.sql(), [], |r| {
        Ok(CheckpointResult {
            busy: r.get::<_, i64>(0)? != 0,
            log: r.get(1)?,
            checkpointed: r.get(2)?,
        })
    })
    .map_err(|e| EngineError::sqlite("checkpoint", e))
}
