//! Applying segments: each one read and verified whole (its header against its key and the
//! chain, every frame's checksum, the trailer and CRC), its pages kept in their last version,
//! then written into the restored file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;

use walship_format::FormatError;
use walship_format::crypto::KeyRing;
use walship_format::key::{GenerationId, ObjectKey};
use walship_format::object::{HEADER_SIZE, Kind, ObjectHeader, ObjectReader};
use walship_format::wal::{FRAME_HEADER_SIZE, FrameChain, FrameCheck, WAL_MAGIC_BE};

use super::fetch::{ChannelReader, classify, decoding};
use super::gap::disagreement;
use crate::error::{EngineError, EngineResult};

/// A verified segment: its header and the pages it writes.
pub(super) struct Segment {
    pub(super) header: ObjectHeader,
    pub(super) pages: Pages,
}

/// Up to this many bytes of a segment's pages stay in memory; beyond, they move to a
/// temporary file.
const SPOOL_LIMIT: usize = 16 * 1024 * 1024;

/// The pages a segment writes, each in the version of its last frame (a page rewritten by
/// many transactions is kept, and applied, once), in memory or past [`SPOOL_LIMIT`] in a
/// temporary file.
pub(super) struct Pages {
    page_size: usize,
    /// Page number → slot in `mem` or `file`.
    slots: HashMap<u32, u32>,
    mem: Vec<u8>,
    file: Option<File>,
}

impl Pages {
    /// Empty, holding its pages in `buf` (cleared) while they fit.
    fn new(page_size: u32, mut buf: Vec<u8>) -> Pages {
        buf.clear();
        Pages {
            page_size: page_size as usize,
            slots: HashMap::new(),
            mem: buf,
            file: None,
        }
    }

    /// Sets page `pgno` to `data`.
    fn put(&mut self, pgno: u32, data: &[u8]) -> EngineResult<()> {
        let ps = self.page_size;
        let next = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
        let slot = *self.slots.entry(pgno).or_insert(next) as usize;
        let at = slot * ps;
        let spool_err = |e| EngineError::io("write spool file", e);
        if let Some(f) = &self.file {
            return f.write_all_at(data, at as u64).map_err(spool_err);
        }
        if at + ps <= self.mem.len() {
            self.mem[at..at + ps].copy_from_slice(data);
        } else if at + ps <= SPOOL_LIMIT {
            self.mem.extend_from_slice(data);
        } else {
            let f = tempfile::tempfile().map_err(|e| EngineError::io("create spool file", e))?;
            f.write_all_at(&self.mem, 0).map_err(spool_err)?;
            f.write_all_at(data, at as u64).map_err(spool_err)?;
            self.file = Some(f);
            self.mem.clear();
        }
        Ok(())
    }

    /// Writes every page into `out`, in page order.
    pub(super) fn apply(&self, out: &File) -> io::Result<()> {
        let ps = self.page_size;
        let mut order: Vec<(u32, u32)> = self.slots.iter().map(|(p, s)| (*p, *s)).collect();
        order.sort_unstable();
        let mut page = vec![0u8; ps];
        for (pgno, slot) in order {
            let at = slot as usize * ps;
            let data = match &self.file {
                Some(f) => {
                    f.read_exact_at(&mut page, at as u64)?;
                    &page[..]
                }
                None => &self.mem[at..at + ps],
            };
            out.write_all_at(data, u64::from(pgno - 1) * ps as u64)?;
        }
        Ok(())
    }

    /// The memory buffer, for the next segment.
    pub(super) fn into_buf(self) -> Vec<u8> {
        self.mem
    }
}

/// Reads segment `key` from `reader` and verifies it whole: its header against its key
/// (`listed`) and the chain (`generation`, `expect_start`, `page_size`), every frame, the
/// trailer and CRC. Its pages are kept in `buf` while they fit.
#[allow(clippy::too_many_arguments)]
pub(super) fn read_segment(
    reader: &mut ChannelReader,
    keys: Option<&KeyRing>,
    key: &str,
    listed: Option<ObjectKey>,
    generation: GenerationId,
    expect_start: u64,
    page_size: u32,
    buf: Vec<u8>,
) -> EngineResult<Segment> {
    let corrupt = |msg: &str| EngineError::Corrupt {
        key: key.to_string(),
        source: FormatError::corrupt(msg),
    };
    let mut r = ObjectReader::with_keys(reader, keys).map_err(|source| decoding(key, source))?;
    let h = *r.header();
    let why = match listed {
        Some(k) => disagreement(&k, &h),
        None => Some("not a segment key".to_string()),
    };
    if let Some(why) = why {
        return Err(corrupt(&why));
    }
    // A merged segment may start before the position it is applied at (see
    // `replica::chain`); it must reach past it.
    if !h.kind.has_frames()
        || h.generation != generation.0
        || h.start > expect_start
        || h.end <= expect_start
    {
        return Err(corrupt("header does not match its key or the chain"));
    }
    if h.page_size != page_size {
        return Err(corrupt("page size differs from the snapshot's"));
    }
    let mut pages = Pages::new(page_size, buf);
    if h.kind == Kind::Segment {
        read_frames(&mut r, &h, &mut pages, key)?;
    } else {
        // Merged: each segment's header, then its frames; the segments continue each other
        // from the merged segment's start to its end.
        let mut at = h.start;
        let mut frames = 0u32;
        while at != h.end {
            let mut raw = [0u8; HEADER_SIZE];
            r.read_exact(&mut raw).map_err(|e| classify(key, e))?;
            let part = ObjectHeader::decode(&raw).map_err(|source| EngineError::Corrupt {
                key: key.to_string(),
                source,
            })?;
            if part.kind != Kind::Segment
                || part.generation != h.generation
                || part.page_size != page_size
                || part.start != at
                || part.end > h.end
            {
                return Err(corrupt(
                    "a merged segment's part does not continue the one before",
                ));
            }
            frames = frames
                .checked_add(part.frames)
                .filter(|n| *n <= h.frames)
                .ok_or_else(|| corrupt("more frames than the header says"))?;
            read_frames(&mut r, &part, &mut pages, key)?;
            at = part.end;
        }
        if frames != h.frames {
            return Err(corrupt("fewer frames than the header says"));
        }
    }
    // Reading to the end verifies the trailer and the CRC.
    let mut rest = [0u8; 1];
    match r.read(&mut rest) {
        Ok(0) => {}
        Ok(_) => return Err(corrupt("more frames than the header says")),
        Err(e) => return Err(classify(key, e)),
    }
    Ok(Segment { header: h, pages })
}

/// Reads the frames of one segment (`h`), verifying their checksum chain from its start
/// checksum to its end checksum and that the last one commits, into `pages`.
fn read_frames(
    r: &mut impl Read,
    h: &ObjectHeader,
    pages: &mut Pages,
    key: &str,
) -> EngineResult<()> {
    let corrupt = |msg: &str| EngineError::Corrupt {
        key: key.to_string(),
        source: FormatError::corrupt(msg),
    };
    let mut chain = FrameChain::resume(
        h.wal.magic == WAL_MAGIC_BE,
        (h.wal.salt1, h.wal.salt2),
        h.page_size,
        h.start_checksum,
        0,
    );
    let mut frame = vec![0u8; FRAME_HEADER_SIZE + h.page_size as usize];
    let mut last_commit = false;
    for _ in 0..h.frames {
        r.read_exact(&mut frame).map_err(|e| classify(key, e))?;
        let (fh, check) = chain.check(&frame).map_err(|source| EngineError::Corrupt {
            key: key.to_string(),
            source,
        })?;
        if check != FrameCheck::Valid {
            return Err(corrupt(&format!(
                "WAL frame {} fails its checksum ({check:?})",
                chain.frames() + 1
            )));
        }
        last_commit = fh.is_commit();
        pages.put(fh.pgno, &frame[FRAME_HEADER_SIZE..])?;
    }
    if !last_commit {
        return Err(corrupt("does not end with a commit frame"));
    }
    if chain.checksum() != h.wal.checksum {
        return Err(corrupt("final checksum differs from the header's"));
    }
    Ok(())
}
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A page of `page_size` bytes, all `b`.
    fn page(b: u8, page_size: usize) -> Vec<u8> {
        vec![b; page_size]
    }

    fn applied(pages: &Pages, n: usize, page_size: usize) -> Vec<u8> {
        let out = tempfile::tempfile().unwrap();
        out.set_len((n * page_size) as u64).unwrap();
        pages.apply(&out).unwrap();
        let mut got = vec![0u8; n * page_size];
        out.read_exact_at(&mut got, 0).unwrap();
        got
    }

    #[test]
    fn a_page_written_many_times_is_kept_and_applied_in_its_last_version() {
        let ps = 512;
        let mut pages = Pages::new(ps as u32, Vec::new());
        for (pgno, b) in [(3, 1), (1, 2), (3, 3), (2, 4), (3, 5), (1, 6)] {
            pages.put(pgno, &page(b, ps)).unwrap();
        }
        assert_eq!(pages.slots.len(), 3, "one slot per page");
        assert_eq!(pages.mem.len(), 3 * ps);
        let got = applied(&pages, 3, ps);
        assert_eq!(&got[..ps], &page(6, ps)[..]);
        assert_eq!(&got[ps..2 * ps], &page(4, ps)[..]);
        assert_eq!(&got[2 * ps..], &page(5, ps)[..]);
    }

    #[test]
    fn pages_past_the_spool_limit_move_to_a_file_and_keep_their_last_versions() {
        let ps = 65536;
        let n = SPOOL_LIMIT / ps + 8;
        let mut pages = Pages::new(ps as u32, Vec::new());
        for i in 0..n {
            pages.put(i as u32 + 1, &page((i % 200) as u8, ps)).unwrap();
        }
        assert!(pages.file.is_some(), "spilled to a file");
        assert!(pages.mem.is_empty());
        // Rewrite an early page (now in the file) and a late one.
        pages.put(1, &page(250, ps)).unwrap();
        pages.put(n as u32, &page(251, ps)).unwrap();
        let got = applied(&pages, n, ps);
        for i in 0..n {
            let want = match i {
                0 => 250,
                _ if i == n - 1 => 251,
                _ => (i % 200) as u8,
            };
            assert!(
                got[i * ps..(i + 1) * ps].iter().all(|b| *b == want),
                "page {}",
                i + 1
            );
        }
    }
}
