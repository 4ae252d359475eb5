//! `/metrics`: Prometheus/OpenMetrics text (prometheus-client).
//!
//! Most values are read from each replicator's status at scrape time (counters are the
//! replicator's own totals, so nothing can drift); the snapshot-duration histogram is fed
//! by the monitors as snapshots happen. Every series has a `db` label.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use walship_engine::Status;

use super::AppState;
use super::health::DbHealth;
use super::monitor::health_of;

type Labels = Vec<(String, String)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn snapshot_histogram() -> Histogram {
    // 10 ms to about 11 min.
    Histogram::new([
        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 660.0,
    ])
}

/// Metrics fed by events.
#[derive(Debug, Clone)]
pub struct Metrics {
    snapshot_duration: HistogramFamily,
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            snapshot_duration: Family::new_with_constructor(snapshot_histogram),
        }
    }

    /// A snapshot of `db` took `ms`.
    pub fn observe_snapshot(&self, db: &str, ms: u64) {
        self.snapshot_duration
            .get_or_create(&vec![("db".to_string(), db.to_string())])
            .observe(ms as f64 / 1000.0);
    }
}

/// Renders the scrape.
pub fn render(state: &AppState) -> String {
    let mut reg = Registry::default();
    let rows = state
        .inner
        .dbs
        .iter()
        .map(|d| {
            let (st, h) = health_of(state, d);
            Row {
                db: d.db.name.clone(),
                st,
                h,
                now_ms: super::now_ms(),
            }
        })
        .collect();
    reg.register_collector(Box::new(StatusCollector { rows }));
    reg.register_collector(Box::new(HttpCollector(state.inner.http.clone())));
    reg.register(
        "walship_snapshot_duration_seconds",
        "How long snapshots took (encode and upload)",
        state.inner.metrics.snapshot_duration.clone(),
    );
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &reg).is_err() {
        out.clear();
    }
    out
}

/// The HTTP server's own connections (no `db` label).
#[derive(Debug)]
struct HttpCollector(std::sync::Arc<super::server::Stats>);

impl Collector for HttpCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.0;
        let gauges = [
            (
                "walship_http_connections",
                "HTTP connections open now",
                s.open.load(Relaxed),
            ),
            (
                "walship_http_connections_max",
                "HTTP connections served at once (more are closed at once)",
                s.max.load(Relaxed),
            ),
        ];
        for (name, help, v) in gauges {
            let m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(v as i64).encode(m)?;
        }
        let counters = [
            (
                "walship_http_connections_refused",
                "HTTP connections closed at once because the connection cap was reached",
                s.refused.load(Relaxed),
            ),
            (
                "walship_http_connections_timed_out",
                "HTTP connections closed by the header, idle or send timeout",
                s.timed_out.load(Relaxed),
            ),
        ];
        for (name, help, v) in counters {
            let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(v).encode(m)?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Row {
    db: String,
    st: Status,
    h: DbHealth,
    now_ms: i64,
}

#[derive(Debug)]
struct StatusCollector {
    rows: Vec<Row>,
}

fn secs(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

impl StatusCollector {
    fn gauge(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: impl Fn(&Row) -> Option<f64>,
    ) -> Result<(), std::fmt::Error> {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for r in &self.rows {
            if let Some(v) = value(r) {
                ConstGauge::new(v).encode(m.encode_family(&[("db", r.db.as_str())])?)?;
            }
        }
        Ok(())
    }

    fn counter(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: impl Fn(&Row) -> u64,
    ) -> Result<(), std::fmt::Error> {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
        for r in &self.rows {
            ConstCounter::new(value(r)).encode(m.encode_family(&[("db", r.db.as_str())])?)?;
        }
        Ok(())
    }
}

impl Collector for StatusCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.gauge(
            &mut enc,
            "walship_replication_lag_seconds",
            "Age of the oldest committed transaction not yet in the replica (0 when in sync)",
            |r| Some(r.h.replication_lag_seconds),
        )?;
        self.gauge(
            &mut enc,
            "walship_last_sync_timestamp_seconds",
            "When the replica last held everything committed (Unix time)",
            |r| r.st.last_synced_ms.map(secs),
        )?;
        self.gauge(
            &mut enc,
            "walship_last_upload_timestamp_seconds",
            "When the last object was uploaded (Unix time)",
            |r| r.st.last_upload_ms.map(secs),
        )?;
        self.gauge(
            &mut enc,
            "walship_last_snapshot_timestamp_seconds",
            "When the last snapshot of this process finished (Unix time)",
            |r| r.st.last_snapshot_ms.map(secs),
        )?;
        self.gauge(
            &mut enc,
            "walship_newest_restorable_age_seconds",
            "Age of the newest restorable point",
            |r| Some(r.h.newest_restorable_age_seconds),
        )?;
        self.counter(
            &mut enc,
            "walship_uploaded_bytes",
            "Bytes uploaded (segments and snapshots)",
            |r| r.st.bytes_uploaded,
        )?;
        self.counter(
            &mut enc,
            "walship_uploaded_objects",
            "Objects uploaded (segments and snapshots)",
            |r| r.st.objects_uploaded,
        )?;
        {
            let mut m = enc.encode_descriptor(
                "walship_upload_errors",
                "Failed replication rounds, by kind of error (retried until they succeed)",
                None,
                MetricType::Counter,
            )?;
            for r in &self.rows {
                for (kind, n) in &r.st.errors_by_kind {
                    ConstCounter::new(*n)
                        .encode(m.encode_family(&[("db", r.db.as_str()), ("kind", kind)])?)?;
                }
            }
        }
        self.gauge(
            &mut enc,
            "walship_storage_stalled_seconds",
            "How long the store has not answered a call that stalled (0 while it answers)",
            |r| {
                Some(
                    r.st.stalled_since_ms
                        .map_or(0.0, |t| secs((r.now_ms - t).max(0)).max(0.001)),
                )
            },
        )?;
        self.counter(
            &mut enc,
            "walship_storage_stalls",
            "Times a storage call went without progress for the stall threshold",
            |r| r.st.stalls,
        )?;
        self.gauge(
            &mut enc,
            "walship_consecutive_errors",
            "Replication rounds that failed in a row (0 when the last one worked)",
            |r| Some(r.st.consecutive_errors as f64),
        )?;
        self.gauge(
            &mut enc,
            "walship_lease_lost",
            "1 once the replicator lost the replica's lease to another one and stopped",
            |r| Some(if r.st.lease_lost.is_some() { 1.0 } else { 0.0 }),
        )?;
        self.counter(
            &mut enc,
            "walship_snapshots",
            "Snapshots written by this process",
            |r| r.st.snapshots,
        )?;
        self.gauge(
            &mut enc,
            "walship_last_snapshot_bytes",
            "Size of the last snapshot uploaded",
            |r| Some(r.st.last_snapshot_bytes as f64),
        )?;
        self.gauge(
            &mut enc,
            "walship_wal_bytes",
            "Size of the database's -wal file at the last sync",
            |r| Some(r.st.wal_bytes as f64),
        )?;
        self.counter(
            &mut enc,
            "walship_wal_frames",
            "WAL frames shipped in segments",
            |r| r.st.frames_shipped,
        )?;
        self.counter(
            &mut enc,
            "walship_segments_merged",
            "Merged segments written by compaction",
            |r| r.st.segments_merged,
        )?;
        self.counter(
            &mut enc,
            "walship_merged_parts_deleted",
            "Segments deleted after a merged segment covered them for the keep time",
            |r| r.st.merged_parts_deleted,
        )?;
        {
            let mut m = enc.encode_descriptor(
                "walship_checkpoints",
                "Checkpoints run by the replicator, by mode",
                None,
                MetricType::Counter,
            )?;
            for r in &self.rows {
                ConstCounter::new(r.st.checkpoints)
                    .encode(m.encode_family(&[("db", r.db.as_str()), ("mode", "passive")])?)?;
            }
        }
        self.counter(
            &mut enc,
            "walship_app_checkpoints",
            "Blocking checkpoints of the app (FULL, RESTART, TRUNCATE) the pin was moved aside for",
            |r| r.st.app_checkpoints,
        )?;
        self.gauge(
            &mut enc,
            "walship_app_checkpoints_deferred",
            "1 while the replicator holds the WAL's checkpoint lock and checkpoints for the app",
            |r| {
                Some(if r.st.app_checkpoints_deferred {
                    1.0
                } else {
                    0.0
                })
            },
        )?;
        self.counter(
            &mut enc,
            "walship_slow_copy_backs",
            "Copies of the WAL back into the database that took longer than slow_copy_back (the disk is not keeping up with the app)",
            |r| r.st.slow_copy_backs,
        )?;
        self.counter(
            &mut enc,
            "walship_flushes_before_handoff",
            "Times a handoff under a heavy load flushed the WAL and database to disk before taking the write lock",
            |r| r.st.flushes_before_handoff,
        )?;
        self.counter(
            &mut enc,
            "walship_handoffs_postponed",
            "Handoffs put off because the app had written more past the shipped end than the write lock may wait for",
            |r| r.st.handoffs_postponed,
        )?;
        self.counter(
            &mut enc,
            "walship_handoffs_forced",
            "Handoffs that held the app's writes to ship and copy back everything left, the WAL being over max-wal-mib",
            |r| r.st.handoffs_forced,
        )?;
        self.counter(
            &mut enc,
            "walship_generation_changes",
            "Generations started (each begins with a full snapshot)",
            |r| r.st.generations_started,
        )?;
        self.gauge(
            &mut enc,
            "walship_backups",
            "Snapshots in the replica",
            |r| Some(r.h.backups as f64),
        )?;
        self.gauge(
            &mut enc,
            "walship_health",
            "Health: 0 healthy, 1 warning, 2 critical",
            |r| Some(r.h.status.code() as f64),
        )?;
        Ok(())
    }
}
