//! `walship.toml`: the configuration file (every key is documented in
//! docs/configuration.md; docs/walship.example.toml is parsed by a test here).
//!
//! Loading is strict: the TOML is parsed, every string has its `${VAR}` references expanded
//! from the environment (a missing variable is an error naming it and the key), and the result
//! is deserialized with unknown keys refused; every error names the key path
//! (`db[0].replica[1].sync-interval`). Then [`Config::resolve`] checks what serde cannot
//! (version, duplicates, URLs, keys, durations that must be positive) and produces the
//! [`Config`] the binary runs: one [`DbConfig`] per database, each with its replicas.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use walship_engine::{CompactionOptions, LeaseOptions, OnConflict, RetentionPolicy};
use walship_format::crypto::{Key, KeyRing};
use walship_storage::{
    ChecksumMode, ReplicaUrl, S3Options, ServerSideEncryption, StaticCredentials, StoreOptions,
    StoreTimeouts,
};

use crate::duration::Dur;

/// The configuration file version this walship reads.
pub const CONFIG_VERSION: u32 = 1;

/// The file's shape, as written (after `${VAR}` expansion). No `Debug`: it holds secrets
/// in the clear.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawConfig {
    version: u32,
    /// Address of the status server (`--listen`).
    listen: Option<String>,
    /// Webhook URLs for alerts (`--webhook`).
    #[serde(default)]
    webhook: Vec<String>,
    /// Bearer token of the admin API (`WALSHIP_API_TOKEN`); use `${VAR}`.
    api_token: Option<String>,
    #[serde(default)]
    db: Vec<RawDb>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawDb {
    path: String,
    name: Option<String>,
    enable_wal: Option<bool>,
    checkpoint_frames: Option<u32>,
    defer_app_checkpoints: Option<bool>,
    max_wal_mib: Option<u64>,
    #[serde(default)]
    replica: Vec<RawReplica>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum RawChecksum {
    WhenRequired,
    WhenSupported,
}

#[derive(Debug, Deserialize)]
enum RawSse {
    #[serde(rename = "AES256")]
    Aes256,
    #[serde(rename = "aws:kms")]
    Kms,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum RawOnConflict {
    Wait,
    Takeover,
    Fail,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawReplica {
    url: String,
    name: Option<String>,
    endpoint: Option<String>,
    region: Option<String>,
    force_path_style: Option<bool>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    session_token: Option<String>,
    sync_interval: Option<Dur>,
    snapshot_interval: Option<Dur>,
    retention: Option<RawRetention>,
    sse: Option<RawSse>,
    sse_kms_key_id: Option<String>,
    checksum: Option<RawChecksum>,
    encryption_key: Option<String>,
    #[serde(default)]
    decryption_keys: Vec<String>,
    on_conflict: Option<RawOnConflict>,
    lease_ttl: Option<Dur>,
    compaction: Option<RawCompaction>,
    connect_timeout: Option<Dur>,
    read_timeout: Option<Dur>,
    operation_timeout: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawCompaction {
    enabled: Option<bool>,
    fan_in: Option<u32>,
    keep_parts: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawRetention {
    keep_last: Option<u32>,
    keep_within: Option<Dur>,
    keep_daily: Option<u32>,
    keep_weekly: Option<u32>,
}

/// Values a replica takes when the file does not set them (from the command line).
#[derive(Debug, Clone)]
pub struct Defaults {
    /// `sync-interval`.
    pub sync_interval: Duration,
    /// `snapshot-interval`.
    pub snapshot_interval: Duration,
    /// `checkpoint-frames` of a database.
    pub checkpoint_frames: u32,
    /// `defer-app-checkpoints` of a database.
    pub defer_app_checkpoints: bool,
    /// `max-wal-mib` of a database.
    pub max_wal_mib: Option<u64>,
    /// `enable-wal` of a database.
    pub enable_wal: bool,
    /// `retention`.
    pub retention: RetentionPolicy,
    /// `on-conflict` and `lease-ttl`.
    pub lease: LeaseOptions,
    /// `compaction`.
    pub compaction: CompactionOptions,
    /// `connect-timeout`, `read-timeout`, `operation-timeout`.
    pub timeouts: StoreTimeouts,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            sync_interval: Duration::from_secs(1),
            snapshot_interval: Duration::from_secs(300),
            checkpoint_frames: 1000,
            defer_app_checkpoints: true,
            max_wal_mib: None,
            enable_wal: false,
            retention: RetentionPolicy::default(),
            lease: LeaseOptions::default(),
            compaction: CompactionOptions::default(),
            timeouts: StoreTimeouts::default(),
        }
    }
}

/// A loaded, checked configuration. `Debug` shows neither the API token nor the webhook
/// URLs.
#[derive(Clone)]
pub struct Config {
    /// The databases, in file order.
    pub dbs: Vec<DbConfig>,
    /// `listen`: address of the status server.
    pub listen: Option<std::net::SocketAddr>,
    /// `webhook`: alert URLs.
    pub webhooks: Vec<String>,
    /// `api-token`: the admin API's bearer token.
    pub api_token: Option<ApiToken>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("dbs", &self.dbs)
            .field("listen", &self.listen)
            .field("webhooks", &self.webhooks.len())
            .field("api_token", &self.api_token)
            .finish()
    }
}

/// A token that never prints.
#[derive(Clone)]
pub struct ApiToken(pub String);

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

/// One `[[db]]`.
#[derive(Debug, Clone)]
pub struct DbConfig {
    /// `db[i]`, for messages.
    pub key_path: String,
    /// The database file (relative paths are taken from the config file's directory).
    pub path: PathBuf,
    /// A name for logs, metrics and the status server (default: the file name's stem).
    pub name: String,
    /// Switch a database not in WAL mode to WAL.
    pub enable_wal: bool,
    /// Checkpoint once the WAL holds this many frames.
    pub checkpoint_frames: u32,
    /// Hold the checkpoint lock while the app writes heavily.
    pub defer_app_checkpoints: bool,
    /// Past this many MiB in the WAL, a handoff holds the app's writes until it restarts it.
    pub max_wal_mib: Option<u64>,
    /// Its replicas (at least one).
    pub replicas: Vec<ReplicaConfig>,
}

/// One `[[db.replica]]`.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// `db[i].replica[j]`, for messages.
    pub key_path: String,
    /// A name, unique within its database (default: its 1-based index).
    pub name: String,
    /// The URL as written (after expansion).
    pub url: String,
    /// The parsed URL.
    pub parsed: ReplicaUrl,
    /// Store settings (S3 endpoint, region, path style, SSE, checksums, credentials).
    pub store: StoreOptions,
    /// Longest delay between a commit and its upload.
    pub sync_interval: Duration,
    /// Time between snapshots.
    pub snapshot_interval: Duration,
    /// Which snapshots to keep.
    pub retention: RetentionPolicy,
    /// Writer fencing.
    pub lease: LeaseOptions,
    /// Merging runs of small segments.
    pub compaction: CompactionOptions,
    /// Client-side encryption keys, if any.
    pub keys: Option<KeyRing>,
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Expands `${NAME}` from `env` in `s`; `$$` is a literal `$`. `path` names the key for
/// errors.
pub fn expand(s: &str, path: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let end = tail.find('}').ok_or_else(|| {
                anyhow!("{path}: unterminated `${{` (write `$$` for a literal `$`)")
            })?;
            let name = &tail[..end];
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                bail!("{path}: `${{{name}}}` is not a valid environment variable reference");
            }
            let value = env(name).ok_or_else(|| {
                anyhow!("{path}: environment variable `{name}` is not set (set it, or write `$${{{name}}}` for the literal text)")
            })?;
            out.push_str(&value);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Expands every string in `v` (not keys).
fn expand_value(
    v: &mut toml::Value,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<()> {
    match v {
        toml::Value::String(s) => *s = expand(s, path, env)?,
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_value(item, &format!("{path}[{i}]"), env)?;
            }
        }
        toml::Value::Table(t) => {
            for (k, item) in t.iter_mut() {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                expand_value(item, &p, env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Lexically normalizes an absolute path (`.` and `..` removed), without touching the disk.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Keys whose values are secrets: an error about one never shows its value.
const SECRET_KEYS: &[&str] = &[
    "access-key-id",
    "secret-access-key",
    "session-token",
    "api-token",
    "encryption-key",
    "decryption-keys",
    "webhook",
];

/// True when the key path (`db[0].replica[1].secret-access-key`, `webhook[0]`) names a secret.
fn holds_secret(path: &str) -> bool {
    let last = path.rsplit('.').next().unwrap_or(path);
    let last = last.split('[').next().unwrap_or(last);
    SECRET_KEYS.contains(&last)
}

/// Tells the log writer about every secret in the file, so no log line shows one.
fn register_secrets(raw: &RawConfig) {
    use crate::redact::{register, register_url};
    raw.api_token.iter().for_each(|t| register(t));
    raw.webhook.iter().for_each(|u| register_url(u));
    for r in raw.db.iter().flat_map(|d| &d.replica) {
        [
            &r.access_key_id,
            &r.secret_access_key,
            &r.session_token,
            &r.encryption_key,
        ]
        .into_iter()
        .flatten()
        .chain(&r.decryption_keys)
        .for_each(|s| register(s));
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Config {
    /// Reads and checks `path`, expanding `${VAR}` from the process environment.
    pub fn load(path: &Path, defaults: &Defaults) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let env = |k: &str| std::env::var(k).ok();
        Config::parse(&text, path, defaults, &env)
            .with_context(|| format!("invalid config file {}", path.display()))
    }

    /// Parses and checks config text; `source` is the file it came from (relative database
    /// paths are taken from its directory) and `env` looks up `${VAR}`s.
    pub fn parse(
        text: &str,
        source: &Path,
        defaults: &Defaults,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config> {
        let mut value: toml::Value = toml::from_str(text).map_err(|e| {
            // toml's message spans several lines (a code excerpt); keep the first and the
            // position.
            let msg = e.message().to_string();
            match e.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    anyhow!("TOML syntax error on line {line}: {msg}")
                }
                None => anyhow!("TOML syntax error: {msg}"),
            }
        })?;
        expand_value(&mut value, "", env)?;
        let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            if holds_secret(&path) {
                // serde's message may quote the value.
                return anyhow!(
                    "{path}: not a string (the value is not shown: it may be a secret)"
                );
            }
            let inner = e.into_inner().to_string();
            let inner = inner.lines().next().unwrap_or_default().to_string();
            if path == "." || path.is_empty() {
                anyhow!("{inner}")
            } else {
                anyhow!("{path}: {inner}")
            }
        })?;
        register_secrets(&raw);
        Config::resolve(raw, source, defaults)
    }

    fn resolve(raw: RawConfig, source: &Path, defaults: &Defaults) -> Result<Config> {
        if raw.version != CONFIG_VERSION {
            bail!(
                "version: unsupported config version {} (this walship reads version {CONFIG_VERSION})",
                raw.version
            );
        }
        if raw.db.is_empty() {
            bail!("no [[db]] entries (add one with a `path` and a [[db.replica]])");
        }
        let base = source
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = if base.is_absolute() {
            base
        } else {
            std::env::current_dir()
                .context("current directory")?
                .join(base)
        };
        let mut dbs: Vec<DbConfig> = Vec::new();
        let mut paths: HashMap<PathBuf, String> = HashMap::new();
        let mut names: HashMap<String, String> = HashMap::new();
        let mut urls: HashMap<String, String> = HashMap::new();
        for (i, d) in raw.db.into_iter().enumerate() {
            let kp = format!("db[{i}]");
            if d.path.trim().is_empty() {
                bail!("{kp}.path: empty (give the database file)");
            }
            if d.max_wal_mib == Some(0) {
                bail!("{kp}.max-wal-mib: must be at least 1 (leave it out for no limit)");
            }
            let path = normalize(&base.join(&d.path));
            // Compare real paths where the file exists (symlinks), else the normalized ones.
            let identity = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
            if let Some(first) = paths.insert(identity, kp.clone()) {
                bail!(
                    "{kp}.path: {} is already configured as {first} (give each database once, with all its replicas)",
                    path.display()
                );
            }
            let name = match d.name {
                Some(n) => {
                    if !valid_name(&n) {
                        bail!("{kp}.name: `{n}` may only hold letters, digits, `-`, `_` and `.`");
                    }
                    n
                }
                None => crate::http::default_name(&path),
            };
            if let Some(first) = names.insert(name.clone(), kp.clone()) {
                bail!("{kp}.name: `{name}` is already the name of {first} (set a distinct `name`)");
            }
            if d.replica.is_empty() {
                bail!("{kp}: no [[db.replica]] (add at least one replica with a `url`)");
            }
            if d.checkpoint_frames == Some(0) {
                bail!("{kp}.checkpoint-frames: must be at least 1");
            }
            let mut replicas = Vec::new();
            let mut rnames: HashMap<String, usize> = HashMap::new();
            for (j, r) in d.replica.into_iter().enumerate() {
                let rkp = format!("{kp}.replica[{j}]");
                let rc = resolve_replica(r, &rkp, j, defaults)?;
                if let Some(first) = rnames.insert(rc.name.clone(), j) {
                    bail!(
                        "{rkp}.name: `{}` is already the name of {kp}.replica[{first}]",
                        rc.name
                    );
                }
                let ident = rc.parsed.to_string();
                if let Some(first) = urls.insert(ident.clone(), rkp.clone()) {
                    bail!(
                        "{rkp}.url: {ident} is already used by {first} (two replicators must not share a replica; give each its own prefix)"
                    );
                }
                replicas.push(rc);
            }
            dbs.push(DbConfig {
                key_path: kp,
                path,
                name,
                enable_wal: d.enable_wal.unwrap_or(defaults.enable_wal),
                checkpoint_frames: d.checkpoint_frames.unwrap_or(defaults.checkpoint_frames),
                defer_app_checkpoints: d
                    .defer_app_checkpoints
                    .unwrap_or(defaults.defer_app_checkpoints),
                max_wal_mib: d.max_wal_mib.or(defaults.max_wal_mib),
                replicas,
            });
        }
        let listen = match raw.listen.as_deref() {
            None | Some("") => None,
            Some(a) => Some(a.parse().map_err(|_| {
                anyhow!("listen: `{a}` is not an address and port (for example 127.0.0.1:9090)")
            })?),
        };
        for (i, w) in raw.webhook.iter().enumerate() {
            if !(w.starts_with("http://") || w.starts_with("https://")) {
                bail!("webhook[{i}]: not an http(s) URL");
            }
        }
        Ok(Config {
            dbs,
            listen,
            webhooks: raw.webhook,
            api_token: raw.api_token.filter(|t| !t.is_empty()).map(ApiToken),
        })
    }

    /// Every (database, replica) pair.
    pub fn pairs(&self) -> impl Iterator<Item = (&DbConfig, &ReplicaConfig)> {
        self.dbs
            .iter()
            .flat_map(|d| d.replicas.iter().map(move |r| (d, r)))
    }

    /// A summary for `walship config check`.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for d in &self.dbs {
            let _ = writeln!(s, "{} {} ({})", d.key_path, d.path.display(), d.name);
            for r in &d.replicas {
                let _ = writeln!(
                    s,
                    "  {} {} sync {:?}, snapshot {:?}{}{}",
                    r.key_path,
                    r.parsed,
                    r.sync_interval,
                    r.snapshot_interval,
                    if r.retention.keeps_everything() {
                        String::new()
                    } else {
                        format!(", retention {}", describe_retention(&r.retention))
                    },
                    if r.keys.is_some() { ", encrypted" } else { "" }
                );
            }
        }
        s
    }
}

/// A short description of a policy: `keep-last 24, keep-daily 7`.
pub fn describe_retention(p: &RetentionPolicy) -> String {
    let mut parts = Vec::new();
    if let Some(n) = p.keep_last {
        parts.push(format!("keep-last {n}"));
    }
    if let Some(d) = p.keep_within {
        parts.push(format!("keep-within {d:?}"));
    }
    if let Some(n) = p.keep_daily {
        parts.push(format!("keep-daily {n}"));
    }
    if let Some(n) = p.keep_weekly {
        parts.push(format!("keep-weekly {n}"));
    }
    parts.join(", ")
}

fn positive(d: Option<Dur>, path: &str, default: Duration) -> Result<Duration> {
    match d {
        Some(Dur(d)) if d.is_zero() => bail!("{path}: must be more than zero"),
        Some(Dur(d)) => Ok(d),
        None => Ok(default),
    }
}

fn resolve_replica(
    r: RawReplica,
    kp: &str,
    index: usize,
    defaults: &Defaults,
) -> Result<ReplicaConfig> {
    let parsed: ReplicaUrl = r.url.parse().map_err(|e| anyhow!("{kp}.url: {e}"))?;
    let name = match r.name {
        Some(n) if !valid_name(&n) => {
            bail!("{kp}.name: `{n}` may only hold letters, digits, `-`, `_` and `.`")
        }
        Some(n) => n,
        None => (index + 1).to_string(),
    };
    let is_s3 = matches!(parsed, ReplicaUrl::S3 { .. });
    let mut s3 = S3Options::default();
    for (key, set) in [
        ("endpoint", r.endpoint.is_some()),
        ("region", r.region.is_some()),
        ("force-path-style", r.force_path_style.is_some()),
        ("access-key-id", r.access_key_id.is_some()),
        ("secret-access-key", r.secret_access_key.is_some()),
        ("session-token", r.session_token.is_some()),
        ("sse", r.sse.is_some()),
        ("sse-kms-key-id", r.sse_kms_key_id.is_some()),
        ("checksum", r.checksum.is_some()),
    ] {
        if set && !is_s3 {
            bail!("{kp}.{key}: only applies to s3:// replicas");
        }
    }
    // Checked first: an error about an endpoint holding credentials must not show them.
    let endpoint_key = r
        .endpoint
        .as_deref()
        .map(walship_storage::validate_endpoint)
        .transpose()
        .map_err(|reason| anyhow!("{kp}.endpoint: {reason}"))?;
    if let ReplicaUrl::S3 {
        endpoint,
        region,
        force_path_style,
        ..
    } = &parsed
    {
        // The URL's query parameters and the keys must not disagree.
        if let (Some(a), Some(b)) = (endpoint, &endpoint_key)
            && a != b
        {
            bail!("{kp}.endpoint: `{b}` differs from the url's endpoint `{a}` (set it once)");
        }
        if let (Some(a), Some(b)) = (region, &r.region)
            && a != b
        {
            bail!("{kp}.region: `{b}` differs from the url's region `{a}` (set it once)");
        }
        if let (Some(a), Some(b)) = (force_path_style, r.force_path_style)
            && *a != b
        {
            bail!("{kp}.force-path-style: differs from the url's force-path-style (set it once)");
        }
    }
    s3.endpoint = endpoint_key;
    s3.region = r.region;
    s3.force_path_style = r.force_path_style;
    s3.credentials = match (r.access_key_id, r.secret_access_key) {
        (Some(id), Some(secret)) => {
            if id.is_empty() || secret.is_empty() {
                bail!("{kp}: access-key-id and secret-access-key must not be empty");
            }
            Some(StaticCredentials {
                access_key_id: id,
                secret_access_key: secret,
                session_token: r.session_token,
            })
        }
        (None, None) => {
            if r.session_token.is_some() {
                bail!("{kp}.session-token: needs access-key-id and secret-access-key");
            }
            None
        }
        (Some(_), None) => bail!("{kp}.secret-access-key: missing (access-key-id is set)"),
        (None, Some(_)) => bail!("{kp}.access-key-id: missing (secret-access-key is set)"),
    };
    s3.sse = match r.sse {
        None => {
            if r.sse_kms_key_id.is_some() {
                bail!("{kp}.sse-kms-key-id: needs sse = \"aws:kms\"");
            }
            None
        }
        Some(RawSse::Aes256) => {
            if r.sse_kms_key_id.is_some() {
                bail!("{kp}.sse-kms-key-id: needs sse = \"aws:kms\", not AES256");
            }
            Some(ServerSideEncryption::Aes256)
        }
        Some(RawSse::Kms) => Some(ServerSideEncryption::Kms {
            key_id: r.sse_kms_key_id,
        }),
    };
    s3.checksum = match r.checksum {
        None | Some(RawChecksum::WhenRequired) => ChecksumMode::WhenRequired,
        Some(RawChecksum::WhenSupported) => ChecksumMode::WhenSupported,
    };
    let keys = {
        let write = match &r.encryption_key {
            Some(text) => Some(Key::parse(text).map_err(|e| anyhow!("{kp}.encryption-key: {e}"))?),
            None => None,
        };
        let mut readers = Vec::new();
        for (i, text) in r.decryption_keys.iter().enumerate() {
            readers.push(Key::parse(text).map_err(|e| anyhow!("{kp}.decryption-keys[{i}]: {e}"))?);
        }
        match write {
            Some(k) => Some(
                readers
                    .into_iter()
                    .fold(KeyRing::new(k), KeyRing::with_reader),
            ),
            None if !readers.is_empty() => Some(KeyRing::read_only(readers)),
            None => None,
        }
    };
    let retention = match r.retention {
        None => defaults.retention.clone(),
        Some(t) => {
            if let Some(Dur(d)) = t.keep_within
                && d.is_zero()
            {
                bail!("{kp}.retention.keep-within: must be more than zero");
            }
            let p = RetentionPolicy {
                keep_last: t.keep_last,
                keep_within: t.keep_within.map(|d| d.0),
                keep_daily: t.keep_daily,
                keep_weekly: t.keep_weekly,
            };
            if p.keeps_everything() {
                bail!(
                    "{kp}.retention: set at least one of keep-last, keep-within, keep-daily, keep-weekly (or remove the table to keep everything)"
                );
            }
            p
        }
    };
    let lease_ttl = positive(r.lease_ttl, &format!("{kp}.lease-ttl"), defaults.lease.ttl)?;
    let d = defaults.timeouts;
    let timeouts = StoreTimeouts {
        connect: positive(
            r.connect_timeout,
            &format!("{kp}.connect-timeout"),
            d.connect,
        )?,
        read: positive(r.read_timeout, &format!("{kp}.read-timeout"), d.read)?,
        operation: positive(
            r.operation_timeout,
            &format!("{kp}.operation-timeout"),
            d.operation,
        )?,
    };
    let lease = LeaseOptions {
        ttl: lease_ttl,
        on_conflict: match r.on_conflict {
            None => defaults.lease.on_conflict,
            Some(RawOnConflict::Wait) => OnConflict::Wait,
            Some(RawOnConflict::Takeover) => OnConflict::Takeover,
            Some(RawOnConflict::Fail) => OnConflict::Fail,
        },
    };
    let mut compaction = defaults.compaction.clone();
    if let Some(c) = r.compaction {
        if let Some(n) = c.fan_in {
            if !(2..=1024).contains(&n) {
                bail!(
                    "{kp}.compaction.fan-in: {n} is out of range; use 2 to 1024 (or enabled = false)"
                );
            }
            compaction.fan_in = n;
        }
        if let Some(Dur(d)) = c.keep_parts {
            compaction.keep_parts = d;
        }
        if c.enabled == Some(false) {
            compaction.fan_in = 0;
        }
    }
    Ok(ReplicaConfig {
        key_path: kp.to_string(),
        name,
        url: r.url,
        parsed,
        store: StoreOptions {
            s3,
            retry: None,
            timeouts,
        },
        sync_interval: positive(
            r.sync_interval,
            &format!("{kp}.sync-interval"),
            defaults.sync_interval,
        )?,
        snapshot_interval: positive(
            r.snapshot_interval,
            &format!("{kp}.snapshot-interval"),
            defaults.snapshot_interval,
        )?,
        retention,
        lease,
        compaction,
        keys,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const KEY_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn env(k: &str) -> Option<String> {
        match k {
            "R2_KEY_ID" => Some("AKIDEXAMPLE".into()),
            "R2_SECRET" => Some("s3cr3t".into()),
            "WALSHIP_KEY" => Some(KEY_HEX.into()),
            "BUCKET" => Some("my-bucket".into()),
            _ => None,
        }
    }

    fn parse(text: &str) -> Result<Config> {
        Config::parse(
            text,
            Path::new("/etc/walship/walship.toml"),
            &Defaults::default(),
            &env,
        )
    }

    fn err(text: &str) -> String {
        let e = parse(text).unwrap_err();
        let s = format!("{e:#}");
        assert!(!s.contains('\n'), "one line: {s}");
        s
    }

    #[test]
    fn an_endpoint_with_credentials_is_refused_without_echo() {
        for endpoint in [
            "http://user:${R2_SECRET}@127.0.0.1:9000",
            "https://${R2_SECRET}@acct.r2.cloudflarestorage.com",
            "user:${R2_SECRET}@127.0.0.1:9000",
        ] {
            let e = err(&format!(
                r#"version = 1
[[db]]
path = "/data/app.db"
[[db.replica]]
url = "s3://bucket/x"
endpoint = "{endpoint}"
"#
            ));
            assert!(
                e.contains("db[0].replica[0].endpoint: credentials do not belong")
                    && e.contains("access-key-id"),
                "{e}"
            );
            assert!(!e.contains("s3cr3t"), "{e}");
        }
    }

    #[test]
    fn a_mistyped_secret_key_is_named_but_its_value_is_not_shown() {
        let e = err(r#"version = 1
[[db]]
path = "/data/app.db"
[[db.replica]]
url = "s3://bucket/x"
access-key-id = "AKIDEXAMPLE"
secret-access-key = 98765432109876
"#);
        assert!(e.contains("db[0].replica[0].secret-access-key"), "{e}");
        assert!(!e.contains("98765432109876"), "{e}");
    }

    #[test]
    fn debug_shows_no_webhook_url() {
        let c = parse(
            r#"version = 1
webhook = ["https://hooks.example.com/services/T0/B0/${R2_SECRET}"]
[[db]]
path = "/data/app.db"
[[db.replica]]
url = "file:///backups/app"
"#,
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }

    #[test]
    fn server_keys_are_read_checked_and_the_token_never_prints() {
        let c = parse(
            r#"version = 1
listen = "127.0.0.1:9090"
webhook = ["https://hooks.example.com/x"]
api-token = "${R2_SECRET}"
[[db]]
path = "/data/app.db"
[[db.replica]]
url = "file:///backups/app"
"#,
        )
        .unwrap();
        assert_eq!(c.listen, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(c.webhooks, vec!["https://hooks.example.com/x".to_string()]);
        assert_eq!(c.api_token.as_ref().map(|t| t.0.as_str()), Some("s3cr3t"));
        assert!(!format!("{c:?}").contains("s3cr3t"));
        let e = err(r#"version = 1
listen = "nine thousand"
[[db]]
path = "/data/app.db"
[[db.replica]]
url = "file:///backups/app"
"#);
        assert!(e.starts_with("listen:"), "{e}");
    }

    const MINIMAL: &str = r#"
version = 1
[[db]]
path = "/data/app.db"
  [[db.replica]]
  url = "file:///backups/app"
"#;

    #[test]
    fn a_minimal_file_takes_the_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.dbs.len(), 1);
        let d = &c.dbs[0];
        assert_eq!(d.path, PathBuf::from("/data/app.db"));
        assert_eq!(d.name, "app");
        assert_eq!(d.checkpoint_frames, 1000);
        assert!(d.defer_app_checkpoints);
        let r = &d.replicas[0];
        assert_eq!(r.name, "1");
        assert_eq!(r.sync_interval, Duration::from_secs(1));
        assert_eq!(r.snapshot_interval, Duration::from_secs(300));
        assert!(r.retention.keeps_everything());
        assert_eq!(r.lease, LeaseOptions::default());
        assert!(r.keys.is_none());
    }

    #[test]
    fn the_example_file_parses_and_uses_every_section() {
        let text = include_str!("../../../docs/walship.example.toml");
        let c = Config::parse(
            text,
            Path::new("/etc/walship/walship.toml"),
            &Defaults::default(),
            &env,
        )
        .unwrap();
        assert_eq!(c.dbs.len(), 2);
        let pairs: Vec<_> = c.pairs().collect();
        assert_eq!(pairs.len(), 3);
        let (_, r2) = pairs[1];
        assert_eq!(r2.store.s3.region.as_deref(), Some("auto"));
        let creds = r2.store.s3.credentials.as_ref().unwrap();
        assert_eq!(creds.access_key_id, "AKIDEXAMPLE");
        assert_eq!(creds.secret_access_key, "s3cr3t");
        assert_eq!(
            r2.retention,
            RetentionPolicy {
                keep_last: Some(24),
                keep_within: Some(Duration::from_secs(86_400)),
                keep_daily: Some(7),
                keep_weekly: Some(4),
            }
        );
        assert!(r2.keys.is_some());
        assert_eq!(r2.lease.on_conflict, OnConflict::Wait);
        // Debug output never shows a secret.
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cr3t"), "{dbg}");
        assert!(!dbg.contains(KEY_HEX), "{dbg}");
        // And the summary names every pair.
        assert_eq!(c.summary().matches("replica[").count(), 3);
    }

    #[test]
    fn every_key_is_read() {
        let c = parse(
            r#"
version = 1
[[db]]
path = "app.db"
name = "main"
enable-wal = true
checkpoint-frames = 500
defer-app-checkpoints = false
max-wal-mib = 512
  [[db.replica]]
  url = "s3://${BUCKET}/app"
  name = "r2"
  endpoint = "https://acct.r2.cloudflarestorage.com"
  region = "auto"
  force-path-style = true
  access-key-id = "${R2_KEY_ID}"
  secret-access-key = "${R2_SECRET}"
  session-token = "tok"
  sync-interval = "250ms"
  snapshot-interval = "1h"
  sse = "aws:kms"
  sse-kms-key-id = "alias/walship"
  checksum = "when-supported"
  encryption-key = "${WALSHIP_KEY}"
  decryption-keys = ["${WALSHIP_KEY}"]
  on-conflict = "takeover"
  lease-ttl = "10s"
  connect-timeout = "2s"
  read-timeout = "45s"
  operation-timeout = "5m"
    [db.replica.retention]
    keep-last = 3
    keep-within = "2d"
    keep-daily = 7
    keep-weekly = 4
"#,
        )
        .unwrap();
        let d = &c.dbs[0];
        // Relative to the config file's directory.
        assert_eq!(d.path, PathBuf::from("/etc/walship/app.db"));
        assert_eq!(d.name, "main");
        assert!(d.enable_wal);
        assert_eq!(d.checkpoint_frames, 500);
        assert!(!d.defer_app_checkpoints);
        assert_eq!(d.max_wal_mib, Some(512));
        let r = &d.replicas[0];
        assert_eq!(r.name, "r2");
        assert!(matches!(&r.parsed, ReplicaUrl::S3 { bucket, .. } if bucket == "my-bucket"));
        assert_eq!(
            r.store.s3.endpoint.as_deref(),
            Some("https://acct.r2.cloudflarestorage.com")
        );
        assert_eq!(r.store.s3.force_path_style, Some(true));
        assert_eq!(
            r.store
                .s3
                .credentials
                .as_ref()
                .unwrap()
                .session_token
                .as_deref(),
            Some("tok")
        );
        assert_eq!(r.sync_interval, Duration::from_millis(250));
        assert_eq!(r.snapshot_interval, Duration::from_secs(3600));
        assert_eq!(
            r.store.s3.sse,
            Some(ServerSideEncryption::Kms {
                key_id: Some("alias/walship".into())
            })
        );
        assert_eq!(r.store.s3.checksum, ChecksumMode::WhenSupported);
        assert_eq!(r.lease.on_conflict, OnConflict::Takeover);
        assert_eq!(r.lease.ttl, Duration::from_secs(10));
        assert_eq!(
            r.store.timeouts,
            StoreTimeouts {
                connect: Duration::from_secs(2),
                read: Duration::from_secs(45),
                operation: Duration::from_secs(300),
            }
        );
        assert_eq!(
            r.retention.keep_within,
            Some(Duration::from_secs(2 * 86_400))
        );
        assert!(r.keys.as_ref().unwrap().writer().is_some());
    }

    #[test]
    fn unknown_keys_are_refused_with_their_path() {
        let e = err(&MINIMAL.replace("url =", "bogus = 1\n  url ="));
        assert!(e.contains("db[0].replica[0]"), "{e}");
        assert!(e.contains("bogus"), "{e}");
        let e = err(&format!(
            "{MINIMAL}\n    [db.replica.retention]\n    keep-lats = 3\n"
        ));
        assert!(e.contains("db[0].replica[0].retention"), "{e}");
        assert!(e.contains("keep-lats"), "{e}");
        let e = err(&MINIMAL.replace("version = 1", "version = 1\nreplicas = []"));
        assert!(e.contains("replicas"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = err(&MINIMAL.replace("url =", "sync-interval = \"fast\"\n  url ="));
        assert!(e.contains("db[0].replica[0].sync-interval"), "{e}");
        assert!(e.contains("`fast` is not a duration"), "{e}");
        let e = err(&MINIMAL.replace("url =", "sync-interval = \"0s\"\n  url ="));
        assert!(
            e.contains("db[0].replica[0].sync-interval: must be more than zero"),
            "{e}"
        );
        let e = err(&MINIMAL.replace("url =", "read-timeout = \"0s\"\n  url ="));
        assert!(
            e.contains("db[0].replica[0].read-timeout: must be more than zero"),
            "{e}"
        );
        let e = err(&MINIMAL.replace("url =", "snapshot-interval = 5\n  url ="));
        assert!(e.contains("db[0].replica[0].snapshot-interval"), "{e}");
        let e = err(&MINIMAL.replace("url =", "on-conflict = \"yield\"\n  url ="));
        assert!(e.contains("db[0].replica[0].on-conflict"), "{e}");
        let e = err(&MINIMAL.replace("file:///backups/app", "ftp://x/y"));
        assert!(e.contains("db[0].replica[0].url"), "{e}");
        let e = err(&MINIMAL.replace("url =", "region = \"x\"\n  url ="));
        assert!(
            e.contains("db[0].replica[0].region: only applies to s3://"),
            "{e}"
        );
        let e = err(&MINIMAL.replace("url =", "encryption-key = \"short\"\n  url ="));
        assert!(e.contains("db[0].replica[0].encryption-key"), "{e}");
        let e = err(&MINIMAL.replace("[[db.replica]]", "max-wal-mib = 0\n  [[db.replica]]"));
        assert!(e.contains("db[0].max-wal-mib: must be at least 1"), "{e}");
        let e = err(&MINIMAL.replace("version = 1", "version = 2"));
        assert!(e.contains("version: unsupported config version 2"), "{e}");
        let e = err(&MINIMAL.replace("version = 1", ""));
        assert!(e.contains("missing field `version`"), "{e}");
        let e = err("version = 1\n[[db]\n");
        assert!(e.contains("TOML syntax error on line 2"), "{e}");
        let e = err(&format!("{MINIMAL}\n    [db.replica.retention]\n"));
        assert!(
            e.contains("db[0].replica[0].retention: set at least one"),
            "{e}"
        );
    }

    #[test]
    fn missing_variables_are_named() {
        let e = err(&MINIMAL.replace("file:///backups/app", "s3://${NOPE_BUCKET}/app"));
        assert!(e.contains("db[0].replica[0].url"), "{e}");
        assert!(e.contains("`NOPE_BUCKET` is not set"), "{e}");
        let e = err(&MINIMAL.replace("/data/app.db", "/data/${UNCLOSED"));
        assert!(e.contains("db[0].path: unterminated"), "{e}");
        // `$$` is a literal dollar; a lone `$` is kept.
        let c = parse(&MINIMAL.replace("/data/app.db", "/data/$${HOME}$x.db")).unwrap();
        assert_eq!(c.dbs[0].path, PathBuf::from("/data/${HOME}$x.db"));
    }

    #[test]
    fn expansion_is_not_re_expanded_and_does_not_inject_toml() {
        let env = |k: &str| match k {
            "TRICKY" => Some("\"\n[[db]]\npath = \"${OTHER}".to_string()),
            _ => None,
        };
        let c = Config::parse(
            &MINIMAL.replace("/data/app.db", "/data/${TRICKY}"),
            Path::new("/w.toml"),
            &Defaults::default(),
            &env,
        )
        .unwrap();
        assert_eq!(c.dbs.len(), 1);
        assert!(c.dbs[0].path.to_string_lossy().contains("${OTHER}"));
    }

    #[test]
    fn duplicates_are_refused() {
        let two = format!(
            "{MINIMAL}\n[[db]]\npath = \"/data/./x/../app.db\"\n  [[db.replica]]\n  url = \"file:///backups/other\"\n"
        );
        let e = err(&two);
        assert!(
            e.contains("db[1].path: /data/app.db is already configured as db[0]"),
            "{e}"
        );
        let same_replica = format!(
            "{MINIMAL}\n[[db]]\npath = \"/data/b.db\"\n  [[db.replica]]\n  url = \"file:///backups/app\"\n"
        );
        let e = err(&same_replica);
        assert!(e.contains("db[1].replica[0].url"), "{e}");
        assert!(e.contains("already used by db[0].replica[0]"), "{e}");
        let same_name = format!(
            "{MINIMAL}\n[[db]]\npath = \"/other/app.db\"\n  [[db.replica]]\n  url = \"file:///backups/b\"\n"
        );
        let e = err(&same_name);
        assert!(
            e.contains("db[1].name: `app` is already the name of db[0]"),
            "{e}"
        );
    }

    #[test]
    fn structure_errors() {
        let e = err("version = 1\n");
        assert!(e.contains("no [[db]] entries"), "{e}");
        let e = err("version = 1\n[[db]]\npath = \"/a.db\"\n");
        assert!(e.contains("db[0]: no [[db.replica]]"), "{e}");
        let e = err("version = 1\n[[db]]\n  [[db.replica]]\n  url = \"file:///x\"\n");
        assert!(
            e.contains("db[0]") && e.contains("missing field `path`"),
            "{e}"
        );
        let e = err(&MINIMAL
            .replace("url =", "access-key-id = \"a\"\n  url =")
            .replace("file:///backups/app", "s3://b/p"));
        assert!(
            e.contains("db[0].replica[0].secret-access-key: missing"),
            "{e}"
        );
    }

    #[test]
    fn command_line_values_are_the_defaults() {
        let defaults = Defaults {
            sync_interval: Duration::from_millis(100),
            retention: RetentionPolicy {
                keep_last: Some(2),
                ..Default::default()
            },
            lease: LeaseOptions {
                ttl: Duration::from_secs(5),
                on_conflict: OnConflict::Fail,
            },
            ..Default::default()
        };
        let c = Config::parse(MINIMAL, Path::new("/w.toml"), &defaults, &env).unwrap();
        let r = &c.dbs[0].replicas[0];
        assert_eq!(r.sync_interval, Duration::from_millis(100));
        assert_eq!(r.retention.keep_last, Some(2));
        assert_eq!(r.lease.on_conflict, OnConflict::Fail);
    }
}
