//! `walship dump`: a logical SQL dump of a live database, or of a point of a replica.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use crate::clock::rfc3339;
use anyhow::{Context, Result};
use clap::Args;
use walship_engine::inspect::{self, DumpStats};

use super::{blocking, parent_dir, restore_to_temp, sync_dir};
use crate::cli::StoreArgs;

/// `walship dump`.
#[derive(Debug, Args)]
pub struct DumpArgs {
    /// The live database: read in one read transaction while the app goes on writing.
    #[arg(required_unless_present = "replica", conflicts_with = "replica")]
    pub db: Option<PathBuf>,
    /// Dump a point of this replica instead (restored into a temporary file first).
    #[arg(long, value_name = "REPLICA_URL")]
    pub replica: Option<String>,
    /// With --replica: the state as of this time (RFC 3339), not the newest.
    #[arg(long, requires = "replica")]
    pub timestamp: Option<String>,
    /// Write the dump here (created or replaced only once it is complete) instead of to
    /// standard output.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Where the temporary restore of --replica goes (default: beside --output, else the
    /// system's temporary directory).
    #[arg(long, value_name = "DIR")]
    pub temp_dir: Option<PathBuf>,
    /// Downloads in flight at once (with --replica).
    #[arg(long, default_value_t = 4)]
    pub parallelism: usize,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// Runs `walship dump`.
pub async fn command(a: DumpArgs) -> Result<ExitCode> {
    let (source, restored) = match (&a.db, &a.replica) {
        (Some(db), _) => (db.clone(), None),
        (None, Some(url)) => {
            let replica = crate::open_replica(url, &a.store).await?;
            let target_ms = a
                .timestamp
                .as_deref()
                .map(crate::clock::parse_timestamp)
                .transpose()?;
            let temp_dir = a
                .temp_dir
                .clone()
                .or_else(|| a.output.as_deref().map(parent_dir));
            let r = restore_to_temp(&replica, target_ms, temp_dir.as_deref(), a.parallelism)
                .await
                .with_context(|| format!("cannot restore {}", replica.describe()))?;
            super::print_skipped(&r.report);
            super::print_partial(&r.report);
            eprintln!(
                "restored {} as of {} (generation {}, {} segments)",
                replica.describe(),
                rfc3339(r.report.timestamp_ms),
                r.report
                    .generation
                    .map(|g| g.to_string())
                    .unwrap_or_default(),
                r.report.segments
            );
            (r.path.clone(), Some(r))
        }
        (None, None) => anyhow::bail!("give a DB or --replica REPLICA_URL"),
    };
    let what = match &a.replica {
        Some(url) if a.db.is_none() => url.clone(),
        _ => source.display().to_string(),
    };
    let stats = match a.output.clone() {
        Some(out) => {
            let src = source.clone();
            blocking(move || dump_to_file(&src, &out)).await
        }
        None => {
            let src = source.clone();
            blocking(move || {
                let stdout = std::io::stdout();
                let mut w = BufWriter::with_capacity(1 << 16, stdout.lock());
                let stats = inspect::dump(&src, &mut w)?;
                w.flush().context("write the dump to standard output")?;
                Ok(stats)
            })
            .await
        }
    }
    .with_context(|| format!("dump of {what} failed"))?;
    drop(restored);
    eprintln!(
        "dumped {what}: {} tables, {} rows, {} schema objects, {} bytes{}",
        stats.tables,
        stats.rows,
        stats.objects,
        stats.bytes,
        a.output
            .as_ref()
            .map(|o| format!(" into {}", o.display()))
            .unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

/// Dumps into a temporary file beside `out`, then renames it into place.
fn dump_to_file(src: &std::path::Path, out: &std::path::Path) -> Result<DumpStats> {
    let dir = parent_dir(out);
    let tmp = tempfile::Builder::new()
        .prefix(".walship-dump-")
        .tempfile_in(&dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, tmp);
    let stats = inspect::dump(src, &mut w)?;
    let tmp = w
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("cannot write {}", out.display()))?;
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("cannot write {}", out.display()))?;
    tmp.persist(out)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot write {}", out.display()))?;
    sync_dir(&dir);
    Ok(stats)
}
