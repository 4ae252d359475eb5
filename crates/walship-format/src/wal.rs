//! SQLite's write-ahead log, as specified in SQLite's file format document ("The WAL File
//! Format"): a 32-byte header, then frames of a 24-byte header and one page. All integers
//! are big-endian; the checksum's word order depends on the magic.

use crate::FormatError;

/// Size of the WAL file header.
pub const WAL_HEADER_SIZE: usize = 32;
/// Size of a frame header.
pub const FRAME_HEADER_SIZE: usize = 24;
/// WAL magic whose checksums sum little-endian words.
pub const WAL_MAGIC_LE: u32 = 0x377f_0682;
/// WAL magic whose checksums sum big-endian words.
pub const WAL_MAGIC_BE: u32 = 0x377f_0683;
/// The only WAL format version SQLite writes.
pub const WAL_VERSION: u32 = 3_007_000;

// Offsets in the WAL header.
const H_MAGIC: usize = 0;
const H_VERSION: usize = 4;
const H_PAGE_SIZE: usize = 8;
const H_CKPT_SEQ: usize = 12;
const H_SALT1: usize = 16;
const H_SALT2: usize = 20;
const H_CKSUM1: usize = 24;
const H_CKSUM2: usize = 28;

// Offsets in a frame header.
const F_PGNO: usize = 0;
const F_COMMIT: usize = 4;
const F_SALT1: usize = 8;
const F_SALT2: usize = 12;
const F_CKSUM1: usize = 16;
const F_CKSUM2: usize = 20;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A cumulative WAL checksum: the pair `(s0, s1)` of SQLite's algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Checksum(pub u32, pub u32);

impl Checksum {
    /// Continues the checksum over `data` (length a multiple of 8), reading 32-bit words in
    /// the byte order the WAL magic selects.
    pub fn update(self, big_endian: bool, data: &[u8]) -> Checksum {
        debug_assert!(data.len().is_multiple_of(8));
        let (mut s0, mut s1) = (self.0, self.1);
        for pair in data.chunks_exact(8) {
            let (x0, x1) = if big_endian {
                (
                    u32::from_be_bytes([pair[0], pair[1], pair[2], pair[3]]),
                    u32::from_be_bytes([pair[4], pair[5], pair[6], pair[7]]),
                )
            } else {
                (
                    u32::from_le_bytes([pair[0], pair[1], pair[2], pair[3]]),
                    u32::from_le_bytes([pair[4], pair[5], pair[6], pair[7]]),
                )
            };
            s0 = s0.wrapping_add(x0).wrapping_add(s1);
            s1 = s1.wrapping_add(x1).wrapping_add(s0);
        }
        Checksum(s0, s1)
    }
}

/// The 32-byte WAL header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalHeader {
    /// [`WAL_MAGIC_LE`] or [`WAL_MAGIC_BE`].
    pub magic: u32,
    /// Always [`WAL_VERSION`].
    pub version: u32,
    /// Database page size in bytes.
    pub page_size: u32,
    /// Checkpoint sequence number: grows by one at each WAL restart.
    pub checkpoint_seq: u32,
    /// Salt-1: grows by one at each WAL restart.
    pub salt1: u32,
    /// Salt-2: a new random value at each WAL restart.
    pub salt2: u32,
    /// Checksum of the first 24 bytes of the header; frame 1 continues from it.
    pub checksum: Checksum,
}

impl WalHeader {
    /// Parses and verifies a WAL header. Errors on a short buffer, a bad magic, an unknown
    /// version, a bad page size or a checksum mismatch (a WAL being initialised, or garbage).
    pub fn parse(b: &[u8]) -> Result<WalHeader, FormatError> {
        if b.len() < WAL_HEADER_SIZE {
            return Err(FormatError::Truncated {
                what: "WAL header",
                needed: WAL_HEADER_SIZE as u64,
                got: b.len() as u64,
            });
        }
        let magic = be32(b, H_MAGIC);
        if magic != WAL_MAGIC_LE && magic != WAL_MAGIC_BE {
            return Err(FormatError::corrupt(format!("bad WAL magic {magic:#010x}")));
        }
        let version = be32(b, H_VERSION);
        if version != WAL_VERSION {
            return Err(FormatError::corrupt(format!(
                "unknown WAL version {version}"
            )));
        }
        let page_size = be32(b, H_PAGE_SIZE);
        if !valid_page_size(page_size) {
            return Err(FormatError::corrupt(format!(
                "bad WAL page size {page_size}"
            )));
        }
        let hdr = WalHeader {
            magic,
            version,
            page_size,
            checkpoint_seq: be32(b, H_CKPT_SEQ),
            salt1: be32(b, H_SALT1),
            salt2: be32(b, H_SALT2),
            checksum: Checksum(be32(b, H_CKSUM1), be32(b, H_CKSUM2)),
        };
        let computed = Checksum::default().update(hdr.big_endian(), &b[..H_CKSUM1]);
        if computed != hdr.checksum {
            return Err(FormatError::corrupt("WAL header checksum mismatch"));
        }
        Ok(hdr)
    }

    /// Encodes the header, computing its checksum (used by tests and tools).
    pub fn encode(
        big_endian: bool,
        page_size: u32,
        checkpoint_seq: u32,
        salt1: u32,
        salt2: u32,
    ) -> [u8; WAL_HEADER_SIZE] {
        let mut b = [0u8; WAL_HEADER_SIZE];
        let magic = if big_endian {
            WAL_MAGIC_BE
        } else {
            WAL_MAGIC_LE
        };
        b[H_MAGIC..H_MAGIC + 4].copy_from_slice(&magic.to_be_bytes());
        b[H_VERSION..H_VERSION + 4].copy_from_slice(&WAL_VERSION.to_be_bytes());
        b[H_PAGE_SIZE..H_PAGE_SIZE + 4].copy_from_slice(&page_size.to_be_bytes());
        b[H_CKPT_SEQ..H_CKPT_SEQ + 4].copy_from_slice(&checkpoint_seq.to_be_bytes());
        b[H_SALT1..H_SALT1 + 4].copy_from_slice(&salt1.to_be_bytes());
        b[H_SALT2..H_SALT2 + 4].copy_from_slice(&salt2.to_be_bytes());
        let c = Checksum::default().update(big_endian, &b[..H_CKSUM1]);
        b[H_CKSUM1..H_CKSUM1 + 4].copy_from_slice(&c.0.to_be_bytes());
        b[H_CKSUM2..H_CKSUM2 + 4].copy_from_slice(&c.1.to_be_bytes());
        b
    }

    /// Whether checksums sum big-endian words.
    pub fn big_endian(&self) -> bool {
        self.magic == WAL_MAGIC_BE
    }

    /// Size of one frame (header and page) in bytes.
    pub fn frame_size(&self) -> u64 {
        FRAME_HEADER_SIZE as u64 + u64::from(self.page_size)
    }

    /// Byte offset of frame `n` (1-based) in the WAL file.
    pub fn frame_offset(&self, n: u32) -> u64 {
        WAL_HEADER_SIZE as u64 + u64::from(n.saturating_sub(1)) * self.frame_size()
    }
}

/// True for the page sizes SQLite allows: powers of two from 512 to 65536.
pub fn valid_page_size(p: u32) -> bool {
    (512..=65536).contains(&p) && p.is_power_of_two()
}

/// A 24-byte frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Page number (1-based).
    pub pgno: u32,
    /// For a commit frame, the database size in pages after the commit; 0 otherwise.
    pub commit_size: u32,
    /// Salt-1, equal to the WAL header's for a valid frame.
    pub salt1: u32,
    /// Salt-2, equal to the WAL header's for a valid frame.
    pub salt2: u32,
    /// Cumulative checksum up to and including this frame.
    pub checksum: Checksum,
}

impl FrameHeader {
    /// Parses a frame header (no validation beyond length).
    pub fn parse(b: &[u8]) -> Result<FrameHeader, FormatError> {
        if b.len() < FRAME_HEADER_SIZE {
            return Err(FormatError::Truncated {
                what: "WAL frame header",
                needed: FRAME_HEADER_SIZE as u64,
                got: b.len() as u64,
            });
        }
        Ok(FrameHeader {
            pgno: be32(b, F_PGNO),
            commit_size: be32(b, F_COMMIT),
            salt1: be32(b, F_SALT1),
            salt2: be32(b, F_SALT2),
            checksum: Checksum(be32(b, F_CKSUM1), be32(b, F_CKSUM2)),
        })
    }

    /// True for the last frame of a transaction.
    pub fn is_commit(&self) -> bool {
        self.commit_size != 0
    }
}

/// Encodes a frame (header and page) continuing checksum `prev` (used by tests and tools).
pub fn encode_frame(
    big_endian: bool,
    salts: (u32, u32),
    prev: Checksum,
    pgno: u32,
    commit_size: u32,
    page: &[u8],
) -> (Vec<u8>, Checksum) {
    let mut f = Vec::with_capacity(FRAME_HEADER_SIZE + page.len());
    f.extend_from_slice(&pgno.to_be_bytes());
    f.extend_from_slice(&commit_size.to_be_bytes());
    f.extend_from_slice(&salts.0.to_be_bytes());
    f.extend_from_slice(&salts.1.to_be_bytes());
    let c = prev.update(big_endian, &f[..8]).update(big_endian, page);
    f.extend_from_slice(&c.0.to_be_bytes());
    f.extend_from_slice(&c.1.to_be_bytes());
    f.extend_from_slice(page);
    (f, c)
}

/// Why a frame is not a valid continuation of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameCheck {
    /// Salts and cumulative checksum verify.
    Valid,
    /// Salts differ from the incarnation's: a stale frame or the end of the log.
    SaltMismatch,
    /// Salts match but the checksum does not: a torn write, or the end of the log.
    ChecksumMismatch,
    /// Page number 0 is never valid.
    BadPageNumber,
}

/// Walks a WAL incarnation's frames one at a time, keeping the cumulative checksum.
///
/// Pure: the caller reads bytes from wherever the frames are (the WAL file, a segment body)
/// and hands each whole frame to [`FrameChain::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameChain {
    big_endian: bool,
    salts: (u32, u32),
    page_size: u32,
    checksum: Checksum,
    frames: u32,
}

impl FrameChain {
    /// A chain starting right after the WAL header `h` (frame 1 continues its checksum).
    pub fn from_header(h: &WalHeader) -> FrameChain {
        FrameChain {
            big_endian: h.big_endian(),
            salts: (h.salt1, h.salt2),
            page_size: h.page_size,
            checksum: h.checksum,
            frames: 0,
        }
    }

    /// A chain resuming after `frames` frames whose cumulative checksum is `checksum`.
    pub fn resume(
        big_endian: bool,
        salts: (u32, u32),
        page_size: u32,
        checksum: Checksum,
        frames: u32,
    ) -> FrameChain {
        FrameChain {
            big_endian,
            salts,
            page_size,
            checksum,
            frames,
        }
    }

    /// Checks `frame` (header and page) as the next one; on success advances the chain.
    pub fn check(&mut self, frame: &[u8]) -> Result<(FrameHeader, FrameCheck), FormatError> {
        let expected = FRAME_HEADER_SIZE + self.page_size as usize;
        if frame.len() != expected {
            return Err(FormatError::Truncated {
                what: "WAL frame",
                needed: expected as u64,
                got: frame.len() as u64,
            });
        }
        let h = FrameHeader::parse(frame)?;
        if (h.salt1, h.salt2) != self.salts {
            return Ok((h, FrameCheck::SaltMismatch));
        }
        if h.pgno == 0 {
            return Ok((h, FrameCheck::BadPageNumber));
        }
        let c = self
            .checksum
            .update(self.big_endian, &frame[..8])
            .update(self.big_endian, &frame[FRAME_HEADER_SIZE..]);
        if c != h.checksum {
            return Ok((h, FrameCheck::ChecksumMismatch));
        }
        self.checksum = c;
        self.frames += 1;
        Ok((h, FrameCheck::Valid))
    }

    /// Cumulative checksum after the last valid frame.
    pub fn checksum(&self) -> Checksum {
        self.checksum
    }

    /// Number of valid frames so far (counting the frames before a resume).
    pub fn frames(&self) -> u32 {
        self.frames
    }

    /// The incarnation's salts.
    pub fn salts(&self) -> (u32, u32) {
        self.salts
    }

    /// Page size of the incarnation.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Word order of the checksum.
    pub fn big_endian(&self) -> bool {
        self.big_endian
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_checksum_verifies() {
        for be in [false, true] {
            let b = WalHeader::encode(be, 4096, 7, 0xdead_beef, 42);
            let h = WalHeader::parse(&b).expect("valid header");
            assert_eq!(h.page_size, 4096);
            assert_eq!(h.checkpoint_seq, 7);
            assert_eq!((h.salt1, h.salt2), (0xdead_beef, 42));
            assert_eq!(h.big_endian(), be);
        }
    }

    #[test]
    fn header_with_flipped_bit_is_refused() {
        let mut b = WalHeader::encode(false, 4096, 1, 2, 3);
        b[17] ^= 1;
        assert!(WalHeader::parse(&b).is_err());
    }

    #[test]
    fn chain_accepts_frames_in_order_and_refuses_stale_salts() {
        let h = WalHeader::parse(&WalHeader::encode(true, 512, 0, 9, 10)).expect("hdr");
        let mut chain = FrameChain::from_header(&h);
        let page = vec![7u8; 512];
        let (f1, c1) = encode_frame(true, (9, 10), h.checksum, 1, 0, &page);
        let (f2, _) = encode_frame(true, (9, 10), c1, 2, 2, &page);
        assert_eq!(chain.check(&f1).expect("ok").1, FrameCheck::Valid);
        let (fh, check) = chain.check(&f2).expect("ok");
        assert_eq!(check, FrameCheck::Valid);
        assert!(fh.is_commit());
        assert_eq!(chain.frames(), 2);
        // A frame of an older incarnation (other salts) is not a continuation.
        let (stale, _) = encode_frame(true, (8, 10), chain.checksum(), 3, 3, &page);
        assert_eq!(chain.check(&stale).expect("ok").1, FrameCheck::SaltMismatch);
        // Re-feeding frame 1 fails the cumulative checksum.
        assert_eq!(
            chain.check(&f1).expect("ok").1,
            FrameCheck::ChecksumMismatch
        );
        assert_eq!(chain.frames(), 2);
    }

    #[test]
    fn wrong_length_frame_is_an_error_not_a_panic() {
        let h = WalHeader::parse(&WalHeader::encode(true, 512, 0, 1, 1)).expect("hdr");
        let mut chain = FrameChain::from_header(&h);
        assert!(chain.check(&[0u8; 100]).is_err());
    }

    #[test]
    fn frame_offsets_follow_the_header() {
        let h = WalHeader::parse(&WalHeader::encode(false, 4096, 0, 1, 1)).expect("hdr");
        assert_eq!(h.frame_offset(1), 32);
        assert_eq!(h.frame_offset(3), 32 + 2 * (24 + 4096));
    }
}
