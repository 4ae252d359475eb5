//! The run inventory: a durable history of backup runs per database.
//!
//! A *run* is a snapshot upload, a batch of WAL segment uploads (closed after 10 s without
//! an upload, or after a minute), or a failure episode (failed rounds in a row, closed by
//! the next successful sync). Each is one JSON line in `<state dir>/history.jsonl`,
//! appended and fsynced when the run ends; a failure episode is also written when it
//! starts, so a crash cannot hide it. Lines with the same `id` describe the same run and
//! the last one wins. Past `max_bytes` the file is renamed to `history.jsonl.1` (replacing
//! the previous one), so the history stays bounded. `walship history DB` prints it.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;

use anyhow::{Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use walship_engine::Status;

use super::{default_state_dir, rfc3339};

/// Default rotation size of a history file.
pub const DEFAULT_MAX_BYTES: u64 = 1024 * 1024;
/// Runs kept in memory for the API and dashboard.
const MEMORY_RUNS: usize = 1000;
/// A batch of segment uploads ends after this long without one...
const SYNC_IDLE_MS: i64 = 10_000;
/// ... or once it is this long.
const SYNC_MAX_MS: i64 = 60_000;

/// What a run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunKind {
    /// A full snapshot.
    Snapshot,
    /// WAL segments.
    Sync,
    /// A scheduled verification (`replicate --verify-interval`): restore, check, compare.
    Verify,
    /// A schema change seen when a snapshot finished.
    Schema,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunResult {
    Ok,
    Failed,
    /// A failure episode still going on.
    Failing,
}

/// One backup run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// `<kind>-<start_ms>`; later lines with the same id replace earlier ones.
    pub id: String,
    pub db: String,
    pub kind: RunKind,
    pub result: RunResult,
    pub start: String,
    pub start_ms: i64,
    pub end: Option<String>,
    pub end_ms: Option<i64>,
    pub bytes: u64,
    pub objects: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
    /// Failed rounds in a failure episode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u64>,
    /// Why a snapshot was taken: `schedule`, `api`, `new_generation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    /// What a verify or schema run found (its report; the schema changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

impl Run {
    /// A run of `kind` starting at `start_ms`, not ended yet.
    pub fn new(db: &str, kind: RunKind, start_ms: i64) -> Run {
        let k = match kind {
            RunKind::Snapshot => "snapshot",
            RunKind::Sync => "sync",
            RunKind::Verify => "verify",
            RunKind::Schema => "schema",
        };
        Run {
            id: format!("{k}-{start_ms}"),
            db: db.to_string(),
            kind,
            result: RunResult::Ok,
            start: rfc3339(start_ms),
            start_ms,
            end: None,
            end_ms: None,
            bytes: 0,
            objects: 0,
            error: None,
            error_kind: None,
            attempts: None,
            trigger: None,
            generation: None,
            position: None,
            detail: None,
        }
    }

    /// The run, ended at `end_ms`.
    pub fn ended(mut self, end_ms: i64) -> Run {
        self.end = Some(rfc3339(end_ms));
        self.end_ms = Some(end_ms);
        self
    }
}

/// A database's history file, and its recent runs in memory.
#[derive(Debug)]
pub struct History {
    /// `None`: kept in memory only (the state directory could not be written).
    path: Option<PathBuf>,
    max_bytes: u64,
    recent: Mutex<Vec<Run>>,
}

impl History {
    /// Opens `dir/<file>` and loads the recent runs of `db` from it. A directory that does
    /// not exist yet is created with the first run recorded, so a replicator refused at
    /// start leaves none behind.
    pub fn open(dir: &Path, file: &str, db: &str, max_bytes: u64) -> Result<History> {
        let path = dir.join(file);
        // Fail now, not at the first run, if the file cannot be written.
        if dir.exists() {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
        } else {
            creatable(dir)?;
        }
        let mut recent = read_runs(&[rotated(&path), path.clone()]);
        recent.retain(|r| r.db == db);
        if recent.len() > MEMORY_RUNS {
            recent.drain(..recent.len() - MEMORY_RUNS);
        }
        Ok(History {
            path: Some(path),
            max_bytes: max_bytes.max(4096),
            recent: Mutex::new(recent),
        })
    }

    /// A history kept in memory only.
    pub fn in_memory() -> History {
        History {
            path: None,
            max_bytes: DEFAULT_MAX_BYTES,
            recent: Mutex::new(Vec::new()),
        }
    }

    /// The file, if there is one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Appends runs durably (write, fsync) and to the in-memory list.
    pub fn append(&self, runs: &[Run]) -> Result<()> {
        if runs.is_empty() {
            return Ok(());
        }
        let mut recent = self
            .recent
            .lock()
            .map_err(|_| anyhow::anyhow!("history lock poisoned"))?;
        for r in runs {
            match recent.iter_mut().rev().find(|x| x.id == r.id) {
                Some(x) => *x = r.clone(),
                None => recent.push(r.clone()),
            }
        }
        if recent.len() > MEMORY_RUNS {
            let n = recent.len() - MEMORY_RUNS;
            recent.drain(..n);
        }
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut buf = Vec::new();
        for r in runs {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let len = std::fs::metadata(path).map_or(0, |m| m.len());
        if len > 0 && len + buf.len() as u64 > self.max_bytes {
            std::fs::rename(path, rotated(path))
                .with_context(|| format!("cannot rotate {}", path.display()))?;
        } else if len > 0 && last_byte(path) != Some(b'\n') {
            // A line torn by a crash: end it, so the new lines stay whole.
            buf.insert(0, b'\n');
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        f.write_all(&buf)
            .and_then(|()| f.sync_data())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    /// The most recent `limit` runs, newest first, with `open` (runs still going on, which
    /// replace recorded ones of the same id).
    pub fn recent_with(&self, open: &[Run], limit: usize) -> Vec<Run> {
        let recent = self.recent.lock().map(|r| r.clone()).unwrap_or_default();
        let mut out: Vec<Run> = recent
            .into_iter()
            .filter(|r| !open.iter().any(|o| o.id == r.id))
            .chain(open.iter().cloned())
            .collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.start_ms));
        out.truncate(limit);
        out
    }
}

/// Whether `dir`, which does not exist, could be created: its nearest existing ancestor is
/// a directory something can be written in (tried with a temporary directory, removed at
/// once).
fn creatable(dir: &Path) -> Result<()> {
    let ancestor = dir
        .ancestors()
        .skip(1)
        .find(|a| a.as_os_str().is_empty() || a.exists())
        .map(|a| {
            if a.as_os_str().is_empty() {
                Path::new(".")
            } else {
                a
            }
        })
        .unwrap_or(Path::new("/"));
    tempfile::Builder::new()
        .prefix(".walship-probe-")
        .tempdir_in(ancestor)
        .map(drop)
        .with_context(|| format!("cannot create {}", dir.display()))
}

fn last_byte(path: &Path) -> Option<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(path).ok()?;
    f.seek(SeekFrom::End(-1)).ok()?;
    let mut b = [0u8; 1];
    f.read_exact(&mut b).ok()?;
    Some(b[0])
}

/// The history file of database `name` whose file is `db`: `history.jsonl`, or
/// `history-<name>.jsonl` when the name is not the file's own (a second replica of one
/// database under another name, so two replicators never share a file).
pub fn file_name(name: &str, db: &Path) -> String {
    if name == super::default_name(db) {
        "history.jsonl".to_string()
    } else {
        format!("history-{name}.jsonl")
    }
}

/// The history files in `dir` (each with its rotated predecessor first).
fn history_files(dir: &Path) -> Vec<PathBuf> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("history") && n.ends_with(".jsonl"))
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.into_iter().flat_map(|p| [rotated(&p), p]).collect()
}

fn rotated(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".1");
    PathBuf::from(s)
}

/// Reads runs from files in order, folding lines with the same id (the last wins) and
/// skipping lines that do not parse (a torn last line after a crash). Oldest first.
pub fn read_runs(files: &[PathBuf]) -> Vec<Run> {
    let mut order: Vec<String> = Vec::new();
    let mut by_id: HashMap<String, Run> = HashMap::new();
    for f in files {
        let Ok(file) = File::open(f) else { continue };
        for line in BufReader::new(file).lines() {
            let Ok(line) = line else { break };
            let Ok(run) = serde_json::from_str::<Run>(&line) else {
                continue;
            };
            if !by_id.contains_key(&run.id) {
                order.push(run.id.clone());
            }
            by_id.insert(run.id.clone(), run);
        }
    }
    let mut out: Vec<Run> = order
        .into_iter()
        .filter_map(|id| by_id.remove(&id))
        .collect();
    out.sort_by_key(|r| r.start_ms);
    out
}

/// Turns successive statuses of one replicator into runs.
#[derive(Debug)]
pub struct Recorder {
    db: String,
    prev: Status,
    sync: Option<Run>,
    failure: Option<Run>,
    failure_errors_at_start: u64,
    /// Trigger of the next snapshot, set by the API.
    pub next_snapshot_trigger: Option<String>,
}

fn total_errors(s: &Status) -> u64 {
    s.errors_by_kind.values().sum()
}

impl Recorder {
    /// A recorder starting from `initial`.
    pub fn new(db: &str, initial: Status) -> Self {
        Recorder {
            db: db.to_string(),
            prev: initial,
            sync: None,
            failure: None,
            failure_errors_at_start: 0,
            next_snapshot_trigger: None,
        }
    }

    /// Feeds the status at `now_ms`; returns runs to append (ended runs, and failure
    /// episodes when they start).
    pub fn observe(&mut self, cur: &Status, now_ms: i64) -> Vec<Run> {
        let prev = std::mem::replace(&mut self.prev, cur.clone());
        let mut out = Vec::new();
        let new_snapshots = cur.snapshots.saturating_sub(prev.snapshots);
        let new_objects = cur.objects_uploaded.saturating_sub(prev.objects_uploaded);
        let new_bytes = cur.bytes_uploaded.saturating_sub(prev.bytes_uploaded);
        let new_errors = total_errors(cur).saturating_sub(total_errors(&prev));

        // Failures first: an episode starting ends the batch of uploads before it.
        if cur.consecutive_errors > 0 && self.failure.is_none() && new_errors > 0 {
            out.extend(self.close_sync());
            let mut r = Run::new(&self.db, RunKind::Sync, now_ms);
            r.id = format!("failure-{now_ms}");
            r.result = RunResult::Failing;
            r.error = cur.last_error.clone();
            r.error_kind = last_kind(&prev, cur);
            r.attempts = Some(cur.consecutive_errors);
            r.generation = cur.generation.map(|g| g.to_string());
            self.failure_errors_at_start = total_errors(cur) - cur.consecutive_errors;
            out.push(r.clone());
            self.failure = Some(r);
        } else if let Some(f) = self.failure.as_mut()
            && cur.consecutive_errors > 0
        {
            if cur.last_error.is_some() {
                f.error = cur.last_error.clone();
            }
            if let Some(k) = last_kind(&prev, cur) {
                f.error_kind = Some(k);
            }
            f.attempts = Some(total_errors(cur) - self.failure_errors_at_start);
        } else if cur.consecutive_errors == 0 && new_errors > 0 && self.failure.is_none() {
            // Failed and recovered between two looks: one short episode.
            let mut r = Run::new(&self.db, RunKind::Sync, now_ms).ended(now_ms);
            r.id = format!("failure-{now_ms}");
            r.result = RunResult::Failed;
            r.error = cur
                .last_error
                .clone()
                .or_else(|| Some("failed, then recovered".into()));
            r.error_kind = last_kind(&prev, cur);
            r.attempts = Some(new_errors);
            out.push(r);
        }
        if cur.consecutive_errors == 0
            && let Some(mut f) = self.failure.take()
        {
            f.attempts = Some(total_errors(cur) - self.failure_errors_at_start);
            f.result = RunResult::Failed;
            out.push(f.ended(now_ms));
        }

        if new_snapshots > 0 {
            let end = cur.last_snapshot_ms.unwrap_or(now_ms);
            let start = end - cur.last_snapshot_duration_ms as i64;
            let mut r = Run::new(&self.db, RunKind::Snapshot, start).ended(end);
            r.bytes = cur.last_snapshot_bytes;
            r.objects = 1;
            r.generation = cur.generation.map(|g| g.to_string());
            r.position = Some(cur.position);
            r.trigger = Some(if cur.generations_started > prev.generations_started {
                "new_generation".to_string()
            } else if let Some(t) = self.next_snapshot_trigger.take() {
                t
            } else {
                "schedule".to_string()
            });
            out.push(r);
        }
        let seg_objects = new_objects.saturating_sub(new_snapshots);
        let seg_bytes = if new_snapshots > 0 {
            new_bytes.saturating_sub(cur.last_snapshot_bytes * new_snapshots)
        } else {
            new_bytes
        };
        if seg_objects > 0 {
            let at = cur.last_upload_ms.unwrap_or(now_ms);
            let generation = cur.generation.map(|g| g.to_string());
            if self
                .sync
                .as_ref()
                .is_some_and(|s| s.generation != generation)
            {
                out.extend(self.close_sync());
            }
            let r = self.sync.get_or_insert_with(|| {
                let mut r = Run::new(&self.db, RunKind::Sync, at);
                r.generation = generation;
                r
            });
            r.objects += seg_objects;
            r.bytes += seg_bytes;
            r.end_ms = Some(at);
            r.position = Some(cur.position);
        }
        if let Some(s) = &self.sync {
            let last = s.end_ms.unwrap_or(s.start_ms);
            if now_ms - last >= SYNC_IDLE_MS || now_ms - s.start_ms >= SYNC_MAX_MS {
                out.extend(self.close_sync());
            }
        }
        out
    }

    /// The runs still going on: the current batch of uploads and failure episode.
    pub fn open_runs(&self) -> Vec<Run> {
        let mut out: Vec<Run> = self.failure.iter().cloned().collect();
        if let Some(s) = &self.sync {
            let mut r = s.clone();
            r.end = r.end_ms.map(rfc3339);
            out.push(r);
        }
        out
    }

    /// Ends whatever is open (at shutdown).
    pub fn finish(&mut self, now_ms: i64) -> Vec<Run> {
        let mut out: Vec<Run> = self.close_sync().into_iter().collect();
        if let Some(mut f) = self.failure.take() {
            f.result = RunResult::Failed;
            out.push(f.ended(now_ms));
        }
        out
    }

    fn close_sync(&mut self) -> Option<Run> {
        let s = self.sync.take()?;
        let end = s.end_ms.unwrap_or(s.start_ms);
        Some(s.ended(end))
    }
}

fn last_kind(prev: &Status, cur: &Status) -> Option<String> {
    cur.errors_by_kind
        .iter()
        .find(|(k, v)| prev.errors_by_kind.get(*k).copied().unwrap_or(0) < **v)
        .map(|(k, _)| (*k).to_string())
}

/// `walship history`.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The database (its history is in `<DB>-walship/`).
    pub db: PathBuf,
    /// The state directory, if `replicate` was given --state-dir.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Show this many runs (newest first).
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Print JSON lines.
    #[arg(long)]
    pub json: bool,
}

/// Prints the history.
pub fn command(a: &HistoryArgs) -> Result<ExitCode> {
    let dir = a
        .state_dir
        .clone()
        .unwrap_or_else(|| default_state_dir(&a.db));
    let files = history_files(&dir);
    if files.is_empty() {
        anyhow::bail!(
            "no run history in {} (it is written by `walship replicate {}`; pass --state-dir if replicate had one)",
            dir.display(),
            a.db.display()
        );
    }
    let mut runs = read_runs(&files);
    runs.sort_by_key(|r| r.start_ms);
    runs.reverse();
    runs.truncate(a.limit);
    let mut out = std::io::stdout().lock();
    if a.json {
        for r in &runs {
            serde_json::to_writer(&mut out, r)?;
            writeln!(out)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    // A DB column only when the directory holds several databases' runs.
    let several = runs.iter().any(|r| r.db != runs[0].db);
    let width = runs.iter().map(|r| r.db.len()).max().unwrap_or(2).max(2);
    let db_col = |name: &str| {
        if several {
            format!("{name:<width$}  ")
        } else {
            String::new()
        }
    };
    writeln!(
        out,
        "{}{:<24}  {:>8}  {:<8}  {:<7}  {:>12}  {:>7}  ERROR",
        db_col("DB"),
        "START",
        "SECONDS",
        "KIND",
        "RESULT",
        "BYTES",
        "OBJECTS"
    )?;
    for r in &runs {
        let kind = if r.id.starts_with("failure-") {
            "failure"
        } else {
            match r.kind {
                RunKind::Snapshot => "snapshot",
                RunKind::Sync => "sync",
                RunKind::Verify => "verify",
                RunKind::Schema => "schema",
            }
        };
        let result = match r.result {
            RunResult::Ok => "ok",
            RunResult::Failed => "failed",
            RunResult::Failing => "failing",
        };
        let secs = r
            .end_ms
            .map(|e| format!("{:.1}", (e - r.start_ms).max(0) as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "{}{:<24}  {:>8}  {:<8}  {:<7}  {:>12}  {:>7}  {}",
            db_col(&r.db),
            rfc3339(r.start_ms),
            secs,
            kind,
            result,
            r.bytes,
            r.objects,
            r.error.as_deref().unwrap_or("")
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000_000;

    fn st() -> Status {
        Status::default()
    }

    #[test]
    fn snapshots_batches_and_failures_become_runs() {
        let mut rec = Recorder::new("app", st());
        // A new generation's snapshot.
        let mut s = st();
        s.generations_started = 1;
        s.snapshots = 1;
        s.objects_uploaded = 1;
        s.bytes_uploaded = 4096;
        s.last_snapshot_bytes = 4096;
        s.last_snapshot_duration_ms = 30;
        s.last_snapshot_ms = Some(T0);
        s.last_upload_ms = Some(T0);
        let runs = rec.observe(&s, T0 + 5);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].kind, RunKind::Snapshot);
        assert_eq!(runs[0].trigger.as_deref(), Some("new_generation"));
        assert_eq!(runs[0].start_ms, T0 - 30);
        assert_eq!(runs[0].bytes, 4096);
        // Two segments, then quiet: one sync run when the batch goes idle.
        s.objects_uploaded = 3;
        s.bytes_uploaded = 4096 + 300;
        s.last_upload_ms = Some(T0 + 1000);
        assert!(rec.observe(&s, T0 + 1000).is_empty());
        let runs = rec.observe(&s, T0 + 1000 + SYNC_IDLE_MS);
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].objects, runs[0].bytes), (2, 300));
        assert_eq!(runs[0].result, RunResult::Ok);
        // Failures: written when they start and when they end.
        s.consecutive_errors = 1;
        s.errors_by_kind.insert("unavailable", 1);
        s.last_error = Some("store unavailable".into());
        let runs = rec.observe(&s, T0 + 20_000);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].result, RunResult::Failing);
        assert_eq!(runs[0].error_kind.as_deref(), Some("unavailable"));
        s.consecutive_errors = 4;
        s.errors_by_kind.insert("unavailable", 4);
        assert!(rec.observe(&s, T0 + 25_000).is_empty());
        s.consecutive_errors = 0;
        s.last_error = None;
        let runs = rec.observe(&s, T0 + 30_000);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].result, RunResult::Failed);
        assert_eq!(runs[0].attempts, Some(4));
        assert_eq!(runs[0].end_ms, Some(T0 + 30_000));
        assert_eq!(runs[0].error.as_deref(), Some("store unavailable"));
    }

    #[test]
    fn two_replicas_of_one_database_keep_two_files() {
        let db = Path::new("/data/app.db");
        assert_eq!(file_name("app", db), "history.jsonl");
        assert_eq!(file_name("app-r2", db), "history-app-r2.jsonl");
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let a = History::open(dir.path(), "history.jsonl", "app", 4096)
            .unwrap_or_else(|e| panic!("{e}"));
        let b = History::open(dir.path(), "history-app-r2.jsonl", "app-r2", 4096)
            .unwrap_or_else(|e| panic!("{e}"));
        a.append(&[Run::new("app", RunKind::Snapshot, T0)])
            .unwrap_or_else(|e| panic!("{e}"));
        b.append(&[Run::new("app-r2", RunKind::Snapshot, T0 + 1)])
            .unwrap_or_else(|e| panic!("{e}"));
        let all = read_runs(&history_files(dir.path()));
        assert_eq!(all.len(), 2);
        let again = History::open(dir.path(), "history.jsonl", "app", 4096)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again.recent_with(&[], 10).len(), 1);
    }

    #[test]
    fn the_state_directory_is_created_with_the_first_run_only() {
        let t = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let dir = t.path().join("app.db-walship");
        let h = History::open(&dir, "history.jsonl", "app", 4096).unwrap_or_else(|e| panic!("{e}"));
        assert!(!dir.exists());
        assert!(History::open(Path::new("/dev/null/x"), "history.jsonl", "app", 4096).is_err());
        h.append(&[Run::new("app", RunKind::Snapshot, T0)])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_runs(&history_files(&dir)).len(), 1);
    }

    #[test]
    fn file_folds_by_id_rotates_and_survives_a_torn_line() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let h = History::open(dir.path(), "history.jsonl", "app", 4096)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut r = Run::new("app", RunKind::Sync, T0);
        r.result = RunResult::Failing;
        h.append(std::slice::from_ref(&r))
            .unwrap_or_else(|e| panic!("{e}"));
        r.result = RunResult::Failed;
        h.append(std::slice::from_ref(&r))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(h.recent_with(&[], 10).len(), 1);
        // A torn line is skipped.
        let mut f = OpenOptions::new()
            .append(true)
            .open(h.path().unwrap())
            .unwrap_or_else(|e| panic!("{e}"));
        f.write_all(b"{\"id\":\"sync-1")
            .unwrap_or_else(|e| panic!("{e}"));
        drop(f);
        let runs = read_runs(&[h.path().unwrap().to_path_buf()]);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].result, RunResult::Failed);
        // ... and the next line stays whole.
        h.append(&[Run::new("app", RunKind::Snapshot, T0 - 1)])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_runs(&[h.path().unwrap().to_path_buf()]).len(), 2);
        // Enough runs to rotate: the file stays bounded and nothing recent is lost.
        for i in 1..60 {
            h.append(&[Run::new("app", RunKind::Snapshot, T0 + i)])
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let len = std::fs::metadata(h.path().unwrap())
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len <= 4096, "{len}");
        assert!(rotated(h.path().unwrap()).exists());
        let all = read_runs(&[rotated(h.path().unwrap()), h.path().unwrap().to_path_buf()]);
        assert_eq!(all.last().map(|r| r.start_ms), Some(T0 + 59));
        let reopened = History::open(dir.path(), "history.jsonl", "app", 4096)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(reopened.recent_with(&[], 1)[0].start_ms, T0 + 59);
    }
}
