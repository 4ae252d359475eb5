//! The routes: probes, metrics, the JSON admin API under `/api/v1/`, the dashboard.
//!
//! | route | auth | what |
//! | --- | --- | --- |
//! | `GET /healthz` | | liveness |
//! | `GET /health` | | health per database; 503 when one is critical |
//! | `GET /metrics` | | Prometheus text |
//! | `GET /api/v1/status` | | every database: health and replicator status |
//! | `GET /api/v1/databases/{db}` | | one database |
//! | `GET /api/v1/databases/{db}/backups` | | generations, snapshots, positions, sizes, times |
//! | `GET /api/v1/databases/{db}/history` | | backup runs, newest first (`?limit=`) |
//! | `GET /api/v1/databases/{db}/restore-guide` | | the restore commands for this deployment |
//! | `POST /api/v1/databases/{db}/snapshot` | bearer | write a snapshot now |
//! | `GET /api/v1/databases/{db}/download` | bearer | the restored database (`?timestamp=RFC3339`) |
//! | `GET /` | | the dashboard |

use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{OriginalUri, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use walship_engine::{EngineError, RestoreOptions, Status};

use super::error::ApiError;
use super::health::{DbHealth, Level};
use super::monitor::health_of;
use super::{AppState, DbState, auth, dashboard, metrics, now_ms, parse_rfc3339, rfc3339};

type ApiResult<T> = Result<T, ApiError>;

/// The router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(dashboard::page))
        .route("/assets/{file}", get(dashboard::asset))
        .route("/healthz", get(healthz))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/status", get(status))
        .route("/api/v1/databases/{db}", get(database))
        .route("/api/v1/databases/{db}/backups", get(backups))
        .route("/api/v1/databases/{db}/history", get(history))
        .route("/api/v1/databases/{db}/restore-guide", get(restore_guide))
        .route("/api/v1/databases/{db}/snapshot", post(snapshot))
        .route("/api/v1/databases/{db}/download", get(download))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn not_found(method: Method, uri: OriginalUri) -> ApiError {
    ApiError::not_found(format!(
        "no route {method} {} (see /api/v1/status)",
        uri.0.path()
    ))
}

async fn method_not_allowed(method: Method, uri: OriginalUri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.0.path()),
    )
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

/// Health of every database and the worst of them.
pub fn health_json(state: &AppState) -> (Level, Value) {
    let mut worst = Level::Healthy;
    let dbs: Vec<Value> = state
        .inner
        .dbs
        .iter()
        .map(|d| {
            let (_, h) = health_of(state, d);
            worst = worst.max(h.status);
            db_health_json(d, &h)
        })
        .collect();
    let body = json!({
        "status": worst,
        "checked_at": rfc3339(now_ms()),
        "databases": dbs,
    });
    (worst, body)
}

fn db_health_json(d: &DbState, h: &DbHealth) -> Value {
    let mut v = serde_json::to_value(h).unwrap_or_default();
    if let Value::Object(m) = &mut v {
        m.insert("name".into(), json!(d.db.name));
        m.insert("path".into(), json!(d.db.path.display().to_string()));
        m.insert("replica".into(), json!(d.db.replica_url));
        // The last verification (`walship replicate --verify-interval`), from the history.
        let last_verify = d
            .history
            .recent_with(&[], 500)
            .into_iter()
            .find(|r| r.kind == super::history::RunKind::Verify)
            .map(
                |r| json!({"time": r.end.unwrap_or(r.start), "result": r.result, "error": r.error}),
            );
        m.insert("last_verify".into(), last_verify.unwrap_or(Value::Null));
    }
    v
}

async fn health(State(state): State<AppState>) -> Response {
    let (worst, body) = health_json(&state);
    let code = if worst == Level::Critical {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, axum::Json(body)).into_response()
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    let body = metrics::render(&state);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

fn find<'a>(state: &'a AppState, name: &str) -> ApiResult<&'a DbState> {
    state.db(name).ok_or_else(|| {
        let names: Vec<&str> = state.inner.dbs.iter().map(|d| d.db.name.as_str()).collect();
        ApiError::not_found(format!(
            "no database named `{name}` (known: {})",
            names.join(", ")
        ))
    })
}

fn opt_time(ms: Option<i64>) -> Value {
    ms.map_or(Value::Null, |t| json!(rfc3339(t)))
}

/// One database's status and health.
pub fn db_json(state: &AppState, d: &DbState) -> Value {
    let (st, h) = health_of(state, d);
    status_json(d, &st, &h)
}

fn status_json(d: &DbState, st: &Status, h: &DbHealth) -> Value {
    json!({
        "name": d.db.name,
        "path": d.db.path.display().to_string(),
        "replica": d.db.replica_url,
        "health": db_health_json(d, h),
        "generation": st.generation.map(|g| g.to_string()),
        "position": st.position,
        "position_hex": format!("{:#018x}", st.position),
        "last_upload": opt_time(st.last_upload_ms),
        "last_snapshot": opt_time(st.last_snapshot_ms),
        "last_synced": opt_time(st.last_synced_ms),
        "unsynced_since": opt_time(st.unsynced_since_ms),
        "objects_uploaded": st.objects_uploaded,
        "bytes_uploaded": st.bytes_uploaded,
        "snapshots": st.snapshots,
        "last_snapshot_bytes": st.last_snapshot_bytes,
        "last_snapshot_duration_ms": st.last_snapshot_duration_ms,
        "generations_started": st.generations_started,
        "checkpoints": st.checkpoints,
        "app_checkpoints": st.app_checkpoints,
        "app_checkpoints_deferred": st.app_checkpoints_deferred,
        "slow_copy_backs": st.slow_copy_backs,
        "flushes_before_handoff": st.flushes_before_handoff,
        "handoffs_postponed": st.handoffs_postponed,
        "handoffs_forced": st.handoffs_forced,
        "frames_shipped": st.frames_shipped,
        "wal_bytes": st.wal_bytes,
        "errors_by_kind": st.errors_by_kind,
        "consecutive_errors": st.consecutive_errors,
        "last_error": st.last_error,
        "storage_stalled_since": opt_time(st.stalled_since_ms),
        "storage_stalled_call": st.stalled_call,
        "storage_stalls": st.stalls,
    })
}

/// The whole status document.
pub fn status_doc(state: &AppState) -> Value {
    let mut worst = Level::Healthy;
    let dbs: Vec<Value> = state
        .inner
        .dbs
        .iter()
        .map(|d| {
            let (st, h) = health_of(state, d);
            worst = worst.max(h.status);
            status_json(d, &st, &h)
        })
        .collect();
    let now = now_ms();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "status": worst,
        "now": rfc3339(now),
        "started": rfc3339(state.inner.started_ms),
        "uptime_seconds": (now - state.inner.started_ms).max(0) / 1000,
        "databases": dbs,
    })
}

async fn status(State(state): State<AppState>) -> impl IntoResponse {
    axum::Json(status_doc(&state))
}

async fn database(State(state): State<AppState>, Path(db): Path<String>) -> ApiResult<Response> {
    let d = find(&state, &db)?;
    Ok(axum::Json(db_json(&state, d)).into_response())
}

async fn backups(State(state): State<AppState>, Path(db): Path<String>) -> ApiResult<Response> {
    let d = find(&state, &db)?;
    let st = d.db.handle.status();
    let listing = d
        .inventory
        .get(&d.db.replica, &st, Duration::ZERO)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "replica_unavailable",
                format!("cannot list the replica: {e}"),
            )
        })?;
    let mut v = serde_json::to_value(&*listing).map_err(|e| ApiError::internal(e.to_string()))?;
    if let Value::Object(m) = &mut v {
        m.insert("db".into(), json!(d.db.name));
    }
    Ok(axum::Json(v).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitQuery {
    limit: Option<usize>,
}

async fn history(
    State(state): State<AppState>,
    Path(db): Path<String>,
    q: Result<Query<LimitQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let d = find(&state, &db)?;
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    Ok(axum::Json(json!({
        "db": d.db.name,
        "file": d.history.path().map(|p| p.display().to_string()),
        "runs": super::monitor::runs_of(d, limit),
    }))
    .into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotRequest {
    /// Recorded in the run history (e.g. "pre-deploy").
    reason: Option<String>,
}

async fn snapshot(
    State(state): State<AppState>,
    Path(db): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    auth::check(&headers, state.inner.opts.api_token.as_deref())?;
    let d = find(&state, &db)?;
    let req: SnapshotRequest = if body.iter().all(u8::is_ascii_whitespace) {
        SnapshotRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "the body must be empty or a JSON object like {{\"reason\": \"pre-deploy\"}}: {e}"
            ))
        })?
    };
    let trigger = match req.reason {
        Some(r) if !r.trim().is_empty() => format!("api: {}", r.trim()),
        _ => "api".to_string(),
    };
    let asked = now_ms();
    if let Ok(mut m) = d.monitor.lock() {
        m.pending_trigger = Some((trigger, asked));
    }
    let r = tokio::time::timeout(Duration::from_secs(600), d.db.handle.snapshot()).await;
    let position = match r {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            if let Ok(mut m) = d.monitor.lock() {
                m.pending_trigger = None;
            }
            return Err(engine_error("snapshot failed", &e));
        }
        Err(_) => {
            return Err(ApiError::unavailable(
                "the snapshot did not finish within 10 minutes",
            ));
        }
    };
    let st = d.db.handle.status();
    Ok((
        StatusCode::OK,
        axum::Json(json!({
            "db": d.db.name,
            "generation": st.generation.map(|g| g.to_string()),
            "position": position,
            "position_hex": format!("{position:#018x}"),
            "time": opt_time(st.last_snapshot_ms),
            "bytes": st.last_snapshot_bytes,
            "duration_ms": st.last_snapshot_duration_ms,
        })),
    )
        .into_response())
}

fn engine_error(what: &str, e: &EngineError) -> ApiError {
    match e {
        EngineError::Cancelled => {
            ApiError::unavailable(format!("{what}: walship is shutting down"))
        }
        // An empty replica, or nothing restorable at the time asked for.
        EngineError::NothingToRestore { .. }
        | EngineError::Unrestorable {
            target: Some(_), ..
        } => ApiError::not_found(format!("{what}: {e}")),
        EngineError::Partial { .. } => {
            ApiError::new(StatusCode::CONFLICT, "partial", format!("{what}: {e}"))
        }
        EngineError::Storage(_) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "replica_unavailable",
            format!("{what}: {e}"),
        ),
        _ => ApiError::internal(format!("{what}: {e}")),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DownloadQuery {
    /// RFC 3339: the state as of this time.
    timestamp: Option<String>,
}

async fn download(
    State(state): State<AppState>,
    Path(db): Path<String>,
    headers: HeaderMap,
    q: Result<Query<DownloadQuery>, QueryRejection>,
) -> ApiResult<Response> {
    auth::check(&headers, state.inner.opts.api_token.as_deref())?;
    let d = find(&state, &db)?;
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let target_ms = match q.timestamp.as_deref() {
        None | Some("") => None,
        Some(t) => Some(parse_rfc3339(t).ok_or_else(|| {
            ApiError::bad_request(format!(
                "timestamp `{t}` is not RFC 3339 (for example 2026-11-23T20:30:00Z)"
            ))
        })?),
    };
    let permit = state.inner.downloads.try_acquire().map_err(|_| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "busy",
            "another download is being prepared; try again shortly",
        )
    })?;
    // Restore into a temporary directory beside the database (same disk, enough room).
    let tmp = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(&d.db.state_dir)
        .or_else(|_| {
            tempfile::Builder::new()
                .prefix("walship-download-")
                .tempdir()
        })
        .map_err(|e| ApiError::internal(format!("cannot create a temporary directory: {e}")))?;
    let out = tmp.path().join("restored.db");
    let opts = RestoreOptions {
        target_ms,
        parallelism: 4,
        overwrite: false,
        progress: None,
        allow_partial: false,
    };
    // On a blocking thread driving the runtime: the restore future is not `Send` (its
    // closures borrow), which a handler's future must be.
    let (replica, path, rt) = (
        d.db.replica.clone(),
        out.clone(),
        tokio::runtime::Handle::current(),
    );
    let report = tokio::task::spawn_blocking(move || {
        rt.block_on(walship_engine::restore::restore(&replica, &path, &opts))
    })
    .await
    .map_err(|e| ApiError::internal(format!("restore task failed: {e}")))?
    .map_err(|e| engine_error("restore failed", &e))?;
    let file = tokio::fs::File::open(&out)
        .await
        .map_err(|e| ApiError::internal(format!("cannot open the restored file: {e}")))?;
    let len = file
        .metadata()
        .await
        .map_err(|e| ApiError::internal(format!("cannot stat the restored file: {e}")))?
        .len();
    // The open file outlives its directory entry: nothing is left behind, whatever the
    // client does with the stream.
    drop(tmp);
    drop(permit);
    tracing::info!(db = %d.db.name, bytes = len, position = report.position, "serving a restored database");
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
    let name = format!(
        "{}-{}.db",
        d.db.name,
        walship_format::key::format_time(report.timestamp_ms)
    );
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/vnd.sqlite3"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    let extra = [
        (
            "x-walship-generation",
            report.generation.map(|g| g.to_string()).unwrap_or_default(),
        ),
        ("x-walship-position", format!("{:#018x}", report.position)),
        ("x-walship-timestamp", rfc3339(report.timestamp_ms)),
    ];
    for (k, v) in extra {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    }
    Ok(resp)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GuideQuery {
    format: Option<String>,
}

async fn restore_guide(
    State(state): State<AppState>,
    Path(db): Path<String>,
    headers: HeaderMap,
    q: Result<Query<GuideQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let d = find(&state, &db)?;
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| {
            state
                .inner
                .listen
                .lock()
                .ok()
                .and_then(|l| l.map(|a| a.to_string()))
        })
        .unwrap_or_else(|| "127.0.0.1:9090".into());
    let listing = d.inventory.last().map(|(l, _)| l);
    let guide = super::guide::restore_guide(d, &host, listing.as_deref());
    match q.format.as_deref() {
        None | Some("text") => Ok((
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            guide.text,
        )
            .into_response()),
        Some("json") => Ok(axum::Json(json!({
            "db": d.db.name,
            "text": guide.text,
            "commands": guide.commands,
        }))
        .into_response()),
        Some(other) => Err(ApiError::bad_request(format!(
            "format `{other}` is not text or json"
        ))),
    }
}
