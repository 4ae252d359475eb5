//! The `walship` command: replicate, restore, snapshot, generations.
//!
//! Only this file knows about signals and process exit codes; everything else is in the
//! engine library.

mod cli;
mod duration;
mod http;
mod tools;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokio_util::sync::CancellationToken;
use walship_engine::{Replica, ReplicateOptions, RestoreOptions};
use walship_format::key::{ObjectKey, format_time};
use walship_storage::{ReplicaUrl, StoreOptions};

use crate::cli::{
    Cli, Command, DecryptArgs, GenerationsArgs, ReplicateArgs, RestoreArgs, SnapshotArgs, StoreArgs,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let r = rt.block_on(async move {
        match cli.command {
            Command::Replicate(a) => replicate(a).await,
            Command::Restore(a) => restore(a).await,
            Command::Snapshot(a) => snapshot(a).await,
            Command::Generations(a) => generations(a).await,
            Command::History(a) => http::history::command(&a),
            Command::Decrypt(a) => decrypt(a),
            Command::Dump(a) => tools::dump::command(a).await,
            Command::Verify(a) => tools::verify::command(a).await,
            Command::SchemaDiff(a) => tools::schema::command(a).await,
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes on one line, without repeating a cause the message already has.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out.replace('\n', " ")
}

fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("WALSHIP_LOG")
        .or_else(|_| EnvFilter::try_new(&cli.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn open_replica(url: &str, args: &StoreArgs) -> Result<Replica> {
    let url: ReplicaUrl = url.parse()?;
    let mut opts = StoreOptions::default();
    args.apply(&mut opts.s3)?;
    let keys = args.keys()?;
    let store = walship_storage::open(&url, &opts).await?;
    let replica = Replica::new(store);
    Ok(match keys {
        Some(k) => replica.with_keys(k),
        None => replica,
    })
}

fn decrypt(a: DecryptArgs) -> Result<ExitCode> {
    use std::io::{BufReader, BufWriter, Read, Write};
    let keys = a
        .store
        .keys()?
        .context("no key given (set WALSHIP_ENCRYPTION_KEY or pass --encryption-key-file)")?;
    let input = std::fs::File::open(&a.input)
        .with_context(|| format!("cannot open {}", a.input.display()))?;
    let mut r = walship_format::object::ObjectReader::with_keys(BufReader::new(input), Some(&keys))
        .with_context(|| format!("cannot decrypt {}", a.input.display()))?;
    let dir = a
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    let mut w = BufWriter::new(tmp);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r
            .read(&mut buf)
            .map_err(walship_format::FormatError::from_io)
            .with_context(|| format!("cannot decrypt {}", a.input.display()))?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n]).context("write output")?;
    }
    let tmp = w
        .into_inner()
        .map_err(|e| e.into_error())
        .context("write output")?;
    tmp.persist(&a.output)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot write {}", a.output.display()))?;
    let h = r.header();
    eprintln!(
        "decrypted {} ({:?}, generation {:016x}, {} bytes) into {}",
        a.input.display(),
        h.kind,
        h.generation,
        h.raw_len,
        a.output.display()
    );
    Ok(ExitCode::SUCCESS)
}

async fn replicate(a: ReplicateArgs) -> Result<ExitCode> {
    let (Some(db), Some(url)) = (a.db.clone(), a.replica_url.clone()) else {
        bail!(
            "replicate needs DB and REPLICA_URL (for example: walship replicate /data/app.db file:///backups/app)"
        );
    };
    let replica = open_replica(&url, &a.store).await?;
    walship_storage::check_access(replica.store().as_ref())
        .await
        .with_context(|| format!("cannot reach the replica {}", replica.describe()))?;
    let opts = ReplicateOptions {
        sync_interval: a.sync_interval.0,
        snapshot_interval: a.snapshot_interval.0,
        checkpoint_frames: a.checkpoint_frames,
        enable_wal: a.enable_wal,
        ..Default::default()
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("install SIGINT handler")?;
    let cancel = CancellationToken::new();
    let (handle, mut task) =
        walship_engine::replicate::spawn(db.clone(), replica.clone(), opts, cancel.clone());
    // Run history, alerts and (with --listen) the HTTP server; never in the replicator's way.
    let monitoring = http::start(
        &a.http,
        vec![http::Database::new(
            http::default_name(&db),
            std::path::absolute(&db).unwrap_or_else(|_| db.clone()),
            &url,
            handle.clone(),
            replica,
        )],
        a.snapshot_interval.0,
    )
    .await?;

    // The replicator is up once its first sync answers; only then start the app.
    tokio::select! {
        r = handle.sync() => {
            if let Err(e) = r {
                // The task ended; its own error says why.
                if let Ok(Err(task_err)) = (&mut task).await {
                    return Err(anyhow::Error::new(task_err).context(format!("cannot replicate {}", db.display())));
                }
                return Err(anyhow::Error::new(e).context(format!("cannot replicate {}", db.display())));
            }
        }
        r = &mut task => {
            r.context("replicator task failed")?.with_context(|| format!("cannot replicate {}", db.display()))?;
            bail!("replicator stopped before its first sync");
        }
        _ = term.recv() => return stop_during_startup(cancel, task, a.shutdown_timeout.0).await,
        _ = int.recv() => return stop_during_startup(cancel, task, a.shutdown_timeout.0).await,
    }
    tracing::info!(db = %db.display(), "replicating");
    // Scheduled verification and the schema watch (tools::daemon), beside the replicator.
    let tool_tasks = tools::daemon::start(&a.tools, monitoring.state());

    let mut child = match &a.exec {
        Some(cmd) => Some(spawn_child(cmd)?),
        None => None,
    };

    enum First {
        Signal(i32),
        Child(std::process::ExitStatus),
        Task(Result<walship_engine::EngineResult<()>, tokio::task::JoinError>),
    }
    let first = tokio::select! {
        _ = term.recv() => First::Signal(libc::SIGTERM),
        _ = int.recv() => First::Signal(libc::SIGINT),
        st = wait_child(&mut child) => First::Child(st?),
        r = &mut task => First::Task(r),
    };
    let mut child_status = None;
    match first {
        First::Task(r) => {
            // The replicator stopped on its own: an unrecoverable error. Stop the app too.
            if let Some(c) = child.as_mut() {
                if let Some(pid) = c.id() {
                    send_signal(pid, libc::SIGTERM);
                }
                let _ = c.wait().await;
            }
            r.context("replicator task failed")??;
            bail!("replicator stopped");
        }
        First::Child(st) => child_status = Some(st),
        First::Signal(sig) => {
            if let Some(c) = child.as_mut() {
                if let Some(pid) = c.id() {
                    send_signal(pid, sig);
                }
                // Wait for the app to exit, then make the final sync.
                tokio::select! {
                    st = c.wait() => child_status = Some(st.context("wait for the --exec command")?),
                    _ = term.recv() => { eprintln!("second signal: exiting now"); return Ok(ExitCode::from(130)); }
                    _ = int.recv() => { eprintln!("second signal: exiting now"); return Ok(ExitCode::from(130)); }
                }
            }
        }
    }
    cancel.cancel();
    tool_tasks.stop().await;
    let deadline = a.shutdown_timeout.0;
    let final_sync = tokio::time::timeout(deadline, &mut task);
    let outcome = tokio::select! {
        r = final_sync => r,
        _ = term.recv() => { eprintln!("second signal: exiting without a final sync"); return Ok(ExitCode::from(130)); }
        _ = int.recv() => { eprintln!("second signal: exiting without a final sync"); return Ok(ExitCode::from(130)); }
    };
    match outcome {
        Ok(r) => r
            .context("replicator task failed")?
            .context("final sync failed")?,
        Err(_) => {
            task.abort();
            bail!("final sync did not finish within {deadline:?} (raise --shutdown-timeout)");
        }
    }
    monitoring.stop().await;
    if let Some(st) = child_status {
        return Ok(exit_code_of(st));
    }
    Ok(ExitCode::SUCCESS)
}

/// A signal before the first sync: let the replicator finish starting, sync, and stop.
async fn stop_during_startup(
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<walship_engine::EngineResult<()>>,
    deadline: Duration,
) -> Result<ExitCode> {
    cancel.cancel();
    match tokio::time::timeout(deadline, task).await {
        Ok(r) => {
            r.context("replicator task failed")?
                .context("final sync failed")?;
            Ok(ExitCode::SUCCESS)
        }
        Err(_) => bail!("final sync did not finish within {deadline:?} (raise --shutdown-timeout)"),
    }
}

fn spawn_child(cmd: &str) -> Result<tokio::process::Child> {
    tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .kill_on_drop(false)
        .spawn()
        .with_context(|| format!("cannot start --exec command `{cmd}`"))
}

async fn wait_child(child: &mut Option<tokio::process::Child>) -> Result<std::process::ExitStatus> {
    match child {
        Some(c) => Ok(c.wait().await.context("wait for the --exec command")?),
        None => std::future::pending().await,
    }
}

fn send_signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; the PID is our own child's.
    #[allow(unsafe_code)]
    let _ = unsafe { libc::kill(pid as i32, sig) };
}

fn exit_code_of(st: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => ExitCode::from(c.clamp(0, 255) as u8),
        (None, Some(s)) => ExitCode::from((128 + s).clamp(0, 255) as u8),
        _ => ExitCode::from(1),
    }
}

async fn restore(a: RestoreArgs) -> Result<ExitCode> {
    let output = a.output.clone();
    if a.if_db_not_exists && output.exists() {
        eprintln!("{} already exists; nothing to restore", output.display());
        return Ok(ExitCode::SUCCESS);
    }
    if !a.table.is_empty() {
        return tools::table::command(a).await;
    }
    let replica = open_replica(&a.replica_url, &a.store).await?;
    let target_ms = match &a.timestamp {
        Some(t) => Some(parse_rfc3339(t)?),
        None => None,
    };
    let opts = RestoreOptions {
        target_ms,
        parallelism: a.parallelism.max(1),
        overwrite: a.force,
    };
    match walship_engine::restore::restore(&replica, &output, &opts).await {
        Ok(report) => {
            for (key, why) in &report.skipped {
                eprintln!("skipped {key}: {why}");
            }
            eprintln!(
                "restored {} from {} (generation {}, {} segments, {} bytes, {} pages, as of {}) in {} ms",
                output.display(),
                replica.describe(),
                report.generation.map(|g| g.to_string()).unwrap_or_default(),
                report.segments,
                report.bytes,
                report.pages,
                format_time(report.timestamp_ms),
                report.elapsed_ms
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(walship_engine::EngineError::NothingToRestore { .. }) if a.if_replica_exists => {
            eprintln!("no backup in {}; nothing restored", replica.describe());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            Err(anyhow::Error::new(e).context(format!("restore of {} failed", output.display())))
        }
    }
}

fn parse_rfc3339(s: &str) -> Result<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| {
            format!("--timestamp `{s}` is not RFC 3339 (for example 2026-11-23T20:30:00Z)")
        })?;
    Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

async fn snapshot(a: SnapshotArgs) -> Result<ExitCode> {
    let replica = open_replica(&a.replica_url, &a.store).await?;
    walship_storage::check_access(replica.store().as_ref())
        .await
        .with_context(|| format!("cannot reach the replica {}", replica.describe()))?;
    let report = walship_engine::replicate::snapshot_once(&a.db, replica, a.enable_wal)
        .await
        .with_context(|| format!("snapshot of {} failed", a.db.display()))?;
    eprintln!(
        "snapshot of {} written: generation {}, position {:#x}, {} bytes",
        a.db.display(),
        report.0,
        report.1,
        report.2
    );
    Ok(ExitCode::SUCCESS)
}

async fn generations(a: GenerationsArgs) -> Result<ExitCode> {
    let replica = open_replica(&a.replica_url, &a.store).await?;
    let gens = replica.generations().await?;
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    let now = walship_format_now();
    let mut json = Vec::new();
    for g in gens {
        let objs = replica.objects(g).await?;
        let bytes: u64 = objs
            .snapshots
            .iter()
            .chain(&objs.segments)
            .map(|l| l.size)
            .sum();
        let newest = objs
            .snapshots
            .iter()
            .chain(&objs.segments)
            .map(|l| l.key.timestamp_ms())
            .max()
            .unwrap_or(g.created_ms());
        if a.json {
            json.push(serde_json::json!({
                "generation": g.to_string(),
                "created": format_time(g.created_ms()),
                "snapshots": objs.snapshots.iter().map(listed_json).collect::<Vec<_>>(),
                "segments": objs.segments.len(),
                "bytes": bytes,
                "newest": format_time(newest),
                "foreign": objs.foreign,
            }));
            continue;
        }
        writeln!(
            out,
            "generation {g}  created {}  {} snapshots  {} segments  {} bytes  newest {} ({}s ago)",
            format_time(g.created_ms()),
            objs.snapshots.len(),
            objs.segments.len(),
            bytes,
            format_time(newest),
            (now - newest).max(0) / 1000
        )?;
        for s in &objs.snapshots {
            if let ObjectKey::Snapshot {
                position,
                timestamp_ms,
                ..
            } = s.key
            {
                writeln!(
                    out,
                    "  snapshot  position {position:#018x}  {}  {} bytes",
                    format_time(timestamp_ms),
                    s.size
                )?;
            }
        }
        for f in &objs.foreign {
            writeln!(
                out,
                "  unknown object {f} (not written by walship; ignored)"
            )?;
        }
    }
    if a.json {
        writeln!(out, "{}", serde_json::Value::Array(json))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn listed_json(s: &walship_engine::replica::Listed) -> serde_json::Value {
    match s.key {
        ObjectKey::Snapshot {
            position,
            timestamp_ms,
            ..
        } => serde_json::json!({
            "key": s.name, "position": position, "time": format_time(timestamp_ms), "bytes": s.size,
        }),
        ObjectKey::Segment {
            start,
            end,
            timestamp_ms,
            ..
        } => serde_json::json!({
            "key": s.name, "start": start, "end": end, "time": format_time(timestamp_ms), "bytes": s.size,
        }),
    }
}

fn walship_format_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
