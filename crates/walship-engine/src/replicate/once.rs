//! One pass of replication, for cron jobs and deploy hooks (`walship replicate --once`):
//! take the lease, resume the replica (or start a generation with a snapshot), ship every
//! committed transaction, write a snapshot when one is due or asked for, and let go of the
//! lease.
//!
//! Between passes nothing holds the pin, so the app's own checkpoints may restart the WAL;
//! the next pass then cannot prove the replica continuous and starts a new generation with
//! a snapshot, as a replicator started late does. A pass over an unchanged database
//! uploads nothing but the lease.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use walship_format::key::{GenerationId, ObjectKey};

use super::{Replicator, Start, Status, now_ms};
use crate::error::EngineResult;
use crate::replica::Replica;
use crate::replicate::ReplicateOptions;

/// What one pass did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnceReport {
    /// The generation the replica continues in.
    pub generation: GenerationId,
    /// The replica's position after the pass.
    pub position: u64,
    /// Objects uploaded (segments and snapshots; the lease is not counted).
    pub objects_uploaded: u64,
    /// Their bytes.
    pub bytes_uploaded: u64,
    /// Snapshots written: a new generation's, a due one or a forced one.
    pub snapshots: u64,
    /// Whether the pass started a new generation (the replica was empty, or could not be
    /// continued from the WAL on disk).
    pub new_generation: bool,
}

/// Runs one pass over `db_path` into `replica` (see the module's documentation). A snapshot
/// is written when `force_snapshot`, or when the database changed since the generation's
/// newest snapshot and that snapshot is older than `opts.snapshot_interval` (or its time
/// is ahead of this clock, which then proves nothing). Retention runs after a snapshot, as
/// in a continuous replicator; compaction does not run. `cancel` stops a wait for the
/// lease.
pub async fn once(
    db_path: PathBuf,
    replica: Replica,
    mut opts: ReplicateOptions,
    force_snapshot: bool,
    cancel: &CancellationToken,
) -> EngineResult<OnceReport> {
    // Merges run beside the loop; one pass would only start and abandon them.
    opts.compaction.fan_in = 0;
    // A pass that cannot start reports it (a cron job's exit status), rather than waiting.
    opts.retry_start = false;
    let span = tracing::info_span!(
        "replicator",
        db = %db_path.display(),
        replica = %replica.describe()
    );
    async move {
        let (_cmd_tx, cmd_rx) = mpsc::channel(1);
        let (status_tx, status_rx) = watch::channel(Status::default());
        let dirty = Arc::new(AtomicI64::new(0));
        let mut rep = Replicator::start(
            db_path,
            replica,
            opts,
            status_tx,
            cmd_rx,
            Start::Resume,
            dirty,
            cancel,
        )
        .await?;
        let r = pass(&mut rep, force_snapshot).await;
        rep.let_go().await;
        r?;
        let st = status_rx.borrow().clone();
        Ok(OnceReport {
            generation: rep.tail.generation,
            position: rep.tail.position,
            objects_uploaded: st.objects_uploaded,
            bytes_uploaded: st.bytes_uploaded,
            snapshots: st.snapshots,
            new_generation: st.generations_started > 0,
        })
    }
    .instrument(span)
    .await
}

/// Ships everything, then writes a snapshot if one is due.
async fn pass(rep: &mut Replicator, force_snapshot: bool) -> EngineResult<()> {
    rep.sync_once().await?;
    let written = rep.status.borrow().snapshots > 0;
    // The generation's newest snapshot is looked up only when it can matter.
    let newest = if !written && !force_snapshot && rep.changed_since_snapshot {
        newest_snapshot_ms(&rep.replica, rep.tail.generation).await?
    } else {
        None
    };
    let due = snapshot_due(
        force_snapshot,
        written,
        rep.changed_since_snapshot,
        newest,
        now_ms(),
        rep.opts.snapshot_interval,
    );
    if due {
        rep.write_snapshot().await?;
    }
    Ok(())
}

/// The time of a generation's newest snapshot (the one at its highest position; the latest
/// of several there).
async fn newest_snapshot_ms(
    replica: &Replica,
    generation: GenerationId,
) -> EngineResult<Option<i64>> {
    let objs = replica.objects(generation).await?;
    let position = |k: &ObjectKey| match k {
        ObjectKey::Snapshot { position, .. } => Some(*position),
        ObjectKey::Segment { .. } => None,
    };
    let Some(at) = objs.snapshots.first().and_then(|s| position(&s.key)) else {
        return Ok(None);
    };
    Ok(objs
        .snapshots
        .iter()
        .filter(|s| position(&s.key) == Some(at))
        .map(|s| s.key.timestamp_ms())
        .max())
}

/// Whether a pass writes a snapshot after shipping: not when it already wrote one (a new
/// generation starts with one); always when forced; otherwise only when something was
/// shipped since the newest snapshot and that snapshot is `interval` old, is missing, or
/// carries a time ahead of this clock (a writer's clock that ran ahead says nothing about
/// its age).
pub fn snapshot_due(
    force: bool,
    written: bool,
    changed: bool,
    newest_ms: Option<i64>,
    now_ms: i64,
    interval: Duration,
) -> bool {
    if written {
        return false;
    }
    if force {
        return true;
    }
    if !changed {
        return false;
    }
    match newest_ms {
        None => true,
        Some(t) => {
            let interval_ms = i64::try_from(interval.as_millis()).unwrap_or(i64::MAX);
            t > now_ms || now_ms.saturating_sub(t) >= interval_ms
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;
    const FIVE_MIN: Duration = Duration::from_secs(300);

    #[test]
    fn no_second_snapshot_after_a_new_generation_even_when_forced() {
        assert!(!snapshot_due(true, true, true, Some(0), NOW, FIVE_MIN));
    }

    #[test]
    fn a_forced_snapshot_is_written_even_without_changes() {
        assert!(snapshot_due(true, false, false, Some(NOW), NOW, FIVE_MIN));
    }

    #[test]
    fn an_unchanged_database_gets_no_snapshot_however_old_the_last() {
        assert!(!snapshot_due(false, false, false, Some(0), NOW, FIVE_MIN));
        assert!(!snapshot_due(false, false, false, None, NOW, FIVE_MIN));
    }

    #[test]
    fn a_changed_database_gets_one_once_the_interval_passed() {
        let fresh = NOW - 299_999;
        let old = NOW - 300_000;
        assert!(!snapshot_due(
            false,
            false,
            true,
            Some(fresh),
            NOW,
            FIVE_MIN
        ));
        assert!(snapshot_due(false, false, true, Some(old), NOW, FIVE_MIN));
        assert!(snapshot_due(false, false, true, None, NOW, FIVE_MIN));
    }

    #[test]
    fn a_snapshot_time_ahead_of_this_clock_makes_one_due() {
        assert!(snapshot_due(
            false,
            false,
            true,
            Some(NOW + 3_600_000),
            NOW,
            FIVE_MIN
        ));
    }
}
