//! Reading an object: the header at once, then the body block by block, verified.

use super::*;
use crate::crypto::{KEY_ID_LEN, KeyRing, PREAMBLE_SIZE, TAG_SIZE};

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
