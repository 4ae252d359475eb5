//! Webhook alerts: a JSON POST to each configured URL, from a task of its own.
//!
//! Monitors hand alerts over with [`AlertSender::send`], which never waits: when the queue
//! is full (a webhook far behind) the alert is dropped with a warning. Each delivery is
//! retried with backoff on connection errors, timeouts, 408, 429 and 5xx answers; other
//! 4xx answers are final. The payload has a `text` field, so Slack-style incoming webhooks
//! show it as is.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::sync::mpsc;

/// Delays between attempts: 5 attempts over about 15 s.
pub const DEFAULT_BACKOFF: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];

/// Alerts waiting for delivery before new ones are dropped.
const QUEUE: usize = 64;

/// One alert.
#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    /// `upload_failing`, `upload_recovered`, `health_warning`, `health_critical`,
    /// `lease_lost` (critical: another replicator took the replica over and this one
    /// stopped), `health_recovered`.
    pub event: &'static str,
    pub db: String,
    pub path: String,
    pub replica: String,
    /// Health now: healthy, warning, critical.
    pub status: &'static str,
    pub previous: &'static str,
    /// One line for people.
    pub text: String,
    pub time: String,
    pub time_ms: i64,
    pub host: String,
    /// The database's `/health` entry.
    pub health: serde_json::Value,
}

/// Hands alerts to the delivery task.
#[derive(Debug)]
pub struct AlertSender {
    tx: Mutex<Option<mpsc::Sender<Alert>>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl AlertSender {
    /// Starts the delivery task (none without URLs).
    pub fn spawn(urls: Vec<String>, backoff: Vec<Duration>) -> Result<AlertSender> {
        if urls.is_empty() {
            return Ok(AlertSender {
                tx: Mutex::new(None),
                task: Mutex::new(None),
            });
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("walship/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("cannot set up the webhook HTTP client")?;
        let (tx, mut rx) = mpsc::channel::<Alert>(QUEUE);
        let task = tokio::spawn(async move {
            while let Some(alert) = rx.recv().await {
                let body = match serde_json::to_vec(&alert) {
                    Ok(b) => bytes::Bytes::from(b),
                    Err(_) => continue,
                };
                let sends = urls
                    .iter()
                    .map(|url| deliver(&client, url, body.clone(), &backoff, &alert));
                futures::future::join_all(sends).await;
            }
        });
        Ok(AlertSender {
            tx: Mutex::new(Some(tx)),
            task: Mutex::new(Some(task)),
        })
    }

    /// Queues an alert; never waits.
    pub fn send(&self, alert: Alert) {
        let Ok(tx) = self.tx.lock() else { return };
        let Some(tx) = tx.as_ref() else { return };
        tracing::info!(db = %alert.db, event = alert.event, text = %alert.text, "alert");
        if let Err(e) = tx.try_send(alert) {
            tracing::warn!(error = %e, "webhook queue full; alert dropped");
        }
    }

    /// Stops taking alerts and waits up to `deadline` for the queued ones.
    pub async fn close(&self, deadline: Duration) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(mut task) = task
            && tokio::time::timeout(deadline, &mut task).await.is_err()
        {
            tracing::warn!("webhook deliveries still pending at shutdown; dropped");
            task.abort();
        }
    }
}

async fn deliver(
    client: &reqwest::Client,
    url: &str,
    body: bytes::Bytes,
    backoff: &[Duration],
    alert: &Alert,
) {
    let shown = redact(url);
    for attempt in 0..=backoff.len() {
        let r = client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await;
        let retry = match r {
            Ok(resp) if resp.status().is_success() => {
                tracing::debug!(url = %shown, event = alert.event, attempt, "webhook delivered");
                return;
            }
            Ok(resp) => {
                let st = resp.status();
                let retry = st.is_server_error()
                    || st == reqwest::StatusCode::TOO_MANY_REQUESTS
                    || st == reqwest::StatusCode::REQUEST_TIMEOUT;
                tracing::warn!(url = %shown, event = alert.event, attempt, status = st.as_u16(), retry, "webhook refused");
                retry
            }
            Err(e) => {
                tracing::warn!(url = %shown, event = alert.event, attempt, error = %e.without_url(), "webhook failed");
                true
            }
        };
        if !retry {
            return;
        }
        match backoff.get(attempt) {
            Some(d) => tokio::time::sleep(*d).await,
            None => break,
        }
    }
    tracing::error!(url = %shown, event = alert.event, "webhook not delivered; giving up");
}

/// The URL without its path and query, which may hold a secret (Slack-style webhooks).
fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}{}/...",
            u.scheme(),
            u.host_str().unwrap_or(""),
            u.port().map(|p| format!(":{p}")).unwrap_or_default()
        ),
        Err(_) => "<invalid url>".into(),
    }
}

/// This machine's name, for alerts (fly.io's machine and app names when set).
pub fn host_name() -> String {
    if let (Ok(app), Ok(machine)) = (
        std::env::var("FLY_APP_NAME"),
        std::env::var("FLY_MACHINE_ID"),
    ) {
        return format!("{app}/{machine}");
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_the_secret_part_of_a_webhook_url() {
        assert_eq!(
            redact("https://hooks.example.com/services/T000/B000/XXXX?token=y"),
            "https://hooks.example.com/..."
        );
        assert_eq!(redact("http://127.0.0.1:9/a"), "http://127.0.0.1:9/...");
    }
}
