//! What the engine's end-to-end tests share: the app's database and a digest of its rows.

#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};

use rusqlite::Connection;

/// Creates `app.db` in `dir`, in WAL mode, with table `t(id, v)`.
pub fn app_db(dir: &Path) -> PathBuf {
    let p = dir.join("app.db");
    let c = Connection::open(&p).unwrap();
    c.pragma_update(None, "journal_mode", "wal").unwrap();
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        .unwrap();
    p
}

/// Row count and a sum over every row of `t`: equal digests, equal contents (for these
/// tests' random blobs).
pub fn digest(p: &Path) -> (i64, i64) {
    let c = Connection::open(p).unwrap();
    c.query_row(
        "SELECT count(*), coalesce(sum(length(v) * id), 0) FROM t",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}
