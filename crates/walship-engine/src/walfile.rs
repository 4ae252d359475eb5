//! Reading the live `-wal` file: its header, new frames after a position, and pages of
//! frames for snapshots. Every frame is validated with [`FrameChain`] (salts and cumulative
//! checksum); reading stops at the first frame that does not continue the chain.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use walship_format::wal::{
    Checksum, FRAME_HEADER_SIZE, FrameChain, FrameCheck, FrameHeader, WAL_HEADER_SIZE, WalHeader,
};

/// Reads the WAL header, or `None` if the WAL is missing, shorter than a header, or its
/// header does not verify (not initialised yet).
pub fn read_header(path: &Path) -> io::Result<Option<WalHeader>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut b = [0u8; WAL_HEADER_SIZE];
    let mut got = 0;
    while got < b.len() {
        let n = f.read(&mut b[got..])?;
        if n == 0 {
            return Ok(None);
        }
        got += n;
    }
    Ok(WalHeader::parse(&b).ok())
}

/// One frame seen by a scan: enough to find its page again and check it is still there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef {
    /// Page number.
    pub pgno: u32,
    /// Frame index (1-based) in the incarnation.
    pub index: u32,
    /// Cumulative checksum stored in the frame's header.
    pub checksum: Checksum,
}

/// What a scan found after a position.
#[derive(Debug, Clone)]
pub struct Scan {
    /// The chain after the last commit frame found (unchanged if none).
    pub chain: FrameChain,
    /// Database size in pages at that commit, if a commit was found.
    pub db_pages: Option<u32>,
    /// Frames up to and including that commit, in order.
    pub frames: Vec<FrameRef>,
    /// Commit frames among `frames`: how many transactions the scan found.
    pub commits: u32,
    /// The scan stopped at its limit: more committed frames may follow.
    pub more: bool,
    /// Set by the replicator when the scan is of a new WAL incarnation.
    pub header: Option<WalHeader>,
}

impl Scan {
    /// Frame count of the incarnation after the last commit found.
    pub fn end(&self) -> u32 {
        self.chain.frames()
    }
}

/// Scans frames after `chain.frames()` and returns everything up to the last commit frame
/// that continues the chain. `limit` caps the number of frames returned (at a commit).
pub fn scan(path: &Path, hdr: &WalHeader, chain: FrameChain, limit: u32) -> io::Result<Scan> {
    let mut out = Scan {
        chain,
        db_pages: None,
        frames: Vec::new(),
        commits: 0,
        more: false,
        header: None,
    };
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    let start = chain.frames();
    let mut r = BufReader::with_capacity(1 << 20, f);
    r.seek(SeekFrom::Start(hdr.frame_offset(start + 1)))?;
    let mut cur = chain;
    let mut pending: Vec<FrameRef> = Vec::new();
    let mut frame = vec![0u8; hdr.frame_size() as usize];
    loop {
        if !read_full(&mut r, &mut frame)? {
            break;
        }
        let (fh, check) = match cur.check(&frame) {
            Ok(x) => x,
            Err(_) => break,
        };
        if check != FrameCheck::Valid {
            break;
        }
        pending.push(FrameRef {
            pgno: fh.pgno,
            index: cur.frames(),
            checksum: fh.checksum,
        });
        if fh.is_commit() {
            if out.frames.len() + pending.len() > limit as usize && !out.frames.is_empty() {
                out.more = true;
                break;
            }
            out.frames.append(&mut pending);
            out.commits += 1;
            out.chain = cur;
            out.db_pages = Some(fh.commit_size);
        }
    }
    Ok(out)
}

/// Reads until `buf` is full; `false` if the file ended first.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => return Ok(false),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Copies frames `first..=last` (1-based) of the WAL into `w`, checking each still carries
/// the salts and checksum the scan saw (a restarted WAL fails this).
pub fn copy_frames(
    path: &Path,
    hdr: &WalHeader,
    frames: &[FrameRef],
    w: &mut dyn Write,
) -> io::Result<()> {
    let f = File::open(path)?;
    let Some(first) = frames.first() else {
        return Ok(());
    };
    let mut r = BufReader::with_capacity(1 << 20, f);
    r.seek(SeekFrom::Start(hdr.frame_offset(first.index)))?;
    let mut frame = vec![0u8; hdr.frame_size() as usize];
    for fr in frames {
        if !read_full(&mut r, &mut frame)? {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "WAL shrank while shipping",
            ));
        }
        check_frame_is(hdr, fr, &frame)?;
        w.write_all(&frame)?;
    }
    Ok(())
}

fn check_frame_is(hdr: &WalHeader, fr: &FrameRef, frame: &[u8]) -> io::Result<()> {
    let fh = FrameHeader::parse(frame).map_err(|e| io::Error::other(e.to_string()))?;
    if fh.salt1 != hdr.salt1
        || fh.salt2 != hdr.salt2
        || fh.checksum != fr.checksum
        || fh.pgno != fr.pgno
    {
        return Err(io::Error::other(format!(
            "WAL frame {} changed while being read (the WAL was restarted)",
            fr.index
        )));
    }
    Ok(())
}

/// Reads the page of frame `fr` into `page`, checking the frame is still the one scanned.
pub fn read_frame_page(
    file: &File,
    hdr: &WalHeader,
    fr: &FrameRef,
    page: &mut [u8],
) -> io::Result<()> {
    let mut h = [0u8; FRAME_HEADER_SIZE];
    let off = hdr.frame_offset(fr.index);
    file.read_exact_at(&mut h, off)?;
    check_frame_is(hdr, fr, &h)?;
    file.read_exact_at(page, off + FRAME_HEADER_SIZE as u64)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    #[test]
    fn scan_stops_at_the_last_commit_and_resumes_from_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("a.db");
        let c = Connection::open(&p).expect("open");
        c.pragma_update(None, "journal_mode", "wal").expect("wal");
        c.pragma_update(None, "wal_autocheckpoint", 0)
            .expect("no autockpt");
        c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .expect("w");
        let wal = dir.path().join("a.db-wal");
        let hdr = read_header(&wal).expect("io").expect("header");
        let s1 = scan(&wal, &hdr, FrameChain::from_header(&hdr), u32::MAX).expect("scan");
        assert!(s1.end() >= 2);
        assert!(s1.db_pages.is_some());
        c.execute("INSERT INTO t VALUES (2)", []).expect("w");
        let s2 = scan(&wal, &hdr, s1.chain, u32::MAX).expect("scan");
        assert!(s2.end() > s1.end());
        assert_eq!(s2.frames[0].index, s1.end() + 1);
        let s3 = scan(&wal, &hdr, s2.chain, u32::MAX).expect("scan");
        assert!(s3.frames.is_empty());
        assert_eq!(s3.end(), s2.end());
        let mut out = Vec::new();
        copy_frames(&wal, &hdr, &s2.frames, &mut out).expect("copy");
        assert_eq!(out.len(), s2.frames.len() * hdr.frame_size() as usize);
    }
}
