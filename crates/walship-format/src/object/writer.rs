//! Writing an object: header, compressed (and maybe sealed) blocks, trailer.

use super::*;
use crate::crypto::{KEY_ID_LEN, PREAMBLE_SIZE};

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
