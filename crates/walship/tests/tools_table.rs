//! `walship restore --table`: a new database holding just some tables (statements, rows,
//! indexes, triggers, sqlite_sequence) of any point, on local and S3 replicas; an unknown
//! table, an empty replica or an existing output write nothing.

#![allow(clippy::unwrap_used)]

mod common;
mod tools_support;

use std::path::Path;

use common::*;
use rusqlite::Connection;
use tools_support::*;

fn names(db: &Path, kind: &str) -> Vec<String> {
    let c = Connection::open(db).unwrap();
    let mut st = c
        .prepare("SELECT name FROM sqlite_schema WHERE type = ?1 AND name NOT LIKE 'sqlite%' ORDER BY name")
        .unwrap();
    st.query_map([kind], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn restore_tables(url: &str, out: &Path, tables: &[&str], extra: &[&str]) -> std::process::Output {
    let mut args = vec!["restore", "-o", out.to_str().unwrap()];
    for t in tables {
        args.push("--table");
        args.push(t);
    }
    args.extend_from_slice(extra);
    args.push(url);
    run(&args)
}

#[test]
fn some_tables_of_any_point_on_file_and_s3() {
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in backends(dir.path(), "table") {
        let db = dir.path().join(format!("{name}.db"));
        create_tricky_db(&db);
        snapshot(&db, &url);
        let first = dir.path().join(format!("{name}-first.db"));
        backup(&db, &first);
        let between = instant_between();
        Connection::open(&db)
            .unwrap()
            .execute_batch(
                "INSERT INTO child(parent_id, note) VALUES (1, 'later'); DELETE FROM plain;",
            )
            .unwrap();
        snapshot(&db, &url);

        // Newest point; names match without regard to case, as in SQL.
        let out = dir.path().join(format!("{name}-tables.db"));
        let o = ok(restore_tables(
            &url,
            &out,
            &["child", "PARENT", "kv", "child"],
            &[],
        ));
        assert!(stderr(&o).contains("child ("), "{}", stderr(&o));
        assert_eq!(names(&out, "table"), ["child", "kv", "parent"]);
        assert_eq!(names(&out, "index"), ["child_parent"]);
        assert_eq!(names(&out, "trigger"), ["child_audit"]);
        assert!(names(&out, "view").is_empty());
        assert_eq!(integrity(&out), "ok");
        let (src, got) = (contents(&db), contents(&out));
        for t in ["child", "kv", "parent"] {
            assert_eq!(src[t], got[t], "table {t}");
        }
        // sqlite_sequence carries parent's AUTOINCREMENT counter.
        let seq: i64 = Connection::open(&out)
            .unwrap()
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'parent'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(seq, 100);
        // Its schema statements are the source's.
        let want: Vec<_> = schema(&db)
            .into_iter()
            .filter(|e| ["child", "kv", "parent"].contains(&e.2.as_str()))
            .collect();
        let have: Vec<_> = schema(&out)
            .into_iter()
            .filter(|e| e.1 != "sqlite_sequence")
            .collect();
        assert_eq!(have, want);

        // An older point, rowids kept in a table without INTEGER PRIMARY KEY.
        let old = dir.path().join(format!("{name}-old.db"));
        ok(restore_tables(
            &url,
            &old,
            &["plain"],
            &["--timestamp", &between],
        ));
        assert_eq!(contents(&old)["plain"], contents(&first)["plain"]);
        assert_eq!(count(&old, "plain"), 26);
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );
    }
}

#[test]
fn an_unknown_table_is_named_with_the_ones_that_exist_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in backends(dir.path(), "table-bad") {
        let db = dir.path().join(format!("{name}.db"));
        create_db(&db);
        snapshot(&db, &url);
        let out = dir.path().join(format!("{name}-out.db"));
        let line = error_line(&restore_tables(&url, &out, &["t", "nope"], &[]));
        assert!(line.contains("`nope`"), "{line}");
        assert!(line.contains("tables: meta, t"), "{line}");
        assert!(!out.exists());
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );

        // An existing output is kept unless --force.
        std::fs::write(&out, "precious").unwrap();
        let line = error_line(&restore_tables(&url, &out, &["t"], &[]));
        assert!(line.contains("already exists"), "{line}");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "precious");
        ok(restore_tables(&url, &out, &["t"], &["--force"]));
        assert_eq!(names(&out, "table"), ["t"]);
    }
    // An empty replica.
    for (_, url) in backends(dir.path(), "table-empty") {
        let out = dir.path().join("empty-out.db");
        let line = error_line(&restore_tables(&url, &out, &["t"], &[]));
        assert!(line.contains("no restorable backup"), "{line}");
        assert!(!out.exists());
        ok(restore_tables(&url, &out, &["t"], &["--if-replica-exists"]));
        assert!(!out.exists());
    }
    // A virtual table is refused with what to do instead.
    let url = file_url(&dir.path().join("vt"));
    let db = dir.path().join("vt.db");
    create_tricky_db(&db);
    snapshot(&db, &url);
    let out = dir.path().join("vt-out.db");
    let line = error_line(&restore_tables(&url, &out, &["docs"], &[]));
    assert!(
        line.contains("virtual table") && line.contains("walship dump"),
        "{line}"
    );
    assert!(!out.exists());
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
}

#[test]
fn a_corrupt_newest_snapshot_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let rdir = dir.path().join("replica");
    let url = file_url(&rdir);
    let db = dir.path().join("app.db");
    create_db(&db);
    Connection::open(&db)
        .unwrap()
        .execute("INSERT INTO meta VALUES ('a', 1)", [])
        .unwrap();
    snapshot(&db, &url);
    std::thread::sleep(std::time::Duration::from_millis(20));
    Connection::open(&db)
        .unwrap()
        .execute("INSERT INTO meta VALUES ('b', 2)", [])
        .unwrap();
    snapshot(&db, &url);
    let snaps = objects(&rdir, ".wsnap");
    corrupt(&snaps[0]);
    let out = dir.path().join("out.db");
    // The older point leaves the newest snapshot's history out: a partial restore, refused
    // (nothing written) unless accepted.
    let o = restore_tables(&url, &out, &["meta"], &[]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let line = error_line(&o);
    assert!(line.contains("partial"), "{line}");
    assert!(!out.exists());
    let o = ok(restore_tables(&url, &out, &["meta"], &["--allow-partial"]));
    assert!(stderr(&o).contains("skipped"), "{}", stderr(&o));
    assert!(stderr(&o).contains("partial restore"), "{}", stderr(&o));
    assert_eq!(count(&out, "meta"), 1);
}
