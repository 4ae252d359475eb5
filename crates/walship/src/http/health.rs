//! Health of a replicated database: `healthy`, `warning` or `critical`, from how old the
//! newest restorable point is and how long WAL has piled up after the newest snapshot.
//!
//! The newest restorable point is the last moment the replica held everything committed
//! (the replicator's last complete sync), or, before the first sync, the newest object in
//! the replica. An idle database stays healthy: nothing is uploaded, yet nothing would be
//! lost. Before any backup exists the age counts from the process start.

use std::time::Duration;

use serde::Serialize;
use walship_engine::Status;

use super::rfc3339;

/// Where warning and critical start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Newest restorable point older than this: warning.
    pub point_warn: Duration,
    /// ... critical.
    pub point_critical: Duration,
    /// WAL piling up after the newest snapshot for longer than this: warning.
    pub snapshot_warn: Duration,
    /// ... critical.
    pub snapshot_critical: Duration,
}

impl Thresholds {
    /// Defaults for a replicator that snapshots every `interval`.
    pub fn for_snapshot_interval(interval: Duration) -> Self {
        Thresholds {
            point_warn: Duration::from_secs(60),
            point_critical: Duration::from_secs(300),
            snapshot_warn: interval * 2 + Duration::from_secs(60),
            snapshot_critical: interval * 4 + Duration::from_secs(300),
        }
    }
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds::for_snapshot_interval(Duration::from_secs(300))
    }
}

/// The verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Backups are fresh.
    Healthy,
    /// Behind: alert, do not restart anything (HTTP 200).
    Warning,
    /// Data would be lost if the machine died now (HTTP 503).
    Critical,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Healthy => "healthy",
            Level::Warning => "warning",
            Level::Critical => "critical",
        }
    }

    /// 0, 1, 2 (the `walship_health` metric).
    pub fn code(self) -> i64 {
        self as i64
    }
}

/// What health is computed from, besides the status.
#[derive(Debug, Clone, Copy, Default)]
pub struct Facts {
    /// Now (ms since the epoch).
    pub now_ms: i64,
    /// When monitoring started.
    pub started_ms: i64,
    /// Newest object in the replica (listing or this process's uploads).
    pub latest_backup_ms: Option<i64>,
    /// Newest snapshot in the replica.
    pub newest_snapshot_ms: Option<i64>,
    /// Write time of the oldest segment not covered by the newest snapshot.
    pub replay_since_ms: Option<i64>,
    /// Snapshots in the replica.
    pub backups: u64,
}

/// The health of one database, as `/health` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DbHealth {
    pub status: Level,
    /// Why it is not healthy (empty when healthy).
    pub reasons: Vec<String>,
    /// Snapshots in the replica (each a full restorable base).
    pub backups: u64,
    pub latest_backup: Option<String>,
    pub latest_backup_age_seconds: Option<f64>,
    pub newest_restorable_point: Option<String>,
    pub newest_restorable_age_seconds: f64,
    pub newest_snapshot: Option<String>,
    pub snapshot_age_seconds: Option<f64>,
    /// How long WAL has been piling up after the newest snapshot (what restore replays).
    pub wal_since_snapshot_seconds: Option<f64>,
    /// Age of the oldest committed transaction not yet in the replica (0 when in sync).
    pub replication_lag_seconds: f64,
    pub last_error: Option<String>,
    pub consecutive_errors: u64,
}

fn secs(ms: i64) -> f64 {
    (ms.max(0) as f64) / 1000.0
}

/// Replication lag in seconds from a status.
pub fn lag_seconds(s: &Status, now_ms: i64) -> f64 {
    s.unsynced_since_ms.map_or(0.0, |t| secs(now_ms - t))
}

/// Evaluates health.
pub fn evaluate(s: &Status, f: &Facts, t: &Thresholds) -> DbHealth {
    let now = f.now_ms;
    let latest_backup_ms = match (f.latest_backup_ms, s.last_upload_ms) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let restorable_ms = match (s.last_synced_ms, latest_backup_ms) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let point_age_ms = now - restorable_ms.unwrap_or(f.started_ms);
    let newest_snapshot_ms = match (f.newest_snapshot_ms, s.last_snapshot_ms) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let mut level = Level::Healthy;
    let mut reasons = Vec::new();
    let mut raise = |l: Level, why: String| {
        level = level.max(l);
        reasons.push(why);
    };
    if let Some(holder) = &s.lease_lost {
        raise(
            Level::Critical,
            format!(
                "the replicator lost the replica's lease to {holder} and stopped: another replicator writes to this replica now, and nothing more of this database is shipped (stop one of them)"
            ),
        );
    }
    let point = Duration::from_millis(point_age_ms.max(0) as u64);
    let what = if restorable_ms.is_some() {
        "the newest restorable point is"
    } else {
        "no backup yet, and the replicator started"
    };
    if point >= t.point_critical {
        raise(
            Level::Critical,
            format!(
                "{what} {}s old (critical at {}s)",
                point.as_secs(),
                t.point_critical.as_secs()
            ),
        );
    } else if point >= t.point_warn {
        raise(
            Level::Warning,
            format!(
                "{what} {}s old (warning at {}s)",
                point.as_secs(),
                t.point_warn.as_secs()
            ),
        );
    }
    let wal_since_snapshot_ms = f.replay_since_ms.map(|r| (now - r).max(0));
    if let Some(ms) = wal_since_snapshot_ms {
        let d = Duration::from_millis(ms as u64);
        if d >= t.snapshot_critical {
            raise(
                Level::Critical,
                format!(
                    "WAL has piled up after the newest snapshot for {}s (critical at {}s)",
                    d.as_secs(),
                    t.snapshot_critical.as_secs()
                ),
            );
        } else if d >= t.snapshot_warn {
            raise(
                Level::Warning,
                format!(
                    "WAL has piled up after the newest snapshot for {}s (warning at {}s)",
                    d.as_secs(),
                    t.snapshot_warn.as_secs()
                ),
            );
        }
    }
    // A store that stopped answering shows at once, long before the restorable point ages.
    if let Some(since) = s.stalled_since_ms {
        raise(
            Level::Warning,
            format!(
                "the storage has not answered {} for {}s",
                s.stalled_call.as_deref().unwrap_or("a call"),
                (now - since).max(0) / 1000
            ),
        );
    }
    // A replicator that keeps failing to start (its first snapshot, usually) shows at once.
    if s.last_synced_ms.is_none() && s.consecutive_errors > 0 {
        raise(
            Level::Warning,
            format!(
                "replication has not started: {} failed attempts, retrying",
                s.consecutive_errors
            ),
        );
    }
    if let Some(e) = &s.last_error
        && level > Level::Healthy
    {
        reasons.push(format!("last error: {e}"));
    }
    DbHealth {
        status: level,
        reasons,
        backups: f.backups.max(u64::from(newest_snapshot_ms.is_some())),
        latest_backup: latest_backup_ms.map(rfc3339),
        latest_backup_age_seconds: latest_backup_ms.map(|t| secs(now - t)),
        newest_restorable_point: restorable_ms.map(rfc3339),
        newest_restorable_age_seconds: secs(point_age_ms),
        newest_snapshot: newest_snapshot_ms.map(rfc3339),
        snapshot_age_seconds: newest_snapshot_ms.map(|t| secs(now - t)),
        wal_since_snapshot_seconds: wal_since_snapshot_ms.map(secs),
        replication_lag_seconds: lag_seconds(s, now),
        last_error: s.last_error.clone(),
        consecutive_errors: s.consecutive_errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000_000;

    fn facts(now: i64) -> Facts {
        Facts {
            now_ms: now,
            started_ms: T0,
            latest_backup_ms: Some(T0),
            newest_snapshot_ms: Some(T0),
            replay_since_ms: None,
            backups: 1,
        }
    }

    #[test]
    fn an_idle_database_in_sync_stays_healthy() {
        let now = T0 + 3_600_000;
        let s = Status {
            last_synced_ms: Some(now - 500),
            ..Default::default()
        };
        let h = evaluate(&s, &facts(now), &Thresholds::default());
        assert_eq!(h.status, Level::Healthy, "{:?}", h.reasons);
        assert_eq!(h.latest_backup_age_seconds, Some(3600.0));
        assert!(h.newest_restorable_age_seconds < 1.0);
    }

    #[test]
    fn a_stale_restorable_point_warns_then_goes_critical() {
        let t = Thresholds::default();
        let s = Status {
            last_synced_ms: Some(T0),
            unsynced_since_ms: Some(T0 + 10),
            last_error: Some("bucket unreachable".into()),
            consecutive_errors: 9,
            ..Default::default()
        };
        let h = evaluate(&s, &facts(T0 + 90_000), &t);
        assert_eq!(h.status, Level::Warning);
        assert!(h.reasons.iter().any(|r| r.contains("bucket unreachable")));
        assert!((h.replication_lag_seconds - 89.99).abs() < 0.01);
        let h = evaluate(&s, &facts(T0 + 301_000), &t);
        assert_eq!(h.status, Level::Critical);
    }

    #[test]
    fn wal_piling_up_after_the_snapshot_counts_from_the_first_segment() {
        let t = Thresholds::for_snapshot_interval(Duration::from_secs(60));
        let now = T0 + 10_000_000;
        let s = Status {
            last_synced_ms: Some(now),
            ..Default::default()
        };
        let mut f = facts(now);
        f.replay_since_ms = Some(now - 100_000);
        assert_eq!(evaluate(&s, &f, &t).status, Level::Healthy);
        f.replay_since_ms = Some(now - 200_000);
        assert_eq!(evaluate(&s, &f, &t).status, Level::Warning);
        f.replay_since_ms = Some(now - 600_000);
        assert_eq!(evaluate(&s, &f, &t).status, Level::Critical);
    }

    #[test]
    fn a_stalled_store_warns_at_once_with_the_call() {
        let now = T0 + 5_000;
        let s = Status {
            last_synced_ms: Some(T0),
            stalled_since_ms: Some(T0 + 1_000),
            stalled_call: Some("put `k` on s3://b".into()),
            last_error: Some("s3://b: no answer to put `k` for 3s".into()),
            ..Default::default()
        };
        let h = evaluate(&s, &facts(now), &Thresholds::default());
        assert_eq!(h.status, Level::Warning, "{:?}", h.reasons);
        assert!(
            h.reasons[0].contains("put `k` on s3://b for 4s"),
            "{:?}",
            h.reasons
        );
        assert!(h.reasons.iter().any(|r| r.contains("last error")));
    }

    #[test]
    fn a_replicator_failing_to_start_warns_at_once() {
        let f = Facts {
            now_ms: T0 + 2_000,
            started_ms: T0,
            ..Default::default()
        };
        let mut s = Status {
            consecutive_errors: 2,
            last_error: Some("snapshot upload failed".into()),
            ..Default::default()
        };
        let h = evaluate(&s, &f, &Thresholds::default());
        assert_eq!(h.status, Level::Warning, "{:?}", h.reasons);
        assert!(h.reasons[0].contains("has not started"), "{:?}", h.reasons);
        // Once it synced, a failed round alone is no reason (the restorable point's age is).
        s.last_synced_ms = Some(T0 + 1_000);
        assert_eq!(
            evaluate(&s, &f, &Thresholds::default()).status,
            Level::Healthy
        );
    }

    #[test]
    fn a_lost_lease_is_critical_at_once() {
        let now = T0 + 1_000;
        let s = Status {
            last_synced_ms: Some(now - 100),
            lease_lost: Some("pid 42 on host b".into()),
            ..Default::default()
        };
        let h = evaluate(&s, &facts(now), &Thresholds::default());
        assert_eq!(h.status, Level::Critical);
        assert!(h.reasons[0].contains("lost the replica's lease to pid 42 on host b"));
    }

    #[test]
    fn no_backup_counts_from_the_start() {
        let f = Facts {
            now_ms: T0 + 400_000,
            started_ms: T0,
            ..Default::default()
        };
        let h = evaluate(&Status::default(), &f, &Thresholds::default());
        assert_eq!(h.status, Level::Critical);
        assert!(h.reasons[0].contains("no backup yet"), "{:?}", h.reasons);
    }
}
