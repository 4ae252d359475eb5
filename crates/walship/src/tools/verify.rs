//! `walship verify`: restore the newest point of a replica into a temporary file, check it,
//! count its rows, and optionally compare with the live database; and the same check on a
//! schedule inside `walship replicate` ([`Schedule`]).
//!
//! # Comparing with the live database
//!
//! Row counts and page count of a restored point equal the live database's only if the live
//! database holds exactly that point. The rule:
//!
//! 1. Read the live database's `PRAGMA data_version` (it changes whenever another
//!    connection commits).
//! 2. In the daemon only: ask the replicator to sync, so the replica holds everything
//!    committed before step 1.
//! 3. Restore the replica's newest point.
//! 4. Read the live database's page count and row counts in one read transaction, and its
//!    `data_version` again.
//!
//! Equal counts: **match**. Otherwise, if `data_version` moved, the live database changed
//! during the verification (**changed_during**): not comparable, not a failure. Without a
//! sync (the `verify` command), the replica may also lag behind: if the live database's
//! files were modified after the newest point was written, it is **changed_since**: not a
//! failure either. Only a difference that none of these explains is a **mismatch**, which
//! fails the verification: in the daemon, the replica held everything and the live database
//! did not change, yet they differ.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::rfc3339;
use anyhow::{Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use walship_engine::inspect::{self, LiveDb, Summary};
use walship_engine::{Replica, ReplicatorHandle};

use super::{Sink, blocking, now_ms, restore_to_temp};
use crate::cli::StoreArgs;

/// `walship verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The replica: file:///dir or s3://bucket/prefix?...
    pub replica_url: String,
    /// Compare the page count and per-table row counts with this live database (see
    /// `walship verify --help` for when they must match).
    #[arg(long, value_name = "LIVE_DB")]
    pub db: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Where the temporary restore goes (default: the system's temporary directory).
    #[arg(long, value_name = "DIR")]
    pub temp_dir: Option<PathBuf>,
    /// Downloads in flight at once.
    #[arg(long, default_value_t = 4)]
    pub parallelism: usize,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// How long the daemon's verification waits for the replicator to sync (a replica that is
/// down fails the verification rather than stalling the schedule).
const SYNC_TIMEOUT: Duration = Duration::from_secs(300);

/// What to verify.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The live database to compare with.
    pub live: Option<PathBuf>,
    /// Where the temporary restore goes.
    pub temp_dir: Option<PathBuf>,
    /// Downloads in flight at once.
    pub parallelism: usize,
}

/// An object the restore skipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// Its key.
    pub key: String,
    /// Why.
    pub reason: String,
}

/// A table's rows in the restored point and in the live database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRows {
    /// The table.
    pub name: String,
    /// Rows in the restored point (`None`: not there).
    pub rows: Option<u64>,
    /// Rows in the live database (`None`: not compared, or not there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_rows: Option<u64>,
}

/// The comparison with the live database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveCheck {
    /// The live database.
    pub path: String,
    /// Its page count.
    pub page_count: u64,
    /// `match`, `mismatch`, `changed_during` or `changed_since` (see the module docs).
    pub comparison: String,
    /// One line for people.
    pub note: String,
    /// What differs (`table t: replica 5, live 6`, `pages: ...`).
    pub differences: Vec<String>,
}

/// The result of a verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// True when the newest point restored whole, passed `PRAGMA integrity_check`, and (with
    /// a live database) did not mismatch it.
    pub ok: bool,
    /// One line for people: what was found, or why it failed.
    pub message: String,
    /// The replica.
    pub replica: String,
    /// When the verification ran (RFC 3339) ...
    pub time: String,
    /// ... in ms since the epoch.
    pub time_ms: i64,
    /// How long it took.
    pub elapsed_ms: u64,
    /// The generation restored.
    pub generation: Option<String>,
    /// The snapshot restored from.
    pub snapshot: Option<String>,
    /// The position restored.
    pub position: Option<u64>,
    /// When the newest object applied was written (RFC 3339) ...
    pub point_time: Option<String>,
    /// ... in ms since the epoch.
    pub point_ms: Option<i64>,
    /// Segments applied.
    pub segments: usize,
    /// Bytes downloaded.
    pub bytes: u64,
    /// Objects the restore skipped (damaged or missing): any makes the verification fail.
    pub skipped: Vec<Skipped>,
    /// Whether objects exist beyond the point restored (a gap): fails the verification.
    #[serde(default)]
    pub partial: bool,
    /// What a partial restore left out, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gap: Option<String>,
    /// `PRAGMA integrity_check` of the restored point (`ok`).
    pub integrity: Option<String>,
    /// Page count of the restored point.
    pub page_count: Option<u64>,
    /// Its page size.
    pub page_size: Option<u64>,
    /// Row counts.
    pub tables: Vec<TableRows>,
    /// The comparison with the live database, if one was given.
    pub live: Option<LiveCheck>,
    /// Why it failed, when it could not be done at all.
    pub error: Option<String>,
}

impl VerifyReport {
    fn new(replica: String) -> Self {
        let time_ms = now_ms();
        VerifyReport {
            ok: false,
            message: String::new(),
            replica,
            time: rfc3339(time_ms),
            time_ms,
            elapsed_ms: 0,
            generation: None,
            snapshot: None,
            position: None,
            point_time: None,
            point_ms: None,
            segments: 0,
            bytes: 0,
            skipped: Vec::new(),
            partial: false,
            gap: None,
            integrity: None,
            page_count: None,
            page_size: None,
            tables: Vec::new(),
            live: None,
            error: None,
        }
    }
}

/// Verifies `replica`; with `handle` (the daemon), syncs first so the comparison with the
/// live database is strict. Never fails: a failure is a report with `ok: false`.
pub async fn verify(
    replica: &Replica,
    opts: &Options,
    handle: Option<&ReplicatorHandle>,
) -> VerifyReport {
    let t0 = Instant::now();
    let mut rep = VerifyReport::new(replica.describe());
    if let Err(e) = run(replica, opts, handle, &mut rep).await {
        let line = crate::one_line(&e);
        rep.ok = false;
        rep.message = format!("verification of {} failed: {line}", rep.replica);
        rep.error = Some(line);
    }
    rep.elapsed_ms = t0.elapsed().as_millis() as u64;
    rep
}

async fn run(
    replica: &Replica,
    opts: &Options,
    handle: Option<&ReplicatorHandle>,
    rep: &mut VerifyReport,
) -> Result<()> {
    // 1. The live database's data_version before anything else (and the time its files
    // were last modified, before opening it can create its -wal).
    let live = match opts.live.clone() {
        Some(path) => Some(
            blocking(move || {
                let modified = live_modified_ms(&path);
                let db = LiveDb::open(&path)?;
                let v0 = db.data_version()?;
                Ok((db, v0, path, modified))
            })
            .await?,
        ),
        None => None,
    };
    // 2. Everything committed so far is in the replica.
    if let Some(h) = handle {
        tokio::time::timeout(SYNC_TIMEOUT, h.sync())
            .await
            .map_err(|_| anyhow::anyhow!("no sync within {SYNC_TIMEOUT:?}"))
            .and_then(|r| r.map_err(anyhow::Error::new))
            .context("the replicator could not sync before verifying")?;
    }
    // 3. The newest point.
    let restored = restore_to_temp(replica, None, opts.temp_dir.as_deref(), opts.parallelism)
        .await
        .with_context(|| format!("cannot restore {}", replica.describe()))?;
    let r = &restored.report;
    rep.generation = r.generation.map(|g| g.to_string());
    rep.snapshot = Some(r.snapshot.clone());
    rep.position = Some(r.position);
    rep.point_ms = Some(r.timestamp_ms);
    rep.point_time = Some(rfc3339(r.timestamp_ms));
    rep.segments = r.segments;
    rep.bytes = r.bytes;
    rep.skipped = r
        .skipped
        .iter()
        .map(|(key, reason)| Skipped {
            key: key.clone(),
            reason: reason.clone(),
        })
        .collect();
    rep.partial = r.partial();
    rep.gap = r.gap.as_ref().map(|g| g.describe());
    // restore() ran PRAGMA integrity_check before handing the file over.
    rep.integrity = Some("ok".into());
    let path = restored.path.clone();
    let summary = blocking(move || Ok(inspect::summarize(&path)?)).await?;
    drop(restored);
    rep.page_count = Some(summary.page_count);
    rep.page_size = Some(summary.page_size);
    rep.tables = summary
        .tables
        .iter()
        .map(|t| TableRows {
            name: t.name.clone(),
            rows: Some(t.rows),
            live_rows: None,
        })
        .collect();
    let rows: u64 = summary.tables.iter().map(|t| t.rows).sum();
    let point = format!(
        "generation {}, position {:#x}, as of {}",
        rep.generation.as_deref().unwrap_or("?"),
        r_position(rep),
        rep.point_time.as_deref().unwrap_or("?")
    );
    rep.ok = rep.skipped.is_empty() && !rep.partial;
    rep.message = if rep.ok {
        format!(
            "newest point ({point}) restored: integrity_check ok, {} pages, {} tables, {rows} rows",
            summary.page_count,
            summary.tables.len()
        )
    } else if let Some(s) = rep.skipped.first() {
        format!(
            "the newest point is damaged: skipped {} ({}){}; an older point ({point}) restored instead{}",
            s.key,
            s.reason,
            if rep.skipped.len() > 1 {
                format!(" and {} more", rep.skipped.len() - 1)
            } else {
                String::new()
            },
            rep.gap
                .as_ref()
                .map(|g| format!("; the replica has a gap: {g}"))
                .unwrap_or_default()
        )
    } else {
        format!(
            "the replica has a gap: {}; only an older point ({point}) restored",
            rep.gap.as_deref().unwrap_or("?")
        )
    };

    // 4. The live database, in one read transaction.
    if let Some((db, v0, live_path, modified)) = live {
        let (ls, v1) = blocking(move || Ok(db.summary()?)).await?;
        // Without a sync, the replica may lag: the live files changed after its point.
        let point_ms = r_point_ms(rep);
        let lagging = match modified {
            Some(m) if handle.is_none() && m > point_ms => Some(format!(
                "modified {}, point written {}",
                rfc3339(m),
                rfc3339(point_ms)
            )),
            _ => None,
        };
        let check = compare(
            &summary,
            &ls,
            v0 != v1,
            lagging,
            &live_path,
            &mut rep.tables,
        );
        if check.comparison == "mismatch" {
            rep.ok = false;
            rep.message = format!("{}: {}", check.note, check.differences.join("; "));
        } else if rep.ok {
            rep.message = format!("{}; {}", rep.message, check.note);
        }
        rep.live = Some(check);
    }
    Ok(())
}

fn r_position(rep: &VerifyReport) -> u64 {
    rep.position.unwrap_or(0)
}

fn r_point_ms(rep: &VerifyReport) -> i64 {
    rep.point_ms.unwrap_or(0)
}

/// The last modification of the live database's files (the database and its WAL).
fn live_modified_ms(db: &Path) -> Option<i64> {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    [db.to_path_buf(), PathBuf::from(wal)]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok()?.modified().ok())
        .filter_map(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .max()
}

fn compare(
    restored: &Summary,
    live: &Summary,
    changed_during: bool,
    lagging: Option<String>,
    live_path: &Path,
    tables: &mut Vec<TableRows>,
) -> LiveCheck {
    let mut differences = Vec::new();
    for t in &live.tables {
        match tables.iter_mut().find(|r| r.name == t.name) {
            Some(r) => r.live_rows = Some(t.rows),
            None => tables.push(TableRows {
                name: t.name.clone(),
                rows: None,
                live_rows: Some(t.rows),
            }),
        }
    }
    tables.sort_by(|a, b| a.name.cmp(&b.name));
    for t in tables.iter() {
        if t.rows != t.live_rows {
            let show = |v: Option<u64>| v.map_or_else(|| "no table".to_string(), |n| n.to_string());
            differences.push(format!(
                "table {}: replica {}, live {}",
                t.name,
                show(t.rows),
                show(t.live_rows)
            ));
        }
    }
    if restored.page_count != live.page_count {
        differences.push(format!(
            "pages: replica {}, live {}",
            restored.page_count, live.page_count
        ));
    }
    let (comparison, note) = if differences.is_empty() {
        (
            "match",
            "the live database has the same page count and row counts".to_string(),
        )
    } else if changed_during {
        (
            "changed_during",
            "the live database changed during the verification, so its counts were not compared"
                .to_string(),
        )
    } else if let Some(why) = lagging {
        (
            "changed_since",
            format!(
                "the live database changed since the replica's newest point ({why}), so its counts were not compared"
            ),
        )
    } else {
        (
            "mismatch",
            "the restored point differs from the live database, which did not change since"
                .to_string(),
        )
    };
    LiveCheck {
        path: live_path.display().to_string(),
        page_count: live.page_count,
        comparison: comparison.to_string(),
        note,
        differences,
    }
}

/// Runs `walship verify`.
pub async fn command(a: VerifyArgs) -> Result<ExitCode> {
    if let Some(db) = &a.db {
        anyhow::ensure!(
            db.is_file(),
            "database {} does not exist (check --db)",
            db.display()
        );
    }
    let replica = crate::open_replica(&a.replica_url, &a.store).await?;
    let opts = Options {
        live: a.db.clone(),
        temp_dir: a.temp_dir.clone(),
        parallelism: a.parallelism,
    };
    let rep = verify(&replica, &opts, None).await;
    let mut out = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut out, &rep)?;
        writeln!(out)?;
    } else {
        print_text(&mut out, &rep)?;
    }
    out.flush()?;
    if rep.ok {
        Ok(ExitCode::SUCCESS)
    } else {
        anyhow::bail!("{}", rep.message)
    }
}

fn print_text(out: &mut dyn Write, rep: &VerifyReport) -> std::io::Result<()> {
    writeln!(out, "replica      {}", rep.replica)?;
    if let Some(g) = &rep.generation {
        writeln!(
            out,
            "point        generation {g}, position {:#x}, as of {} ({} segments after {}, {} bytes)",
            r_position(rep),
            rep.point_time.as_deref().unwrap_or("?"),
            rep.segments,
            rep.snapshot.as_deref().unwrap_or("?"),
            rep.bytes
        )?;
    }
    for s in &rep.skipped {
        writeln!(out, "skipped      {}: {}", s.key, s.reason)?;
    }
    if let Some(gap) = &rep.gap {
        writeln!(out, "gap          {gap}")?;
    }
    if let Some(i) = &rep.integrity {
        writeln!(out, "integrity    {i}")?;
    }
    if let (Some(n), Some(size)) = (rep.page_count, rep.page_size) {
        let live = rep
            .live
            .as_ref()
            .map(|l| format!(" (live: {})", l.page_count))
            .unwrap_or_default();
        writeln!(out, "pages        {n} x {size} bytes{live}")?;
    }
    if !rep.tables.is_empty() {
        let w = rep
            .tables
            .iter()
            .map(|t| t.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let live = rep.live.is_some();
        writeln!(
            out,
            "{:<w$}  {:>12}{}",
            "TABLE",
            "ROWS",
            if live {
                format!("  {:>12}", "LIVE")
            } else {
                String::new()
            }
        )?;
        let show = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |n| n.to_string());
        for t in &rep.tables {
            writeln!(
                out,
                "{:<w$}  {:>12}{}",
                t.name,
                show(t.rows),
                if live {
                    format!("  {:>12}", show(t.live_rows))
                } else {
                    String::new()
                }
            )?;
        }
    }
    if let Some(l) = &rep.live {
        writeln!(out, "live         {} ({})", l.note, l.comparison)?;
    }
    writeln!(
        out,
        "result       {}: {}",
        if rep.ok { "ok" } else { "FAILED" },
        rep.message
    )
}

// ---------------------------------------------------------------------------------------
// Scheduled verification

/// The last scheduled verification, kept in `<state dir>/verify.json` so a restart does not
/// reset the schedule.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Last {
    time_ms: i64,
    ok: bool,
    generation: Option<String>,
    position: Option<u64>,
}

/// Verification every `interval` inside `walship replicate`: sync, restore the newest
/// point, compare with the live database, record the result, alert on failure and on
/// recovery. Skipped (no request at all) when the replicator has uploaded nothing since
/// the last successful verification.
#[derive(Clone)]
pub struct Schedule {
    /// Time between verifications.
    pub interval: Duration,
    /// The live database.
    pub db: PathBuf,
    /// Its replica.
    pub replica: Replica,
    /// Its replicator.
    pub handle: ReplicatorHandle,
    /// Where the state file and the temporary restores go.
    pub state_dir: PathBuf,
    /// The state file's name in `state_dir` (`verify.json`; one per replicator when a
    /// database has two).
    pub file: String,
    /// Where results go (run history, alerts).
    pub sink: Arc<dyn Sink>,
}

impl std::fmt::Debug for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schedule")
            .field("interval", &self.interval)
            .field("db", &self.db)
            .field("state_dir", &self.state_dir)
            .finish()
    }
}

impl Schedule {
    fn state_file(&self) -> PathBuf {
        self.state_dir.join(&self.file)
    }

    fn load(&self) -> Option<Last> {
        let text = std::fs::read_to_string(self.state_file()).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn save(&self, last: &Last) {
        let r = (|| -> Result<()> {
            std::fs::create_dir_all(&self.state_dir)?;
            let tmp = self.state_dir.join(format!(".{}.tmp", self.file));
            std::fs::write(&tmp, serde_json::to_vec(last)?)?;
            std::fs::rename(&tmp, self.state_file())?;
            Ok(())
        })();
        if let Err(e) = r {
            tracing::warn!(db = %self.db.display(), error = %format!("{e:#}"), "cannot record the last verification");
        }
    }

    /// Runs until `cancel`.
    pub fn spawn(self, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move { self.run(cancel).await })
    }

    async fn run(self, cancel: CancellationToken) {
        let mut last = self.load();
        loop {
            let due = last
                .as_ref()
                .map_or(now_ms() + self.interval.as_millis() as i64, |l| {
                    l.time_ms + self.interval.as_millis() as i64
                });
            let wait = Duration::from_millis((due - now_ms()).max(0) as u64);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let st = self.handle.status();
            let generation = st.generation.map(|g| g.to_string());
            if let Some(l) = &last
                && l.ok
                && generation.is_some()
                && l.generation == generation
                && l.position == Some(st.position)
            {
                tracing::debug!(db = %self.db.display(), "nothing uploaded since the last verification; skipped");
                last = Some(Last {
                    time_ms: now_ms(),
                    ..l.clone()
                });
                continue;
            }
            let opts = Options {
                live: Some(self.db.clone()),
                temp_dir: Some(self.state_dir.clone()),
                parallelism: 2,
            };
            let rep = tokio::select! {
                _ = cancel.cancelled() => return,
                rep = verify(&self.replica, &opts, Some(&self.handle)) => rep,
            };
            if rep.ok {
                tracing::info!(db = %self.db.display(), elapsed_ms = rep.elapsed_ms, message = %rep.message, "verification passed");
            } else {
                tracing::error!(db = %self.db.display(), elapsed_ms = rep.elapsed_ms, message = %rep.message, "verification failed");
            }
            let previous_ok = last.as_ref().map(|l| l.ok);
            let (sink, r) = (self.sink.clone(), rep.clone());
            let _ = tokio::task::spawn_blocking(move || sink.verified(&r, previous_ok)).await;
            let now = Last {
                time_ms: rep.time_ms,
                ok: rep.ok,
                generation: rep.generation.clone(),
                position: rep.position,
            };
            self.save(&now);
            last = Some(now);
        }
    }
}
