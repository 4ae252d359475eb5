//! A replica: the objects of one database under one store prefix. Listing generations,
//! snapshots and segments from keys alone, reading object headers, and uploading objects
//! produced by a blocking encoder without holding them in memory.

use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use walship_format::crypto::{KEY_ID_LEN, Key, KeyRing};
use walship_format::key::{GENERATIONS_DIR, GenerationId, ObjectKey};
use walship_format::object::{
    BodyWrite, HEAD_WITH_KEY_ID, HEADER_SIZE, ObjectHeader, ObjectWriter, header_and_key_id,
};
use walship_storage::{
    CallTracker, ListRequest, ObjectStore, PutBody, PutOptions, STREAM_CHUNK, StorageError,
    TrackedStore, list_all, list_dirs,
};

use crate::error::{EngineError, EngineResult};

/// Objects whose body is at most this many bytes are encoded in memory (a failed put is
/// retried from it); larger ones stream, which holds one part of an S3 multipart upload (5
/// MiB by default) and a few [`STREAM_CHUNK`]s.
pub const IN_MEMORY_LIMIT: u64 = 4 * 1024 * 1024;

/// One object found by a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Parsed key.
    pub key: ObjectKey,
    /// The key as stored.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

/// The objects of one generation.
#[derive(Debug, Clone, Default)]
pub struct GenerationObjects {
    /// Snapshots, newest (highest position) first.
    pub snapshots: Vec<Listed>,
    /// Segments in log order (ascending start).
    pub segments: Vec<Listed>,
    /// Keys under the generation that are not walship objects.
    pub foreign: Vec<String>,
}

/// A replica on an object store.
#[derive(Debug, Clone)]
pub struct Replica {
    store: Arc<dyn ObjectStore>,
    keys: Option<Arc<KeyRing>>,
}

impl Replica {
    /// Wraps a store.
    pub fn new(store: Arc<dyn ObjectStore>) -> Self {
        Replica { store, keys: None }
    }

    /// The same replica with its store's calls recorded, and the record (what the stall
    /// watchdog looks at).
    pub fn tracked(self) -> (Replica, Arc<CallTracker>) {
        let store = TrackedStore::new(self.store);
        let calls = store.tracker();
        let replica = Replica {
            store: Arc::new(store),
            keys: self.keys,
        };
        (replica, calls)
    }

    /// Encrypts new objects with the ring's writer key (if any) and decrypts with its keys.
    pub fn with_keys(mut self, keys: KeyRing) -> Self {
        self.keys = Some(Arc::new(keys));
        self
    }

    /// The keys, if encryption is configured.
    pub fn keys(&self) -> Option<&Arc<KeyRing>> {
        self.keys.as_ref()
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Describes the store for messages.
    pub fn describe(&self) -> String {
        self.store.describe()
    }

    /// Generations, newest first. Names that are not generation ids are skipped.
    pub async fn generations(&self) -> EngineResult<Vec<GenerationId>> {
        let dirs = list_dirs(self.store.as_ref(), GENERATIONS_DIR).await?;
        let mut out: Vec<GenerationId> = dirs
            .iter()
            .filter_map(|d| {
                let name = d.strip_prefix(GENERATIONS_DIR)?.trim_end_matches('/');
                GenerationId::parse_name(name)
            })
            .collect();
        out.sort_by(|a, b| b.cmp(a));
        Ok(out)
    }

    /// True when nothing at all is stored under `generations/` (one LIST of one key): the
    /// replica holds no data. Objects elsewhere (a lease) do not count.
    pub async fn holds_nothing(&self) -> EngineResult<bool> {
        let page = self
            .store
            .list_page(&ListRequest {
                prefix: GENERATIONS_DIR.to_string(),
                max_keys: Some(1),
                ..Default::default()
            })
            .await?;
        Ok(page.objects.is_empty() && page.common_prefixes.is_empty())
    }

    /// All objects of a generation.
    pub async fn objects(&self, generation: GenerationId) -> EngineResult<GenerationObjects> {
        let all = list_all(self.store.as_ref(), &generation.prefix(), None).await?;
        let mut out = GenerationObjects::default();
        for meta in all {
            match ObjectKey::parse(&meta.key) {
                Some(key @ ObjectKey::Snapshot { .. }) if key.generation() == generation => {
                    out.snapshots.push(Listed {
                        key,
                        name: meta.key,
                        size: meta.size,
                    })
                }
                Some(key @ ObjectKey::Segment { .. }) if key.generation() == generation => {
                    out.segments.push(Listed {
                        key,
                        name: meta.key,
                        size: meta.size,
                    })
                }
                _ => out.foreign.push(meta.key),
            }
        }
        out.snapshots
            .sort_by_key(|l| std::cmp::Reverse(snapshot_position(&l.key)));
        out.segments.sort_by_key(|l| segment_range(&l.key));
        Ok(out)
    }

    /// Reads and verifies an object's header (one ranged GET).
    pub async fn read_header(&self, key: &str) -> EngineResult<ObjectHeader> {
        let body = self
            .store
            .get(key, Some(0..HEADER_SIZE as u64))
            .await?
            .collect()
            .await?;
        ObjectHeader::decode(&body).map_err(|source| EngineError::Corrupt {
            key: key.to_string(),
            source,
        })
    }

    /// Reads and verifies an object's header and reads the id of the key it is encrypted
    /// with, `None` for an object not encrypted (one ranged GET).
    pub async fn read_header_and_key_id(
        &self,
        key: &str,
    ) -> EngineResult<(ObjectHeader, Option<[u8; KEY_ID_LEN]>)> {
        let body = self
            .store
            .get(key, Some(0..HEAD_WITH_KEY_ID as u64))
            .await?
            .collect()
            .await?;
        header_and_key_id(&body).map_err(|source| EngineError::Corrupt {
            key: key.to_string(),
            source,
        })
    }

    /// The newest generation and the id of the key its newest snapshot is encrypted with
    /// (`None`: not encrypted), without listing the whole generation: one LIST of the
    /// generations, one of a single snapshot, one ranged GET. `None` when the newest
    /// generation has no snapshot whose header reads.
    pub async fn newest_generation_key(
        &self,
    ) -> EngineResult<Option<(GenerationId, Option<[u8; KEY_ID_LEN]>)>> {
        let Some(generation) = self.generations().await?.first().copied() else {
            return Ok(None);
        };
        let page = self
            .store
            .list_page(&ListRequest {
                prefix: generation.snapshots_prefix(),
                max_keys: Some(1),
                ..Default::default()
            })
            .await?;
        let Some(newest) = page.objects.first() else {
            return Ok(None);
        };
        match self.read_header_and_key_id(&newest.key).await {
            Ok((header, id)) if header.generation == generation.0 => Ok(Some((generation, id))),
            Ok(_)
            | Err(EngineError::Corrupt { .. })
            | Err(EngineError::Storage(StorageError::NotFound { .. })) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Uploads an object whose raw body `produce` writes, on a blocking thread. Small
    /// objects are encoded in memory; larger ones stream to the store in chunks.
    pub async fn upload<F>(&self, key: &str, header: ObjectHeader, produce: F) -> EngineResult<u64>
    where
        F: FnOnce(&mut dyn BodyWrite) -> io::Result<()> + Send + 'static,
    {
        let opts = PutOptions {
            if_none_match: true,
        };
        let seal = self.keys.as_ref().and_then(|k| k.writer().cloned());
        if header.raw_len <= IN_MEMORY_LIMIT {
            let bytes = tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
                let mut w = new_writer(Vec::new(), &header, seal.as_ref())?;
                produce(&mut w)?;
                w.finish()
            })
            .await?
            .map_err(produce_error)?;
            let n = bytes.len() as u64;
            self.put_retrying_exists(key, PutBody::Bytes(Bytes::from(bytes)), &opts, &header)
                .await?;
            return Ok(n);
        }
        let (tx, rx) = mpsc::channel::<Result<Bytes, StorageError>>(QUEUED_CHUNKS);
        let stopped = Arc::new(AtomicBool::new(false));
        let upload_stopped = stopped.clone();
        let producer = tokio::task::spawn_blocking(move || -> io::Result<u64> {
            let sink = ChannelWriter::new(tx.clone(), upload_stopped);
            let mut w = new_writer(sink, &header, seal.as_ref())?;
            let r = produce(&mut w).and_then(|()| w.finish()).and_then(|mut s| {
                s.flush_chunk()?;
                Ok(s.sent)
            });
            if let Err(e) = &r {
                // Make the upload fail rather than complete a short object.
                let _ = tx.blocking_send(Err(StorageError::io(
                    "produce object body",
                    io::Error::other(e.to_string()),
                )));
            }
            r
        });
        let stream = tokio_stream_from(rx);
        let put = self
            .store
            .put_with(key, PutBody::Stream(stream), &opts)
            .await;
        let produced = producer.await?;
        match (put, produced) {
            (Ok(()), Ok(sent)) => Ok(sent),
            // The put stopped first (its error ended the stream): the put's error says why.
            (Err(e), Err(_)) if stopped.load(Ordering::Acquire) => Err(e.into()),
            // Otherwise a failed producer is the cause of a failed put: report it, typed.
            (_, Err(p)) => Err(produce_error(p)),
            (Err(e), Ok(_)) => Err(e.into()),
        }
    }

    /// Puts with `if_none_match`. If the key exists, it is ours when its header is the one
    /// we wrote (a retried put whose first answer was lost); otherwise it is an error.
    async fn put_retrying_exists(
        &self,
        key: &str,
        body: PutBody,
        opts: &PutOptions,
        header: &ObjectHeader,
    ) -> EngineResult<()> {
        match self.store.put_with(key, body, opts).await {
            Ok(()) => Ok(()),
            Err(StorageError::AlreadyExists { .. }) => {
                let found = self.read_header(key).await?;
                if same_object(&found, header) {
                    Ok(())
                } else {
                    Err(StorageError::AlreadyExists {
                        store: self.describe(),
                        key: key.to_string(),
                    }
                    .into())
                }
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn new_writer<W: Write>(
    out: W,
    header: &ObjectHeader,
    key: Option<&Key>,
) -> io::Result<ObjectWriter<W>> {
    match key {
        None => ObjectWriter::new(out, header),
        Some(k) => ObjectWriter::new_encrypted(out, header, k, rand::random()),
    }
}

fn same_object(a: &ObjectHeader, b: &ObjectHeader) -> bool {
    (
        a.kind,
        a.generation,
        a.start,
        a.end,
        a.timestamp_ms,
        a.wal,
        a.raw_len,
    ) == (
        b.kind,
        b.generation,
        b.start,
        b.end,
        b.timestamp_ms,
        b.wal,
        b.raw_len,
    )
}

/// How a writer's keys fit a generation it found (docs/format.md, "Encryption"): a
/// generation is written under one key or none, never plaintext and ciphertext mixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFit {
    /// The writer encrypts as the generation does (with the same key, or not at all): it
    /// may continue the generation.
    Same,
    /// The writer encrypts with another key and can read the generation (a new key with the
    /// old one given for reading), or encrypts a generation that was not: it starts a new
    /// generation.
    NewGeneration,
    /// The generation is encrypted with a key the writer was not given, or the writer has no
    /// key to encrypt with (encryption is never dropped by a missing key): it must not write.
    Foreign,
}

/// How `keys` fit a generation whose objects are encrypted with the key of id `found`
/// (`None`: not encrypted).
pub fn key_fit(found: Option<[u8; KEY_ID_LEN]>, keys: Option<&KeyRing>) -> KeyFit {
    let writer = keys.and_then(|k| k.writer()).map(Key::id);
    match found {
        f if f == writer => KeyFit::Same,
        None => KeyFit::NewGeneration,
        Some(id) if writer.is_some() && keys.is_some_and(|k| k.find(&id).is_some()) => {
            KeyFit::NewGeneration
        }
        Some(_) => KeyFit::Foreign,
    }
}

/// The segments a restore applies after a snapshot (or segment) ending at `from`, in order:
/// from each position, of the segments that cover it (start at or before it, end after it),
/// written at or before `target_ms` and not in `exclude`, the one that reaches furthest. It
/// stops at the first position no such segment covers.
///
/// A segment may start before the position it is applied at (a merged segment starting
/// before a snapshot): replaying frames the image already holds leaves every page as it was
/// at the segment's end, so this is exact (docs/format.md, "Restore").
pub fn chain<'a>(
    segments: &'a [Listed],
    from: u64,
    target_ms: i64,
    exclude: &std::collections::HashSet<String>,
) -> Vec<&'a Listed> {
    let mut sorted: Vec<(u64, u64, &Listed)> = segments
        .iter()
        .filter_map(|l| match l.key {
            ObjectKey::Segment {
                start,
                end,
                timestamp_ms,
                ..
            } if timestamp_ms <= target_ms && !exclude.contains(&l.name) => Some((start, end, l)),
            _ => None,
        })
        .collect();
    sorted.sort_by_key(|(s, e, _)| (*s, *e));
    let mut out = Vec::new();
    let mut end = from;
    let mut i = 0;
    let mut best: Option<(u64, &Listed)> = None;
    loop {
        while i < sorted.len() && sorted[i].0 <= end {
            let (_, e, l) = sorted[i];
            if best.is_none_or(|(b, _)| e > b) {
                best = Some((e, l));
            }
            i += 1;
        }
        match best {
            Some((e, l)) if e > end => {
                out.push(l);
                end = e;
            }
            _ => return out,
        }
    }
}

fn snapshot_position(k: &ObjectKey) -> u64 {
    match k {
        ObjectKey::Snapshot { position, .. } => *position,
        ObjectKey::Segment { end, .. } => *end,
    }
}

fn segment_range(k: &ObjectKey) -> (u64, u64) {
    match k {
        ObjectKey::Segment { start, end, .. } => (*start, *end),
        ObjectKey::Snapshot { position, .. } => (*position, *position),
    }
}

fn tokio_stream_from(
    mut rx: mpsc::Receiver<Result<Bytes, StorageError>>,
) -> walship_storage::ByteStream {
    Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).fuse())
}

/// Chunks of a streamed upload waiting for the store, beyond the one being filled and the
/// one being taken: the encoder runs this far ahead of the upload, and no further.
const QUEUED_CHUNKS: usize = 2;

/// A `Write` that sends chunks of [`STREAM_CHUNK`] bytes into a channel (from a blocking
/// thread).
struct ChannelWriter {
    tx: mpsc::Sender<Result<Bytes, StorageError>>,
    buf: Vec<u8>,
    sent: u64,
    /// Set when the upload stopped taking chunks (it failed on its own).
    stopped: Arc<AtomicBool>,
}

impl ChannelWriter {
    fn new(tx: mpsc::Sender<Result<Bytes, StorageError>>, stopped: Arc<AtomicBool>) -> Self {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(STREAM_CHUNK),
            sent: 0,
            stopped,
        }
    }

    fn flush_chunk(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(STREAM_CHUNK));
        self.sent += chunk.len() as u64;
        self.tx.blocking_send(Ok(Bytes::from(chunk))).map_err(|_| {
            self.stopped.store(true, Ordering::Release);
            io::Error::new(io::ErrorKind::BrokenPipe, "upload stopped")
        })
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(STREAM_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == STREAM_CHUNK {
            self.flush_chunk()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The engine error for a failed producer of an upload's body: a store's error it met (a
/// merge reads its parts from the store) stays the store's error, so a transient one stays
/// transient; anything else is an encoding failure.
fn produce_error(e: io::Error) -> EngineError {
    match crate::error::storage_error(e) {
        Ok(se) => EngineError::Storage(se),
        Err(e) => EngineError::io("encode object", e),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn seg(start: u64, end: u64, ts: i64) -> Listed {
        let key = ObjectKey::Segment {
            generation: GenerationId(7),
            start,
            end,
            timestamp_ms: ts,
        };
        Listed {
            name: key.format(),
            key,
            size: 1,
        }
    }

    fn ends(c: &[&Listed]) -> Vec<(u64, u64)> {
        c.iter().map(|l| segment_range(&l.key)).collect()
    }

    #[test]
    fn the_chain_takes_the_merged_segment_over_its_parts() {
        let segs = vec![
            seg(10, 20, 1),
            seg(20, 30, 2),
            seg(10, 40, 3),
            seg(30, 40, 3),
            seg(40, 50, 4),
        ];
        let none = HashSet::new();
        assert_eq!(
            ends(&chain(&segs, 10, i64::MAX, &none)),
            vec![(10, 40), (40, 50)]
        );
        // Before the merged segment's time, its parts are the chain.
        assert_eq!(ends(&chain(&segs, 10, 2, &none)), vec![(10, 20), (20, 30)]);
        // Without it (say it was found corrupt), the parts.
        let bad: HashSet<String> = [segs[2].name.clone()].into();
        assert_eq!(
            ends(&chain(&segs, 10, i64::MAX, &bad)),
            vec![(10, 20), (20, 30), (30, 40), (40, 50)]
        );
    }

    #[test]
    fn the_chain_uses_a_segment_that_starts_before_the_snapshot_and_stops_at_a_gap() {
        // A snapshot at 25 inside a merged segment (10, 40] whose parts are gone.
        let segs = vec![seg(10, 40, 3), seg(40, 50, 4), seg(60, 70, 5)];
        let none = HashSet::new();
        assert_eq!(
            ends(&chain(&segs, 25, i64::MAX, &none)),
            vec![(10, 40), (40, 50)]
        );
        // Segments ending at or before the start are never taken.
        assert!(chain(&segs, 50, i64::MAX, &none).is_empty());
        assert!(chain(&segs, 40, 3, &none).is_empty());
    }

    #[test]
    fn a_generation_is_continued_only_under_its_own_key_and_never_by_a_stranger() {
        let k = Key::from_bytes(&[1u8; 32]).expect("key");
        let k2 = Key::from_bytes(&[2u8; 32]).expect("key");
        let (plain, under_k) = (None, Some(k.id()));
        let with_k = KeyRing::new(k.clone());
        let with_k2 = KeyRing::new(k2.clone());
        let rotating = KeyRing::new(k2.clone()).with_reader(k.clone());
        let reading_k = KeyRing::read_only(vec![k.clone()]);
        // Same key, or no key on either side: continue.
        assert_eq!(key_fit(plain, None), KeyFit::Same);
        assert_eq!(key_fit(under_k, Some(&with_k)), KeyFit::Same);
        assert_eq!(key_fit(plain, Some(&reading_k)), KeyFit::Same);
        // Encryption turned on, a rotation.
        assert_eq!(key_fit(plain, Some(&with_k)), KeyFit::NewGeneration);
        assert_eq!(key_fit(under_k, Some(&rotating)), KeyFit::NewGeneration);
        // No key, only another one, or the key for reading only (a write key forgotten in a
        // rotation must not turn encryption off): refuse.
        assert_eq!(key_fit(under_k, None), KeyFit::Foreign);
        assert_eq!(key_fit(under_k, Some(&with_k2)), KeyFit::Foreign);
        assert_eq!(key_fit(under_k, Some(&reading_k)), KeyFit::Foreign);
    }
}
