//! Helpers of the HTTP end-to-end tests: a `walship replicate --listen 127.0.0.1:0` on a
//! fresh database and a local replica, its address read from its log, a blocking client,
//! and a way to make the replica fail and come back.

#![allow(dead_code, clippy::unwrap_used, clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::common::{Replicator, create_db, file_url, tail};

/// A running replicator with its HTTP server.
pub struct Server {
    pub rep: Option<Replicator>,
    pub base: String,
    pub db: PathBuf,
    pub replica: PathBuf,
    pub url: String,
    pub log: PathBuf,
    pub dir: tempfile::TempDir,
}

/// The test API token.
pub const TOKEN: &str = "test-token-0123456789abcdef";

/// Starts `walship replicate DB file:///... --listen 127.0.0.1:0 EXTRA...` on a new database
/// with 100 rows, and waits for its first sync and its HTTP server.
pub fn start(extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    create_db(&db);
    insert_rows(&db, 100);
    let replica = dir.path().join("replica");
    let url = file_url(&replica);
    let log = dir.path().join("replicate.log");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mut args: Vec<String> = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--sync-interval".into(),
        "200ms".into(),
    ];
    if !extra.contains(&"--no-token") {
        args.push("--api-token-file".into());
        args.push(token_file.display().to_string());
    }
    args.extend(
        extra
            .iter()
            .filter(|a| **a != "--no-token")
            .map(|s| s.to_string()),
    );
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let rep = Replicator::start(&db, &url, &argv, &log);
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        let text = strip_ansi(&std::fs::read_to_string(&log).unwrap_or_default());
        // Up once the server answers and the first sync is done (whatever the log says).
        if let Some(a) = listen_addr(&text)
            && first_sync_done(&a)
        {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "replicate did not start its HTTP server; log:\n{}",
            tail(&log)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    Server {
        rep: Some(rep),
        base: format!("http://{addr}"),
        db,
        replica,
        url,
        log,
        dir,
    }
}

impl Server {
    pub fn get(&self, path: &str) -> reqwest::blocking::Response {
        client().get(format!("{}{path}", self.base)).send().unwrap()
    }

    pub fn json(&self, path: &str) -> serde_json::Value {
        let r = self.get(path);
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().unwrap()
    }

    /// Polls `path` until `ok` holds for its JSON, or panics with the last one.
    pub fn wait_json(
        &self,
        path: &str,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.get(path);
            let v: serde_json::Value = r.json().unwrap_or_default();
            if ok(&v) {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what} at {path}; last answer:\n{v:#}\nlog:\n{}",
                    tail(&self.log)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Makes every upload fail: the replica directory is moved away and a file put in its
    /// place.
    pub fn break_replica(&self) {
        std::fs::rename(&self.replica, self.replica.with_extension("off")).unwrap();
        std::fs::write(&self.replica, b"not a directory").unwrap();
    }

    /// Undoes [`Server::break_replica`].
    pub fn fix_replica(&self) {
        std::fs::remove_file(&self.replica).unwrap();
        std::fs::rename(self.replica.with_extension("off"), &self.replica).unwrap();
    }

    /// SIGTERM; asserts a clean exit.
    pub fn stop(&mut self) {
        if let Some(rep) = self.rep.take() {
            let st = rep.terminate(Duration::from_secs(30));
            assert!(st.success(), "replicate failed: {}", tail(&self.log));
        }
    }
}

fn first_sync_done(addr: &str) -> bool {
    let Ok(r) = client()
        .get(format!("http://{addr}/api/v1/status"))
        .timeout(Duration::from_secs(2))
        .send()
    else {
        return false;
    };
    let v: serde_json::Value = r.json().unwrap_or_default();
    v["databases"]
        .as_array()
        .is_some_and(|d| !d.is_empty() && d.iter().all(|d| d["last_synced"].is_string()))
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The address in the "HTTP server listening addr=..." log line.
pub fn listen_addr(log: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains("HTTP server listening"))?;
    let at = line.find("addr=")? + 5;
    Some(line[at..].split_whitespace().next()?.to_string())
}

pub fn insert_rows(db: &Path, n: usize) {
    let c = Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    for _ in 0..n {
        c.execute("INSERT INTO t(v) VALUES (randomblob(300))", [])
            .unwrap();
    }
}

pub fn count_rows(db: &Path) -> i64 {
    Connection::open(db)
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap()
}

/// The value of a Prometheus sample `name{labels}` (labels as printed), if present.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}
