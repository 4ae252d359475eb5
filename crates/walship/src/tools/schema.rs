//! Schema changes: `walship schema-diff` compares the schema (`sqlite_schema`) of each
//! snapshot in a replica with the one before it; [`Watch`] does the same for a running
//! replicator, each time it finishes a snapshot, from the live database.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use walship_engine::ReplicatorHandle;
use walship_engine::inspect::{self, LiveDb, SchemaChange, SchemaEntry};
use walship_engine::replica::Listed;
use walship_format::key::{GenerationId, ObjectKey};

use super::{Sink, blocking, now_ms};
use crate::cli::StoreArgs;
use crate::clock::rfc3339;

/// `walship schema-diff`.
#[derive(Debug, Args)]
pub struct SchemaDiffArgs {
    /// The replica: file:///dir or s3://bucket/prefix?...
    pub replica_url: String,
    /// Look at the newest N snapshots only (each one is downloaded whole).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Where the downloaded snapshots go, one at a time (default: the system's temporary
    /// directory).
    #[arg(long, value_name = "DIR")]
    pub temp_dir: Option<PathBuf>,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// A snapshot whose schema was read.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotRef {
    /// Its key.
    pub key: String,
    /// Its generation.
    pub generation: String,
    /// Its position.
    pub position: u64,
    /// When it was written (RFC 3339).
    pub time: String,
    /// Objects in its schema.
    pub objects: usize,
}

/// The changes between two consecutive snapshots.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// The earlier snapshot.
    pub from: SnapshotRef,
    /// The later one.
    pub to: SnapshotRef,
    /// What changed.
    pub changes: Vec<SchemaChange>,
}

/// What `schema-diff` found.
#[derive(Debug, Clone, Serialize)]
pub struct DiffReport {
    /// The replica.
    pub replica: String,
    /// Snapshots read, oldest first.
    pub snapshots: Vec<SnapshotRef>,
    /// Steps with changes (consecutive snapshots with none are left out).
    pub changes: Vec<Step>,
    /// Snapshots that could not be read, with why.
    pub skipped: Vec<(String, String)>,
}

/// Runs `walship schema-diff`.
pub async fn command(a: SchemaDiffArgs) -> Result<ExitCode> {
    let replica = crate::open_replica(&a.replica_url, &a.store).await?;
    let mut all: Vec<(GenerationId, Listed)> = Vec::new();
    for g in replica.generations().await? {
        for s in replica.objects(g).await?.snapshots {
            all.push((g, s));
        }
    }
    anyhow::ensure!(
        !all.is_empty(),
        "no snapshot in {} (nothing to compare)",
        replica.describe()
    );
    all.sort_by_key(|(g, s)| (s.key.timestamp_ms(), *g, position(&s.key)));
    if let Some(n) = a.limit {
        let drop = all.len().saturating_sub(n.max(1));
        all.drain(..drop);
    }
    let base = a.temp_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".walship-schema-")
        .tempdir_in(&base)
        .with_context(|| format!("cannot create a temporary directory in {}", base.display()))?;
    let mut report = DiffReport {
        replica: replica.describe(),
        snapshots: Vec::new(),
        changes: Vec::new(),
        skipped: Vec::new(),
    };
    let mut prev: Option<(SnapshotRef, Vec<SchemaEntry>)> = None;
    for (i, (g, snap)) in all.iter().enumerate() {
        let file = tmp.path().join(format!("snapshot-{i}.db"));
        let schema = match read_snapshot_schema(&replica, snap, file.clone()).await {
            Ok(s) => s,
            Err(e) => {
                let why = crate::one_line(&e);
                eprintln!("skipped {}: {why}", snap.name);
                report.skipped.push((snap.name.clone(), why));
                continue;
            }
        };
        let _ = std::fs::remove_file(&file);
        let here = SnapshotRef {
            key: snap.name.clone(),
            generation: g.to_string(),
            position: position(&snap.key),
            time: rfc3339(snap.key.timestamp_ms()),
            objects: schema.len(),
        };
        report.snapshots.push(here.clone());
        if let Some((from, old)) = prev.take() {
            let changes = inspect::diff_schema(&old, &schema);
            if !changes.is_empty() {
                report.changes.push(Step {
                    from,
                    to: here.clone(),
                    changes,
                });
            }
        }
        prev = Some((here, schema));
    }
    anyhow::ensure!(
        !report.snapshots.is_empty(),
        "no snapshot of {} could be read ({} skipped; see above)",
        replica.describe(),
        report.skipped.len()
    );
    let mut out = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        print_text(&mut out, &report)?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn read_snapshot_schema(
    replica: &walship_engine::Replica,
    snap: &Listed,
    file: PathBuf,
) -> Result<Vec<SchemaEntry>> {
    inspect::snapshot_to_file(replica, snap, &file).await?;
    blocking(move || Ok(inspect::read_schema(&file)?)).await
}

fn position(k: &ObjectKey) -> u64 {
    match k {
        ObjectKey::Snapshot { position, .. } => *position,
        ObjectKey::Segment { end, .. } => *end,
    }
}

fn print_text(out: &mut dyn Write, r: &DiffReport) -> std::io::Result<()> {
    let line = |s: &SnapshotRef| {
        format!(
            "{}  generation {}  position {:#x}  ({} objects)",
            s.time, s.generation, s.position, s.objects
        )
    };
    let mut steps = r.changes.iter().peekable();
    for (i, s) in r.snapshots.iter().enumerate() {
        let step = steps.next_if(|st| st.to.key == s.key);
        let tag = match (i, &step) {
            (0, _) => "first snapshot".to_string(),
            (_, None) => "no schema change".to_string(),
            (_, Some(st)) => format!("{} changes", st.changes.len()),
        };
        writeln!(out, "{}: {tag}", line(s))?;
        if let Some(st) = step {
            write_changes(out, &st.changes, "  ")?;
        }
    }
    if r.snapshots.len() == 1 {
        writeln!(out, "(one snapshot: nothing to compare)")?;
    }
    Ok(())
}

/// Writes changes as `+ table t`, `- index i`, `~ table t` with their statements.
pub fn write_changes(
    out: &mut dyn Write,
    changes: &[SchemaChange],
    indent: &str,
) -> std::io::Result<()> {
    for c in changes {
        let sign = match c.change {
            "added" => '+',
            "removed" => '-',
            _ => '~',
        };
        writeln!(out, "{indent}{sign} {} {}", c.kind, c.name)?;
        match (&c.old_sql, &c.new_sql) {
            (Some(o), Some(n)) => {
                writeln!(out, "{indent}    - {}", one(o))?;
                writeln!(out, "{indent}    + {}", one(n))?;
            }
            (Some(s), None) | (None, Some(s)) => writeln!(out, "{indent}    {}", one(s))?,
            (None, None) => {}
        }
    }
    Ok(())
}

fn one(sql: &str) -> String {
    sql.split_whitespace().collect::<Vec<_>>().join(" ")
}

// ---------------------------------------------------------------------------------------
// Watching a running replicator

/// A schema change seen by [`Watch`].
#[derive(Debug, Clone, Serialize)]
pub struct SchemaEvent {
    /// The database.
    pub db: String,
    /// When it was seen (ms since the epoch).
    pub time_ms: i64,
    /// The generation and position of the snapshot it was seen at.
    pub generation: Option<String>,
    /// See `generation`.
    pub position: u64,
    /// When the previous schema was first seen (ms since the epoch; 0 if unknown).
    pub previous_ms: i64,
    /// What changed.
    pub changes: Vec<SchemaChange>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    time_ms: i64,
    schema: Vec<SavedEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedEntry {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    tbl_name: String,
    sql: Option<String>,
}

/// Compares the live database's schema each time the replicator finishes a snapshot with
/// the schema seen at the previous one (kept in `<state dir>/schema.json`, so changes
/// while walship was down are caught too), and logs and reports what changed. Reads only
/// `sqlite_schema` of the live database, and only after a snapshot (so never while idle).
#[derive(Clone)]
pub struct Watch {
    /// The live database.
    pub db: PathBuf,
    /// Its replicator.
    pub handle: ReplicatorHandle,
    /// Where the schema file goes.
    pub state_dir: PathBuf,
    /// Its name in `state_dir` (`schema.json`; one per replicator when a database has two).
    pub file: String,
    /// Where changes go (run history, alerts).
    pub sink: Arc<dyn Sink>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("db", &self.db)
            .field("state_dir", &self.state_dir)
            .finish()
    }
}

impl Watch {
    /// Runs until `cancel`.
    pub fn spawn(self, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move { self.run(cancel).await })
    }

    async fn run(self, cancel: CancellationToken) {
        let mut rx = self.handle.watch();
        let mut seen = 0u64;
        loop {
            let st = rx.borrow_and_update().clone();
            if st.snapshots != seen {
                seen = st.snapshots;
                if let Err(e) = self
                    .check(st.generation.map(|g| g.to_string()), st.position)
                    .await
                {
                    tracing::warn!(db = %self.db.display(), error = %format!("{e:#}"), "cannot compare the schema");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
        }
    }

    async fn check(&self, generation: Option<String>, position: u64) -> Result<()> {
        let db = self.db.clone();
        let schema = blocking(move || Ok(LiveDb::open(&db)?.schema()?)).await?;
        let file = self.state_dir.join(&self.file);
        let saved: Option<Saved> = std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let now = now_ms();
        let changes = match &saved {
            Some(s) => {
                let old: Vec<SchemaEntry> = s
                    .schema
                    .iter()
                    .map(|e| SchemaEntry {
                        kind: e.kind.clone(),
                        name: e.name.clone(),
                        tbl_name: e.tbl_name.clone(),
                        sql: e.sql.clone(),
                    })
                    .collect();
                inspect::diff_schema(&old, &schema)
            }
            None => Vec::new(),
        };
        if !changes.is_empty() {
            for c in &changes {
                tracing::warn!(
                    db = %self.db.display(), change = c.change, kind = %c.kind, name = %c.name,
                    old_sql = c.old_sql.as_deref().unwrap_or(""), new_sql = c.new_sql.as_deref().unwrap_or(""),
                    "schema changed"
                );
            }
            let event = SchemaEvent {
                db: self.db.display().to_string(),
                time_ms: now,
                generation,
                position,
                previous_ms: saved.as_ref().map_or(0, |s| s.time_ms),
                changes: changes.clone(),
            };
            let sink = self.sink.clone();
            let _ = tokio::task::spawn_blocking(move || sink.schema_changed(&event)).await;
        }
        if saved.is_none() || !changes.is_empty() {
            let out = Saved {
                time_ms: now,
                schema: schema
                    .into_iter()
                    .map(|e| SavedEntry {
                        kind: e.kind,
                        name: e.name,
                        tbl_name: e.tbl_name,
                        sql: e.sql,
                    })
                    .collect(),
            };
            std::fs::create_dir_all(&self.state_dir)
                .with_context(|| format!("cannot create {}", self.state_dir.display()))?;
            let tmp = self.state_dir.join(format!(".{}.tmp", self.file));
            std::fs::write(&tmp, serde_json::to_vec(&out)?)
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            std::fs::rename(&tmp, &file)
                .with_context(|| format!("cannot write {}", file.display()))?;
        }
        Ok(())
    }
}
