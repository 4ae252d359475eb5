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

/// Row count and a checksum of every row of `t` in id order: equal digests, equal contents
/// (a rewrite of a value with another of the same length shows too).
pub fn digest(p: &Path) -> (i64, i64) {
    let c = Connection::open(p).unwrap();
    let mut st = c.prepare("SELECT id, v FROM t ORDER BY id").unwrap();
    let mut rows = st.query([]).unwrap();
    let (mut n, mut h) = (0i64, crc32fast::Hasher::new());
    while let Some(r) = rows.next().unwrap() {
        n += 1;
        h.update(&r.get::<_, i64>(0).unwrap().to_le_bytes());
        match r.get_ref(1).unwrap() {
            rusqlite::types::ValueRef::Blob(b) | rusqlite::types::ValueRef::Text(b) => {
                h.update(&(b.len() as u64).to_le_bytes());
                h.update(b);
            }
            v => h.update(format!("{v:?}").as_bytes()),
        }
    }
    (n, i64::from(h.finalize()))
}
