//! Helpers of the tools' end-to-end tests (dump, verify, restore --table, schema-diff): a
//! database full of awkward values, a comparison of every table's rows, replicas on a local
//! directory and on the moto S3 server, and one-line error checks.

#![allow(dead_code, clippy::unwrap_used, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use rusqlite::Connection;
use rusqlite::types::ValueRef;
use walship_storage::testkit::MotoServer;

use crate::common::{file_url, walship};

/// A value compared exactly (reals by their bits).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum V {
    Null,
    Int(i64),
    Real(u64),
    Text(Vec<u8>),
    Blob(Vec<u8>),
}

fn v(r: ValueRef<'_>) -> V {
    match r {
        ValueRef::Null => V::Null,
        ValueRef::Integer(i) => V::Int(i),
        ValueRef::Real(f) => V::Real(f.to_bits()),
        ValueRef::Text(t) => V::Text(t.to_vec()),
        ValueRef::Blob(b) => V::Blob(b.to_vec()),
    }
}

/// Every table's rows (with the rowid of rowid tables), in order; and `user_version`.
pub fn contents(path: &Path) -> BTreeMap<String, Vec<Vec<V>>> {
    let c = Connection::open(path).unwrap();
    let tables: Vec<(String, bool)> = {
        let mut st = c
            .prepare(
                "SELECT name, wr FROM pragma_table_list WHERE schema = 'main' AND type IN ('table', 'shadow') \
                 AND name NOT IN ('sqlite_schema', 'sqlite_temp_schema') ORDER BY name",
            )
            .unwrap();
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let mut out = BTreeMap::new();
    for (t, without_rowid) in tables {
        let q = format!("\"{}\"", t.replace('"', "\"\""));
        let sql = if without_rowid {
            format!("SELECT * FROM {q}")
        } else {
            format!("SELECT _rowid_, * FROM {q} ORDER BY _rowid_")
        };
        let mut st = c.prepare(&sql).unwrap();
        let n = st.column_count();
        let mut rows: Vec<Vec<V>> = st
            .query_map([], |r| (0..n).map(|i| Ok(v(r.get_ref(i)?))).collect())
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        rows.sort();
        out.insert(t, rows);
    }
    let uv: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    out.insert("#user_version".into(), vec![vec![V::Int(uv)]]);
    out
}

/// `sqlite_schema` without root pages.
pub fn schema(path: &Path) -> Vec<(String, String, String, Option<String>)> {
    let c = Connection::open(path).unwrap();
    let mut st = c
        .prepare("SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY type, name")
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

pub fn integrity(path: &Path) -> String {
    Connection::open(path)
        .unwrap()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap()
}

/// A WAL database with every awkward thing a dump must carry: quotes, newlines, NUL,
/// invalid UTF-8, unicode, NULL, blobs, extreme integers and reals, WITHOUT ROWID, a rowid
/// table without INTEGER PRIMARY KEY (rowids with holes), AUTOINCREMENT, generated columns,
/// an index, a view, a trigger, a foreign key, quoted identifiers, FTS5, statistics.
pub fn create_tricky_db(path: &Path) {
    let c = Connection::open(path).unwrap();
    c.pragma_update(None, "journal_mode", "wal").unwrap();
    c.execute_batch(
        r#"
        PRAGMA user_version = 42;
        CREATE TABLE parent(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE);
        CREATE TABLE child(
            id INTEGER PRIMARY KEY,
            parent_id INTEGER REFERENCES parent(id),
            note TEXT,
            data BLOB,
            n INTEGER,
            r REAL,
            anything
        );
        CREATE TABLE kv(k TEXT PRIMARY KEY, v ANY) WITHOUT ROWID;
        CREATE TABLE plain(a, b);
        CREATE TABLE "we""ird name"("col ""x""" TEXT, "select" INTEGER);
        CREATE TABLE gen(x INTEGER, twice INTEGER GENERATED ALWAYS AS (x * 2) STORED, plus1 AS (x + 1));
        CREATE TABLE strict_t(i INTEGER, r REAL, t TEXT, b BLOB, a ANY) STRICT;
        CREATE INDEX child_parent ON child(parent_id);
        CREATE UNIQUE INDEX plain_ab ON plain(a, b);
        CREATE VIEW child_names AS SELECT c.id, p.name, c.note FROM child c JOIN parent p ON p.id = c.parent_id;
        CREATE TABLE audit(at INTEGER, what TEXT);
        CREATE TRIGGER child_audit AFTER INSERT ON child BEGIN
            INSERT INTO audit VALUES (NEW.id, 'child ' || NEW.id);
        END;
        CREATE VIRTUAL TABLE docs USING fts5(title, body);
        "#,
    )
    .unwrap();
    for (i, name) in ["o'neil", "quote\"d", "new\nline", "日本語 ✓ 😀", ""]
        .iter()
        .enumerate()
    {
        c.execute(
            "INSERT INTO parent(id, name) VALUES (?1, ?2)",
            rusqlite::params![i as i64 + 1, name],
        )
        .unwrap();
    }
    // Leave a gap and a high sqlite_sequence.
    c.execute("INSERT INTO parent(id, name) VALUES (100, 'hundred')", [])
        .unwrap();
    c.execute("DELETE FROM parent WHERE id = 100", []).unwrap();
    let reals = [
        0.1,
        1e308,
        -1e308,
        5e-324,
        f64::MAX,
        f64::MIN_POSITIVE,
        1.0,
        -0.0,
        0.30000000000000004,
        6.536982303948592e-214,
        2.280793064967074e209,
        f64::INFINITY,
        f64::NEG_INFINITY,
        123456789.125,
    ];
    let ints = [0i64, 1, -1, i64::MAX, i64::MIN, 1 << 53, (1 << 53) + 1];
    for i in 0..40i64 {
        let note: Option<String> = match i % 5 {
            0 => None,
            1 => Some("it's a 'quoted' \"string\"".into()),
            2 => Some("line1\nline2\r\nline3\ttab".into()),
            3 => Some("unicode: ñ ü 中文 🎉 \u{200b}".into()),
            _ => Some("x".repeat(i as usize * 50)),
        };
        let data: Option<Vec<u8>> = match i % 4 {
            0 => None,
            1 => Some(vec![]),
            2 => Some((0..=255u8).collect()),
            _ => Some(vec![0u8; 3000 + i as usize]),
        };
        let anything: rusqlite::types::Value = match i % 6 {
            0 => rusqlite::types::Value::Null,
            1 => rusqlite::types::Value::Integer(ints[i as usize % ints.len()]),
            2 => rusqlite::types::Value::Real(reals[i as usize % reals.len()]),
            3 => rusqlite::types::Value::Text("42".into()),
            4 => rusqlite::types::Value::Blob(b"\x00\x01'\x02".to_vec()),
            _ => rusqlite::types::Value::Text("1e5".into()),
        };
        c.execute(
            "INSERT INTO child(parent_id, note, data, n, r, anything) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            rusqlite::params![
                1 + i % 5,
                note,
                data,
                ints[i as usize % ints.len()],
                reals[i as usize % reals.len()],
                anything
            ],
        )
        .unwrap();
    }
    // Text SQL cannot carry as is: NUL inside, invalid UTF-8.
    c.execute(
        "INSERT INTO child(note, anything) VALUES (CAST(X'610062' AS TEXT), CAST(X'FFFE41' AS TEXT))",
        [],
    )
    .unwrap();
    for (k, val) in [
        ("int", rusqlite::types::Value::Integer(i64::MIN)),
        ("real", rusqlite::types::Value::Real(1e-300)),
        (
            "text",
            rusqlite::types::Value::Text("'; DROP TABLE kv; --".into()),
        ),
        (
            "blob",
            rusqlite::types::Value::Blob(vec![0xde, 0xad, 0xbe, 0xef]),
        ),
        ("null", rusqlite::types::Value::Null),
    ] {
        c.execute("INSERT INTO kv VALUES (?1, ?2)", rusqlite::params![k, val])
            .unwrap();
    }
    for i in 0..30i64 {
        c.execute(
            "INSERT INTO plain VALUES (?1, ?2)",
            rusqlite::params![i, format!("b{i}")],
        )
        .unwrap();
    }
    c.execute("DELETE FROM plain WHERE a % 7 = 3", []).unwrap();
    c.execute(
        "INSERT INTO \"we\"\"ird name\" VALUES ('v', 1), (NULL, NULL)",
        [],
    )
    .unwrap();
    c.execute("INSERT INTO gen(x) VALUES (1), (2), (NULL)", [])
        .unwrap();
    c.execute(
        "INSERT INTO strict_t VALUES (1, 2.5, 't', X'00', 3.25), (NULL, NULL, NULL, NULL, 'any')",
        [],
    )
    .unwrap();
    c.execute(
        "INSERT INTO docs VALUES ('first', 'hello world'), ('second', 'it''s full-text')",
        [],
    )
    .unwrap();
    c.execute_batch("ANALYZE").unwrap();
}

/// Loads a dump into a new database at `path` (as `sqlite3 new.db < dump.sql` would).
pub fn load_dump(sql: &str, path: &Path) {
    let c = Connection::open(path).unwrap();
    c.execute_batch(sql)
        .unwrap_or_else(|e| panic!("the dump does not load: {e}"));
}

/// Asserts two databases hold the same schema and rows.
pub fn assert_same(a: &Path, b: &Path) {
    assert_eq!(schema(a), schema(b), "schemas differ");
    let (ca, cb) = (contents(a), contents(b));
    for (t, rows) in &ca {
        assert_eq!(Some(rows), cb.get(t), "table {t} differs");
    }
    assert_eq!(ca.len(), cb.len(), "tables differ");
    assert_eq!(integrity(b), "ok");
}

/// Runs `walship ARGS`.
pub fn run(args: &[&str]) -> Output {
    walship().args(args).output().unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn ok(o: Output) -> Output {
    assert!(o.status.success(), "walship failed:\n{}", stderr(&o));
    o
}

/// The one `error:` line of a failed run.
pub fn error_line(o: &Output) -> String {
    assert!(!o.status.success(), "expected a failure:\n{}", stderr(o));
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{err}");
    lines[0].to_string()
}

/// A replica on each backend: a local directory and a prefix on the moto S3 server.
pub fn backends(dir: &Path, tag: &str) -> Vec<(&'static str, String)> {
    let moto = MotoServer::shared();
    vec![
        ("file", file_url(&dir.join(format!("replica-{tag}")))),
        (
            "s3",
            moto.url(moto.bucket(), &MotoServer::unique_prefix(tag))
                .to_string(),
        ),
    ]
}

/// `walship snapshot DB URL`: a new generation holding the database as it is.
pub fn snapshot(db: &Path, url: &str) {
    ok(run(&["snapshot", db.to_str().unwrap(), url]));
}

/// Now as RFC 3339 with milliseconds, after a short pause on each side (so objects written
/// before and after fall on different milliseconds).
pub fn instant_between() -> String {
    std::thread::sleep(Duration::from_millis(30));
    let t = time::OffsetDateTime::now_utc();
    std::thread::sleep(Duration::from_millis(30));
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// The object files of a local replica with this extension, sorted by path (newest
/// snapshot of a generation first, generations newest first).
pub fn objects(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(ext) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Flips a byte in the middle of a file.
pub fn corrupt(p: &Path) {
    let mut b = std::fs::read(p).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x20;
    std::fs::write(p, b).unwrap();
}

/// Files in `dir` whose names contain `walship` (temporary files left behind).
pub fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("walship"))
        .collect()
}

pub fn count(db: &Path, table: &str) -> i64 {
    Connection::open(db)
        .unwrap()
        .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .unwrap()
}

/// A consistent copy of a database (SQLite's backup API: rowids and all).
pub fn backup(src: &Path, dest: &Path) {
    Connection::open(src)
        .unwrap()
        .backup(rusqlite::MAIN_DB, dest, None)
        .unwrap();
}
