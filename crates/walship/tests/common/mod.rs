//! Harness for end-to-end tests: a deterministic writer (run as a separate process by
//! re-executing the test binary), the expected state after any prefix of its transactions,
//! and helpers to run `walship` and check a restored database.

#![allow(dead_code, clippy::unwrap_used, clippy::print_stdout)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rusqlite::Connection;

/// The `walship` binary under test.
pub fn walship_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_walship"))
}

/// A `walship` command with a clean environment for tests.
pub fn walship() -> Command {
    let mut c = Command::new(walship_bin());
    c.env_remove("AWS_CA_BUNDLE")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        // WALSHIP_TEST_LOG=debug to see more in a failing test's replicator log.
        .env(
            "WALSHIP_LOG",
            std::env::var("WALSHIP_TEST_LOG").unwrap_or_else(|_| "info".into()),
        );
    c
}

/// splitmix64: a small deterministic generator.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// The schema every writer uses.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB NOT NULL);
     CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, n INTEGER NOT NULL);
     CREATE INDEX IF NOT EXISTS t_v ON t(substr(v, 1, 8));";

/// Applies transaction `i` (1-based) of the sequence for `seed` inside an open transaction.
pub fn apply_txn(conn: &Connection, seed: u64, i: u64) {
    let mut r = Rng::new(seed.wrapping_mul(1_000_003).wrapping_add(i));
    let inserts = 1 + r.below(4);
    for _ in 0..inserts {
        let size = if r.chance(0.05) {
            6000 + r.below(20_000)
        } else {
            10 + r.below(600)
        } as usize;
        conn.execute("INSERT INTO t(v) VALUES (?1)", [r.bytes(size)])
            .unwrap();
    }
    if r.chance(0.3) {
        let pick = r.below(1 << 30) as i64;
        let len = 20 + r.below(300) as usize;
        let v = r.bytes(len);
        conn.execute(
            "UPDATE t SET v = ?1 WHERE id = (SELECT id FROM t ORDER BY id LIMIT 1 OFFSET (?2 % max(1, (SELECT count(*) FROM t))))",
            rusqlite::params![v, pick],
        )
        .unwrap();
    }
    if r.chance(0.05) {
        let m = 7 + r.below(20) as i64;
        conn.execute("DELETE FROM t WHERE id % ?1 = 0", [m])
            .unwrap();
    }
    conn.execute(
        "INSERT OR REPLACE INTO meta(k, n) VALUES ('last', ?1)",
        [i as i64],
    )
    .unwrap();
}

/// The expected logical content after transactions `1..=n` of `seed`.
pub fn expected_rows(seed: u64, n: u64) -> Vec<(i64, Vec<u8>)> {
    let conn = Connection::open_in_memory().unwrap();
    conn.execute_batch(SCHEMA).unwrap();
    for i in 1..=n {
        conn.execute_batch("BEGIN").unwrap();
        apply_txn(&conn, seed, i);
        conn.execute_batch("COMMIT").unwrap();
    }
    rows(&conn)
}

pub fn rows(conn: &Connection) -> Vec<(i64, Vec<u8>)> {
    let mut st = conn.prepare("SELECT id, v FROM t ORDER BY id").unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Reads a restored database: its last transaction number and rows.
pub fn restored_state(path: &Path) -> (u64, Vec<(i64, Vec<u8>)>) {
    let conn = Connection::open(path).unwrap();
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok", "integrity_check of {}", path.display());
    let last: i64 = conn
        .query_row("SELECT n FROM meta WHERE k = 'last'", [], |r| r.get(0))
        .unwrap_or(0);
    (last as u64, rows(&conn))
}

/// Asserts the restored database equals the state after some prefix of the writer's
/// transactions, and returns that prefix length.
pub fn assert_prefix_state(path: &Path, seed: u64, ctx: &str) -> u64 {
    let (last, got) = restored_state(path);
    let want = expected_rows(seed, last);
    if got != want {
        panic!(
            "{ctx}: restored database claims transaction {last} but its rows differ from the \
             state after {last} transactions ({} rows restored, {} expected)",
            got.len(),
            want.len()
        );
    }
    last
}

/// Settings of a writer process.
#[derive(Debug, Clone)]
pub struct WriterSpec {
    pub db: PathBuf,
    pub seed: u64,
    pub duration: Duration,
    /// Transactions per second; 0 = as fast as possible.
    pub rate: u64,
    /// `PRAGMA wal_autocheckpoint` (0 = off; SQLite's default is 1000).
    pub autocheckpoint: i64,
    /// Run `PRAGMA wal_checkpoint(MODE)` every this many transactions (0 = never), cycling
    /// through PASSIVE, FULL, RESTART, TRUNCATE.
    pub checkpoint_every: u64,
    /// Run VACUUM every this many transactions (0 = never).
    pub vacuum_every: u64,
    /// Hold a long read transaction on a second connection now and then.
    pub long_reader: bool,
    /// Close and reopen the connection every this many transactions (0 = never): an app
    /// closing its last connection checkpoints and deletes the WAL unless walship's shared
    /// lock stops it.
    pub reopen_every: u64,
    /// Where committed transaction numbers are appended.
    pub log: PathBuf,
}

pub const WRITER_ENV: &str = "WALSHIP_TEST_WRITER";

/// Starts the writer as a separate process (this test binary, re-executed).
pub fn spawn_writer(spec: &WriterSpec, test_name: &str) -> Child {
    let exe = std::env::current_exe().unwrap();
    Command::new(exe)
        .args(["--exact", test_name, "--nocapture", "--test-threads", "1"])
        .env(WRITER_ENV, "1")
        .env("WT_DB", &spec.db)
        .env("WT_SEED", spec.seed.to_string())
        .env("WT_DURATION_MS", spec.duration.as_millis().to_string())
        .env("WT_RATE", spec.rate.to_string())
        .env("WT_AUTOCKPT", spec.autocheckpoint.to_string())
        .env("WT_CKPT_EVERY", spec.checkpoint_every.to_string())
        .env("WT_VACUUM_EVERY", spec.vacuum_every.to_string())
        .env("WT_READER", if spec.long_reader { "1" } else { "0" })
        .env("WT_REOPEN_EVERY", spec.reopen_every.to_string())
        .env("WT_LOG", &spec.log)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn env_u64(k: &str) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The writer's body; a no-op unless this process was started by [`spawn_writer`].
pub fn writer_main_if_child() {
    if std::env::var(WRITER_ENV).is_err() {
        return;
    }
    let db = PathBuf::from(std::env::var("WT_DB").unwrap());
    let seed = env_u64("WT_SEED");
    let duration = Duration::from_millis(env_u64("WT_DURATION_MS"));
    let rate = env_u64("WT_RATE");
    let autockpt: i64 = std::env::var("WT_AUTOCKPT").unwrap().parse().unwrap();
    let ckpt_every = env_u64("WT_CKPT_EVERY");
    let vacuum_every = env_u64("WT_VACUUM_EVERY");
    let long_reader = std::env::var("WT_READER").as_deref() == Ok("1");
    let reopen_every = env_u64("WT_REOPEN_EVERY");
    let log_path = PathBuf::from(std::env::var("WT_LOG").unwrap());

    let open = || {
        let conn = Connection::open(&db).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        conn.pragma_update(None, "journal_mode", "wal").unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", autockpt)
            .unwrap();
        conn
    };
    let mut conn = open();
    conn.execute_batch(SCHEMA).unwrap();
    let mut reader = Connection::open(&db).unwrap();
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .unwrap();
    let last: i64 = conn
        .query_row("SELECT n FROM meta WHERE k = 'last'", [], |r| r.get(0))
        .unwrap_or(0);
    let mut i = last as u64;
    let start = Instant::now();
    let modes = ["PASSIVE", "FULL", "RESTART", "TRUNCATE"];
    let mut reading_until: Option<Instant> = None;
    let mut r = Rng::new(seed ^ 0xabcdef);
    while start.elapsed() < duration {
        i += 1;
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        apply_txn(&conn, seed, i);
        conn.execute_batch("COMMIT").unwrap();
        writeln!(log, "{i}").unwrap();
        if ckpt_every > 0 && i.is_multiple_of(ckpt_every) {
            let mode = modes[(i / ckpt_every % 4) as usize];
            // The app's own checkpoint: may be busy while the replicator pins; that is fine.
            let prev = conn.busy_timeout(Duration::from_millis(200));
            let _ = conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(()));
            let _ = prev;
            conn.busy_timeout(Duration::from_secs(10)).unwrap();
        }
        if reopen_every > 0 && i.is_multiple_of(reopen_every) && reading_until.is_none() {
            // Close every connection: the next open is the app's first again.
            drop(conn);
            drop(reader);
            conn = open();
            reader = Connection::open(&db).unwrap();
        }
        if vacuum_every > 0 && i.is_multiple_of(vacuum_every) {
            conn.execute_batch("VACUUM").unwrap();
        }
        if long_reader {
            match reading_until {
                None if r.chance(0.02) => {
                    reader.execute_batch("BEGIN").unwrap();
                    let _: i64 = reader
                        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                        .unwrap();
                    reading_until =
                        Some(Instant::now() + Duration::from_millis(300 + r.below(700)));
                }
                Some(t) if Instant::now() > t => {
                    reader.execute_batch("COMMIT").unwrap();
                    reading_until = None;
                }
                _ => {}
            }
        }
        if rate > 0 {
            let due = start + Duration::from_secs_f64((i - last as u64) as f64 / rate as f64);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
    }
    if reading_until.is_some() {
        reader.execute_batch("COMMIT").unwrap();
    }
    writeln!(log, "done {i}").unwrap();
    std::process::exit(0);
}

/// The last transaction the writer's log says was committed.
pub fn last_committed(log: &Path) -> u64 {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    s.lines()
        .rev()
        .find_map(|l| l.trim_start_matches("done ").parse().ok())
        .unwrap_or(0)
}

/// A running `walship replicate`.
pub struct Replicator {
    pub child: Child,
    pub log: PathBuf,
}

impl Replicator {
    pub fn start(db: &Path, url: &str, extra: &[&str], log: &Path) -> Replicator {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = walship()
            .arg("replicate")
            .arg(db)
            .arg(url)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap();
        Replicator {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(mut self, timeout: Duration) -> ExitStatus {
        signal(&self.child, libc_sigterm());
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "replicator did not exit within {timeout:?} of SIGTERM; log:\n{}",
                    tail(&self.log)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn libc_sigterm() -> &'static str {
    "-TERM"
}

/// Sends a signal to a child we started, by PID.
pub fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .arg(sig)
        .arg(child.id().to_string())
        .status();
}

pub fn tail(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Runs `walship restore` into `out`; panics with the output on failure.
pub fn restore(url: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    walship()
        .arg("restore")
        .arg("-o")
        .arg(out)
        .args(extra)
        .arg(url)
        .output()
        .unwrap()
}

pub fn restore_ok(url: &str, out: &Path) {
    let o = restore(url, out, &[]);
    assert!(
        o.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Creates a WAL-mode database with the writer's schema.
pub fn create_db(path: &Path) {
    let c = Connection::open(path).unwrap();
    c.pragma_update(None, "journal_mode", "wal").unwrap();
    c.execute_batch(SCHEMA).unwrap();
}

pub fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// A pseudo-terminal of 24 × 120: its master side, and the slave for a child's stderr.
#[allow(unsafe_code)]
pub fn pty() -> (std::fs::File, std::os::fd::OwnedFd) {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut master = -1;
    let mut slave = -1;
    let size = libc::winsize {
        ws_row: 24,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two new descriptors into `master` and `slave`; a null name and
    // termios are allowed, and `size` outlives the call.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened here and nothing else owns them.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            OwnedFd::from_raw_fd(slave),
        )
    }
}

/// Runs `cmd` with its stderr on a pseudo-terminal (stdin and stdout null) and returns its
/// status and everything it wrote there.
pub fn run_on_pty(mut cmd: Command) -> (ExitStatus, String) {
    use std::io::Read;
    let (mut master, slave) = pty();
    cmd.env("TERM", "xterm")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(slave));
    let mut child = cmd.spawn().unwrap();
    drop(cmd); // our copy of the slave side: the master reads EOF once the child is gone
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // Linux answers EIO on the master once every slave descriptor is closed.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let status = child.wait().unwrap();
    (status, reader.join().unwrap())
}
