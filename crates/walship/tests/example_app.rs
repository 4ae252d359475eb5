//! The library example (`examples/app.rs`) end to end: it restores at startup, replicates
//! in the background, serves writes over HTTP, and makes a final sync on SIGTERM. The app
//! runs as a separate process (this test binary, re-executed, running the example's code).

#![allow(clippy::unwrap_used)]

mod common;

#[allow(dead_code)]
#[path = "../examples/app.rs"]
mod app;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use walship_storage::testkit::MotoServer;

const APP_ENV: &str = "WALSHIP_EXAMPLE_APP";

/// The app's process body; a no-op unless started by [`start_app`].
#[test]
fn example_app_child() {
    let Ok(args) = std::env::var(APP_ENV) else {
        return;
    };
    let args: Vec<String> = args.split('\n').map(str::to_string).collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    if let Err(e) = rt.block_on(app::run(args)) {
        eprintln!("app failed: {e:#}");
        std::process::exit(1);
    }
}

struct App {
    child: Child,
    addr: String,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

fn start_app(db: &Path, url: &str, s3: bool) -> App {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        "example_app_child",
        "--nocapture",
        "--test-threads",
        "1",
    ])
    .env(APP_ENV, format!("{}\n{url}\n127.0.0.1:0", db.display()))
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    if s3 {
        cmd.env_remove("AWS_CA_BUNDLE")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true");
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let l = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("listening on ") {
                let _ = tx.send(a.to_string());
            }
            let mut g = l.lock().unwrap();
            g.push_str(&line);
            g.push('\n');
        }
    });
    let addr = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(a) => a,
        Err(_) => {
            let _ = child.kill();
            panic!("the app did not start: {}", log.lock().unwrap());
        }
    };
    App { child, addr, log }
}

impl App {
    fn post(&self, note: &str, durable: bool) -> i64 {
        let url = format!(
            "http://{}/notes{}",
            self.addr,
            if durable { "?durable=1" } else { "" }
        );
        let r = reqwest::blocking::Client::new()
            .post(url)
            .body(note.to_string())
            .send()
            .unwrap();
        assert!(r.status().is_success(), "{:?}", r.status());
        r.text().unwrap().trim().parse().unwrap()
    }

    fn notes(&self) -> Vec<String> {
        reqwest::blocking::get(format!("http://{}/notes", self.addr))
            .unwrap()
            .text()
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn stop(mut self) -> String {
        signal(&self.child, "-TERM");
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                let log = self.log.lock().unwrap().clone();
                assert!(st.success(), "the app failed: {log}");
                return log;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the app did not stop: {}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn notes_in(db: &Path) -> Vec<String> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut st = c.prepare("SELECT id, body FROM notes ORDER BY id").unwrap();
    st.query_map([], |r| {
        Ok(format!(
            "{}\t{}",
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?
        ))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

fn round_trip(url: &str, dir: &Path, s3: bool) {
    let db = dir.join("notes.db");
    // First boot: nothing to restore; write, some durably, some not, then SIGTERM.
    let app = start_app(&db, url, s3);
    for i in 0..10 {
        app.post(&format!("note {i}"), i % 3 == 0);
    }
    let log = app.stop();
    assert!(log.contains("no backup yet"), "{log}");
    assert!(log.contains("stopped; replica at position"), "{log}");

    // The machine is lost; the next boot restores before serving.
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(std::path::PathBuf::from(p));
    }
    let app = start_app(&db, url, s3);
    let notes = app.notes();
    assert_eq!(notes.len(), 10, "{notes:?}");
    assert_eq!(notes[9], "10\tnote 9");
    let id = app.post("after the restore", false);
    assert_eq!(id, 11);
    let log = app.stop();
    assert!(log.contains("restored"), "{log}");

    // Everything, including the last note written just before SIGTERM, is in the replica.
    let out = dir.join("restored.db");
    restore_ok(url, &out);
    let got = notes_in(&out);
    assert_eq!(got.len(), 11);
    assert_eq!(got[10], "11\tafter the restore");
}

#[test]
fn the_example_app_restores_serves_replicates_and_syncs_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    round_trip(&file_url(&dir.path().join("replica")), dir.path(), false);
}

#[test]
fn the_example_app_works_against_s3() {
    let dir = tempfile::tempdir().unwrap();
    let moto = MotoServer::shared();
    let url = moto
        .url(moto.bucket(), &MotoServer::unique_prefix("example-app"))
        .to_string();
    round_trip(&url, dir.path(), true);
}
