//! Restore: the newest snapshot (by position) of the usable generation with the highest id
//! (with a target time, of those holding a snapshot at or before it), then every segment
//! that continues it, verified and applied in order, into a temporary file that is checked
//! and renamed into place only at the end. No choice depends on a writer's clock
//! (docs/format.md, "Restore").
//!
//! A restore that did not reach everything the replica holds at or before its target (a
//! [`Gap`]: a missing or unusable segment, a damaged newest snapshot that forced an older
//! point, a newer generation it could not restore) is partial: it says so in its report,
//! and writes nothing unless [`RestoreOptions::allow_partial`] accepts it. [`plan`] tells,
//! from the listing alone, what a restore would read.

mod gap;
mod plan;

pub use gap::{Gap, disagreement, find_gap};
pub use plan::{RestorePlan, plan};

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::mpsc;
use walship_format::FormatError;
use walship_format::crypto::KeyRing;
use walship_format::key::{GENERATIONS_DIR, GenerationId, ObjectKey, format_rfc3339};
use walship_format::object::{HEADER_SIZE, Kind, ObjectHeader, ObjectReader};
use walship_format::wal::{FRAME_HEADER_SIZE, FrameChain, FrameCheck, WAL_MAGIC_BE};
use walship_storage::{ObjectStore, StorageError};

use crate::AbortOnDrop;
use crate::error::{EngineError, EngineResult};
use crate::replica::{GenerationObjects, Listed, Replica};

/// Where a restore tells how far it has got: bytes of stored objects read, out of those it
/// planned to read. A restore that falls back to another point starts again from `start`.
pub trait RestoreProgress: Send + Sync + std::fmt::Debug {
    /// An attempt begins: it will read `total` bytes of objects (its snapshot and the
    /// segments after it, as listed).
    fn start(&self, total: u64);
    /// `bytes` more of them were read.
    fn advance(&self, bytes: u64);
    /// Every object is read and applied; the restored file is being flushed and checked.
    fn verifying(&self);
}

/// Settings of a restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Restore the state as of this time (ms since the epoch); `None` = the newest.
    pub target_ms: Option<i64>,
    /// Segments downloaded ahead of the one being applied.
    pub parallelism: usize,
    /// Replace an existing output file (its `-wal` and `-shm` too).
    pub overwrite: bool,
    /// Told how far the restore has got (a progress bar), if anyone asks.
    pub progress: Option<Arc<dyn RestoreProgress>>,
    /// Write the output even when the restore is partial (objects exist beyond the point
    /// it reached); otherwise a partial restore writes nothing and fails with
    /// [`EngineError::Partial`].
    pub allow_partial: bool,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            target_ms: None,
            parallelism: 4,
            overwrite: false,
            progress: None,
            allow_partial: false,
        }
    }
}

/// A reader that tells a restore's progress of every byte read through it.
struct Counted<R> {
    inner: R,
    progress: Option<Arc<dyn RestoreProgress>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(p) = &self.progress {
            p.advance(n as u64);
        }
        Ok(n)
    }
}

/// What a restore did.
#[derive(Debug, Clone, Default)]
pub struct RestoreReport {
    /// Generation restored from.
    pub generation: Option<GenerationId>,
    /// Snapshot used.
    pub snapshot: String,
    /// Position of the restored state.
    pub position: u64,
    /// Write time of the last object applied (ms since the epoch).
    pub timestamp_ms: i64,
    /// Segments applied.
    pub segments: usize,
    /// Bytes downloaded.
    pub bytes: u64,
    /// Database size in pages.
    pub pages: u32,
    /// Objects skipped, with why.
    pub skipped: Vec<(String, String)>,
    /// Wall time in milliseconds.
    pub elapsed_ms: u64,
    /// The segment at which the chain stopped early (it failed to verify, or was deleted
    /// while the restore ran, again and again), if any.
    pub stopped_at: Option<String>,
    /// What the restore did not reach although the replica holds it (at or before the
    /// target): `Some` makes the restore partial.
    pub gap: Option<Gap>,
    /// With a target time: a generation ranked below the one restored holds a later object
    /// (at or before the target) than any of it, so writers' clocks disagree.
    pub times_backwards: Option<TimesBackwards>,
}

/// Object times that run backwards across generations (docs/format.md, "Restore"): a
/// generation with a lower id holds an object written, by its writer's clock, after every
/// object of the generation restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimesBackwards {
    /// The generation restored.
    pub restored: GenerationId,
    /// Its newest object's time (at or before the target).
    pub restored_newest_ms: i64,
    /// The lower generation with the latest object.
    pub lower: GenerationId,
    /// That object's time.
    pub lower_newest_ms: i64,
}

impl std::fmt::Display for TimesBackwards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "object times run backwards across generations: generation {} (lower id) holds an \
             object written at {}, after every object of generation {} (restored, up to {}); a \
             writer's clock was off, or the lower one is a one-shot snapshot taken while a \
             replicator ran. Restore goes by generation id, not by time",
            self.lower,
            format_rfc3339(self.lower_newest_ms),
            self.restored,
            format_rfc3339(self.restored_newest_ms),
        )
    }
}

impl RestoreReport {
    /// Whether objects exist beyond the point restored ([`RestoreReport::gap`]).
    pub fn partial(&self) -> bool {
        self.gap.is_some()
    }

    /// Objects applied: the snapshot and the segments.
    pub fn objects_applied(&self) -> usize {
        self.segments + usize::from(!self.snapshot.is_empty())
    }
}

/// Restores the replica into `output`.
pub async fn restore(
    replica: &Replica,
    output: &Path,
    opts: &RestoreOptions,
) -> EngineResult<RestoreReport> {
    // A live replicator may delete segments that a newer merged segment covers while this
    // restore runs (after they aged past its keep time): list again and start over.
    for relist in [true, true, false] {
        if let Some(report) = restore_listed(replica, output, opts, relist).await? {
            return Ok(report);
        }
    }
    Err(EngineError::Task("restore gave up listing again".into()))
}

/// One restore from one listing. With `relist`, returns `None` (and writes nothing) when a
/// listed segment disappeared before it was read.
async fn restore_listed(
    replica: &Replica,
    output: &Path,
    opts: &RestoreOptions,
    relist: bool,
) -> EngineResult<Option<RestoreReport>> {
    let t0 = Instant::now();
    if output.exists() && !opts.overwrite {
        return Err(EngineError::OutputExists {
            path: output.to_path_buf(),
        });
    }
    let target = opts.target_ms.unwrap_or(i64::MAX);
    let mut skipped: Vec<(String, String)> = Vec::new();
    // Generations tried before the one restored, that restored nothing: their objects lie
    // beyond the point restored.
    let mut ahead: Vec<GenerationObjects> = Vec::new();
    // Generations passed over without a snapshot to try, with why.
    let mut passed: Vec<(String, String)> = Vec::new();
    let generations = in_id_order(replica).await?;
    for (generation, objs) in &generations {
        let generation = *generation;
        for f in &objs.foreign {
            tracing::debug!(key = %f, "ignoring an object that is not walship's");
        }
        // Snapshots by position, newest first; a target time only leaves later ones out.
        let candidates: Vec<&Listed> = objs
            .snapshots
            .iter()
            .filter(|s| s.key.timestamp_ms() <= target)
            .collect();
        if candidates.is_empty() {
            passed.push((generation.prefix(), no_snapshot(objs, opts.target_ms)));
        }
        for snap in candidates {
            let ObjectKey::Snapshot { position, .. } = snap.key else {
                continue;
            };
            // A segment found corrupt is left out and the chain planned again: the parts
            // of a merged segment (or the merged one) may still carry the history past it.
            let mut bad: HashSet<String> = HashSet::new();
            let result = loop {
                let chain = crate::replica::chain(&objs.segments, position, target, &bad);
                // Whether leaving `key` out too gives a chain reaching past `reached`.
                let better = |key: &str, reached: u64| -> bool {
                    let mut without = bad.clone();
                    without.insert(key.to_string());
                    let alt = crate::replica::chain(&objs.segments, position, target, &without);
                    alt.last().is_some_and(|l| match l.key {
                        ObjectKey::Segment { end, .. } => end > reached,
                        ObjectKey::Snapshot { .. } => false,
                    })
                };
                match attempt(
                    replica,
                    generation,
                    snap,
                    &chain,
                    output,
                    opts,
                    OnStop {
                        better_without: &better,
                        relist,
                    },
                )
                .await
                {
                    Ok(Attempt::Done(report, tmp)) => break Ok((*report, tmp)),
                    Ok(Attempt::Gone { key }) => {
                        tracing::warn!(%key, "a segment disappeared during the restore; listing the replica again");
                        return Ok(None);
                    }
                    Ok(Attempt::Avoid { key, why, reached }) => {
                        tracing::warn!(generation = %generation, %key, reason = %why, position = reached, "a segment is unusable; restoring again around it");
                        bad.insert(key.clone());
                        skipped.push((key, why));
                    }
                    Err(e) => break Err(e),
                }
            };
            match result {
                Ok((mut report, tmp)) => {
                    if opts.target_ms.is_some() {
                        report.times_backwards = times_backwards(&generations, generation, target);
                    }
                    if let Some(b) = &report.times_backwards {
                        tracing::warn!(restored = %b.restored, lower = %b.lower, "{b}");
                    }
                    skipped.append(&mut report.skipped);
                    skipped.sort();
                    skipped.dedup();
                    report.skipped = skipped;
                    for (key, why) in &report.skipped {
                        tracing::warn!(%key, reason = %why, "skipped");
                    }
                    report.gap = find_gap(report.position, objs, &ahead, target);
                    if let Some(gap) = &report.gap {
                        tracing::warn!(
                            generation = %generation, position = gap.from, beyond = gap.beyond.len(),
                            first = %gap.beyond[0], "partial restore: objects exist beyond the point restored"
                        );
                        if !opts.allow_partial {
                            drop(tmp);
                            report.elapsed_ms = t0.elapsed().as_millis() as u64;
                            return Err(EngineError::Partial {
                                report: Box::new(report),
                            });
                        }
                    }
                    install(tmp, output, opts.overwrite)?;
                    report.elapsed_ms = t0.elapsed().as_millis() as u64;
                    tracing::info!(
                        generation = %generation, position = report.position, segments = report.segments,
                        bytes = report.bytes, elapsed_ms = report.elapsed_ms, "restored"
                    );
                    return Ok(Some(report));
                }
                Err(EngineError::Corrupt { key, source }) => {
                    tracing::warn!(%key, error = %source, "snapshot unusable; trying an older one");
                    skipped.push((key, source.to_string()));
                }
                Err(EngineError::IntegrityCheck(why)) => {
                    tracing::warn!(key = %snap.name, reason = %why, "restored image failed its integrity check; trying an older snapshot");
                    skipped.push((snap.name.clone(), format!("integrity check failed: {why}")));
                }
                Err(e) => return Err(e),
            }
        }
        ahead.push(objs.clone());
    }
    if let Some((key, why)) = skipped.first() {
        tracing::error!(%key, reason = %why, skipped = skipped.len(), "no usable snapshot");
    }
    Err(nothing_restored(replica, opts.target_ms, skipped, passed).await?)
}

/// Every generation with its objects, the highest id (the newest, by construction) first.
async fn in_id_order(replica: &Replica) -> EngineResult<Vec<(GenerationId, GenerationObjects)>> {
    let mut gens = Vec::new();
    // `generations` sorts by id, highest first.
    for generation in replica.generations().await? {
        gens.push((generation, replica.objects(generation).await?));
    }
    Ok(gens)
}

/// Why a generation had no snapshot to try.
fn no_snapshot(objs: &GenerationObjects, target_ms: Option<i64>) -> String {
    let oldest = objs.snapshots.iter().map(|s| s.key.timestamp_ms()).min();
    match (oldest, target_ms) {
        (Some(t), Some(_)) => format!(
            "no snapshot at or before the requested time (the oldest was written at {})",
            format_rfc3339(t)
        ),
        _ if !objs.segments.is_empty() => {
            format!("no snapshot ({} segments without one)", objs.segments.len())
        }
        _ => format!(
            "no snapshot ({} keys walship did not write)",
            objs.foreign.len()
        ),
    }
}

/// Whether a generation ranked below `restored` holds a later object (at or before
/// `target`; `i64::MAX` for any) than any of `restored`'s. `generations` as listed.
pub fn times_backwards(
    generations: &[(GenerationId, GenerationObjects)],
    restored: GenerationId,
    target: i64,
) -> Option<TimesBackwards> {
    let newest = |o: &GenerationObjects| {
        o.snapshots
            .iter()
            .chain(&o.segments)
            .map(|l| l.key.timestamp_ms())
            .filter(|t| *t <= target)
            .max()
    };
    let restored_newest_ms = generations
        .iter()
        .find(|(g, _)| *g == restored)
        .and_then(|(_, o)| newest(o))?;
    generations
        .iter()
        .filter(|(g, _)| *g < restored)
        .filter_map(|(g, o)| newest(o).map(|t| (t, *g)))
        .filter(|(t, _)| *t > restored_newest_ms)
        .max()
        .map(|(lower_newest_ms, lower)| TimesBackwards {
            restored,
            restored_newest_ms,
            lower,
            lower_newest_ms,
        })
}

/// The error when nothing was restored: [`EngineError::NothingToRestore`] only when the
/// replica holds no object at all under `generations/` (a lease alone holds no data);
/// otherwise [`EngineError::Unrestorable`], naming what was tried and why each failed.
async fn nothing_restored(
    replica: &Replica,
    target: Option<i64>,
    skipped: Vec<(String, String)>,
    passed: Vec<(String, String)>,
) -> EngineResult<EngineError> {
    if skipped.is_empty() && passed.is_empty() && replica.holds_nothing().await? {
        return Ok(EngineError::NothingToRestore {
            replica: replica.describe(),
            target,
        });
    }
    let mut tried = skipped;
    tried.extend(passed);
    if tried.is_empty() {
        tried.push((
            GENERATIONS_DIR.to_string(),
            "keys walship did not write, and no generation".to_string(),
        ));
    }
    Ok(EngineError::Unrestorable {
        replica: replica.describe(),
        target,
        tried,
    })
}

/// A temporary output that removes itself unless kept.
struct TempOutput {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
        for suffix in ["-wal", "-shm", "-journal"] {
            let mut s = self.path.as_os_str().to_owned();
            s.push(suffix);
            let _ = std::fs::remove_file(PathBuf::from(s));
        }
    }
}

fn sibling(output: &Path, suffix: &str) -> PathBuf {
    let mut s = output.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// What an attempt does when its chain stops early.
#[derive(Clone, Copy)]
struct OnStop<'a> {
    /// Whether leaving the segment out gives a chain reaching past the position reached.
    better_without: &'a (dyn Fn(&str, u64) -> bool + Sync),
    /// Report a segment deleted after the listing instead of restoring up to it.
    relist: bool,
}

/// How an attempt from one snapshot ended.
enum Attempt {
    /// Restored and verified in a temporary file, to be moved into place.
    Done(Box<RestoreReport>, TempOutput),
    /// The segment `key` was unusable at `reached`, and a chain without it goes further:
    /// nothing was written to the output.
    Avoid {
        key: String,
        why: String,
        reached: u64,
    },
    /// The segment `key` was deleted after the listing: nothing was written.
    Gone { key: String },
}

async fn attempt(
    replica: &Replica,
    generation: GenerationId,
    snap: &Listed,
    chain: &[&Listed],
    output: &Path,
    opts: &RestoreOptions,
    on_stop: OnStop<'_>,
) -> EngineResult<Attempt> {
    let t_start = Instant::now();
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|e| EngineError::io(format!("create {}", dir.display()), e))?;
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "db".into());
    let tmp = TempOutput {
        path: dir.join(format!(
            ".{name}.walship-restore-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        )),
        keep: false,
    };
    let store = replica.store().clone();
    let mut report = RestoreReport {
        generation: Some(generation),
        snapshot: snap.name.clone(),
        ..Default::default()
    };

    // Segments are fetched from the start, while the snapshot downloads: small ones whole
    // (in parallel, held in memory), larger ones as streams read when applied.
    let (seg_tx, mut segments) = mpsc::channel(opts.parallelism.max(1));
    let names: Vec<String> = chain.iter().map(|s| s.name.clone()).collect();
    let _fetcher = AbortOnDrop(tokio::spawn(prefetch_segments(
        store.clone(),
        names,
        opts.parallelism.max(1),
        seg_tx,
    )));

    let progress = opts.progress.clone();
    if let Some(p) = &progress {
        p.start(snap.size + chain.iter().map(|s| s.size).sum::<u64>());
    }

    // 1. The snapshot, streamed into the temporary file.
    let body = download(store.clone(), snap.name.clone());
    let tmp_path = tmp.path.clone();
    let key = snap.name.clone();
    let snap_key = snap.key;
    let keys = replica.keys().cloned();
    let counted = progress.clone();
    let (header, bytes) = run_blocking_with_stream(body, move |reader| {
        let reader = Counted {
            inner: reader,
            progress: counted,
        };
        let mut r = ObjectReader::with_keys(reader, keys.as_deref())
            .map_err(|source| EngineError::decoding(&key, source))?;
        let h = *r.header();
        if let Some(why) = disagreement(&snap_key, &h) {
            return Err(EngineError::Corrupt {
                key: key.clone(),
                source: FormatError::corrupt(&why),
            });
        }
        let f =
            File::create(&tmp_path).map_err(|e| EngineError::io("create temporary output", e))?;
        // 256 KiB writes: larger ones make the kernel cache the file in large folios, and
        // every 4 KiB segment page written over one later costs a walk of its whole folio
        // (measured: 16,000 page writes into 134 MB took 0.12 s after 1 MiB writes, 0.06 s
        // after 256 KiB ones, which write as fast).
        let mut w = BufWriter::with_capacity(256 << 10, f);
        io::copy(&mut r, &mut w).map_err(|e| classify(&key, e))?;
        // No fsync yet: the one before the rename covers the snapshot and the segments
        // (and segment pages written over dirty pages cost the file system less).
        w.into_inner()
            .map_err(|e| EngineError::io("write temporary output", e.into_error()))?;
        Ok(h)
    })
    .await?;
    report.bytes += bytes;
    let t_snap = Instant::now();
    tracing::debug!(key = %snap.name, bytes, elapsed_ms = t_start.elapsed().as_millis() as u64, "snapshot written");
    report.position = header.end;
    report.pages = header.db_pages;
    report.timestamp_ms = header.timestamp_ms;
    let page_size = header.page_size;

    // 2. Segments, downloaded ahead in parallel, verified whole, then applied in order.
    let file = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&tmp.path)
            .map_err(|e| EngineError::io("open temporary output", e))?,
    );
    let mut stop: Option<(String, String)> = None;
    let mut remaining: Vec<String> = chain.iter().map(|s| s.name.clone()).collect();
    // One spool buffer, handed from segment to segment: fresh multi-MiB buffers would each
    // cost page faults and zeroing.
    let mut spool_buf: Vec<u8> = Vec::new();
    remaining.reverse();
    while let Some((name, got)) = segments.recv().await {
        remaining.pop();
        let obj = match got {
            Ok(o) => o,
            Err(StorageError::NotFound { .. }) => {
                stop = Some((name, GONE.into()));
                break;
            }
            Err(e) => return Err(e.into()),
        };
        let body = obj.body;
        let file2 = file.clone();
        let key = name.clone();
        let listed = chain.iter().find(|l| l.name == name).map(|l| l.key);
        let expect_start = report.position;
        let keys = replica.keys().cloned();
        let buf = std::mem::take(&mut spool_buf);
        let r = run_blocking_with_stream(body, move |reader| {
            let seg = read_segment(
                reader,
                keys.as_deref(),
                &key,
                listed,
                generation,
                expect_start,
                page_size,
                buf,
            )?;
            seg.pages
                .apply(&file2)
                .map_err(|e| EngineError::io("write temporary output", e))?;
            Ok((seg.header, seg.pages.into_buf()))
        })
        .await;
        let r = r.map(|((h, buf), n)| {
            spool_buf = buf;
            (h, n)
        });
        match r {
            Ok((h, n)) => {
                if let Some(p) = &progress {
                    p.advance(n);
                }
                report.bytes += n;
                report.position = h.end;
                report.pages = h.db_pages;
                report.timestamp_ms = h.timestamp_ms;
                report.segments += 1;
            }
            Err(EngineError::Corrupt { key, source }) => {
                stop = Some((key, source.to_string()));
                break;
            }
            Err(e) => return Err(e),
        }
    }
    if let Some((key, why)) = stop {
        if why == GONE && on_stop.relist {
            return Ok(Attempt::Gone { key });
        }
        if why != GONE && (on_stop.better_without)(&key, report.position) {
            return Ok(Attempt::Avoid {
                key,
                why,
                reached: report.position,
            });
        }
        report.stopped_at = Some(key.clone());
        report.skipped.push((key, why));
        while let Some(rest) = remaining.pop() {
            report
                .skipped
                .push((rest, "after a skipped segment".into()));
        }
    }

    tracing::debug!(
        segments = report.segments,
        elapsed_ms = t_snap.elapsed().as_millis() as u64,
        "segments applied"
    );
    if let Some(p) = &progress {
        p.verifying();
    }
    // 3. Size; then the fsync and the integrity check side by side (the check reads what the
    // page cache holds, which the fsync only writes out: one waits on the disk, the other
    // works the CPU); then the rename, once both succeeded.
    let len = u64::from(report.pages) * u64::from(page_size);
    file.set_len(len)
        .map_err(|e| EngineError::io("truncate temporary output", e))?;
    let t_sync = Instant::now();
    let sync = tokio::task::spawn_blocking(move || {
        let r = file.sync_all();
        (r, t_sync.elapsed())
    });
    let check_path = tmp.path.clone();
    let t_check = Instant::now();
    let check = tokio::task::spawn_blocking(move || integrity_check(&check_path));
    let (synced, checked) = tokio::join!(sync, check);
    let (synced, sync_elapsed) = synced?;
    synced.map_err(|e| EngineError::io("fsync temporary output", e))?;
    tracing::debug!(
        bytes = len,
        elapsed_ms = sync_elapsed.as_millis() as u64,
        "restored file synced"
    );
    checked??;
    tracing::debug!(
        elapsed_ms = t_check.elapsed().as_millis() as u64,
        "integrity check passed"
    );
    Ok(Attempt::Done(Box::new(report), tmp))
}

/// Moves a verified restore into place at `output` (removing a stale `-wal` and `-shm`).
fn install(tmp: TempOutput, output: &Path, overwrite: bool) -> EngineResult<()> {
    if output.exists() && !overwrite {
        return Err(EngineError::OutputExists {
            path: output.to_path_buf(),
        });
    }
    for suffix in ["-wal", "-shm"] {
        match std::fs::remove_file(sibling(output, suffix)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(EngineError::io(
                    format!("remove stale {}{suffix}", output.display()),
                    e,
                ));
            }
        }
    }
    std::fs::rename(&tmp.path, output).map_err(|e| {
        EngineError::io(format!("move restored database to {}", output.display()), e)
    })?;
    let mut tmp = tmp;
    tmp.keep = true;
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Why a segment listed at the start was not applied: it was deleted meanwhile.
const GONE: &str = "disappeared during restore";

/// Runs `f` on a blocking thread with a `Read` over `body`; returns its result and the
/// number of bytes read.
/// Segments up to this size are downloaded whole, ahead of being applied; with
/// `parallelism` in flight and as many waiting, at most 2 × `parallelism` of them are held.
const PREFETCH_WHOLE: u64 = 2 * 1024 * 1024;

/// Fetches segments in order, `parallelism` at a time, and sends them on in order.
async fn prefetch_segments(
    store: Arc<dyn ObjectStore>,
    names: Vec<String>,
    parallelism: usize,
    tx: mpsc::Sender<(String, Result<walship_storage::GetObject, StorageError>)>,
) {
    let fetches = futures::stream::iter(names.into_iter().map(|name| {
        let store = store.clone();
        async move {
            let got = match store.get(&name, None).await {
                Ok(obj) if obj.size <= PREFETCH_WHOLE => whole(obj).await,
                other => other,
            };
            (name, got)
        }
    }))
    .buffered(parallelism);
    futures::pin_mut!(fetches);
    while let Some(item) = fetches.next().await {
        if tx.send(item).await.is_err() {
            break;
        }
    }
}

/// Reads an object's body into memory; it is then a stream of one chunk.
async fn whole(
    mut obj: walship_storage::GetObject,
) -> Result<walship_storage::GetObject, StorageError> {
    let mut buf = bytes::BytesMut::with_capacity(usize::try_from(obj.size).unwrap_or(0));
    while let Some(chunk) = obj.body.next().await {
        buf.extend_from_slice(&chunk?);
    }
    let body = buf.freeze();
    Ok(walship_storage::GetObject {
        size: obj.size,
        body: Box::pin(futures::stream::once(async move { Ok(body) })),
    })
}

async fn run_blocking_with_stream<T, F>(
    body: walship_storage::ByteStream,
    f: F,
) -> EngineResult<(T, u64)>
where
    T: Send + 'static,
    F: FnOnce(&mut ChannelReader) -> EngineResult<T> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(2);
    let pump = async move {
        let mut body = body;
        while let Some(chunk) = body.next().await {
            let item = chunk.map_err(|e| io::Error::other(e.to_string()));
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                break;
            }
        }
    };
    let work = tokio::task::spawn_blocking(move || {
        let mut reader = ChannelReader {
            rx,
            cur: Bytes::new(),
            read: 0,
        };
        let r = f(&mut reader);
        r.map(|t| (t, reader.read))
    });
    let (_, r) = tokio::join!(pump, work);
    r?
}

/// A `Read` over chunks sent from an async task.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
    read: u64,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        self.read += n as u64;
        Ok(n)
    }
}

/// The object as one streamed GET. (Parallel ranged GETs were measured slower: loopback S3
/// servers such as moto read the whole object for every range, and one stream already
/// outruns decompression and the local disk; segments are what restore fetches ahead.)
fn download(store: Arc<dyn ObjectStore>, key: String) -> walship_storage::ByteStream {
    Box::pin(
        futures::stream::once(async move { store.get(&key, None).await })
            .map_ok(|o| o.body)
            .try_flatten(),
    )
}

fn classify(key: &str, e: io::Error) -> EngineError {
    let fe = FormatError::from_io(e);
    if fe.is_corrupt() {
        EngineError::Corrupt {
            key: key.to_string(),
            source: fe,
        }
    } else {
        match fe {
            FormatError::Io(e) => EngineError::io(format!("download {key}"), e),
            other => EngineError::Corrupt {
                key: key.to_string(),
                source: other,
            },
        }
    }
}

/// A verified segment: its header and the pages it writes.
struct Segment {
    header: ObjectHeader,
    pages: Pages,
}

/// Up to this many bytes of a segment's pages stay in memory; beyond, they move to a
/// temporary file.
const SPOOL_LIMIT: usize = 16 * 1024 * 1024;

/// The pages a segment writes, each in the version of its last frame (a page rewritten by
/// many transactions is kept, and applied, once), in memory or past [`SPOOL_LIMIT`] in a
/// temporary file.
struct Pages {
    page_size: usize,
    /// Page number → slot in `mem` or `file`.
    slots: HashMap<u32, u32>,
    mem: Vec<u8>,
    file: Option<File>,
}

impl Pages {
    /// Empty, holding its pages in `buf` (cleared) while they fit.
    fn new(page_size: u32, mut buf: Vec<u8>) -> Pages {
        buf.clear();
        Pages {
            page_size: page_size as usize,
            slots: HashMap::new(),
            mem: buf,
            file: None,
        }
    }

    /// Sets page `pgno` to `data`.
    fn put(&mut self, pgno: u32, data: &[u8]) -> EngineResult<()> {
        let ps = self.page_size;
        let next = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
        let slot = *self.slots.entry(pgno).or_insert(next) as usize;
        let at = slot * ps;
        let spool_err = |e| EngineError::io("write spool file", e);
        if let Some(f) = &self.file {
            return f.write_all_at(data, at as u64).map_err(spool_err);
        }
        if at + ps <= self.mem.len() {
            self.mem[at..at + ps].copy_from_slice(data);
        } else if at + ps <= SPOOL_LIMIT {
            self.mem.extend_from_slice(data);
        } else {
            let f = tempfile::tempfile().map_err(|e| EngineError::io("create spool file", e))?;
            f.write_all_at(&self.mem, 0).map_err(spool_err)?;
            f.write_all_at(data, at as u64).map_err(spool_err)?;
            self.file = Some(f);
            self.mem.clear();
        }
        Ok(())
    }

    /// Writes every page into `out`, in page order.
    fn apply(&self, out: &File) -> io::Result<()> {
        let ps = self.page_size;
        let mut order: Vec<(u32, u32)> = self.slots.iter().map(|(p, s)| (*p, *s)).collect();
        order.sort_unstable();
        let mut page = vec![0u8; ps];
        for (pgno, slot) in order {
            let at = slot as usize * ps;
            let data = match &self.file {
                Some(f) => {
                    f.read_exact_at(&mut page, at as u64)?;
                    &page[..]
                }
                None => &self.mem[at..at + ps],
            };
            out.write_all_at(data, u64::from(pgno - 1) * ps as u64)?;
        }
        Ok(())
    }

    /// The memory buffer, for the next segment.
    fn into_buf(self) -> Vec<u8> {
        self.mem
    }
}

#[allow(clippy::too_many_arguments)]
fn read_segment(
    reader: &mut ChannelReader,
    keys: Option<&KeyRing>,
    key: &str,
    listed: Option<ObjectKey>,
    generation: GenerationId,
    expect_start: u64,
    page_size: u32,
    buf: Vec<u8>,
) -> EngineResult<Segment> {
    let corrupt = |msg: &str| EngineError::Corrupt {
        key: key.to_string(),
        source: FormatError::corrupt(msg),
    };
    let mut r = ObjectReader::with_keys(reader, keys)
        .map_err(|source| EngineError::decoding(key, source))?;
    let h = *r.header();
    let why = match listed {
        Some(k) => disagreement(&k, &h),
        None => Some("not a segment key".to_string()),
    };
    if let Some(why) = why {
        return Err(corrupt(&why));
    }
    // A merged segment may start before the position it is applied at (see
    // `replica::chain`); it must reach past it.
    if !h.kind.has_frames()
        || h.generation != generation.0
        || h.start > expect_start
        || h.end <= expect_start
    {
        return Err(corrupt("header does not match its key or the chain"));
    }
    if h.page_size != page_size {
        return Err(corrupt("page size differs from the snapshot's"));
    }
    let mut pages = Pages::new(page_size, buf);
    if h.kind == Kind::Segment {
        read_frames(&mut r, &h, &mut pages, key)?;
    } else {
        // Merged: each segment's header, then its frames; the segments continue each other
        // from the merged segment's start to its end.
        let mut at = h.start;
        let mut frames = 0u32;
        while at != h.end {
            let mut raw = [0u8; HEADER_SIZE];
            r.read_exact(&mut raw).map_err(|e| classify(key, e))?;
            let part = ObjectHeader::decode(&raw).map_err(|source| EngineError::Corrupt {
                key: key.to_string(),
                source,
            })?;
            if part.kind != Kind::Segment
                || part.generation != h.generation
                || part.page_size != page_size
                || part.start != at
                || part.end > h.end
            {
                return Err(corrupt(
                    "a merged segment's part does not continue the one before",
                ));
            }
            frames = frames
                .checked_add(part.frames)
                .filter(|n| *n <= h.frames)
                .ok_or_else(|| corrupt("more frames than the header says"))?;
            read_frames(&mut r, &part, &mut pages, key)?;
            at = part.end;
        }
        if frames != h.frames {
            return Err(corrupt("fewer frames than the header says"));
        }
    }
    // Reading to the end verifies the trailer and the CRC.
    let mut rest = [0u8; 1];
    match r.read(&mut rest) {
        Ok(0) => {}
        Ok(_) => return Err(corrupt("more frames than the header says")),
        Err(e) => return Err(classify(key, e)),
    }
    Ok(Segment { header: h, pages })
}

/// Reads the frames of one segment (`h`), verifying their checksum chain from its start
/// checksum to its end checksum and that the last one commits, into `pages`.
fn read_frames(
    r: &mut impl Read,
    h: &ObjectHeader,
    pages: &mut Pages,
    key: &str,
) -> EngineResult<()> {
    let corrupt = |msg: &str| EngineError::Corrupt {
        key: key.to_string(),
        source: FormatError::corrupt(msg),
    };
    let mut chain = FrameChain::resume(
        h.wal.magic == WAL_MAGIC_BE,
        (h.wal.salt1, h.wal.salt2),
        h.page_size,
        h.start_checksum,
        0,
    );
    let mut frame = vec![0u8; FRAME_HEADER_SIZE + h.page_size as usize];
    let mut last_commit = false;
    for _ in 0..h.frames {
        r.read_exact(&mut frame).map_err(|e| classify(key, e))?;
        let (fh, check) = chain.check(&frame).map_err(|source| EngineError::Corrupt {
            key: key.to_string(),
            source,
        })?;
        if check != FrameCheck::Valid {
            return Err(corrupt(&format!(
                "WAL frame {} fails its checksum ({check:?})",
                chain.frames() + 1
            )));
        }
        last_commit = fh.is_commit();
        pages.put(fh.pgno, &frame[FRAME_HEADER_SIZE..])?;
    }
    if !last_commit {
        return Err(corrupt("does not end with a commit frame"));
    }
    if chain.checksum() != h.wal.checksum {
        return Err(corrupt("final checksum differs from the header's"));
    }
    Ok(())
}

/// Runs `PRAGMA integrity_check` on a restored file.
pub fn integrity_check(path: &Path) -> EngineResult<()> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| EngineError::sqlite("open restored database", e))?;
    let mut stmt = conn
        .prepare("PRAGMA integrity_check")
        .map_err(|e| EngineError::IntegrityCheck(e.to_string()))?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .and_then(|it| it.collect())
        .map_err(|e| EngineError::IntegrityCheck(e.to_string()))?;
    if rows.len() == 1 && rows[0] == "ok" {
        Ok(())
    } else {
        Err(EngineError::IntegrityCheck(rows.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A page of `page_size` bytes, all `b`.
    fn page(b: u8, page_size: usize) -> Vec<u8> {
        vec![b; page_size]
    }

    fn applied(pages: &Pages, n: usize, page_size: usize) -> Vec<u8> {
        let out = tempfile::tempfile().unwrap();
        out.set_len((n * page_size) as u64).unwrap();
        pages.apply(&out).unwrap();
        let mut got = vec![0u8; n * page_size];
        out.read_exact_at(&mut got, 0).unwrap();
        got
    }

    #[test]
    fn a_page_written_many_times_is_kept_and_applied_in_its_last_version() {
        let ps = 512;
        let mut pages = Pages::new(ps as u32, Vec::new());
        for (pgno, b) in [(3, 1), (1, 2), (3, 3), (2, 4), (3, 5), (1, 6)] {
            pages.put(pgno, &page(b, ps)).unwrap();
        }
        assert_eq!(pages.slots.len(), 3, "one slot per page");
        assert_eq!(pages.mem.len(), 3 * ps);
        let got = applied(&pages, 3, ps);
        assert_eq!(&got[..ps], &page(6, ps)[..]);
        assert_eq!(&got[ps..2 * ps], &page(4, ps)[..]);
        assert_eq!(&got[2 * ps..], &page(5, ps)[..]);
    }

    #[test]
    fn pages_past_the_spool_limit_move_to_a_file_and_keep_their_last_versions() {
        let ps = 65536;
        let n = SPOOL_LIMIT / ps + 8;
        let mut pages = Pages::new(ps as u32, Vec::new());
        for i in 0..n {
            pages.put(i as u32 + 1, &page((i % 200) as u8, ps)).unwrap();
        }
        assert!(pages.file.is_some(), "spilled to a file");
        assert!(pages.mem.is_empty());
        // Rewrite an early page (now in the file) and a late one.
        pages.put(1, &page(250, ps)).unwrap();
        pages.put(n as u32, &page(251, ps)).unwrap();
        let got = applied(&pages, n, ps);
        for i in 0..n {
            let want = match i {
                0 => 250,
                _ if i == n - 1 => 251,
                _ => (i % 200) as u8,
            };
            assert!(
                got[i * ps..(i + 1) * ps].iter().all(|b| *b == want),
                "page {}",
                i + 1
            );
        }
    }

    /// A database of a few hundred pages, closed, and its path.
    fn sample_db(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("sample.db");
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA page_size=4096; PRAGMA journal_mode=WAL;
             CREATE TABLE t(id INTEGER PRIMARY KEY, body BLOB NOT NULL);
             CREATE INDEX t_body ON t(body);
             WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r WHERE x < 2000)
             INSERT INTO t(body) SELECT randomblob(300) FROM r;
             PRAGMA wal_checkpoint(TRUNCATE);",
        )
        .unwrap();
        drop(conn);
        path
    }

    #[test]
    fn the_integrity_check_passes_a_sound_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample_db(dir.path());
        integrity_check(&path).unwrap();
    }

    #[test]
    fn the_integrity_check_refuses_a_file_with_a_damaged_page() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample_db(dir.path());
        let len = std::fs::metadata(&path).unwrap().len();
        // Scramble the middle of a page past the schema: cell contents and pointers of a
        // table or index b-tree page.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let page = len / 4096 / 2;
        std::os::unix::fs::FileExt::write_all_at(&f, &[0xA5; 2000], page * 4096 + 8).unwrap();
        drop(f);
        match integrity_check(&path) {
            Err(EngineError::IntegrityCheck(why)) => assert!(!why.is_empty()),
            other => panic!("a damaged page passed the check: {other:?}"),
        }
    }

    fn listed(key: ObjectKey) -> Listed {
        Listed {
            name: key.format(),
            key,
            size: 1,
        }
    }

    /// A generation holding one snapshot at position 0 written at `t`.
    fn generation(id: u64, t: i64) -> (GenerationId, GenerationObjects) {
        let g = GenerationId(id);
        let objs = GenerationObjects {
            snapshots: vec![listed(ObjectKey::Snapshot {
                generation: g,
                position: 0,
                timestamp_ms: t,
            })],
            ..Default::default()
        };
        (g, objs)
    }

    #[test]
    fn times_run_backwards_only_when_a_lower_generation_holds_later_times() {
        // Listed by id, highest first. A writer with its clock ahead made generation 1.
        let gens = vec![generation(2, 1_000), generation(1, 5_000)];
        let b = times_backwards(&gens, GenerationId(2), i64::MAX).unwrap();
        assert_eq!((b.lower, b.lower_newest_ms), (GenerationId(1), 5_000));
        assert_eq!(b.restored_newest_ms, 1_000);
        assert!(b.to_string().contains("times run backwards"), "{b}");
        // Before the lower generation's time, nothing disagrees.
        assert_eq!(times_backwards(&gens, GenerationId(2), 4_000), None);
        // In order: no warning.
        let gens = vec![generation(2, 5_000), generation(1, 1_000)];
        assert_eq!(times_backwards(&gens, GenerationId(2), i64::MAX), None);
    }

    #[tokio::test]
    async fn only_a_replica_with_nothing_under_generations_is_absent() {
        let dir = tempfile::tempdir().unwrap();
        let store = walship_storage::LocalStore::new(dir.path().join("r")).unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(store);
        let replica = Replica::new(store.clone());
        let e = nothing_restored(&replica, None, Vec::new(), Vec::new())
            .await
            .unwrap();
        assert!(matches!(e, EngineError::NothingToRestore { .. }), "{e}");
        // A lease alone holds no data.
        store
            .put("lease/fffffffffffffffe", Bytes::from_static(b"{}").into())
            .await
            .unwrap();
        let e = nothing_restored(&replica, None, Vec::new(), Vec::new())
            .await
            .unwrap();
        assert!(matches!(e, EngineError::NothingToRestore { .. }), "{e}");
        // Anything under generations/ is not absent, even a key walship did not write.
        store
            .put("generations/README", Bytes::from_static(b"x").into())
            .await
            .unwrap();
        let e = nothing_restored(&replica, None, Vec::new(), Vec::new())
            .await
            .unwrap();
        assert!(matches!(e, EngineError::Unrestorable { .. }), "{e}");
        // What was tried is named, with why.
        let tried = vec![(
            "generations/x/snapshots/s.wsnap".to_string(),
            "corrupt: CRC".to_string(),
        )];
        let e = nothing_restored(&replica, Some(0), tried, Vec::new())
            .await
            .unwrap();
        let msg = e.to_string();
        assert!(matches!(e, EngineError::Unrestorable { .. }), "{msg}");
        assert!(
            msg.contains("s.wsnap: corrupt: CRC") && !msg.contains('\n'),
            "{msg}"
        );
    }
}
