//! One attempt: one snapshot and the chain of segments after it, into a temporary file that
//! is checked, then handed back to be moved into place. The steps: [`temp_output`],
//! [`write_snapshot`], [`apply_segments`], then [`super::verify::finish`].

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use walship_format::FormatError;
use walship_format::key::{GenerationId, ObjectKey};
use walship_format::object::{ObjectHeader, ObjectReader};
use walship_storage::StorageError;

use super::apply::read_segment;
use super::fetch::{
    Counted, Fetched, classify, decoding, download, prefetch_segments, run_blocking_with_stream,
};
use super::gap::disagreement;
use super::verify::{TempOutput, finish};
use super::{RestoreOptions, RestoreProgress, RestoreReport};
use crate::AbortOnDrop;
use crate::error::{EngineError, EngineResult};
use crate::replica::{Listed, Replica};

/// What an attempt does when its chain stops early.
#[derive(Clone, Copy)]
pub(super) struct OnStop<'a> {
    /// Whether leaving the segment out gives a chain reaching past the position reached.
    pub(super) better_without: &'a (dyn Fn(&str, u64) -> bool + Sync),
    /// Report a segment deleted after the listing instead of restoring up to it.
    pub(super) relist: bool,
}

/// How an attempt from one snapshot ended.
pub(super) enum Attempt {
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

/// Why the chain of segments stopped before its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Stop {
    /// The segment was deleted after the listing (a live replicator compacted it away).
    Gone { key: String },
    /// The segment failed to verify.
    Unusable { key: String, why: String },
}

impl Stop {
    /// The segment's key.
    fn into_key(self) -> String {
        match self {
            Stop::Gone { key } | Stop::Unusable { key, .. } => key,
        }
    }
}

/// What to do about a chain that stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StopAction {
    /// List the replica again and start over (nothing written).
    Relist,
    /// Restore again leaving the segment out: a chain without it reaches further.
    Avoid,
    /// Keep what was restored up to the segment, and name it and the rest as skipped.
    Keep,
}

/// The decision on a chain that stopped at `stop`: a deleted segment means listing again
/// while that is still allowed (`relist`); an unusable one is avoided when a chain without
/// it goes further (`better_without`); otherwise the restore keeps what it reached.
pub(super) fn on_stop(stop: &Stop, relist: bool, better_without: bool) -> StopAction {
    match stop {
        Stop::Gone { .. } if relist => StopAction::Relist,
        Stop::Unusable { .. } if better_without => StopAction::Avoid,
        _ => StopAction::Keep,
    }
}

/// Restores `snap` and the segments of `chain` into a temporary file beside `output`, and
/// verifies it.
pub(super) async fn attempt(
    replica: &Replica,
    generation: GenerationId,
    snap: &Listed,
    chain: &[&Listed],
    output: &Path,
    opts: &RestoreOptions,
    stopped: OnStop<'_>,
) -> EngineResult<Attempt> {
    let t_start = Instant::now();
    let tmp = temp_output(output)?;
    let store = replica.store().clone();
    let mut report = RestoreReport {
        generation: Some(generation),
        snapshot: snap.name.clone(),
        ..Default::default()
    };

    // Segments are fetched from the start, while the snapshot downloads: small ones whole
    // (in parallel, held in memory), larger ones as streams read when applied.
    let (seg_tx, segments) = mpsc::channel(opts.parallelism.max(1));
    let names: Vec<String> = chain.iter().map(|s| s.name.clone()).collect();
    let _fetcher = AbortOnDrop(tokio::spawn(prefetch_segments(
        store,
        names,
        opts.parallelism.max(1),
        seg_tx,
    )));
    if let Some(p) = &opts.progress {
        p.start(snap.size + chain.iter().map(|s| s.size).sum::<u64>());
    }

    // 1. The snapshot, streamed into the temporary file.
    let (header, bytes) = write_snapshot(replica, snap, &tmp, opts.progress.clone()).await?;
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
    let target = Target {
        replica,
        generation,
        chain,
        file: &file,
        page_size,
        progress: opts.progress.as_ref(),
    };
    let (stop, remaining) = apply_segments(&target, segments, &mut report).await?;
    if let Some(stop) = stop
        && let Some(ended) = settle(stop, stopped, &mut report, remaining)
    {
        return Ok(ended);
    }
    tracing::debug!(
        segments = report.segments,
        elapsed_ms = t_snap.elapsed().as_millis() as u64,
        "segments applied"
    );
    if let Some(p) = &opts.progress {
        p.verifying();
    }
    // 3. Size, fsync and integrity check.
    finish(file, &tmp, u64::from(report.pages) * u64::from(page_size)).await?;
    Ok(Attempt::Done(Box::new(report), tmp))
}

/// Settles a chain that stopped at `stop` ([`on_stop`]): an attempt to end without output
/// (list again, or restore around the segment), or `None` to keep what was reached, with
/// the segment and those after it (`remaining`, last first) named as skipped in `report`.
fn settle(
    stop: Stop,
    stopped: OnStop<'_>,
    report: &mut RestoreReport,
    mut remaining: Vec<String>,
) -> Option<Attempt> {
    let better = match &stop {
        Stop::Unusable { key, .. } => (stopped.better_without)(key, report.position),
        Stop::Gone { .. } => false,
    };
    let (key, why) = match (on_stop(&stop, stopped.relist, better), stop) {
        (StopAction::Relist, stop) => {
            return Some(Attempt::Gone {
                key: stop.into_key(),
            });
        }
        (StopAction::Avoid, Stop::Unusable { key, why }) => {
            return Some(Attempt::Avoid {
                key,
                why,
                reached: report.position,
            });
        }
        (_, Stop::Gone { key }) => (key, GONE.to_string()),
        (_, Stop::Unusable { key, why }) => (key, why),
    };
    report.stopped_at = Some(key.clone());
    report.skipped.push((key, why));
    while let Some(rest) = remaining.pop() {
        report
            .skipped
            .push((rest, "after a skipped segment".into()));
    }
    None
}

/// Why a segment listed at the start was not applied: it was deleted meanwhile (the reason
/// a report gives; nothing compares it).
const GONE: &str = "disappeared during restore";

/// A temporary output beside `output` (its directory created), removed unless kept.
fn temp_output(output: &Path) -> EngineResult<TempOutput> {
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
    Ok(TempOutput {
        path: dir.join(format!(
            ".{name}.walship-restore-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        )),
        keep: false,
    })
}

/// Streams the snapshot `snap` into the temporary file, checking its header against its
/// key; returns the header and the bytes read.
async fn write_snapshot(
    replica: &Replica,
    snap: &Listed,
    tmp: &TempOutput,
    progress: Option<Arc<dyn RestoreProgress>>,
) -> EngineResult<(ObjectHeader, u64)> {
    let body = download(replica.store().clone(), snap.name.clone());
    let tmp_path = tmp.path.clone();
    let key = snap.name.clone();
    let snap_key: ObjectKey = snap.key;
    let keys = replica.keys().cloned();
    run_blocking_with_stream(body, move |reader| {
        let reader = Counted {
            inner: reader,
            progress,
        };
        let mut r = ObjectReader::with_keys(reader, keys.as_deref())
            .map_err(|source| decoding(&key, source))?;
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
    .await
}

/// Where segments are applied: the restored file and what checking a segment needs.
struct Target<'a> {
    replica: &'a Replica,
    generation: GenerationId,
    chain: &'a [&'a Listed],
    file: &'a Arc<File>,
    page_size: u32,
    progress: Option<&'a Arc<dyn RestoreProgress>>,
}

/// Applies the fetched segments in order onto the file, advancing `report`. Returns where
/// the chain stopped early, if it did, and the names not reached (last first).
async fn apply_segments(
    t: &Target<'_>,
    mut segments: mpsc::Receiver<Fetched>,
    report: &mut RestoreReport,
) -> EngineResult<(Option<Stop>, Vec<String>)> {
    let mut remaining: Vec<String> = t.chain.iter().rev().map(|s| s.name.clone()).collect();
    // One spool buffer, handed from segment to segment: fresh multi-MiB buffers would each
    // cost page faults and zeroing.
    let mut spool_buf: Vec<u8> = Vec::new();
    while let Some((name, got)) = segments.recv().await {
        remaining.pop();
        let obj = match got {
            Ok(o) => o,
            Err(StorageError::NotFound { .. }) => {
                return Ok((Some(Stop::Gone { key: name }), remaining));
            }
            Err(e) => return Err(e.into()),
        };
        let file = t.file.clone();
        let key = name.clone();
        let listed = t.chain.iter().find(|l| l.name == name).map(|l| l.key);
        let expect_start = report.position;
        let keys = t.replica.keys().cloned();
        let buf = std::mem::take(&mut spool_buf);
        let (generation, page_size) = (t.generation, t.page_size);
        let r = run_blocking_with_stream(obj.body, move |reader| {
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
                .apply(&file)
                .map_err(|e| EngineError::io("write temporary output", e))?;
            Ok((seg.header, seg.pages.into_buf()))
        })
        .await;
        match r {
            Ok(((h, buf), n)) => {
                spool_buf = buf;
                if let Some(p) = t.progress {
                    p.advance(n);
                }
                report.bytes += n;
                report.position = h.end;
                report.pages = h.db_pages;
                report.timestamp_ms = h.timestamp_ms;
                report.segments += 1;
            }
            Err(EngineError::Corrupt { key, source }) => {
                let why = source.to_string();
                return Ok((Some(Stop::Unusable { key, why }), remaining));
            }
            Err(e) => return Err(e),
        }
    }
    Ok((None, remaining))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gone() -> Stop {
        Stop::Gone { key: "s".into() }
    }

    fn unusable() -> Stop {
        Stop::Unusable {
            key: "s".into(),
            why: "bad CRC".into(),
        }
    }

    #[test]
    fn a_deleted_segment_means_listing_again_until_relisting_is_spent() {
        assert_eq!(on_stop(&gone(), true, false), StopAction::Relist);
        assert_eq!(on_stop(&gone(), true, true), StopAction::Relist);
        assert_eq!(on_stop(&gone(), false, true), StopAction::Keep);
    }

    #[test]
    fn an_unusable_segment_is_avoided_only_when_a_chain_without_it_goes_further() {
        assert_eq!(on_stop(&unusable(), true, true), StopAction::Avoid);
        assert_eq!(on_stop(&unusable(), false, true), StopAction::Avoid);
        assert_eq!(on_stop(&unusable(), true, false), StopAction::Keep);
        assert_eq!(on_stop(&unusable(), false, false), StopAction::Keep);
    }
}
