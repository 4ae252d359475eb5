//! walship's formats, with no I/O: bytes in, bytes out.
//!
//! - [`wal`]: SQLite's write-ahead log — [`wal::WalHeader`], [`wal::FrameHeader`], the
//!   cumulative [`wal::Checksum`] and [`wal::FrameChain`], which validates frames one by one.
//! - [`object`]: the object format of docs/format.md — [`object::ObjectHeader`] and the
//!   streaming [`object::ObjectWriter`] / [`object::ObjectReader`] (LZ4 blocks, CRC32).
//! - [`key`]: object keys — [`key::GenerationId`], [`key::ObjectKey`] — which sort so that one
//!   LIST finds the newest generation and snapshot.
//!
//! ```
//! use std::io::{Read, Write};
//! use walship_format::object::{ObjectHeader, ObjectReader, ObjectWriter, Kind, FLAG_LZ4, WalState};
//! use walship_format::wal::Checksum;
//!
//! let header = ObjectHeader {
//!     kind: Kind::Snapshot, flags: FLAG_LZ4, generation: 1, start: 0, end: 0,
//!     page_size: 4096, db_pages: 1, timestamp_ms: 0, wal: WalState::default(),
//!     start_checksum: Checksum::default(), frames: 0, raw_len: 4096,
//! };
//! let mut w = ObjectWriter::new(Vec::new(), &header).unwrap();
//! w.write_all(&[0u8; 4096]).unwrap();
//! let bytes = w.finish().unwrap();
//!
//! let mut r = ObjectReader::new(&bytes[..]).unwrap();
//! let mut page = Vec::new();
//! r.read_to_end(&mut page).unwrap(); // Ok only once the trailer's CRC verified
//! assert_eq!(page.len(), 4096);
//! ```

#![warn(missing_docs)]

pub mod crypto;
pub mod key;
pub mod object;
pub mod wal;

use std::io;

/// Errors of decoding. `Corrupt` and `Truncated` mean the bytes are bad; `Io` comes from the
/// reader the caller supplied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The bytes are not what the format says.
    #[error("corrupt: {0}")]
    Corrupt(String),
    /// The bytes end early.
    #[error("truncated {what}: needed {needed} bytes, got {got}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        got: u64,
    },
    /// An object of a format version this build does not know.
    #[error("object format version {0} is not supported by this walship (upgrade walship)")]
    UnsupportedVersion(u16),
    /// An encrypted object, and no key to read it with.
    #[error(
        "object is encrypted and no key was given (set WALSHIP_ENCRYPTION_KEY or --encryption-key-file)"
    )]
    Encrypted,
    /// An encrypted object whose key is not among the keys given.
    #[error(
        "object is encrypted with key id {id}, which none of the given keys has (wrong key? add the old key with --decryption-key-file)"
    )]
    UnknownKey {
        /// The key id in the object, hex.
        id: String,
    },
    /// The underlying reader failed.
    #[error("read failed: {0}")]
    Io(#[source] io::Error),
}

impl FormatError {
    /// A `Corrupt` error.
    pub fn corrupt(msg: impl Into<String>) -> Self {
        FormatError::Corrupt(msg.into())
    }

    /// Wraps this error in an `io::Error` (for `Read` impls); [`FormatError::from_io`]
    /// unwraps it again.
    pub fn into_io(self) -> io::Error {
        match self {
            FormatError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }

    /// Recovers a `FormatError` carried in an `io::Error`, or wraps a genuine I/O error.
    pub fn from_io(e: io::Error) -> Self {
        if e.get_ref().is_some_and(|inner| inner.is::<FormatError>()) {
            match e.into_inner().map(|b| b.downcast::<FormatError>()) {
                Some(Ok(fe)) => *fe,
                Some(Err(other)) => FormatError::Io(io::Error::other(other)),
                None => FormatError::corrupt("unknown"),
            }
        } else {
            FormatError::Io(e)
        }
    }

    /// True if the bytes themselves are bad (as opposed to the reader failing).
    pub fn is_corrupt(&self) -> bool {
        !matches!(self, FormatError::Io(_))
    }
}
