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
//!
//! The parts: `dump`, `summary` (row counts and [`LiveDb`]), `schema`, `copy` (single
//! tables) and `snapshot`; this module keeps what they share (opening a database that
//! belongs to someone else, a table's columns).

use std::path::Path;
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};

use crate::error::{EngineError, EngineResult};

mod copy;
mod dump;
mod schema;
mod snapshot;
mod summary;
#[cfg(test)]
mod tests;

pub use copy::{CopiedTable, copy_tables};
pub use dump::{DumpStats, dump, quote_text};
pub use schema::{SchemaChange, SchemaEntry, diff_schema, read_schema};
pub use snapshot::snapshot_to_file;
pub use summary::{LiveDb, Summary, TableCount, check_and_summarize, summarize};

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
