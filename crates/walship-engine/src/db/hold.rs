//! The checkpoint hold: walship keeps the WAL's checkpoint lock so the app's own
//! checkpoints give up at once while the pin keeps a busy WAL from restarting.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use super::locks::set_lock;
use super::pin::LOCK_RETRY;
use super::shm::{SHM_CKPT_LOCK, Shm};
use super::{CheckpointMode, CheckpointResult, Db, checkpoint_on};
use crate::error::EngineResult;

impl Db {
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
    pub(super) fn keeping_checkpoint_hold_unless_copying<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> T,
    ) -> T {
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
}

impl Shm {
    /// The file's hold state, locked: waiting for it, or `None` at once while another holds
    /// it (`wait` false). `None` too if it is poisoned.
    pub(super) fn hold_state(
        &self,
        wait: bool,
    ) -> Option<std::sync::MutexGuard<'_, CheckpointHold>> {
        if wait {
            self.hold.lock().ok()
        } else {
            self.hold.try_lock().ok()
        }
    }

    /// After SQLite may have taken and released the checkpoint lock as this process's own:
    /// takes it again while any `Db` holds it.
    pub(super) fn take_again_if_held(&self, hold: &mut CheckpointHold, db: &Path) {
        if hold.holders > 0 {
            hold.locked = take_checkpoint_lock(&self.file, db);
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct CheckpointHold {
    /// `Db`s that want the lock held.
    pub(super) holders: u32,
    /// Whether this process holds it now.
    pub(super) locked: bool,
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
