//! What operators see and what is left behind: colours only on a terminal, the log filter's
//! sources, a restore guide that quotes what a client sent, refused starts that leave no
//! directories, and a `decrypt` that never overwrites.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use walship_storage::testkit::MotoServer;

use crate::common::*;

fn db_with_rows(dir: &Path, name: &str) -> PathBuf {
    let db = dir.join(name);
    create_db(&db);
    let c = Connection::open(&db).unwrap();
    for i in 0..20 {
        c.execute(
            "INSERT INTO t(v) VALUES (?1)",
            [format!("row {i}").into_bytes()],
        )
        .unwrap();
    }
    db
}

/// `walship snapshot DB URL` (a command that logs at info and debug levels) with `env` set
/// and WALSHIP_LOG as given (None: unset).
fn logging_cmd(db: &Path, url: &str, walship_log: Option<&str>, env: &[(&str, &str)]) -> Command {
    let mut c = walship();
    c.arg("snapshot").arg(db).arg(url);
    match walship_log {
        Some(v) => c.env("WALSHIP_LOG", v),
        None => c.env_remove("WALSHIP_LOG"),
    };
    c.env_remove("RUST_LOG").env_remove("NO_COLOR");
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn logs_have_colours_only_on_a_terminal_and_never_with_no_color() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_with_rows(dir.path(), "app.db");
    let url = file_url(&dir.path().join("replica"));

    let o = logging_cmd(&db, &url, Some("info"), &[]).output().unwrap();
    let err = stderr_of(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("INFO"), "no log lines: {err}");
    assert!(
        !err.contains('\x1b'),
        "ANSI escapes in a log on a pipe: {err:?}"
    );

    let (st, tty) = run_on_pty(logging_cmd(&db, &url, Some("info"), &[]));
    assert!(st.success(), "{tty}");
    assert!(tty.contains("INFO"), "no log lines: {tty}");
    assert!(tty.contains("\x1b["), "no colours on a terminal: {tty:?}");

    let (st, tty) = run_on_pty(logging_cmd(&db, &url, Some("info"), &[("NO_COLOR", "1")]));
    assert!(st.success(), "{tty}");
    assert!(tty.contains("INFO"), "no log lines: {tty}");
    assert!(!tty.contains('\x1b'), "colours despite NO_COLOR: {tty:?}");
}

#[test]
fn rust_log_applies_when_walship_log_is_unset_and_walship_log_wins_over_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_with_rows(dir.path(), "app.db");
    let url = file_url(&dir.path().join("replica"));

    let o = logging_cmd(&db, &url, None, &[("RUST_LOG", "debug")])
        .output()
        .unwrap();
    let err = stderr_of(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("DEBUG"), "RUST_LOG=debug ignored: {err}");

    let o = logging_cmd(&db, &url, Some("warn"), &[("RUST_LOG", "debug")])
        .output()
        .unwrap();
    let err = stderr_of(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        !err.contains("DEBUG") && !err.contains("INFO"),
        "WALSHIP_LOG=warn must win over RUST_LOG: {err}"
    );

    let mut c = logging_cmd(&db, &url, Some("warn"), &[("RUST_LOG", "warn")]);
    c.args(["--log-level", "debug"]);
    let o = c.output().unwrap();
    let err = stderr_of(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("DEBUG"), "--log-level must win: {err}");

    let o = logging_cmd(&db, &url, None, &[]).output().unwrap();
    let err = stderr_of(&o);
    assert!(err.contains("INFO") && !err.contains("DEBUG"), "{err}");
}

/// Asserts a command was refused and left neither the database's state directory nor
/// anything under `created` (a path that did not exist before).
fn assert_refused_cleanly(what: &str, o: &Output, db: &Path, created: &Path) {
    let err = stderr_of(o);
    assert!(!o.status.success(), "{what}: not refused: {err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: "), "{what}: one error line: {err}");
    let mut state = db.as_os_str().to_owned();
    state.push("-walship");
    assert!(
        !Path::new(&state).exists(),
        "{what}: left {} behind ({err})",
        Path::new(&state).display()
    );
    assert!(
        !created.exists(),
        "{what}: left {} behind ({err})",
        created.display()
    );
}

#[test]
fn a_refused_start_leaves_no_directories_behind() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A replica directory that does not exist yet (its parent does: a missing parent is
    // refused outright, see absent.rs).
    let fresh = d.join("new");
    let url = file_url(&fresh);
    let run = |args: &[&std::ffi::OsStr]| walship().args(args).output().unwrap();
    let os = |s: &str| std::ffi::OsString::from(s);

    // A database that does not exist, continuously and with --once.
    let missing = d.join("missing.db");
    for once in [false, true] {
        let mut args = vec![os("replicate"), missing.clone().into(), os(&url)];
        if once {
            args.push(os("--once"));
        }
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        assert_refused_cleanly("missing database", &run(&args), &missing, &fresh);
    }

    // A database not in WAL mode.
    let rollback = d.join("rollback.db");
    Connection::open(&rollback)
        .unwrap()
        .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    let o = walship()
        .arg("replicate")
        .arg(&rollback)
        .arg(&url)
        .output()
        .unwrap();
    assert_refused_cleanly("not in WAL mode", &o, &rollback, &fresh);

    // A bad replica URL, and a replica that cannot be reached.
    let db = db_with_rows(d, "app.db");
    let o = walship()
        .arg("replicate")
        .arg(&db)
        .arg(format!("{url}?nonsense=1"))
        .output()
        .unwrap();
    assert_refused_cleanly("bad replica URL", &o, &db, &fresh);
    let moto = MotoServer::shared();
    let o = walship()
        .arg("replicate")
        .arg(&db)
        .arg(moto.url("no-such-bucket-for-ops", "p").to_string())
        .output()
        .unwrap();
    assert_refused_cleanly("unreachable replica", &o, &db, &fresh);

    // A bad config file (an unknown key) naming a new replica directory.
    let cfg = d.join("walship.toml");
    std::fs::write(
        &cfg,
        format!(
            "version = 1\n[[db]]\npath = \"{}\"\nno-such-key = 1\n  [[db.replica]]\n  url = \"{url}\"\n",
            db.display()
        ),
    )
    .unwrap();
    let o = walship()
        .args(["replicate", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_refused_cleanly("bad config", &o, &db, &fresh);

    // The lease held by another replicator, with --on-conflict fail.
    let held_url = file_url(&d.join("held"));
    let other = db_with_rows(d, "other.db");
    let log = d.join("holder.log");
    let holder = Replicator::start(&other, &held_url, &[], &log);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("all replicators up")
    {
        assert!(
            Instant::now() < deadline,
            "holder did not start: {}",
            tail(&log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = walship()
        .arg("replicate")
        .arg(&db)
        .arg(&held_url)
        .args(["--on-conflict", "fail"])
        .output()
        .unwrap();
    assert_refused_cleanly("lease held", &o, &db, &fresh);
    assert!(
        stderr_of(&o).contains("lease"),
        "the refusal names the lease: {}",
        stderr_of(&o)
    );
    assert!(holder.terminate(Duration::from_secs(30)).success());

    // The same start, not refused, creates both.
    let o = walship()
        .args(["replicate", "--once"])
        .arg(&db)
        .arg(&url)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    assert!(fresh.is_dir());
}

/// A `walship replicate --listen 127.0.0.1:0` and its address.
fn serving(db: &Path, url: &str, log: &Path) -> (Replicator, String) {
    let rep = Replicator::start(db, url, &["--listen", "127.0.0.1:0"], log);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = strip_ansi(&std::fs::read_to_string(log).unwrap_or_default());
        if let Some(l) = text.lines().find(|l| l.contains("HTTP server listening"))
            && let Some(a) = l.split("addr=").nth(1)
        {
            let addr = a.split_whitespace().next().unwrap().to_string();
            return (rep, addr);
        }
        assert!(Instant::now() < deadline, "no listen line: {}", tail(log));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `s` without ANSI escape sequences.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters final-byte.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// GET `path` with a `Host` header of our choosing; the response body.
fn get_with_host(addr: &str, path: &str, host: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

#[test]
fn the_restore_guide_quotes_a_forged_host_into_one_word() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = db_with_rows(d, "app.db");
    let (rep, addr) = serving(&db, &file_url(&d.join("replica")), &d.join("rep.log"));
    // Were it pasted unquoted, a shell would run the `touch`es (harmless, and seen).
    let pwned = d.join("pwned");
    let host = format!(
        "x; touch {p}1 #'$(touch {p}2)`touch {p}3`\"",
        p = pwned.display()
    );
    let body = get_with_host(
        &addr,
        "/api/v1/databases/app/restore-guide?format=json",
        &host,
    );
    let guide: serde_json::Value = serde_json::from_str(&body).unwrap();
    let commands: Vec<&str> = guide["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(commands.len() >= 5, "{body}");
    let mut words_with_host = 0;
    for cmd in &commands {
        let check = Command::new("/bin/sh")
            .args(["-n", "-c", cmd])
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "`{cmd}` is not valid sh: {}",
            stderr_of(&check)
        );
        // The shell splits the command into words without running it.
        let o = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("set -- {cmd}\nprintf '%s\\n' \"$@\""))
            .env("WALSHIP_API_TOKEN", "token")
            .output()
            .unwrap();
        assert!(o.status.success(), "`{cmd}`: {}", stderr_of(&o));
        let words = String::from_utf8(o.stdout).unwrap();
        for w in words.lines() {
            if w.contains("x; touch") {
                assert_eq!(
                    w,
                    if w.contains('?') {
                        format!(
                            "http://{host}/api/v1/databases/app/download?timestamp={}",
                            w.rsplit('=').next().unwrap()
                        )
                    } else {
                        format!("http://{host}/api/v1/databases/app/download")
                    },
                    "`{cmd}`"
                );
                words_with_host += 1;
            }
        }
    }
    for i in 1..=3 {
        assert!(
            !Path::new(&format!("{}{i}", pwned.display())).exists(),
            "the forged Host header ran in a shell: {commands:#?}"
        );
    }
    assert_eq!(words_with_host, 2, "{commands:#?}");
    assert!(rep.terminate(Duration::from_secs(30)).success());
}

#[test]
fn decrypt_never_overwrites_and_names_the_generation_as_generations_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = db_with_rows(d, "app.db");
    let key = d.join("key");
    std::fs::write(
        &key,
        "7f3a9c0d4e5b6a718293a4b5c6d7e8f90123456789abcdeffedcba9876543210\n",
    )
    .unwrap();
    let replica = d.join("replica");
    let url = file_url(&replica);
    let o = walship()
        .arg("snapshot")
        .arg(&db)
        .arg(&url)
        .arg("--encryption-key-file")
        .arg(&key)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr_of(&o));
    let mut stack = vec![replica.clone()];
    let mut snap = None;
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "wsnap") {
                snap = Some(p);
            }
        }
    }
    let snap = snap.expect("a snapshot object");

    let out = d.join("out.db");
    std::fs::write(&out, b"keep me").unwrap();
    let decrypt = |force: bool| {
        let mut c = walship();
        c.arg("decrypt")
            .arg(&snap)
            .arg(&out)
            .arg("--encryption-key-file")
            .arg(&key);
        if force {
            c.arg("--force");
        }
        c.output().unwrap()
    };
    let o = decrypt(false);
    let err = stderr_of(&o);
    assert!(
        !o.status.success(),
        "decrypt replaced an existing file: {err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("--force"), "says what to do: {err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");

    let o = decrypt(true);
    let err = stderr_of(&o);
    assert!(o.status.success(), "{err}");
    let n: i64 = Connection::open(&out)
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 20);

    let gens = walship().args(["generations", &url]).output().unwrap();
    let gens = String::from_utf8_lossy(&gens.stdout);
    let id = gens
        .lines()
        .find_map(|l| l.strip_prefix("generation "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no generation in: {gens}"));
    assert!(
        err.contains(&format!("generation {id}")),
        "decrypt names generation `{id}` as `generations` does: {err}"
    );
}
