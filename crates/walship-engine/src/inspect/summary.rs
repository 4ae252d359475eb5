//! Summaries (page count, rows per table) and the live database the monitor polls.

use std::path::Path;

use rusqlite::Connection;
use serde::Serialize;

use super::schema::{SchemaEntry, schema_of};
use super::{open_live, open_own, quote_ident, sq};
use crate::error::EngineResult;

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
    /// Opens it ([`EngineError::MissingDatabase`](crate::EngineError::MissingDatabase) if
    /// there is no file).
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
