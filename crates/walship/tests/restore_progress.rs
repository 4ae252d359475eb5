//! `walship restore` draws a progress bar on a terminal and nothing of it elsewhere: run
//! with its stderr on a pseudo-terminal, and on a pipe.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;

use common::*;
use rusqlite::Connection;

/// A pseudo-terminal of 24 × 120: its master side, and the slave for a child's stderr.
#[allow(unsafe_code)]
fn pty() -> (std::fs::File, OwnedFd) {
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

/// A replica of a database of about 24 MB (one snapshot), and its URL.
fn replica_of_a_big_database(dir: &Path) -> String {
    let db = dir.join("app.db");
    let c = Connection::open(&db).unwrap();
    c.pragma_update(None, "journal_mode", "wal").unwrap();
    c.execute_batch(
        "CREATE TABLE big(b BLOB);
         WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r WHERE x < 6000)
         INSERT INTO big SELECT randomblob(4000) FROM r;",
    )
    .unwrap();
    let url = file_url(&dir.join("replica"));
    let o = walship()
        .arg("snapshot")
        .arg(&db)
        .arg(&url)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    url
}

#[test]
fn restore_draws_a_progress_bar_on_a_terminal_and_none_on_a_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let url = replica_of_a_big_database(dir.path());

    // On a terminal.
    let (mut master, slave) = pty();
    let out = dir.path().join("tty.db");
    let mut cmd = walship();
    cmd.arg("restore")
        .arg("-o")
        .arg(&out)
        .arg(&url)
        .env("TERM", "xterm")
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
    let tty = reader.join().unwrap();
    assert!(status.success(), "restore failed on a terminal:\n{tty}");
    assert!(tty.contains("restoring"), "no progress bar drawn:\n{tty:?}");
    assert!(tty.contains("MiB"), "the bar shows no sizes:\n{tty:?}");
    assert!(tty.contains("restored "), "no result line:\n{tty:?}");
    let tty_db = std::fs::read(&out).unwrap();

    // On a pipe: the result line only.
    let out = dir.path().join("pipe.db");
    let o = restore(&url, &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        !err.contains("restoring"),
        "a bar drawn on a pipe:\n{err:?}"
    );
    assert!(!err.contains('\r'), "a bar drawn on a pipe:\n{err:?}");
    assert!(err.contains("restored "), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), tty_db, "both restores equal");
}
