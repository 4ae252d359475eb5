//! Schemas: what `sqlite_schema` holds, and what changed between two of them.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::Connection;
use serde::Serialize;

use super::{open_live, sq};
use crate::error::EngineResult;

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

pub(super) fn schema_of(conn: &Connection) -> EngineResult<Vec<SchemaEntry>> {
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
