//! Keeping secrets out of everything walship prints.
//!
//! Two guards, installed by `main` before anything else runs:
//!
//! - [`sdk_cap`], a filter in front of every log filter: the AWS SDK's crates log each
//!   request's headers (the session token, the signature) and the canonical request at trace
//!   level, and the access key id at debug level, so their events are capped at INFO whatever
//!   the user asks for (`WALSHIP_LOG=trace`, even `aws_sigv4=trace`; `aws_config` at WARN, its
//!   INFO lines show the access key id of profile credentials). Temporary credentials
//!   from STS never pass through walship's own code, so this cap is what keeps them out.
//! - [`Stderr`], the log writer: every log line is scrubbed of every secret walship was given
//!   before it is written; so are the final error line and panic messages. Secrets are
//!   [`register`]ed where they are read: the AWS keys and session token of the environment and
//!   of walship.toml, encryption keys, the API token, and webhook URLs' credentials.
//!
//! The first line of defence stays where secrets are handled: errors never format a
//! credential, URLs with credentials are refused without echoing them, and `Debug` of
//! anything holding one prints `<redacted>`.

use std::io::{self, Write};
use std::sync::RwLock;

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;

/// What a secret is replaced with.
const MASK: &str = "<redacted>";

/// Shorter values are not scrubbed: they would mask ordinary words, and the other guards
/// still keep them out of errors and SDK logs.
const MIN_LEN: usize = 8;

/// Log targets (matched by prefix, the longest match wins) and the most they may log: every
/// crate of the AWS SDK (`aws_sigv4`, `aws_smithy_runtime`, `aws_sdk_s3`, ...) at INFO, and
/// `aws_config`, whose INFO lines show the access key id of profile credentials, at WARN.
const CAPPED: &[(&str, LevelFilter)] = &[
    ("aws_", LevelFilter::INFO),
    ("aws_config", LevelFilter::WARN),
];

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Adds `secret` (and its percent-encoded form) to what every log line is scrubbed of.
pub fn register(secret: &str) {
    let secret = secret.trim();
    if secret.len() < MIN_LEN {
        return;
    }
    let Ok(mut all) = SECRETS.write() else {
        return;
    };
    for form in [secret.to_string(), percent_encoded(secret)] {
        if !all.contains(&form) {
            all.push(form);
        }
    }
    // Longest first, so a secret that contains another is masked whole.
    all.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// Registers the secrets the environment holds for walship and the AWS SDK.
pub fn register_env() {
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN",
        "WALSHIP_API_TOKEN",
        "WALSHIP_ENCRYPTION_KEY",
    ] {
        if let Ok(v) = std::env::var(var) {
            register(&v);
        }
    }
    if let Ok(list) = std::env::var("WALSHIP_DECRYPTION_KEYS") {
        list.split(',').for_each(register);
    }
}

/// Registers the parts of a webhook URL that may be secret: the password, the query's
/// values, and the long path segments (Slack-style URLs carry their token in the path).
pub fn register_url(url: &str) {
    let Ok(u) = reqwest::Url::parse(url) else {
        return;
    };
    if let Some(p) = u.password() {
        register(p);
    }
    for (_, v) in u.query_pairs() {
        register(&v);
    }
    for segment in u.path_segments().into_iter().flatten() {
        if segment.len() >= 16 {
            register(segment);
        }
    }
}

/// `text` with every registered secret replaced by `<redacted>`.
pub fn scrub(text: &str) -> String {
    let Ok(all) = SECRETS.read() else {
        return text.to_string();
    };
    let mut out = text.to_string();
    for secret in all.iter() {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), MASK);
        }
    }
    out
}

/// The filter that caps the AWS SDK's logging ([`CAPPED`]); layered over the user's filter.
pub fn sdk_cap() -> Targets {
    CAPPED.iter().fold(
        Targets::new().with_default(LevelFilter::TRACE),
        |t, (target, level)| t.with_target(*target, *level),
    )
}

/// The log writer: standard error, each event scrubbed of secrets as a whole.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Event;

    fn make_writer(&'a self) -> Event {
        Event(Vec::new())
    }
}

/// One formatted event, written to standard error when dropped.
#[derive(Debug)]
pub struct Event(Vec<u8>);

impl Write for Event {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let text = scrub(&String::from_utf8_lossy(&self.0));
        let _ = io::stderr().lock().write_all(text.as_bytes());
    }
}

/// Replaces the panic hook with one that scrubs the message before printing it.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("<unnamed>");
        let mut err = io::stderr().lock();
        let _ = writeln!(err, "thread '{name}' {}", scrub(&info.to_string()));
        let trace = std::backtrace::Backtrace::capture();
        if trace.status() == std::backtrace::BacktraceStatus::Captured {
            let _ = writeln!(err, "{}", scrub(&trace.to_string()));
        }
    }));
}

fn percent_encoded(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_secrets_are_scrubbed_in_every_form() {
        register("wJalr/Test+Secret9Key");
        register("short");
        let line = "key=wJalr/Test+Secret9Key q=wJalr%2FTest%2BSecret9Key short";
        assert_eq!(scrub(line), "key=<redacted> q=<redacted> short");
    }

    #[test]
    fn a_webhook_url_registers_its_password_token_and_long_path_segments() {
        register_url(
            "https://hookuser:HookPassw0rd@hooks.example.com/services/T0H00K/B0H00K/HookPathSecret0123?token=HookQueryT0ken",
        );
        let s = scrub("HookPassw0rd HookPathSecret0123 HookQueryT0ken services hookuser");
        assert_eq!(s, "<redacted> <redacted> <redacted> services hookuser");
    }

    #[test]
    fn the_sdk_cap_stops_debug_and_trace_of_the_aws_crates_only() {
        let cap = sdk_cap();
        assert!(!cap.would_enable("aws_sigv4::http_request::sign", &tracing::Level::TRACE));
        assert!(!cap.would_enable("aws_smithy_runtime::client", &tracing::Level::DEBUG));
        assert!(cap.would_enable("aws_smithy_runtime::client", &tracing::Level::INFO));
        assert!(cap.would_enable("aws_config::meta", &tracing::Level::WARN));
        assert!(!cap.would_enable("aws_config::profile", &tracing::Level::INFO));
        assert!(cap.would_enable("walship_engine::replicate", &tracing::Level::TRACE));
    }
}
