//! The dashboard in a real browser: Debian's headless Chromium loads `/` from a running
//! `walship replicate --listen`, its script renders the health, the lag, the chart of
//! backup runs and the table of latest runs, and the test asserts on the rendered DOM and
//! saves a screenshot in target/test-output/dashboard.png.
//!
//! Chromium comes from `scripts/test-deps.sh` (apt-get install chromium); WALSHIP_CHROMIUM
//! points at another binary.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;
mod http_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http_support::*;

fn chromium() -> PathBuf {
    let p = std::env::var_os("WALSHIP_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        p.exists(),
        "{} is missing: run scripts/test-deps.sh (it installs Debian's chromium), or set WALSHIP_CHROMIUM",
        p.display()
    );
    p
}

fn output_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir = target.join("test-output");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs headless Chromium on `url` with `extra` flags; returns its stdout.
fn run_chromium(url: &str, profile: &Path, extra: &[String]) -> String {
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
            "--window-size=1280,1000",
            // Lets the page's script run (and its timers fire) before the DOM is taken.
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).unwrap_or_default();
        s
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let out = reader.join().unwrap();
            if !st.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    std::io::Read::read_to_string(&mut e, &mut err).unwrap_or_default();
                }
                panic!("chromium failed ({st}):\n{err}");
            }
            return out;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn dashboard_renders_in_headless_chromium() {
    let mut s = start(&[]);
    // Some history: WAL batches and a snapshot asked for through the API.
    for _ in 0..3 {
        insert_rows(&s.db, 100);
        std::thread::sleep(Duration::from_millis(300));
    }
    let r = client()
        .post(format!("{}/api/v1/databases/app/snapshot", s.base))
        .bearer_auth(TOKEN)
        .body("{\"reason\": \"dashboard\"}")
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    s.wait_json(
        "/api/v1/databases/app/history",
        "two snapshot runs",
        Duration::from_secs(10),
        |v| {
            v["runs"]
                .as_array()
                .is_some_and(|r| r.iter().filter(|r| r["kind"] == "snapshot").count() >= 2)
        },
    );

    let profile = tempfile::tempdir().unwrap();
    let url = format!("{}/", s.base);
    let dom = run_chromium(&url, profile.path(), &["--dump-dom".to_string()]);
    let out = output_dir();
    std::fs::write(out.join("dashboard.html"), &dom).unwrap();
    for want in [
        "data-rendered=\"true\"",
        "id=\"overall\" class=\"badge healthy\"",
        "class=\"card db\" data-db=\"app\" data-status=\"healthy\"",
        "Replication lag",
        "Newest restorable point",
        "Backups (snapshots)",
        "<svg class=\"chart\"",
        "class=\"run run-snapshot",
        "class=\"run run-sync",
        "snapshot (new_generation)",
        "snapshot (api: dashboard)",
        "class=\"result-ok\"",
        &s.db.display().to_string(),
    ] {
        assert!(
            dom.contains(want),
            "the rendered dashboard lacks `{want}`; DOM saved in {}",
            out.join("dashboard.html").display()
        );
    }
    assert!(!dom.contains("cannot render"), "the script failed: {dom}");

    let shot = out.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    run_chromium(
        &url,
        profile.path(),
        &[format!("--screenshot={}", shot.display())],
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        png.len() > 20_000,
        "screenshot suspiciously small: {} bytes",
        png.len()
    );
    println!("dashboard screenshot: {}", shot.display());
    s.stop();
}
