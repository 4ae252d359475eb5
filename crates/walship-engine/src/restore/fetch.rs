//! Downloads: the snapshot as one stream, segments fetched ahead in parallel, and the
//! bridge that hands a store's async byte stream to a blocking reader. A storage error
//! crosses the bridge typed (inside an `io::Error`) and comes out as
//! [`EngineError::Storage`], so whether it is transient survives into restore's decisions.

use std::io::{self, Read};
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::mpsc;
use walship_format::FormatError;
use walship_storage::{ByteStream, GetObject, ObjectStore, StorageError};

use super::RestoreProgress;
use crate::error::{EngineError, EngineResult};

/// A reader that tells a restore's progress of every byte read through it.
pub(super) struct Counted<R> {
    pub(super) inner: R,
    pub(super) progress: Option<Arc<dyn RestoreProgress>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(p) = &self.progress {
            p.advance(n as u64);
        }
        Ok(n)
    }
}

/// Segments up to this size are downloaded whole, ahead of being applied; with
/// `parallelism` in flight and as many waiting, at most 2 × `parallelism` of them are held.
const PREFETCH_WHOLE: u64 = 2 * 1024 * 1024;

/// A fetched segment, by name: whole in memory (small ones) or a stream to read.
pub(super) type Fetched = (String, Result<GetObject, StorageError>);

/// Fetches segments in order, `parallelism` at a time, and sends them on in order.
pub(super) async fn prefetch_segments(
    store: Arc<dyn ObjectStore>,
    names: Vec<String>,
    parallelism: usize,
    tx: mpsc::Sender<Fetched>,
) {
    let fetches = futures::stream::iter(names.into_iter().map(|name| {
        let store = store.clone();
        async move {
            let got = match store.get(&name, None).await {
                Ok(obj) if obj.size <= PREFETCH_WHOLE => whole(obj).await,
                other => other,
            };
            (name, got)
        }
    }))
    .buffered(parallelism);
    futures::pin_mut!(fetches);
    while let Some(item) = fetches.next().await {
        if tx.send(item).await.is_err() {
            break;
        }
    }
}

/// Reads an object's body into memory; it is then a stream of one chunk.
async fn whole(mut obj: GetObject) -> Result<GetObject, StorageError> {
    let mut buf = bytes::BytesMut::with_capacity(usize::try_from(obj.size).unwrap_or(0));
    while let Some(chunk) = obj.body.next().await {
        buf.extend_from_slice(&chunk?);
    }
    let body = buf.freeze();
    Ok(GetObject {
        size: obj.size,
        body: Box::pin(futures::stream::once(async move { Ok(body) })),
    })
}

/// The object as one streamed GET. (Parallel ranged GETs were measured slower: loopback S3
/// servers such as moto read the whole object for every range, and one stream already
/// outruns decompression and the local disk; segments are what restore fetches ahead.)
pub(super) fn download(store: Arc<dyn ObjectStore>, key: String) -> ByteStream {
    Box::pin(
        futures::stream::once(async move { store.get(&key, None).await })
            .map_ok(|o| o.body)
            .try_flatten(),
    )
}

/// Runs `f` on a blocking thread with a `Read` over `body`; returns its result and the
/// number of bytes read. A storage error of the stream reaches `f` as an `io::Error`
/// carrying the [`StorageError`] itself, which [`classify`] takes out again.
pub(super) async fn run_blocking_with_stream<T, F>(body: ByteStream, f: F) -> EngineResult<(T, u64)>
where
    T: Send + 'static,
    F: FnOnce(&mut ChannelReader) -> EngineResult<T> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<Bytes, StorageError>>(2);
    let pump = async move {
        let mut body = body;
        while let Some(chunk) = body.next().await {
            let stop = chunk.is_err();
            if tx.send(chunk).await.is_err() || stop {
                break;
            }
        }
    };
    let work = tokio::task::spawn_blocking(move || {
        let mut reader = ChannelReader {
            rx,
            cur: Bytes::new(),
            read: 0,
        };
        let r = f(&mut reader);
        r.map(|t| (t, reader.read))
    });
    let (_, r) = tokio::join!(pump, work);
    r?
}

/// A `Read` over chunks sent from an async task. A storage error comes out as an
/// `io::Error` whose inner error is the [`StorageError`].
pub(super) struct ChannelReader {
    rx: mpsc::Receiver<Result<Bytes, StorageError>>,
    cur: Bytes,
    read: u64,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(io::Error::other(e)),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        self.read += n as u64;
        Ok(n)
    }
}

/// The engine error for a failed read of object `key`: the store's error when the reader
/// carried one (however deep the decoders wrapped it), damaged bytes as
/// [`EngineError::Corrupt`], anything else as a download I/O error.
pub(super) fn classify(key: &str, e: io::Error) -> EngineError {
    let e = match crate::error::storage_error(e) {
        Ok(se) => return EngineError::Storage(se),
        Err(e) => e,
    };
    let fe = FormatError::from_io(e);
    if fe.is_corrupt() {
        EngineError::Corrupt {
            key: key.to_string(),
            source: fe,
        }
    } else {
        match fe {
            FormatError::Io(e) => EngineError::io(format!("download {key}"), e),
            other => EngineError::Corrupt {
                key: key.to_string(),
                source: other,
            },
        }
    }
}

/// The engine error for a failure to decode object `key`'s header: the store's error when the
/// reader carried one (a transient one must not pass for a damaged object), otherwise
/// [`EngineError::decoding`].
pub(super) fn decoding(key: &str, source: FormatError) -> EngineError {
    match source {
        FormatError::Io(e) => match crate::error::storage_error(e) {
            Ok(se) => EngineError::Storage(se),
            Err(e) => EngineError::decoding(key, FormatError::Io(e)),
        },
        other => EngineError::decoding(key, other),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use walship_format::object::ObjectReader;

    /// A stream of `good` chunks, then `err`.
    fn failing_stream(good: usize, err: StorageError) -> ByteStream {
        let mut items: Vec<Result<Bytes, StorageError>> = (0..good)
            .map(|i| Ok(Bytes::from(vec![i as u8; 1000])))
            .collect();
        items.push(Err(err));
        Box::pin(futures::stream::iter(items))
    }

    fn unavailable() -> StorageError {
        StorageError::Unavailable {
            store: "s3://bucket".into(),
            detail: "503 slow down".into(),
        }
    }

    #[tokio::test]
    async fn a_transient_storage_error_mid_stream_comes_out_of_the_bridge_typed_and_transient() {
        let body = failing_stream(3, unavailable());
        let r = run_blocking_with_stream(body, |reader| {
            let mut sink = Vec::new();
            std::io::copy(reader, &mut sink).map_err(|e| classify("generations/x/seg", e))?;
            Ok(sink.len())
        })
        .await;
        let e = r.unwrap_err();
        assert!(
            matches!(e, EngineError::Storage(StorageError::Unavailable { .. })),
            "{e:?}"
        );
        assert!(e.is_transient(), "{e:?}");
    }

    #[tokio::test]
    async fn a_storage_error_read_through_the_object_decoder_stays_typed() {
        // The error arrives while the decoder reads the header: it must not pass for a
        // damaged object (restore would skip it) nor for a local I/O error.
        let body = failing_stream(0, unavailable());
        let r = run_blocking_with_stream(body, |reader| {
            ObjectReader::with_keys(reader, None)
                .map(|_| ())
                .map_err(|source| decoding("generations/x/seg", source))
        })
        .await;
        let e = r.unwrap_err();
        assert!(matches!(e, EngineError::Storage(_)), "{e:?}");
        assert!(e.is_transient(), "{e:?}");
    }

    #[tokio::test]
    async fn a_permanent_storage_error_stays_permanent_and_damaged_bytes_stay_corrupt() {
        let body = failing_stream(
            1,
            StorageError::AccessDenied {
                store: "s3://bucket".into(),
                detail: "403".into(),
            },
        );
        let r = run_blocking_with_stream(body, |reader| {
            let mut sink = Vec::new();
            std::io::copy(reader, &mut sink).map_err(|e| classify("k", e))?;
            Ok(())
        })
        .await;
        let e = r.unwrap_err();
        assert!(
            matches!(e, EngineError::Storage(StorageError::AccessDenied { .. })),
            "{e:?}"
        );
        assert!(!e.is_transient());
        let damaged = io::Error::other(FormatError::corrupt("bad CRC"));
        assert!(matches!(
            classify("k", damaged),
            EngineError::Corrupt { .. }
        ));
        let local = io::Error::new(io::ErrorKind::UnexpectedEof, "short");
        assert!(matches!(classify("k", local), EngineError::Io { .. }));
    }
}
