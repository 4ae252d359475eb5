//! The end of a restore: the temporary output, its fsync and integrity check, and the move
//! into place.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::error::{EngineError, EngineResult};

/// A temporary output that removes itself unless kept.
pub(super) struct TempOutput {
    pub(super) path: PathBuf,
    pub(super) keep: bool,
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
        for suffix in ["-wal", "-shm", "-journal"] {
            let mut s = self.path.as_os_str().to_owned();
            s.push(suffix);
            let _ = std::fs::remove_file(PathBuf::from(s));
        }
    }
}

fn sibling(output: &Path, suffix: &str) -> PathBuf {
    let mut s = output.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Moves a verified restore into place at `output` (removing a stale `-wal` and `-shm`).
pub(super) fn install(tmp: TempOutput, output: &Path, overwrite: bool) -> EngineResult<()> {
    if output.exists() && !overwrite {
        return Err(EngineError::OutputExists {
            path: output.to_path_buf(),
        });
    }
    for suffix in ["-wal", "-shm"] {
        match std::fs::remove_file(sibling(output, suffix)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(EngineError::io(
                    format!("remove stale {}{suffix}", output.display()),
                    e,
                ));
            }
        }
    }
    std::fs::rename(&tmp.path, output).map_err(|e| {
        EngineError::io(format!("move restored database to {}", output.display()), e)
    })?;
    let mut tmp = tmp;
    tmp.keep = true;
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Sizes the restored file to `len`; then runs the fsync and the integrity check side by
/// side (the check reads what the page cache holds, which the fsync only writes out: one
/// waits on the disk, the other works the CPU). The rename follows once both succeeded.
pub(super) async fn finish(file: Arc<File>, tmp: &TempOutput, len: u64) -> EngineResult<()> {
    file.set_len(len)
        .map_err(|e| EngineError::io("truncate temporary output", e))?;
    let t_sync = Instant::now();
    let sync = tokio::task::spawn_blocking(move || {
        let r = file.sync_all();
        (r, t_sync.elapsed())
    });
    let check_path = tmp.path.clone();
    let t_check = Instant::now();
    let check = tokio::task::spawn_blocking(move || integrity_check(&check_path));
    let (synced, checked) = tokio::join!(sync, check);
    let (synced, sync_elapsed) = synced?;
    synced.map_err(|e| EngineError::io("fsync temporary output", e))?;
    tracing::debug!(
        bytes = len,
        elapsed_ms = sync_elapsed.as_millis() as u64,
        "restored file synced"
    );
    checked??;
    tracing::debug!(
        elapsed_ms = t_check.elapsed().as_millis() as u64,
        "integrity check passed"
    );
    Ok(())
}

/// Runs `PRAGMA integrity_check` on a restored file.
pub fn integrity_check(path: &Path) -> EngineResult<()> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| EngineError::sqlite("open restored database", e))?;
    let mut stmt = conn
        .prepare("PRAGMA integrity_check")
        .map_err(|e| EngineError::IntegrityCheck(e.to_string()))?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .and_then(|it| it.collect())
        .map_err(|e| EngineError::IntegrityCheck(e.to_string()))?;
    if rows.len() == 1 && rows[0] == "ok" {
        Ok(())
    } else {
        Err(EngineError::IntegrityCheck(rows.join("; ")))
    }
}
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A database of a few hundred pages, closed, and its path.
    fn sample_db(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("sample.db");
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA page_size=4096; PRAGMA journal_mode=WAL;
             CREATE TABLE t(id INTEGER PRIMARY KEY, body BLOB NOT NULL);
             CREATE INDEX t_body ON t(body);
             WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r WHERE x < 2000)
             INSERT INTO t(body) SELECT randomblob(300) FROM r;
             PRAGMA wal_checkpoint(TRUNCATE);",
        )
        .unwrap();
        drop(conn);
        path
    }

    #[test]
    fn the_integrity_check_passes_a_sound_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample_db(dir.path());
        integrity_check(&path).unwrap();
    }

    #[test]
    fn the_integrity_check_refuses_a_file_with_a_damaged_page() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample_db(dir.path());
        let len = std::fs::metadata(&path).unwrap().len();
        // Scramble the middle of a page past the schema: cell contents and pointers of a
        // table or index b-tree page.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let page = len / 4096 / 2;
        std::os::unix::fs::FileExt::write_all_at(&f, &[0xA5; 2000], page * 4096 + 8).unwrap();
        drop(f);
        match integrity_check(&path) {
            Err(EngineError::IntegrityCheck(why)) => assert!(!why.is_empty()),
            other => panic!("a damaged page passed the check: {other:?}"),
        }
    }
}
