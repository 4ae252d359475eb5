//! Replication never shares a fate with its HTTP clients. Under a limit of 256 open files,
//! hundreds of connections that send nothing (and some that send half a header) must not
//! take the descriptors replication needs: the app's rows keep reaching the replica while
//! they hang on, the idle ones are closed by the header timeout so a fresh client gets its
//! `/health` again, and SIGTERM with hundreds of them connected still ends in a final sync
//! that ships every committed row and exit 0.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use walship_storage::testkit::MotoServer;

use crate::common::*;

use crate::http_support;

/// The open-files limit walship runs under: what a small container might give it.
const NOFILE: u64 = 256;
/// Idle connections kept open against it; 240 of them exhausted it before.
const CROWD: usize = 300;
const HEADER_TIMEOUT: &str = "3s";

#[test]
fn writer_child() {
    writer_main_if_child();
}

#[test]
fn idle_http_clients_never_stop_replication_on_a_local_dir() {
    let dir = tempfile::tempdir().unwrap();
    let url = file_url(&dir.path().join("replica"));
    crowded_replication(dir.path(), &url, 0x6874_7470);
}

#[test]
fn idle_http_clients_never_stop_replication_on_s3() {
    let moto = MotoServer::shared();
    let dir = tempfile::tempdir().unwrap();
    let url = moto
        .url(moto.bucket(), &MotoServer::unique_prefix("http-clients"))
        .to_string();
    crowded_replication(dir.path(), &url, 0x6874_7471);
}

fn crowded_replication(dir: &Path, url: &str, seed: u64) {
    let db = dir.join("app.db");
    create_db(&db);
    let log = dir.join("replicate.log");
    let rep = start_limited(&db, url, &log);
    let addr = wait_until_up(&log);

    // An app writes while a crowd of idle clients keeps coming back.
    let wlog = dir.join("writer.log");
    let spec = WriterSpec {
        db: db.clone(),
        seed,
        duration: Duration::from_secs(10),
        rate: 50,
        autocheckpoint: 1000,
        checkpoint_every: 0,
        vacuum_every: 0,
        long_reader: false,
        reopen_every: 0,
        log: wlog.clone(),
    };
    let mut writer = spawn_writer(&spec, "http_clients::writer_child");
    let crowd = Crowd::keep_coming(addr);
    assert!(writer.wait().unwrap().success(), "the writer failed");
    let committed = last_committed(&wlog);
    assert!(committed >= 100, "the writer committed only {committed}");

    // Replication keeps up while the crowd is still there.
    let fds = open_descriptors(&rep);
    let t0 = Instant::now();
    let caught_up = wait_restorable(url, dir, seed, committed, Duration::from_secs(60));
    eprintln!(
        "{url}: {committed} transactions; walship held {fds} descriptors under a crowd of \
         {CROWD}; the replica had them all {} ms after the writer stopped",
        t0.elapsed().as_millis()
    );
    let crowd = crowd.stop();
    assert_eq!(
        caught_up,
        committed,
        "the replica stopped at transaction {caught_up} of {committed} while idle HTTP clients \
         were connected (walship held {fds} descriptors); log:\n{}",
        tail(&log)
    );

    // The crowd goes quiet: the header timeout closes every idle connection, and a fresh
    // client is served again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while crowd.still_open() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} of {} idle connections still open 30 s after their last byte; log:\n{}",
            crowd.still_open(),
            crowd.conns.len(),
            tail(&log)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let health = http_support::client()
        .get(format!("http://{addr}/health"))
        .timeout(Duration::from_secs(10))
        .send()
        .unwrap_or_else(|e| panic!("/health after the idle clients left: {e}"));
    assert_eq!(health.status().as_u16(), 200, "{:?}", health.text());

    // SIGTERM with a crowd connected: the final sync ships everything, exit 0.
    let crowd = Crowd::connect(addr, CROWD);
    let last = commit_more(&db, seed, committed, 20);
    let st = rep.terminate(Duration::from_secs(60));
    let still_open = crowd.still_open();
    assert!(
        st.success(),
        "walship exited with {st} when stopped with {still_open} idle HTTP clients; log:\n{}",
        tail(&log)
    );
    let out = dir.join("final.db");
    restore_ok(url, &out);
    let got = assert_prefix_state(&out, seed, "after SIGTERM with idle clients");
    assert_eq!(
        got,
        last,
        "the replica holds {got} of {last} transactions; log:\n{}",
        tail(&log)
    );
}

/// `walship replicate DB URL --listen 127.0.0.1:0` under a limit of [`NOFILE`] open files
/// (soft and hard: it cannot raise it).
fn start_limited(db: &Path, url: &str, log: &Path) -> Replicator {
    let f = std::fs::File::create(log).unwrap();
    let mut cmd = walship();
    cmd.arg("replicate")
        .arg(db)
        .arg(url)
        .args(["--listen", "127.0.0.1:0", "--sync-interval", "200ms"])
        .args(["--http-header-timeout", HEADER_TIMEOUT])
        .args(["--shutdown-timeout", "60s"])
        .stdout(Stdio::null())
        .stderr(f);
    // SAFETY: between fork and exec the child only calls setrlimit, which is
    // async-signal-safe, on a struct of its own stack.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| {
            let r = libc::rlimit {
                rlim_cur: NOFILE as libc::rlim_t,
                rlim_max: NOFILE as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Replicator {
        child: cmd.spawn().unwrap(),
        log: log.to_path_buf(),
    }
}

/// The server's address, once it answers and the first sync is done.
fn wait_until_up(log: &Path) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = http_support::strip_ansi(&std::fs::read_to_string(log).unwrap_or_default());
        if let Some(a) = http_support::listen_addr(&text) {
            let synced = http_support::client()
                .get(format!("http://{a}/api/v1/status"))
                .timeout(Duration::from_secs(2))
                .send()
                .ok()
                .and_then(|r| r.json::<serde_json::Value>().ok())
                .is_some_and(|v| v["databases"][0]["last_synced"].is_string());
            if synced {
                return a.parse().unwrap();
            }
        }
        assert!(
            Instant::now() < deadline,
            "walship did not come up; log:\n{}",
            tail(log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Restores until the replica holds transaction `want` (or `within` passes); returns the
/// last transaction restored.
fn wait_restorable(url: &str, dir: &Path, seed: u64, want: u64, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    let mut n = 0;
    loop {
        n += 1;
        let out = dir.join(format!("mid-{n}.db"));
        let got = if restore(url, &out, &[]).status.success() {
            assert_prefix_state(&out, seed, "restore while idle clients are connected")
        } else {
            0
        };
        let _ = std::fs::remove_file(&out);
        if got >= want || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Commits transactions `from + 1 ..= from + n` of the writer's sequence; returns the last.
fn commit_more(db: &Path, seed: u64, from: u64, n: u64) -> u64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    for i in from + 1..=from + n {
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        apply_txn(&conn, seed, i);
        conn.execute_batch("COMMIT").unwrap();
    }
    from + n
}

fn open_descriptors(rep: &Replicator) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", rep.child.id()))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Connections that never finish a request: most send nothing, every tenth half a header.
struct Crowd {
    addr: SocketAddr,
    conns: Vec<TcpStream>,
}

impl Crowd {
    fn connect(addr: SocketAddr, n: usize) -> Crowd {
        let mut c = Crowd {
            addr,
            conns: Vec::new(),
        };
        c.fill(n);
        c
    }

    fn fill(&mut self, n: usize) {
        while self.conns.len() < n {
            let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2)) else {
                return;
            };
            if self.conns.len().is_multiple_of(10) {
                let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: walship\r\n");
            }
            let _ = s.set_nonblocking(true);
            self.conns.push(s);
        }
    }

    /// Connections the server has not closed.
    fn still_open(&self) -> usize {
        self.conns.iter().filter(|s| !closed(s)).count()
    }

    /// A thread that keeps [`CROWD`] connections open, replacing every one the server
    /// closes once a second, until [`Comers::stop`].
    fn keep_coming(addr: SocketAddr) -> Comers {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut c = Crowd::connect(addr, CROWD);
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                c.conns.retain(|s| !closed(s));
                c.fill(CROWD);
            }
            c
        });
        Comers { stop, thread }
    }
}

/// True when the server closed `s` (end of stream or an error).
fn closed(mut s: &TcpStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

struct Comers {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Crowd>,
}

impl Comers {
    /// Stops replacing connections; returns those still held.
    fn stop(self) -> Crowd {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}
