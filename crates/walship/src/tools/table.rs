//! `walship restore --table NAME ... -o OUT REPLICA_URL`: a new database holding just some
//! tables of a restored point.

use std::path::Path;
use std::process::ExitCode;

use crate::clock::rfc3339;
use anyhow::{Context, Result};
use walship_engine::{EngineError, RestoreOptions, inspect};

use super::{blocking, parent_dir, sync_dir};
use crate::cli::RestoreArgs;

/// Restores the point into a temporary directory beside the output, copies the tables into
/// a second temporary database, checks it, and renames it into place. Nothing is written to
/// the output on failure.
pub async fn command(a: RestoreArgs) -> Result<ExitCode> {
    let output = a.output.clone();
    if output.exists() && !a.force {
        return Err(EngineError::OutputExists {
            path: output.clone(),
        }
        .into());
    }
    let replica = crate::open_replica(&a.replica_url, &a.store).await?;
    let target_ms = a
        .timestamp
        .as_deref()
        .map(crate::clock::parse_timestamp)
        .transpose()?;
    let dir = parent_dir(&output);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".walship-tables-")
        .tempdir_in(&dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    let full = tmp.path().join("full.db");
    let opts = RestoreOptions {
        target_ms,
        parallelism: a.parallelism.max(1),
        overwrite: false,
        progress: None,
        allow_partial: a.allow_partial,
    };
    let report = match walship_engine::restore::restore(&replica, &full, &opts).await {
        Ok(r) => r,
        Err(EngineError::NothingToRestore { .. }) if a.if_replica_exists => {
            eprintln!("no backup in {}; nothing restored", replica.describe());
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => {
            return Err(
                anyhow::Error::new(e).context(format!("restore of {} failed", output.display()))
            );
        }
    };
    super::print_skipped(&report);
    super::print_partial(&report);
    let part = tmp.path().join("tables.db");
    let (src, dest, names) = (full.clone(), part.clone(), a.table.clone());
    let copied = blocking(move || Ok(inspect::copy_tables(&src, &dest, &names)?))
        .await
        .with_context(|| format!("restore of {} failed", output.display()))?;
    let _ = std::fs::remove_file(&full);
    if output.exists() && !a.force {
        return Err(EngineError::OutputExists { path: output }.into());
    }
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut s = output.as_os_str().to_owned();
        s.push(suffix);
        let p = std::path::PathBuf::from(s);
        if p.exists() {
            std::fs::remove_file(&p)
                .with_context(|| format!("cannot remove stale {}", p.display()))?;
        }
    }
    std::fs::rename(&part, &output)
        .with_context(|| format!("cannot move the tables into {}", output.display()))?;
    sync_dir(&dir);
    let tables: Vec<String> = copied
        .iter()
        .map(|t| {
            format!(
                "{} ({} rows, {} indexes, {} triggers)",
                t.name, t.rows, t.indexes, t.triggers
            )
        })
        .collect();
    eprintln!(
        "restored {} from {} (generation {}, as of {}) into {}",
        tables.join(", "),
        replica.describe(),
        report.generation.map(|g| g.to_string()).unwrap_or_default(),
        rfc3339(report.timestamp_ms),
        show(&output)
    );
    Ok(ExitCode::SUCCESS)
}

fn show(p: &Path) -> String {
    p.display().to_string()
}
