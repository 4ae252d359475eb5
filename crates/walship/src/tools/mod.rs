//! Tools around replication: SQL dumps, verification, single-table restores, schema
//! changes.
//!
//! - [`dump`]: `walship dump` writes a logical SQL dump of a live database or of any
//!   restorable point of a replica.
//! - [`verify`]: `walship verify` restores the newest point into a temporary file, checks it
//!   and counts its rows (optionally against the live database); [`verify::Schedule`]
//!   runs the same check inside `walship replicate --verify-interval`.
//! - [`table`]: `walship restore --table` writes a new database holding some tables of a
//!   restored point.
//! - [`schema`]: `walship schema-diff` lists schema changes between the snapshots of a
//!   replica; [`schema::Watch`] logs schema changes as `replicate` takes snapshots.
//!
//! SQLite itself is only opened by the engine (`walship_engine::inspect`); this module
//! restores, moves files into place, and prints.

pub mod daemon;
pub mod dump;
pub mod schema;
pub mod table;
pub mod verify;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use walship_engine::{Replica, RestoreOptions, RestoreReport};

/// A point of a replica restored into a temporary directory, removed on drop.
#[derive(Debug)]
pub struct Restored {
    /// The restored database.
    pub path: PathBuf,
    /// What the restore did.
    pub report: RestoreReport,
    _dir: tempfile::TempDir,
}

/// Restores the newest point (or the one at `target_ms`) of `replica` into a new temporary
/// directory under `dir` (default: the system's temporary directory).
pub async fn restore_to_temp(
    replica: &Replica,
    target_ms: Option<i64>,
    dir: Option<&Path>,
    parallelism: usize,
) -> Result<Restored> {
    let base = dir
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base)
        .with_context(|| format!("cannot create the temporary directory {}", base.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".walship-tmp-")
        .tempdir_in(&base)
        .with_context(|| format!("cannot create a temporary directory in {}", base.display()))?;
    let path = tmp.path().join("restored.db");
    let opts = RestoreOptions {
        target_ms,
        parallelism: parallelism.max(1),
        overwrite: false,
        progress: None,
        // The callers report a partial point (verify fails on it, dump says so).
        allow_partial: true,
    };
    // On a blocking thread of its own: the restore future cannot be proven `Send` inside
    // `tokio::spawn` (a higher-ranked lifetime in the engine's download stream), and the
    // daemon runs verification in a spawned task.
    let rt = tokio::runtime::Handle::current();
    let (r, p) = (replica.clone(), path.clone());
    let report = tokio::task::spawn_blocking(move || {
        rt.block_on(walship_engine::restore::restore(&r, &p, &opts))
    })
    .await
    .context("restore task failed")??;
    Ok(Restored {
        path,
        report,
        _dir: tmp,
    })
}

/// Prints the objects a restore skipped, one line each, to stderr.
pub fn print_skipped(report: &RestoreReport) {
    for (key, why) in &report.skipped {
        eprintln!("skipped {key}: {why}");
    }
}

/// Prints what a partial restore left out, if it was partial, to stderr.
pub fn print_partial(report: &RestoreReport) {
    if let Some(gap) = &report.gap {
        eprintln!("warning: partial restore: {}", gap.describe());
    }
}

/// Runs blocking work on a blocking thread.
pub async fn blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .context("background task failed")?
}

/// fsyncs a directory (after a rename into it); errors are ignored (not every file system
/// supports it).
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The directory of `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> PathBuf {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub use crate::clock::now_ms;

/// Where the daemon's tools report: the run history and webhooks when monitoring runs.
pub trait Sink: Send + Sync {
    /// A scheduled verification finished; `previous_ok` is the result of the one before.
    fn verified(&self, report: &verify::VerifyReport, previous_ok: Option<bool>);
    /// The schema changed between two snapshots.
    fn schema_changed(&self, event: &schema::SchemaEvent);
}
