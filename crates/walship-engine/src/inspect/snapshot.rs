//! One snapshot object decoded into a file.

use std::fs::File;
use std::io::{self, BufReader, BufWriter};
use std::path::Path;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use walship_format::FormatError;
use walship_format::object::{Kind, ObjectHeader, ObjectReader};

use crate::error::{EngineError, EngineResult};
use crate::replica::{Listed, Replica};

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
