//! What a restore would read, from the listing alone: nothing is downloaded and nothing is
//! written (`walship restore --dry-run`).

use std::collections::HashSet;

use walship_format::key::{GENERATIONS_DIR, GenerationId, ObjectKey, format_rfc3339};

use super::gap::{Gap, find_gap};
use crate::error::{EngineError, EngineResult};
use crate::replica::{GenerationObjects, Listed, Replica};

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

/// Every generation with its objects, the highest id (the newest, by construction) first.
pub(super) async fn in_id_order(
    replica: &Replica,
) -> EngineResult<Vec<(GenerationId, GenerationObjects)>> {
    let mut gens = Vec::new();
    // `generations` sorts by id, highest first.
    for generation in replica.generations().await? {
        gens.push((generation, replica.objects(generation).await?));
    }
    Ok(gens)
}

/// Why a generation had no snapshot to try.
pub(super) fn no_snapshot(objs: &GenerationObjects, target_ms: Option<i64>) -> String {
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

/// The error when nothing was restored: [`EngineError::NothingToRestore`] only when the
/// replica holds no object at all under `generations/` (a lease alone holds no data);
/// otherwise [`EngineError::Unrestorable`], naming what was tried and why each failed.
pub(super) async fn nothing_restored(
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bytes::Bytes;
    use std::sync::Arc;
    use walship_storage::ObjectStore;

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
