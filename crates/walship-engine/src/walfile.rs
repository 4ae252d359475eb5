//! Reading the live `-wal` file: its header, new frames after a position, and pages of
//! frames for snapshots. Every frame is validated with [`FrameChain`] (salts and cumulative
//! checksum); reading stops at the first frame that does not continue the chain.

use std::fs::File;
use std::io::{self, Read, Write};
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
    /// Ship these frames with their bytes checked against the checksum chain as they are
    /// copied, not only their headers: they are not under the pin (see
    /// `replicate::old_incarnation_backlog`).
    pub verify: bool,
}

impl Scan {
    /// Frame count of the incarnation after the last commit found.
    pub fn end(&self) -> u32 {
        self.chain.frames()
    }
}

/// Reads whole frames from a position in large positional reads straight into one buffer:
/// no intermediate copy, and nothing allocated per frame.
struct FrameReader<'a> {
    file: &'a File,
    frame_size: usize,
    /// Offset of the next unread byte.
    offset: u64,
    buf: Vec<u8>,
}

/// Frames per read.
const FRAMES_PER_READ: usize = 64;

impl<'a> FrameReader<'a> {
    fn new(file: &'a File, hdr: &WalHeader, first_index: u32) -> Self {
        let frame_size = hdr.frame_size() as usize;
        FrameReader {
            file,
            frame_size,
            offset: hdr.frame_offset(first_index),
            buf: vec![0u8; frame_size * FRAMES_PER_READ],
        }
    }

    /// Reads up to `max` whole frames (fewer at the end of the file). The slice holds them
    /// back to back; empty at the end.
    fn next_frames(&mut self, max: usize) -> io::Result<&[u8]> {
        let want = self.frame_size * max.clamp(1, FRAMES_PER_READ);
        let mut got = 0;
        while got < want {
            match self
                .file
                .read_at(&mut self.buf[got..want], self.offset + got as u64)
            {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let whole = got - got % self.frame_size;
        self.offset += whole as u64;
        Ok(&self.buf[..whole])
    }
}

/// Scans frames after `chain.frames()` and returns everything up to the last commit frame
/// that continues the chain. `limit` caps the number of frames returned (at a commit).
pub fn scan(path: &Path, hdr: &WalHeader, chain: FrameChain, limit: u32) -> io::Result<Scan> {
    scan_visiting(path, hdr, chain, limit, usize::MAX, &mut |_| {}).map(|(s, _)| s)
}

/// Like [`scan`], with every committed frame also handed to `visit`, in order; the scan
/// keeps the frames themselves only while they are at most `keep` (a WAL of gigabytes
/// holds millions). Returns whether it kept them all.
pub fn scan_visiting(
    path: &Path,
    hdr: &WalHeader,
    chain: FrameChain,
    limit: u32,
    keep: usize,
    visit: &mut dyn FnMut(&FrameRef),
) -> io::Result<(Scan, bool)> {
    let mut kept = true;
    let mut out = Scan {
        chain,
        db_pages: None,
        frames: Vec::new(),
        commits: 0,
        more: false,
        header: None,
        verify: false,
    };
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((out, kept)),
        Err(e) => return Err(e),
    };
    let start = chain.frames();
    let mut r = FrameReader::new(&f, hdr, start + 1);
    let frame_size = hdr.frame_size() as usize;
    let mut cur = chain;
    let mut pending: Vec<FrameRef> = Vec::new();
    // Most scans find nothing new: read one frame first, then in large reads.
    let mut batch = 1;
    'read: loop {
        let frames = r.next_frames(batch)?;
        if frames.is_empty() {
            break;
        }
        batch = FRAMES_PER_READ;
        for frame in frames.chunks_exact(frame_size) {
            let (fh, check) = match cur.check(frame) {
                Ok(x) => x,
                Err(_) => break 'read,
            };
            if check != FrameCheck::Valid {
                break 'read;
            }
            pending.push(FrameRef {
                pgno: fh.pgno,
                index: cur.frames(),
                checksum: fh.checksum,
            });
            if fh.is_commit() {
                let committed = (cur.frames() - start) as usize;
                if committed > limit as usize && committed > pending.len() {
                    out.more = true;
                    break 'read;
                }
                for f in &pending {
                    visit(f);
                }
                if kept && committed <= keep {
                    out.frames.append(&mut pending);
                } else {
                    kept = false;
                    out.frames = Vec::new();
                    pending.clear();
                }
                out.commits += 1;
                out.chain = cur;
                out.db_pages = Some(fh.commit_size);
            }
        }
    }
    Ok((out, kept))
}

/// Copies the given frames (consecutive, as a scan returns them) of the WAL into `w`,
/// checking each still carries the salts and checksum the scan saw (a restarted WAL fails
/// this).
pub fn copy_frames(
    path: &Path,
    hdr: &WalHeader,
    frames: &[FrameRef],
    w: &mut dyn Write,
) -> io::Result<()> {
    copy_checked(path, hdr, frames, w, |fr, frame| {
        check_frame_is(hdr, fr, frame)
    })
}

/// Like [`copy_frames`], but every frame read is checked against the checksum chain from
/// `chain` (the chain at the frame before the first): what is written is exactly what
/// verified, even if the file is being overwritten meanwhile.
pub fn copy_frames_verified(
    path: &Path,
    hdr: &WalHeader,
    chain: FrameChain,
    frames: &[FrameRef],
    w: &mut dyn Write,
) -> io::Result<()> {
    if let Some(first) = frames.first()
        && first.index != chain.frames() + 1
    {
        return Err(io::Error::other(WalChanged { index: first.index }));
    }
    let mut cur = chain;
    copy_checked(path, hdr, frames, w, |fr, frame| match cur.check(frame) {
        Ok((fh, FrameCheck::Valid)) if fh.checksum == fr.checksum && fh.pgno == fr.pgno => Ok(()),
        _ => Err(io::Error::other(WalChanged { index: fr.index })),
    })
}

/// Reads `frames` from the WAL in batches, passes each frame to `check` and writes every
/// batch that passed to `w`.
fn copy_checked(
    path: &Path,
    hdr: &WalHeader,
    frames: &[FrameRef],
    w: &mut dyn Write,
    mut check: impl FnMut(&FrameRef, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let Some(first) = frames.first() else {
        return Ok(());
    };
    let f = File::open(path)?;
    let mut r = FrameReader::new(&f, hdr, first.index);
    let frame_size = hdr.frame_size() as usize;
    let mut rest = frames;
    while !rest.is_empty() {
        let chunk = r.next_frames(rest.len())?;
        if chunk.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "WAL shrank while shipping",
            ));
        }
        let n = chunk.len() / frame_size;
        for (frame, fr) in chunk.chunks_exact(frame_size).zip(&rest[..n]) {
            check(fr, frame)?;
        }
        w.write_all(chunk)?;
        rest = &rest[n..];
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
        return Err(io::Error::other(WalChanged { index: fr.index }));
    }
    Ok(())
}

/// A frame read again was not the one scanned: the WAL was restarted under walship, which a
/// pin on read mark 0 allows once (see docs/ARCHITECTURE.md, "The pin protocol").
#[derive(Debug, thiserror::Error)]
#[error("WAL frame {index} changed while being read (the WAL was restarted)")]
pub struct WalChanged {
    /// The frame's index.
    pub index: u32,
}

/// Reads the page of frame `index`, which held page `pgno` when it was scanned, into `page`,
/// checking it still does: same page number and the incarnation's salts (a restarted WAL
/// rewrites its frames with new salts; within an incarnation a frame never changes).
pub fn read_frame_page(
    file: &File,
    hdr: &WalHeader,
    pgno: u32,
    index: u32,
    page: &mut [u8],
) -> io::Result<()> {
    let mut h = [0u8; FRAME_HEADER_SIZE];
    let off = hdr.frame_offset(index);
    file.read_exact_at(&mut h, off)?;
    let fh = FrameHeader::parse(&h).map_err(|e| io::Error::other(e.to_string()))?;
    if fh.salt1 != hdr.salt1 || fh.salt2 != hdr.salt2 || fh.pgno != pgno {
        return Err(io::Error::other(WalChanged { index }));
    }
    file.read_exact_at(page, off + FRAME_HEADER_SIZE as u64)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    /// `a.db` in `dir`, in WAL mode, never checkpointed automatically.
    fn wal_db(dir: &Path) -> Connection {
        let c = Connection::open(dir.join("a.db")).expect("open");
        c.pragma_update(None, "journal_mode", "wal").expect("wal");
        c.pragma_update(None, "wal_autocheckpoint", 0)
            .expect("no autockpt");
        c
    }

    #[test]
    fn scan_stops_at_the_last_commit_and_resumes_from_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = wal_db(dir.path());
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

    #[test]
    fn a_scan_visits_every_committed_frame_but_keeps_them_only_up_to_its_limit() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = wal_db(dir.path());
        c.execute_batch("CREATE TABLE t(x);").expect("w");
        for _ in 0..20 {
            c.execute("INSERT INTO t VALUES (randomblob(3000))", [])
                .expect("w");
        }
        let wal = dir.path().join("a.db-wal");
        let hdr = read_header(&wal).expect("io").expect("header");
        let from = FrameChain::from_header(&hdr);
        let all = scan(&wal, &hdr, from, u32::MAX).expect("scan");
        for keep in [usize::MAX, all.frames.len(), 5] {
            let mut seen = Vec::new();
            let (s, kept) = scan_visiting(&wal, &hdr, from, u32::MAX, keep, &mut |f| seen.push(*f))
                .expect("scan");
            assert_eq!(seen, all.frames, "keep {keep}");
            assert_eq!(
                (s.end(), s.commits, s.db_pages),
                (all.end(), all.commits, all.db_pages)
            );
            assert_eq!(kept, keep >= all.frames.len(), "keep {keep}");
            assert_eq!(s.frames.is_empty(), !kept, "keep {keep}");
        }
    }

    #[test]
    fn a_verified_copy_refuses_a_page_changed_under_an_unchanged_frame_header() {
        let dir = tempfile::tempdir().expect("tmp");
        let c = wal_db(dir.path());
        c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1); INSERT INTO t VALUES (2);")
            .expect("w");
        let wal = dir.path().join("a.db-wal");
        let hdr = read_header(&wal).expect("io").expect("header");
        let start = FrameChain::from_header(&hdr);
        let s = scan(&wal, &hdr, start, u32::MAX).expect("scan");
        let mut good = Vec::new();
        copy_frames_verified(&wal, &hdr, start, &s.frames, &mut good).expect("copy");
        let mut plain = Vec::new();
        copy_frames(&wal, &hdr, &s.frames, &mut plain).expect("copy");
        assert_eq!(good, plain);
        // A frame rewritten in place (as a restarted WAL's writer tearing it would): its
        // header reads as before, its page does not.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&wal)
            .expect("open");
        let last = s.frames.last().expect("frames");
        let at = hdr.frame_offset(last.index) + FRAME_HEADER_SIZE as u64 + 100;
        f.write_all_at(b"torn", at).expect("write");
        let mut out = Vec::new();
        copy_frames(&wal, &hdr, &s.frames, &mut out).expect("header-only check passes");
        let err = copy_frames_verified(&wal, &hdr, start, &s.frames, &mut Vec::new())
            .expect_err("the chain catches the page");
        assert!(err.to_string().contains("changed"), "{err}");
        // Starting anywhere but right after the chain's frame is refused too.
        assert!(copy_frames_verified(&wal, &hdr, start, &s.frames[1..], &mut Vec::new()).is_err());
    }
}
