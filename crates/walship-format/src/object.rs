//! The object format of docs/format.md: a 96-byte header, a body of LZ4 blocks, a 28-byte
//! trailer with a CRC32 over everything before it.
//!
//! [`ObjectWriter`] and [`ObjectReader`] stream: they hold at most one block (4 MiB of raw
//! data) at a time, whatever the object's size. They are generic over `std::io::Write` and
//! `std::io::Read` and do no I/O of their own.

use std::io::{self, Read, Write};

use crate::FormatError;
use crate::crypto::{KEY_ID_LEN, Key, KeyRing, PREAMBLE_SIZE, TAG_SIZE};
use crate::wal::Checksum;

/// Magic at the start of every object.
pub const MAGIC: [u8; 4] = *b"WSHP";
/// Magic at the start of the trailer.
pub const TRAILER_MAGIC: [u8; 4] = *b"WSHE";
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Size of the header.
pub const HEADER_SIZE: usize = 96;
/// Size of the trailer.
pub const TRAILER_SIZE: usize = 28;
/// Largest raw block a reader accepts.
pub const MAX_BLOCK: usize = 4 * 1024 * 1024;
/// Raw block size the writer uses. LZ4 matches reach back 64 KiB at most, so 1 MiB blocks
/// compress as well as 4 MiB ones, and their buffers stay in the allocator's heap and are
/// reused from object to object instead of being mapped and faulted in afresh for each.
pub const WRITE_BLOCK: usize = 1024 * 1024;
/// Size of a block header.
pub const BLOCK_HEADER_SIZE: usize = 8;

/// Flag: the body is LZ4 blocks (always set in version 1).
pub const FLAG_LZ4: u8 = 0b01;
/// Flag: the body is encrypted (AES-256-GCM, see [`crate::crypto`]).
pub const FLAG_ENCRYPTED: u8 = 0b10;

// Header offsets.
const O_MAGIC: usize = 0;
const O_VERSION: usize = 4;
const O_KIND: usize = 6;
const O_FLAGS: usize = 7;
const O_GENERATION: usize = 8;
const O_START: usize = 16;
const O_END: usize = 24;
const O_PAGE_SIZE: usize = 32;
const O_DB_PAGES: usize = 36;
const O_TIMESTAMP: usize = 40;
const O_SALT1: usize = 48;
const O_SALT2: usize = 52;
const O_END_CK1: usize = 56;
const O_END_CK2: usize = 60;
const O_START_CK1: usize = 64;
const O_START_CK2: usize = 68;
const O_WAL_MAGIC: usize = 72;
const O_FRAMES: usize = 76;
const O_RAW_LEN: usize = 80;
const O_CKPT_SEQ: usize = 88;
const O_HEADER_CRC: usize = 92;

// Trailer offsets.
const T_MAGIC: usize = 0;
const T_BODY_LEN: usize = 4;
const T_RAW_LEN: usize = 12;
const T_CRC: usize = 20;
const T_SELF_CRC: usize = 24;

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
        match kind {
            Kind::Snapshot => {
                if h.start != h.end {
                    return Err(FormatError::corrupt("snapshot with start != end"));
                }
                if h.raw_len != u64::from(h.db_pages) * u64::from(page_size) {
                    return Err(FormatError::corrupt(
                        "snapshot length is not its page count",
                    ));
                }
            }
            Kind::Segment => {
                if h.end <= h.start {
                    return Err(FormatError::corrupt("segment end not after its start"));
                }
                let frame = crate::wal::FRAME_HEADER_SIZE as u64 + u64::from(page_size);
                if h.frames == 0 || h.raw_len != u64::from(h.frames) * frame {
                    return Err(FormatError::corrupt(
                        "segment length is not its frame count",
                    ));
                }
            }
            Kind::Merged => {
                if h.end <= h.start {
                    return Err(FormatError::corrupt("segment end not after its start"));
                }
                let frame = crate::wal::FRAME_HEADER_SIZE as u64 + u64::from(page_size);
                let headers = h.raw_len.checked_sub(u64::from(h.frames) * frame);
                if h.frames == 0 || headers.is_none_or(|n| n == 0 || n % HEADER_SIZE as u64 != 0) {
                    return Err(FormatError::corrupt(
                        "merged segment length is not its frames and segment headers",
                    ));
                }
            }
        }
        Ok(h)
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

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}
fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn get64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Writes one object to `W`, compressing the raw body block by block.
///
/// Call [`ObjectWriter::write_all`] (via `Write`) with the raw body, then
/// [`ObjectWriter::finish`]. The raw length written must equal the header's `raw_len`.
#[derive(Debug)]
pub struct ObjectWriter<W: Write> {
    out: W,
    crc: crc32fast::Hasher,
    block: Vec<u8>,
    /// Compressed output of a block, kept across blocks (a fresh 4 MiB buffer per block
    /// cost page faults on every block).
    compressed: Vec<u8>,
    body_len: u64,
    raw_written: u64,
    raw_expected: u64,
    block_size: usize,
    seal: Option<Sealing>,
}

/// Encryption state of a writer or reader.
#[derive(Debug, Clone)]
struct Sealing {
    key: Key,
    prefix: [u8; 8],
    /// Header and preamble: the associated data of every block.
    context: Vec<u8>,
    next_index: u32,
}

impl<W: Write> ObjectWriter<W> {
    /// Writes the header and returns a writer for the body.
    pub fn new(mut out: W, header: &ObjectHeader) -> io::Result<Self> {
        let mut header = *header;
        header.flags &= !FLAG_ENCRYPTED;
        let h = header.encode();
        out.write_all(&h)?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&h);
        Ok(ObjectWriter {
            out,
            crc,
            block: Vec::new(),
            compressed: Vec::new(),
            body_len: 0,
            raw_written: 0,
            raw_expected: header.raw_len,
            block_size: WRITE_BLOCK,
            seal: None,
        })
    }

    /// Writes the header (with the encryption flag) and the encryption preamble, and
    /// returns a writer that encrypts every block with `key`. `nonce_prefix` must be random
    /// and never reused with the same key.
    pub fn new_encrypted(
        mut out: W,
        header: &ObjectHeader,
        key: &Key,
        nonce_prefix: [u8; 8],
    ) -> io::Result<Self> {
        let mut header = *header;
        header.flags |= FLAG_ENCRYPTED;
        let h = header.encode();
        let mut pre = [0u8; PREAMBLE_SIZE];
        pre[..KEY_ID_LEN].copy_from_slice(&key.id());
        pre[KEY_ID_LEN..KEY_ID_LEN + 8].copy_from_slice(&nonce_prefix);
        out.write_all(&h)?;
        out.write_all(&pre)?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&h);
        crc.update(&pre);
        let mut context = h.to_vec();
        context.extend_from_slice(&pre);
        Ok(ObjectWriter {
            out,
            crc,
            block: Vec::new(),
            compressed: Vec::new(),
            body_len: PREAMBLE_SIZE as u64,
            raw_written: 0,
            raw_expected: header.raw_len,
            block_size: WRITE_BLOCK,
            seal: Some(Sealing {
                key: key.clone(),
                prefix: nonce_prefix,
                context,
                next_index: 0,
            }),
        })
    }

    /// Uses smaller blocks (tests; at least 1 byte, at most [`MAX_BLOCK`]).
    pub fn with_block_size(mut self, size: usize) -> Self {
        self.block_size = size.clamp(1, MAX_BLOCK);
        self
    }

    fn emit(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.crc.update(bytes);
        self.body_len += bytes.len() as u64;
        Ok(())
    }

    fn flush_block(&mut self) -> io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        let mut out = std::mem::take(&mut self.compressed);
        out.resize(
            lz4_flex::block::get_maximum_output_size(self.block.len()),
            0,
        );
        let n = lz4_flex::block::compress_into(&self.block, &mut out)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let r = self.emit_block(self.block.len(), &out[..n]);
        self.block.clear();
        self.compressed = out;
        r
    }

    /// Seals (when encrypting) and writes one block of `raw_len` raw bytes compressed to
    /// `lz4`.
    fn emit_block(&mut self, raw_len: usize, lz4: &[u8]) -> io::Result<()> {
        let sealed = match &mut self.seal {
            Some(seal) => {
                let s = seal
                    .key
                    .seal(&seal.prefix, &seal.context, seal.next_index, false, lz4)
                    .map_err(FormatError::into_io)?;
                seal.next_index += 1;
                Some(s)
            }
            None => None,
        };
        let body = sealed.as_deref().unwrap_or(lz4);
        let mut bh = [0u8; BLOCK_HEADER_SIZE];
        put32(&mut bh, 0, raw_len as u32);
        put32(&mut bh, 4, body.len() as u32);
        self.emit(&bh)?;
        self.emit(body)
    }

    /// Ends the body, writes the trailer, and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.flush_block()?;
        if self.raw_written != self.raw_expected {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "object body is {} bytes but the header says {}",
                    self.raw_written, self.raw_expected
                ),
            ));
        }
        match self.seal.take() {
            None => self.emit(&[0u8; BLOCK_HEADER_SIZE])?,
            Some(seal) => {
                // The end block authenticates the block count: nothing can be cut off.
                let tag = seal
                    .key
                    .seal(&seal.prefix, &seal.context, seal.next_index, true, &[])
                    .map_err(FormatError::into_io)?;
                let mut bh = [0u8; BLOCK_HEADER_SIZE];
                put32(&mut bh, 4, tag.len() as u32);
                self.emit(&bh)?;
                self.emit(&tag)?;
            }
        }
        let mut t = [0u8; TRAILER_SIZE];
        t[T_MAGIC..T_MAGIC + 4].copy_from_slice(&TRAILER_MAGIC);
        put64(&mut t, T_BODY_LEN, self.body_len);
        put64(&mut t, T_RAW_LEN, self.raw_written);
        put32(&mut t, T_CRC, self.crc.clone().finalize());
        let self_crc = crc32fast::hash(&t[..T_SELF_CRC]);
        put32(&mut t, T_SELF_CRC, self_crc);
        self.out.write_all(&t)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// The body of an object being written: raw bytes through `Write`, or blocks already
/// compressed (copied from another object by [`ObjectReader::next_stored_block`], so a merge
/// need not decompress and compress them again).
pub trait BodyWrite: Write {
    /// Appends one block of `raw_len` raw bytes (1..=[`MAX_BLOCK`]) whose LZ4 compression is
    /// `lz4`, after any raw bytes written before it. The caller vouches that `lz4`
    /// decompresses to `raw_len` bytes: it came out of a verified object.
    fn write_compressed_block(&mut self, raw_len: usize, lz4: &[u8]) -> io::Result<()>;
}

impl<W: Write> BodyWrite for ObjectWriter<W> {
    fn write_compressed_block(&mut self, raw_len: usize, lz4: &[u8]) -> io::Result<()> {
        if raw_len == 0 || raw_len > MAX_BLOCK {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a block of {raw_len} raw bytes"),
            ));
        }
        self.flush_block()?;
        self.emit_block(raw_len, lz4)?;
        self.raw_written += raw_len as u64;
        Ok(())
    }
}

impl<W: Write> Write for ObjectWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.block_size - self.block.len();
        let n = room.min(buf.len());
        self.block.extend_from_slice(&buf[..n]);
        self.raw_written += n as u64;
        if self.block.len() == self.block_size {
            self.flush_block()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads one object from `R`: the header at once, then the raw body through `Read`.
///
/// `read` returns `Ok(0)` only after the end block and a verified trailer; any damage is an
/// `io::Error` whose inner error is a [`FormatError`] (see [`FormatError::from_io`]).
/// Callers must not act on the bytes before `read` returned `Ok(0)`.
#[derive(Debug)]
pub struct ObjectReader<R: Read> {
    input: R,
    header: ObjectHeader,
    seal: Option<Sealing>,
    crc: crc32fast::Hasher,
    body_len: u64,
    raw_read: u64,
    block: Vec<u8>,
    block_pos: usize,
    compressed: Vec<u8>,
    done: bool,
}

impl<R: Read> ObjectReader<R> {
    /// Reads and verifies the header.
    pub fn new(input: R) -> Result<Self, FormatError> {
        Self::with_keys(input, None)
    }

    /// Reads and verifies the header; an encrypted object is decrypted with the key of
    /// `keys` whose id it names ([`FormatError::Encrypted`] without keys,
    /// [`FormatError::UnknownKey`] when none matches).
    pub fn with_keys(mut input: R, keys: Option<&KeyRing>) -> Result<Self, FormatError> {
        let mut h = [0u8; HEADER_SIZE];
        read_exact_or_truncated(&mut input, &mut h, "object header")?;
        let header = ObjectHeader::decode(&h)?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&h);
        let mut body_len = 0;
        let seal = if header.flags & FLAG_ENCRYPTED != 0 {
            let mut pre = [0u8; PREAMBLE_SIZE];
            read_exact_or_truncated(&mut input, &mut pre, "encryption preamble")?;
            crc.update(&pre);
            body_len = PREAMBLE_SIZE as u64;
            let Some(keys) = keys else {
                return Err(FormatError::Encrypted);
            };
            let mut id = [0u8; KEY_ID_LEN];
            id.copy_from_slice(&pre[..KEY_ID_LEN]);
            let key = keys.find(&id).ok_or_else(|| FormatError::UnknownKey {
                id: id.iter().map(|b| format!("{b:02x}")).collect(),
            })?;
            let mut prefix = [0u8; 8];
            prefix.copy_from_slice(&pre[KEY_ID_LEN..KEY_ID_LEN + 8]);
            let mut context = h.to_vec();
            context.extend_from_slice(&pre);
            Some(Sealing {
                key: key.clone(),
                prefix,
                context,
                next_index: 0,
            })
        } else {
            None
        };
        Ok(ObjectReader {
            input,
            header,
            seal,
            crc,
            body_len,
            raw_read: 0,
            block: Vec::new(),
            block_pos: 0,
            compressed: Vec::new(),
            done: false,
        })
    }

    /// The verified header.
    pub fn header(&self) -> &ObjectHeader {
        &self.header
    }

    /// Returns the inner reader.
    pub fn into_inner(self) -> R {
        self.input
    }

    /// The next block as stored, decrypted but still compressed: its raw length and its
    /// LZ4 bytes; `None` after the end block and a verified trailer. The CRC, lengths and
    /// authentication are checked as by `read`; the decompression is not (whoever writes
    /// the block on with [`BodyWrite::write_compressed_block`] copies it as it is, and every
    /// reader of that object decompresses it). Callers must not act on the bytes before
    /// this returned `None`, and must not mix it with `read` inside a block.
    pub fn next_stored_block(&mut self) -> Result<Option<(usize, &[u8])>, FormatError> {
        if self.block_pos != self.block.len() {
            return Err(FormatError::Io(io::Error::other(
                "a block was only partly read",
            )));
        }
        if self.done {
            return Ok(None);
        }
        match self.read_stored_block()? {
            None => {
                self.done = true;
                Ok(None)
            }
            Some(raw) => {
                self.raw_read += raw as u64;
                Ok(Some((raw, &self.compressed)))
            }
        }
    }

    fn next_block(&mut self) -> Result<bool, FormatError> {
        let Some(raw) = self.read_stored_block()? else {
            return Ok(false);
        };
        self.block.resize(raw, 0);
        match lz4_flex::block::decompress_into(&self.compressed, &mut self.block) {
            Ok(n) if n == raw => {}
            _ => {
                return Err(FormatError::corrupt(
                    "block does not decompress to its length",
                ));
            }
        }
        self.block_pos = 0;
        Ok(true)
    }

    /// Reads the next block into `compressed` (decrypted) and returns its raw length, or
    /// `None` after the end block and the verified trailer.
    fn read_stored_block(&mut self) -> Result<Option<usize>, FormatError> {
        let mut bh = [0u8; BLOCK_HEADER_SIZE];
        read_exact_or_truncated(&mut self.input, &mut bh, "object block header")?;
        self.crc.update(&bh);
        self.body_len += BLOCK_HEADER_SIZE as u64;
        let raw = get32(&bh, 0) as usize;
        let stored = get32(&bh, 4) as usize;
        if raw == 0 {
            match &self.seal {
                None if stored == 0 => {}
                Some(seal) if stored == TAG_SIZE => {
                    let mut tag = [0u8; TAG_SIZE];
                    read_exact_or_truncated(&mut self.input, &mut tag, "end block")?;
                    self.crc.update(&tag);
                    self.body_len += TAG_SIZE as u64;
                    seal.key
                        .open(&seal.prefix, &seal.context, seal.next_index, true, &tag)?;
                }
                _ => return Err(FormatError::corrupt("bad end block")),
            }
            self.verify_trailer()?;
            return Ok(None);
        }
        if raw > MAX_BLOCK
            || stored > lz4_flex::block::get_maximum_output_size(MAX_BLOCK) + TAG_SIZE
        {
            return Err(FormatError::corrupt(format!(
                "block too large ({raw} raw, {stored} stored)"
            )));
        }
        if self.raw_read + raw as u64 > self.header.raw_len {
            return Err(FormatError::corrupt("body longer than its header says"));
        }
        self.compressed.resize(stored, 0);
        read_exact_or_truncated(&mut self.input, &mut self.compressed, "object block")?;
        self.crc.update(&self.compressed);
        self.body_len += stored as u64;
        if let Some(seal) = &mut self.seal {
            self.compressed = seal.key.open(
                &seal.prefix,
                &seal.context,
                seal.next_index,
                false,
                &self.compressed,
            )?;
            seal.next_index += 1;
        }
        Ok(Some(raw))
    }

    fn verify_trailer(&mut self) -> Result<(), FormatError> {
        let mut t = [0u8; TRAILER_SIZE];
        read_exact_or_truncated(&mut self.input, &mut t, "object trailer")?;
        if t[T_MAGIC..T_MAGIC + 4] != TRAILER_MAGIC {
            return Err(FormatError::corrupt("bad trailer magic"));
        }
        if crc32fast::hash(&t[..T_SELF_CRC]) != get32(&t, T_SELF_CRC) {
            return Err(FormatError::corrupt("trailer CRC mismatch"));
        }
        if get64(&t, T_BODY_LEN) != self.body_len {
            return Err(FormatError::corrupt("trailer body length mismatch"));
        }
        if get64(&t, T_RAW_LEN) != self.raw_read || self.raw_read != self.header.raw_len {
            return Err(FormatError::corrupt("raw body length mismatch"));
        }
        if get32(&t, T_CRC) != self.crc.clone().finalize() {
            return Err(FormatError::corrupt("object CRC mismatch"));
        }
        let mut extra = [0u8; 1];
        loop {
            match self.input.read(&mut extra) {
                Ok(0) => break,
                Ok(_) => return Err(FormatError::corrupt("bytes after the trailer")),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(FormatError::Io(e)),
            }
        }
        Ok(())
    }
}

impl<R: Read> Read for ObjectReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.block_pos == self.block.len() {
            if self.done {
                return Ok(0);
            }
            if !self.next_block().map_err(FormatError::into_io)? {
                self.done = true;
                self.block.clear();
                self.block_pos = 0;
                return Ok(0);
            }
        }
        let n = buf.len().min(self.block.len() - self.block_pos);
        buf[..n].copy_from_slice(&self.block[self.block_pos..self.block_pos + n]);
        self.block_pos += n;
        self.raw_read += n as u64;
        Ok(n)
    }
}

fn read_exact_or_truncated(
    r: &mut impl Read,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), FormatError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(FormatError::Truncated {
                    what,
                    needed: buf.len() as u64,
                    got: got as u64,
                });
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FormatError::from_io(e)),
        }
    }
    Ok(())
}

/// Encodes a whole object in memory (small objects and tests).
pub fn encode_to_vec(header: &ObjectHeader, raw: &[u8]) -> io::Result<Vec<u8>> {
    let mut w = ObjectWriter::new(Vec::new(), header)?;
    w.write_all(raw)?;
    w.finish()
}

/// Decodes a whole object in memory (small objects and tests).
pub fn decode_from_slice(bytes: &[u8]) -> Result<(ObjectHeader, Vec<u8>), FormatError> {
    let mut r = ObjectReader::new(bytes)?;
    let mut raw = Vec::new();
    r.read_to_end(&mut raw).map_err(FormatError::from_io)?;
    Ok((*r.header(), raw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn snapshot_header(pages: u32, page_size: u32) -> ObjectHeader {
        ObjectHeader {
            kind: Kind::Snapshot,
            flags: FLAG_LZ4,
            generation: 0x1234,
            start: 5,
            end: 5,
            page_size,
            db_pages: pages,
            timestamp_ms: 1_700_000_000_000,
            wal: WalState {
                magic: crate::wal::WAL_MAGIC_LE,
                checkpoint_seq: 3,
                salt1: 11,
                salt2: 12,
                checksum: Checksum(1, 2),
            },
            start_checksum: Checksum::default(),
            frames: 0,
            raw_len: u64::from(pages) * u64::from(page_size),
        }
    }

    #[test]
    fn snapshot_round_trips_across_blocks() {
        let h = snapshot_header(40, 512);
        let raw: Vec<u8> = (0..h.raw_len).map(|i| (i % 251) as u8).collect();
        let mut w = ObjectWriter::new(Vec::new(), &h)
            .expect("new")
            .with_block_size(1000);
        w.write_all(&raw).expect("write");
        let bytes = w.finish().expect("finish");
        let (h2, raw2) = decode_from_slice(&bytes).expect("decode");
        assert_eq!(h, h2);
        assert_eq!(raw, raw2);
    }

    #[test]
    fn a_merged_segment_header_must_count_its_frames_and_whole_segment_headers() {
        let frame = (crate::wal::FRAME_HEADER_SIZE + 512) as u64;
        let h = ObjectHeader {
            kind: Kind::Merged,
            start: 5,
            end: 9,
            frames: 4,
            raw_len: 4 * frame + 2 * HEADER_SIZE as u64,
            ..snapshot_header(3, 512)
        };
        assert_eq!(ObjectHeader::decode(&h.encode()).expect("valid"), h);
        assert!(Kind::Merged.has_frames() && Kind::Segment.has_frames());
        assert!(!Kind::Snapshot.has_frames());
        for bad in [
            ObjectHeader {
                raw_len: 4 * frame,
                ..h
            },
            ObjectHeader {
                raw_len: 4 * frame + 95,
                ..h
            },
            ObjectHeader { frames: 0, ..h },
            ObjectHeader { end: 5, ..h },
        ] {
            let e = ObjectHeader::decode(&bad.encode()).expect_err("refused");
            assert!(e.is_corrupt(), "{e}");
        }
    }

    /// Raw lengths of the blocks of a plain object's body.
    fn block_lengths(bytes: &[u8]) -> Vec<usize> {
        let mut at = HEADER_SIZE;
        let mut out = Vec::new();
        loop {
            let raw = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            let stored = u32::from_be_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
            at += BLOCK_HEADER_SIZE + stored;
            if raw == 0 {
                return out;
            }
            out.push(raw);
        }
    }

    #[test]
    fn writer_cuts_1_mib_blocks_and_reader_takes_blocks_up_to_4_mib() {
        let h = snapshot_header(1300, 4096); // 5.08 MiB raw
        let raw: Vec<u8> = (0..h.raw_len).map(|i| (i % 251) as u8).collect();
        let mut w = ObjectWriter::new(Vec::new(), &h).expect("new");
        w.write_all(&raw).expect("write");
        let bytes = w.finish().expect("finish");
        let lens = block_lengths(&bytes);
        assert_eq!(lens.len(), 6, "{lens:?}");
        assert!(lens[..5].iter().all(|&n| n == WRITE_BLOCK), "{lens:?}");
        assert_eq!(decode_from_slice(&bytes).expect("decode").1, raw);

        // Objects written with the largest block a reader accepts still read.
        let mut w = ObjectWriter::new(Vec::new(), &h)
            .expect("new")
            .with_block_size(MAX_BLOCK);
        w.write_all(&raw).expect("write");
        let bytes = w.finish().expect("finish");
        assert_eq!(block_lengths(&bytes)[0], MAX_BLOCK);
        assert_eq!(decode_from_slice(&bytes).expect("decode").1, raw);
    }

    #[test]
    fn every_truncation_is_detected() {
        let h = snapshot_header(4, 512);
        let raw = vec![3u8; h.raw_len as usize];
        let bytes = encode_to_vec(&h, &raw).expect("encode");
        for cut in 0..bytes.len() {
            assert!(
                decode_from_slice(&bytes[..cut]).is_err(),
                "cut at {cut} accepted"
            );
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let h = snapshot_header(2, 512);
        let raw: Vec<u8> = (0..h.raw_len).map(|i| (i * 7 % 256) as u8).collect();
        let bytes = encode_to_vec(&h, &raw).expect("encode");
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(
                    decode_from_slice(&b).is_err(),
                    "flip byte {i} bit {bit} accepted"
                );
            }
        }
    }

    #[test]
    fn trailing_garbage_is_refused() {
        let h = snapshot_header(1, 512);
        let mut bytes = encode_to_vec(&h, &[0u8; 512]).expect("encode");
        bytes.push(0);
        assert!(decode_from_slice(&bytes).is_err());
    }

    #[test]
    fn unknown_version_is_refused_by_name() {
        let h = snapshot_header(1, 512);
        let mut bytes = encode_to_vec(&h, &[0u8; 512]).expect("encode");
        bytes[5] = 9;
        let crc = crc32fast::hash(&bytes[..O_HEADER_CRC]);
        bytes[O_HEADER_CRC..O_HEADER_CRC + 4].copy_from_slice(&crc.to_be_bytes());
        match decode_from_slice(&bytes) {
            Err(FormatError::UnsupportedVersion(v)) => assert_eq!(v, 9),
            other => panic!("expected UnsupportedVersion, got {other:?}"),
        }
    }

    #[test]
    fn writer_refuses_a_body_of_the_wrong_length() {
        let h = snapshot_header(2, 512);
        let mut w = ObjectWriter::new(Vec::new(), &h).expect("new");
        w.write_all(&[0u8; 512]).expect("write");
        assert!(w.finish().is_err());
    }

    fn encrypted(key: &Key, raw: &[u8], block: usize) -> Vec<u8> {
        let mut h = snapshot_header((raw.len() / 512) as u32, 512);
        h.raw_len = raw.len() as u64;
        let mut w = ObjectWriter::new_encrypted(Vec::new(), &h, key, [9u8; 8])
            .expect("new")
            .with_block_size(block);
        w.write_all(raw).expect("write");
        w.finish().expect("finish")
    }

    #[test]
    fn the_first_bytes_of_an_object_name_the_key_it_is_encrypted_with() {
        let key = Key::from_bytes(&[3u8; 32]).expect("key");
        let raw = vec![1u8; 2 * 512];
        let sealed = encrypted(&key, &raw, 700);
        let (h, id) = header_and_key_id(&sealed[..HEAD_WITH_KEY_ID]).expect("decode");
        assert_eq!((h.generation, id), (0x1234, Some(key.id())));
        assert!(
            header_and_key_id(&sealed[..HEADER_SIZE]).is_err(),
            "cut key id"
        );
        let mut h = snapshot_header(2, 512);
        h.raw_len = raw.len() as u64;
        let plain = encode_to_vec(&h, &raw).expect("encode");
        let (_, id) = header_and_key_id(&plain[..HEADER_SIZE]).expect("plaintext");
        assert_eq!(id, None);
    }

    /// Recomputes the trailer's CRCs as an attacker who can write to the bucket would.
    fn recrc(mut b: Vec<u8>) -> Vec<u8> {
        let t = b.len() - TRAILER_SIZE;
        let body_len = (t - HEADER_SIZE) as u64;
        b[t + T_BODY_LEN..t + T_BODY_LEN + 8].copy_from_slice(&body_len.to_be_bytes());
        let crc = crc32fast::hash(&b[..t]);
        b[t + T_CRC..t + T_CRC + 4].copy_from_slice(&crc.to_be_bytes());
        let self_crc = crc32fast::hash(&b[t..t + T_SELF_CRC]);
        b[t + T_SELF_CRC..t + T_SELF_CRC + 4].copy_from_slice(&self_crc.to_be_bytes());
        b
    }

    fn decode_with(bytes: &[u8], ring: &KeyRing) -> Result<Vec<u8>, FormatError> {
        let mut r = ObjectReader::with_keys(bytes, Some(ring))?;
        let mut raw = Vec::new();
        r.read_to_end(&mut raw).map_err(FormatError::from_io)?;
        Ok(raw)
    }

    /// Copies `src`'s blocks as stored into a new object after `prefix` raw bytes, as a merge
    /// does; `key` encrypts the new object.
    fn copy_blocks(
        src: &[u8],
        ring: Option<&KeyRing>,
        prefix: &[u8],
        key: Option<&Key>,
    ) -> Result<Vec<u8>, FormatError> {
        let mut r = ObjectReader::with_keys(src, ring)?;
        let mut h = *r.header();
        // The sources here are snapshots: the prefix is whole pages.
        h.raw_len += prefix.len() as u64;
        h.db_pages += (prefix.len() / h.page_size as usize) as u32;
        let mut w = match key {
            None => ObjectWriter::new(Vec::new(), &h),
            Some(k) => ObjectWriter::new_encrypted(Vec::new(), &h, k, [7u8; 8]),
        }
        .map_err(FormatError::Io)?;
        w.write_all(prefix).map_err(FormatError::Io)?;
        while let Some((raw, lz4)) = r.next_stored_block()? {
            w.write_compressed_block(raw, lz4)
                .map_err(FormatError::Io)?;
        }
        w.finish().map_err(FormatError::Io)
    }

    #[test]
    fn stored_blocks_copied_into_another_object_decode_to_the_same_bytes() {
        let h = snapshot_header(40, 512);
        let raw: Vec<u8> = (0..h.raw_len).map(|i| (i % 251) as u8).collect();
        let mut w = ObjectWriter::new(Vec::new(), &h)
            .expect("new")
            .with_block_size(3000);
        w.write_all(&raw).expect("write");
        let src = w.finish().expect("finish");
        let prefix = [0xEEu8; 512];
        let copy = copy_blocks(&src, None, &prefix, None).expect("copy");
        let (h2, raw2) = decode_from_slice(&copy).expect("decode");
        assert_eq!(h2.raw_len, h.raw_len + 512);
        assert_eq!(&raw2[..512], &prefix[..]);
        assert_eq!(&raw2[512..], &raw[..]);

        // From an encrypted object into one sealed with another key, and back to plain.
        let k1 = Key::from_bytes(&[3u8; 32]).expect("key");
        let k2 = Key::from_bytes(&[4u8; 32]).expect("key");
        let enc = encrypted(&k1, &raw, 5000);
        let ring = KeyRing::new(k2.clone()).with_reader(k1.clone());
        let re = copy_blocks(&enc, Some(&ring), &prefix, Some(&k2)).expect("copy");
        let got = decode_with(&re, &KeyRing::new(k2.clone())).expect("decode");
        assert_eq!(&got[512..], &raw[..]);
        assert!(
            decode_with(&re, &KeyRing::new(k1)).is_err(),
            "sealed with the new key"
        );
        let plain = copy_blocks(&re, Some(&ring), &[], None).expect("copy");
        assert_eq!(decode_from_slice(&plain).expect("decode").1, got);
    }

    #[test]
    fn copying_stored_blocks_still_checks_the_source_and_the_length() {
        let h = snapshot_header(8, 512);
        let raw = vec![5u8; h.raw_len as usize];
        let mut w = ObjectWriter::new(Vec::new(), &h)
            .expect("new")
            .with_block_size(1024);
        w.write_all(&raw).expect("write");
        let src = w.finish().expect("finish");
        // A flipped bit in a stored block fails the CRC when the trailer is reached.
        let mut bad = src.clone();
        bad[HEADER_SIZE + BLOCK_HEADER_SIZE + 2] ^= 0x10;
        assert!(copy_blocks(&bad, None, &[], None).is_err());
        // A cut object is truncated.
        assert!(copy_blocks(&src[..src.len() - 10], None, &[], None).is_err());
        // A block of no raw bytes, or more than the header allows, is refused.
        let mut w = ObjectWriter::new(Vec::new(), &h).expect("new");
        assert!(w.write_compressed_block(0, &[]).is_err());
        assert!(w.write_compressed_block(MAX_BLOCK + 1, &[0]).is_err());
        // Raw lengths that do not add up to the header's fail at the end.
        let mut w = ObjectWriter::new(Vec::new(), &h).expect("new");
        let lz4 = lz4_flex::block::compress(&[1u8; 100]);
        w.write_compressed_block(100, &lz4).expect("block");
        assert!(w.finish().is_err());
    }

    #[test]
    fn a_partly_read_block_cannot_be_taken_as_stored() {
        let h = snapshot_header(8, 512);
        let raw = vec![5u8; h.raw_len as usize];
        let bytes = encode_to_vec(&h, &raw).expect("encode");
        let mut r = ObjectReader::new(&bytes[..]).expect("reader");
        let mut some = [0u8; 10];
        r.read_exact(&mut some).expect("read");
        assert!(r.next_stored_block().is_err());
    }

    #[test]
    fn encrypted_objects_round_trip_and_hide_their_body() {
        let key = Key::from_bytes(&[3u8; 32]).expect("key");
        let raw: Vec<u8> = (0..4 * 512).map(|i| (i % 7) as u8).collect();
        let bytes = encrypted(&key, &raw, 700);
        assert_eq!(
            decode_with(&bytes, &KeyRing::new(key.clone())).expect("decode"),
            raw
        );
        // The body is not readable without the key: no plain LZ4 of the pattern inside.
        assert!(matches!(
            decode_from_slice(&bytes),
            Err(FormatError::Encrypted)
        ));
        let other = Key::from_bytes(&[4u8; 32]).expect("key");
        match decode_with(&bytes, &KeyRing::new(other.clone())) {
            Err(FormatError::UnknownKey { id }) => assert_eq!(id, key.id_hex()),
            r => panic!("expected UnknownKey, got {r:?}"),
        }
        // Rotation: an old key accepted for reading.
        let ring = KeyRing::new(other).with_reader(key);
        assert_eq!(decode_with(&bytes, &ring).expect("old key"), raw);
    }

    #[test]
    fn tampered_truncated_and_reordered_encrypted_objects_are_refused() {
        let key = Key::from_bytes(&[5u8; 32]).expect("key");
        let ring = KeyRing::new(key.clone());
        let raw: Vec<u8> = (0..4 * 512).map(|i| (i * 31 % 256) as u8).collect();
        // Blocks of 512 raw bytes; the pattern compresses poorly so blocks have equal size.
        let bytes = encrypted(&key, &raw, 512);
        let first = HEADER_SIZE + PREAMBLE_SIZE;
        let stored = get32(&bytes, first + 4) as usize;
        let block = BLOCK_HEADER_SIZE + stored;
        // Tamper with a ciphertext byte, CRCs fixed up.
        let mut t = bytes.clone();
        t[first + BLOCK_HEADER_SIZE + 3] ^= 1;
        assert!(decode_with(&recrc(t), &ring).is_err(), "tampered");
        // Swap blocks 0 and 1 (same sizes), CRCs fixed up.
        let second_stored = get32(&bytes, first + block + 4) as usize;
        assert_eq!(stored, second_stored);
        let mut t = bytes.clone();
        let (a, b) = (
            bytes[first..first + block].to_vec(),
            bytes[first + block..first + 2 * block].to_vec(),
        );
        t[first..first + block].copy_from_slice(&b);
        t[first + block..first + 2 * block].copy_from_slice(&a);
        assert!(decode_with(&recrc(t), &ring).is_err(), "reordered");
        // Drop the last data block (and keep the end block), CRCs fixed up.
        let end = bytes.len() - TRAILER_SIZE - BLOCK_HEADER_SIZE - TAG_SIZE;
        let mut t = bytes[..end - block].to_vec();
        t.extend_from_slice(&bytes[end..]);
        assert!(decode_with(&recrc(t), &ring).is_err(), "truncated");
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_identity(
            pages in 0u32..6,
            shift in 9u32..13,
            generation in any::<u64>(),
            pos in any::<u64>(),
            ts in any::<i64>(),
            seed in any::<u8>(),
            block in 1usize..5000,
        ) {
            let page_size = 1u32 << shift;
            let mut h = snapshot_header(pages, page_size);
            h.generation = generation;
            h.start = pos;
            h.end = pos;
            h.timestamp_ms = ts;
            let raw: Vec<u8> = (0..h.raw_len).map(|i| (i as u8).wrapping_mul(seed)).collect();
            let mut w = ObjectWriter::new(Vec::new(), &h).expect("new").with_block_size(block);
            w.write_all(&raw).expect("write");
            let bytes = w.finish().expect("finish");
            let (h2, raw2) = decode_from_slice(&bytes).expect("decode");
            prop_assert_eq!(h, h2);
            prop_assert_eq!(raw, raw2);
        }

        #[test]
        fn no_byte_string_makes_the_decoder_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode_from_slice(&bytes);
        }

        #[test]
        fn damaged_objects_are_refused_not_panicked_on(
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let h = snapshot_header(3, 512);
            let raw: Vec<u8> = (0..h.raw_len).map(|i| (i % 13) as u8).collect();
            let bytes = encode_to_vec(&h, &raw).expect("encode");
            let c = cut.index(bytes.len());
            prop_assert!(decode_from_slice(&bytes[..c]).is_err());
            let mut b = bytes.clone();
            let at = flip.index(b.len());
            b[at] ^= 1 << bit;
            prop_assert!(decode_from_slice(&b).is_err());
        }
    }
}
