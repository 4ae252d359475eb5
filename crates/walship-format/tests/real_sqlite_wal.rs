//! A WAL written by the real (bundled) SQLite parses, and every checksum verifies.

use rusqlite::Connection;
use walship_format::wal::{FRAME_HEADER_SIZE, FrameChain, FrameCheck, WAL_HEADER_SIZE, WalHeader};

fn write_wal(dir: &std::path::Path, page_size: u32, txns: usize) -> Vec<u8> {
    let db = dir.join("t.db");
    let conn = Connection::open(&db).expect("open");
    conn.pragma_update(None, "page_size", page_size)
        .expect("page_size");
    conn.pragma_update(None, "journal_mode", "wal")
        .expect("wal");
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .expect("autocheckpoint off");
    conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        .expect("create");
    for i in 0..txns {
        conn.execute("INSERT INTO t(v) VALUES (randomblob(?1))", [100 + i * 37])
            .expect("insert");
    }
    // Keep the connection open so the WAL is not checkpointed away on close.
    let wal = std::fs::read(dir.join("t.db-wal")).expect("read wal");
    drop(conn);
    wal
}

#[test]
fn real_wal_frames_verify_and_commits_match_transactions() {
    for page_size in [512u32, 4096, 65536] {
        let dir = tempfile::tempdir().expect("tempdir");
        let txns = 25;
        let wal = write_wal(dir.path(), page_size, txns);
        let hdr = WalHeader::parse(&wal).expect("header parses");
        assert_eq!(hdr.page_size, page_size);
        let mut chain = FrameChain::from_header(&hdr);
        let frame_size = hdr.frame_size() as usize;
        let mut commits = 0;
        let mut off = WAL_HEADER_SIZE;
        while off + frame_size <= wal.len() {
            let (fh, check) = chain.check(&wal[off..off + frame_size]).expect("frame");
            assert_eq!(
                check,
                FrameCheck::Valid,
                "frame at {off} (page size {page_size})"
            );
            if fh.is_commit() {
                commits += 1;
            }
            off += frame_size;
        }
        // CREATE TABLE plus one commit per insert.
        assert_eq!(commits, txns + 1, "page size {page_size}");
        assert_eq!(off, wal.len());
    }
}

#[test]
fn a_flipped_byte_in_a_real_wal_breaks_the_chain_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut wal = write_wal(dir.path(), 4096, 5);
    let hdr = WalHeader::parse(&wal).expect("header");
    let fs = hdr.frame_size() as usize;
    // Flip a byte in the page of frame 2.
    wal[WAL_HEADER_SIZE + fs + FRAME_HEADER_SIZE + 100] ^= 0x40;
    let mut chain = FrameChain::from_header(&hdr);
    let (_, c1) = chain
        .check(&wal[WAL_HEADER_SIZE..WAL_HEADER_SIZE + fs])
        .expect("f1");
    assert_eq!(c1, FrameCheck::Valid);
    let (_, c2) = chain
        .check(&wal[WAL_HEADER_SIZE + fs..WAL_HEADER_SIZE + 2 * fs])
        .expect("f2");
    assert_eq!(c2, FrameCheck::ChecksumMismatch);
}
