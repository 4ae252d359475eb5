//! Producing a snapshot: the database image at a position, read while the pin is held.
//!
//! The image is the database file, with every page that has a frame in the current WAL
//! incarnation (up to the position) replaced by that frame's page. While the pin is held a
//! checkpoint copies only frames at or below the pin's read mark into the file, so the file
//! holds nothing newer than the position; a page being copied while we read it is one that
//! the WAL overlay replaces anyway. Each overlay frame is checked to still hold its page in
//! the incarnation the scan saw, so a WAL restarted under us fails the snapshot instead of
//! corrupting it.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use walship_format::wal::WalHeader;

use crate::overlay::Overlay;
use crate::walfile::read_frame_page;

/// Pages read from the database file per syscall.
const READ_PAGES: usize = 256;

/// Writes pages `1..=db_pages` of the image into `w`.
///
/// `db` must be the long-lived handle of [`crate::db::Db::file`]: opening and closing
/// another descriptor of the database file would drop every POSIX lock this process holds
/// on it, SQLite's included.
pub fn write_image(
    db: &File,
    wal_path: &Path,
    wal: Option<&WalHeader>,
    overlay: &Overlay,
    db_pages: u32,
    page_size: u32,
    w: &mut dyn Write,
) -> io::Result<()> {
    let wal_file = if overlay.is_empty() {
        None
    } else {
        Some(File::open(wal_path)?)
    };
    let ps = page_size as usize;
    let mut cursor = overlay.cursor();
    let mut buf = vec![0u8; READ_PAGES * ps];
    let mut pgno: u32 = 1;
    while pgno <= db_pages {
        let n = ((db_pages - pgno + 1) as usize).min(READ_PAGES);
        let chunk = &mut buf[..n * ps];
        read_at_zero_fill(db, chunk, u64::from(pgno - 1) * page_size as u64)?;
        for i in 0..n {
            let p = pgno + i as u32;
            if let Some(index) = cursor.frame_of(p)? {
                let (Some(hdr), Some(wf)) = (wal, wal_file.as_ref()) else {
                    return Err(io::Error::other("overlay without a WAL"));
                };
                read_frame_page(wf, hdr, p, index, &mut chunk[i * ps..(i + 1) * ps])?;
            }
        }
        w.write_all(chunk)?;
        pgno += n as u32;
    }
    Ok(())
}

/// Reads into `buf` at `offset`; bytes past the end of the file read as zeros.
fn read_at_zero_fill(f: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => {
                buf[got..].fill(0);
                return Ok(());
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The database size in pages from its file header, for a database whose WAL holds no
/// frames: the in-header size when valid, else the file length. `f` is the long-lived
/// handle of [`crate::db::Db::file`].
pub fn db_pages_from_file(f: &File, page_size: u32) -> io::Result<u32> {
    let len = f.metadata()?.len();
    let mut h = [0u8; 100];
    if len >= 100 {
        f.read_exact_at(&mut h, 0)?;
        let change = u32::from_be_bytes([h[24], h[25], h[26], h[27]]);
        let size = u32::from_be_bytes([h[28], h[29], h[30], h[31]]);
        let valid_for = u32::from_be_bytes([h[92], h[93], h[94], h[95]]);
        if size != 0 && change == valid_for {
            return Ok(size);
        }
    }
    Ok((len / u64::from(page_size)) as u32)
}
