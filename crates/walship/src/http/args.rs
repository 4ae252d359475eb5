//! Command-line settings of the status server, health, alerts and run history.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use super::{Limits, Options, Thresholds};
use crate::duration::Dur;

/// `walship replicate` flags for the HTTP server and monitoring. `Debug` shows neither the
/// API token nor the webhook URLs.
#[derive(Clone, Args)]
pub struct HttpArgs {
    /// Serve /healthz, /health, /metrics, the admin API (/api/v1/) and the dashboard (/) on
    /// this address, e.g. 127.0.0.1:9090 (0.0.0.0:9090 for fly.io's health checks).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// File holding the bearer token of the admin API's snapshot and download endpoints
    /// (without one, and without WALSHIP_API_TOKEN, those endpoints are disabled).
    #[arg(long, value_name = "FILE")]
    pub api_token_file: Option<PathBuf>,
    /// The admin API's bearer token (prefer --api-token-file or the environment).
    #[arg(long, env = "WALSHIP_API_TOKEN", hide = true, hide_env_values = true)]
    pub api_token: Option<String>,
    /// POST alerts (JSON) to this URL when uploads fail repeatedly, when health turns
    /// warning or critical, and when it recovers. Repeatable.
    #[arg(long = "webhook", value_name = "URL")]
    pub webhooks: Vec<String>,
    /// Alert after this many failed rounds in a row.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub alert_after_failures: u64,
    /// /health says warning when the newest restorable point is older than this.
    #[arg(long, default_value = "1m")]
    pub health_warn_age: Dur,
    /// /health says critical (HTTP 503) when the newest restorable point is older than this.
    #[arg(long, default_value = "5m")]
    pub health_critical_age: Dur,
    /// /health says warning when WAL has been piling up after the newest snapshot for longer
    /// than this (default: 2 x --snapshot-interval + 1m).
    #[arg(long)]
    pub health_snapshot_warn_age: Option<Dur>,
    /// ... and critical past this (default: 4 x --snapshot-interval + 5m).
    #[arg(long)]
    pub health_snapshot_critical_age: Option<Dur>,
    /// Directory of the run history (default: `<DB>-walship` beside the database).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// HTTP connections served at once; more are closed as soon as they are accepted.
    /// Lowered under a small limit of open files, so clients never take the descriptors
    /// replication needs.
    #[arg(long, default_value_t = 64, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub http_max_connections: u64,
    /// Close an HTTP connection whose request header is not complete this long after it
    /// opened (or after the first byte of a later request).
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub http_header_timeout: Dur,
    /// Close an HTTP connection that waits this long for its next request, or whose
    /// response moves no byte for this long.
    #[arg(long, default_value = "60s", value_name = "DURATION")]
    pub http_idle_timeout: Dur,
    /// Answer 503 to a request whose handler has not answered within this (the snapshot and
    /// download endpoints take longest).
    #[arg(long, default_value = "10m", value_name = "DURATION")]
    pub http_request_timeout: Dur,
}

impl std::fmt::Debug for HttpArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpArgs")
            .field("listen", &self.listen)
            .field("api_token_file", &self.api_token_file)
            .field("api_token", &self.api_token.as_ref().map(|_| "<redacted>"))
            .field("webhooks", &self.webhooks.len())
            .finish_non_exhaustive()
    }
}

impl HttpArgs {
    /// The options these flags give.
    pub fn options(&self, snapshot_interval: Duration) -> Result<Options> {
        let api_token = match (&self.api_token_file, &self.api_token) {
            (Some(path), _) => Some(read_token(path)?),
            (None, Some(t)) if !t.trim().is_empty() => {
                let t = t.trim().to_string();
                anyhow::ensure!(
                    t.len() >= MIN_TOKEN_LEN,
                    "WALSHIP_API_TOKEN is shorter than {MIN_TOKEN_LEN} characters (generate one with `openssl rand -hex 32`)"
                );
                Some(t)
            }
            _ => None,
        };
        for (i, url) in self.webhooks.iter().enumerate() {
            crate::redact::register_url(url);
            let ok = reqwest::Url::parse(url)
                .map(|u| matches!(u.scheme(), "http" | "https"))
                .unwrap_or(false);
            // The URL is not shown: its path or query may hold a token.
            anyhow::ensure!(
                ok,
                "--webhook number {} is not an http:// or https:// URL",
                i + 1
            );
        }
        let mut thresholds = Thresholds::for_snapshot_interval(snapshot_interval);
        thresholds.point_warn = self.health_warn_age.0;
        thresholds.point_critical = self.health_critical_age.0;
        if let Some(d) = self.health_snapshot_warn_age {
            thresholds.snapshot_warn = d.0;
        }
        if let Some(d) = self.health_snapshot_critical_age {
            thresholds.snapshot_critical = d.0;
        }
        anyhow::ensure!(
            thresholds.point_warn <= thresholds.point_critical,
            "--health-warn-age must not exceed --health-critical-age"
        );
        for (flag, d) in [
            ("--http-header-timeout", self.http_header_timeout.0),
            ("--http-idle-timeout", self.http_idle_timeout.0),
            ("--http-request-timeout", self.http_request_timeout.0),
        ] {
            anyhow::ensure!(!d.is_zero(), "{flag} must be longer than 0 s");
        }
        let limits = Limits {
            max_connections: usize::try_from(self.http_max_connections).unwrap_or(usize::MAX),
            header_timeout: self.http_header_timeout.0,
            idle_timeout: self.http_idle_timeout.0,
            request_timeout: self.http_request_timeout.0,
        };
        Ok(Options {
            thresholds,
            limits,
            api_token,
            webhooks: self.webhooks.clone(),
            alert_after_failures: self.alert_after_failures.max(1),
            ..Options::default()
        })
    }
}

const MIN_TOKEN_LEN: usize = 16;

fn read_token(path: &std::path::Path) -> Result<String> {
    let s = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --api-token-file {}", path.display()))?;
    let t = s.trim().to_string();
    crate::redact::register(&t);
    anyhow::ensure!(
        t.len() >= MIN_TOKEN_LEN,
        "the API token in {} is shorter than {MIN_TOKEN_LEN} characters (generate one with `openssl rand -hex 32`)",
        path.display()
    );
    Ok(t)
}
