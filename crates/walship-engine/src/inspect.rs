//! Reading databases for the tools around replication: logical SQL dumps, row counts,
//! schemas, copies of single tables, and decoding one snapshot object into a file.
//!
//! - [`dump`] writes a database as SQL (like `sqlite3`'s `.dump`), row by row, inside one
//!   read transaction: a live database keeps taking writes meanwhile (in WAL mode).
//! - [`LiveDb`] reads a live database without writing to it: `PRAGMA data_version` (did
//!   anyone commit since?) and a [`Summary`] (page count, per-table row counts) taken in
//!   one read transaction.
//! - [`read_schema`] lists what `sqlite_schema` holds; [`diff_schema`] compares two lists.
//! - [`copy_tables`] builds a new database holding some tables of another (their
//!   statements, rows, indexes, triggers and `sqlite_sequence` entries).
//! - [`snapshot_to_file`] downloads and decodes one snapshot object (no segments).
//!
//! Everything here except [`snapshot_to_file`] blocks: call it from a blocking thread.
//!
//! **Invariant:** nothing here writes to a database it did not create: live databases are
//! opened with `query_only` and without checkpoint-on-close.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use rusqlite::config::DbConfig;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use walship_format::FormatError;
use walship_format::object::{Kind, ObjectHeader, ObjectReader};

use crate::error::{EngineError, EngineResult};
use crate::replica::{Listed, Replica};

/// How long a reader waits for a lock (only recovery or an exclusive lock can make it wait).
const BUSY: Duration = Duration::from_secs(5);

fn sq(context: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> EngineError {
    let context = context.into();
    move |e| EngineError::sqlite(context, e)
}

/// Opens a database that belongs to someone else for reading only: `query_only`, no
/// checkpoint when the connection closes (so the WAL is never restarted or deleted behind
/// a replicator's back). A missing file is [`EngineError::MissingDatabase`].
pub fn open_live(path: &Path) -> EngineResult<Connection> {
    if !path.is_file() {
        return Err(EngineError::MissingDatabase {
            path: path.to_path_buf(),
        });
    }
    // Read-write (never used to write) because a read-only connection cannot open a WAL
    // database whose -shm does not exist yet.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn =
        Connection::open_with_flags(path, flags).map_err(sq(format!("open {}", path.display())))?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
        .map_err(sq("disable checkpoint on close"))?;
    conn.busy_timeout(BUSY).map_err(sq("set busy timeout"))?;
    conn.pragma_update(None, "query_only", true)
        .map_err(sq("set query_only"))?;
    // Fail now, with a clear message, on a file that is not a database.
    conn.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))
        .map_err(sq(format!(
            "read {} (is it a SQLite database?)",
            path.display()
        )))?;
    Ok(conn)
}

/// Opens a database walship made itself (a restored temporary file).
fn open_own(path: &Path) -> EngineResult<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn =
        Connection::open_with_flags(path, flags).map_err(sq(format!("open {}", path.display())))?;
    conn.busy_timeout(BUSY).map_err(sq("set busy timeout"))?;
    Ok(conn)
}

/// The journal mode of a connection's main database.
fn journal_mode(conn: &Connection) -> EngineResult<String> {
    conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .map_err(sq("read journal_mode"))
}

// ---------------------------------------------------------------------------------------
// Schema

/// One row of `sqlite_schema`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SchemaEntry {
    /// `table`, `index`, `view` or `trigger`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The object's name.
    pub name: String,
    /// The table it belongs to (its own name for a table or view).
    pub tbl_name: String,
    /// The statement that created it; `None` for automatic indexes.
    pub sql: Option<String>,
}

fn schema_of(conn: &Connection) -> EngineResult<Vec<SchemaEntry>> {
    let mut st = conn
        .prepare(
            "SELECT type, name, tbl_name, sql FROM sqlite_schema \
             WHERE sql IS NOT NULL ORDER BY type, name",
        )
        .map_err(sq("read sqlite_schema"))?;
    st.query_map([], |r| {
        Ok(SchemaEntry {
            kind: r.get(0)?,
            name: r.get(1)?,
            tbl_name: r.get(2)?,
            sql: r.get(3)?,
        })
    })
    .and_then(|rows| rows.collect())
    .map_err(sq("read sqlite_schema"))
}

/// The schema of the database at `path` (objects with a statement: not automatic
/// indexes), ordered by type and name. Opens the file as someone else's.
pub fn read_schema(path: &Path) -> EngineResult<Vec<SchemaEntry>> {
    schema_of(&open_live(path)?)
}

/// How one object differs between two schemas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SchemaChange {
    /// `added`, `removed` or `changed`.
    pub change: &'static str,
    /// The object's type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The object's name.
    pub name: String,
    /// Its table.
    pub tbl_name: String,
    /// The statement before (`None` if added).
    pub old_sql: Option<String>,
    /// The statement after (`None` if removed).
    pub new_sql: Option<String>,
}

/// The changes from `old` to `new`, by type and name: removed objects first, then changed,
/// then added, each in type and name order.
pub fn diff_schema(old: &[SchemaEntry], new: &[SchemaEntry]) -> Vec<SchemaChange> {
    let key = |e: &SchemaEntry| (e.kind.clone(), e.name.to_ascii_lowercase());
    let before: BTreeMap<_, &SchemaEntry> = old.iter().map(|e| (key(e), e)).collect();
    let after: BTreeMap<_, &SchemaEntry> = new.iter().map(|e| (key(e), e)).collect();
    let mut removed = Vec::new();
    let mut changed = Vec::new();
    let mut added = Vec::new();
    for (k, o) in &before {
        match after.get(k) {
            None => removed.push(SchemaChange {
                change: "removed",
                kind: o.kind.clone(),
                name: o.name.clone(),
                tbl_name: o.tbl_name.clone(),
                old_sql: o.sql.clone(),
                new_sql: None,
            }),
            Some(n) if n.sql != o.sql || n.tbl_name != o.tbl_name => changed.push(SchemaChange {
                change: "changed",
                kind: n.kind.clone(),
                name: n.name.clone(),
                tbl_name: n.tbl_name.clone(),
                old_sql: o.sql.clone(),
                new_sql: n.sql.clone(),
            }),
            Some(_) => {}
        }
    }
    for (k, n) in &after {
        if !before.contains_key(k) {
            added.push(SchemaChange {
                change: "added",
                kind: n.kind.clone(),
                name: n.name.clone(),
                tbl_name: n.tbl_name.clone(),
                old_sql: None,
                new_sql: n.sql.clone(),
            });
        }
    }
    removed.into_iter().chain(changed).chain(added).collect()
}

// ---------------------------------------------------------------------------------------
// Tables

/// What walship needs to know about a table to copy its rows.
#[derive(Debug, Clone)]
struct TableInfo {
    name: String,
    /// Columns that take values on INSERT (not generated, not hidden).
    columns: Vec<String>,
    /// All columns are insertable.
    all_columns: bool,
    /// A name under which the rowid can be read and written, when the table has a rowid
    /// that is not an alias of an INTEGER PRIMARY KEY column (it must be kept: apps and
    /// external-content indexes refer to it).
    rowid: Option<&'static str>,
    /// `virtual` for virtual tables, `table` or `shadow` otherwise.
    kind: String,
}

/// Quotes an identifier: `"name"`, with `"` doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn table_info(conn: &Connection, schema: &str, name: &str) -> EngineResult<TableInfo> {
    let ctx = format!("read the columns of table {name}");
    let (kind, without_rowid): (String, bool) = conn
        .query_row(
            "SELECT type, wr FROM pragma_table_list WHERE schema = ?1 AND name = ?2",
            [schema, name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(sq(ctx.clone()))?;
    let mut st = conn
        .prepare("SELECT name, type, pk, hidden FROM pragma_table_xinfo(?1, ?2) ORDER BY cid")
        .map_err(sq(ctx.clone()))?;
    let cols: Vec<(String, String, i64, i64)> = st
        .query_map([name, schema], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .and_then(|rows| rows.collect())
        .map_err(sq(ctx))?;
    let columns: Vec<String> = cols
        .iter()
        .filter(|c| c.3 == 0)
        .map(|c| c.0.clone())
        .collect();
    let pks: Vec<&(String, String, i64, i64)> = cols.iter().filter(|c| c.2 > 0).collect();
    let int_pk_alias = pks.len() == 1 && pks[0].1.eq_ignore_ascii_case("INTEGER");
    let rowid = if without_rowid || kind == "virtual" || int_pk_alias {
        None
    } else {
        ["rowid", "_rowid_", "oid"]
            .into_iter()
            .find(|alias| !cols.iter().any(|c| c.0.eq_ignore_ascii_case(alias)))
    };
    Ok(TableInfo {
        name: name.to_string(),
        all_columns: columns.len() == cols.len(),
        columns,
        rowid,
        kind,
    })
}

impl TableInfo {
    /// `("rowid","a","b")`-style column list for INSERT and SELECT, and whether it is
    /// needed (a plain `INSERT INTO t VALUES(...)` fits when every column is listed in
    /// order and no rowid is kept).
    fn column_list(&self) -> (String, bool) {
        let mut parts: Vec<String> = Vec::with_capacity(self.columns.len() + 1);
        if let Some(r) = self.rowid {
            parts.push(r.to_string());
        }
        parts.extend(self.columns.iter().map(|c| quote_ident(c)));
        (parts.join(","), self.rowid.is_some() || !self.all_columns)
    }
}

// ---------------------------------------------------------------------------------------
// Dump

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
struct ValueWriter<'c> {
    /// `CAST(?1 AS REAL)`: SQLite's own text-to-real conversion, which its parser uses for
    /// literals too. It is not correctly rounded for every double, so each real's shortest
    /// decimal is checked against it.
    parse_real: rusqlite::CachedStatement<'c>,
}

impl<'c> ValueWriter<'c> {
    fn new(conn: &'c Connection) -> EngineResult<Self> {
        Ok(ValueWriter {
            parse_real: conn
                .prepare_cached("SELECT CAST(?1 AS REAL)")
                .map_err(sq("prepare a statement"))?,
        })
    }

    fn write(&mut self, w: &mut dyn Write, v: ValueRef<'_>) -> EngineResult<()> {
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

// ---------------------------------------------------------------------------------------
// Summaries and live databases

/// Rows of one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableCount {
    /// The table.
    pub name: String,
    /// Its rows.
    pub rows: u64,
}

/// A database's size and per-table row counts, read in one transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// `PRAGMA page_count`.
    pub page_count: u64,
    /// `PRAGMA page_size`.
    pub page_size: u64,
    /// Ordinary tables (not virtual, not SQLite's own), by name.
    pub tables: Vec<TableCount>,
}

fn summarize_conn(conn: &Connection) -> EngineResult<Summary> {
    let page_count: u64 = conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .map_err(sq("read page_count"))?;
    let page_size: u64 = conn
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .map_err(sq("read page_size"))?;
    let names: Vec<String> = {
        let mut st = conn
            .prepare(
                "SELECT name FROM pragma_table_list WHERE schema = 'main' AND type = 'table' \
                 AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name",
            )
            .map_err(sq("list tables"))?;
        st.query_map([], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(sq("list tables"))?
    };
    let mut tables = Vec::with_capacity(names.len());
    for name in names {
        let rows: u64 = conn
            .query_row(
                &format!("SELECT count(*) FROM {}", quote_ident(&name)),
                [],
                |r| r.get(0),
            )
            .map_err(sq(format!("count the rows of {name}")))?;
        tables.push(TableCount { name, rows });
    }
    Ok(Summary {
        page_count,
        page_size,
        tables,
    })
}

/// The summary of a database walship made (a restored file), after `PRAGMA
/// integrity_check` passed.
pub fn check_and_summarize(path: &Path) -> EngineResult<Summary> {
    crate::restore::integrity_check(path)?;
    let conn = open_own(path)?;
    conn.execute_batch("BEGIN").map_err(sq("begin"))?;
    let r = summarize_conn(&conn);
    let _ = conn.execute_batch("COMMIT");
    r
}

/// The summary of a database walship made (a restored file), without checking it again.
pub fn summarize(path: &Path) -> EngineResult<Summary> {
    let conn = open_own(path)?;
    conn.execute_batch("BEGIN").map_err(sq("begin"))?;
    let r = summarize_conn(&conn);
    let _ = conn.execute_batch("COMMIT");
    r
}

/// A connection to a live database that never writes to it.
#[derive(Debug)]
pub struct LiveDb {
    conn: Connection,
}

impl LiveDb {
    /// Opens it ([`EngineError::MissingDatabase`] if there is no file).
    pub fn open(path: &Path) -> EngineResult<LiveDb> {
        Ok(LiveDb {
            conn: open_live(path)?,
        })
    }

    /// `PRAGMA data_version`: changes when another connection commits.
    pub fn data_version(&self) -> EngineResult<i64> {
        self.conn
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .map_err(sq("read data_version"))
    }

    /// The summary and the `data_version`, read in one read transaction.
    pub fn summary(&self) -> EngineResult<(Summary, i64)> {
        self.conn
            .execute_batch("BEGIN")
            .map_err(sq("begin a read transaction"))?;
        let r = summarize_conn(&self.conn).and_then(|s| Ok((s, self.data_version()?)));
        let _ = self.conn.execute_batch("COMMIT");
        r
    }

    /// The schema.
    pub fn schema(&self) -> EngineResult<Vec<SchemaEntry>> {
        schema_of(&self.conn)
    }
}

// ---------------------------------------------------------------------------------------
// Copying tables

/// One table copied by [`copy_tables`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CopiedTable {
    /// The table's name as stored.
    pub name: String,
    /// Rows copied.
    pub rows: u64,
    /// Indexes created (besides automatic ones).
    pub indexes: u64,
    /// Triggers created.
    pub triggers: u64,
}

/// Creates the database `dest` (which must not exist) holding the tables `names` of `src`
/// (matched without regard to ASCII case, as SQLite does): each table's statement, its rows
/// (with their rowids), its indexes and triggers, its `sqlite_sequence` entry, and the
/// source's page size and text encoding. Views are not copied (they may span other
/// tables). An unknown name is [`EngineError::UnknownTable`], before anything is created.
/// Then runs `PRAGMA integrity_check` on `dest`. On error `dest` may hold a partial
/// database: the caller writes to a temporary path.
pub fn copy_tables(src: &Path, dest: &Path, names: &[String]) -> EngineResult<Vec<CopiedTable>> {
    let source = open_own(src)?;
    let schema: Vec<(String, String, String, Option<String>)> = {
        let mut st = source
            .prepare("SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY rowid")
            .map_err(sq("read sqlite_schema"))?;
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .and_then(|rows| rows.collect())
            .map_err(sq("read sqlite_schema"))?
    };
    let tables: Vec<&str> = schema
        .iter()
        .filter(|e| e.0 == "table" && !e.1.to_ascii_lowercase().starts_with("sqlite_"))
        .map(|e| e.1.as_str())
        .collect();
    let mut chosen: Vec<String> = Vec::new();
    for want in names {
        let Some(found) = tables.iter().find(|t| t.eq_ignore_ascii_case(want)) else {
            return Err(EngineError::UnknownTable {
                name: want.clone(),
                available: {
                    let mut v: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
                    v.sort();
                    v
                },
            });
        };
        if !chosen.iter().any(|c| c == found) {
            chosen.push(found.to_string());
        }
    }
    let page_size: i64 = source
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .map_err(sq("read page_size"))?;
    let encoding: String = source
        .query_row("PRAGMA encoding", [], |r| r.get(0))
        .map_err(sq("read encoding"))?;
    let mut infos = Vec::with_capacity(chosen.len());
    for name in &chosen {
        let info = table_info(&source, "main", name)?;
        if info.kind == "virtual" {
            return Err(EngineError::Unsupported(format!(
                "`{name}` is a virtual table: copy it with `walship dump` instead"
            )));
        }
        infos.push(info);
    }
    drop(source);

    if dest.exists() {
        return Err(EngineError::OutputExists {
            path: dest.to_path_buf(),
        });
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(dest, flags)
        .map_err(sq(format!("create {}", dest.display())))?;
    // Tables are copied in any order: a reference to one not copied yet (or not at all) is
    // not an error here, as in the source when it was written.
    conn.pragma_update(None, "foreign_keys", false)
        .map_err(sq("set foreign_keys"))?;
    conn.pragma_update(None, "page_size", page_size)
        .map_err(sq("set page_size"))?;
    conn.pragma_update(None, "encoding", &encoding)
        .map_err(sq("set encoding"))?;
    let src_str = src
        .to_str()
        .ok_or_else(|| EngineError::Unsupported(format!("path {} is not UTF-8", src.display())))?;
    conn.execute("ATTACH DATABASE ?1 AS src", [src_str])
        .map_err(sq("attach the restored database"))?;
    conn.execute_batch("BEGIN").map_err(sq("begin"))?;
    let mut out = Vec::with_capacity(infos.len());
    let chosen_set: HashSet<&str> = chosen.iter().map(String::as_str).collect();
    for info in &infos {
        let ctx = format!("copy table {}", info.name);
        let create = schema
            .iter()
            .find(|e| e.0 == "table" && e.1 == info.name)
            .and_then(|e| e.3.clone())
            .ok_or_else(|| {
                EngineError::Unsupported(format!("table {} has no statement", info.name))
            })?;
        conn.execute_batch(&create).map_err(sq(ctx.clone()))?;
        let (list, _) = info.column_list();
        let rows = if list.is_empty() {
            0
        } else {
            conn.execute(
                &format!(
                    "INSERT INTO main.{q}({list}) SELECT {list} FROM src.{q}",
                    q = quote_ident(&info.name)
                ),
                [],
            )
            .map_err(sq(ctx.clone()))? as u64
        };
        out.push(CopiedTable {
            name: info.name.clone(),
            rows,
            indexes: 0,
            triggers: 0,
        });
    }
    // Indexes, then triggers (after the rows: triggers must not fire while copying).
    for pass in ["index", "trigger"] {
        for (kind, name, tbl, sql) in &schema {
            let Some(sql) = sql else { continue };
            if kind != pass || !chosen_set.contains(tbl.as_str()) {
                continue;
            }
            conn.execute_batch(sql)
                .map_err(sq(format!("create {kind} {name}")))?;
            if let Some(t) = out.iter_mut().find(|t| &t.name == tbl) {
                match pass {
                    "index" => t.indexes += 1,
                    _ => t.triggers += 1,
                }
            }
        }
    }
    let has_seq = |schema: &str| -> EngineResult<bool> {
        conn.query_row(
            &format!("SELECT count(*) FROM {schema}.sqlite_schema WHERE name = 'sqlite_sequence'"),
            [],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n > 0)
        .map_err(sq("look for sqlite_sequence"))
    };
    if has_seq("main")? && has_seq("src")? {
        conn.execute_batch("DELETE FROM main.sqlite_sequence")
            .map_err(sq("copy sqlite_sequence"))?;
        let mut st = conn
            .prepare("INSERT INTO main.sqlite_sequence(name, seq) SELECT name, seq FROM src.sqlite_sequence WHERE name = ?1")
            .map_err(sq("copy sqlite_sequence"))?;
        for name in &chosen {
            st.execute([name]).map_err(sq("copy sqlite_sequence"))?;
        }
    }
    conn.execute_batch("COMMIT; DETACH DATABASE src")
        .map_err(sq("commit the copy"))?;
    drop(conn);
    crate::restore::integrity_check(dest)?;
    File::open(dest)
        .and_then(|f| f.sync_all())
        .map_err(|e| EngineError::io(format!("fsync {}", dest.display()), e))?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// One snapshot object

/// Downloads snapshot `snap` and decodes it into `dest` (a new file): the database image
/// at the snapshot's position, without any segment. Checks the object's CRC and that its
/// header matches its key. Memory stays bounded: the object is spooled to a temporary
/// file beside `dest` first.
pub async fn snapshot_to_file(
    replica: &Replica,
    snap: &Listed,
    dest: &Path,
) -> EngineResult<ObjectHeader> {
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let spool = tempfile::NamedTempFile::new_in(dir)
        .map_err(|e| EngineError::io(format!("create a temporary file in {}", dir.display()), e))?;
    let obj = replica.store().get(&snap.name, None).await?;
    let mut body = obj.body;
    let mut f = tokio::fs::File::from_std(
        spool
            .reopen()
            .map_err(|e| EngineError::io("open the temporary file", e))?,
    );
    while let Some(chunk) = body.next().await {
        f.write_all(&chunk?)
            .await
            .map_err(|e| EngineError::io("write the temporary file", e))?;
    }
    f.flush()
        .await
        .map_err(|e| EngineError::io("write the temporary file", e))?;
    drop(f);
    let keys = replica.keys().cloned();
    let key = snap.name.clone();
    let generation = snap.key.generation();
    let dest = dest.to_path_buf();
    tokio::task::spawn_blocking(move || -> EngineResult<ObjectHeader> {
        let input = BufReader::new(
            spool
                .reopen()
                .map_err(|e| EngineError::io("open the temporary file", e))?,
        );
        let mut r = ObjectReader::with_keys(input, keys.as_deref())
            .map_err(|e| EngineError::decoding(&key, e))?;
        let h = *r.header();
        if h.kind != Kind::Snapshot || h.generation != generation.0 {
            return Err(EngineError::Corrupt {
                key,
                source: FormatError::corrupt("header does not match its key"),
            });
        }
        let out = File::create_new(&dest)
            .map_err(|e| EngineError::io(format!("create {}", dest.display()), e))?;
        let mut w = BufWriter::with_capacity(1 << 20, out);
        io::copy(&mut r, &mut w)
            .map_err(|e| EngineError::decoding(&key, FormatError::from_io(e)))?;
        let out = w
            .into_inner()
            .map_err(|e| EngineError::io(format!("write {}", dest.display()), e.into_error()))?;
        out.set_len(u64::from(h.db_pages) * u64::from(h.page_size))
            .map_err(|e| EngineError::io(format!("write {}", dest.display()), e))?;
        Ok(h)
    })
    .await?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

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
}
