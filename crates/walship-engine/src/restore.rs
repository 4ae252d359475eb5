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

mod apply;
mod attempt;
mod fetch;
mod gap;
mod plan;
mod report;
mod verify;

pub use gap::{Gap, disagreement, find_gap};
pub use plan::{RestorePlan, plan};
pub use report::{RestoreReport, TimesBackwards, times_backwards};
pub use verify::integrity_check;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use walship_format::key::{GenerationId, ObjectKey};

use crate::error::{EngineError, EngineResult};
use crate::replica::{GenerationObjects, Listed, Replica};
use attempt::{Attempt, OnStop, attempt};
use plan::{in_id_order, no_snapshot, nothing_restored};
use verify::{TempOutput, install};

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

/// What one restore from one listing works with.
struct Run<'a> {
    replica: &'a Replica,
    output: &'a Path,
    opts: &'a RestoreOptions,
    /// The target time, `i64::MAX` for the newest.
    target: i64,
    /// Report a segment deleted after the listing instead of restoring up to it.
    relist: bool,
    t0: Instant,
}

/// One restore from one listing. With `relist`, returns `None` (and writes nothing) when a
/// listed segment disappeared before it was read.
async fn restore_listed(
    replica: &Replica,
    output: &Path,
    opts: &RestoreOptions,
    relist: bool,
) -> EngineResult<Option<RestoreReport>> {
    let run = Run {
        replica,
        output,
        opts,
        target: opts.target_ms.unwrap_or(i64::MAX),
        relist,
        t0: Instant::now(),
    };
    if output.exists() && !opts.overwrite {
        return Err(EngineError::OutputExists {
            path: output.to_path_buf(),
        });
    }
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
            .filter(|s| s.key.timestamp_ms() <= run.target)
            .collect();
        if candidates.is_empty() {
            passed.push((generation.prefix(), no_snapshot(objs, opts.target_ms)));
        }
        for snap in candidates {
            let ObjectKey::Snapshot { position, .. } = snap.key else {
                continue;
            };
            match from_snapshot(&run, generation, objs, snap, position, &mut skipped).await {
                Ok(Some((report, tmp))) => {
                    let listing = Listing {
                        generations: &generations,
                        generation,
                        objs,
                        ahead: &ahead,
                    };
                    return conclude(&run, &listing, report, tmp, skipped).map(Some);
                }
                Ok(None) => return Ok(None),
                Err(e) => skipped.push(fall_back(e, &snap.name)?),
            }
        }
        ahead.push(objs.clone());
    }
    if let Some((key, why)) = skipped.first() {
        tracing::error!(%key, reason = %why, skipped = skipped.len(), "no usable snapshot");
    }
    Err(nothing_restored(replica, opts.target_ms, skipped, passed).await?)
}

/// The decision on an attempt from a snapshot that failed: a damaged snapshot (or a
/// damaged image) is skipped, with why, and an older snapshot tried; any other error
/// (storage, transient or not, local I/O, encryption) ends the restore, so that a store
/// that failed for a moment never makes a restore settle for an older point.
fn fall_back(e: EngineError, snapshot: &str) -> EngineResult<(String, String)> {
    match e {
        EngineError::Corrupt { key, source } => {
            tracing::warn!(%key, error = %source, "snapshot unusable; trying an older one");
            Ok((key, source.to_string()))
        }
        EngineError::IntegrityCheck(why) => {
            tracing::warn!(key = %snapshot, reason = %why, "restored image failed its integrity check; trying an older snapshot");
            Ok((
                snapshot.to_string(),
                format!("integrity check failed: {why}"),
            ))
        }
        e => Err(e),
    }
}

/// Restores from one snapshot (at `position`), planning its chain again around each segment found
/// unusable (the parts of a merged segment, or the merged one, may still carry the history
/// past it). `None`: a segment disappeared and the replica must be listed again.
async fn from_snapshot(
    run: &Run<'_>,
    generation: GenerationId,
    objs: &GenerationObjects,
    snap: &Listed,
    position: u64,
    skipped: &mut Vec<(String, String)>,
) -> EngineResult<Option<(RestoreReport, TempOutput)>> {
    let target = run.target;
    let mut bad: HashSet<String> = HashSet::new();
    loop {
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
        let on_stop = OnStop {
            better_without: &better,
            relist: run.relist,
        };
        let done = attempt(
            run.replica,
            generation,
            snap,
            &chain,
            run.output,
            run.opts,
            on_stop,
        );
        match done.await? {
            Attempt::Done(report, tmp) => return Ok(Some((*report, tmp))),
            Attempt::Gone { key } => {
                tracing::warn!(%key, "a segment disappeared during the restore; listing the replica again");
                return Ok(None);
            }
            Attempt::Avoid { key, why, reached } => {
                tracing::warn!(generation = %generation, %key, reason = %why, position = reached, "a segment is unusable; restoring again around it");
                bad.insert(key.clone());
                skipped.push((key, why));
            }
        }
    }
}

/// The listing a restored generation was chosen from.
struct Listing<'a> {
    generations: &'a [(GenerationId, GenerationObjects)],
    generation: GenerationId,
    objs: &'a GenerationObjects,
    /// Generations tried before it, that restored nothing.
    ahead: &'a [GenerationObjects],
}

/// Completes the report of a verified restore (what was skipped, its gap, times running
/// backwards), then moves it into place, unless it is partial and that was not accepted.
fn conclude(
    run: &Run<'_>,
    listing: &Listing<'_>,
    mut report: RestoreReport,
    tmp: TempOutput,
    mut skipped: Vec<(String, String)>,
) -> EngineResult<RestoreReport> {
    let (opts, target, generation) = (run.opts, run.target, listing.generation);
    if opts.target_ms.is_some() {
        report.times_backwards = times_backwards(listing.generations, generation, target);
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
    report.gap = find_gap(report.position, listing.objs, listing.ahead, target);
    if let Some(gap) = &report.gap {
        tracing::warn!(
            generation = %generation, position = gap.from, beyond = gap.beyond.len(),
            first = %gap.beyond[0], "partial restore: objects exist beyond the point restored"
        );
        if !opts.allow_partial {
            drop(tmp);
            report.elapsed_ms = run.t0.elapsed().as_millis() as u64;
            return Err(EngineError::Partial {
                report: Box::new(report),
            });
        }
    }
    install(tmp, run.output, opts.overwrite)?;
    report.elapsed_ms = run.t0.elapsed().as_millis() as u64;
    tracing::info!(
        generation = %generation, position = report.position, segments = report.segments,
        bytes = report.bytes, elapsed_ms = report.elapsed_ms, "restored"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use walship_format::FormatError;
    use walship_storage::StorageError;

    #[test]
    fn a_damaged_snapshot_or_image_falls_back_to_an_older_snapshot() {
        let corrupt = EngineError::Corrupt {
            key: "generations/x/snapshots/s.wsnap".into(),
            source: FormatError::corrupt("bad CRC"),
        };
        let (key, why) = fall_back(corrupt, "s").unwrap();
        assert_eq!(key, "generations/x/snapshots/s.wsnap");
        assert!(why.contains("bad CRC"), "{why}");
        let check = EngineError::IntegrityCheck("page 3".into());
        let (key, why) = fall_back(check, "s").unwrap();
        assert_eq!(
            (key.as_str(), why.as_str()),
            ("s", "integrity check failed: page 3")
        );
    }

    #[test]
    fn a_transient_storage_error_ends_the_restore_instead_of_falling_back() {
        let e = EngineError::Storage(StorageError::Unavailable {
            store: "s3://b".into(),
            detail: "503".into(),
        });
        let e = fall_back(e, "s").unwrap_err();
        assert!(e.is_transient(), "{e:?}");
        let e = EngineError::io("download k", std::io::Error::other("reset"));
        assert!(fall_back(e, "s").is_err());
    }
}
