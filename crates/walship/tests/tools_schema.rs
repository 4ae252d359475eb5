//! `walship schema-diff`: schema changes between consecutive snapshots of a replica, on
//! local and S3 replicas; an empty replica fails with one line; a corrupt snapshot is
//! skipped and the comparison goes across it.

#![allow(clippy::unwrap_used)]

mod common;
mod tools_support;

use common::*;
use rusqlite::Connection;
use tools_support::*;

#[test]
fn changes_between_snapshots_on_file_and_s3() {
    let dir = tempfile::tempdir().unwrap();
    for (name, url) in backends(dir.path(), "schema") {
        let db = dir.path().join(format!("{name}.db"));
        create_db(&db);
        Connection::open(&db)
            .unwrap()
            .execute_batch("CREATE TABLE old_stuff(x); CREATE VIEW v AS SELECT id FROM t;")
            .unwrap();
        snapshot(&db, &url);
        std::thread::sleep(std::time::Duration::from_millis(20));
        // Data only: no schema change.
        Connection::open(&db)
            .unwrap()
            .execute("INSERT INTO meta VALUES ('k', 1)", [])
            .unwrap();
        snapshot(&db, &url);
        std::thread::sleep(std::time::Duration::from_millis(20));
        Connection::open(&db)
            .unwrap()
            .execute_batch(
                "ALTER TABLE meta ADD COLUMN note TEXT;
                 DROP TABLE old_stuff;
                 CREATE INDEX meta_n ON meta(n);",
            )
            .unwrap();
        snapshot(&db, &url);

        let o = ok(run(&["schema-diff", &url]));
        let text = stdout(&o);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].ends_with(": first snapshot"), "{text}");
        assert!(lines[1].ends_with(": no schema change"), "{text}");
        assert!(lines[2].ends_with(": 3 changes"), "{text}");
        assert!(text.contains("  - table old_stuff"), "{text}");
        assert!(text.contains("  ~ table meta"), "{text}");
        assert!(
            text.contains(
                "      + CREATE TABLE meta(k TEXT PRIMARY KEY, n INTEGER NOT NULL, note TEXT)"
            ),
            "{text}"
        );
        assert!(text.contains("  + index meta_n"), "{text}");

        let o = ok(run(&["schema-diff", &url, "--json"]));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(v["snapshots"].as_array().unwrap().len(), 3);
        let steps = v["changes"].as_array().unwrap();
        assert_eq!(steps.len(), 1, "{v}");
        let changes = steps[0]["changes"].as_array().unwrap();
        let got: Vec<(String, String)> = changes
            .iter()
            .map(|c| {
                (
                    c["change"].as_str().unwrap().to_string(),
                    c["name"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("removed".to_string(), "old_stuff".to_string()),
                ("changed".to_string(), "meta".to_string()),
                ("added".to_string(), "meta_n".to_string())
            ]
        );
        assert_eq!(
            changes[1]["old_sql"],
            "CREATE TABLE meta(k TEXT PRIMARY KEY, n INTEGER NOT NULL)"
        );

        // --limit 1: one snapshot, nothing to compare.
        let o = ok(run(&["schema-diff", &url, "--limit", "1"]));
        assert!(stdout(&o).contains("nothing to compare"), "{}", stdout(&o));
    }
}

#[test]
fn bad_inputs_and_a_corrupt_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    for (_, url) in backends(dir.path(), "schema-empty") {
        let line = error_line(&run(&["schema-diff", &url]));
        assert!(line.contains("no snapshot"), "{line}");
    }
    let line = error_line(&run(&["schema-diff", "s3://"]));
    assert!(line.contains("invalid replica URL"), "{line}");

    // Three snapshots; the middle one is damaged: skipped, and the first and last compared.
    let rdir = dir.path().join("replica");
    let url = file_url(&rdir);
    let db = dir.path().join("app.db");
    create_db(&db);
    snapshot(&db, &url);
    std::thread::sleep(std::time::Duration::from_millis(20));
    Connection::open(&db)
        .unwrap()
        .execute_batch("CREATE TABLE a(x)")
        .unwrap();
    snapshot(&db, &url);
    std::thread::sleep(std::time::Duration::from_millis(20));
    Connection::open(&db)
        .unwrap()
        .execute_batch("CREATE TABLE b(x)")
        .unwrap();
    snapshot(&db, &url);
    // Generations sort newest first: the middle one is the second.
    let snaps = objects(&rdir, ".wsnap");
    assert_eq!(snaps.len(), 3);
    corrupt(&snaps[1]);
    let o = ok(run(&["schema-diff", &url]));
    let name = snaps[1].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        stderr(&o).contains("skipped") && stderr(&o).contains(&name),
        "{}",
        stderr(&o)
    );
    let text = stdout(&o);
    assert!(
        text.contains("2 changes") && text.contains("+ table a") && text.contains("+ table b"),
        "{text}"
    );

    // Every snapshot damaged: one line.
    corrupt(&snaps[0]);
    corrupt(&snaps[2]);
    let line = error_line(&run(&["schema-diff", &url]));
    assert!(line.contains("could be read"), "{line}");
}
