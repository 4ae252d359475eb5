//! Copies of single tables into a new database.

use std::collections::HashSet;
use std::fs::File;
use std::path::Path;

use rusqlite::{Connection, OpenFlags};
use serde::Serialize;

use super::{TableInfo, open_own, quote_ident, sq, table_info};
use crate::error::{EngineError, EngineResult};

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
    let source = read_source(src, names)?;
    if dest.exists() {
        return Err(EngineError::OutputExists {
            path: dest.to_path_buf(),
        });
    }
    let conn = create_dest(src, dest, &source)?;
    conn.execute_batch("BEGIN").map_err(sq("begin"))?;
    let mut out = copy_rows(&conn, &source)?;
    create_indexes_and_triggers(&conn, &source, &mut out)?;
    copy_sequence(&conn, &source.chosen)?;
    conn.execute_batch("COMMIT; DETACH DATABASE src")
        .map_err(sq("commit the copy"))?;
    drop(conn);
    crate::restore::integrity_check(dest)?;
    File::open(dest)
        .and_then(|f| f.sync_all())
        .map_err(|e| EngineError::io(format!("fsync {}", dest.display()), e))?;
    Ok(out)
}

/// One row of the source's `sqlite_schema`: type, name, table name, statement.
type SchemaRow = (String, String, String, Option<String>);

/// What [`copy_tables`] reads from the source before it creates anything.
struct Source {
    /// The whole `sqlite_schema`, in rowid order.
    schema: Vec<SchemaRow>,
    /// The tables to copy, by their stored names, each once.
    chosen: Vec<String>,
    page_size: i64,
    encoding: String,
    /// The columns of each of `chosen`, in the same order.
    infos: Vec<TableInfo>,
}

/// Reads the source's schema, page size and encoding, and the tables `names` stands for:
/// an unknown name or a virtual table is an error here, before anything is created.
fn read_source(src: &Path, names: &[String]) -> EngineResult<Source> {
    let source = open_own(src)?;
    let schema: Vec<SchemaRow> = {
        let mut st = source
            .prepare("SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY rowid")
            .map_err(sq("read sqlite_schema"))?;
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .and_then(|rows| rows.collect())
            .map_err(sq("read sqlite_schema"))?
    };
    let chosen = choose_tables(&schema, names)?;
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
    Ok(Source {
        schema,
        chosen,
        page_size,
        encoding,
        infos,
    })
}

/// The stored names of the tables `names` asks for (without regard to ASCII case), each
/// once, in the order asked; [`EngineError::UnknownTable`] lists the tables there are.
fn choose_tables(schema: &[SchemaRow], names: &[String]) -> EngineResult<Vec<String>> {
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
    Ok(chosen)
}

/// Creates `dest` with the source's page size and encoding, foreign keys off, and the
/// source attached as `src`.
fn create_dest(src: &Path, dest: &Path, source: &Source) -> EngineResult<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(dest, flags)
        .map_err(sq(format!("create {}", dest.display())))?;
    // Tables are copied in any order: a reference to one not copied yet (or not at all) is
    // not an error here, as in the source when it was written.
    conn.pragma_update(None, "foreign_keys", false)
        .map_err(sq("set foreign_keys"))?;
    conn.pragma_update(None, "page_size", source.page_size)
        .map_err(sq("set page_size"))?;
    conn.pragma_update(None, "encoding", &source.encoding)
        .map_err(sq("set encoding"))?;
    let src_str = src
        .to_str()
        .ok_or_else(|| EngineError::Unsupported(format!("path {} is not UTF-8", src.display())))?;
    conn.execute("ATTACH DATABASE ?1 AS src", [src_str])
        .map_err(sq("attach the restored database"))?;
    Ok(conn)
}

/// Creates each chosen table from its statement and copies its rows (with their rowids).
fn copy_rows(conn: &Connection, source: &Source) -> EngineResult<Vec<CopiedTable>> {
    let mut out = Vec::with_capacity(source.infos.len());
    for info in &source.infos {
        let ctx = format!("copy table {}", info.name);
        let create = source
            .schema
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
    Ok(out)
}

/// Creates the chosen tables' indexes, then their triggers (after the rows: triggers must
/// not fire while copying), counting them in `out`.
fn create_indexes_and_triggers(
    conn: &Connection,
    source: &Source,
    out: &mut [CopiedTable],
) -> EngineResult<()> {
    let chosen_set: HashSet<&str> = source.chosen.iter().map(String::as_str).collect();
    for pass in ["index", "trigger"] {
        for (kind, name, tbl, sql) in &source.schema {
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
    Ok(())
}

/// Copies the chosen tables' `sqlite_sequence` entries, when both databases have one.
fn copy_sequence(conn: &Connection, chosen: &[String]) -> EngineResult<()> {
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
        for name in chosen {
            st.execute([name]).map_err(sq("copy sqlite_sequence"))?;
        }
    }
    Ok(())
}
