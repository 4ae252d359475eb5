//! The object format of docs/format.md: a 96-byte header, a body of LZ4 blocks, a 28-byte
//! trailer with a CRC32 over everything before it.
//!
//! [`ObjectWriter`] and [`ObjectReader`] stream: they hold at most one block (4 MiB of raw
//! data) at a time, whatever the object's size. They are generic over `std::io::Write` and
//! `std::io::Read` and do no I/O of their own.
//!
//! The parts: the header ([`ObjectHeader`], [`Kind`]: the fields and their checks), the
//! writer ([`ObjectWriter`], [`BodyWrite`]) and the reader ([`ObjectReader`]).

use std::io::{self, Read, Write};

use crate::FormatError;
use crate::crypto::Key;

mod header;
mod reader;
#[cfg(test)]
mod tests;
mod writer;

pub use header::{HEAD_WITH_KEY_ID, Kind, ObjectHeader, WalState, header_and_key_id};
pub use reader::ObjectReader;
pub use writer::{BodyWrite, ObjectWriter};

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

/// Encryption state of a writer or reader.
#[derive(Debug, Clone)]
struct Sealing {
    key: Key,
    prefix: [u8; 8],
    /// Header and preamble: the associated data of every block.
    context: Vec<u8>,
    next_index: u32,
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
