//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use walship_format::crypto::{Key, KeyRing};
use walship_storage::{ChecksumMode, S3Options, ServerSideEncryption, StoreTimeouts};

use crate::duration::Dur;

/// Continuous replication of a SQLite database to object storage.
#[derive(Debug, Parser)]
#[command(name = "walship", version, about, long_about = None)]
pub struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing filter such as
    /// `info,walship_engine=debug`). Without it: WALSHIP_LOG, else RUST_LOG, else info.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Replicate a database continuously until SIGTERM/SIGINT (then a final sync).
    Replicate(ReplicateArgs),
    /// Restore the newest (or a point-in-time) state of a replica into a file.
    Restore(RestoreArgs),
    /// Write one full snapshot now (for a pre-deploy hook or cron).
    Snapshot(SnapshotArgs),
    /// List the generations and snapshots of a replica.
    Generations(GenerationsArgs),
    /// Show the history of backup runs of a database (written by `replicate`).
    History(crate::http::history::HistoryArgs),
    /// Decrypt and decode one object file into its plain body (a snapshot becomes a SQLite
    /// database file; a segment, its WAL frames).
    Decrypt(DecryptArgs),
    /// Work with walship.toml (`walship config check`).
    Config(ConfigArgs),
    /// Write a logical SQL dump (schema and rows, like sqlite3's .dump) of a live database
    /// or of any restorable point of a replica.
    Dump(crate::tools::dump::DumpArgs),
    /// Restore the newest point of a replica into a temporary file, check it, count its
    /// rows, and optionally compare with the live database.
    Verify(crate::tools::verify::VerifyArgs),
    /// List schema changes between the snapshots of a replica.
    SchemaDiff(crate::tools::schema::SchemaDiffArgs),
}

/// `walship config`.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

/// `walship config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file without starting anything; also checks that every replica is
    /// reachable unless --offline. Exits non-zero with one line naming the key on error.
    Check(ConfigCheckArgs),
}

/// `walship config check`.
#[derive(Debug, Args)]
pub struct ConfigCheckArgs {
    /// The file (default: $WALSHIP_CONFIG, else ./walship.toml).
    pub file: Option<PathBuf>,
    /// Do not contact the replicas.
    #[arg(long)]
    pub offline: bool,
}

/// Lease (writer fencing) flags.
#[derive(Debug, Clone, Args)]
pub struct LeaseArgs {
    /// When another replicator holds the replica's lease: wait until it is released or lapses
    /// (wait), take it over at once (takeover; the old one stops at its next renewal), or
    /// refuse to start (fail).
    #[arg(long, default_value = "wait", value_name = "wait|takeover|fail")]
    pub on_conflict: walship_engine::OnConflict,
    /// How long a lease lasts without renewal (renewed only while data is shipped).
    #[arg(long, default_value = "30s")]
    pub lease_ttl: Dur,
}

impl LeaseArgs {
    /// The lease options these flags give.
    pub fn options(&self) -> walship_engine::LeaseOptions {
        walship_engine::LeaseOptions {
            ttl: self.lease_ttl.0,
            on_conflict: self.on_conflict,
        }
    }
}

/// Retention flags (none set: keep everything).
#[derive(Debug, Clone, Args)]
pub struct RetentionArgs {
    /// Keep the newest N snapshots.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep snapshots younger than this.
    #[arg(long, value_name = "DURATION")]
    pub keep_within: Option<Dur>,
    /// Keep the newest snapshot of each of the last N days (UTC).
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the newest snapshot of each of the last N ISO weeks (UTC).
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
}

impl RetentionArgs {
    /// The policy these flags give.
    pub fn policy(&self) -> walship_engine::RetentionPolicy {
        walship_engine::RetentionPolicy {
            keep_last: self.keep_last,
            keep_within: self.keep_within.map(|d| d.0),
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
        }
    }
}

/// `walship decrypt`.
#[derive(Debug, Args)]
pub struct DecryptArgs {
    /// The object file (downloaded from the replica).
    pub input: PathBuf,
    /// Where to write the plain body; nothing is written if anything fails, and an existing
    /// file is never replaced without --force.
    pub output: PathBuf,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// Settings of S3 replicas.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Server-side encryption to request on every upload: AES256 or aws:kms.
    #[arg(long, env = "WALSHIP_SSE")]
    pub sse: Option<String>,
    /// KMS key id for --sse aws:kms.
    #[arg(long, env = "WALSHIP_SSE_KMS_KEY_ID")]
    pub sse_kms_key_id: Option<String>,
    /// Request checksums: when-required (default; works with most S3-compatible stores) or
    /// when-supported.
    #[arg(long, env = "WALSHIP_S3_CHECKSUM", default_value = "when-required")]
    pub s3_checksum: String,
    /// File holding the 32-byte client-side encryption key (hex or base64). New objects are
    /// encrypted with it (AES-256-GCM); WALSHIP_ENCRYPTION_KEY may hold the key itself.
    #[arg(long, env = "WALSHIP_ENCRYPTION_KEY_FILE")]
    pub encryption_key_file: Option<PathBuf>,
    /// File holding an older key accepted for reading (key rotation); repeatable.
    #[arg(long)]
    pub decryption_key_file: Vec<PathBuf>,
    /// Longest wait for a connection to the store (S3).
    #[arg(long, default_value = "5s", value_name = "DURATION")]
    pub connect_timeout: Dur,
    /// Longest wait for the first byte of an answer after sending a request (its body, at
    /// most one 5 MiB part, included), and between two chunks of a download. A storage call
    /// without progress for half this (at most 10 s) is reported as stalled.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    pub read_timeout: Dur,
    /// Longest time for one request, retries by the S3 client included (per started 5 MiB of
    /// a body held in memory; for a streamed upload, the longest it may go without
    /// progress).
    #[arg(long, default_value = "120s", value_name = "DURATION")]
    pub operation_timeout: Dur,
}

impl StoreArgs {
    /// The encryption keys: `--encryption-key-file` or WALSHIP_ENCRYPTION_KEY to write and
    /// read, `--decryption-key-file` and WALSHIP_DECRYPTION_KEYS (comma-separated) to read.
    /// Errors never contain a key.
    pub fn keys(&self) -> anyhow::Result<Option<KeyRing>> {
        use anyhow::Context;
        let parse = |text: &str, origin: &str| {
            crate::redact::register(text);
            Key::parse(text).with_context(|| format!("bad encryption key in {origin}"))
        };
        let write = match (
            &self.encryption_key_file,
            std::env::var("WALSHIP_ENCRYPTION_KEY"),
        ) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!("cannot read --encryption-key-file {}", path.display())
                })?;
                Some(parse(&text, &path.display().to_string())?)
            }
            (None, Ok(text)) if !text.trim().is_empty() => {
                Some(parse(&text, "WALSHIP_ENCRYPTION_KEY")?)
            }
            _ => None,
        };
        let mut readers = Vec::new();
        for path in &self.decryption_key_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --decryption-key-file {}", path.display()))?;
            readers.push(parse(&text, &path.display().to_string())?);
        }
        if let Ok(list) = std::env::var("WALSHIP_DECRYPTION_KEYS") {
            for (i, text) in list.split(',').filter(|t| !t.trim().is_empty()).enumerate() {
                readers.push(parse(
                    text,
                    &format!("WALSHIP_DECRYPTION_KEYS entry {}", i + 1),
                )?);
            }
        }
        let ring = match write {
            Some(k) => Some(
                readers
                    .into_iter()
                    .fold(KeyRing::new(k), KeyRing::with_reader),
            ),
            None if !readers.is_empty() => Some(KeyRing::read_only(readers)),
            None => None,
        };
        Ok(ring)
    }

    /// The store timeouts these flags give.
    pub fn timeouts(&self) -> anyhow::Result<StoreTimeouts> {
        let t = StoreTimeouts {
            connect: self.connect_timeout.0,
            read: self.read_timeout.0,
            operation: self.operation_timeout.0,
        };
        t.check().map_err(|e| {
            anyhow::anyhow!("{e} (--connect-timeout, --read-timeout, --operation-timeout)")
        })?;
        Ok(t)
    }

    /// Applies these settings.
    pub fn apply(&self, s3: &mut S3Options) -> anyhow::Result<()> {
        s3.sse = match self.sse.as_deref() {
            None | Some("") => None,
            Some("AES256") => Some(ServerSideEncryption::Aes256),
            Some("aws:kms") => Some(ServerSideEncryption::Kms {
                key_id: self.sse_kms_key_id.clone(),
            }),
            Some(other) => anyhow::bail!("--sse `{other}` is not AES256 or aws:kms"),
        };
        s3.checksum = match self.s3_checksum.as_str() {
            "when-required" => ChecksumMode::WhenRequired,
            "when-supported" => ChecksumMode::WhenSupported,
            other => {
                anyhow::bail!("--s3-checksum `{other}` is not when-required or when-supported")
            }
        };
        Ok(())
    }
}

/// `walship replicate`.
#[derive(Debug, Args)]
pub struct ReplicateArgs {
    /// The database to replicate (or use --config).
    pub db: Option<PathBuf>,
    /// Where to: file:///dir or s3://bucket/prefix?endpoint=...&region=...&force-path-style=true
    pub replica_url: Option<String>,
    /// Replicate every database and replica of this walship.toml (default: $WALSHIP_CONFIG
    /// when no DB is given). The flags below give the defaults for what the file leaves
    /// unset.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Run this command (through /bin/sh, in a process group of its own) once replication
    /// is up; SIGTERM, SIGINT and SIGHUP go to its whole group; once every process of it has
    /// exited, make a final sync and exit with its status (128+N if killed by signal N).
    #[arg(long)]
    pub exec: Option<String>,
    /// Ship everything committed, write a snapshot if one is due (--snapshot-interval
    /// since the newest snapshot, and the database changed since), apply retention, release
    /// the lease and exit: for cron jobs and pre-deploy hooks. Exit 0 when every database
    /// was replicated.
    #[arg(long, conflicts_with_all = ["exec", "listen"])]
    pub once: bool,
    /// With --once: write a snapshot whether or not one is due.
    #[arg(long, requires = "once")]
    pub force_snapshot: bool,
    /// Longest delay between a commit and its upload.
    #[arg(long, default_value = "1s")]
    pub sync_interval: Dur,
    /// Time between snapshots (one is taken with the first write after it).
    #[arg(long, default_value = "5m")]
    pub snapshot_interval: Dur,
    /// Checkpoint once the WAL holds this many frames.
    #[arg(long, default_value_t = 1000)]
    pub checkpoint_frames: u32,
    /// While the app writes heavily, hold the WAL's checkpoint lock and checkpoint for it:
    /// its own checkpoints (automatic or explicit) then report busy at once instead of
    /// slowing its commits; released when its writes slow down
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "true|false")]
    pub defer_app_checkpoints: bool,
    /// Past this many MiB in the WAL, the next handoff holds the app's writes until all
    /// of it is shipped and copied back, and restarts the WAL (default: no limit; under a
    /// write load faster than the disk or the store, the WAL grows until the load drops).
    /// The app's busy timeout must cover the wait: seconds under such a load
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_wal_mib: Option<u64>,
    /// After SIGTERM/SIGINT: how long the --exec command may take to exit (then its process
    /// group is killed), and then how long the final sync may take.
    #[arg(long, default_value = "30s")]
    pub shutdown_timeout: Dur,
    /// Switch a database that is not in WAL mode to WAL instead of refusing it.
    #[arg(long)]
    pub enable_wal: bool,
    /// Merge this many consecutive small segments into one, so restores fetch fewer
    /// objects (0 = never merge).
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub compaction_fan_in: u32,
    /// Delete merged segments' parts this long after the merge (until then a point-in-time
    /// restore can stop between them).
    #[arg(long, default_value = "5m", value_name = "DURATION")]
    pub compaction_keep_parts: Dur,
    #[command(flatten)]
    pub lease: LeaseArgs,
    #[command(flatten)]
    pub retention: RetentionArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub http: Box<crate::http::HttpArgs>,
    #[command(flatten)]
    pub tools: crate::tools::daemon::DaemonArgs,
}

/// `walship restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Where to write the database.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Write a new database holding only this table (its statement, rows, indexes and
    /// triggers); repeatable.
    #[arg(long = "table", value_name = "NAME")]
    pub table: Vec<String>,
    /// Restore the state as of this time (RFC 3339), not the newest.
    #[arg(long)]
    pub timestamp: Option<String>,
    /// Do nothing (exit 0) if OUTPUT exists.
    #[arg(long)]
    pub if_db_not_exists: bool,
    /// Do nothing (exit 0) if the replica holds no objects at all. A replica whose objects
    /// fail to restore is still an error.
    #[arg(long)]
    pub if_replica_exists: bool,
    /// Replace OUTPUT if it exists (and its -wal and -shm).
    #[arg(long)]
    pub force: bool,
    /// Downloads in flight at once.
    #[arg(long, default_value_t = 4)]
    pub parallelism: usize,
    /// Accept a partial restore: write OUTPUT and exit 0 even though objects exist beyond
    /// the point restored (a missing or damaged segment, a damaged newest snapshot that
    /// forced an older point). The result line and --json still say what is missing.
    /// Without it, a partial restore writes nothing and exits 3.
    #[arg(long)]
    pub allow_partial: bool,
    /// Print the result as one JSON object on stdout (generation, position, time, objects
    /// applied and skipped, partial and the gap).
    #[arg(long, conflicts_with = "table")]
    pub json: bool,
    /// Print the plan (snapshot, segments, sizes, gaps) from the listing and write nothing;
    /// exits 3 when the plan has a gap and --allow-partial is not given.
    #[arg(long, conflicts_with = "table")]
    pub dry_run: bool,
    /// The replica: file:///dir or s3://bucket/prefix?...
    pub replica_url: String,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `walship snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The database (or use --config).
    pub db: Option<PathBuf>,
    /// The replica.
    pub replica_url: Option<String>,
    /// Snapshot the databases of this walship.toml to each of their replicas (default:
    /// $WALSHIP_CONFIG when no DB is given).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// With --config: only this database (its path or name).
    #[arg(long = "db", value_name = "PATH|NAME", requires = "config")]
    pub only_db: Option<String>,
    /// Switch a database that is not in WAL mode to WAL instead of refusing it.
    #[arg(long)]
    pub enable_wal: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// `walship generations`.
#[derive(Debug, Args)]
pub struct GenerationsArgs {
    /// The replica.
    pub replica_url: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}
