//! What a restore would read, from the listing alone: nothing is downloaded and nothing is
//! written (`walship restore --dry-run`).

use std::collections::HashSet;

use walship_format::key::{GenerationId, ObjectKey};

use super::gap::{Gap, find_gap};
use crate::error::EngineResult;
use crate::replica::{Listed, Replica};

/// The objects a restore would read, and what it would leave out.
#[derive(Debug, Clone)]
pub struct RestorePlan {
    /// The generation it would restore from.
    pub generation: GenerationId,
    /// Its newest snapshot at or before the target.
    pub snapshot: Listed,
    /// The segments that continue it, in the order they would be applied.
    pub segments: Vec<Listed>,
    /// The position the restore would reach, by the keys.
    pub position: u64,
    /// Write time of the last object it would apply (ms since the epoch, from its key).
    pub timestamp_ms: i64,
    /// Bytes of objects to read.
    pub bytes: u64,
    /// What it would not reach although the replica holds it: `Some` makes it partial.
    pub gap: Option<Gap>,
}

/// Plans a restore of `replica` as of `target_ms` (`None`: the newest point), the way
/// [`super::restore`] chooses its first attempt: the first generation in its order with a
/// snapshot at or before the target, its newest such snapshot, and the segments that
/// continue it. Objects are judged by their keys: one that fails to verify when restored
/// can still make the restore stop earlier, or fall back to an older snapshot.
pub async fn plan(replica: &Replica, target_ms: Option<i64>) -> EngineResult<RestorePlan> {
    let target = target_ms.unwrap_or(i64::MAX);
    let mut ahead = Vec::new();
    let mut passed = Vec::new();
    for (generation, objs) in super::in_id_order(replica).await? {
        let Some(snap) = objs
            .snapshots
            .iter()
            .find(|s| s.key.timestamp_ms() <= target)
        else {
            passed.push((generation.prefix(), super::no_snapshot(&objs, target_ms)));
            ahead.push(objs);
            continue;
        };
        let ObjectKey::Snapshot { position: from, .. } = snap.key else {
            ahead.push(objs);
            continue;
        };
        let segments: Vec<Listed> =
            crate::replica::chain(&objs.segments, from, target, &HashSet::new())
                .into_iter()
                .cloned()
                .collect();
        let (position, timestamp_ms) = match segments.last().map(|l| l.key) {
            Some(ObjectKey::Segment {
                end, timestamp_ms, ..
            }) => (end, timestamp_ms),
            _ => (from, snap.key.timestamp_ms()),
        };
        let bytes = snap.size + segments.iter().map(|s| s.size).sum::<u64>();
        let gap = find_gap(position, &objs, &ahead, target);
        return Ok(RestorePlan {
            generation,
            snapshot: snap.clone(),
            segments,
            position,
            timestamp_ms,
            bytes,
            gap,
        });
    }
    Err(super::nothing_restored(replica, target_ms, Vec::new(), passed).await?)
}
