use super::*;
use crate::crypto::{KeyRing, PREAMBLE_SIZE, TAG_SIZE};
use crate::wal::Checksum;
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
