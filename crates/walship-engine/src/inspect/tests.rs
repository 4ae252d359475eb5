#![allow(clippy::unwrap_used)]

use rusqlite::types::ValueRef;

use super::dump::ValueWriter;
use super::*;

fn literal(c: &Connection, v: ValueRef<'_>) -> String {
    let mut w = ValueWriter::new(c).unwrap();
    let mut buf = Vec::new();
    w.write(&mut buf, v).unwrap();
    String::from_utf8(buf).unwrap()
}

#[test]
fn reals_round_trip_bit_for_bit() {
    let c = Connection::open_in_memory().unwrap();
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut values = vec![
        0.1,
        1e308,
        -1e308,
        f64::MIN_POSITIVE,
        5e-324,
        -5e-324,
        f64::MAX,
        f64::MIN,
        1.0,
        -0.5,
        1e16,
        123456789.0,
        0.30000000000000004,
        f64::INFINITY,
        f64::NEG_INFINITY,
        2f64.powi(63),
    ];
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let f = f64::from_bits(x);
        if f.is_finite() {
            values.push(f);
        }
    }
    let mut exact = 0;
    for f in values {
        let lit = literal(&c, ValueRef::Real(f));
        exact += usize::from(lit.starts_with("(CAST("));
        let (back, ty): (f64, String) = c
            .query_row(&format!("SELECT {lit}, typeof({lit})"), [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(ty, "real", "{lit}");
        assert_eq!(back.to_bits(), f.to_bits(), "{f:e} written as {lit}");
    }
    // Simple values stay readable.
    assert_eq!(literal(&c, ValueRef::Real(0.1)), "0.1");
    assert_eq!(literal(&c, ValueRef::Real(1e308)), "1e308");
    assert!(exact < 20_000 / 2, "{exact}");
}

#[test]
fn integers_and_text_keep_their_type() {
    let c = Connection::open_in_memory().unwrap();
    for i in [0i64, -1, i64::MAX, i64::MIN, 1 << 53] {
        let lit = literal(&c, ValueRef::Integer(i));
        let (back, ty): (i64, String) = c
            .query_row(&format!("SELECT {lit}, typeof({lit})"), [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((back, ty.as_str()), (i, "integer"), "{lit}");
    }
    let texts: [&[u8]; 5] = [
        b"it's",
        b"a\nb\r\n",
        b"nul\0inside",
        b"\xff\xfe bad utf-8",
        "\u{65e5}\u{672c} \u{1f600}".as_bytes(),
    ];
    for t in texts {
        let lit = literal(&c, ValueRef::Text(t));
        let (back, ty): (Vec<u8>, String) = c
            .query_row(
                &format!("SELECT CAST({lit} AS BLOB), typeof({lit})"),
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((back.as_slice(), ty.as_str()), (t, "text"), "{lit}");
    }
    assert_eq!(literal(&c, ValueRef::Blob(&[0, 0xab, 0xff])), "X'00abff'");
    assert_eq!(literal(&c, ValueRef::Blob(&[])), "X''");
}

#[test]
fn dump_loads_back_with_sequence_stats_and_fts() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("a.db");
    let c = Connection::open(&db).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL;
         CREATE TABLE a(id INTEGER PRIMARY KEY AUTOINCREMENT, x TEXT);
         CREATE TABLE b(x, y);
         CREATE TABLE g(x INT, y INT GENERATED ALWAYS AS (x * 2) STORED, z AS (x + 1));
         CREATE INDEX b_x ON b(x);
         CREATE VIRTUAL TABLE f USING fts5(body);
         INSERT INTO a(x) VALUES ('one'), ('two'), ('three');
         DELETE FROM a WHERE id = 3;
         INSERT INTO b VALUES (1, 2), (3, 4);
         DELETE FROM b WHERE x = 1;
         INSERT INTO g(x) VALUES (5);
         INSERT INTO f VALUES ('hello world');
         ANALYZE;
         PRAGMA user_version = 7;",
    )
    .unwrap();
    let mut out = Vec::new();
    let stats = dump(&db, &mut out).unwrap();
    assert!(stats.rows >= 5, "{stats:?}");
    let text = String::from_utf8(out.clone()).unwrap();
    assert!(text.starts_with("PRAGMA foreign_keys=OFF;\nBEGIN TRANSACTION;\n"));
    assert!(text.ends_with("COMMIT;\n"));
    // b keeps its rowid 2.
    assert!(
        text.contains("INSERT INTO \"b\"(rowid,\"x\",\"y\") VALUES(2,3,4);"),
        "{text}"
    );
    let path2 = dir.path().join("b.db");
    let c2 = Connection::open(&path2).unwrap();
    c2.execute_batch(&text).unwrap();
    drop(c2);
    let c2 = Connection::open(&path2).unwrap();
    let seq: i64 = c2
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'a'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(seq, 3);
    let hit: i64 = c2
        .query_row("SELECT count(*) FROM f WHERE f MATCH 'hello'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(hit, 1);
    let g: (i64, i64, i64) = c2
        .query_row("SELECT x, y, z FROM g", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!(g, (5, 10, 6));
    let uv: i64 = c2
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(uv, 7);
    let ok: String = c2
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    let stat_rows: i64 = c2
        .query_row("SELECT count(*) FROM sqlite_stat1", [], |r| r.get(0))
        .unwrap();
    let src_stat_rows: i64 = c
        .query_row("SELECT count(*) FROM sqlite_stat1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(stat_rows, src_stat_rows);
    // Dumping the copy gives the same text.
    let mut again = Vec::new();
    dump(&path2, &mut again).unwrap();
    assert_eq!(String::from_utf8(again).unwrap(), text);
}

#[test]
fn schema_diff_names_added_removed_and_changed() {
    let e = |k: &str, n: &str, sql: &str| SchemaEntry {
        kind: k.into(),
        name: n.into(),
        tbl_name: n.into(),
        sql: Some(sql.into()),
    };
    let old = vec![
        e("table", "a", "CREATE TABLE a(x)"),
        e("table", "b", "CREATE TABLE b(x)"),
    ];
    let new = vec![
        e("table", "a", "CREATE TABLE a(x, y)"),
        e("index", "i", "CREATE INDEX i ON a(x)"),
    ];
    let d = diff_schema(&old, &new);
    let got: Vec<(&str, &str)> = d.iter().map(|c| (c.change, c.name.as_str())).collect();
    assert_eq!(got, [("removed", "b"), ("changed", "a"), ("added", "i")]);
    assert!(diff_schema(&new, &new).is_empty());
}
