//! Compaction: runs of small segments merged into larger ones, so a restore fetches a few
//! objects instead of one per sync (docs/format.md, "Merged segments").
//!
//! A replicator under a light, steady load ships a small segment every sync gap: ten objects
//! a second at 100 transactions/s. Each costs a restore one request, and on most stores a
//! request costs more than the bytes in it. The `Compactor` task takes each segment the
//! replicator shipped and, once [`CompactionOptions::fan_in`] consecutive pieces of one level
//! have gathered, writes one merged segment (kind [`Kind::Merged`]) holding every part's
//! header and frames, verbatim, covering the same positions (across WAL restarts too): its
//! start is the first part's, its end, WAL state and key time the last part's. Merged
//! pieces are merged again (level 1, 2, ...) while the result stays under
//! [`CompactionOptions::max_bytes`].
//!
//! The parts stay for [`CompactionOptions::keep_parts`] after the merge (a point-in-time
//! restore within it can still stop between them) and are deleted afterwards, the next time
//! a segment is shipped: an idle replicator sends no request.
//!
//! [`Run`] is the pure plan: which pieces follow on from each other, which to merge next.
//! [`merge`] writes one merged segment, streaming the parts from the store through a
//! blocking reader; it checks every part's header against the one the replicator wrote, that
//! the parts continue each other, and every part's CRCs (restore verifies each part's frame
//! checksum chain inside the merged object as it would the part's own).
//!
//! A merge only ever writes into the replicator's own generation and only copies objects
//! already there, so a merge cut short (a crash, a failed upload, a replicator stopping)
//! leaves the replica as restorable as before.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use walship_format::FormatError;
use walship_format::crypto::KeyRing;
use walship_format::key::{GenerationId, ObjectKey};
use walship_format::object::{BodyWrite, FLAG_LZ4, HEADER_SIZE, Kind, ObjectHeader, ObjectReader};
use walship_storage::{ByteStream, ObjectStore};

use crate::error::{EngineError, EngineResult};
use crate::replica::Replica;
use crate::replicate::Status;

/// How segments are merged. `fan_in` under 2 switches compaction off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactionOptions {
    /// This many consecutive pieces of one level are merged into one. Default 16.
    pub fan_in: u32,
    /// Only segments of at most this many stored bytes take part: larger ones already
    /// amortize their request. Default 1 MiB.
    pub small_bytes: u64,
    /// A merged segment holds at most this many stored bytes of parts. Default 8 MiB.
    ///
    /// A merge makes the store send and receive its parts' bytes once more, to save a
    /// restore one request per part: worth it for the small segments of a light load, not
    /// for a heavy load's, whose objects are large enough that a request is a small part of
    /// fetching them (at a typical 30 ms to the first byte and 100 MB/s, an 8 MiB object
    /// spends under half its time on the request). A writer at full speed ships 20 or more
    /// segments of about 1 MiB a second; merging them would download and upload everything
    /// shipped a second time (measured: the loopback S3 server's CPU 37–41 % of a core
    /// against 14–16 % without those merges).
    pub max_bytes: u64,
    /// Parts are deleted this long after they were merged. Default 5 minutes.
    pub keep_parts: Duration,
}

impl Default for CompactionOptions {
    fn default() -> Self {
        CompactionOptions {
            fan_in: 16,
            small_bytes: 1 << 20,
            max_bytes: 8 << 20,
            keep_parts: Duration::from_secs(300),
        }
    }
}

impl CompactionOptions {
    /// Whether compaction runs at all.
    pub fn enabled(&self) -> bool {
        self.fan_in >= 2
    }
}

/// A segment in the replica: shipped by the replicator (level 0) or merged (level ≥ 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Its key.
    pub name: String,
    /// Its header, as written.
    pub header: ObjectHeader,
    /// Stored bytes.
    pub size: u64,
    /// 0 for a shipped segment, one more than its parts' for a merged one.
    pub level: u8,
}

/// Whether `b` continues `a`: the next segment of the same generation (the replicator gives
/// a segment the previous one's end as its start only once it proved the log continuous,
/// across a WAL restart too).
fn continues(a: &ObjectHeader, b: &ObjectHeader) -> bool {
    a.generation == b.generation && b.start == a.end && b.page_size == a.page_size
}

/// Bytes a piece adds to a merged segment's raw body: a segment's header and frames, or a
/// merged segment's body as it is.
fn merged_len(h: &ObjectHeader) -> u64 {
    match h.kind {
        Kind::Merged => h.raw_len,
        _ => HEADER_SIZE as u64 + h.raw_len,
    }
}

/// The run of consecutive pieces that may still be merged, oldest first. Levels never rise
/// from front to back: pieces merge only at the back, `fan_in` of one level at a time.
#[derive(Debug, Clone)]
pub struct Run {
    opts: CompactionOptions,
    pieces: Vec<Piece>,
}

impl Run {
    /// An empty run.
    pub fn new(opts: CompactionOptions) -> Self {
        Run {
            opts,
            pieces: Vec::new(),
        }
    }

    /// The pieces, oldest first.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// Adds a segment the replicator shipped. One that does not continue the run (another
    /// generation, a gap) starts a new run; one too large to take part ends the run.
    pub fn push(&mut self, p: Piece) {
        let follows = self
            .pieces
            .last()
            .is_some_and(|l| continues(&l.header, &p.header));
        if !follows {
            self.pieces.clear();
        }
        if p.size > self.opts.small_bytes {
            self.pieces.clear();
            return;
        }
        self.pieces.push(p);
    }

    /// The pieces to merge next: the last `fan_in`, when they share one level and their
    /// sizes add up to at most `max_bytes`. When they are too large together, everything up
    /// to them is final and leaves the run.
    pub fn next_merge(&mut self) -> Option<std::ops::Range<usize>> {
        let n = self.opts.fan_in as usize;
        if n < 2 || self.pieces.len() < n {
            return None;
        }
        let from = self.pieces.len() - n;
        let level = self.pieces[from].level;
        if self.pieces[from..].iter().any(|p| p.level != level) {
            return None;
        }
        let bytes: u64 = self.pieces[from..].iter().map(|p| p.size).sum();
        if bytes > self.opts.max_bytes {
            self.pieces.clear();
            return None;
        }
        Some(from..self.pieces.len())
    }

    /// Replaces the pieces in `range` (from [`Run::next_merge`]) by their merge.
    pub fn merged(&mut self, range: std::ops::Range<usize>, piece: Piece) {
        self.pieces.splice(range, [piece]);
    }

    /// Forgets every piece (after a failed merge: the next one starts afresh).
    pub fn clear(&mut self) {
        self.pieces.clear();
    }
}

/// The header of the segment that merges `parts` (which must continue each other).
pub fn merged_header(parts: &[Piece]) -> Option<ObjectHeader> {
    let first = &parts.first()?.header;
    let last = &parts.last()?.header;
    if parts
        .windows(2)
        .any(|w| !continues(&w[0].header, &w[1].header))
    {
        return None;
    }
    let frames = parts
        .iter()
        .try_fold(0u32, |acc, p| acc.checked_add(p.header.frames))?;
    Some(ObjectHeader {
        kind: Kind::Merged,
        flags: FLAG_LZ4,
        generation: last.generation,
        start: first.start,
        end: last.end,
        page_size: last.page_size,
        db_pages: last.db_pages,
        timestamp_ms: last.timestamp_ms,
        wal: last.wal,
        start_checksum: first.start_checksum,
        frames,
        raw_len: parts.iter().map(|p| merged_len(&p.header)).sum(),
    })
}

/// Writes the segment merging `parts` and returns it as a piece.
pub async fn merge(replica: &Replica, parts: &[Piece]) -> EngineResult<Piece> {
    let header = merged_header(parts)
        .ok_or_else(|| EngineError::Task("parts of a merge do not continue each other".into()))?;
    let name = ObjectKey::Segment {
        generation: GenerationId(header.generation),
        start: header.start,
        end: header.end,
        timestamp_ms: header.timestamp_ms,
    }
    .format();
    let store = replica.store().clone();
    let keys = replica.keys().cloned();
    let handle = tokio::runtime::Handle::current();
    let list: Vec<(String, ObjectHeader)> =
        parts.iter().map(|p| (p.name.clone(), p.header)).collect();
    let size = replica
        .upload(&name, header, move |w| {
            for (key, expect) in &list {
                copy_part(&handle, &store, keys.as_deref(), key, expect, w)?;
            }
            Ok(())
        })
        .await?;
    Ok(Piece {
        name,
        header,
        size,
        level: parts
            .iter()
            .map(|p| p.level)
            .max()
            .unwrap_or(0)
            .saturating_add(1),
    })
}

/// Streams one part into `w` (on a blocking thread): a segment's header and frames, or a
/// merged segment's body, after checking that its header is the one expected; reading it to
/// the end verifies its trailer and CRCs.
fn copy_part(
    handle: &tokio::runtime::Handle,
    store: &Arc<dyn ObjectStore>,
    keys: Option<&KeyRing>,
    key: &str,
    expect: &ObjectHeader,
    w: &mut dyn BodyWrite,
) -> io::Result<()> {
    // The store's error travels inside the `io::Error`, typed (see `error::storage_error`).
    let obj = handle
        .block_on(store.get(key, None))
        .map_err(io::Error::other)?;
    let body = BlockingBody {
        handle: handle.clone(),
        stream: obj.body,
        cur: Bytes::new(),
    };
    let mut r = ObjectReader::with_keys(body, keys).map_err(|e| read_error(key, e))?;
    let h = *r.header();
    // The encryption flag may differ from the replicator's note of it; the rest may not.
    if (ObjectHeader { flags: 0, ..h })
        != (ObjectHeader {
            flags: 0,
            ..*expect
        })
    {
        return Err(io::Error::other(format!(
            "{key}: header differs from the one written"
        )));
    }
    if h.kind == Kind::Segment {
        // Inside a merged segment the part's header says where its frames belong.
        w.write_all(
            &ObjectHeader {
                flags: FLAG_LZ4,
                ..h
            }
            .encode(),
        )?;
    }
    // The part's blocks go into the merged object as they are stored (decrypted, and sealed
    // again when the replica encrypts): CRC, lengths and authentication are checked on the
    // way, and nothing is decompressed or compressed again. Restore decompresses and verifies
    // every frame of the merged object.
    let mut n = 0u64;
    while let Some((raw, lz4)) = r.next_stored_block().map_err(|e| read_error(key, e))? {
        w.write_compressed_block(raw, lz4)?;
        n += raw as u64;
    }
    if n != h.raw_len {
        return Err(io::Error::other(format!(
            "{key}: {n} bytes of frames where the header says {}",
            h.raw_len
        )));
    }
    Ok(())
}

/// A failure to read part `key`: the reader's own error as it was (a store's error inside
/// stays typed), damaged bytes named with the key.
fn read_error(key: &str, e: FormatError) -> io::Error {
    match e {
        FormatError::Io(e) => e,
        other => io::Error::other(format!("read {key}: {other}")),
    }
}

/// A blocking `Read` over a store's byte stream (used on blocking threads only); a store's
/// error comes out as an `io::Error` carrying the [`walship_storage::StorageError`].
struct BlockingBody {
    handle: tokio::runtime::Handle,
    stream: ByteStream,
    cur: Bytes,
}

impl Read for BlockingBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.handle.block_on(self.stream.next()) {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(io::Error::other(e)),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

/// A segment the replicator shipped, and until when its lease lets writes start (`None`:
/// no lease).
#[derive(Debug)]
pub(crate) struct Shipped {
    pub(crate) piece: Piece,
    pub(crate) write_deadline: Option<Instant>,
}

/// The compaction task of one replicator: takes the segments it ships, merges, and deletes
/// merged parts once they are older than the keep time.
pub(crate) struct Compactor {
    replica: Replica,
    opts: CompactionOptions,
    run: Run,
    /// Parts merged, with when: deleted once `keep_parts` has passed.
    doomed: VecDeque<(Instant, Vec<String>)>,
    status: watch::Sender<Status>,
    db: String,
    /// From the last segment shipped: merges and deletes start only before it, as any
    /// write of a lease holder (docs/format.md, "Lease").
    write_deadline: Option<Instant>,
}

impl Compactor {
    pub(crate) fn new(
        replica: Replica,
        opts: CompactionOptions,
        status: watch::Sender<Status>,
        db: String,
    ) -> Self {
        Compactor {
            replica,
            run: Run::new(opts.clone()),
            opts,
            doomed: VecDeque::new(),
            status,
            db,
            write_deadline: None,
        }
    }

    fn may_write(&self) -> bool {
        self.write_deadline.is_none_or(|d| Instant::now() < d)
    }

    fn take(&mut self, s: Shipped) {
        self.write_deadline = s.write_deadline;
        self.run.push(s.piece);
    }

    /// Runs until the sender is dropped (the task is aborted when the replicator stops).
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Shipped>) {
        while let Some(s) = rx.recv().await {
            self.take(s);
            // Take whatever else is waiting before merging: it keeps the run in step with
            // the replicator.
            while let Ok(s) = rx.try_recv() {
                self.take(s);
            }
            self.compact().await;
            self.delete_due().await;
        }
    }

    async fn compact(&mut self) {
        while let Some(range) = self.run.next_merge() {
            if !self.may_write() {
                // The replicator renews the lease before its next upload; merge then.
                return;
            }
            let parts: Vec<Piece> = self.run.pieces()[range.clone()].to_vec();
            let t0 = Instant::now();
            match merge(&self.replica, &parts).await {
                Ok(piece) => {
                    let elapsed_ms = t0.elapsed().as_millis() as u64;
                    tracing::info!(
                        db = %self.db, generation = %GenerationId(piece.header.generation),
                        position = piece.header.end, parts = parts.len(), level = piece.level,
                        bytes = piece.size, elapsed_ms, "segments merged"
                    );
                    let bytes = piece.size;
                    self.status.send_modify(|s| {
                        s.segments_merged += 1;
                        s.bytes_uploaded += bytes;
                    });
                    self.doomed
                        .push_back((Instant::now(), parts.into_iter().map(|p| p.name).collect()));
                    self.run.merged(range, piece);
                }
                Err(e) => {
                    tracing::warn!(db = %self.db, error = %e, parts = parts.len(), "merging segments failed; the parts stay as they are");
                    self.run.clear();
                    return;
                }
            }
        }
    }

    async fn delete_due(&mut self) {
        while let Some((at, _)) = self.doomed.front() {
            if at.elapsed() < self.opts.keep_parts || !self.may_write() {
                break;
            }
            let Some((_, names)) = self.doomed.pop_front() else {
                break;
            };
            match self.replica.store().delete_many(&names).await {
                Ok(()) => {
                    tracing::debug!(db = %self.db, objects = names.len(), "merged parts deleted");
                    let n = names.len() as u64;
                    self.status.send_modify(|s| s.merged_parts_deleted += n);
                }
                Err(e) => {
                    // They stay: restore prefers the merged segment, and retention deletes
                    // them with it.
                    tracing::warn!(db = %self.db, error = %e, objects = names.len(), "deleting merged parts failed; they stay");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use walship_format::object::WalState;
    use walship_format::wal::Checksum;

    use super::*;

    fn opts(fan_in: u32) -> CompactionOptions {
        CompactionOptions {
            fan_in,
            small_bytes: 100,
            max_bytes: 1000,
            keep_parts: Duration::ZERO,
        }
    }

    /// A segment of `frames` frames after `prev` (or at the start of salts `salt`).
    fn piece(prev: Option<&Piece>, frames: u32, salt: u32, size: u64) -> Piece {
        let (start, start_checksum) = match prev {
            Some(p) if p.header.wal.salt1 == salt => (p.header.end, p.header.wal.checksum),
            Some(p) => (p.header.end, Checksum(salt, 0)),
            None => (0, Checksum(salt, 0)),
        };
        let end = if prev.is_some_and(|p| p.header.wal.salt1 != salt) {
            ((start >> 32) + 1) << 32 | u64::from(frames)
        } else {
            start + u64::from(frames)
        };
        let header = ObjectHeader {
            kind: Kind::Segment,
            flags: FLAG_LZ4,
            generation: 9,
            start,
            end,
            page_size: 4096,
            db_pages: 10,
            timestamp_ms: end as i64,
            wal: WalState {
                magic: 0x377f0682,
                checkpoint_seq: salt,
                salt1: salt,
                salt2: salt,
                checksum: Checksum(salt, end as u32),
            },
            start_checksum,
            frames,
            raw_len: u64::from(frames) * 4120,
        };
        Piece {
            name: format!("s{start}-{end}"),
            header,
            size,
            level: 0,
        }
    }

    fn fake_merge(run: &mut Run) -> usize {
        let mut merges = 0;
        while let Some(r) = run.next_merge() {
            let parts = run.pieces()[r.clone()].to_vec();
            let header = merged_header(&parts).unwrap_or_else(|| panic!("parts continue"));
            let p = Piece {
                name: format!("m{}-{}", header.start, header.end),
                header,
                size: parts.iter().map(|p| p.size).sum(),
                level: parts[0].level + 1,
            };
            run.merged(r, p);
            merges += 1;
        }
        merges
    }

    #[test]
    fn runs_merge_by_levels_and_the_merged_header_spans_its_parts() {
        let mut run = Run::new(opts(4));
        let mut prev: Option<Piece> = None;
        let mut merges = 0;
        for _ in 0..16 {
            let p = piece(prev.as_ref(), 3, 1, 10);
            prev = Some(p.clone());
            run.push(p);
            merges += fake_merge(&mut run);
        }
        // 16 segments: four level-1 merges, then one level-2 merge of those.
        assert_eq!(merges, 5);
        assert_eq!(run.pieces().len(), 1);
        let m = &run.pieces()[0];
        assert_eq!(m.level, 2);
        assert_eq!((m.header.start, m.header.end), (0, 48));
        assert_eq!(m.header.frames, 48);
        assert_eq!(m.header.kind, Kind::Merged);
        // Every shipped segment's frames with its header.
        assert_eq!(m.header.raw_len, 48 * 4120 + 16 * HEADER_SIZE as u64);
        assert_eq!(m.header.start_checksum, Checksum(1, 0));
        assert_eq!(m.header.wal.checksum, Checksum(1, 48));
        assert_eq!(m.header.timestamp_ms, 48);
    }

    #[test]
    fn a_new_incarnation_continues_the_run_a_gap_or_a_large_segment_ends_it() {
        let mut run = Run::new(opts(4));
        let a = piece(None, 3, 1, 10);
        let b = piece(Some(&a), 3, 1, 10);
        run.push(a.clone());
        run.push(b.clone());
        // The WAL restarted (new salts, next epoch): the run goes on across it.
        let c = piece(Some(&b), 3, 2, 10);
        run.push(c.clone());
        assert_eq!(run.pieces().len(), 3);
        let h = merged_header(&[a, b, c.clone()]).unwrap_or_else(|| panic!("continues"));
        assert_eq!((h.start, h.end), (0, (1 << 32) | 3));
        assert_eq!(h.wal.salt1, 2);
        assert_eq!(h.start_checksum, Checksum(1, 0));
        // A gap.
        let mut d = piece(Some(&c), 3, 2, 10);
        d.header.start += 1;
        run.push(d);
        assert_eq!(run.pieces().len(), 1);
        // A large segment ends the run without joining it.
        let e = piece(Some(&c), 3, 2, 101);
        run.push(e);
        assert!(run.pieces().is_empty());
    }

    #[test]
    fn pieces_too_large_together_are_final() {
        let mut run = Run::new(opts(4));
        let mut prev: Option<Piece> = None;
        for _ in 0..4 {
            let p = piece(prev.as_ref(), 3, 1, 100);
            prev = Some(p.clone());
            run.push(p);
        }
        // 400 bytes ≤ 1000: merged.
        assert_eq!(fake_merge(&mut run), 1);
        for _ in 0..12 {
            let p = piece(prev.as_ref(), 3, 1, 100);
            prev = Some(p.clone());
            run.push(p);
            fake_merge(&mut run);
        }
        // Four level-1 pieces of 400 bytes would make 1600 > 1000: they stay, and the run
        // lets them go.
        assert!(run.pieces().is_empty());
        assert!(!opts(1).enabled());
    }

    #[test]
    fn by_default_a_light_loads_segments_merge_and_a_heavy_loads_stay_as_shipped() {
        let run_of = |size: u64, n: usize| {
            let mut run = Run::new(CompactionOptions::default());
            let mut prev: Option<Piece> = None;
            let mut merges = 0;
            for _ in 0..n {
                let p = piece(prev.as_ref(), 3, 1, size);
                prev = Some(p.clone());
                run.push(p);
                merges += fake_merge(&mut run);
            }
            (merges, run)
        };
        // 100 transactions/s: segments of a few KiB merge, and their merges merge again.
        let (merges, run) = run_of(5_000, 256);
        assert_eq!(merges, 17);
        assert_eq!(run.pieces()[0].level, 2);
        // Segments of 400 KiB merge once; 16 merged ones would be far past 8 MiB.
        let (merges, run) = run_of(400 << 10, 256);
        assert_eq!(merges, 16);
        assert!(run.pieces().iter().all(|p| p.level == 1));
        // A writer at full speed ships segments of about 1 MiB: each would cost the store
        // its bytes twice more for one request saved, and none is merged.
        let (merges, _) = run_of(900 << 10, 256);
        assert_eq!(merges, 0);
    }

    #[test]
    fn parts_that_do_not_continue_each_other_have_no_merged_header() {
        let a = piece(None, 3, 1, 10);
        let mut b = piece(Some(&a), 3, 1, 10);
        b.header.start += 1;
        assert!(merged_header(&[a.clone(), b]).is_none());
        let mut c = piece(Some(&a), 3, 1, 10);
        c.header.generation += 1;
        assert!(merged_header(&[a, c]).is_none());
        assert!(merged_header(&[]).is_none());
    }
}
