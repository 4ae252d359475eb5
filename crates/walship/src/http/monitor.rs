//! One monitor task per database: follows the replicator's status, records runs in the
//! history, feeds the snapshot-duration histogram, keeps the replica listing fresh (only
//! after uploads), evaluates health and sends alerts on changes.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use walship_engine::Status;

use super::alerts::{Alert, host_name};
use super::health::{self, DbHealth, Facts, Level};
use super::history::{Recorder, Run};
use super::{AppState, DbState, now_ms, rfc3339};

/// How often health is evaluated without a status change.
const TICK: Duration = Duration::from_secs(1);
/// Time between attempts to take the first listing while they fail.
const LIST_RETRY: Duration = Duration::from_secs(60);

/// What the monitor keeps between looks (shared with the API).
#[derive(Debug, Default)]
pub struct MonitorState {
    /// Health at the last evaluation.
    pub level: Option<Level>,
    /// An upload-failing alert was sent and not yet followed by a recovery.
    pub failing_alerted: bool,
    /// The lease-lost alert was sent.
    pub lease_lost_alerted: bool,
    /// Write time of the oldest segment after the newest snapshot.
    pub replay_since_ms: Option<i64>,
    /// A segment or snapshot was seen by this process (then the listing's idea of
    /// `replay_since_ms` is out of date).
    pub seen_uploads: bool,
    /// Trigger and request time of a snapshot asked through the API.
    pub pending_trigger: Option<(String, i64)>,
    /// Runs still going on (not in the history file yet).
    pub open_runs: Vec<Run>,
    /// The replicator's snapshot count at the last listing.
    pub listed_snapshots: Option<u64>,
    /// When a listing was last attempted.
    pub last_list_attempt_ms: Option<i64>,
}

/// The running monitors.
#[derive(Debug)]
pub struct Monitors {
    state: AppState,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Monitors {
    /// Takes a last look at every replicator (call it after their final sync), records the
    /// runs still open, and delivers queued alerts (at most 5 s).
    pub async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        self.state.inner.alerts.close(Duration::from_secs(5)).await;
    }
}

pub fn spawn(state: &AppState) -> Monitors {
    let stop = CancellationToken::new();
    let tasks = (0..state.inner.dbs.len())
        .map(|i| tokio::spawn(run(state.clone(), i, stop.clone())))
        .collect();
    Monitors {
        state: state.clone(),
        stop,
        tasks,
    }
}

/// Recent runs of `d`, newest first, including those still going on.
pub fn runs_of(d: &DbState, limit: usize) -> Vec<Run> {
    let open = d
        .monitor
        .lock()
        .map(|m| m.open_runs.clone())
        .unwrap_or_default();
    d.history.recent_with(&open, limit)
}

/// The facts health is computed from, for database `d` with status `st`.
pub fn facts(state: &AppState, d: &DbState, st: &Status, now: i64) -> Facts {
    let listing = d.inventory.last();
    let replay = d.monitor.lock().ok().and_then(|m| m.replay_since_ms);
    let (latest, newest_snap, backups) = match &listing {
        Some((l, snaps_then)) => (
            l.newest_ms,
            l.newest_snapshot_ms,
            l.snapshots + st.snapshots.saturating_sub(*snaps_then),
        ),
        None => (None, None, st.snapshots),
    };
    Facts {
        now_ms: now,
        started_ms: state.inner.started_ms,
        latest_backup_ms: latest,
        newest_snapshot_ms: newest_snap,
        replay_since_ms: replay,
        backups,
    }
}

/// Health of database `d` now.
pub fn health_of(state: &AppState, d: &DbState) -> (Status, DbHealth) {
    let now = now_ms();
    let st = d.db.handle.status();
    let f = facts(state, d, &st, now);
    let h = health::evaluate(&st, &f, &state.inner.opts.thresholds);
    (st, h)
}

async fn run(state: AppState, idx: usize, stop: CancellationToken) {
    let d = &state.inner.dbs[idx];
    let name = d.db.name.clone();
    let mut watch = d.db.handle.watch();
    let mut watching = true;
    let mut rec = Recorder::new(&name, Status::default());
    let mut prev = Status::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tick.tick() => false,
            r = watch.changed(), if watching => {
                if r.is_err() {
                    watching = false;
                }
                false
            }
        };
        let now = now_ms();
        let st = d.db.handle.status();
        look(&state, idx, &mut rec, &prev, &st, now).await;
        prev = st;
        if stopping {
            break;
        }
    }
    let last = rec.finish(now_ms());
    if let Ok(mut m) = state.inner.dbs[idx].monitor.lock() {
        m.open_runs.clear();
    }
    append(&state, idx, last).await;
}

async fn look(
    state: &AppState,
    idx: usize,
    rec: &mut Recorder,
    prev: &Status,
    st: &Status,
    now: i64,
) {
    let d = &state.inner.dbs[idx];
    // The run history.
    if let Ok(mut m) = d.monitor.lock()
        && st.snapshots > prev.snapshots
        && let Some((trigger, asked)) = m.pending_trigger.take()
    {
        if st.last_snapshot_ms.unwrap_or(now) >= asked {
            rec.next_snapshot_trigger = Some(trigger);
        } else {
            m.pending_trigger = Some((trigger, asked));
        }
    }
    let runs = rec.observe(st, now);
    if let Ok(mut m) = d.monitor.lock() {
        m.open_runs = rec.open_runs();
    }
    append(state, idx, runs).await;

    // Metrics that need an event, not a value.
    if st.snapshots > prev.snapshots {
        state
            .inner
            .metrics
            .observe_snapshot(&d.db.name, st.last_snapshot_duration_ms);
    }

    // What restore would replay after the newest snapshot.
    let new_snapshots = st.snapshots.saturating_sub(prev.snapshots);
    let new_segments = st
        .objects_uploaded
        .saturating_sub(prev.objects_uploaded)
        .saturating_sub(new_snapshots);
    if let Ok(mut m) = d.monitor.lock() {
        if new_snapshots > 0 {
            m.replay_since_ms = None;
            m.seen_uploads = true;
        }
        if new_segments > 0 {
            m.seen_uploads = true;
            let at = st.last_upload_ms.unwrap_or(now);
            m.replay_since_ms.get_or_insert(at);
        }
    }

    // The listing: once at the start (retried every LIST_RETRY while it fails), then again
    // only after a snapshot (retention may have deleted objects): never while idle.
    if wants_listing(d, st, now, state.inner.opts.relist_after_snapshot) {
        refresh_listing(d, st, now).await;
    }

    // Health and alerts.
    let f = facts(state, d, st, now);
    let h = health::evaluate(st, &f, &state.inner.opts.thresholds);
    alerts(state, d, st, &h, now);
}

/// True when the listing should be taken again now.
fn wants_listing(d: &DbState, st: &Status, now: i64, after_snapshot: Duration) -> bool {
    let after = after_snapshot.as_millis() as i64;
    let Ok(m) = d.monitor.lock() else {
        return false;
    };
    let since_attempt = m.last_list_attempt_ms.map_or(i64::MAX, |t| now - t);
    match m.listed_snapshots {
        None => since_attempt >= LIST_RETRY.as_millis() as i64,
        Some(n) => {
            n != st.snapshots
                && st.last_snapshot_ms.is_some_and(|t| now - t >= after)
                && since_attempt >= after
        }
    }
}

async fn refresh_listing(d: &DbState, st: &Status, now: i64) {
    if let Ok(mut m) = d.monitor.lock() {
        m.last_list_attempt_ms = Some(now);
    }
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        d.inventory.get(&d.db.replica, st, Duration::ZERO),
    )
    .await;
    match r {
        Ok(Ok(listing)) => {
            if let Ok(mut m) = d.monitor.lock() {
                m.listed_snapshots = Some(st.snapshots);
                if !m.seen_uploads {
                    m.replay_since_ms = listing.replay_since_ms;
                }
            }
        }
        Ok(Err(e)) => tracing::debug!(db = %d.db.name, error = %e, "cannot list the replica"),
        Err(_) => tracing::debug!(db = %d.db.name, "listing the replica timed out"),
    }
}

fn alerts(state: &AppState, d: &DbState, st: &Status, h: &DbHealth, now: i64) {
    let threshold = state.inner.opts.alert_after_failures;
    let mut out: Vec<(&'static str, Level, String)> = Vec::new();
    let previous;
    {
        let Ok(mut m) = d.monitor.lock() else { return };
        previous = m.level.unwrap_or(Level::Healthy);
        if st.consecutive_errors >= threshold && !m.failing_alerted {
            m.failing_alerted = true;
            out.push((
                "upload_failing",
                previous,
                format!(
                    "walship: uploads of {} have failed {} times in a row: {}",
                    d.db.name,
                    st.consecutive_errors,
                    st.last_error.as_deref().unwrap_or("unknown error")
                ),
            ));
        } else if st.consecutive_errors == 0 && m.failing_alerted {
            m.failing_alerted = false;
            out.push((
                "upload_recovered",
                previous,
                format!("walship: uploads of {} work again", d.db.name),
            ));
        }
        // A lost lease is its own alert (critical at once), in place of `health_critical`.
        let lease_lost = match &st.lease_lost {
            Some(holder) if !m.lease_lost_alerted => {
                m.lease_lost_alerted = true;
                out.push((
                    "lease_lost",
                    previous,
                    format!(
                        "walship: {} lost the lease of {} to {holder} and stopped replicating; another replicator writes there now (stop one of them)",
                        d.db.name, d.db.replica_url
                    ),
                ));
                true
            }
            _ => false,
        };
        if h.status != previous && !(lease_lost && h.status == Level::Critical) {
            let (event, text) = match h.status {
                Level::Healthy => (
                    "health_recovered",
                    format!(
                        "walship: {} is healthy again (was {})",
                        d.db.name,
                        previous.as_str()
                    ),
                ),
                Level::Warning => (
                    "health_warning",
                    format!(
                        "walship: {} is in warning: {}",
                        d.db.name,
                        h.reasons.join("; ")
                    ),
                ),
                Level::Critical => (
                    "health_critical",
                    format!(
                        "walship: {} is critical: {}",
                        d.db.name,
                        h.reasons.join("; ")
                    ),
                ),
            };
            out.push((event, previous, text));
        }
        m.level = Some(h.status);
    }
    if out.is_empty() {
        return;
    }
    let health = serde_json::to_value(h).unwrap_or_default();
    for (event, previous, text) in out {
        state.inner.alerts.send(Alert {
            event,
            db: d.db.name.clone(),
            path: d.db.path.display().to_string(),
            replica: d.db.replica_url.clone(),
            status: h.status.as_str(),
            previous: previous.as_str(),
            text,
            time: rfc3339(now),
            time_ms: now,
            host: host_name(),
            health: health.clone(),
        });
    }
}

async fn append(state: &AppState, idx: usize, runs: Vec<Run>) {
    if runs.is_empty() {
        return;
    }
    // Small appends with an fsync: off the async threads.
    let st = state.clone();
    let r = tokio::task::spawn_blocking(move || st.inner.dbs[idx].history.append(&runs)).await;
    let name = &state.inner.dbs[idx].db.name;
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(db = %name, error = %format!("{e:#}"), "cannot record the run history")
        }
        Err(e) => tracing::warn!(db = %name, error = %e, "cannot record the run history"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use walship_engine::{Replica, ReplicateOptions};
    use walship_storage::{FaultPlan, FaultStore, LocalStore, ObjectStore};

    use super::*;
    use crate::http::{Database, Options, api, metrics};

    fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
        r.unwrap_or_else(|e| panic!("{e}"))
    }

    fn write_rows(db: &std::path::Path, n: usize) {
        let c = ok(rusqlite::Connection::open(db));
        ok(c.pragma_update(None, "journal_mode", "wal"));
        ok(c.execute_batch("CREATE TABLE IF NOT EXISTS t(v BLOB)"));
        for _ in 0..n {
            ok(c.execute("INSERT INTO t(v) VALUES (randomblob(200))", []));
        }
    }

    /// However often health, metrics, status and runs are asked for, an idle database
    /// costs no request to the store; the listing is refreshed only after a snapshot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn polling_an_idle_database_costs_no_request() {
        let dir = ok(tempfile::tempdir());
        let db = dir.path().join("app.db");
        write_rows(&db, 50);
        let plan = FaultPlan::new();
        let local: Arc<dyn ObjectStore> = Arc::new(ok(LocalStore::new(dir.path().join("r"))));
        let replica = Replica::new(Arc::new(FaultStore::new(local, plan.clone())));
        let cancel = tokio_util::sync::CancellationToken::new();
        let opts = ReplicateOptions {
            sync_interval: Duration::from_millis(100),
            ..Default::default()
        };
        let (handle, task) =
            walship_engine::replicate::spawn(db.clone(), replica.clone(), opts, cancel.clone());
        ok(handle.sync().await);
        let state = ok(crate::http::AppState::new(
            vec![
                Database::new("app", &db, "file:///r", handle.clone(), replica)
                    .with_state_dir(dir.path().join("state")),
            ],
            Options {
                relist_after_snapshot: Duration::from_millis(200),
                ..Options::default()
            },
        ));
        let monitors = spawn(&state);
        write_rows(&db, 20);
        ok(handle.sync().await);
        let snap = ok(handle.snapshot().await);
        assert!(snap > 0);
        // The listing after the snapshot, then quiet.
        let d = &state.inner.dbs[0];
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while d.monitor.lock().ok().and_then(|m| m.listed_snapshots) != Some(2) {
            assert!(
                std::time::Instant::now() < deadline,
                "no listing after the snapshot"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        plan.reset_counts();
        for _ in 0..40 {
            let (level, _) = api::health_json(&state);
            assert_eq!(level, Level::Healthy);
            assert!(metrics::render(&state).contains("walship_backups{db=\"app\"} 2"));
            let _ = api::status_doc(&state);
            let _ = runs_of(d, 100);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(plan.counts().total(), 0, "{:?}", plan.counts());
        monitors.stop().await;
        cancel.cancel();
        ok(ok(task.await));
        let runs = d.history.recent_with(&[], 10);
        assert!(
            runs.iter()
                .any(|r| r.kind == crate::http::history::RunKind::Sync),
            "{runs:?}"
        );
    }
}
