//! The tools inside `walship replicate`: scheduled verification and the schema watch, and
//! where they report (the run history and webhooks of [`crate::http`]).

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::Sink;
use super::schema::{SchemaEvent, Watch};
use super::verify::{Schedule, VerifyReport};
use crate::duration::Dur;
use crate::http::AppState;
use crate::http::history::{Run, RunKind, RunResult};

/// `walship replicate` flags of the tools.
#[derive(Debug, Clone, Args)]
pub struct DaemonArgs {
    /// Verify the replica this often (e.g. 24h): sync, restore the newest point into a
    /// temporary file in the state directory, PRAGMA integrity_check, compare page count and
    /// per-table row counts with the database. The result goes to the run history (kind
    /// `verify`); a failure posts a webhook alert. Skipped, at no cost, while nothing was
    /// uploaded since the last successful verification.
    #[arg(long, value_name = "DURATION")]
    pub verify_interval: Option<Dur>,
    /// Do not compare the schema each time a snapshot finishes (by default a change is
    /// logged and recorded in the run history, kind `schema`).
    #[arg(long)]
    pub no_schema_watch: bool,
    /// Also post a webhook alert when the schema changes.
    #[arg(long)]
    pub alert_on_schema_change: bool,
}

/// Records tool results in a database's run history and posts alerts.
#[derive(Debug, Clone)]
pub struct HistorySink {
    state: AppState,
    name: String,
    alert_on_schema_change: bool,
}

impl Sink for HistorySink {
    fn verified(&self, rep: &VerifyReport, previous_ok: Option<bool>) {
        let mut run = Run::new(&self.name, RunKind::Verify, rep.time_ms)
            .ended(rep.time_ms + rep.elapsed_ms as i64);
        run.result = if rep.ok {
            RunResult::Ok
        } else {
            RunResult::Failed
        };
        if !rep.ok {
            run.error = Some(rep.message.clone());
            run.error_kind = Some("verify".into());
        }
        run.bytes = rep.bytes;
        run.objects = rep.segments as u64 + u64::from(rep.snapshot.is_some());
        run.trigger = Some("schedule".into());
        run.generation = rep.generation.clone();
        run.position = rep.position;
        run.detail = serde_json::to_value(rep).ok();
        self.state.record_run(&self.name, run);
        if !rep.ok {
            let previous = if previous_ok == Some(false) {
                "critical"
            } else {
                "healthy"
            };
            self.state.alert(
                &self.name,
                "verify_failed",
                "critical",
                previous,
                format!("{}: verification failed: {}", self.name, rep.message),
            );
        } else if previous_ok == Some(false) {
            self.state.alert(
                &self.name,
                "verify_recovered",
                "healthy",
                "critical",
                format!("{}: verification passed again: {}", self.name, rep.message),
            );
        }
    }

    fn schema_changed(&self, e: &SchemaEvent) {
        let mut run = Run::new(&self.name, RunKind::Schema, e.time_ms).ended(e.time_ms);
        run.objects = e.changes.len() as u64;
        run.trigger = Some("snapshot".into());
        run.generation = e.generation.clone();
        run.position = Some(e.position);
        run.detail = serde_json::to_value(e).ok();
        self.state.record_run(&self.name, run);
        if self.alert_on_schema_change {
            self.state.alert(
                &self.name,
                "schema_changed",
                "healthy",
                "healthy",
                format!("{}: schema changed: {}", self.name, summary(e)),
            );
        }
    }
}

/// `+ table a, ~ index b`.
fn summary(e: &SchemaEvent) -> String {
    e.changes
        .iter()
        .map(|c| {
            let sign = match c.change {
                "added" => '+',
                "removed" => '-',
                _ => '~',
            };
            format!("{sign} {} {}", c.kind, c.name)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The running tool tasks of one database.
#[derive(Debug)]
pub struct Tasks {
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Tasks {
    /// Stops them (a verification in progress is abandoned; its temporary files go).
    pub async fn stop(self) {
        self.cancel.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

/// `<what>.json`, or `<what>-<name>.json` when the database's name is not its file's own (a
/// second replica of one database shares its state directory), as for the run history.
fn state_file(what: &str, d: &crate::http::Database) -> String {
    if d.name == crate::http::default_name(&d.path) {
        format!("{what}.json")
    } else {
        format!("{what}-{}.json", d.name)
    }
}

/// Starts the tools `args` ask for, for every database of `state` (its path, name, replica,
/// replicator and state directory, which holds the tools' state and temporary files).
pub fn start(args: &DaemonArgs, state: &AppState) -> Tasks {
    let cancel = CancellationToken::new();
    let mut tasks = Vec::new();
    for d in state.databases() {
        let sink: Arc<dyn Sink> = Arc::new(HistorySink {
            state: state.clone(),
            name: d.name.clone(),
            alert_on_schema_change: args.alert_on_schema_change,
        });
        if let Some(interval) = args.verify_interval {
            tasks.push(
                Schedule {
                    interval: interval.0.max(Duration::from_secs(1)),
                    db: d.path.clone(),
                    replica: d.replica.clone(),
                    handle: d.handle.clone(),
                    state_dir: d.state_dir.clone(),
                    file: state_file("verify", &d),
                    sink: sink.clone(),
                }
                .spawn(cancel.clone()),
            );
        }
        if !args.no_schema_watch {
            tasks.push(
                Watch {
                    db: d.path.clone(),
                    handle: d.handle.clone(),
                    state_dir: d.state_dir.clone(),
                    file: state_file("schema", &d),
                    sink,
                }
                .spawn(cancel.clone()),
            );
        }
    }
    Tasks { cancel, tasks }
}
