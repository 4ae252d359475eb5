//! Client-side encryption of object bodies (docs/format.md, "Encryption"): AES-256-GCM per
//! block, a fresh nonce per block (a random per-object prefix and the block's index), the
//! header and preamble authenticated as associated data, and an authenticated end block, so
//! tampering, truncation and reordering are all detected.

use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::FormatError;

/// Length of a key in bytes.
pub const KEY_LEN: usize = 32;
/// Length of a key id in bytes.
pub const KEY_ID_LEN: usize = 8;
/// Size of the encryption preamble after the header.
pub const PREAMBLE_SIZE: usize = 24;
/// Size of a GCM tag.
pub const TAG_SIZE: usize = 16;

/// An AES-256 key. `Debug` shows only its id, never the key.
#[derive(Clone)]
pub struct Key {
    id: [u8; KEY_ID_LEN],
    cipher: Aes256Gcm,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key {{ id: {} }}", self.id_hex())
    }
}

/// Why a key does not parse. Never contains the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("encryption key must be 32 bytes written as 64 hex digits or base64 ({0})")]
pub struct KeyError(String);

impl Key {
    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Key, KeyError> {
        if bytes.len() != KEY_LEN {
            return Err(KeyError(format!("got {} bytes", bytes.len())));
        }
        let mut h = Sha256::new();
        h.update(b"walship key id v1");
        h.update(bytes);
        let digest = h.finalize();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        let cipher = Aes256Gcm::new_from_slice(bytes).map_err(|_| KeyError("bad length".into()))?;
        Ok(Key { id, cipher })
    }

    /// Parses 64 hex digits or base64 (standard or URL-safe, padded or not) of 32 bytes.
    pub fn parse(text: &str) -> Result<Key, KeyError> {
        let t = text.trim();
        if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut b = [0u8; KEY_LEN];
            for (i, byte) in b.iter_mut().enumerate() {
                *byte = u8::from_str_radix(&t[2 * i..2 * i + 2], 16)
                    .map_err(|_| KeyError("bad hex".into()))?;
            }
            return Key::from_bytes(&b);
        }
        let engines = [
            &base64::engine::general_purpose::STANDARD,
            &base64::engine::general_purpose::STANDARD_NO_PAD,
            &base64::engine::general_purpose::URL_SAFE,
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ];
        for e in engines {
            if let Ok(b) = e.decode(t) {
                return Key::from_bytes(&b);
            }
        }
        Err(KeyError(format!(
            "{} characters, neither hex nor base64",
            t.len()
        )))
    }

    /// The key's id, stored in objects it encrypts.
    pub fn id(&self) -> [u8; KEY_ID_LEN] {
        self.id
    }

    /// The id in hex.
    pub fn id_hex(&self) -> String {
        id_hex(&self.id)
    }

    fn nonce(prefix: &[u8; 8], index: u32) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..8].copy_from_slice(prefix);
        n[8..].copy_from_slice(&index.to_be_bytes());
        n
    }

    fn aad(context: &[u8], index: u32, last: bool) -> Vec<u8> {
        let mut a = Vec::with_capacity(context.len() + 5);
        a.extend_from_slice(context);
        a.extend_from_slice(&index.to_be_bytes());
        a.push(u8::from(last));
        a
    }

    /// Encrypts block `index`; `context` is the header and preamble bytes.
    pub fn seal(
        &self,
        prefix: &[u8; 8],
        context: &[u8],
        index: u32,
        last: bool,
        plain: &[u8],
    ) -> Result<Vec<u8>, FormatError> {
        let nonce = Self::nonce(prefix, index);
        let aad = Self::aad(context, index, last);
        self.cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: &aad,
                },
            )
            .map_err(|_| FormatError::corrupt("encryption failed"))
    }

    /// Decrypts block `index`; fails if anything about it or its place was changed.
    pub fn open(
        &self,
        prefix: &[u8; 8],
        context: &[u8],
        index: u32,
        last: bool,
        sealed: &[u8],
    ) -> Result<Vec<u8>, FormatError> {
        let nonce = Self::nonce(prefix, index);
        let aad = Self::aad(context, index, last);
        self.cipher
            .decrypt(Nonce::from_slice(&nonce), Payload { msg: sealed, aad: &aad })
            .map_err(|_| {
                FormatError::corrupt(format!(
                    "encrypted block {index} fails authentication (tampered, truncated or reordered)"
                ))
            })
    }
}

/// A key id in hex, as messages show it.
pub fn id_hex(id: &[u8; KEY_ID_LEN]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Keys a reader may decrypt with, and the one a writer encrypts with.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    write: Option<Key>,
    read: Vec<Key>,
}

impl KeyRing {
    /// A ring that encrypts with `key` (and reads it).
    pub fn new(key: Key) -> Self {
        KeyRing {
            write: Some(key.clone()),
            read: vec![key],
        }
    }

    /// Adds a key accepted for reading only (an old key during rotation).
    pub fn with_reader(mut self, key: Key) -> Self {
        if !self.read.iter().any(|k| k.id == key.id) {
            self.read.push(key);
        }
        self
    }

    /// A ring that only reads.
    pub fn read_only(keys: Vec<Key>) -> Self {
        KeyRing {
            write: None,
            read: keys,
        }
    }

    /// The key to encrypt with.
    pub fn writer(&self) -> Option<&Key> {
        self.write.as_ref()
    }

    /// The key with this id.
    pub fn find(&self, id: &[u8; KEY_ID_LEN]) -> Option<&Key> {
        self.read.iter().find(|k| &k.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_from_hex_and_base64_and_never_print() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let k1 = Key::parse(hex).expect("hex");
        let b64 = base64::engine::general_purpose::STANDARD.encode(
            (0..32u8)
                .map(|i| {
                    [
                        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb,
                        0xcc, 0xdd, 0xee, 0xff,
                    ][(i % 16) as usize]
                })
                .collect::<Vec<_>>(),
        );
        let k2 = Key::parse(&b64).expect("base64");
        assert_eq!(k1.id(), k2.id());
        let dbg = format!("{k1:?}");
        assert!(!dbg.contains("00112233445566778899"), "{dbg}");
        let err = Key::parse("c2hvcnQ=").expect_err("short");
        assert!(err.to_string().contains("got 5 bytes"));
        let err = Key::parse("not a key at all!").expect_err("garbage");
        assert!(!err.to_string().contains("not a key"));
    }

    #[test]
    fn a_block_opens_only_in_its_place() {
        let k = Key::from_bytes(&[7u8; 32]).expect("key");
        let p = [1u8; 8];
        let sealed = k.seal(&p, b"ctx", 3, false, b"hello").expect("seal");
        assert_eq!(
            k.open(&p, b"ctx", 3, false, &sealed).expect("open"),
            b"hello"
        );
        assert!(k.open(&p, b"ctx", 4, false, &sealed).is_err(), "reordered");
        assert!(k.open(&p, b"ctx", 3, true, &sealed).is_err(), "final flag");
        assert!(
            k.open(&p, b"ctX", 3, false, &sealed).is_err(),
            "header changed"
        );
        let other = Key::from_bytes(&[8u8; 32]).expect("key");
        assert!(
            other.open(&p, b"ctx", 3, false, &sealed).is_err(),
            "wrong key"
        );
    }
}
