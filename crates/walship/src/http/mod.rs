//! The status server and the monitoring around the replicators.
//!
//! - [`AppState`] holds the replicated databases ([`Database`]: a name, the database path,
//!   the replica, its [`ReplicatorHandle`]) and what the server and monitors share: metrics,
//!   run histories, cached replica listings, the webhook sender.
//! - [`spawn_monitors`] starts one monitor task per database. It follows the replicator's
//!   status, records backup runs in the database's history (`<db>-walship/history.jsonl`),
//!   evaluates health once a second and posts webhook alerts on changes. It never calls
//!   into the replicator except to read its status, so it cannot block replication.
//! - [`serve`] binds the HTTP server (axum on hyper): `/healthz`, `/health`, `/metrics`, the
//!   JSON admin API under `/api/v1/` and the dashboard at `/`. Its accept loop
//!   (`server.rs`) caps connections and times out every phase of one ([`Limits`]), so no
//!   client can take the descriptors or the time replication needs.
//!
//! The replicate subcommand uses [`start`], which does all three from [`HttpArgs`]; a daemon
//! running many replicators builds its [`Database`] list itself and calls [`AppState::new`],
//! [`spawn_monitors`] and [`serve`]:
//!
//! ```ignore
//! let state = http::AppState::new(databases, options)?;
//! let monitors = http::spawn_monitors(&state);
//! let (addr, server) = http::serve(listen, state.clone(), cancel.clone()).await?;
//! // ... replicators run, then stop with their final sync ...
//! monitors.stop().await; // records the last runs, delivers pending alerts (bounded)
//! ```

mod alerts;
mod api;
pub mod args;
mod auth;
mod dashboard;
mod error;
mod guide;
mod health;
pub mod history;
mod inventory;
mod metrics;
mod monitor;
mod server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;
use walship_engine::{Replica, ReplicatorHandle};

pub use self::args::HttpArgs;
pub use self::health::Thresholds;
pub use self::monitor::Monitors;
pub use self::server::Limits;

use self::alerts::AlertSender;
use self::history::History;
use self::inventory::Inventory;
use self::metrics::Metrics;
use self::monitor::MonitorState;

pub(crate) use crate::clock::{now_ms, parse_rfc3339, rfc3339};

/// One replicator: a database and one of its replicas, under a unique name.
#[derive(Debug, Clone)]
pub struct Database {
    /// Unique name (URL path segment, metric label): letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// The database file.
    pub path: PathBuf,
    /// The replica URL as given (shown in the restore guide).
    pub replica_url: String,
    /// The running replicator.
    pub handle: ReplicatorHandle,
    /// The replica (for listings and restores).
    pub replica: Replica,
    /// Where the run history and temporary restores go; default [`default_state_dir`].
    pub state_dir: PathBuf,
}

impl Database {
    /// A database with the default state directory.
    pub fn new(
        name: impl Into<String>,
        path: impl Into<PathBuf>,
        replica_url: impl Into<String>,
        handle: ReplicatorHandle,
        replica: Replica,
    ) -> Self {
        let path = path.into();
        Database {
            name: name.into(),
            state_dir: default_state_dir(&path),
            path,
            replica_url: replica_url.into(),
            handle,
            replica,
        }
    }

    /// Uses `dir` for the history and temporary files (two replicas of one database need
    /// two directories, or their histories mix).
    pub fn with_state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = dir.into();
        self
    }
}

/// `<db>-walship`, beside the database: walship's bookkeeping, outside the database file.
pub fn default_state_dir(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_os_string();
    s.push("-walship");
    PathBuf::from(s)
}

/// The name of a database from its path: the file name without its extension.
pub fn default_name(db: &Path) -> String {
    let stem = db
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let clean: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "db".to_string()
    } else {
        clean
    }
}

/// Settings of the server and the monitors.
#[derive(Clone)]
pub struct Options {
    /// Health thresholds.
    pub thresholds: Thresholds,
    /// Bearer token of the mutating and download endpoints; `None` disables them.
    pub api_token: Option<String>,
    /// Webhook URLs alerts are posted to.
    pub webhooks: Vec<String>,
    /// Alert after this many failed rounds in a row.
    pub alert_after_failures: u64,
    /// Rotate a history file past this size.
    pub history_max_bytes: u64,
    /// Delays between webhook attempts (its length + 1 = attempts).
    pub webhook_backoff: Vec<Duration>,
    /// The replica is listed again this long after a snapshot (once its retention pass is
    /// done), and otherwise never while the replicator runs.
    pub relist_after_snapshot: Duration,
    /// The HTTP server's connection cap and timeouts.
    pub limits: Limits,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("thresholds", &self.thresholds)
            .field("api_token", &self.api_token.as_ref().map(|_| "<redacted>"))
            .field("webhooks", &self.webhooks.len())
            .field("alert_after_failures", &self.alert_after_failures)
            .field("history_max_bytes", &self.history_max_bytes)
            .field("limits", &self.limits)
            .finish()
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            thresholds: Thresholds::default(),
            api_token: None,
            webhooks: Vec::new(),
            alert_after_failures: 3,
            history_max_bytes: history::DEFAULT_MAX_BYTES,
            webhook_backoff: alerts::DEFAULT_BACKOFF.to_vec(),
            relist_after_snapshot: Duration::from_secs(10),
            limits: Limits::default(),
        }
    }
}

/// What the server and the monitors share. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dbs: Vec<DbState>,
    opts: Options,
    metrics: Metrics,
    alerts: AlertSender,
    started_ms: i64,
    listen: Mutex<Option<SocketAddr>>,
    /// One download (restore into a temporary file) at a time.
    downloads: tokio::sync::Semaphore,
    /// The HTTP server's connection counts.
    http: Arc<server::Stats>,
}

/// A database and what is kept about it.
#[derive(Debug)]
struct DbState {
    db: Database,
    history: History,
    inventory: Inventory,
    monitor: Mutex<MonitorState>,
}

impl AppState {
    /// Opens each database's history (its state directory is created with the first run
    /// recorded) and sets up metrics and the webhook sender. Names must be unique.
    pub fn new(dbs: Vec<Database>, opts: Options) -> Result<AppState> {
        let mut seen = std::collections::HashSet::new();
        let mut states = Vec::with_capacity(dbs.len());
        for db in dbs {
            anyhow::ensure!(
                !db.name.is_empty()
                    && db
                        .name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
                "database name `{}` may only hold letters, digits, `-`, `_` and `.`",
                db.name
            );
            anyhow::ensure!(
                seen.insert(db.name.clone()),
                "two databases are named `{}`",
                db.name
            );
            // The history is worth having, not worth refusing to replicate for.
            let file = history::file_name(&db.name, &db.path);
            let history = match History::open(
                &db.state_dir,
                &file,
                &db.name,
                opts.history_max_bytes,
            ) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(db = %db.name, error = %format!("{e:#}"), "run history kept in memory only (pass --state-dir to a writable directory)");
                    History::in_memory()
                }
            };
            states.push(DbState {
                db,
                history,
                inventory: Inventory::default(),
                monitor: Mutex::new(MonitorState::default()),
            });
        }
        let alerts = AlertSender::spawn(opts.webhooks.clone(), opts.webhook_backoff.clone())?;
        Ok(AppState {
            inner: Arc::new(Inner {
                metrics: Metrics::new(),
                dbs: states,
                opts,
                alerts,
                started_ms: now_ms(),
                listen: Mutex::new(None),
                downloads: tokio::sync::Semaphore::new(1),
                http: Arc::default(),
            }),
        })
    }

    fn db(&self, name: &str) -> Option<&DbState> {
        self.inner.dbs.iter().find(|d| d.db.name == name)
    }

    /// The databases.
    pub fn databases(&self) -> Vec<Database> {
        self.inner.dbs.iter().map(|d| d.db.clone()).collect()
    }

    /// Appends `run` to the history of database `name` (for tasks beside the monitors, such
    /// as scheduled verification). Blocks on an fsync; unknown names are ignored.
    pub fn record_run(&self, name: &str, run: history::Run) {
        let Some(d) = self.db(name) else { return };
        if let Err(e) = d.history.append(std::slice::from_ref(&run)) {
            tracing::warn!(db = %name, error = %format!("{e:#}"), "cannot record the run history");
        }
    }

    /// Posts an alert about database `name` to the webhooks (`status`, `previous`:
    /// healthy, warning, critical). Never waits.
    pub fn alert(
        &self,
        name: &str,
        event: &'static str,
        status: &'static str,
        previous: &'static str,
        text: String,
    ) {
        let Some(d) = self.db(name) else { return };
        let now = now_ms();
        self.inner.alerts.send(alerts::Alert {
            event,
            db: d.db.name.clone(),
            path: d.db.path.display().to_string(),
            replica: d.db.replica_url.clone(),
            status,
            previous,
            text,
            time: rfc3339(now),
            time_ms: now,
            host: alerts::host_name(),
            health: serde_json::Value::Null,
        });
    }
}

/// Binds `addr` and serves until `cancel`, within the options' [`Limits`]; on `cancel`
/// every connection is dropped at once. Returns the bound address (useful with port 0)
/// and the server task.
pub async fn serve(
    addr: SocketAddr,
    state: AppState,
    cancel: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (is the port in use?)"))?;
    let local = listener.local_addr().context("local address")?;
    if let Ok(mut l) = state.inner.listen.lock() {
        *l = Some(local);
    }
    let limits = state.inner.opts.limits;
    tracing::info!(
        addr = %local,
        max_connections = limits.max_connections,
        header_timeout_ms = limits.header_timeout.as_millis() as u64,
        idle_timeout_ms = limits.idle_timeout.as_millis() as u64,
        request_timeout_ms = limits.request_timeout.as_millis() as u64,
        "HTTP server listening"
    );
    let stats = state.inner.http.clone();
    let app = api::router(state);
    let task = tokio::spawn(server::run(listener, app, limits, stats, cancel));
    Ok((local, task))
}

/// Starts the monitors of every database.
pub fn spawn_monitors(state: &AppState) -> Monitors {
    monitor::spawn(state)
}

/// The server and monitors of `walship replicate`.
#[derive(Debug)]
pub struct Running {
    monitors: Monitors,
    server: Option<tokio::task::JoinHandle<()>>,
    cancel: CancellationToken,
    state: AppState,
}

impl Running {
    /// The shared state (run histories, alerts), for tasks beside the replicators.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// After the replicators stopped: records the last runs, stops the server (if the
    /// replicators' cancellation has not stopped it already).
    pub async fn stop(self) {
        self.monitors.stop().await;
        self.cancel.cancel();
        if let Some(s) = self.server {
            let _ = tokio::time::timeout(Duration::from_secs(2), s).await;
        }
    }
}

/// Starts monitors (always: the run history and webhooks work without a server) and, with
/// `--listen`, the server, for the databases of `walship replicate`. The server stops, and
/// drops every connection, as soon as `replication` is cancelled: before the final sync,
/// which never waits for an HTTP client.
pub async fn start(
    args: &HttpArgs,
    dbs: Vec<Database>,
    snapshot_interval: Duration,
    replication: &CancellationToken,
) -> Result<Running> {
    let mut opts = args.options(snapshot_interval)?;
    let wanted = opts.limits.max_connections;
    let nofile = crate::fdlimit::soft();
    opts.limits.max_connections = server::connection_cap(wanted, nofile, dbs.len());
    if args.listen.is_some() && opts.limits.max_connections < wanted {
        tracing::warn!(
            max_connections = opts.limits.max_connections,
            wanted,
            open_files_limit = nofile.unwrap_or(0),
            "HTTP connections capped lower than asked, to leave descriptors for replication (raise the hard limit of open files to serve more)"
        );
    }
    let dbs = match &args.state_dir {
        Some(dir) => dbs.into_iter().map(|d| d.with_state_dir(dir)).collect(),
        None => dbs,
    };
    let state = AppState::new(dbs, opts)?;
    let monitors = spawn_monitors(&state);
    let cancel = replication.child_token();
    let server = match args.listen {
        Some(addr) => Some(serve(addr, state.clone(), cancel.clone()).await?.1),
        None => None,
    };
    Ok(Running {
        monitors,
        server,
        cancel,
        state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_dir_and_name_come_from_the_path() {
        assert_eq!(
            default_state_dir(Path::new("/data/app.db")),
            PathBuf::from("/data/app.db-walship")
        );
        assert_eq!(default_name(Path::new("/data/app.db")), "app");
        assert_eq!(default_name(Path::new("/data/my app.sqlite3")), "my_app");
    }
}
