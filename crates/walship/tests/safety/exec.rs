//! `replicate --exec` with an application that is a child of the shell, not the shell
//! itself: every forwarded signal reaches it, walship's final sync waits until it is gone
//! (or killed at the shutdown deadline), and walship exits with its status. Nothing the
//! application commits after the final sync may exist: the restored replica equals the
//! database's final content.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use walship_storage::testkit::MotoServer;

use crate::common::*;

/// The application: writes a row every 10 ms until it is told to stop, and records in
/// `MARKS/app.info` its PID, parent PID and process group, in `MARKS/app.term` the id of its
/// last row once SIGTERM arrived, and in `MARKS/app.hup` that SIGHUP arrived. Modes:
/// `exit` shuts down slowly on SIGTERM (a second, then a last row, then exit 3); `ignore`
/// goes on writing after SIGTERM. SIGINT keeps Python's default (KeyboardInterrupt).
const APP: &str = r#"
import os, signal, sqlite3, sys, time
db, marks, mode = sys.argv[1], sys.argv[2], sys.argv[3]
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
signal.signal(signal.SIGHUP, lambda s, f: put("app.hup", "hup"))

def put(name, text):
    path = os.path.join(marks, name)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)

con = sqlite3.connect(db, isolation_level=None, timeout=30)
put("app.info", f"{os.getpid()} {os.getppid()} {os.getpgrp()}")
i = con.execute("SELECT coalesce(max(id), 0) FROM t").fetchone()[0]

def row():
    global i
    i += 1
    con.execute("INSERT INTO t(id, v) VALUES (?, ?)", (i, "after-term" if got else "row"))

while True:
    if got and mode == "exit":
        time.sleep(1)
        row()
        put("app.term", str(i))
        sys.exit(3)
    row()
    if got and not os.path.exists(os.path.join(marks, "app.term")):
        put("app.term", str(i))
    time.sleep(0.01)
"#;

fn s3_url(tag: &str) -> String {
    let moto = MotoServer::shared();
    moto.url(moto.bucket(), &MotoServer::unique_prefix(tag))
        .to_string()
}

/// The app and its shell (PIDs read from the app's marks), killed by PID if the test fails
/// before they are gone; only while they are still in the app's process group, so a PID
/// reused by another process is left alone.
#[derive(Default)]
struct Pids {
    pids: Vec<i32>,
    pgid: i32,
}

impl Drop for Pids {
    fn drop(&mut self) {
        for pid in &self.pids {
            if matches!(proc_stat(*pid), Some((_, _, g)) if g == self.pgid) {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// Fields of `/proc/PID/stat` after the command name: (state, ppid, pgrp).
fn proc_stat(pid: i32) -> Option<(String, i32, i32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.to_string();
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    Some((state, ppid, pgrp))
}

/// Every process in process group `pgid` that can still run (an exited one waiting for its
/// new parent to reap it cannot write).
fn group_members(pgid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(
            |pid| matches!(proc_stat(*pid), Some((s, _, g)) if g == pgid && s != "Z" && s != "X"),
        )
        .collect()
}

fn count(db: &Path, cond: &str) -> i64 {
    Connection::open(db)
        .unwrap()
        .query_row(&format!("SELECT count(*) FROM t WHERE {cond}"), [], |r| {
            r.get(0)
        })
        .unwrap()
}

fn max_id(db: &Path) -> i64 {
    Connection::open(db)
        .unwrap()
        .query_row("SELECT coalesce(max(id), 0) FROM t", [], |r| r.get(0))
        .unwrap()
}

fn wait_for(timeout: Duration, what: &str, log: &Path, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < timeout,
            "timed out waiting for {what}; log:\n{}",
            tail(log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_exit(child: &mut Child, timeout: Duration, log: &Path) -> ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "walship did not exit within {timeout:?}; log:\n{}",
                tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How the `--exec` command runs the app; no shell runs it by exec in either form.
#[derive(Clone, Copy)]
enum Form {
    /// `cd DIR && python3 app.py ...`: the shell waits for the app in the foreground.
    AndList,
    /// `python3 DIR/app.py ... & wait`: the shell's `wait` returns at the first signal and
    /// the shell exits, while the app is still shutting down.
    Background,
    /// `while :; do python3 app.py ...; done`: a restart loop, which must not restart the
    /// app once it stopped at a signal.
    Loop,
    /// `python3 DIR/app.py ... & sleep 5; exit 5`: the command exits by itself, five seconds
    /// in, and leaves the app running.
    LeftBehind,
}

/// One run of walship around the app, in a temporary directory.
struct Run {
    dir: tempfile::TempDir,
    db: PathBuf,
    url: String,
    log: PathBuf,
    walship: Child,
    /// The app's PID, its parent (the shell) and its process group.
    app: (i32, i32, i32),
    pids: Pids,
}

impl Run {
    /// Starts walship with the app in `mode` behind a shell, and waits until the app has
    /// written rows that walship shipped.
    fn start(
        url: String,
        form: Form,
        mode: &str,
        extra: &[&str],
        stdin: Option<std::fs::File>,
    ) -> Run {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let db = d.join("app.db");
        let c = Connection::open(&db).unwrap();
        c.pragma_update(None, "journal_mode", "wal").unwrap();
        c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
            .unwrap();
        drop(c);
        std::fs::write(d.join("app.py"), APP).unwrap();
        let (d_s, db_s) = (d.display(), db.display());
        let cmd = match form {
            Form::AndList => format!("cd '{d_s}' && python3 app.py '{db_s}' '{d_s}' {mode}"),
            Form::Background => format!("python3 '{d_s}/app.py' '{db_s}' '{d_s}' {mode} & wait"),
            Form::Loop => {
                format!("while :; do python3 '{d_s}/app.py' '{db_s}' '{d_s}' {mode}; done")
            }
            Form::LeftBehind => {
                format!("python3 '{d_s}/app.py' '{db_s}' '{d_s}' {mode} & sleep 5; exit 5")
            }
        };
        let log = d.join("walship.log");
        let mut c = walship();
        c.arg("replicate")
            .arg(&db)
            .arg(&url)
            .args(["--sync-interval", "100ms", "--exec", &cmd])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(tty) = stdin {
            c.stdin(tty);
            // SAFETY: setsid and ioctl are async-signal-safe; the child makes the terminal on
            // its stdin its controlling terminal, with itself in the foreground.
            #[allow(unsafe_code)]
            unsafe {
                c.pre_exec(|| {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let walship = c.spawn().unwrap();
        let info = d.join("app.info");
        wait_for(Duration::from_secs(60), "the app to start", &log, || {
            info.exists()
        });
        let f: Vec<i32> = std::fs::read_to_string(&info)
            .unwrap()
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        let app = (f[0], f[1], f[2]);
        let pids = Pids {
            pids: vec![app.0, app.1],
            pgid: app.2,
        };
        // Some rows written, and some of them shipped, before the signal.
        wait_for(
            Duration::from_secs(60),
            "rows in the database",
            &log,
            || max_id(&db) >= 30,
        );
        std::thread::sleep(Duration::from_millis(500));
        Run {
            dir,
            db,
            url,
            log,
            walship,
            app,
            pids,
        }
    }

    /// The app is a child of the shell that walship started (not the shell itself).
    fn assert_app_behind_a_shell(&self) {
        let (pid, ppid, _) = self.app;
        assert_ne!(pid, ppid);
        let comm = std::fs::read_to_string(format!("/proc/{ppid}/comm")).unwrap();
        assert_eq!(comm.trim(), "sh", "the app's parent is not the shell");
        let (_, shell_parent, _) = proc_stat(ppid).unwrap();
        assert_eq!(
            shell_parent,
            self.walship.id() as i32,
            "the shell is not walship's child"
        );
    }

    fn signal_walship(&self, sig: &str) {
        signal(&self.walship, sig);
    }

    fn wait(&mut self) -> ExitStatus {
        wait_exit(&mut self.walship, Duration::from_secs(120), &self.log)
    }

    fn marks(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.path().join(name)).ok()
    }

    /// The app ran in a process group of its own, and no process of it is left once walship
    /// has exited.
    fn assert_group_gone(&self) {
        assert_ne!(
            self.app.2,
            proc_stat(std::process::id() as i32).unwrap().2,
            "the app ran in the test's (and walship's) process group"
        );
        let left = group_members(self.app.2);
        assert!(
            left.is_empty(),
            "processes of the app's group {} outlived walship: {left:?}",
            self.app.2
        );
    }

    /// The restored replica holds exactly the database's final content; returns the
    /// restored file.
    fn assert_replica_equals_database(&self) -> PathBuf {
        let out = self.dir.path().join("restored.db");
        restore_ok(&self.url, &out);
        let (want_rows, want_max) = (count(&self.db, "1"), max_id(&self.db));
        let (got_rows, got_max) = (count(&out, "1"), max_id(&out));
        assert_eq!(
            (got_rows, got_max),
            (want_rows, want_max),
            "the replica (rows, last id) differs from the database: written after the final sync?\n{}",
            tail(&self.log)
        );
        out
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if self.walship.try_wait().ok().flatten().is_none() {
            let _ = self.walship.kill();
            let _ = self.walship.wait();
        }
    }
}

/// SIGTERM to walship: the app behind a shell gets it, shuts down slowly and commits a
/// last row; walship syncs after that and exits with the app's status (3).
fn sigterm_reaches_the_app_and_the_final_sync_waits_for_it(url: String, form: Form) {
    let mut run = Run::start(url, form, "exit", &[], None);
    run.assert_app_behind_a_shell();
    run.signal_walship("-TERM");
    let st = run.wait();
    let term = run.marks("app.term");
    assert!(
        term.is_some(),
        "the app did not receive SIGTERM; log:\n{}",
        tail(&run.log)
    );
    assert_eq!(
        st.code(),
        Some(3),
        "walship's status; log:\n{}",
        tail(&run.log)
    );
    run.assert_group_gone();
    let out = run.assert_replica_equals_database();
    let last: i64 = term.unwrap().parse().unwrap();
    assert_eq!(
        max_id(&out),
        last,
        "the app's last row is not in the replica"
    );
    std::mem::take(&mut run.pids.pids);
}

#[test]
fn exec_sigterm_reaches_an_app_behind_a_shell_and_the_final_sync_waits_for_it_file() {
    let dir = tempfile::tempdir().unwrap();
    sigterm_reaches_the_app_and_the_final_sync_waits_for_it(
        file_url(&dir.path().join("rep")),
        Form::AndList,
    );
}

#[test]
fn exec_sigterm_reaches_an_app_behind_a_shell_and_the_final_sync_waits_for_it_s3() {
    sigterm_reaches_the_app_and_the_final_sync_waits_for_it(s3_url("exec-term"), Form::AndList);
}

#[test]
fn exec_sigterm_ends_a_restart_loop_with_the_apps_status_file() {
    let dir = tempfile::tempdir().unwrap();
    sigterm_reaches_the_app_and_the_final_sync_waits_for_it(
        file_url(&dir.path().join("rep")),
        Form::Loop,
    );
}

#[test]
fn exec_sigterm_ends_a_restart_loop_with_the_apps_status_s3() {
    sigterm_reaches_the_app_and_the_final_sync_waits_for_it(s3_url("exec-loop"), Form::Loop);
}

/// The app in the background of the shell (`app & wait`): at SIGTERM the shell's `wait`
/// returns and the shell exits (143) while the app still shuts down; the final sync waits
/// for the app all the same, and its last row is in the replica.
fn the_final_sync_waits_for_an_app_the_shell_left_behind(url: String) {
    let mut run = Run::start(url, Form::Background, "exit", &[], None);
    run.assert_app_behind_a_shell();
    run.signal_walship("-TERM");
    let st = run.wait();
    let term = run.marks("app.term");
    assert!(
        term.is_some(),
        "walship exited before the app's last row; log:\n{}",
        tail(&run.log)
    );
    assert_eq!(
        st.code(),
        Some(143),
        "walship's status; log:\n{}",
        tail(&run.log)
    );
    run.assert_group_gone();
    let out = run.assert_replica_equals_database();
    let last: i64 = term.unwrap().parse().unwrap();
    assert_eq!(
        max_id(&out),
        last,
        "the app's last row is not in the replica"
    );
    std::mem::take(&mut run.pids.pids);
}

#[test]
fn exec_the_final_sync_waits_for_an_app_the_shell_left_behind_file() {
    let dir = tempfile::tempdir().unwrap();
    the_final_sync_waits_for_an_app_the_shell_left_behind(file_url(&dir.path().join("rep")));
}

#[test]
fn exec_the_final_sync_waits_for_an_app_the_shell_left_behind_s3() {
    the_final_sync_waits_for_an_app_the_shell_left_behind(s3_url("exec-background"));
}

/// The command exits by itself (status 5) and leaves the app running: walship stops the app
/// (SIGTERM to the group), waits for it, syncs, and exits with the command's status.
fn an_app_left_behind_by_the_command_is_stopped_before_the_final_sync(url: String) {
    let mut run = Run::start(url, Form::LeftBehind, "exit", &[], None);
    run.assert_app_behind_a_shell();
    let st = run.wait();
    let term = run.marks("app.term");
    assert!(
        term.is_some(),
        "walship did not stop the app the command left behind; log:\n{}",
        tail(&run.log)
    );
    assert_eq!(
        st.code(),
        Some(5),
        "walship's status; log:\n{}",
        tail(&run.log)
    );
    run.assert_group_gone();
    let out = run.assert_replica_equals_database();
    let last: i64 = term.unwrap().parse().unwrap();
    assert_eq!(
        max_id(&out),
        last,
        "the app's last row is not in the replica"
    );
    std::mem::take(&mut run.pids.pids);
}

#[test]
fn exec_an_app_left_behind_by_the_command_is_stopped_before_the_final_sync_file() {
    let dir = tempfile::tempdir().unwrap();
    an_app_left_behind_by_the_command_is_stopped_before_the_final_sync(file_url(
        &dir.path().join("rep"),
    ));
}

#[test]
fn exec_an_app_left_behind_by_the_command_is_stopped_before_the_final_sync_s3() {
    an_app_left_behind_by_the_command_is_stopped_before_the_final_sync(s3_url("exec-left"));
}

/// An app that ignores SIGTERM is killed (its whole group) at the shutdown deadline; the
/// final sync runs after that and ships everything it committed, rows written after the
/// signal included. walship exits 137 (128 + SIGKILL).
fn an_app_ignoring_sigterm_is_killed_at_the_deadline_before_the_final_sync(url: String) {
    let mut run = Run::start(
        url,
        Form::AndList,
        "ignore",
        &["--shutdown-timeout", "3s"],
        None,
    );
    run.assert_app_behind_a_shell();
    run.signal_walship("-TERM");
    let st = run.wait();
    assert!(
        run.marks("app.term").is_some(),
        "the app did not receive SIGTERM; log:\n{}",
        tail(&run.log)
    );
    assert_eq!(
        st.code(),
        Some(137),
        "walship's status; log:\n{}",
        tail(&run.log)
    );
    run.assert_group_gone();
    let out = run.assert_replica_equals_database();
    assert!(
        count(&out, "v = 'after-term'") > 0,
        "no row written after SIGTERM reached the replica"
    );
    std::mem::take(&mut run.pids.pids);
}

#[test]
fn exec_an_app_ignoring_sigterm_is_killed_at_the_deadline_before_the_final_sync_file() {
    let dir = tempfile::tempdir().unwrap();
    an_app_ignoring_sigterm_is_killed_at_the_deadline_before_the_final_sync(file_url(
        &dir.path().join("rep"),
    ));
}

#[test]
fn exec_an_app_ignoring_sigterm_is_killed_at_the_deadline_before_the_final_sync_s3() {
    an_app_ignoring_sigterm_is_killed_at_the_deadline_before_the_final_sync(s3_url("exec-ignore"));
}

/// A pseudo-terminal: its master side, and the slave (for a child's stdin).
#[allow(unsafe_code)]
fn pty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two new descriptors into `master` and `slave`; null name,
    // termios and size are allowed.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened here and nothing else owns them.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    }
}

/// On a terminal: SIGHUP is passed on to the app, which goes on (walship too); Ctrl-C on
/// the terminal reaches walship (the foreground group), which forwards SIGINT to the app;
/// walship syncs after the app is gone and exits 130 (128 + SIGINT, Python's
/// KeyboardInterrupt).
fn on_a_terminal_sighup_is_passed_on_and_ctrl_c_stops_the_app(url: String) {
    let (mut master, slave) = pty();
    let mut run = Run::start(url, Form::AndList, "exit", &[], Some(slave));
    run.assert_app_behind_a_shell();
    run.signal_walship("-HUP");
    let hup = run.dir.path().join("app.hup");
    wait_for(
        Duration::from_secs(30),
        "the app to get SIGHUP",
        &run.log,
        || hup.exists(),
    );
    // Both go on: the app writes, walship ships.
    let after_hup = max_id(&run.db);
    wait_for(
        Duration::from_secs(30),
        "rows after SIGHUP",
        &run.log,
        || max_id(&run.db) > after_hup + 20,
    );
    assert!(run.walship.try_wait().unwrap().is_none(), "walship exited");
    master.write_all(&[0x03]).unwrap();
    let st = run.wait();
    assert_eq!(
        st.code(),
        Some(130),
        "walship's status; log:\n{}",
        tail(&run.log)
    );
    run.assert_group_gone();
    run.assert_replica_equals_database();
    std::mem::take(&mut run.pids.pids);
}

#[test]
fn exec_on_a_terminal_sighup_is_passed_on_and_ctrl_c_stops_the_app_file() {
    let dir = tempfile::tempdir().unwrap();
    on_a_terminal_sighup_is_passed_on_and_ctrl_c_stops_the_app(file_url(&dir.path().join("rep")));
}

#[test]
fn exec_on_a_terminal_sighup_is_passed_on_and_ctrl_c_stops_the_app_s3() {
    on_a_terminal_sighup_is_passed_on_and_ctrl_c_stops_the_app(s3_url("exec-tty"));
}

/// Without `--exec`, SIGHUP (a closed terminal) stops walship as SIGTERM does: rows committed
/// before it are shipped by the final sync, and walship exits 0.
fn without_exec_sighup_stops_walship_after_a_final_sync(url: String) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let c = Connection::open(&db).unwrap();
    c.pragma_update(None, "journal_mode", "wal").unwrap();
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        .unwrap();
    let log = dir.path().join("walship.log");
    let mut rep = Replicator::start(&db, &url, &["--sync-interval", "1h"], &log);
    wait_for(Duration::from_secs(60), "the first sync", &log, || {
        std::fs::read_to_string(&log).is_ok_and(|s| s.contains("all replicators up"))
    });
    for i in 1..=20 {
        c.execute("INSERT INTO t(id, v) VALUES (?1, 'row')", [i])
            .unwrap();
    }
    signal(&rep.child, "-HUP");
    let st = wait_exit(&mut rep.child, Duration::from_secs(120), &log);
    assert_eq!(st.code(), Some(0), "walship's status; log:\n{}", tail(&log));
    let out = dir.path().join("restored.db");
    restore_ok(&url, &out);
    assert_eq!(count(&out, "1"), 20);
}

#[test]
fn replicate_without_exec_makes_a_final_sync_on_sighup_file() {
    let dir = tempfile::tempdir().unwrap();
    without_exec_sighup_stops_walship_after_a_final_sync(file_url(&dir.path().join("rep")));
}

#[test]
fn replicate_without_exec_makes_a_final_sync_on_sighup_s3() {
    without_exec_sighup_stops_walship_after_a_final_sync(s3_url("exec-none-hup"));
}
