//! Logical dumps: a database as SQL, row by row, in one read transaction.

use std::io::{self, Write};
use std::path::Path;

use rusqlite::Connection;
use rusqlite::types::ValueRef;
use serde::Serialize;

use super::{TableInfo, journal_mode, open_live, quote_ident, sq, table_info};
use crate::error::{EngineError, EngineResult};

/// What a dump wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DumpStats {
    /// Tables whose rows were written.
    pub tables: u64,
    /// Rows written.
    pub rows: u64,
    /// Schema statements written (tables, indexes, views, triggers).
    pub objects: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// Counts what goes through.
struct Counting<'a> {
    inner: &'a mut dyn Write,
    n: u64,
}

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the database at `path` as SQL into `out`, inside one read transaction (so the
/// dump is one consistent state, and in WAL mode the application keeps writing meanwhile).
///
/// The output loads into an empty database with `sqlite3 new.db < dump.sql` or any
/// `execute_batch`: `PRAGMA foreign_keys=OFF`, `BEGIN TRANSACTION`, `user_version` and
/// `application_id` when set, each table's `CREATE TABLE` followed by its rows
/// (`INSERT INTO "t" VALUES(...)`, or with a column list when a rowid is kept or a column
/// is generated), `sqlite_sequence` and `sqlite_stat*` contents, then indexes, views and
/// triggers (after the rows, so triggers do not fire while loading), `COMMIT`. Virtual
/// tables are declared through `PRAGMA writable_schema` as `sqlite3` does; their shadow
/// tables carry the data. Rows stream one at a time: memory stays bounded.
pub fn dump(path: &Path, out: &mut dyn Write) -> EngineResult<DumpStats> {
    let conn = open_live(path)?;
    if !journal_mode(&conn)?.eq_ignore_ascii_case("wal") {
        tracing::warn!(db = %path.display(), "not in WAL mode: writers wait while the dump reads");
    }
    conn.execute_batch("BEGIN")
        .map_err(sq("begin a read transaction"))?;
    let r = dump_conn(&conn, out);
    let _ = conn.execute_batch("COMMIT");
    r
}

fn wio(e: io::Error) -> EngineError {
    EngineError::io("write the dump", e)
}

/// The body of [`dump`], in the order the output takes (see there). One function of about
/// 90 lines on purpose: it reads top to bottom as the dump does, and each step shares the
/// writer, the counts and the schema rows with the next.
fn dump_conn(conn: &Connection, out: &mut dyn Write) -> EngineResult<DumpStats> {
    let mut w = Counting { inner: out, n: 0 };
    let mut stats = DumpStats::default();
    let mut values = ValueWriter::new(conn)?;
    w.write_all(b"PRAGMA foreign_keys=OFF;\nBEGIN TRANSACTION;\n")
        .map_err(wio)?;
    for pragma in ["user_version", "application_id"] {
        let v: i64 = conn
            .query_row(&format!("PRAGMA {pragma}"), [], |r| r.get(0))
            .map_err(sq(format!("read {pragma}")))?;
        if v != 0 {
            writeln!(w, "PRAGMA {pragma}={v};").map_err(wio)?;
        }
    }
    let entries: Vec<(String, String, String)> = {
        let mut st = conn
            .prepare(
                "SELECT type, name, sql FROM sqlite_schema WHERE sql IS NOT NULL ORDER BY rowid",
            )
            .map_err(sq("read sqlite_schema"))?;
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .and_then(|rows| rows.collect())
            .map_err(sq("read sqlite_schema"))?
    };
    let mut writable_schema = false;
    let mut sequence = false;
    let mut stats_tables: Vec<&str> = Vec::new();
    for (kind, name, sql) in &entries {
        if kind != "table" {
            continue;
        }
        let lower = name.to_ascii_lowercase();
        if lower == "sqlite_sequence" {
            sequence = true;
            continue;
        }
        if lower.starts_with("sqlite_stat") {
            stats_tables.push(name);
            continue;
        }
        if lower.starts_with("sqlite_") {
            continue;
        }
        if starts_with_words(sql, &["CREATE", "VIRTUAL", "TABLE"]) {
            if !writable_schema {
                w.write_all(b"PRAGMA writable_schema=ON;\n").map_err(wio)?;
                writable_schema = true;
            }
            writeln!(
                w,
                "INSERT INTO sqlite_schema(type,name,tbl_name,rootpage,sql)VALUES('table',{},{},0,{});",
                quote_text(name),
                quote_text(name),
                quote_text(sql)
            )
            .map_err(wio)?;
            stats.objects += 1;
            continue;
        }
        writeln!(w, "{sql};").map_err(wio)?;
        stats.objects += 1;
        let info = table_info(conn, "main", name)?;
        stats.rows += dump_rows(conn, &info, &mut values, &mut w)?;
        stats.tables += 1;
    }
    if sequence {
        w.write_all(b"DELETE FROM sqlite_sequence;\n")
            .map_err(wio)?;
        let info = table_info(conn, "main", "sqlite_sequence")?;
        stats.rows += dump_rows(conn, &info, &mut values, &mut w)?;
    }
    if !stats_tables.is_empty() {
        // ANALYZE creates the statistics tables; their rows are then replaced.
        w.write_all(b"ANALYZE sqlite_schema;\n").map_err(wio)?;
        for name in stats_tables {
            writeln!(w, "DELETE FROM {};", quote_ident(name)).map_err(wio)?;
            let info = table_info(conn, "main", name)?;
            stats.rows += dump_rows(conn, &info, &mut values, &mut w)?;
        }
    }
    for pass in ["index", "view", "trigger"] {
        for (kind, name, sql) in &entries {
            if kind == pass && !name.to_ascii_lowercase().starts_with("sqlite_") {
                writeln!(w, "{sql};").map_err(wio)?;
                stats.objects += 1;
            }
        }
    }
    if writable_schema {
        w.write_all(b"PRAGMA writable_schema=OFF;\n").map_err(wio)?;
    }
    w.write_all(b"COMMIT;\n").map_err(wio)?;
    w.flush().map_err(wio)?;
    stats.bytes = w.n;
    Ok(stats)
}

/// True if `sql` starts with these keywords (any case, any whitespace between).
fn starts_with_words(sql: &str, words: &[&str]) -> bool {
    let mut it = sql.split_whitespace();
    words
        .iter()
        .all(|w| it.next().is_some_and(|t| t.eq_ignore_ascii_case(w)))
}

fn dump_rows(
    conn: &Connection,
    t: &TableInfo,
    values: &mut ValueWriter<'_>,
    w: &mut dyn Write,
) -> EngineResult<u64> {
    let (list, explicit) = t.column_list();
    if list.is_empty() {
        return Ok(0);
    }
    let prefix = if explicit {
        format!("INSERT INTO {}({list}) VALUES(", quote_ident(&t.name))
    } else {
        format!("INSERT INTO {} VALUES(", quote_ident(&t.name))
    };
    let ctx = format!("read table {}", t.name);
    let mut st = conn
        .prepare(&format!("SELECT {list} FROM {}", quote_ident(&t.name)))
        .map_err(sq(ctx.clone()))?;
    let n_cols = st.column_count();
    let mut rows = st.query([]).map_err(sq(ctx.clone()))?;
    let mut n = 0u64;
    while let Some(row) = rows.next().map_err(sq(ctx.clone()))? {
        w.write_all(prefix.as_bytes()).map_err(wio)?;
        for i in 0..n_cols {
            if i > 0 {
                w.write_all(b",").map_err(wio)?;
            }
            let v = row.get_ref(i).map_err(sq(ctx.clone()))?;
            values.write(w, v)?;
        }
        w.write_all(b");\n").map_err(wio)?;
        n += 1;
    }
    Ok(n)
}

/// Writes values as SQL literals that read back as the same value and type.
pub(super) struct ValueWriter<'c> {
    /// `CAST(?1 AS REAL)`: SQLite's own text-to-real conversion, which its parser uses for
    /// literals too. It is not correctly rounded for every double, so each real's shortest
    /// decimal is checked against it.
    parse_real: rusqlite::CachedStatement<'c>,
}

impl<'c> ValueWriter<'c> {
    pub(super) fn new(conn: &'c Connection) -> EngineResult<Self> {
        Ok(ValueWriter {
            parse_real: conn
                .prepare_cached("SELECT CAST(?1 AS REAL)")
                .map_err(sq("prepare a statement"))?,
        })
    }

    pub(super) fn write(&mut self, w: &mut dyn Write, v: ValueRef<'_>) -> EngineResult<()> {
        match v {
            ValueRef::Null => w.write_all(b"NULL"),
            ValueRef::Integer(i) => write!(w, "{i}"),
            ValueRef::Real(f) => {
                let lit = self.real(f)?;
                w.write_all(lit.as_bytes())
            }
            ValueRef::Text(b) => match std::str::from_utf8(b) {
                Ok(s) if !s.contains('\0') => w.write_all(quote_text(s).as_bytes()),
                // Bytes SQL text cannot hold as they are: keep them exactly.
                _ => w
                    .write_all(b"CAST(")
                    .and_then(|()| write_blob(w, b))
                    .and_then(|()| w.write_all(b" AS TEXT)")),
            },
            ValueRef::Blob(b) => write_blob(w, b),
        }
        .map_err(wio)
    }

    /// A real as SQL that reads back as the same bits: its shortest round-trip decimal
    /// (always with `.` or `e`, so it stays a REAL) when SQLite parses that back exactly,
    /// else an exact expression ([`exact_real`]); infinities as `9.0e+999`, SQLite's own
    /// spelling. SQLite stores no NaN (it becomes NULL).
    fn real(&mut self, f: f64) -> EngineResult<String> {
        if f.is_infinite() {
            return Ok(if f > 0.0 { "9.0e+999" } else { "-9.0e+999" }.to_string());
        }
        if f.is_nan() {
            return Ok("NULL".to_string());
        }
        let lit = format!("{f:?}");
        if f == 0.0 {
            return Ok(lit);
        }
        let back: f64 = self
            .parse_real
            .query_row([&lit], |r| r.get(0))
            .map_err(sq("check a real"))?;
        Ok(if back.to_bits() == f.to_bits() {
            lit
        } else {
            exact_real(f)
        })
    }
}

/// `(CAST(m AS REAL)*2^k...)` or `(.../2^k...)` for `f = m * 2^e`: an integer below 2^53
/// converts to a double exactly, and multiplying or dividing by a power of two (as an
/// integer up to 2^62) is exact, also when the result is subnormal (every intermediate
/// lies between `m` and `f`).
fn exact_real(f: f64) -> String {
    let bits = f.to_bits();
    let negative = bits >> 63 == 1;
    let biased = ((bits >> 52) & 0x7ff) as i32;
    let frac = bits & ((1u64 << 52) - 1);
    let (mut m, mut e) = if biased == 0 {
        (frac, -1074)
    } else {
        (frac | (1u64 << 52), biased - 1075)
    };
    while m != 0 && m & 1 == 0 {
        m >>= 1;
        e += 1;
    }
    let mut out = format!("(CAST({}{m} AS REAL)", if negative { "-" } else { "" });
    let op = if e > 0 { '*' } else { '/' };
    let mut left = e.unsigned_abs();
    while left > 0 {
        let k = left.min(62);
        out.push(op);
        out.push_str(&(1u64 << k).to_string());
        left -= k;
    }
    out.push(')');
    out
}

/// `'text'` with `'` doubled.
pub fn quote_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push('\'');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

fn write_blob(w: &mut dyn Write, b: &[u8]) -> io::Result<()> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    w.write_all(b"X'")?;
    let mut buf = [0u8; 8192];
    for chunk in b.chunks(buf.len() / 2) {
        for (i, byte) in chunk.iter().enumerate() {
            buf[2 * i] = HEX[usize::from(byte >> 4)];
            buf[2 * i + 1] = HEX[usize::from(byte & 0xf)];
        }
        w.write_all(&buf[..chunk.len() * 2])?;
    }
    w.write_all(b"'")
}
