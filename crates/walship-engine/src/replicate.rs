//! The replicator: pin, tail, checkpoint, snapshot (docs/ARCHITECTURE.md, "The pin
//! protocol").
//!
//! One task per database. Each round it scans the WAL after its position, ships the new
//! whole transactions as one segment, hands the pin off around a checkpoint when the WAL is
//! long, and writes a snapshot when the snapshot interval passed and the database changed.
//! Anything it cannot prove continuous starts a new generation with a fresh snapshot.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use walship_format::crypto::{KEY_ID_LEN, id_hex};
use walship_format::key::{self, GenerationId, ObjectKey};
use walship_format::object::{FLAG_LZ4, Kind, ObjectHeader, WalState};
use walship_format::wal::{Checksum, FrameChain, WalHeader};

use crate::AbortOnDrop;
use crate::backoff::{self, Backoff, Report};
use crate::compact::{CompactionOptions, Compactor, Piece, Shipped};
use crate::db::{CheckpointMode, CheckpointResult, Copier, Db};
use crate::error::{EngineError, EngineResult};
use crate::lease::{Lease, LeaseOptions};
use crate::overlay::Overlay;
use crate::replica::{KeyFit, Replica, key_fit};
use crate::retention::RetentionPolicy;
use crate::snapshot::{db_pages_from_file, write_image};
use crate::walfile::{self, Scan};

mod once;
pub use self::once::{OnceReport, once};

/// Raw WAL bytes per segment object, beyond which a sync ships several: what an upload
/// holds in memory stays flat however fast the app writes. (One transaction is never split,
/// so a larger one makes a larger segment, streamed.)
pub const SEGMENT_BYTES: u64 = 32 * 1024 * 1024;

/// How soon to sync again after a handoff (see `Replicator::follow_up`).
const FOLLOW_UP: Duration = Duration::from_millis(5);
/// At most this many of them (reading the WAL only; nothing is sent while it is unchanged).
const FOLLOW_UPS: u32 = 40;
/// Handoffs per sync interval, at most. Between two of them the pin keeps the WAL from
/// restarting, so it grows by all the app writes in between, and the app writes each commit
/// into a part of the file it last touched a handoff ago, out of the CPU's caches (frame
/// writes round a 256 MiB region run at 0.66× the rate of a 4 MiB one). Each handoff makes
/// the app wait for the write lock once (a checkpoint's two fsyncs): four a second bound the
/// WAL to a quarter of a second of writes for a few such waits. Same-run A/Bs of one, two,
/// four and ten a second: docs/benchmarks-archive.md, "Four handoffs per sync interval".
const HANDOFFS_PER_INTERVAL: u32 = 4;
/// The window over which the app's write rate is measured. A load reads light only once a
/// whole window has passed without a heavy round: at the start of a burst the last window
/// still holds the idle spell before it.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// Whether the app writes so few frames that within one sync gap its WAL grows by less than
/// a quarter of the checkpoint threshold: then a handoff needs neither the syncs that bring
/// the pin near the end before the lock nor quick follow-up syncs after it.
fn light_load(frames_per_sec: f64, min_sync_gap: Duration, checkpoint_frames: u32) -> bool {
    frames_per_sec * min_sync_gap.as_secs_f64() < f64::from(heavy_frames(checkpoint_frames))
}

/// A heavy round's worth of frames: a quarter of the checkpoint threshold.
fn heavy_frames(checkpoint_frames: u32) -> u32 {
    (checkpoint_frames / 4).max(1)
}

/// Frames per segment for this WAL (see [`SEGMENT_BYTES`]).
fn segment_frames(h: &WalHeader) -> u32 {
    u32::try_from(SEGMENT_BYTES / h.frame_size().max(1))
        .unwrap_or(u32::MAX)
        .max(1)
}

/// The wait before the `failures`-th retry of a failed start: 1 s, doubling, at most 30 s.
fn start_retry_delay(failures: u32) -> Duration {
    Duration::from_secs(1 << failures.saturating_sub(1).min(5)).min(Duration::from_secs(30))
}

/// Settings of a replicator.
#[derive(Debug, Clone)]
pub struct ReplicateOptions {
    /// Longest time between a commit and its upload when nothing wakes the replicator
    /// earlier (file notifications usually do); also the polling period. Default 1 s.
    pub sync_interval: Duration,
    /// Shortest time between two uploads while the app writes continuously, so a busy app
    /// does not cost one request per transaction. Default 200 ms.
    pub min_sync_gap: Duration,
    /// A new snapshot after this long, if the database changed. Default 5 minutes.
    pub snapshot_interval: Duration,
    /// Hand the pin off around a PASSIVE checkpoint once the WAL holds this many frames (and
    /// at most four times per `sync_interval`). Default 1000.
    pub checkpoint_frames: u32,
    /// How long to wait for the app's writer when taking the write lock for a handoff.
    /// Default 1 s.
    pub lock_timeout: Duration,
    /// Switch a database that is not in WAL mode instead of refusing it.
    pub enable_wal: bool,
    /// Which snapshots to keep; applied after each snapshot upload. Default: keep all.
    pub retention: RetentionPolicy,
    /// Writer fencing (docs/format.md, "Lease"); `None` writes without a lease (only safe
    /// when nothing else can write to the replica). Default: on, 30 s, wait.
    pub lease: Option<LeaseOptions>,
    /// Merging runs of small segments ([`crate::compact`]). Default: on, 16 at a time.
    pub compaction: CompactionOptions,
    /// While the app writes heavily, hold the WAL's checkpoint lock so that its own
    /// checkpoints give up at once and walship's handoffs do them instead (`Db::
    /// hold_checkpoints`). Default: on. Turn it off when the app's connections live in the
    /// replicator's own process: the lock is the process's, so it neither stops their
    /// checkpoints nor can be released without dropping the lock one of them may hold.
    pub defer_app_checkpoints: bool,
    /// A copy back of walship's that takes longer than this is counted as slow
    /// ([`Status::slow_copy_backs`]): the app writes new pages faster than the disk takes
    /// them into the database (large transactions of fresh pages, a slow disk). Copies run
    /// beside the loop, so a slow one holds up neither shipping nor the app; it only
    /// delays the next handoff, and with it the WAL's restart. Default 250 ms.
    pub slow_copy_back: Duration,
    /// The most the WAL may hold (its frames since the last restart, in bytes) before a
    /// handoff stops waiting for shipping and copying to catch up. Past it, the next handoff
    /// takes the write lock and, under it, ships and copies back everything left and
    /// restarts the WAL — holding the app's writes for as long as that takes (seconds under
    /// a load the disk cannot keep up with: the app needs a busy timeout longer than that).
    /// `None` (the default): no limit; under such a load the WAL grows until it drops.
    pub max_wal_bytes: Option<u64>,
    /// Pages of the WAL overlay (the latest shipped frame of each page the WAL holds, which
    /// snapshots read) kept in memory; more are written out beside the database, 8 bytes a
    /// page. Default 229,376 (about 2.3 MiB).
    pub overlay_pages: usize,
    /// Retry a start that fails on a transient error (the first snapshot's upload, usually)
    /// with backoff, the status saying why, until it works or the replicator is cancelled.
    /// Default: on; off for one-shot runs (`snapshot_once`, `once`), whose caller reports
    /// the error.
    pub retry_start: bool,
    /// A storage call that goes this long without progress is reported as stalled (a WARN,
    /// [`Status::stalled_since_ms`], `last_error`) while it goes on. Default 10 s
    /// (`walship_storage::StoreTimeouts::stall_after` of the default timeouts).
    pub stall_after: Duration,
}

impl Default for ReplicateOptions {
    fn default() -> Self {
        ReplicateOptions {
            sync_interval: Duration::from_secs(1),
            min_sync_gap: Duration::from_millis(200),
            snapshot_interval: Duration::from_secs(300),
            checkpoint_frames: 1000,
            lock_timeout: Duration::from_secs(1),
            enable_wal: false,
            retention: RetentionPolicy::default(),
            lease: Some(LeaseOptions::default()),
            compaction: CompactionOptions::default(),
            defer_app_checkpoints: true,
            slow_copy_back: Duration::from_millis(250),
            max_wal_bytes: None,
            overlay_pages: crate::overlay::SPILL_PAGES,
            retry_start: true,
            stall_after: Duration::from_secs(10),
        }
    }
}

/// What the replicator reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// Current generation.
    pub generation: Option<GenerationId>,
    /// Position of the last object uploaded.
    pub position: u64,
    /// When the last upload finished (ms since the epoch).
    pub last_upload_ms: Option<i64>,
    /// When the last snapshot finished (ms since the epoch).
    pub last_snapshot_ms: Option<i64>,
    /// When the replica last held everything committed (ms since the epoch).
    pub last_synced_ms: Option<i64>,
    /// Since when committed data has been waiting to be shipped (ms since the epoch): the
    /// time of the first change to the WAL after the last complete sync (from file
    /// notifications; the time the replicator saw the frames when notifications are off).
    /// `now - unsynced_since_ms` is the replication lag.
    pub unsynced_since_ms: Option<i64>,
    /// The last error, cleared by the next successful sync.
    pub last_error: Option<String>,
    /// Objects uploaded.
    pub objects_uploaded: u64,
    /// Bytes uploaded.
    pub bytes_uploaded: u64,
    /// Generations started by this process.
    pub generations_started: u64,
    /// Checkpoints run by handoffs (all PASSIVE; not those that found the app's own
    /// checkpoint running).
    pub checkpoints: u64,
    /// Blocking checkpoints of the app (FULL, RESTART, TRUNCATE) the pin was moved aside for.
    pub app_checkpoints: u64,
    /// Whether walship holds the WAL's checkpoint lock, doing the app's checkpoints for it
    /// (see [`ReplicateOptions::defer_app_checkpoints`]).
    pub app_checkpoints_deferred: bool,
    /// Copies back that took longer than [`ReplicateOptions::slow_copy_back`].
    pub slow_copy_backs: u64,
    /// Handoffs under a heavy load that flushed the WAL and the database file to disk
    /// before taking the write lock (see `Replicator::flush_before_lock`).
    pub flushes_before_handoff: u64,
    /// Handoffs put off because the app had written more past the shipped end than the
    /// write lock may wait for (the store, or walship, is not keeping up with the app).
    pub handoffs_postponed: u64,
    /// Handoffs that held the app's writes to ship and copy back everything left, because
    /// the WAL had grown past [`ReplicateOptions::max_wal_bytes`].
    pub handoffs_forced: u64,
    /// Snapshots written by this process.
    pub snapshots: u64,
    /// Bytes of the last snapshot uploaded.
    pub last_snapshot_bytes: u64,
    /// How long the last snapshot took, in milliseconds.
    pub last_snapshot_duration_ms: u64,
    /// WAL frames shipped in segments.
    pub frames_shipped: u64,
    /// Size of the `-wal` file at the last sync, in bytes.
    pub wal_bytes: u64,
    /// Failed rounds by kind of error ([`error_kind`]).
    pub errors_by_kind: BTreeMap<&'static str, u64>,
    /// Rounds that failed in a row; 0 after a successful sync.
    pub consecutive_errors: u64,
    /// Set when the replicator lost the replica's lease and stopped: who holds it now
    /// (another replicator writes to the replica; this one ships nothing more).
    pub lease_lost: Option<String>,
    /// Merged segments written ([`crate::compact`]).
    pub segments_merged: u64,
    /// Segments deleted after a merged segment covered them for the keep time.
    pub merged_parts_deleted: u64,
    /// Since when the store has not answered (ms since the epoch): a storage call went
    /// [`ReplicateOptions::stall_after`] without progress, and no call got an answer since
    /// (see `crate::stall`). `None` while the store answers.
    pub stalled_since_ms: Option<i64>,
    /// The call that stalled (``put `key` on s3://...``), while stalled.
    pub stalled_call: Option<String>,
    /// Stalls seen by this process.
    pub stalls: u64,
}

/// A short, stable name for the kind of an error, for metrics and alerts:
/// `unavailable`, `timeout`, `access_denied`, `no_such_bucket`, `conflict`, `not_found`, `io`,
/// `sqlite`, `missing_database`, `corrupt`, `encryption` or `other`.
pub fn error_kind(e: &EngineError) -> &'static str {
    use walship_storage::StorageError as S;
    match e {
        EngineError::Storage(s) => match s {
            S::Unavailable { .. } | S::Injected(_) => "unavailable",
            S::Timeout { .. } => "timeout",
            S::AccessDenied { .. } => "access_denied",
            S::NoSuchBucket { .. } => "no_such_bucket",
            S::AlreadyExists { .. } => "conflict",
            S::NotFound { .. } => "not_found",
            S::Io { .. } => "io",
            _ => "other",
        },
        EngineError::Io { .. } => "io",
        EngineError::Sqlite { .. } => "sqlite",
        EngineError::MissingDatabase { .. } | EngineError::NotWalMode { .. } => "missing_database",
        EngineError::Corrupt { .. } => "corrupt",
        EngineError::Encryption { .. } | EngineError::ForeignKey { .. } => "encryption",
        EngineError::LeaseHeld { .. } | EngineError::LeaseLost { .. } => "conflict",
        _ => "other",
    }
}

enum Command {
    Sync(oneshot::Sender<EngineResult<u64>>),
    Snapshot(oneshot::Sender<EngineResult<u64>>),
}

/// A handle on a running replicator.
#[derive(Debug, Clone)]
pub struct ReplicatorHandle {
    cmd: mpsc::Sender<Command>,
    status: watch::Receiver<Status>,
    cancel: CancellationToken,
    /// First WAL change not yet taken up by a sync round (ms since the epoch; 0 = none).
    dirty: Arc<AtomicI64>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Sync(_) => "Sync",
            Command::Snapshot(_) => "Snapshot",
        })
    }
}

impl ReplicatorHandle {
    /// Ships everything committed so far; returns the replica's position afterwards.
    pub async fn sync(&self) -> EngineResult<u64> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Command::Sync(tx))
            .await
            .map_err(|_| EngineError::Cancelled)?;
        rx.await.map_err(|_| EngineError::Cancelled)?
    }

    /// Writes a snapshot now (after a sync).
    pub async fn snapshot(&self) -> EngineResult<u64> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Command::Snapshot(tx))
            .await
            .map_err(|_| EngineError::Cancelled)?;
        rx.await.map_err(|_| EngineError::Cancelled)?
    }

    /// The latest status. Its `unsynced_since_ms` also counts WAL changes the replicator
    /// has not looked at yet, so the lag it gives is real even between rounds.
    pub fn status(&self) -> Status {
        let mut s = self.status.borrow().clone();
        let mark = self.dirty.load(Ordering::Acquire);
        if mark > 0 {
            s.unsynced_since_ms = Some(s.unsynced_since_ms.map_or(mark, |u| u.min(mark)));
        }
        s
    }

    /// A receiver of status changes.
    pub fn watch(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Asks the replicator to make a final sync and stop.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }
}

/// Starts a replicator on the current tokio runtime. It stops (after a final sync) when
/// `cancel` is cancelled or [`ReplicatorHandle::shutdown`] is called; the join handle
/// yields its result.
pub fn spawn(
    db_path: PathBuf,
    replica: Replica,
    opts: ReplicateOptions,
    cancel: CancellationToken,
) -> (ReplicatorHandle, tokio::task::JoinHandle<EngineResult<()>>) {
    let (cmd_tx, cmd_rx) = mpsc::channel(16);
    let (status_tx, status_rx) = watch::channel(Status::default());
    let dirty = Arc::new(AtomicI64::new(0));
    let handle = ReplicatorHandle {
        cmd: cmd_tx,
        status: status_rx,
        cancel: cancel.clone(),
        dirty: dirty.clone(),
    };
    let span = tracing::info_span!(
        "replicator",
        db = %db_path.display(),
        replica = %replica.describe()
    );
    let (replica, calls) = replica.tracked();
    let watchdog_status = status_tx.clone();
    let join = tokio::spawn(
        async move {
            let _watchdog =
                crate::stall::spawn(calls, watchdog_status, opts.stall_after, replica.describe());
            let r = Replicator::start(
                db_path,
                replica,
                opts,
                status_tx,
                cmd_rx,
                Start::Resume,
                dirty,
                &cancel,
            )
            .await;
            match r {
                Ok(rep) => rep.run(cancel).await,
                // Stopped while waiting for the lease: nothing was written, nothing to sync.
                Err(EngineError::Cancelled) if cancel.is_cancelled() => Ok(()),
                Err(e) => Err(e),
            }
        }
        .instrument(span),
    );
    (handle, join)
}

/// What [`snapshot_once`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneShot {
    /// The new generation.
    pub generation: GenerationId,
    /// The snapshot's position.
    pub position: u64,
    /// Bytes uploaded.
    pub bytes: u64,
    /// Set when a live replicator held the lease: its generation (which the new one ranks
    /// below) and who holds the lease. `None`: the new generation is the newest.
    pub below: Option<(GenerationId, String)>,
}

/// Writes one snapshot of `db_path` into a new generation of `replica`. Safe while a
/// replicator runs: it only reads the database, and writes one object into a generation of
/// its own, so it takes no lease. It reads the lease, though: while a live replicator holds
/// it, the new generation's id goes just below that replicator's generation, which goes on
/// receiving newer data and must stay the one a restore picks (docs/format.md, "Keys").
pub async fn snapshot_once(
    db_path: &Path,
    replica: Replica,
    enable_wal: bool,
) -> EngineResult<OneShot> {
    let below = match crate::lease::live_holder(replica.store().as_ref()).await? {
        Some(holder) => {
            let gens = replica.generations().await?;
            gens.first()
                .and_then(|&live| GenerationId::below(live, &gens).map(|id| (id, live, holder)))
        }
        None => None,
    };
    let (_cmd_tx, cmd_rx) = mpsc::channel(1);
    let (status_tx, status_rx) = watch::channel(Status::default());
    let opts = ReplicateOptions {
        enable_wal,
        lease: None,
        retry_start: false,
        ..Default::default()
    };
    let rep = Replicator::start(
        db_path.to_path_buf(),
        replica,
        opts,
        status_tx,
        cmd_rx,
        Start::New(below.as_ref().map(|b| b.0)),
        Arc::new(AtomicI64::new(0)),
        &CancellationToken::new(),
    )
    .await?;
    let st = status_rx.borrow().clone();
    Ok(OneShot {
        generation: rep.tail.generation,
        position: rep.tail.position,
        bytes: st.bytes_uploaded,
        below: below.map(|(_, live, holder)| (live, holder)),
    })
}

/// How a replicator begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Continue the replica's newest generation when the WAL provably continues it (and the
    /// lease allows it); otherwise start a generation above every existing one.
    Resume,
    /// Start a new generation: with this id, or (`None`) above every existing one.
    New(Option<GenerationId>),
}

/// The replicator's view of the log: what it has shipped (or queued) and how it got there.
#[derive(Debug, Clone)]
struct Tail {
    generation: GenerationId,
    /// WAL incarnations seen in this generation.
    epoch: u32,
    /// Header of the current incarnation; `None` while the database has no WAL.
    hdr: Option<WalHeader>,
    /// Chain after the last shipped frame of the current incarnation.
    chain: Option<FrameChain>,
    /// Database size at the last shipped commit.
    db_pages: u32,
    page_size: u32,
    /// End position of the last object.
    position: u64,
    /// WAL state at `position` (goes into object headers).
    pos_state: WalState,
    /// Latest shipped frame of each page in the current incarnation.
    overlay: Overlay,
    /// Set when the pin was taken with everything up to the WAL's end shipped, in a way that
    /// proves its read mark is either a real one or mark 0 at that end (under the write lock,
    /// or by `yield_to_app_checkpoint`): the incarnation and frame count at that moment. A
    /// WAL restart seen while the tail is still there is provably continuous.
    clean_pin_at: Option<(Option<(u32, u32)>, u32)>,
}

impl Tail {
    /// A copy without the overlay, for looking at the WAL: the overlay can hold hundreds of
    /// thousands of pages, and nothing but a snapshot reads it.
    fn without_overlay(&self) -> Tail {
        Tail {
            generation: self.generation,
            epoch: self.epoch,
            hdr: self.hdr,
            chain: self.chain,
            db_pages: self.db_pages,
            page_size: self.page_size,
            position: self.position,
            pos_state: self.pos_state,
            overlay: Overlay::default(),
            clean_pin_at: self.clean_pin_at,
        }
    }

    fn frames(&self) -> u32 {
        self.chain.map_or(0, |c| c.frames())
    }

    fn salts(&self) -> Option<(u32, u32)> {
        self.hdr.map(|h| (h.salt1, h.salt2))
    }

    fn wal_state_now(&self) -> WalState {
        match (self.hdr, self.chain) {
            (Some(h), Some(c)) => WalState {
                magic: h.magic,
                checkpoint_seq: h.checkpoint_seq,
                salt1: h.salt1,
                salt2: h.salt2,
                checksum: c.checksum(),
            },
            _ => WalState::default(),
        }
    }
}

/// What a look at the WAL found.
enum Observed {
    Nothing,
    Frames(Scan),
    Break(String),
}

struct Replicator {
    db: Arc<Mutex<Db>>,
    db_path: PathBuf,
    wal_path: PathBuf,
    replica: Replica,
    opts: ReplicateOptions,
    tail: Tail,
    status: watch::Sender<Status>,
    cmds: mpsc::Receiver<Command>,
    wake: Arc<Notify>,
    /// Wakes the loop on WAL changes; `None`: polling only.
    watcher: Option<Watcher>,
    /// The replica's lease, when fencing is on.
    lease: Option<Lease>,
    /// Set when the lease was lost (replica, new holder): the replicator stops.
    lease_lost: Option<(String, String)>,
    last_snapshot: Instant,
    changed_since_snapshot: bool,
    /// (epoch, frames) at the last handoff: none again until the WAL moved on.
    handoff_at: (u32, u32),
    /// When the last handoff ran.
    last_handoff: Instant,
    /// Transactions shipped since the current pin's read mark is known to be behind the
    /// shipped end (see `maybe_advance_pin`).
    commits_past_pin: u32,
    /// Set when the pin moved in this sync: its read mark is bounded only once the WAL has
    /// been read after it.
    pin_bound_pending: bool,
    /// The WAL's published end (salts, frames) read right after `maybe_advance_pin` last
    /// moved the pin, for as long as that pin stays: its read mark is a real one (never the
    /// "WAL ignored" mark 0) at or before this end, so once the shipped end reaches it the
    /// mark is bounded even in the middle of a long sync. `None` whenever the pin was taken
    /// any other way.
    mark_bound: Option<((u32, u32), u32)>,
    /// The pin moved since the last checkpoint walship ran.
    pin_moved: bool,
    /// Frames shipped by the last round: a measure of the write load.
    round_frames: u32,
    /// The app's write rate, frames per second over the last second or more of rounds
    /// (`rate_since`, `rate_frames`: the window being counted).
    frames_per_sec: f64,
    rate_since: Instant,
    rate_frames: u64,
    /// When a round last shipped a heavy load's worth (see `heavy_round`).
    heavy_at: Option<Instant>,
    /// A handoff left the pin on mark 0: sync again shortly, this many times at most, until
    /// it moves.
    follow_up: u32,
    /// When the last segment's upload began: `min_sync_gap` runs from there. A round that
    /// found nothing to ship does not count, or the first commit of a burst after an idle
    /// spell would wait out the gap since an idle round (the app pays for that wait: its
    /// checkpoints past the threshold stop at the pin until walship ships and moves it).
    last_upload: Instant,
    /// Set by file notifications at the first WAL change after it was last taken.
    dirty: Arc<AtomicI64>,
    /// The oldest WAL change taken from `dirty` and not yet shipped.
    pending_since: Option<i64>,
    /// The compaction task and what feeds it the segments shipped; `None` when off.
    compactor: Option<(mpsc::Sender<Shipped>, AbortOnDrop)>,
    /// What a handoff read under the write lock and has not uploaded yet (its upload
    /// failed): shipped before anything else.
    residue: Option<Residue>,
    /// The id a new generation takes (a one-shot snapshot's below a live replicator's);
    /// `None`: above every existing one.
    new_generation_id: Option<GenerationId>,
    /// The connection that copies the WAL back beside the loop (opened at its first copy),
    /// and the copy in flight (see `copy_back_beside`).
    copier: Option<Arc<Mutex<Copier>>>,
    copy_task: Option<JoinHandle<EngineResult<(CheckpointResult, Duration)>>>,
}

/// What the locked part of a handoff did.
struct Locked {
    /// Frames read under the lock, to upload now.
    residue: Option<Residue>,
    /// Whether it copied everything back and left the clean pin.
    checkpointed: bool,
}

/// The frames a handoff read under the write lock, to upload once the lock is released.
struct Residue {
    generation: GenerationId,
    scan: Scan,
    body: Arc<Vec<u8>>,
}

/// The most a handoff reads into memory under the write lock; with more left to ship, the
/// handoff waits for a later round.
const RESIDUE_LIMIT: u64 = 8 * 1024 * 1024;

/// How far the WAL's end must be past the pin's mark for the pin to move without waiting for
/// shipping (see `Replicator::maybe_advance_pin`): 32 MiB of 4 KiB pages. Each move lets
/// one of the app's own checkpoints copy back about that much (tens of milliseconds inside
/// one commit); a smaller step makes more of its commits pay for one (at SQLite's default
/// of 1000 frames, one commit in fourteen of 256 KiB transactions, which lifts the app's
/// p99 to a checkpoint's cost), a larger one makes each longer.
const PIN_STEP_FRAMES: u32 = 8192;

/// The most frames not yet copied back that a handoff copies in the loop before it takes the
/// write lock (64 MiB of 4 KiB pages: a few hundred milliseconds on a disk the app keeps
/// busy); with more, the copy goes on beside the loop and the handoff waits for a later
/// round (see `Replicator::too_much_to_copy_back`).
const COPY_BACK_LIMIT_FRAMES: u32 = 2 * PIN_STEP_FRAMES;

/// How often the WAL index is read while waiting out `min_sync_gap` with the app's
/// checkpoints its own (see `Replicator::wait_out_gap`): a few hundred frames at the fastest
/// small-transaction rates.
const SURGE_POLL: Duration = Duration::from_millis(5);

/// Snapshots at least this large (a second or more of uploading) hold the checkpoint lock
/// while they upload (see `Replicator::write_snapshot`).
const LONG_SNAPSHOT_BYTES: u64 = 64 * 1024 * 1024;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What the replica's newest object says about where it ended.
#[derive(Debug, Clone, Copy)]
struct ReplicaEnd {
    generation: GenerationId,
    header: ObjectHeader,
    /// The id of the key the object is encrypted with; `None`: not encrypted.
    key_id: Option<[u8; KEY_ID_LEN]>,
}

async fn replica_end(
    replica: &Replica,
) -> EngineResult<(Option<ReplicaEnd>, Option<GenerationId>)> {
    let gens = replica.generations().await?;
    let newest = gens.first().copied();
    let Some(generation) = newest else {
        return Ok((None, None));
    };
    let objs = replica.objects(generation).await?;
    // The end of the chain from the newest snapshot.
    let Some(snap) = objs.snapshots.first() else {
        return Ok((None, newest));
    };
    let ObjectKey::Snapshot { position, .. } = snap.key else {
        return Ok((None, newest));
    };
    let mut end = position;
    let mut last_name = snap.name.clone();
    let chain = crate::replica::chain(&objs.segments, position, i64::MAX, &Default::default());
    if let Some(last) = chain.last()
        && let ObjectKey::Segment { end: e, .. } = last.key
    {
        end = e;
        last_name = last.name.clone();
    }
    match replica.read_header_and_key_id(&last_name).await {
        Ok((header, key_id)) if header.generation == generation.0 && header.end == end => Ok((
            Some(ReplicaEnd {
                generation,
                header,
                key_id,
            }),
            newest,
        )),
        Ok(_) | Err(EngineError::Corrupt { .. }) => Ok((None, newest)),
        Err(e) => Err(e),
    }
}

/// How this replicator's keys fit `generation`, whose objects are encrypted with `key_id`
/// ([`key_fit`]); an error when it must not write to the replica at all.
fn fit_keys(
    replica: &Replica,
    generation: GenerationId,
    key_id: Option<[u8; KEY_ID_LEN]>,
) -> EngineResult<KeyFit> {
    let keys = replica.keys().map(|k| k.as_ref());
    match key_fit(key_id, keys) {
        KeyFit::Foreign => Err(EngineError::ForeignKey {
            replica: replica.describe(),
            generation: generation.to_string(),
            key_id: key_id.as_ref().map_or_else(String::new, id_hex),
            writer: keys.and_then(|k| k.writer()).map(|k| k.id_hex()),
        }),
        fit => Ok(fit),
    }
}

/// The replica's end if this replicator may continue its generation by its keys; `None`
/// when it starts a new one.
fn end_under_same_key(replica: &Replica, end: ReplicaEnd) -> EngineResult<Option<ReplicaEnd>> {
    match fit_keys(replica, end.generation, end.key_id)? {
        KeyFit::Same => Ok(Some(end)),
        _ => {
            tracing::info!(generation = %end.generation, key_id = end.key_id.as_ref().map_or_else(|| "none".to_string(), id_hex), "the newest generation is under another key: starting a new one");
            Ok(None)
        }
    }
}

/// The result of taking a clean pin and reading the WAL from its start.
struct Established {
    hdr: Option<WalHeader>,
    /// What the WAL holds; its frames only if they are few (see `frames_kept`).
    scan: Option<Scan>,
    /// Whether `scan` holds every frame it found (at most a residue's worth is kept).
    frames_kept: bool,
    /// The overlay of every committed frame of the WAL (for a new generation).
    overlay: Overlay,
    /// At the frame a resumed replica ends at (see [`establish`]): its checksum and the
    /// overlay of the frames up to it.
    resume_at: Option<ResumePoint>,
    page_size: u32,
    db_pages: u32,
    clean: bool,
    /// The bytes of every frame of `scan`, read under the write lock when the WAL was
    /// completely copied back (see [`establish`]).
    body: Option<Vec<u8>>,
}

/// Where the replica to resume ends, as seen in the WAL.
struct ResumePoint {
    frames: u32,
    checksum: walship_format::wal::Checksum,
    overlay: Overlay,
}

/// Takes a clean pin and reads the WAL from its start, filling `overlay` (empty, as the
/// replicator makes them) with every committed frame. `resume_frames`: the frame count of
/// the incarnation at the replica's end, if it may be resumed; the WAL's state there is
/// kept too. Nothing here grows with the WAL but the overlay, which spills to disk.
fn establish(
    db: &mut Db,
    lock_timeout: Duration,
    overlay: Overlay,
    resume_frames: Option<u32>,
) -> EngineResult<Established> {
    // Take the write lock so nothing is appended while the pin is re-taken and the WAL read.
    // An old pin (after a break) proves nothing for what follows, and an app's blocking
    // checkpoint holding the lock would wait for it: let it go first.
    db.unpin()?;
    let mut clean = false;
    for _ in 0..10 {
        if db.lock(lock_timeout)? {
            clean = true;
            break;
        }
    }
    if !clean {
        tracing::warn!(db = %db.path().display(), "could not take the write lock; pinning without it");
    }
    let pinned = (|| {
        db.unpin()?;
        db.pin()?;
        walfile::read_header(&db.wal_path()).map_err(|e| EngineError::io("read WAL header", e))
    })();
    let hdr = match pinned {
        Ok(h) => h,
        Err(e) => {
            db.unlock()?;
            return Err(e);
        }
    };
    // With frames not yet copied back, the pin holds a read mark (not mark 0), so the WAL
    // cannot restart and its frames up to the end published now stay as they are: read them
    // after the lock is released. The app's writes would otherwise wait for a read of the
    // whole WAL (0.8 s for 5 GB from the page cache; seconds per GB from the disk).
    let end_now = db
        .wal_index()
        .filter(|ix| hdr.is_some_and(|h| ix.salts == (h.salt1, h.salt2)))
        .filter(|ix| ix.backfilled < ix.max_frame)
        .map(|ix| ix.max_frame);
    if clean && let Some(end) = end_now {
        db.unlock()?;
        return read_wal(db, hdr, end, false, clean, overlay, resume_frames);
    }
    let r = read_wal(db, hdr, u32::MAX, clean, clean, overlay, resume_frames);
    db.unlock()?;
    r
}

/// Reads the WAL under the pin, up to `limit` frames, for [`establish`]; `locked`: the
/// write lock is held (what a WAL completely copied back needs, below).
fn read_wal(
    db: &mut Db,
    hdr: Option<WalHeader>,
    limit: u32,
    locked: bool,
    clean: bool,
    mut overlay: Overlay,
    resume_frames: Option<u32>,
) -> EngineResult<Established> {
    let t0 = Instant::now();
    let wal_path = db.wal_path();
    let mut resume_at = None;
    let mut frames_kept = true;
    let scan = match &hdr {
        Some(h) => {
            // Only a residue's worth of frames is ever read back from the list.
            let keep = usize::try_from(RESIDUE_LIMIT / h.frame_size().max(1)).unwrap_or(0);
            let (s, kept) = walfile::scan_visiting(
                &wal_path,
                h,
                FrameChain::from_header(h),
                limit,
                keep,
                &mut |f| {
                    overlay.insert(f.pgno, f.index);
                    if resume_frames == Some(f.index) {
                        resume_at = Some(ResumePoint {
                            frames: f.index,
                            checksum: f.checksum,
                            overlay: overlay.clone(),
                        });
                    }
                },
            )
            .map_err(|e| EngineError::io("read WAL", e))?;
            frames_kept = kept;
            Some(s)
        }
        None => None,
    };
    let page_size = match &hdr {
        Some(h) => h.page_size,
        None => db.page_size()?,
    };
    let db_pages = match scan.as_ref().and_then(|s| s.db_pages) {
        Some(p) => p,
        None => db_pages_from_file(&db.file(), page_size)
            .map_err(|e| EngineError::io("read database header", e))?,
    };
    // A WAL completely copied back gives the pin read mark 0, which does not stop the
    // app from restarting the WAL as soon as the lock is released: frames a resumed
    // tail has not shipped yet would be overwritten before the first sync reads them.
    // Read them now (a handoff's residue's worth at most) so they ship from memory.
    let mut body = None;
    if locked
        && let (Some(h), Some(sc)) = (&hdr, &scan)
        && frames_kept
        && !sc.frames.is_empty()
        && db
            .wal_index()
            .is_some_and(|ix| ix.backfilled == ix.max_frame && ix.max_frame == sc.end())
    {
        let len = sc.frames.len() as u64 * h.frame_size();
        if len <= RESIDUE_LIMIT {
            let mut b = Vec::with_capacity(len as usize);
            walfile::copy_frames(&wal_path, h, &sc.frames, &mut b)
                .map_err(|e| EngineError::io("read WAL", e))?;
            body = Some(b);
        }
    }
    let elapsed_ms = t0.elapsed().as_millis() as u64;
    tracing::debug!(db = %db.path().display(), frames = scan.as_ref().map_or(0, |s| s.end()), locked, elapsed_ms, "WAL read at the start");
    Ok(Established {
        hdr,
        scan,
        frames_kept,
        overlay,
        resume_at,
        page_size,
        db_pages,
        clean,
        body,
    })
}

impl Replicator {
    #[allow(clippy::too_many_arguments)]
    async fn start(
        db_path: PathBuf,
        replica: Replica,
        opts: ReplicateOptions,
        status: watch::Sender<Status>,
        cmds: mpsc::Receiver<Command>,
        start: Start,
        dirty: Arc<AtomicI64>,
        cancel: &CancellationToken,
    ) -> EngineResult<Replicator> {
        let p = db_path.clone();
        let enable = opts.enable_wal;
        let db = tokio::task::spawn_blocking(move || Db::open(&p, enable)).await??;
        let wal_path = db.wal_path();
        let db = Arc::new(Mutex::new(db));
        // Without the key of the replica's newest generation, refuse before the lease: neither
        // wait for nor take over a replicator that has it.
        if let Some((generation, key_id)) = replica.newest_generation_key().await? {
            fit_keys(&replica, generation, key_id)?;
        }
        // Only the lease holder looks at where the replica ended and writes to it.
        let (lease, may_resume) = match &opts.lease {
            Some(lo) => {
                let (lease, got) =
                    Lease::acquire(replica.store().clone(), lo.clone(), cancel).await?;
                (Some(lease), got.may_resume)
            }
            None => (None, true),
        };
        let wake = Arc::new(Notify::new());
        // The watcher wakes the loop at most every quarter of the sync gap; the loop decides
        // whether to wait out the rest.
        let watcher = watch_files(&db_path, wake.clone(), dirty.clone(), opts.min_sync_gap / 4);
        let (end, newest) = replica_end(&replica).await?;
        let end = match end.map(|e| end_under_same_key(&replica, e)).transpose() {
            Ok(end) => end.flatten(),
            Err(e) => {
                // Refused under the lease (the newest generation changed while it was awaited,
                // or an older walship left it mixed). Nothing was written: the next
                // replicator, given the key, goes on at once.
                if let Some(mut lease) = lease
                    && let Err(error) = lease.release().await
                {
                    tracing::warn!(%error, "could not release the lease");
                }
                return Err(e);
            }
        };
        let end = if start != Start::Resume || !may_resume {
            None
        } else {
            end
        };
        let tail = Tail {
            generation: GenerationId(0),
            epoch: 0,
            hdr: None,
            chain: None,
            db_pages: 0,
            page_size: 0,
            position: 0,
            pos_state: WalState::default(),
            overlay: Overlay::default(),
            clean_pin_at: None,
        };
        let compactor = opts.compaction.enabled().then(|| {
            let (tx, rx) = mpsc::channel(1024);
            let c = Compactor::new(
                replica.clone(),
                opts.compaction.clone(),
                status.clone(),
                db_path.display().to_string(),
            );
            (tx, AbortOnDrop(tokio::spawn(c.run(rx).in_current_span())))
        });
        let mut rep = Replicator {
            db,
            db_path,
            wal_path,
            replica,
            opts,
            tail,
            status,
            cmds,
            wake,
            watcher,
            lease,
            lease_lost: None,
            last_snapshot: Instant::now(),
            changed_since_snapshot: false,
            handoff_at: (u32::MAX, 0),
            last_handoff: Instant::now(),
            commits_past_pin: 0,
            pin_bound_pending: false,
            mark_bound: None,
            pin_moved: false,
            round_frames: 0,
            frames_per_sec: 0.0,
            rate_since: Instant::now(),
            rate_frames: 0,
            heavy_at: None,
            follow_up: 0,
            last_upload: Instant::now(),
            copier: None,
            copy_task: None,
            dirty,
            pending_since: None,
            compactor,
            residue: None,
            new_generation_id: match start {
                Start::New(id) => id,
                Start::Resume => None,
            },
        };
        // The first snapshot reads WAL frames a restart may overwrite when the pin sits on a
        // completely checkpointed WAL (read mark 0): take the pin again and start over.
        let mut tries = 0;
        let mut failures = 0;
        loop {
            match rep.begin(end, newest).await {
                Err(e) if e.is_wal_changed() && tries < 5 => {
                    tries += 1;
                    tracing::debug!(db = %rep.span_db(), error = %e, "WAL restarted during the first snapshot; again");
                }
                // A store that fails for a while (or answers in a way that does not parse)
                // does not end the replicator: the status says why it is not up yet.
                Err(e) if e.is_transient() && rep.opts.retry_start => {
                    failures += 1;
                    let delay = start_retry_delay(failures);
                    rep.start_failed(&e, failures, delay);
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(e),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                r => break r?,
            }
        }
        Ok(rep)
    }

    /// Reports a failed start (the first snapshot, usually), to be retried after `delay`.
    fn start_failed(&self, e: &EngineError, failures: u32, delay: Duration) {
        tracing::warn!(db = %self.span_db(), error = %e, failures, retry_in_ms = delay.as_millis() as u64, "could not start replicating; retrying");
        let (msg, kind) = (e.to_string(), error_kind(e));
        self.publish(|s| {
            s.last_error = Some(msg);
            *s.errors_by_kind.entry(kind).or_default() += 1;
            s.consecutive_errors += 1;
        });
    }

    /// Where the WAL overlay writes the pages it does not keep in memory: beside the
    /// database, on the volume that holds its WAL.
    fn overlay_dir(&self) -> PathBuf {
        match self.db_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    fn span_db(&self) -> String {
        self.db_path.display().to_string()
    }

    /// Takes a clean pin and either resumes the replica's newest generation (when the WAL
    /// on disk provably continues it) or starts a new generation with a snapshot.
    async fn begin(
        &mut self,
        end: Option<ReplicaEnd>,
        newest: Option<GenerationId>,
    ) -> EngineResult<()> {
        // Frames of the generation being left behind are not shipped into the next.
        self.residue = None;
        let timeout = self.opts.lock_timeout;
        let overlay = Overlay::spilling_every(&self.overlay_dir(), self.opts.overlay_pages);
        let resume_frames = end.as_ref().map(|e| key::split_position(e.header.end).1);
        let mut est = self
            .on_db(move |db| establish(db, timeout, overlay, resume_frames))
            .await?;
        // The pin's bound is the WAL end read under the lock; a resumed tail ships the
        // frames before it with the next sync, and they must not count as past it.
        self.commits_past_pin = 0;
        self.pin_bound_pending = true;
        self.mark_bound = None;
        let after_segments = end.is_some_and(|e| e.header.kind.has_frames());
        let resumed = end.and_then(|end| self.try_resume(&mut est, end));
        match resumed {
            Some(tail) => {
                tracing::info!(db = %self.span_db(), generation = %tail.generation, position = tail.position, clean = est.clean, wal_end = est.scan.as_ref().map_or(0, |s| s.end()), "resuming replica");
                self.residue = unshipped_residue(&mut est, &tail);
                self.tail = tail;
                // A snapshot is due only if segments were shipped after the newest one.
                self.changed_since_snapshot = after_segments;
                self.publish(|s| s.generation = Some(self.tail.generation));
                Ok(())
            }
            None => self.new_generation(est, newest).await,
        }
    }

    fn try_resume(&self, est: &mut Established, end: ReplicaEnd) -> Option<Tail> {
        let h = est.hdr?;
        let oh = end.header;
        if oh.page_size != est.page_size || oh.wal.salt1 != h.salt1 || oh.wal.salt2 != h.salt2 {
            return None;
        }
        if oh.wal.checkpoint_seq != h.checkpoint_seq {
            return None;
        }
        let (epoch, frames) = key::split_position(oh.end);
        let wal_end = est.scan.as_ref()?.end();
        let (checksum, overlay) = if frames == 0 {
            let empty = Overlay::spilling_every(&self.overlay_dir(), self.opts.overlay_pages);
            (h.checksum, empty)
        } else {
            let at = est.resume_at.take().filter(|r| r.frames == frames)?;
            (at.checksum, at.overlay)
        };
        if checksum != oh.wal.checksum {
            return None;
        }
        Some(Tail {
            generation: end.generation,
            epoch,
            hdr: Some(h),
            chain: Some(FrameChain::resume(
                h.big_endian(),
                (h.salt1, h.salt2),
                h.page_size,
                checksum,
                frames,
            )),
            db_pages: oh.db_pages,
            page_size: est.page_size,
            position: oh.end,
            pos_state: oh.wal,
            overlay,
            clean_pin_at: est.clean.then_some((Some((h.salt1, h.salt2)), wal_end)),
        })
    }

    async fn new_generation(
        &mut self,
        est: Established,
        newest: Option<GenerationId>,
    ) -> EngineResult<()> {
        let rand: u32 = rand::random();
        let generation = self
            .new_generation_id
            .unwrap_or_else(|| GenerationId::new_after(now_ms(), rand, newest));
        let frames = est.scan.as_ref().map_or(0, |s| s.end());
        let overlay = est.overlay;
        let chain = est.scan.as_ref().map(|s| s.chain);
        let mut tail = Tail {
            generation,
            epoch: 0,
            hdr: est.hdr,
            chain,
            db_pages: est.db_pages,
            page_size: est.page_size,
            position: key::position(0, frames),
            pos_state: WalState::default(),
            overlay,
            clean_pin_at: est
                .clean
                .then(|| (est.hdr.map(|h| (h.salt1, h.salt2)), frames)),
        };
        tail.pos_state = tail.wal_state_now();
        tracing::info!(db = %self.span_db(), %generation, position = tail.position, pages = tail.db_pages, "starting a new generation");
        // The generation exists once its snapshot does: if the snapshot fails, keep the old
        // tail (the next sync sees the break again and starts over) rather than ship
        // segments into a generation that has no snapshot.
        let old = std::mem::replace(&mut self.tail, tail);
        if let Err(e) = self.write_snapshot().await {
            self.tail = old;
            return Err(e);
        }
        self.publish(|s| {
            s.generations_started += 1;
            s.generation = Some(generation);
        });
        Ok(())
    }

    /// Runs blocking work on the database handle, off the async runtime.
    async fn on_db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Db) -> EngineResult<T> + Send + 'static,
    ) -> EngineResult<T> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut db = db
                .lock()
                .map_err(|_| EngineError::Task("db lock poisoned".into()))?;
            f(&mut db)
        })
        .await?
    }

    fn publish(&self, f: impl FnOnce(&mut Status)) {
        self.status.send_modify(f);
    }

    /// Publishes whether the app's checkpoints are deferred, when that changed.
    fn publish_deferred(&self, held: bool) {
        self.status.send_if_modified(|s| {
            let changed = s.app_checkpoints_deferred != held;
            s.app_checkpoints_deferred = held;
            changed
        });
    }

    /// Uploads a snapshot of the tail's position. The pin must be held and not handed off
    /// until it finishes (the loop is sequential, so it is).
    async fn write_snapshot(&mut self) -> EngineResult<u64> {
        self.ensure_lease().await?;
        let raw_len = u64::from(self.tail.db_pages) * u64::from(self.tail.page_size);
        if self.opts.defer_app_checkpoints && raw_len >= LONG_SNAPSHOT_BYTES {
            // The pin cannot move until the upload ends, and past its autocheckpoint
            // threshold every commit of the app would run a checkpoint that stops at it.
            // The next round lets go of the lock if the app writes little.
            self.finish_copy().await?;
            let held = self.on_db(|db| Ok(db.hold_checkpoints())).await?;
            tracing::debug!(db = %self.span_db(), held, bytes = raw_len, "app checkpoints deferred for the snapshot");
            self.publish_deferred(true);
        }
        let t0 = Instant::now();
        let tail = &self.tail;
        let ts = now_ms();
        let header = ObjectHeader {
            kind: Kind::Snapshot,
            flags: FLAG_LZ4,
            generation: tail.generation.0,
            start: tail.position,
            end: tail.position,
            page_size: tail.page_size,
            db_pages: tail.db_pages,
            timestamp_ms: ts,
            wal: tail.pos_state,
            start_checksum: Checksum::default(),
            frames: 0,
            raw_len: u64::from(tail.db_pages) * u64::from(tail.page_size),
        };
        let key = ObjectKey::Snapshot {
            generation: tail.generation,
            position: tail.position,
            timestamp_ms: ts,
        }
        .format();
        let db_file = self
            .db
            .lock()
            .map_err(|_| EngineError::Task("db lock poisoned".into()))?
            .file();
        let wal_path = self.wal_path.clone();
        let hdr = tail.hdr;
        let overlay = tail.overlay.clone();
        let (pages, ps) = (tail.db_pages, tail.page_size);
        let bytes = self
            .replica
            .upload(&key, header, move |w| {
                write_image(&db_file, &wal_path, hdr.as_ref(), &overlay, pages, ps, w)
            })
            .await?;
        let elapsed_ms = t0.elapsed().as_millis() as u64;
        tracing::info!(db = %self.span_db(), generation = %self.tail.generation, position = self.tail.position, bytes, elapsed_ms, "snapshot uploaded");
        self.last_snapshot = Instant::now();
        self.changed_since_snapshot = false;
        let done = now_ms();
        self.publish(|s| {
            s.snapshots += 1;
            s.last_snapshot_bytes = bytes;
            s.last_snapshot_duration_ms = elapsed_ms;
            s.last_snapshot_ms = Some(done);
            s.last_upload_ms = Some(done);
            s.objects_uploaded += 1;
            s.bytes_uploaded += bytes;
            s.position = s.position.max(header.end);
        });
        self.apply_retention().await;
        Ok(bytes)
    }

    /// Makes sure this replicator still holds the replica's lease before it writes.
    async fn ensure_lease(&mut self) -> EngineResult<()> {
        let Some(lease) = self.lease.as_mut() else {
            return Ok(());
        };
        let r = lease.ensure().await;
        if let Err(EngineError::LeaseLost { replica, holder }) = &r {
            self.lease_lost = Some((replica.clone(), holder.clone()));
        }
        r
    }

    /// Deletes what the retention policy no longer keeps (after a snapshot upload only, so
    /// an idle database costs nothing). Failures are logged; the next snapshot tries again.
    async fn apply_retention(&mut self) {
        if self.opts.retention.keeps_everything() {
            return;
        }
        if let Err(e) = self.ensure_lease().await {
            tracing::warn!(db = %self.span_db(), error = %e, "retention skipped");
            return;
        }
        let t0 = Instant::now();
        let r = crate::retention::apply(
            &self.replica,
            Some(self.tail.generation),
            now_ms(),
            &self.opts.retention,
        )
        .await;
        let elapsed_ms = t0.elapsed().as_millis() as u64;
        match r {
            Ok(a) if a.deleted > 0 => tracing::info!(
                db = %self.span_db(),
                deleted = a.deleted,
                kept_snapshots = a.kept_snapshots,
                generations_deleted = a.generations_deleted,
                elapsed_ms,
                "retention"
            ),
            Ok(a) => {
                tracing::debug!(db = %self.span_db(), kept_snapshots = a.kept_snapshots, "retention: nothing to delete")
            }
            Err(e) => {
                tracing::warn!(db = %self.span_db(), error = %e, "retention failed; will try again after the next snapshot")
            }
        }
    }

    /// Looks at the WAL (blocking): new frames, a restart, or a break.
    async fn observe(&self) -> EngineResult<Observed> {
        let tail = self.tail.without_overlay();
        let wal_path = self.wal_path.clone();
        self.on_db(move |db| observe_wal(db, &wal_path, &tail))
            .await
    }

    /// Ships everything committed. Returns true if anything was uploaded.
    async fn sync_once(&mut self) -> EngineResult<bool> {
        self.sync_within(None).await
    }

    /// Ships what is committed, stopping between segments once `budget` has passed (the
    /// rest goes with the next round), so that an app writing about as fast as walship
    /// ships cannot keep one sync going for ever: the round's other work (moving the pin,
    /// the handoff that restarts the WAL) must still happen. Returns true if anything was
    /// uploaded.
    async fn sync_within(&mut self, budget: Option<Duration>) -> EngineResult<bool> {
        let t0 = Instant::now();
        let mark = self.dirty.swap(0, Ordering::AcqRel);
        if mark > 0 {
            self.pending_since = Some(self.pending_since.map_or(mark, |p| p.min(mark)));
        }
        let mut shipped = self.ship_residue().await?;
        self.maybe_advance_pin().await?;
        // A restart seen mid-way is handled by observing again; a scan cut at the segment
        // size by shipping the rest in further segments.
        let mut restarts = 0;
        loop {
            match self.observe().await? {
                Observed::Nothing => break,
                Observed::Break(reason) => {
                    tracing::warn!(db = %self.span_db(), generation = %self.tail.generation, %reason, "WAL continuity broken; starting a new generation");
                    self.reopen_if_replaced().await?;
                    let newest = Some(self.tail.generation);
                    self.begin(None, newest).await?;
                    return Ok(true);
                }
                Observed::Frames(scan) => {
                    if !scan.frames.is_empty() {
                        let since = self.pending_since.unwrap_or(i64::MAX).min(now_ms());
                        self.status.send_if_modified(|s| {
                            let new = s.unsynced_since_ms.map_or(since, |u| u.min(since));
                            let changed = s.unsynced_since_ms != Some(new);
                            s.unsynced_since_ms = Some(new);
                            changed
                        });
                    }
                    if let Some(h) = scan_restart_header(&self.tail, &scan) {
                        // The scan is of a new incarnation accepted as continuous.
                        self.tail.epoch += 1;
                        self.tail.hdr = Some(h);
                        self.tail.chain = Some(FrameChain::from_header(&h));
                        self.tail.overlay.clear();
                        // Still the same pin: a further restart under it can only be from
                        // an empty WAL, i.e. before anything of this incarnation is shipped.
                        self.tail.clean_pin_at = Some((Some((h.salt1, h.salt2)), 0));
                        tracing::debug!(db = %self.span_db(), epoch = self.tail.epoch, "WAL restarted; continuing");
                    }
                    if scan.frames.is_empty() {
                        restarts += 1;
                        if restarts >= 3 {
                            break;
                        }
                        continue;
                    }
                    // A round's sync about to ship a heavy round's worth (the first of a
                    // burst after a light spell): defer the app's checkpoints before the
                    // upload rather than after it.
                    if budget.is_some()
                        && scan.frames.len() >= heavy_frames(self.opts.checkpoint_frames) as usize
                        && self.may_defer_early()
                    {
                        self.defer_early().await;
                    }
                    let more = scan.more;
                    self.ship(scan).await?;
                    shipped = true;
                    if !more {
                        break;
                    }
                    // A long sync: the app's checkpoints may copy up to what is shipped.
                    self.maybe_advance_pin().await?;
                    if budget.is_some_and(|b| t0.elapsed() >= b) {
                        return Ok(true);
                    }
                }
            }
        }
        // The WAL was read after the pin moved: its mark is behind the shipped end now.
        self.pin_bound_pending = false;
        let now = now_ms();
        self.pending_since = None;
        let wal_bytes = std::fs::metadata(&self.wal_path).map_or(0, |m| m.len());
        self.publish(|s| {
            s.last_synced_ms = Some(now);
            s.unsynced_since_ms = None;
            s.last_error = None;
            s.consecutive_errors = 0;
            s.wal_bytes = wal_bytes;
        });
        Ok(shipped)
    }

    /// Moves the pin up to the WAL's end once two transactions were shipped past the bound of
    /// its read mark, or once the WAL's end is [`PIN_STEP_FRAMES`] past a real read mark's
    /// bound, however far behind shipping is.
    ///
    /// A read transaction either holds a read mark at some frame (which stops checkpoints
    /// there and keeps the WAL from restarting) or, when the WAL was completely
    /// checkpointed as it began, the "WAL ignored" mark 0 (which stops every checkpoint and
    /// lets the next writer restart the WAL once: the clean pin a handoff leaves). A pin on
    /// mark 0 costs the app dearly once its WAL passes the autocheckpoint threshold: every
    /// commit then runs a checkpoint that sorts the whole WAL index and gives up. A pin on a
    /// read mark costs it nothing (its checkpoints copy up to the mark and stop), and moving
    /// it forward lets the app's checkpoints keep up, as they would without walship.
    ///
    /// The new transaction is taken before the old one ends, so the WAL is never unpinned,
    /// and it can only get mark 0 if the WAL is completely checkpointed at that moment. It is
    /// not: checkpoints stop at the old pin's mark, which is at or before the bound (the WAL
    /// end read after the old pin was taken), and of two transactions shipped past the bound
    /// the first had finished (a writer publishes its commit before the next can start), so
    /// the WAL's committed end is past the old mark. The new mark itself is at or before the
    /// end read right after it, which is what the next bound is.
    ///
    /// When the old pin was moved here (`mark_bound`), its mark is a real one, at or before
    /// that bound, and the WAL cannot restart under it: the WAL index showing the same
    /// salts and a published end past the bound proves the same without shipping anything.
    /// That keeps the pin near the WAL's end while shipping lags far behind (a slow store,
    /// an app writing faster than it uploads), so that the app's own checkpoints copy back
    /// a step at a time, as without walship, rather than everything the app wrote while
    /// walship shipped the previous step — seconds of copying inside one of its commits. A
    /// scheduled snapshot waits meanwhile (`pin_bound_pending`), as for any pin ahead of
    /// the shipped end.
    async fn maybe_advance_pin(&mut self) -> EngineResult<()> {
        let by_commits = !self.pin_bound_pending && self.commits_past_pin >= 2;
        if !by_commits {
            let Some((salts, bound)) = self.mark_bound else {
                return Ok(());
            };
            // A read of the `-shm` file: no blocking task for it (the loop is the only user
            // of the handle; busy, the pin just stays).
            let ix = self.wal_index_now();
            let past = ix.is_some_and(|ix| {
                ix.salts == salts && ix.max_frame >= bound.saturating_add(PIN_STEP_FRAMES)
            });
            if !past {
                return Ok(());
            }
        }
        let ix = self
            .on_db(|db| {
                db.advance_pin()?;
                Ok(db.wal_index())
            })
            .await?;
        self.pin_advanced();
        self.mark_bound = ix.map(|ix| (ix.salts, ix.max_frame));
        self.follow_up = 0;
        Ok(())
    }

    /// Whether the app's current write rate is light (see [`light_load`]), and no round
    /// within the last [`RATE_WINDOW`] was heavy.
    fn light_load(&self) -> bool {
        light_load(
            self.frames_per_sec,
            self.opts.min_sync_gap,
            self.opts.checkpoint_frames,
        ) && self.heavy_at.is_none_or(|t| t.elapsed() >= RATE_WINDOW)
    }

    /// Whether the last round shipped a quarter of `checkpoint_frames` or more: a heavy
    /// write load.
    fn heavy_round(&self) -> bool {
        self.round_frames >= heavy_frames(self.opts.checkpoint_frames)
    }

    /// Bookkeeping after the pin moved: its mark is bounded once the WAL is read again, and
    /// no restart can be proven continuous under it.
    fn pin_advanced(&mut self) {
        self.mark_bound = None;
        self.commits_past_pin = 0;
        self.pin_bound_pending = true;
        self.pin_moved = true;
        self.tail.clean_pin_at = None;
    }

    /// True while another process runs a blocking checkpoint that waits for walship's pin.
    fn app_checkpointing(&self) -> bool {
        self.db
            .try_lock()
            .map(|db| db.app_checkpoint_waiting())
            .unwrap_or(false)
    }

    /// Lets an app's own blocking checkpoint (FULL, RESTART, TRUNCATE), which waits for the
    /// pin, finish — without ever leaving the WAL free to restart past a frame not shipped.
    ///
    /// Called right after a sync, so the pin's read mark is at or before the shipped end S.
    /// The app's checkpoint holds the write lock, so the WAL index shows exactly S frames
    /// published (if not, the app is writing: nothing to do). Then:
    /// 1. unless the index shows everything copied back, the pin moves to the WAL's end (so
    ///    the checkpoint can copy everything), walship ships up to the end read after it
    ///    (the new S) and waits until the index shows all S frames copied back. The moved
    ///    pin is clean at S by the argument of step 2 (the app's checkpoint may well have
    ///    finished copying just before it began);
    /// 2. a new read transaction is taken before the old one ends. It gets read mark 0 only
    ///    if everything published is copied back as it begins; the old pin keeps the copy at
    ///    or before S and S frames were seen published, so that is the WAL at exactly S. A
    ///    pin on mark 0 stops every further copy, so the restart the app's checkpoint does
    ///    next is from S, and any later one is from an empty WAL: this is the clean pin of a
    ///    handoff, proven without holding the write lock. If it got a real read mark instead
    ///    (the app wrote in between), no restart can happen under it at all.
    async fn yield_to_app_checkpoint(&mut self) -> EngineResult<()> {
        let t0 = Instant::now();
        let generation = self.tail.generation;
        let Some(ix) = self.on_db(|db| Ok(db.wal_index())).await? else {
            return Ok(());
        };
        if Some(ix.salts) != self.tail.salts() || ix.max_frame != self.tail.frames() {
            tracing::debug!(db = %self.span_db(), published = ix.max_frame, shipped = self.tail.frames(), "app checkpoint seen while the WAL moves; not yielding");
            return Ok(());
        }
        if ix.backfilled < ix.max_frame {
            self.on_db(Db::advance_pin).await?;
            self.pin_advanced();
            // This new pin is clean at S too: with less than S copied back under the old pin
            // (which stops the copy at or before S), no restart could happen under it; so if
            // the app's checkpoint finished copying just before this read transaction began,
            // it got mark 0 with the WAL at exactly S, and a restart from there is continuous.
            self.tail.clean_pin_at = Some((Some(ix.salts), ix.max_frame));
            self.sync_once().await?;
            if self.tail.generation != generation {
                return Ok(());
            }
            let Some(salts) = self.tail.salts() else {
                return Ok(());
            };
            let frames = self.tail.frames();
            let timeout = self.opts.sync_interval;
            let copied = self
                .on_db(move |db| Ok(db.wait_for_app_backfill(salts, frames, timeout)))
                .await?;
            if !copied {
                tracing::debug!(db = %self.span_db(), position = self.tail.position, "the app's checkpoint has not copied the WAL back; pin left at its end");
                return Ok(());
            }
        }
        let salts = self.tail.salts();
        let frames = self.tail.frames();
        self.on_db(Db::advance_pin).await?;
        self.pin_advanced();
        self.tail.clean_pin_at = Some((salts, frames));
        // Look again soon: the WAL restarts, and the pin should leave mark 0 once the app
        // writes again.
        self.follow_up = FOLLOW_UPS;
        let elapsed_ms = t0.elapsed().as_millis() as u64;
        tracing::info!(db = %self.span_db(), generation = %self.tail.generation, position = self.tail.position, elapsed_ms, "let the app's own checkpoint through");
        self.publish(|s| s.app_checkpoints += 1);
        Ok(())
    }

    /// After the database file was replaced or recreated, opens the new one.
    async fn reopen_if_replaced(&mut self) -> EngineResult<()> {
        let same = self
            .db
            .lock()
            .map_err(|_| EngineError::Task("db lock poisoned".into()))?
            .still_same_file();
        if same {
            return Ok(());
        }
        // The copier's connection is to the old file too.
        self.finish_copy().await?;
        self.copier = None;
        let p = self.db_path.clone();
        let enable = self.opts.enable_wal;
        let db = tokio::task::spawn_blocking(move || Db::open(&p, enable)).await??;
        let old = {
            let mut guard = self
                .db
                .lock()
                .map_err(|_| EngineError::Task("db lock poisoned".into()))?;
            std::mem::replace(&mut *guard, db)
        };
        tokio::task::spawn_blocking(move || drop(old)).await?;
        tracing::info!(db = %self.span_db(), "database file replaced; reopened it");
        Ok(())
    }

    /// Uploads a handoff's residue left by a failed upload, if it still continues the tail.
    async fn ship_residue(&mut self) -> EngineResult<bool> {
        let Some(r) = self.residue.take() else {
            return Ok(false);
        };
        let first = r.scan.frames.first().map(|f| f.index);
        if r.generation != self.tail.generation || first != Some(self.tail.frames() + 1) {
            return Ok(false);
        }
        if let Err(e) = self.ship_with(r.scan.clone(), Some(r.body.clone())).await {
            self.residue = Some(r);
            return Err(e);
        }
        Ok(true)
    }

    async fn ship(&mut self, scan: Scan) -> EngineResult<()> {
        self.ship_with(scan, None).await
    }

    /// Uploads the frames of `scan` as a segment: from `body` when given (read before, under
    /// the write lock), otherwise from the WAL file.
    async fn ship_with(&mut self, scan: Scan, body: Option<Arc<Vec<u8>>>) -> EngineResult<()> {
        self.ensure_lease().await?;
        let t0 = Instant::now();
        let Some(hdr) = self.tail.hdr else {
            return Err(EngineError::Task("frames without a WAL header".into()));
        };
        let start_checksum = self.tail.chain.map_or(hdr.checksum, |c| c.checksum());
        let n = scan.frames.len() as u32;
        let end = key::position(self.tail.epoch, scan.end());
        let wal = WalState {
            magic: hdr.magic,
            checkpoint_seq: hdr.checkpoint_seq,
            salt1: hdr.salt1,
            salt2: hdr.salt2,
            checksum: scan.chain.checksum(),
        };
        let db_pages = scan.db_pages.unwrap_or(self.tail.db_pages);
        let ts = now_ms();
        let header = ObjectHeader {
            kind: Kind::Segment,
            flags: FLAG_LZ4,
            generation: self.tail.generation.0,
            start: self.tail.position,
            end,
            page_size: hdr.page_size,
            db_pages,
            timestamp_ms: ts,
            wal,
            start_checksum,
            frames: n,
            raw_len: u64::from(n) * hdr.frame_size(),
        };
        let key = ObjectKey::Segment {
            generation: self.tail.generation,
            start: self.tail.position,
            end,
            timestamp_ms: ts,
        }
        .format();
        let wal_path = self.wal_path.clone();
        let frames = scan.frames.clone();
        let verify_from = scan.verify.then(|| {
            self.tail
                .chain
                .unwrap_or_else(|| FrameChain::from_header(&hdr))
        });
        let bytes = self
            .replica
            .upload(&key, header, move |w| match (body, verify_from) {
                (Some(body), _) => w.write_all(&body),
                (None, Some(chain)) => {
                    walfile::copy_frames_verified(&wal_path, &hdr, chain, &frames, w)
                }
                (None, None) => walfile::copy_frames(&wal_path, &hdr, &frames, w),
            })
            .await?;
        if let Some((tx, _)) = &self.compactor {
            // A full queue drops the piece: the compactor sees a gap and starts a new run.
            let _ = tx.try_send(Shipped {
                piece: Piece {
                    name: key,
                    header,
                    size: bytes,
                    level: 0,
                },
                write_deadline: self.lease.as_ref().map(Lease::write_deadline),
            });
        }
        for f in &scan.frames {
            self.tail.overlay.insert(f.pgno, f.index);
        }
        if !self.pin_bound_pending {
            self.commits_past_pin = self.commits_past_pin.saturating_add(scan.commits);
        }
        self.tail.chain = Some(scan.chain);
        self.tail.position = end;
        self.tail.pos_state = wal;
        self.tail.db_pages = db_pages;
        if self.pin_bound_pending
            && let Some((salts, frames)) = self.mark_bound
            && self.tail.salts() == Some(salts)
            && self.tail.frames() >= frames
        {
            // Shipped past the end the WAL had when the pin moved: past its mark too.
            self.pin_bound_pending = false;
        }
        self.changed_since_snapshot = true;
        self.last_upload = t0;
        let elapsed_ms = t0.elapsed().as_millis() as u64;
        tracing::info!(db = %self.span_db(), generation = %self.tail.generation, position = end, frames = n, bytes, elapsed_ms, "segment uploaded");
        let done = now_ms();
        self.publish(|s| {
            s.frames_shipped += u64::from(n);
            s.position = end;
            s.last_upload_ms = Some(done);
            s.objects_uploaded += 1;
            s.bytes_uploaded += bytes;
        });
        Ok(())
    }

    /// Hands the pin off around a PASSIVE checkpoint: under the write lock, ship what is
    /// left, release the pin, checkpoint, re-take the pin, release the lock. The pin then
    /// sits on the completely checkpointed WAL, so the app's next write restarts it.
    async fn handoff(&mut self) -> EngineResult<()> {
        // Past the WAL's size limit the handoff waits for nothing: whatever is left to ship
        // and to copy is done under the write lock. (Catching up before the lock cannot
        // work under a load that got the WAL there: the app writes on meanwhile.)
        let forced = self.wal_over_limit();
        if forced {
            self.finish_copy().await?;
        } else if !self.catch_up_before_lock().await? {
            return Ok(());
        }
        if self.app_checkpointing() {
            return self.yield_to_app_checkpoint().await;
        }
        let timeout = self.opts.lock_timeout;
        let got = self.on_db(move |db| db.lock(timeout)).await?;
        self.last_handoff = Instant::now();
        if !got {
            if self.app_checkpointing() {
                return self.yield_to_app_checkpoint().await;
            }
            tracing::debug!(db = %self.span_db(), "app busy; checkpoint postponed");
            return Ok(());
        }
        let t0 = Instant::now();
        let r = self.handoff_locked(forced).await;
        self.on_db(Db::unlock).await?;
        let held_ms = t0.elapsed().as_millis() as u64;
        tracing::debug!(db = %self.span_db(), held_ms, "write lock released");
        let locked = r?;
        if locked.checkpointed {
            // The new pin's bound is the end read under the lock; the residue lies before it
            // and must not count as past it.
            self.commits_past_pin = 0;
            self.pin_bound_pending = true;
        }
        if let Some(residue) = locked.residue {
            self.residue = Some(residue);
            if let Err(e) = self.ship_residue().await {
                self.handoff_at = (self.tail.epoch, self.tail.frames());
                return Err(e);
            }
        }
        if locked.checkpointed {
            self.pin_bound_pending = false;
        }
        self.handoff_at = (self.tail.epoch, self.tail.frames());
        Ok(())
    }

    /// The part of a handoff before the write lock: copies back and ships what can be done
    /// without holding the app up, so that little is left for the lock. `false` if the
    /// handoff is put off (too much left to copy back or to ship).
    async fn catch_up_before_lock(&mut self) -> EngineResult<bool> {
        // A handoff needs everything copied back, and under a heavy load of fresh pages a
        // copy back takes seconds. With more than the copies below would take without
        // holding shipping up, copying goes on beside the loop and the handoff waits.
        if self.too_much_to_copy_back() {
            self.copy_back_beside().await?;
            return Ok(false);
        }
        // First copy back what can be copied without holding the app up: everything up to
        // the pin, which is behind the shipped end. The pin moves at most every other sync
        // (see `maybe_advance_pin`), so three syncs bring it twice near the WAL's end, and
        // what is left for the locked part is what was committed during the last copy.
        self.checkpoint_to_pin().await?;
        // Under a light load what the locked part ships is a few transactions anyway, and
        // each of these syncs would upload an object of its own. The load is judged once,
        // before these syncs: they take the app's write rate with them, and a handoff that
        // copied back ahead as under a heavy load flushes as under one.
        if self.light_load() {
            return Ok(true);
        }
        for _ in 0..3 {
            self.sync_within(Some(self.opts.sync_interval)).await?;
            if self.pin_moved {
                self.checkpoint_to_pin().await?;
            }
        }
        // The app may write faster than these syncs ship. With more left than the lock may
        // wait for, the handoff would be put off under the lock anyway, and the flush would
        // only have made the app's own checkpoints wait for it (its fsyncs queue behind it:
        // stalls of up to 0.9 s measured).
        if self.too_much_unshipped() {
            return Ok(false);
        }
        self.flush_before_lock().await?;
        Ok(!self.too_much_unshipped())
    }

    /// Whether the WAL holds more than [`ReplicateOptions::max_wal_bytes`] (its published
    /// frames since the last restart, from the WAL index).
    fn wal_over_limit(&self) -> bool {
        let (Some(max), Some(hdr)) = (self.opts.max_wal_bytes, self.tail.hdr) else {
            return false;
        };
        let frames = self.wal_index_now().map_or(0, |ix| ix.max_frame);
        u64::from(frames) * hdr.frame_size() > max
    }

    /// Whether the WAL holds more frames not yet copied back than a handoff copies in the loop
    /// ([`COPY_BACK_LIMIT_FRAMES`], from the WAL index); if so, the handoff is put off, and
    /// counted as tried. (With less, a copy beside the loop still running is waited for.)
    fn too_much_to_copy_back(&mut self) -> bool {
        let uncopied = self
            .wal_index_now()
            .filter(|ix| Some(ix.salts) == self.tail.salts())
            .map_or(0, |ix| ix.max_frame.saturating_sub(ix.backfilled));
        if uncopied <= COPY_BACK_LIMIT_FRAMES {
            return false;
        }
        tracing::debug!(db = %self.span_db(), uncopied, copying = self.copying(), "handoff postponed: copying back beside the loop");
        self.last_handoff = Instant::now();
        self.handoff_at = (self.tail.epoch, self.tail.frames());
        self.publish(|s| s.handoffs_postponed += 1);
        true
    }

    /// Whether the app has published more past the shipped end than a handoff may read under
    /// the write lock ([`RESIDUE_LIMIT`]), from the WAL index (no lock, no read of the WAL).
    /// If so, the handoff is put off as it would be under the lock, and counted as tried.
    fn too_much_unshipped(&mut self) -> bool {
        let (Some(hdr), Some((frames, true))) = (self.tail.hdr, self.unshipped_in_index()) else {
            return false;
        };
        let bytes = u64::from(frames) * hdr.frame_size();
        if bytes <= RESIDUE_LIMIT {
            return false;
        }
        tracing::debug!(db = %self.span_db(), bytes, "handoff postponed: more left to ship than the lock may wait for");
        self.last_handoff = Instant::now();
        self.handoff_at = (self.tail.epoch, self.tail.frames());
        self.publish(|s| s.handoffs_postponed += 1);
        true
    }

    /// Writes the WAL and the database file out to disk before a handoff takes the write
    /// lock. The checkpoint under the lock syncs both (SQLite's order: the WAL before
    /// copying back, the database after); an app writing at full speed leaves hundreds of
    /// megabytes of them dirty in the page cache, and flushing that under the lock is most
    /// of the time the app waits there. Flushed here, the syncs under the lock find only
    /// what was written since. (An fsync error is reported to every descriptor open when
    /// it happened, so this one does not hide it from SQLite's own.)
    async fn flush_before_lock(&mut self) -> EngineResult<()> {
        let t0 = Instant::now();
        self.on_db(|db| {
            match File::open(db.wal_path()) {
                Ok(wal) => wal
                    .sync_data()
                    .map_err(|e| EngineError::io("flush the WAL before a handoff", e))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(EngineError::io("open the WAL to flush it", e)),
            }
            // The one descriptor walship keeps on the database file: never open and close
            // another (see `Db::file`).
            db.file()
                .sync_data()
                .map_err(|e| EngineError::io("flush the database before a handoff", e))
        })
        .await?;
        let elapsed_ms = t0.elapsed().as_millis() as u64;
        tracing::debug!(db = %self.span_db(), elapsed_ms, "flushed WAL and database before the handoff");
        self.publish(|s| s.flushes_before_handoff += 1);
        Ok(())
    }

    /// A PASSIVE checkpoint while pinned, in the loop: copies the WAL back up to the pin, in
    /// walship's process rather than in one of the app's commits (the app's own
    /// autocheckpoints then find nothing to do up to the pin). A handoff's copies run here,
    /// after any copy beside the loop ended; between handoffs they run beside it
    /// (`copy_back_beside`).
    async fn checkpoint_to_pin(&mut self) -> EngineResult<()> {
        self.finish_copy().await?;
        self.pin_moved = false;
        let t0 = Instant::now();
        let res = self
            .on_db(|db| db.checkpoint(CheckpointMode::Passive))
            .await?;
        self.copied_back(res, t0.elapsed(), "checkpoint up to the pin");
        Ok(())
    }

    /// Bookkeeping after a copy back: logged, and counted when slower than
    /// `slow_copy_back` (the disk is not keeping up with the app's writes).
    fn copied_back(&mut self, res: CheckpointResult, elapsed: Duration, what: &'static str) {
        let elapsed_ms = elapsed.as_millis() as u64;
        tracing::debug!(db = %self.span_db(), busy = res.busy, log = res.log, checkpointed = res.checkpointed, elapsed_ms, "{what}");
        if elapsed > self.opts.slow_copy_back {
            self.publish(|s| s.slow_copy_backs += 1);
        }
    }

    /// Whether a copy back beside the loop is still running.
    fn copying(&self) -> bool {
        self.copy_task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Waits for the copy back beside the loop, if one was started, and takes its result.
    async fn finish_copy(&mut self) -> EngineResult<()> {
        let Some(task) = self.copy_task.take() else {
            return Ok(());
        };
        let (res, elapsed) = task.await??;
        self.copied_back(res, elapsed, "copied back beside the loop");
        Ok(())
    }

    /// Starts a copy back up to the pin on a blocking thread of its own (a `Copier`, with a
    /// connection of its own), unless one is still running, and returns at once. An app
    /// writing fresh pages at hundreds of MB/s makes each copy back take seconds (the
    /// database's fsync on a disk that also takes the app's WAL); run in the loop, they held
    /// shipping up for as long. Beside it, the loop goes on shipping and moving the pin, and
    /// the copy is just one more checkpointer, as an app's own would be: nothing in the pin
    /// protocol depends on who copies back.
    async fn copy_back_beside(&mut self) -> EngineResult<()> {
        if self.copying() {
            return Ok(());
        }
        self.finish_copy().await?;
        let copier = match &self.copier {
            Some(c) => c.clone(),
            None => {
                let c = Arc::new(Mutex::new(self.on_db(|db| db.copier()).await?));
                self.copier = Some(c.clone());
                c
            }
        };
        self.pin_moved = false;
        self.copy_task = Some(tokio::task::spawn_blocking(move || {
            let t0 = Instant::now();
            let res = copier
                .lock()
                .map_err(|_| EngineError::Task("copier lock poisoned".into()))?
                .checkpoint()?;
            Ok((res, t0.elapsed()))
        }));
        Ok(())
    }

    /// Under the write lock: takes what is left of the WAL, then releases the pin, copies
    /// everything back, and pins again on the completely copied-back WAL. What is left is
    /// read into memory and uploaded once the lock is released (an upload is a round trip
    /// to the store the app would wait for). More than [`RESIDUE_LIMIT`] left means the
    /// store is not keeping up: the handoff is given up for now rather than make the app
    /// wait. A WAL that did anything but grow is synced under the lock as anywhere.
    async fn handoff_locked(&mut self, forced: bool) -> EngineResult<Locked> {
        let generation = self.tail.generation;
        let t0 = Instant::now();
        let mut residue = None;
        match self.observe().await? {
            Observed::Nothing => {}
            Observed::Frames(scan) if scan.header.is_none() => {
                let Some(hdr) = self.tail.hdr else {
                    return Err(EngineError::Task("frames without a WAL header".into()));
                };
                let len = scan.frames.len() as u64 * hdr.frame_size();
                if forced && (scan.more || len > RESIDUE_LIMIT) {
                    // Past the size limit: ship it all now, the app waiting.
                    tracing::info!(db = %self.span_db(), bytes = len, "WAL over its size limit; shipping the rest under the write lock");
                    self.publish(|s| s.handoffs_forced += 1);
                    self.sync_once().await?;
                } else if scan.more || len > RESIDUE_LIMIT {
                    // The store is not keeping up with the app. Uploading this much here
                    // would hold the app up for as long; let it go and hand off later.
                    tracing::debug!(db = %self.span_db(), bytes = len, "handoff postponed: more left to ship than the lock may wait for");
                    self.publish(|s| s.handoffs_postponed += 1);
                    return Ok(Locked {
                        residue: None,
                        checkpointed: false,
                    });
                } else {
                    let (wal_path, frames) = (self.wal_path.clone(), scan.frames.clone());
                    let body = self
                        .on_db(move |_| {
                            let mut body = Vec::with_capacity(len as usize);
                            walfile::copy_frames(&wal_path, &hdr, &frames, &mut body)
                                .map_err(|e| EngineError::io("read WAL", e))?;
                            Ok(body)
                        })
                        .await?;
                    residue = Some(Residue {
                        generation,
                        scan,
                        body: Arc::new(body),
                    });
                }
            }
            _ => {
                self.sync_once().await?;
            }
        }
        let ship_ms = t0.elapsed().as_millis() as u64;
        if self.tail.generation != generation {
            // The sync started a new generation, which took its own clean pin.
            return Ok(Locked {
                residue: None,
                checkpointed: false,
            });
        }
        // The end the WAL must still be at: the residue's, or the tail's.
        let (end_chain, end_frames) = match &residue {
            Some(r) => (Some(r.scan.chain), r.scan.end()),
            None => (self.tail.chain, self.tail.frames()),
        };
        let t1 = Instant::now();
        let wal_path = self.wal_path.clone();
        let salts = self.tail.salts();
        let r = self
            .on_db(move |db| {
                // Still at the end? (Under the lock it cannot move, unless the sync failed.)
                let hdr = walfile::read_header(&wal_path)
                    .map_err(|e| EngineError::io("read WAL header", e))?;
                if hdr.map(|h| (h.salt1, h.salt2)) != salts {
                    return Ok((None, hdr));
                }
                if let (Some(h), Some(c)) = (hdr, end_chain) {
                    let s = walfile::scan(&wal_path, &h, c, 1)
                        .map_err(|e| EngineError::io("read WAL", e))?;
                    if !s.frames.is_empty() {
                        return Ok((None, hdr));
                    }
                }
                db.unpin()?;
                let res = db.checkpoint(CheckpointMode::Passive);
                db.pin()?;
                Ok((Some(res?), hdr))
            })
            .await;
        if !matches!(r, Ok((None, _))) {
            // The pin may have been taken again, on mark 0: no bound holds for it.
            self.mark_bound = None;
        }
        let (res, hdr) = r?;
        let Some(res) = res else {
            // Nothing was released: what was read is shipped as by any sync.
            return Ok(Locked {
                residue,
                checkpointed: false,
            });
        };
        self.tail.clean_pin_at = Some((hdr.map(|h| (h.salt1, h.salt2)), end_frames));
        // Until the pin can move off mark 0 (two transactions of the app shipped), every
        // commit past the app's autocheckpoint threshold pays for a futile checkpoint:
        // look again soon rather than a sync gap later — unless the app writes so little
        // that its WAL cannot get near that threshold within a sync gap, when each look
        // would only upload an object of one transaction.
        self.follow_up = if self.light_load() { 0 } else { FOLLOW_UPS };
        let ckpt_ms = t1.elapsed().as_millis() as u64;
        tracing::debug!(db = %self.span_db(), busy = res.busy, log = res.log, checkpointed = res.checkpointed, ship_ms, ckpt_ms, "checkpoint");
        if !res.busy {
            // Busy: the app's own checkpoint held the checkpoint lock; nothing was copied.
            self.publish(|s| s.checkpoints += 1);
        }
        Ok(Locked {
            residue,
            checkpointed: true,
        })
    }

    /// Logs a failed round as the back-off says (one warning per failure episode, then
    /// reminders) and publishes it in the status.
    fn report_failure(&self, backoff: &mut Backoff, started: Instant, e: &EngineError) {
        let db = self.span_db();
        match backoff.failed(started, Instant::now(), self.opts.sync_interval) {
            Report::First { retry_in } => {
                tracing::warn!(%db, error = %e, retry_in_ms = retry_in.as_millis() as u64, "sync failed; retrying with back-off (up to every {}s) until it works", backoff::MAX_RETRY_DELAY.as_secs());
            }
            Report::Reminder { attempts, over } => {
                tracing::warn!(%db, attempts, error = %e, "still failing: {attempts} attempts over {}: {e}", backoff::human(over));
            }
            Report::Quiet { retry_in } => {
                tracing::debug!(%db, error = %e, retry_in_ms = retry_in.as_millis() as u64, "sync failed again");
            }
        }
        let msg = e.to_string();
        let kind = error_kind(e);
        // Lag only for data known to wait: a failed snapshot or checkpoint after a
        // complete sync leaves nothing unshipped.
        let pending = self.pending_since;
        self.publish(|s| {
            s.last_error = Some(msg);
            *s.errors_by_kind.entry(kind).or_default() += 1;
            s.consecutive_errors += 1;
            if let Some(p) = pending {
                s.unsynced_since_ms = Some(s.unsynced_since_ms.map_or(p, |u| u.min(p)));
            }
        });
    }

    async fn run(mut self, cancel: CancellationToken) -> EngineResult<()> {
        // Without file notifications, poll the WAL as often as a sync may run.
        let period = if self.watcher.is_some() {
            self.opts.sync_interval
        } else {
            self.opts
                .min_sync_gap
                .max(Duration::from_millis(50))
                .min(self.opts.sync_interval)
        };
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // An app's own blocking checkpoint writes nothing to wake the loop: look for one a
        // few times per sync interval (two `fcntl` calls, no request).
        let mut probe = tokio::time::interval(
            (self.opts.sync_interval / 4)
                .clamp(Duration::from_millis(20), Duration::from_millis(250)),
        );
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A failing replica is retried on a back-off schedule, not at every write.
        let mut backoff = Backoff::default();
        loop {
            let mut reply: Option<Command> = None;
            let retry_at = backoff.retry_at().map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
                _ = probe.tick() => {
                    if !self.app_checkpointing() {
                        continue;
                    }
                }
                _ = tokio::time::sleep(FOLLOW_UP), if self.follow_up > 0 => {
                    self.follow_up -= 1;
                }
                _ = self.wake.notified() => {
                    let since = self.last_upload.elapsed();
                    // Under a heavy write load (the last round shipped a good part of a
                    // checkpoint's worth) and right after a handoff, sync at once: the data is
                    // there, and waiting only lets lag and the WAL grow.
                    if since < self.opts.min_sync_gap && !self.heavy_round() && self.follow_up == 0
                        && backoff.may_retry(Instant::now())
                    {
                        let until = tokio::time::Instant::now() + (self.opts.min_sync_gap - since);
                        if self.wait_out_gap(until, &cancel).await {
                            break;
                        }
                    }
                }
                _ = async { if let Some(t) = retry_at { tokio::time::sleep_until(t).await } }, if retry_at.is_some() => {}
                cmd = self.cmds.recv() => reply = cmd,
            }
            // Within a failure episode the loop waits out the back-off; a caller of `sync()`
            // or `snapshot()` is served at once.
            if reply.is_none() && !backoff.may_retry(Instant::now()) {
                continue;
            }
            let started = Instant::now();
            let r = self.round(&reply).await;
            match &r {
                Err(e) if self.lease_lost.is_none() => {
                    self.report_failure(&mut backoff, started, e);
                }
                Err(_) => {}
                Ok(()) => {
                    if let Some(ep) = backoff.succeeded() {
                        tracing::info!(db = %self.span_db(), attempts = ep.attempts, "sync works again after {} failed attempts over {}", ep.attempts, backoff::human(ep.since.elapsed()));
                    }
                }
            }
            match reply {
                Some(Command::Sync(tx)) => {
                    let _ = tx.send(r.map(|()| self.tail.position));
                }
                Some(Command::Snapshot(tx)) => {
                    let r = match r {
                        Ok(()) => self.write_snapshot().await.map(|_| self.tail.position),
                        Err(e) => Err(e),
                    };
                    let _ = tx.send(r);
                }
                None => {}
            }
            if let Some((replica, holder)) = self.lease_lost.take() {
                // Another replicator writes here now: stop without a final sync.
                tracing::error!(db = %self.span_db(), %replica, %holder, "lease lost; stopping");
                let who = holder.clone();
                self.publish(|s| s.lease_lost = Some(who));
                return Err(EngineError::LeaseLost { replica, holder });
            }
        }
        // A copy beside the loop ends before the database's connections close.
        if let Err(e) = self.finish_copy().await {
            tracing::debug!(db = %self.span_db(), error = %e, "copy back beside the loop failed");
        }
        // Final sync: everything committed before the stop is shipped.
        let t0 = Instant::now();
        let r = self.sync_once().await;
        match &r {
            Ok(_) => {
                tracing::info!(db = %self.span_db(), generation = %self.tail.generation, position = self.tail.position, elapsed_ms = t0.elapsed().as_millis() as u64, "final sync done")
            }
            Err(e) => tracing::error!(db = %self.span_db(), error = %e, "final sync failed"),
        }
        self.let_go().await;
        r.map(|_| ())
    }

    /// Stops compaction and releases the lease (unless it was lost), so that a successor
    /// continues at once.
    async fn let_go(&mut self) {
        // No merge may write after the lease is given up.
        self.compactor = None;
        if self.lease_lost.is_none()
            && let Some(lease) = self.lease.as_mut()
            && let Err(e) = lease.release().await
        {
            tracing::warn!(db = %self.span_db(), error = %e, "could not release the lease (a successor waits for it to lapse)");
        }
    }

    /// Sleeps until `until` (true: cancelled first), looking at the WAL index every
    /// [`SURGE_POLL`] while the app's checkpoints are its own: a burst after a light spell
    /// has them deferred as soon as it has written a heavy round's worth, rather than at the
    /// end of the next round. Until then, each of the app's commits past its autocheckpoint
    /// threshold builds SQLite's checkpoint iterator over its whole WAL and gives up at the
    /// pin (at tens of thousands of commits per second, that cost the app three quarters of
    /// its speed for the rest of the gap).
    async fn wait_out_gap(
        &mut self,
        until: tokio::time::Instant,
        cancel: &CancellationToken,
    ) -> bool {
        loop {
            let watch = self.may_defer_early();
            if watch && self.writing_heavily() {
                // The gap itself is still waited out: syncing at once measured worse (the
                // app then shares the machine with back-to-back rounds from its first
                // hundred milliseconds on).
                self.defer_early().await;
            }
            let next = if watch {
                until.min(tokio::time::Instant::now() + SURGE_POLL)
            } else {
                until
            };
            tokio::select! {
                _ = cancel.cancelled() => return true,
                _ = tokio::time::sleep_until(next) => {}
            }
            if next >= until {
                return false;
            }
        }
    }

    /// Whether the app's checkpoints are its own now and could be deferred before the end
    /// of the round (see `defer_early`).
    fn may_defer_early(&self) -> bool {
        self.opts.defer_app_checkpoints && !self.status.borrow().app_checkpoints_deferred
    }

    /// Defers the app's checkpoints now, because the app writes heavily (a round's worth is
    /// waiting to be shipped), as the end of the round would: the rest of the round (reading,
    /// uploading) takes tens of milliseconds at such rates.
    async fn defer_early(&mut self) {
        self.heavy_at = Some(Instant::now());
        if let Err(e) = self.hold_or_release_checkpoints(true).await {
            tracing::debug!(db = %self.span_db(), error = %e, "could not defer the app's checkpoints early");
        }
    }

    /// Whether the app has published a heavy round's worth of frames (see `heavy_round`)
    /// past the shipped end, read in place from the WAL index (false when it is busy).
    fn writing_heavily(&self) -> bool {
        self.unshipped_in_index()
            .is_some_and(|(frames, _)| frames >= heavy_frames(self.opts.checkpoint_frames))
    }

    /// The WAL index read in place (a read of the `-shm` file: no blocking task for it);
    /// `None` while the database handle is busy or there is no index.
    fn wal_index_now(&self) -> Option<crate::db::WalIndex> {
        self.db.try_lock().ok().and_then(|db| db.wal_index())
    }

    /// The frames the app has published past the shipped end, read in place from the WAL
    /// index, and whether the index is of the shipped WAL's incarnation (if not, every frame
    /// it shows counts). None when the index is busy or cannot be read.
    fn unshipped_in_index(&self) -> Option<(u32, bool)> {
        let ix = self.wal_index_now()?;
        Some(if Some(ix.salts) == self.tail.salts() {
            (ix.max_frame.saturating_sub(self.tail.frames()), true)
        } else {
            (ix.max_frame, false)
        })
    }

    async fn round(&mut self, cmd: &Option<Command>) -> EngineResult<()> {
        if !self.db_still_there() {
            return Err(EngineError::MissingDatabase {
                path: self.db_path.clone(),
            });
        }
        let before = self.status.borrow().frames_shipped;
        // A command's caller waits for everything committed before it; a round of the loop
        // ships for at most a sync interval before it moves on.
        let budget = cmd.is_none().then_some(self.opts.sync_interval);
        let shipped = self.sync_within(budget).await;
        let after = self.status.borrow().frames_shipped;
        self.round_frames = u32::try_from(after.saturating_sub(before)).unwrap_or(u32::MAX);
        // A round that shipped little while the app wrote a heavy round's worth during its
        // upload (the first round of a burst) counts as heavy too.
        let surge = shipped.is_ok() && !self.heavy_round() && self.writing_heavily();
        if self.heavy_round() || surge {
            self.heavy_at = Some(Instant::now());
        }
        self.rate_frames += u64::from(self.round_frames);
        let window = self.rate_since.elapsed();
        if window >= RATE_WINDOW {
            self.frames_per_sec = self.rate_frames as f64 / window.as_secs_f64();
            self.rate_frames = 0;
            self.rate_since = Instant::now();
        }
        let shipped = shipped?;
        self.hold_or_release_checkpoints(surge).await?;
        if self.app_checkpointing() {
            // The app's own checkpoint holds the write lock a handoff would wait for, and
            // waits for the pin: let it through instead.
            return self.yield_to_app_checkpoint().await;
        }
        // At most one handoff per `checkpoint_frames` new frames of an incarnation (an app
        // reader can keep a checkpoint from finishing; retrying every round would only churn
        // the write lock), and at most `HANDOFFS_PER_INTERVAL` per sync interval: each one
        // makes the app wait for the write lock once, and between them its WAL grows.
        let (he, hf) = self.handoff_at;
        if self.tail.frames() >= self.opts.checkpoint_frames
            && (he != self.tail.epoch
                || self.tail.frames() >= hf.saturating_add(self.opts.checkpoint_frames))
            && self.last_handoff.elapsed() >= self.opts.sync_interval / HANDOFFS_PER_INTERVAL
        {
            self.handoff().await?;
        } else if self.pin_moved && self.tail.frames() >= self.opts.checkpoint_frames {
            // Between handoffs the WAL grows past the app's autocheckpoint threshold; keep
            // the copying back in walship's process, beside the loop.
            self.copy_back_beside().await?;
        }
        // A scheduled snapshot goes with the first sync after the interval that ships new
        // frames: an idle database costs no request, and a restore replays at most one
        // interval's worth of writes after its snapshot.
        // Not while the pin may be ahead of what is shipped (it moved in a sync that stopped
        // at its budget): checkpoints may have copied pages newer than the shipped position
        // into the database file, which a snapshot reads.
        if shipped
            && !self.pin_bound_pending
            && self.changed_since_snapshot
            && self.last_snapshot.elapsed() >= self.opts.snapshot_interval
        {
            self.write_snapshot().await?;
        }
        Ok(())
    }

    /// Holds the checkpoint lock while the app writes heavily (a round shipped a good part
    /// of a handoff's worth of frames: its WAL is or soon will be past the autocheckpoint
    /// threshold between handoffs), and lets go of it once the app's write rate is light
    /// again (see [`light_load`]), when its checkpoints cost it little and may well be its
    /// own blocking ones.
    /// `surge`: the app is writing heavily now although the last round was not heavy.
    async fn hold_or_release_checkpoints(&mut self, surge: bool) -> EngineResult<()> {
        if !self.opts.defer_app_checkpoints || self.copying() {
            // A copy beside the loop holds the file's hold state (and SQLite the lock) until
            // it ends; the next round decides.
            return Ok(());
        }
        let heavy = self.heavy_round() || surge;
        let light = self.light_load() && !heavy;
        let (before, after, locked) = self
            .on_db(move |db| {
                let before = db.holds_checkpoints();
                let mut locked = None;
                if heavy {
                    locked = Some(db.hold_checkpoints());
                } else if light {
                    db.release_checkpoints();
                }
                Ok((before, db.holds_checkpoints(), locked))
            })
            .await?;
        if before != after {
            // `locked`: false when an app's checkpoint had the lock; taken again next round.
            tracing::debug!(db = %self.span_db(), held = after, ?locked, "app checkpoints deferred to walship");
        }
        self.publish_deferred(after);
        Ok(())
    }

    fn db_still_there(&mut self) -> bool {
        self.db.lock().map(|db| db.path().exists()).unwrap_or(false)
    }
}

/// The frames of a copied-back WAL (read into `est.body` under the lock, taken from there)
/// that a resumed `tail` has not shipped: they go first with the next sync, from memory, so
/// that a restart of the WAL before then is still proven continuous by the clean pin at the
/// WAL's end.
fn unshipped_residue(est: &mut Established, tail: &Tail) -> Option<Residue> {
    if !est.frames_kept {
        return None;
    }
    let (mut body, scan, hdr) = (est.body.take()?, est.scan.as_ref()?, est.hdr?);
    let shipped = tail.frames() as usize;
    if shipped >= scan.frames.len() || scan.frames.first().map(|f| f.index) != Some(1) {
        return None;
    }
    let frame_size = usize::try_from(hdr.frame_size()).ok()?;
    Some(Residue {
        generation: tail.generation,
        scan: Scan {
            chain: scan.chain,
            db_pages: scan.db_pages,
            frames: scan.frames[shipped..].to_vec(),
            // Before the pin's bound (`pin_bound_pending`): not counted past the pin.
            commits: 0,
            more: false,
            header: None,
            verify: false,
        },
        body: Arc::new(
            body.split_off(
                shipped
                    .checked_mul(frame_size)
                    .filter(|&n| n <= body.len())?,
            ),
        ),
    })
}

/// If `scan` is of an incarnation other than the tail's, its header.
fn scan_restart_header(tail: &Tail, scan: &Scan) -> Option<WalHeader> {
    if Some(scan.chain.salts()) == tail.salts() {
        return None;
    }
    scan.header
}

fn observe_wal(db: &Db, wal_path: &Path, tail: &Tail) -> EngineResult<Observed> {
    if !db.still_same_file() {
        return Ok(Observed::Break(
            "the database file was replaced or removed".into(),
        ));
    }
    let Some(h) =
        walfile::read_header(wal_path).map_err(|e| EngineError::io("read WAL header", e))?
    else {
        return Ok(Observed::Nothing);
    };
    if h.page_size != tail.page_size {
        return Ok(Observed::Break(format!(
            "page size changed from {} to {}",
            tail.page_size, h.page_size
        )));
    }
    let same = tail.hdr.is_some_and(|t| {
        (t.salt1, t.salt2, t.checkpoint_seq, t.magic)
            == (h.salt1, h.salt2, h.checkpoint_seq, h.magic)
    });
    if same {
        let chain = tail.chain.unwrap_or_else(|| FrameChain::from_header(&h));
        let mut s = walfile::scan(wal_path, &h, chain, segment_frames(&h))
            .map_err(|e| EngineError::io("read WAL", e))?;
        if s.frames.is_empty() {
            return Ok(Observed::Nothing);
        }
        s.header = None;
        return Ok(Observed::Frames(s));
    }
    // A new incarnation. Continuous only under a clean pin with nothing shipped since: the
    // pin then either holds a read mark (no restart can have happened) or read mark 0 taken
    // when everything up to the shipped end was checkpointed, which stops every further
    // checkpoint, so whatever restarts happened under it were from that end or from an empty
    // WAL. The new header's salts and checkpoint sequence prove nothing either way: SQLite
    // keeps the sequence per connection, and a connection that never restarted the WAL
    // itself writes a header with sequence 0 and random salts.
    if tail.clean_pin_at != Some((tail.salts(), tail.frames())) {
        if let Some(s) = old_incarnation_backlog(wal_path, tail)? {
            return Ok(Observed::Frames(s));
        }
        let clean = match tail.clean_pin_at {
            Some((_, f)) => format!("clean pin at frame {f}"),
            None => "pin not clean".into(),
        };
        return Ok(Observed::Break(format!(
            "WAL restarted (salt-1 {:#x}, checkpoint {}) without proof that nothing was lost \
             ({clean}, shipped to frame {})",
            h.salt1,
            h.checkpoint_seq,
            tail.frames()
        )));
    }
    let mut s = walfile::scan(
        wal_path,
        &h,
        FrameChain::from_header(&h),
        segment_frames(&h),
    )
    .map_err(|e| EngineError::io("read WAL", e))?;
    s.header = Some(h);
    Ok(Observed::Frames(s))
}

/// The frames of the old incarnation still to ship after a restart under a clean pin taken
/// at its frame `E` while the tail was behind `E` — a resumed replicator's backlog, when the
/// app's next write restarted the completely copied-back WAL before the first sync shipped
/// it. The restart was from exactly `E` (the clean pin stops every checkpoint, so nothing
/// after `E` can have been copied back, which a restart needs), and the new incarnation
/// overwrites the file from its start: frames after the tail may still be there. They are
/// taken only if the old incarnation's checksum chain runs from the tail's own checksum
/// through them, ending at a commit at or before `E` (or cut at the segment size, the rest
/// following the same way); they are shipped with every byte checked against that chain as
/// it is copied ([`walfile::copy_frames_verified`]), since the app may overwrite them
/// meanwhile. Anything less, and the caller reports the break.
fn old_incarnation_backlog(wal_path: &Path, tail: &Tail) -> EngineResult<Option<Scan>> {
    let (Some((salts, end)), Some(h), Some(chain)) = (tail.clean_pin_at, tail.hdr, tail.chain)
    else {
        return Ok(None);
    };
    if salts != tail.salts() || end <= tail.frames() {
        return Ok(None);
    }
    let mut s = walfile::scan(wal_path, &h, chain, segment_frames(&h))
        .map_err(|e| EngineError::io("read WAL", e))?;
    let whole = s.end() == end || (s.more && s.end() < end);
    if s.frames.is_empty() || !whole {
        return Ok(None);
    }
    tracing::info!(db = %wal_path.display(), position = tail.position, frames = s.frames.len(), wal_end = end, "WAL restarted before the backlog was shipped; shipping it from the old incarnation's frames");
    s.header = None;
    s.verify = true;
    Ok(Some(s))
}

/// The file watcher's task; stops when dropped.
type Watcher = AbortOnDrop;

/// Watches the WAL with inotify: a change wakes the loop, at most once per `gap`.
///
/// The WAL's watch is one-shot, re-armed after each event: while it is disarmed the kernel
/// does no work for the app's writes, so a busy app pays for one event per `gap` rather
/// than for one on every write (which costs a small machine a tenth of its write rate). It
/// is re-armed before the loop is woken, so a write after the replicator looked always
/// raises a new event. The directory is watched only for the WAL being created or renamed
/// into place, which the app's writes do not raise.
#[cfg(target_os = "linux")]
fn watch_files(
    db_path: &Path,
    wake: Arc<Notify>,
    dirty: Arc<AtomicI64>,
    gap: Duration,
) -> Option<Watcher> {
    use futures::StreamExt;
    use inotify::{Inotify, WatchMask};
    let dir = db_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let dir = if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir
    };
    let wal_path = crate::db::wal_path(db_path);
    let wal_name = wal_path.file_name().map(|n| n.to_os_string())?;
    let arm = move |w: &mut inotify::Watches| {
        // A missing WAL is fine: the directory's watch sees it appear.
        let _ = w.add(&wal_path, WatchMask::MODIFY | WatchMask::ONESHOT);
    };
    let setup = || -> std::io::Result<_> {
        let inotify = Inotify::init()?;
        let mut watches = inotify.watches();
        watches.add(&dir, WatchMask::CREATE | WatchMask::MOVED_TO)?;
        arm(&mut watches);
        Ok((watches, inotify.into_event_stream(vec![0u8; 4096])?))
    };
    let (mut watches, mut events) = match setup() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, dir = %dir.display(), "file notifications unavailable; polling only");
            return None;
        }
    };
    let task = tokio::spawn(async move {
        while let Some(ev) = events.next().await {
            match ev {
                // The WAL's own watch names no file; the directory's names the WAL.
                Ok(ev)
                    if ev.mask.contains(inotify::EventMask::MODIFY)
                        || ev.name.as_deref() == Some(wal_name.as_os_str()) => {}
                Ok(_) => continue,
                // Overflow or a read error: look, as for a change.
                Err(_) => {}
            }
            arm(&mut watches);
            // The first change since the replicator last looked: the lag starts here.
            let _ = dirty.compare_exchange(0, now_ms(), Ordering::AcqRel, Ordering::Acquire);
            wake.notify_one();
            tokio::time::sleep(gap).await;
        }
    });
    Some(AbortOnDrop(task))
}

/// Without inotify the loop polls (see `Replicator::run`).
#[cfg(not(target_os = "linux"))]
fn watch_files(
    _db_path: &Path,
    _wake: Arc<Notify>,
    _dirty: Arc<AtomicI64>,
    _gap: Duration,
) -> Option<Watcher> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_start_is_retried_after_1_s_doubling_to_30_s() {
        let delays: Vec<u64> = (1..=8).map(|n| start_retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn a_load_is_light_when_a_sync_gap_adds_under_a_quarter_of_the_checkpoint_threshold() {
        let gap = Duration::from_millis(200);
        // 100 transactions a second of ~9 pages: 180 frames per gap, under 250.
        assert!(light_load(900.0, gap, 1000));
        assert!(light_load(0.0, gap, 1000));
        // 1,250 frames a second make 250 per gap: not light; a writer at full speed even less.
        assert!(!light_load(1250.0, gap, 1000));
        assert!(!light_load(80_000.0, gap, 1000));
        // The threshold follows the configured checkpoint size.
        assert!(light_load(1250.0, gap, 2000));
    }
}
