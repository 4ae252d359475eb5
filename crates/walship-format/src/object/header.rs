//! The object header: what an object holds and where it sits in the WAL's history.

use super::*;
use crate::crypto::KEY_ID_LEN;
use crate::wal::Checksum;

/// What an object holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A full database image.
    Snapshot = 1,
    /// WAL frames of whole transactions.
    Segment = 2,
    /// Consecutive segments merged into one object (docs/format.md, "Merged segments"): the
    /// raw body is each segment's header followed by its frames. Restore treats it as one
    /// segment from the first one's start to the last one's end.
    Merged = 3,
}

impl Kind {
    /// Whether objects of this kind carry WAL frames (a segment or merged segments).
    pub fn has_frames(self) -> bool {
        matches!(self, Kind::Segment | Kind::Merged)
    }
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        match v {
            1 => Some(Kind::Snapshot),
            2 => Some(Kind::Segment),
            3 => Some(Kind::Merged),
            _ => None,
        }
    }
}

/// The WAL state at a position: what a replicator needs to resume tailing from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct WalState {
    /// WAL magic of the incarnation (0 if unknown).
    pub magic: u32,
    /// Checkpoint sequence number of the incarnation.
    pub checkpoint_seq: u32,
    /// Salts of the incarnation.
    pub salt1: u32,
    /// Salts of the incarnation.
    pub salt2: u32,
    /// Cumulative checksum after the last included frame.
    pub checksum: Checksum,
}

/// An object's header: everything but the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectHeader {
    /// Snapshot or segment.
    pub kind: Kind,
    /// Flag bits; [`FLAG_LZ4`] is always set by this version.
    pub flags: u8,
    /// Generation id (not inverted).
    pub generation: u64,
    /// Position the object continues from (snapshot: equal to `end`).
    pub start: u64,
    /// Position after the object is applied.
    pub end: u64,
    /// Database page size.
    pub page_size: u32,
    /// Database size in pages after the object is applied.
    pub db_pages: u32,
    /// Milliseconds since the Unix epoch when the object was written.
    pub timestamp_ms: i64,
    /// WAL state at `end`.
    pub wal: WalState,
    /// Segment: checksum the first frame continues from.
    pub start_checksum: Checksum,
    /// Segment: number of frames.
    pub frames: u32,
    /// Length of the raw (decompressed) body.
    pub raw_len: u64,
}

impl ObjectHeader {
    /// Encodes the header with its CRC.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[O_MAGIC..O_MAGIC + 4].copy_from_slice(&MAGIC);
        b[O_VERSION..O_VERSION + 2].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
        b[O_KIND] = self.kind as u8;
        b[O_FLAGS] = self.flags;
        put64(&mut b, O_GENERATION, self.generation);
        put64(&mut b, O_START, self.start);
        put64(&mut b, O_END, self.end);
        put32(&mut b, O_PAGE_SIZE, self.page_size);
        put32(&mut b, O_DB_PAGES, self.db_pages);
        put64(&mut b, O_TIMESTAMP, self.timestamp_ms as u64);
        put32(&mut b, O_SALT1, self.wal.salt1);
        put32(&mut b, O_SALT2, self.wal.salt2);
        put32(&mut b, O_END_CK1, self.wal.checksum.0);
        put32(&mut b, O_END_CK2, self.wal.checksum.1);
        put32(&mut b, O_START_CK1, self.start_checksum.0);
        put32(&mut b, O_START_CK2, self.start_checksum.1);
        put32(&mut b, O_WAL_MAGIC, self.wal.magic);
        put32(&mut b, O_FRAMES, self.frames);
        put64(&mut b, O_RAW_LEN, self.raw_len);
        put32(&mut b, O_CKPT_SEQ, self.wal.checkpoint_seq);
        let crc = crc32fast::hash(&b[..O_HEADER_CRC]);
        put32(&mut b, O_HEADER_CRC, crc);
        b
    }

    /// Decodes and verifies a header.
    pub fn decode(b: &[u8]) -> Result<ObjectHeader, FormatError> {
        if b.len() < HEADER_SIZE {
            return Err(FormatError::Truncated {
                what: "object header",
                needed: HEADER_SIZE as u64,
                got: b.len() as u64,
            });
        }
        if b[O_MAGIC..O_MAGIC + 4] != MAGIC {
            return Err(FormatError::corrupt("not a walship object (bad magic)"));
        }
        let version = u16::from_be_bytes([b[O_VERSION], b[O_VERSION + 1]]);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        if crc32fast::hash(&b[..O_HEADER_CRC]) != get32(b, O_HEADER_CRC) {
            return Err(FormatError::corrupt("object header CRC mismatch"));
        }
        let kind = Kind::from_u8(b[O_KIND])
            .ok_or_else(|| FormatError::corrupt(format!("unknown object kind {}", b[O_KIND])))?;
        let flags = b[O_FLAGS];
        if flags & !(FLAG_LZ4 | FLAG_ENCRYPTED) != 0 || flags & FLAG_LZ4 == 0 {
            return Err(FormatError::corrupt(format!(
                "unknown object flags {flags:#04x}"
            )));
        }
        let page_size = get32(b, O_PAGE_SIZE);
        if !crate::wal::valid_page_size(page_size) {
            return Err(FormatError::corrupt(format!("bad page size {page_size}")));
        }
        let h = ObjectHeader {
            kind,
            flags,
            generation: get64(b, O_GENERATION),
            start: get64(b, O_START),
            end: get64(b, O_END),
            page_size,
            db_pages: get32(b, O_DB_PAGES),
            timestamp_ms: get64(b, O_TIMESTAMP) as i64,
            wal: WalState {
                magic: get32(b, O_WAL_MAGIC),
                checkpoint_seq: get32(b, O_CKPT_SEQ),
                salt1: get32(b, O_SALT1),
                salt2: get32(b, O_SALT2),
                checksum: Checksum(get32(b, O_END_CK1), get32(b, O_END_CK2)),
            },
            start_checksum: Checksum(get32(b, O_START_CK1), get32(b, O_START_CK2)),
            frames: get32(b, O_FRAMES),
            raw_len: get64(b, O_RAW_LEN),
        };
        h.check_length()?;
        Ok(h)
    }

    /// Checks that the body's length agrees with the kind: a snapshot's pages, a segment's
    /// frames, or a merged segment's frames and the headers of the segments it holds.
    fn check_length(&self) -> Result<(), FormatError> {
        match self.kind {
            Kind::Snapshot => {
                if self.start != self.end {
                    return Err(FormatError::corrupt("snapshot with start != end"));
                }
                if self.raw_len != u64::from(self.db_pages) * u64::from(self.page_size) {
                    return Err(FormatError::corrupt(
                        "snapshot length is not its page count",
                    ));
                }
            }
            Kind::Segment => {
                if self.end <= self.start {
                    return Err(FormatError::corrupt("segment end not after its start"));
                }
                let frame = crate::wal::FRAME_HEADER_SIZE as u64 + u64::from(self.page_size);
                if self.frames == 0 || self.raw_len != u64::from(self.frames) * frame {
                    return Err(FormatError::corrupt(
                        "segment length is not its frame count",
                    ));
                }
            }
            Kind::Merged => {
                if self.end <= self.start {
                    return Err(FormatError::corrupt("segment end not after its start"));
                }
                let frame = crate::wal::FRAME_HEADER_SIZE as u64 + u64::from(self.page_size);
                let headers = self.raw_len.checked_sub(u64::from(self.frames) * frame);
                if self.frames == 0 || headers.is_none_or(|n| n == 0 || n % HEADER_SIZE as u64 != 0)
                {
                    return Err(FormatError::corrupt(
                        "merged segment length is not its frames and segment headers",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Bytes at the start of an object that hold its header and, when it is encrypted, the id of
/// its key (the first field of the preamble).
pub const HEAD_WITH_KEY_ID: usize = HEADER_SIZE + KEY_ID_LEN;

/// Decodes an object's header and the id of the key its body is encrypted with (`None`: not
/// encrypted) from its first bytes, [`HEAD_WITH_KEY_ID`] of them for an encrypted object.
/// The key id is not covered by the header's CRC; a reader of the whole object checks it.
pub fn header_and_key_id(
    b: &[u8],
) -> Result<(ObjectHeader, Option<[u8; KEY_ID_LEN]>), FormatError> {
    let header = ObjectHeader::decode(b)?;
    if header.flags & FLAG_ENCRYPTED == 0 {
        return Ok((header, None));
    }
    let id = b
        .get(HEADER_SIZE..HEAD_WITH_KEY_ID)
        .ok_or(FormatError::Truncated {
            what: "encryption preamble",
            needed: HEAD_WITH_KEY_ID as u64,
            got: b.len() as u64,
        })?;
    let mut out = [0u8; KEY_ID_LEN];
    out.copy_from_slice(id);
    Ok((header, Some(out)))
}
