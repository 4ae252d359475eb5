//! The `walship` command: replicate, restore, snapshot, generations.
//!
//! Only this file and `exec.rs` (the `--exec` command) know about signals and process exit
//! codes; everything else is in the engine library.

mod cli;
mod clock;
mod config;
mod duration;
mod exec;
mod fdlimit;
mod http;
mod logging;
mod progress;
mod redact;
mod restore_result;
mod scaffold;
mod tools;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokio_util::sync::CancellationToken;
use walship_engine::{Replica, ReplicateOptions, RestoreOptions};
use walship_format::key::{GenerationId, ObjectKey};
use walship_storage::{ReplicaUrl, StoreOptions};

use crate::cli::{
    Cli, Command, ConfigCheckArgs, DecryptArgs, GenerationsArgs, ReplicateArgs, RestoreArgs,
    SnapshotArgs, StoreArgs,
};

/// Caps glibc's malloc at two arenas. By default every thread that meets contention gets
/// its own arena (up to 8 per core), and each keeps the memory freed into it: with the
/// runtime's blocking threads taking turns at multi-megabyte upload and download buffers,
/// the resident size grew with the number of threads rather than with the work in flight.
///
/// A long-running replicator (`long_running`) also gets a fixed mmap threshold of 2 MiB:
/// glibc otherwise raises the threshold to the size of every large buffer freed (up to
/// 32 MiB), after which upload buffers of several MiB come from the heap and their pages stay
/// resident once freed. With the threshold fixed they are returned when an upload ends: peak
/// RSS under a stream of 256 KiB transactions to S3 went from 62–72 MiB to 46–48 MiB. Restore
/// keeps glibc's default; its 1 MiB download chunks are reused from the heap, not faulted in
/// afresh.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc(long_running: bool) {
    // SAFETY: mallopt only sets allocator parameters; called before any thread starts.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        if long_running {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc(_long_running: bool) {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tune_malloc(matches!(cli.command, Command::Replicate(_)));
    redact::register_env();
    redact::install_panic_hook();
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
            Command::Config(c) => match c.command {
                cli::ConfigCommand::Check(a) => config_check(a).await,
            },
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", redact::scrub(&one_line(&e)));
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

/// Logs to standard error through [`redact::Stderr`], with the AWS SDK capped at INFO by
/// [`redact::sdk_cap`] whatever the filter says.
fn init_logging(cli: &Cli) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let walship_log = std::env::var("WALSHIP_LOG").ok();
    let rust_log = std::env::var("RUST_LOG").ok();
    let (source, directive) = logging::filter(
        cli.log_level.as_deref(),
        walship_log.as_deref(),
        rust_log.as_deref(),
    );
    let filter = EnvFilter::try_new(directive).unwrap_or_else(|e| {
        eprintln!(
            "warning: {} `{directive}` is not a log filter ({e}); logging at {}",
            source.name(),
            logging::DEFAULT_FILTER
        );
        EnvFilter::new(logging::DEFAULT_FILTER)
    });
    let colour = logging::colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(redact::Stderr);
    if cli.log_json {
        builder.json().finish().with(redact::sdk_cap()).init();
    } else {
        builder.finish().with(redact::sdk_cap()).init();
    }
}

async fn open_replica(url: &str, args: &StoreArgs) -> Result<Replica> {
    let url: ReplicaUrl = url.parse()?;
    let mut opts = StoreOptions {
        timeouts: args.timeouts()?,
        ..Default::default()
    };
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
    let exists = || {
        anyhow::anyhow!(
            "{} already exists (pass --force to replace it, or choose another output)",
            a.output.display()
        )
    };
    if !a.force && std::fs::symlink_metadata(&a.output).is_ok() {
        return Err(exists());
    }
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
    if a.force {
        tmp.persist(&a.output)
            .map_err(|e| e.error)
            .with_context(|| format!("cannot write {}", a.output.display()))?;
    } else {
        // Created meanwhile: still not replaced.
        tmp.persist_noclobber(&a.output).map_err(|e| {
            if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                exists()
            } else {
                anyhow::Error::new(e.error).context(format!("cannot write {}", a.output.display()))
            }
        })?;
    }
    let h = r.header();
    eprintln!(
        "decrypted {} ({:?}, generation {}, {} bytes) into {}",
        a.input.display(),
        h.kind,
        GenerationId(h.generation),
        h.raw_len,
        a.output.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// One (database, replica) pair to replicate: each gets its own replicator task, with its
/// own pin, lease and generation lineage.
struct Pair {
    /// Name for the status server and metrics.
    name: String,
    db: std::path::PathBuf,
    /// The replica URL as given.
    url: String,
    /// Where it came from, for messages: the config key path, or empty.
    origin: String,
    replica: Replica,
    opts: ReplicateOptions,
}

impl Pair {
    fn label(&self) -> String {
        if self.origin.is_empty() {
            format!("{} to {}", self.db.display(), self.replica.describe())
        } else {
            format!(
                "{} to {} ({})",
                self.db.display(),
                self.replica.describe(),
                self.origin
            )
        }
    }
}

/// The config file to use: `--config`, else `$WALSHIP_CONFIG` when no DB is given.
fn config_path(flag: &Option<std::path::PathBuf>, has_db: bool) -> Option<std::path::PathBuf> {
    flag.clone().or_else(|| {
        (!has_db)
            .then(|| std::env::var_os("WALSHIP_CONFIG"))
            .flatten()
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
    })
}

/// Opens the store of a configured replica.
async fn open_configured(r: &config::ReplicaConfig) -> Result<Replica> {
    let store = walship_storage::open(&r.parsed, &r.store)
        .await
        .with_context(|| format!("{}: cannot open {}", r.key_path, r.parsed))?;
    let replica = Replica::new(store);
    Ok(match &r.keys {
        Some(k) => replica.with_keys(k.clone()),
        None => replica,
    })
}

/// The pairs `replicate` runs: from the config file, or the positional DB and REPLICA_URL.
/// The local replica directories that do not exist yet are noted in `scaffold`.
async fn replicate_pairs(
    a: &mut ReplicateArgs,
    scaffold: &mut scaffold::Scaffold,
) -> Result<Vec<Pair>> {
    let defaults = config::Defaults {
        sync_interval: a.sync_interval.0,
        snapshot_interval: a.snapshot_interval.0,
        checkpoint_frames: a.checkpoint_frames,
        defer_app_checkpoints: a.defer_app_checkpoints,
        max_wal_mib: a.max_wal_mib,
        enable_wal: a.enable_wal,
        retention: a.retention.policy(),
        lease: a.lease.options(),
        compaction: walship_engine::CompactionOptions {
            fan_in: a.compaction_fan_in,
            keep_parts: a.compaction_keep_parts.0,
            ..Default::default()
        },
        timeouts: a.store.timeouts()?,
    };
    if let Some(path) = config_path(&a.config, a.db.is_some()) {
        if a.db.is_some() || a.replica_url.is_some() {
            bail!("give either --config (or WALSHIP_CONFIG) or DB REPLICA_URL, not both");
        }
        let cfg = config::Config::load(&path, &defaults)?;
        // Server settings from the file, unless given on the command line.
        if a.http.listen.is_none() {
            a.http.listen = cfg.listen;
        }
        if a.http.webhooks.is_empty() {
            a.http.webhooks = cfg.webhooks.clone();
        }
        if a.http.api_token.is_none() && a.http.api_token_file.is_none() {
            a.http.api_token = cfg.api_token.as_ref().map(|t| t.0.clone());
        }
        let mut pairs = Vec::new();
        for d in &cfg.dbs {
            for r in &d.replicas {
                let name = if d.replicas.len() == 1 {
                    d.name.clone()
                } else {
                    format!("{}-{}", d.name, r.name)
                };
                if let ReplicaUrl::File { path } = &r.parsed {
                    scaffold.note(path);
                }
                pairs.push(Pair {
                    name,
                    db: d.path.clone(),
                    url: r.url.clone(),
                    origin: r.key_path.clone(),
                    replica: open_configured(r).await?,
                    opts: ReplicateOptions {
                        sync_interval: r.sync_interval,
                        snapshot_interval: r.snapshot_interval,
                        checkpoint_frames: d.checkpoint_frames,
                        defer_app_checkpoints: d.defer_app_checkpoints,
                        max_wal_bytes: d.max_wal_mib.map(|m| m.saturating_mul(1 << 20)),
                        enable_wal: d.enable_wal,
                        retention: r.retention.clone(),
                        lease: Some(r.lease.clone()),
                        compaction: r.compaction.clone(),
                        stall_after: r.store.timeouts.stall_after(),
                        ..Default::default()
                    },
                });
            }
        }
        return Ok(pairs);
    }
    let (Some(db), Some(url)) = (a.db.clone(), a.replica_url.clone()) else {
        bail!(
            "replicate needs DB and REPLICA_URL, or --config FILE (for example: walship replicate /data/app.db file:///backups/app)"
        );
    };
    if let Ok(ReplicaUrl::File { path }) = url.parse() {
        scaffold.note(&path);
    }
    let replica = open_replica(&url, &a.store).await?;
    Ok(vec![Pair {
        name: http::default_name(&db),
        db: std::path::absolute(&db).unwrap_or_else(|_| db.clone()),
        url,
        origin: String::new(),
        replica,
        opts: ReplicateOptions {
            sync_interval: defaults.sync_interval,
            snapshot_interval: defaults.snapshot_interval,
            checkpoint_frames: defaults.checkpoint_frames,
            defer_app_checkpoints: defaults.defer_app_checkpoints,
            max_wal_bytes: defaults.max_wal_mib.map(|m| m.saturating_mul(1 << 20)),
            enable_wal: defaults.enable_wal,
            retention: defaults.retention,
            lease: Some(defaults.lease),
            compaction: defaults.compaction,
            stall_after: defaults.timeouts.stall_after(),
            ..Default::default()
        },
    }])
}

/// Refuses to start with an unreachable replica: every one is checked, concurrently.
async fn check_reachable(pairs: &[Pair]) -> Result<()> {
    let checks = pairs.iter().map(|p| async move {
        walship_storage::check_access(p.replica.store().as_ref())
            .await
            .with_context(|| {
                if p.origin.is_empty() {
                    format!("cannot reach the replica {}", p.replica.describe())
                } else {
                    format!(
                        "{}: cannot reach the replica {}",
                        p.origin,
                        p.replica.describe()
                    )
                }
            })
    });
    futures::future::try_join_all(checks).await?;
    Ok(())
}

type TaskResult = Result<walship_engine::EngineResult<()>, tokio::task::JoinError>;

async fn replicate(mut a: ReplicateArgs) -> Result<ExitCode> {
    // Handlers first: a SIGTERM that arrives while the replicas are being checked must lead
    // to a clean start-and-stop (final sync, exit 0), not to death by the default action.
    let mut signals = exec::Signals::install()?;
    // Every descriptor the system allows, for replication first (the HTTP server's cap is
    // set from what is left).
    fdlimit::raise();
    // A refused start removes the replica directories it created.
    let mut scaffold = scaffold::Scaffold::default();
    let pairs = replicate_pairs(&mut a, &mut scaffold).await?;
    check_reachable(&pairs).await?;
    if a.once {
        return replicate_once(a, pairs, scaffold, signals).await;
    }
    // One token stops every replicator; each runs in its own task and span.
    let cancel = CancellationToken::new();
    let mut handles = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut databases = Vec::new();
    let labels: Vec<String> = pairs.iter().map(Pair::label).collect();
    let snapshot_interval = pairs
        .iter()
        .map(|p| p.opts.snapshot_interval)
        .max()
        .unwrap_or(a.snapshot_interval.0);
    for (i, p) in pairs.into_iter().enumerate() {
        let (handle, task) = walship_engine::replicate::spawn(
            p.db.clone(),
            p.replica.clone(),
            p.opts.clone(),
            cancel.clone(),
        );
        tasks.spawn(async move { (i, task.await) });
        databases.push(http::Database::new(
            p.name.clone(),
            p.db.clone(),
            &p.url,
            handle.clone(),
            p.replica,
        ));
        handles.push(handle);
    }
    // Run history, alerts and (with --listen) the HTTP server; never in the replicators' way.
    let monitoring = http::start(&a.http, databases, snapshot_interval, &cancel).await?;
    let deadline = a.shutdown_timeout.0;

    // Replication is up once every replicator made one successful sync; only then start
    // the app.
    let first_syncs = futures::future::join_all(
        handles
            .iter()
            .zip(&labels)
            .map(|(h, label)| first_sync(h, label)),
    );
    tokio::select! {
        results = first_syncs => {
            if let Some(i) = results.iter().position(|up| !up) {
                // That task ended (or is ending); its own error says why.
                return Err(startup_failure(i, &labels, &cancel, &mut tasks, deadline).await);
            }
        }
        Some(joined) = tasks.join_next() => {
            let (i, r) = joined.context("replicator task failed")?;
            let e = match r {
                Ok(Ok(())) => anyhow::anyhow!("replicator stopped before its first sync"),
                Ok(Err(e)) => anyhow::Error::new(e),
                Err(e) => anyhow::Error::new(e),
            };
            cancel.cancel();
            let _ = tokio::time::timeout(deadline, drain(&mut tasks, &labels)).await;
            return Err(e.context(format!("cannot replicate {}", labels[i])));
        }
        _ = signals.recv() => return stop_during_startup(cancel, tasks, labels, deadline).await,
    }
    tracing::info!(pairs = labels.len(), "all replicators up");
    scaffold.keep();
    // Scheduled verification and the schema watch (tools::daemon), beside the replicators.
    let tool_tasks = tools::daemon::start(&a.tools, monitoring.state());

    let mut app = match &a.exec {
        Some(cmd) => Some(exec::App::spawn(cmd)?),
        None => None,
    };

    enum First {
        Signal(i32),
        Child(std::process::ExitStatus),
        AllStopped(anyhow::Error),
    }
    let mut running = labels.len();
    let mut last_error: Option<anyhow::Error> = None;
    let first = loop {
        tokio::select! {
            sig = signals.recv() => match &app {
                // SIGHUP may mean "reload" to the app: pass it on; its exit, if it exits,
                // ends walship as any other exit of the app does.
                Some(app) if sig == libc::SIGHUP => app.signal(sig),
                _ => break First::Signal(sig),
            },
            st = wait_shell(&mut app) => break First::Child(st?),
            Some(joined) = tasks.join_next() => {
                // A replicator stopped on its own (its lease was taken over, or it failed for
                // good). The others go on; once none is left, stop the app too.
                running -= 1;
                let e = match joined {
                    Ok((i, r)) => {
                        let e = match r {
                            Ok(Ok(())) => anyhow::anyhow!("replicator stopped"),
                            Ok(Err(e)) => anyhow::Error::new(e),
                            Err(e) => anyhow::Error::new(e),
                        };
                        e.context(format!("replication of {} stopped", labels[i]))
                    }
                    Err(e) => anyhow::Error::new(e).context("replicator task failed"),
                };
                tracing::error!(error = %one_line(&e), remaining = running, "replicator stopped");
                if running == 0 {
                    break First::AllStopped(e);
                }
                last_error = Some(e);
            }
        }
    };
    // The final sync starts only once no process of the app is left: whatever it commits
    // before it exits (or is killed at the deadline) is in that sync.
    let mut child_status = None;
    match (first, app.as_mut()) {
        (First::AllStopped(e), app) => {
            if let Some(app) = app {
                stop_app(app, libc::SIGTERM, deadline, &mut signals).await;
            }
            monitoring.stop().await;
            return Err(e);
        }
        (First::Child(st), Some(app)) => {
            if !app.is_gone() {
                tracing::warn!(
                    "the --exec command exited but processes of its group still run; stopping them before the final sync"
                );
                stop_app(app, libc::SIGTERM, deadline, &mut signals).await;
            }
            child_status = Some(st);
        }
        (First::Child(st), None) => child_status = Some(st),
        (First::Signal(sig), Some(app)) => {
            child_status = stop_app(app, sig, deadline, &mut signals).await;
        }
        (First::Signal(_), None) => {}
    }
    if let Some(st) = child_status {
        tracing::info!(status = %st, "the --exec command is gone; making the final sync");
    }
    cancel.cancel();
    tool_tasks.stop().await;
    let outcome = {
        let final_sync = tokio::time::timeout(deadline, drain(&mut tasks, &labels));
        tokio::pin!(final_sync);
        loop {
            tokio::select! {
                r = &mut final_sync => break r,
                sig = signals.recv() => {
                    if sig == libc::SIGHUP {
                        // A closed terminal: the final sync still matters.
                        continue;
                    }
                    eprintln!("second signal: exiting without a final sync");
                    return Ok(ExitCode::from(130));
                }
            }
        }
    };
    monitoring.stop().await;
    match outcome {
        Ok(Some(e)) => return Err(e.context("final sync failed")),
        Ok(None) => {}
        Err(_) => {
            tasks.abort_all();
            bail!("final sync did not finish within {deadline:?} (raise --shutdown-timeout)");
        }
    }
    if let Some(e) = last_error {
        // Some replica stopped earlier; the exit status says so unless the app's does.
        if child_status.is_none() {
            return Err(e);
        }
    }
    if let Some(st) = child_status {
        return Ok(exit_code_of(st));
    }
    Ok(ExitCode::SUCCESS)
}

/// `walship replicate --once`: one pass over every (database, replica) pair, side by side
/// (`walship_engine::replicate::once`). Prints one line per pair; fails with the first
/// failure once every pass has ended. A signal stops passes waiting for a lease.
async fn replicate_once(
    a: ReplicateArgs,
    pairs: Vec<Pair>,
    mut scaffold: scaffold::Scaffold,
    mut signals: exec::Signals,
) -> Result<ExitCode> {
    let cancel = CancellationToken::new();
    let passes = futures::future::join_all(pairs.iter().map(|p| {
        walship_engine::replicate::once(
            p.db.clone(),
            p.replica.clone(),
            p.opts.clone(),
            a.force_snapshot,
            &cancel,
        )
    }));
    tokio::pin!(passes);
    let results = tokio::select! {
        r = &mut passes => r,
        _ = signals.recv() => {
            cancel.cancel();
            let deadline = a.shutdown_timeout.0;
            tokio::time::timeout(deadline, &mut passes).await.map_err(|_| {
                anyhow::anyhow!("stopped by a signal; the passes did not end within {deadline:?}")
            })?
        }
    };
    let mut first = None;
    for (p, r) in pairs.iter().zip(results) {
        match r {
            Ok(rep) => {
                // Something reached the replica: its directory stays.
                scaffold.keep();
                eprintln!("{}", once_line(&p.label(), &rep));
            }
            Err(e) => {
                let e = anyhow::Error::new(e).context(format!("cannot replicate {}", p.label()));
                if pairs.len() > 1 {
                    tracing::error!(error = %one_line(&e), "replication pass failed");
                }
                first.get_or_insert(e);
            }
        }
    }
    match first {
        Some(e) => Err(e),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// The result line of one `--once` pass.
fn once_line(label: &str, r: &walship_engine::replicate::OnceReport) -> String {
    let what = match (r.objects_uploaded, r.snapshots) {
        (0, _) => "nothing new".to_string(),
        (n, 0) => format!("{n} objects ({} bytes)", r.bytes_uploaded),
        (n, s) => format!(
            "{n} objects ({} bytes, {s} snapshot{})",
            r.bytes_uploaded,
            if s == 1 { "" } else { "s" }
        ),
    };
    format!(
        "replicated {label}: {what}; {} {} at position {:#018x}",
        if r.new_generation {
            "new generation"
        } else {
            "generation"
        },
        r.generation,
        r.position
    )
}

/// Waits for a replicator's first successful sync, retrying failed ones (a replica that
/// fails for a while); false if the replicator stopped (it could not start).
async fn first_sync(h: &walship_engine::ReplicatorHandle, label: &str) -> bool {
    let mut warned = false;
    loop {
        match h.sync().await {
            Ok(_) => return true,
            Err(walship_engine::EngineError::Cancelled) => return false,
            Err(e) => {
                if !warned {
                    tracing::warn!(replica = %label, error = %e, "first sync failed; retrying before starting the app");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Waits for every remaining replicator; returns the first failure (all are logged).
async fn drain(
    tasks: &mut tokio::task::JoinSet<(usize, TaskResult)>,
    labels: &[String],
) -> Option<anyhow::Error> {
    let mut first = None;
    while let Some(joined) = tasks.join_next().await {
        let e = match joined {
            Ok((_, Ok(Ok(())))) => continue,
            Ok((i, Ok(Err(e)))) => anyhow::Error::new(e).context(labels[i].clone()),
            Ok((i, Err(e))) => anyhow::Error::new(e).context(labels[i].clone()),
            Err(e) => anyhow::Error::new(e),
        };
        tracing::error!(error = %one_line(&e), "final sync failed");
        first.get_or_insert(e);
    }
    first
}

/// The error of a replicator that could not start; stops the others.
async fn startup_failure(
    i: usize,
    labels: &[String],
    cancel: &CancellationToken,
    tasks: &mut tokio::task::JoinSet<(usize, TaskResult)>,
    deadline: Duration,
) -> anyhow::Error {
    cancel.cancel();
    let mut failure = None;
    let collect = async {
        while let Some(joined) = tasks.join_next().await {
            if let Ok((j, r)) = joined {
                let e = match r {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => anyhow::Error::new(e),
                    Err(e) => anyhow::Error::new(e),
                };
                if j == i || failure.is_none() {
                    failure = Some(e.context(format!("cannot replicate {}", labels[j])));
                }
            }
        }
    };
    let _ = tokio::time::timeout(deadline, collect).await;
    failure.unwrap_or_else(|| anyhow::anyhow!("cannot replicate {}", labels[i]))
}

/// A signal before the first sync: let the replicators finish starting, sync, and stop.
async fn stop_during_startup(
    cancel: CancellationToken,
    mut tasks: tokio::task::JoinSet<(usize, TaskResult)>,
    labels: Vec<String>,
    deadline: Duration,
) -> Result<ExitCode> {
    cancel.cancel();
    match tokio::time::timeout(deadline, drain(&mut tasks, &labels)).await {
        Ok(None) => Ok(ExitCode::SUCCESS),
        Ok(Some(e)) => Err(e.context("final sync failed")),
        Err(_) => bail!("final sync did not finish within {deadline:?} (raise --shutdown-timeout)"),
    }
}

/// Stops the app (see [`exec::App::stop`]); a failure to wait for it is logged, since the
/// final sync comes next whatever happened.
async fn stop_app(
    app: &mut exec::App,
    sig: i32,
    deadline: Duration,
    signals: &mut exec::Signals,
) -> Option<std::process::ExitStatus> {
    match app.stop(sig, deadline, signals).await {
        Ok(st) => Some(st),
        Err(e) => {
            tracing::error!(error = %one_line(&e), "cannot wait for the --exec command");
            None
        }
    }
}

async fn wait_shell(app: &mut Option<exec::App>) -> Result<std::process::ExitStatus> {
    match app {
        Some(app) => app.wait_shell().await,
        None => std::future::pending().await,
    }
}

/// The exit code for the `--exec` command's status: its own code, or 128 + N when it was
/// killed by signal N (the shell's convention).
fn exit_code_of(st: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => ExitCode::from(c.clamp(0, 255) as u8),
        (None, Some(s)) => ExitCode::from((128 + s).clamp(0, 255) as u8),
        _ => ExitCode::from(1),
    }
}

/// Exit status of a restore that was partial and not accepted with `--allow-partial`
/// (nothing was written), and of a `--dry-run` whose plan has a gap.
const EXIT_PARTIAL: u8 = 3;

async fn restore(a: RestoreArgs) -> Result<ExitCode> {
    let (json, output) = (a.json, a.output.clone());
    let r = restore_run(a).await;
    if let Err(e) = &r {
        if json {
            print_json(&restore_result::nothing_json(
                &output,
                &redact::scrub(&one_line(e)),
                true,
            ))?;
        }
        // A partial restore refused (by `--table`, which reports through its error).
        let partial = e.chain().any(|c| {
            matches!(
                c.downcast_ref::<walship_engine::EngineError>(),
                Some(walship_engine::EngineError::Partial { .. })
            )
        });
        if partial {
            eprintln!("error: {}", redact::scrub(&one_line(e)));
            return Ok(ExitCode::from(EXIT_PARTIAL));
        }
    }
    r
}

/// Prints one JSON value on stdout.
fn print_json(v: &serde_json::Value) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{v}")?;
    Ok(())
}

async fn restore_run(a: RestoreArgs) -> Result<ExitCode> {
    let output = a.output.clone();
    if a.if_db_not_exists && output.exists() {
        eprintln!("{} already exists; nothing to restore", output.display());
        if a.json {
            print_json(&restore_result::nothing_json(
                &output,
                "the output exists (--if-db-not-exists)",
                false,
            ))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !a.table.is_empty() {
        return tools::table::command(a).await;
    }
    let replica = open_replica(&a.replica_url, &a.store).await?;
    let target_ms = match &a.timestamp {
        Some(t) => Some(clock::parse_timestamp(t)?),
        None => None,
    };
    if a.dry_run {
        return restore_dry_run(&a, &replica, target_ms).await;
    }
    let bar = progress::RestoreBar::on_terminal();
    let opts = RestoreOptions {
        target_ms,
        parallelism: a.parallelism.max(1),
        overwrite: a.force,
        progress: bar
            .clone()
            .map(|b| b as std::sync::Arc<dyn walship_engine::RestoreProgress>),
        allow_partial: a.allow_partial,
    };
    let result = walship_engine::restore::restore(&replica, &output, &opts).await;
    if let Some(b) = &bar {
        b.finish();
    }
    match result {
        Ok(report) => {
            tools::print_skipped(&report);
            if let Some(b) = &report.times_backwards {
                eprintln!("warning: {b}");
            }
            eprintln!(
                "{}",
                restore_result::result_line(&output, &replica.describe(), &report)
            );
            if a.json {
                print_json(&restore_result::result_json(
                    &output,
                    &replica.describe(),
                    &report,
                    true,
                ))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(walship_engine::EngineError::Partial { report }) => {
            tools::print_skipped(&report);
            let json = restore_result::result_json(&output, &replica.describe(), &report, false);
            let e = walship_engine::EngineError::Partial { report };
            eprintln!("error: restore of {} failed: {e}", output.display());
            if a.json {
                print_json(&json)?;
            }
            Ok(ExitCode::from(EXIT_PARTIAL))
        }
        Err(walship_engine::EngineError::NothingToRestore { .. }) if a.if_replica_exists => {
            eprintln!(
                "no backup in {} (it holds no objects); nothing restored",
                replica.describe()
            );
            if a.json {
                print_json(&restore_result::nothing_json(
                    &output,
                    "the replica holds no backup (--if-replica-exists)",
                    false,
                ))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            Err(anyhow::Error::new(e).context(format!("restore of {} failed", output.display())))
        }
    }
}

/// `walship restore --dry-run`: the plan, from the listing alone; nothing is written. Exits
/// as the restore would on a gap (non-zero unless `--allow-partial`).
async fn restore_dry_run(
    a: &RestoreArgs,
    replica: &Replica,
    target_ms: Option<i64>,
) -> Result<ExitCode> {
    let output = &a.output;
    if output.exists() && !a.force {
        return Err(walship_engine::EngineError::OutputExists {
            path: output.clone(),
        }
        .into());
    }
    let plan = match walship_engine::restore::plan(replica, target_ms).await {
        Ok(p) => p,
        Err(walship_engine::EngineError::NothingToRestore { .. }) if a.if_replica_exists => {
            eprintln!(
                "no backup in {}; nothing would be restored",
                replica.describe()
            );
            if a.json {
                print_json(&restore_result::nothing_json(
                    output,
                    "the replica holds no backup (--if-replica-exists)",
                    false,
                ))?;
            }
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(anyhow::Error::new(e).context("cannot plan the restore")),
    };
    if a.json {
        print_json(&restore_result::plan_json(
            output,
            &replica.describe(),
            &plan,
        ))?;
    } else {
        use std::io::Write;
        write!(
            std::io::stdout().lock(),
            "{}",
            restore_result::plan_text(output, &replica.describe(), &plan)
        )?;
    }
    match &plan.gap {
        Some(gap) if !a.allow_partial => {
            eprintln!(
                "error: the restore would be partial: {}; it would write nothing without \
                 --allow-partial",
                gap.describe()
            );
            Ok(ExitCode::from(EXIT_PARTIAL))
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

async fn snapshot(a: SnapshotArgs) -> Result<ExitCode> {
    // (database, replica, enable-wal, origin) to snapshot.
    let mut jobs: Vec<(std::path::PathBuf, Replica, bool, String)> = Vec::new();
    if let Some(path) = config_path(&a.config, a.db.is_some()) {
        if a.db.is_some() || a.replica_url.is_some() {
            bail!("give either --config (or WALSHIP_CONFIG) or DB REPLICA_URL, not both");
        }
        let defaults = config::Defaults {
            timeouts: a.store.timeouts()?,
            ..Default::default()
        };
        let cfg = config::Config::load(&path, &defaults)?;
        for d in &cfg.dbs {
            if let Some(only) = &a.only_db {
                let as_path = std::path::absolute(only).unwrap_or_else(|_| only.into());
                if *only != d.name && as_path != d.path {
                    continue;
                }
            }
            for r in &d.replicas {
                jobs.push((
                    d.path.clone(),
                    open_configured(r).await?,
                    d.enable_wal || a.enable_wal,
                    r.key_path.clone(),
                ));
            }
        }
        if jobs.is_empty() {
            bail!(
                "--db {}: no such database in {} (give its path or name)",
                a.only_db.as_deref().unwrap_or_default(),
                path.display()
            );
        }
    } else {
        let (Some(db), Some(url)) = (a.db.clone(), a.replica_url.clone()) else {
            bail!(
                "snapshot needs DB and REPLICA_URL, or --config FILE (for example: walship snapshot /data/app.db file:///backups/app)"
            );
        };
        jobs.push((
            db,
            open_replica(&url, &a.store).await?,
            a.enable_wal,
            String::new(),
        ));
    }
    let mut failures = Vec::new();
    for (db, replica, enable_wal, origin) in jobs {
        let what = if origin.is_empty() {
            format!("{} to {}", db.display(), replica.describe())
        } else {
            format!("{} to {} ({origin})", db.display(), replica.describe())
        };
        let r = async {
            walship_storage::check_access(replica.store().as_ref())
                .await
                .with_context(|| format!("cannot reach the replica {}", replica.describe()))?;
            walship_engine::replicate::snapshot_once(&db, replica.clone(), enable_wal)
                .await
                .with_context(|| format!("snapshot of {} failed", db.display()))
        }
        .await;
        match r {
            Ok(shot) => {
                let rank = match &shot.below {
                    None => "the newest generation".to_string(),
                    Some((live, holder)) => format!(
                        "ranked below generation {live}, which the running replicator ({holder}) \
                         writes and a restore picks first; this snapshot is an older restore point"
                    ),
                };
                eprintln!(
                    "snapshot of {what} written: generation {} ({rank}), position {:#x}, {} bytes",
                    shot.generation, shot.position, shot.bytes
                )
            }
            Err(e) => {
                tracing::error!(error = %one_line(&e), "snapshot of {what} failed");
                failures.push(e);
            }
        }
    }
    match failures.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(ExitCode::SUCCESS),
    }
}

async fn config_check(a: ConfigCheckArgs) -> Result<ExitCode> {
    use std::io::Write;
    let path = a
        .file
        .clone()
        .or_else(|| config_path(&None, false))
        .unwrap_or_else(|| std::path::PathBuf::from("walship.toml"));
    let cfg = config::Config::load(&path, &config::Defaults::default())?;
    let mut out = std::io::stdout().lock();
    write!(out, "{}", cfg.summary())?;
    for d in &cfg.dbs {
        if !d.path.exists() {
            writeln!(
                out,
                "note: {} ({}) does not exist yet (restore it, or let the app create it)",
                d.path.display(),
                d.key_path
            )?;
        }
    }
    if !a.offline {
        let checks = cfg.pairs().map(|(_, r)| async move {
            let replica = open_configured(r).await?;
            tokio::time::timeout(
                Duration::from_secs(30),
                walship_storage::check_access(replica.store().as_ref()),
            )
            .await
            .map_err(|_| anyhow::anyhow!("no answer within 30 s"))?
            .map_err(anyhow::Error::new)
            .with_context(|| format!("{}: cannot reach the replica {}", r.key_path, r.parsed))
        });
        let results = futures::future::join_all(checks).await;
        let mut first = None;
        for ((_, r), res) in cfg.pairs().zip(results) {
            match res {
                Ok(()) => writeln!(out, "{}: {} reachable", r.key_path, r.parsed)?,
                Err(e) => {
                    writeln!(out, "{}", one_line(&e))?;
                    first.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first {
            return Err(e);
        }
    }
    writeln!(
        out,
        "{}: ok ({} databases, {} replicas{})",
        path.display(),
        cfg.dbs.len(),
        cfg.pairs().count(),
        if a.offline { ", not contacted" } else { "" }
    )?;
    Ok(ExitCode::SUCCESS)
}

async fn generations(a: GenerationsArgs) -> Result<ExitCode> {
    let replica = open_replica(&a.replica_url, &a.store).await?;
    let gens = replica.generations().await?;
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    let now = clock::now_ms();
    if !a.json
        && let Some(l) = walship_engine::lease::current(replica.store().as_ref()).await?
    {
        let state = match l.state {
            walship_engine::lease::LeaseState::Held => "held by",
            walship_engine::lease::LeaseState::Released => "released by",
        };
        writeln!(
            out,
            "lease {state} {} (seq {}, ttl {} ms, written {}, {})",
            l.describe(),
            l.seq,
            l.ttl_ms,
            clock::rfc3339(l.written_ms),
            clock::age(l.written_ms, now)
        )?;
    }
    let mut listed = Vec::with_capacity(gens.len());
    for g in gens {
        listed.push((g, replica.objects(g).await?));
    }
    // What restore picks: the highest id with a snapshot, never by a writer's clock.
    let picked = listed
        .iter()
        .find(|(_, o)| !o.snapshots.is_empty())
        .map(|(g, _)| *g);
    if !a.json
        && let Some(p) = picked
    {
        writeln!(
            out,
            "restore starts from generation {p} (generations are listed and chosen by id, newest first; object times come from writers' clocks)"
        )?;
        if let Some(b) = walship_engine::restore::times_backwards(&listed, p, i64::MAX) {
            writeln!(out, "note: {b}")?;
        }
    }
    let mut json = Vec::new();
    for (g, objs) in listed {
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
                "created": clock::rfc3339(g.created_ms()),
                "snapshots": objs.snapshots.iter().map(listed_json).collect::<Vec<_>>(),
                "segments": objs.segments.len(),
                "bytes": bytes,
                "newest": clock::rfc3339(newest),
                "foreign": objs.foreign,
                "restore_picks": picked == Some(g),
            }));
            continue;
        }
        writeln!(
            out,
            "generation {g}  created {}  {} snapshots  {} segments  {} bytes  newest {} ({})",
            clock::rfc3339(g.created_ms()),
            objs.snapshots.len(),
            objs.segments.len(),
            bytes,
            clock::rfc3339(newest),
            clock::age(newest, now)
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
                    "  snapshot  position {position:#018x}  {} ({})  {} bytes",
                    clock::rfc3339(timestamp_ms),
                    clock::age(timestamp_ms, now),
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
            "key": s.name, "position": position, "time": clock::rfc3339(timestamp_ms), "bytes": s.size,
        }),
        ObjectKey::Segment {
            start,
            end,
            timestamp_ms,
            ..
        } => serde_json::json!({
            "key": s.name, "start": start, "end": end, "time": clock::rfc3339(timestamp_ms), "bytes": s.size,
        }),
    }
}
