//! What the replica holds, from a listing kept in memory. The replica is listed again only
//! after the replicator uploaded something since the last listing, so an idle database
//! costs no request however often `/health` or the dashboard is polled.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use walship_engine::{Replica, Status};
use walship_format::key::ObjectKey;

use super::{now_ms, rfc3339};

/// Generations whose objects are listed (older ones are named only).
const LISTED_GENERATIONS: usize = 20;

/// A snapshot in the replica.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    pub key: String,
    pub position: u64,
    pub position_hex: String,
    pub time: String,
    pub time_ms: i64,
    pub bytes: u64,
}

/// A generation in the replica.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationInfo {
    pub generation: String,
    pub created: String,
    pub created_ms: i64,
    /// False for old generations past the listing limit: only the id is known.
    pub listed: bool,
    /// Newest first.
    pub snapshots: Vec<SnapshotInfo>,
    pub segments: usize,
    pub segment_bytes: u64,
    pub bytes: u64,
    /// Position of the last segment that continues the chain from the newest snapshot.
    pub end_position: u64,
    pub oldest: Option<String>,
    pub newest: Option<String>,
    pub newest_ms: Option<i64>,
    /// Keys under the generation that walship did not write.
    pub foreign: usize,
}

/// A listing of the replica.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub replica: String,
    pub listed_at: String,
    pub listed_at_ms: i64,
    /// Newest first.
    pub generations: Vec<GenerationInfo>,
    /// Snapshots in all listed generations.
    pub snapshots: u64,
    pub bytes: u64,
    pub oldest_restorable: Option<String>,
    pub newest: Option<String>,
    #[serde(skip)]
    pub newest_ms: Option<i64>,
    #[serde(skip)]
    pub newest_snapshot_ms: Option<i64>,
    /// Write time of the oldest segment after the newest snapshot of the newest generation.
    #[serde(skip)]
    pub replay_since_ms: Option<i64>,
}

#[derive(Debug)]
struct Cached {
    at: Instant,
    objects_uploaded: u64,
    listing: Arc<Listing>,
}

/// The cache.
#[derive(Debug, Default)]
pub struct Inventory {
    cache: tokio::sync::Mutex<Option<Cached>>,
    /// The last listing, readable without waiting for one in progress.
    last: std::sync::Mutex<Option<(Arc<Listing>, u64)>>,
}

impl Inventory {
    /// The listing, listed again when the replicator uploaded since and the last listing is
    /// older than `min_age`.
    pub async fn get(
        &self,
        replica: &Replica,
        status: &Status,
        min_age: Duration,
    ) -> walship_engine::EngineResult<Arc<Listing>> {
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.as_ref() {
            let unchanged = c.objects_uploaded == status.objects_uploaded;
            if unchanged || c.at.elapsed() < min_age {
                return Ok(c.listing.clone());
            }
        }
        let listing = Arc::new(list(replica).await?);
        *cache = Some(Cached {
            at: Instant::now(),
            objects_uploaded: status.objects_uploaded,
            listing: listing.clone(),
        });
        if let Ok(mut last) = self.last.lock() {
            *last = Some((listing.clone(), status.snapshots));
        }
        Ok(listing)
    }

    /// The last listing and the replicator's snapshot count when it was taken, if any.
    pub fn last(&self) -> Option<(Arc<Listing>, u64)> {
        self.last.lock().ok().and_then(|l| l.clone())
    }
}

async fn list(replica: &Replica) -> walship_engine::EngineResult<Listing> {
    let gens = replica.generations().await?;
    let mut out = Listing {
        replica: replica.describe(),
        listed_at: rfc3339(now_ms()),
        listed_at_ms: now_ms(),
        generations: Vec::with_capacity(gens.len()),
        snapshots: 0,
        bytes: 0,
        oldest_restorable: None,
        newest: None,
        newest_ms: None,
        newest_snapshot_ms: None,
        replay_since_ms: None,
    };
    let mut oldest_snapshot: Option<i64> = None;
    for (i, g) in gens.iter().enumerate() {
        let mut info = GenerationInfo {
            generation: g.to_string(),
            created: rfc3339(g.created_ms()),
            created_ms: g.created_ms(),
            listed: i < LISTED_GENERATIONS,
            snapshots: Vec::new(),
            segments: 0,
            segment_bytes: 0,
            bytes: 0,
            end_position: 0,
            oldest: None,
            newest: None,
            newest_ms: None,
            foreign: 0,
        };
        if !info.listed {
            out.generations.push(info);
            continue;
        }
        let objs = replica.objects(*g).await?;
        info.foreign = objs.foreign.len();
        for s in &objs.snapshots {
            if let ObjectKey::Snapshot {
                position,
                timestamp_ms,
                ..
            } = s.key
            {
                info.snapshots.push(SnapshotInfo {
                    key: s.name.clone(),
                    position,
                    position_hex: format!("{position:#018x}"),
                    time: rfc3339(timestamp_ms),
                    time_ms: timestamp_ms,
                    bytes: s.size,
                });
                oldest_snapshot =
                    Some(oldest_snapshot.map_or(timestamp_ms, |o| o.min(timestamp_ms)));
            }
        }
        info.segments = objs.segments.len();
        info.segment_bytes = objs.segments.iter().map(|l| l.size).sum();
        info.bytes = info.segment_bytes + objs.snapshots.iter().map(|l| l.size).sum::<u64>();
        let times = objs
            .snapshots
            .iter()
            .chain(&objs.segments)
            .map(|l| l.key.timestamp_ms());
        let (mut lo, mut hi) = (None::<i64>, None::<i64>);
        for t in times {
            lo = Some(lo.map_or(t, |v| v.min(t)));
            hi = Some(hi.map_or(t, |v| v.max(t)));
        }
        info.oldest = lo.map(rfc3339);
        info.newest = hi.map(rfc3339);
        info.newest_ms = hi;
        // The chain from the newest snapshot, and what restore would replay after it.
        if let Some(newest_snap) = info.snapshots.first() {
            let mut end = newest_snap.position;
            let mut first_after = None;
            let chain = walship_engine::replica::chain(
                &objs.segments,
                newest_snap.position,
                i64::MAX,
                &Default::default(),
            );
            for seg in chain {
                if let ObjectKey::Segment {
                    end: e,
                    timestamp_ms,
                    ..
                } = seg.key
                {
                    end = e;
                    first_after.get_or_insert(timestamp_ms);
                }
            }
            info.end_position = end;
            // The newest point is where a restore goes: the highest generation id with a
            // snapshot (generations are listed by id; never by a writer's clock).
            if out.newest_ms.is_none() {
                out.replay_since_ms = first_after;
                out.newest_ms = hi;
                out.newest_snapshot_ms = Some(newest_snap.time_ms);
            }
        }
        out.snapshots += info.snapshots.len() as u64;
        out.bytes += info.bytes;
        out.generations.push(info);
    }
    out.newest = out.newest_ms.map(rfc3339);
    out.oldest_restorable = oldest_snapshot.map(rfc3339);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lists_again_only_after_uploads() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let url: walship_storage::ReplicaUrl = format!("file://{}", dir.path().display())
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let store = walship_storage::open(&url, &Default::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let replica = Replica::new(store);
        let inv = Inventory::default();
        let mut st = Status::default();
        let a = inv
            .get(&replica, &st, Duration::ZERO)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.snapshots, 0);
        let b = inv
            .get(&replica, &st, Duration::ZERO)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(Arc::ptr_eq(&a, &b), "listed again without an upload");
        st.objects_uploaded = 1;
        st.snapshots = 1;
        let c = inv
            .get(&replica, &st, Duration::ZERO)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(inv.last().map(|(_, n)| n), Some(1));
    }
}
