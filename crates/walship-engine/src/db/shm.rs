//! The WAL index (the `-shm` file): read without taking any lock, to see an app's
//! checkpoint waiting for the pin and how far it copied back.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::hold::CheckpointHold;
use super::locks::lock_holder;
use super::{Db, FileId};

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
pub(super) const SHM_HEADER: usize = 48;
pub(super) const SHM_BACKFILL: usize = 2 * SHM_HEADER;
pub(super) const SHM_WRITE_LOCK: i64 = 120;
pub(super) const SHM_CKPT_LOCK: i64 = 121;

impl Db {
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
}

/// See `Db::app_checkpoint_waiting`.
pub(super) fn checkpoint_waiting(shm: &File) -> bool {
    match (
        lock_holder(shm, SHM_WRITE_LOCK),
        lock_holder(shm, SHM_CKPT_LOCK),
    ) {
        (Ok(Some(w)), Ok(Some(c))) => w == c,
        _ => false,
    }
}

/// A database's `-shm` file as this process keeps it (see `shm_handle`).
#[derive(Debug)]
pub(super) struct Shm {
    /// Never closed: closing any descriptor of a file drops every POSIX lock the process
    /// holds on it, and SQLite's locks on the `-shm` file are the pin's read mark.
    pub(super) file: Arc<File>,
    /// Which `Db`s of this process hold the checkpoint lock (`Db::hold_checkpoints`).
    pub(super) hold: std::sync::Mutex<CheckpointHold>,
}

/// The `-shm` file at `path`, opened at most once per file for the life of the process and
/// never closed (see `Shm::file`). (A database replaced under walship may keep its `-shm`
/// file, which a fresh `Db` then shares.)
pub(super) fn shm_handle(path: &Path) -> Option<Arc<Shm>> {
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
