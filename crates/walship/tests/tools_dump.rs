//! `walship dump`: a logical SQL dump of a live database or of a replica's point loads into
//! an empty database with identical contents; it reads in one transaction without waiting
//! for the app; bad inputs get one line and write nothing.

#![allow(clippy::unwrap_used)]

mod common;
mod tools_support;

use std::path::Path;

use common::*;
use rusqlite::Connection;
use tools_support::*;

#[test]
fn a_live_dump_loads_back_identical_with_awkward_values() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    create_tricky_db(&db);
    let out = dir.path().join("app.sql");
    let o = ok(run(&[
        "dump",
        db.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]));
    assert!(stderr(&o).contains("rows"), "{}", stderr(&o));
    let sql = std::fs::read_to_string(&out).unwrap();
    assert!(sql.starts_with("PRAGMA foreign_keys=OFF;\nBEGIN TRANSACTION;\n"));
    assert!(sql.ends_with("COMMIT;\n"));
    // Triggers come after every row (they must not fire while loading).
    let trigger_at = sql.find("CREATE TRIGGER").unwrap();
    assert!(sql.rfind("INSERT INTO \"child\"").unwrap() < trigger_at);
    let copy = dir.path().join("copy.db");
    load_dump(&sql, &copy);
    assert_same(&db, &copy);
    // Dumping the copy gives the same dump.
    let o = ok(run(&["dump", copy.to_str().unwrap()]));
    assert!(stdout(&o) == sql, "the copy dumps differently");
    // The view and the trigger work in the copy.
    let c = Connection::open(&copy).unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM child_names", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 40);
    let audit_before: i64 = c
        .query_row("SELECT count(*) FROM audit", [], |r| r.get(0))
        .unwrap();
    c.execute("INSERT INTO child(parent_id) VALUES (1)", [])
        .unwrap();
    let audit_after: i64 = c
        .query_row("SELECT count(*) FROM audit", [], |r| r.get(0))
        .unwrap();
    assert_eq!(audit_after, audit_before + 1);
    let hits: i64 = c
        .query_row(
            "SELECT count(*) FROM docs WHERE docs MATCH 'hello'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(hits, 1);

    // To standard output: the same bytes.
    let o = ok(run(&["dump", db.to_str().unwrap()]));
    assert!(
        stdout(&o) == sql,
        "the dump to stdout differs from the file"
    );
}

#[test]
fn a_live_dump_reads_committed_data_while_the_app_holds_a_write_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    create_db(&db);
    let app = Connection::open(&db).unwrap();
    app.execute("INSERT INTO t(id, v) VALUES (1, x'01')", [])
        .unwrap();
    app.execute_batch("BEGIN IMMEDIATE; INSERT INTO t(id, v) VALUES (2, x'02');")
        .unwrap();
    let t0 = std::time::Instant::now();
    let o = ok(run(&["dump", db.to_str().unwrap()]));
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(4),
        "the dump waited for the writer"
    );
    let sql = stdout(&o);
    assert!(sql.contains("INSERT INTO \"t\" VALUES(1,X'01');"), "{sql}");
    assert!(!sql.contains("X'02'"), "uncommitted data in the dump");
    app.execute_batch("COMMIT").unwrap();
    // The app was not disturbed, and its WAL is still there (no checkpoint on close).
    assert!(dir.path().join("app.db-wal").exists());
    let n: i64 = app
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);
}

fn dump_replica(url: &str, extra: &[&str], out: &Path) {
    let mut args = vec!["dump", "--replica", url, "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    ok(run(&args));
}

#[test]
fn replica_dumps_on_file_and_s3_newest_and_point_in_time() {
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in backends(dir.path(), "dump") {
        let db = dir.path().join(format!("{name}.db"));
        create_tricky_db(&db);
        snapshot(&db, &url);
        let first = dir.path().join(format!("{name}-first.db"));
        backup(&db, &first);
        let between = instant_between();
        let c = Connection::open(&db).unwrap();
        c.execute_batch(
            "INSERT INTO plain VALUES ('later', 1); CREATE TABLE added(x); INSERT INTO added VALUES (1);",
        )
        .unwrap();
        drop(c);
        snapshot(&db, &url);

        let newest = dir.path().join(format!("{name}-newest.sql"));
        dump_replica(&url, &[], &newest);
        let loaded = dir.path().join(format!("{name}-newest.db"));
        load_dump(&std::fs::read_to_string(&newest).unwrap(), &loaded);
        assert_same(&db, &loaded);

        let old = dir.path().join(format!("{name}-old.sql"));
        dump_replica(&url, &["--timestamp", &between], &old);
        let loaded_old = dir.path().join(format!("{name}-old.db"));
        load_dump(&std::fs::read_to_string(&old).unwrap(), &loaded_old);
        assert_same(&first, &loaded_old);
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );
    }
}

#[test]
fn bad_inputs_get_one_line_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.sql");
    let o = out.to_str().unwrap();

    // A missing database.
    let missing = dir.path().join("nope.db");
    let line = error_line(&run(&["dump", missing.to_str().unwrap(), "-o", o]));
    assert!(
        line.contains("nope.db") && line.contains("does not exist"),
        "{line}"
    );
    assert!(!out.exists());

    // Not a database.
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, vec![b'x'; 8192]).unwrap();
    let line = error_line(&run(&["dump", junk.to_str().unwrap(), "-o", o]));
    assert!(line.contains("junk.db"), "{line}");
    assert!(!out.exists());

    // An empty replica, on both backends.
    for (_, url) in backends(dir.path(), "dump-empty") {
        let line = error_line(&run(&["dump", "--replica", &url, "-o", o]));
        assert!(line.contains("no restorable backup"), "{line}");
        assert!(!out.exists());
    }

    // DB and --replica together, or neither: usage errors.
    let both = run(&["dump", "x.db", "--replica", "file:///tmp/x"]);
    assert!(!both.status.success());
    assert!(!run(&["dump"]).status.success());
    // --timestamp that is not RFC 3339.
    let url = file_url(&dir.path().join("r"));
    let line = error_line(&run(&[
        "dump",
        "--replica",
        &url,
        "--timestamp",
        "yesterday",
    ]));
    assert!(line.contains("RFC 3339"), "{line}");

    // An existing output is only replaced by a complete dump.
    std::fs::write(&out, "precious").unwrap();
    error_line(&run(&["dump", missing.to_str().unwrap(), "-o", o]));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "precious");
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
}

#[test]
fn a_corrupt_newest_snapshot_falls_back_to_an_older_point() {
    let dir = tempfile::tempdir().unwrap();
    let rdir = dir.path().join("replica");
    let url = file_url(&rdir);
    let db = dir.path().join("app.db");
    create_db(&db);
    Connection::open(&db)
        .unwrap()
        .execute("INSERT INTO t(id, v) VALUES (1, x'01')", [])
        .unwrap();
    snapshot(&db, &url);
    std::thread::sleep(std::time::Duration::from_millis(20));
    Connection::open(&db)
        .unwrap()
        .execute("INSERT INTO t(id, v) VALUES (2, x'02')", [])
        .unwrap();
    snapshot(&db, &url);
    // Generations sort newest first.
    let snaps = objects(&rdir, ".wsnap");
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    corrupt(&snaps[0]);
    let out = dir.path().join("out.sql");
    let o = ok(run(&[
        "dump",
        "--replica",
        &url,
        "-o",
        out.to_str().unwrap(),
    ]));
    let name = snaps[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        stderr(&o).contains("skipped") && stderr(&o).contains(&name),
        "{}",
        stderr(&o)
    );
    let sql = std::fs::read_to_string(&out).unwrap();
    assert!(
        sql.contains("VALUES(1,X'01')") && !sql.contains("X'02'"),
        "{sql}"
    );
}
