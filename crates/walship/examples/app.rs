//! walship as a library: a small axum app that keeps its SQLite database in a replica.
//!
//! 1. At startup, if the database file is missing, it restores the newest state from the
//!    replica (an empty replica is fine: first boot).
//! 2. It starts the replicator in its own tokio runtime and waits for the first sync before
//!    it serves.
//! 3. It serves `POST /notes` (the body is the note; `?durable=1` answers only once the note
//!    is in the replica) and `GET /notes`.
//! 4. On SIGTERM or SIGINT it stops serving, makes a final `sync()`, and shuts the replicator
//!    down (cancel, then await its task).
//!
//! ```sh
//! cargo run -p walship --example app -- /tmp/notes.db file:///tmp/notes-replica 127.0.0.1:3000
//! curl -d 'hello' 'http://127.0.0.1:3000/notes?durable=1'
//! ```
//!
//! `crates/walship/tests/example_app.rs` runs this file end to end.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::post;
use rusqlite::Connection;
use tokio_util::sync::CancellationToken;
use walship_engine::{EngineError, Replica, ReplicateOptions, ReplicatorHandle, RestoreOptions};

#[derive(Clone)]
struct AppState {
    db: Arc<Mutex<Connection>>,
    replicator: ReplicatorHandle,
}

#[derive(serde::Deserialize)]
struct AddQuery {
    #[serde(default)]
    durable: Option<u8>,
}

async fn add_note(
    State(s): State<AppState>,
    Query(q): Query<AddQuery>,
    body: String,
) -> Result<String, (StatusCode, String)> {
    let id = {
        let db = s.db.lock().map_err(|_| internal("lock"))?;
        db.execute("INSERT INTO notes(body) VALUES (?1)", [&body])
            .map_err(|e| internal(&e.to_string()))?;
        db.last_insert_rowid()
    };
    if q.durable == Some(1) {
        // Answer only once the note is in the replica.
        s.replicator
            .sync()
            .await
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    }
    Ok(format!("{id}\n"))
}

async fn list_notes(State(s): State<AppState>) -> Result<String, (StatusCode, String)> {
    let db = s.db.lock().map_err(|_| internal("lock"))?;
    let mut st = db
        .prepare("SELECT id, body FROM notes ORDER BY id")
        .map_err(|e| internal(&e.to_string()))?;
    let rows = st
        .query_map([], |r| {
            Ok(format!(
                "{}\t{}",
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?
            ))
        })
        .map_err(|e| internal(&e.to_string()))?;
    let mut out = String::new();
    for row in rows {
        out.push_str(&row.map_err(|e| internal(&e.to_string()))?);
        out.push('\n');
    }
    Ok(out)
}

fn internal(msg: &str) -> (StatusCode, String) {
    (StatusCode::INTERNAL_SERVER_ERROR, msg.to_string())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Runs the app: `args` = database path, replica URL, listen address.
pub async fn run(args: Vec<String>) -> Result<()> {
    let [db, url, addr] = <[String; 3]>::try_from(args)
        .map_err(|_| anyhow::anyhow!("usage: app DB REPLICA_URL LISTEN_ADDR"))?;
    let db = PathBuf::from(db);
    let url: walship_storage::ReplicaUrl = url.parse()?;
    let replica = Replica::new(walship_storage::open(&url, &Default::default()).await?);

    // 1. Restore before anything opens the database.
    if !db.exists() {
        match walship_engine::restore::restore(&replica, &db, &RestoreOptions::default()).await {
            Ok(r) => eprintln!("restored {} ({} segments)", db.display(), r.segments),
            Err(EngineError::NothingToRestore { .. }) => eprintln!("no backup yet: new database"),
            Err(e) => return Err(e).context("restore at startup"),
        }
    }
    let conn = Connection::open(&db)?;
    conn.pragma_update(None, "journal_mode", "wal")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS notes(id INTEGER PRIMARY KEY, body TEXT NOT NULL)",
    )?;

    // 2. Replicate in the background, in this runtime, until the token is cancelled.
    let cancel = CancellationToken::new();
    let (replicator, task) = walship_engine::replicate::spawn(
        db.clone(),
        replica,
        ReplicateOptions::default(),
        cancel.clone(),
    );
    replicator.sync().await.context("first sync")?;

    // 3. Serve.
    let state = AppState {
        db: Arc::new(Mutex::new(conn)),
        replicator: replicator.clone(),
    };
    let app = Router::new()
        .route("/notes", post(add_note).get(list_notes))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;

    // 4. Final backup, then stop the replicator (it syncs once more on cancel).
    let position = replicator.sync().await.context("final sync")?;
    cancel.cancel();
    task.await??;
    eprintln!("stopped; replica at position {position:#x}");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    run(std::env::args().skip(1).collect()).await
}
