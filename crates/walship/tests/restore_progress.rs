//! `walship restore` draws a progress bar on a terminal and nothing of it elsewhere: run
//! with its stderr on a pseudo-terminal, and on a pipe.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::*;
use rusqlite::Connection;

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
    let out = dir.path().join("tty.db");
    let mut cmd = walship();
    cmd.arg("restore").arg("-o").arg(&out).arg(&url);
    let (status, tty) = run_on_pty(cmd);
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
