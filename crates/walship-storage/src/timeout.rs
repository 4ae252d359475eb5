//! [`TimeoutStore`]: every call of a store gets a deadline, so a store that stops answering
//! (packets dropped, a hung NFS mount) fails the call with [`StorageError::Timeout`], which
//! is transient ([`crate::RetryStore`] tries again), instead of hanging it.
//!
//! The limits are [`StoreTimeouts`]. [`crate::S3Store`] hands the same limits to the SDK
//! (connect, first byte, per request), which usually fires first with a more precise
//! message; this wrapper holds every backend to them, the local directory included. A
//! blocking file operation that hangs in the kernel cannot be cancelled: its call returns
//! with the timeout and the thread stays blocked until the kernel lets it go.

use std::ops::Range;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::time::Instant;

use crate::error::{StorageError, StorageResult};
use crate::{
    ByteStream, GetObject, ListPage, ListRequest, ObjectMeta, ObjectStore, PutBody, PutOptions,
};

/// The size of body that one [`StoreTimeouts::operation`] covers (S3's smallest part).
const BODY_PER_OPERATION: u64 = 5 << 20;

/// The longest a stall may go unreported, whatever the read timeout.
const MAX_STALL_AFTER: Duration = Duration::from_secs(10);

/// How long a store may take to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreTimeouts {
    /// Establishing a connection (S3). Default 5 s.
    pub connect: Duration,
    /// From sending a request to the first byte of its answer — for S3 this includes sending
    /// the request's body, at most one part (5 MiB by default) — and between two chunks of a
    /// body being read. Default 30 s.
    pub read: Duration,
    /// One request whole, with the SDK's own retries of it (S3); one call of the store per
    /// started 5 MiB of a body in memory; the longest a streamed put may go without taking
    /// the next chunk. Default 120 s.
    pub operation: Duration,
}

impl Default for StoreTimeouts {
    fn default() -> Self {
        StoreTimeouts {
            connect: Duration::from_secs(5),
            read: Duration::from_secs(30),
            operation: Duration::from_secs(120),
        }
    }
}

impl StoreTimeouts {
    /// After how long without progress a running call counts as stalled (and is reported,
    /// before any timeout ends it): half the read timeout, at most 10 s.
    pub fn stall_after(&self) -> Duration {
        (self.read / 2).clamp(Duration::from_millis(100), MAX_STALL_AFTER)
    }

    /// Refuses a zero timeout; the error names the field.
    pub fn check(&self) -> Result<(), String> {
        for (name, d) in [
            ("connect", self.connect),
            ("read", self.read),
            ("operation", self.operation),
        ] {
            if d.is_zero() {
                return Err(format!("the {name} timeout must be more than zero"));
            }
        }
        Ok(())
    }

    /// The limit of one call whose body (in memory) is `len` bytes.
    fn for_body(&self, len: u64) -> Duration {
        let units = u32::try_from(1 + len / BODY_PER_OPERATION).unwrap_or(u32::MAX);
        self.operation.saturating_mul(units)
    }
}

/// When a call last made progress: it started, or a chunk of its streamed body was taken.
/// While the call waits for the producer of its body, the clock stands still (a slow
/// producer is not a slow store).
#[derive(Debug, Clone)]
pub(crate) struct Progress(Arc<Mutex<ProgressState>>);

#[derive(Debug)]
struct ProgressState {
    last: Instant,
    waiting_for_producer: bool,
}

impl Progress {
    pub(crate) fn new() -> Self {
        Progress(Arc::new(Mutex::new(ProgressState {
            last: Instant::now(),
            waiting_for_producer: false,
        })))
    }

    fn update(&self, f: impl FnOnce(&mut ProgressState)) {
        if let Ok(mut s) = self.0.lock() {
            f(&mut s);
        }
    }

    /// How long the call has gone without progress.
    pub(crate) fn idle(&self) -> Duration {
        match self.0.lock() {
            Ok(s) if !s.waiting_for_producer => s.last.elapsed(),
            _ => Duration::ZERO,
        }
    }

    /// `body`, marking progress each time a chunk is taken from it.
    pub(crate) fn watch(&self, mut body: ByteStream) -> ByteStream {
        let progress = self.clone();
        Box::pin(futures::stream::poll_fn(move |cx| {
            let r = body.poll_next_unpin(cx);
            progress.update(|s| {
                if r.is_pending() {
                    s.waiting_for_producer = true;
                } else {
                    s.waiting_for_producer = false;
                    s.last = Instant::now();
                }
            });
            r
        }))
    }
}

/// Wraps a store and fails every call that takes longer than [`StoreTimeouts`] allows.
#[derive(Debug, Clone)]
pub struct TimeoutStore {
    inner: Arc<dyn ObjectStore>,
    timeouts: StoreTimeouts,
}

impl TimeoutStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>, timeouts: StoreTimeouts) -> Self {
        TimeoutStore { inner, timeouts }
    }

    fn timeout(&self, op: &str, key: &str, after: Duration, what: &str) -> StorageError {
        StorageError::Timeout {
            store: self.inner.describe(),
            detail: format!("{op} `{key}`: {what} within {}", secs(after)),
        }
    }

    async fn within<T>(
        &self,
        op: &str,
        key: &str,
        limit: Duration,
        call: impl Future<Output = StorageResult<T>>,
    ) -> StorageResult<T> {
        match tokio::time::timeout(limit, call).await {
            Ok(r) => r,
            Err(_) => Err(self.timeout(op, key, limit, "no answer")),
        }
    }

    /// A streamed put fails once it has gone `operation` without taking a chunk (time spent
    /// waiting for the body's producer does not count).
    async fn put_stream(
        &self,
        key: &str,
        body: ByteStream,
        opts: &PutOptions,
    ) -> StorageResult<()> {
        let limit = self.timeouts.operation;
        let progress = Progress::new();
        let body = progress.watch(body);
        let mut call = pin!(self.inner.put_with(key, PutBody::Stream(body), opts));
        loop {
            let wait = limit.saturating_sub(progress.idle());
            tokio::select! {
                r = &mut call => return r,
                _ = tokio::time::sleep(wait) => {
                    if progress.idle() >= limit {
                        return Err(self.timeout("put", key, limit, "no progress"));
                    }
                }
            }
        }
    }
}

/// `5s`, `1.5s`, `250ms`.
fn secs(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// `body`, failing with a timeout when a chunk takes longer than `limit` to come (counted
/// from when the reader asks for it).
fn read_within(body: ByteStream, limit: Duration, error: StorageError) -> ByteStream {
    let error = Arc::new(Mutex::new(Some(error)));
    Box::pin(futures::stream::unfold(Some(body), move |state| {
        let error = error.clone();
        async move {
            let mut body = state?;
            match tokio::time::timeout(limit, body.next()).await {
                Ok(Some(chunk)) => Some((chunk, Some(body))),
                Ok(None) => None,
                Err(_) => {
                    let e = error.lock().ok().and_then(|mut e| e.take())?;
                    Some((Err(e), None))
                }
            }
        }
    }))
}

#[async_trait]
impl ObjectStore for TimeoutStore {
    async fn put_with(&self, key: &str, body: PutBody, opts: &PutOptions) -> StorageResult<()> {
        match body {
            PutBody::Bytes(b) => {
                let limit = self.timeouts.for_body(b.len() as u64);
                self.within(
                    "put",
                    key,
                    limit,
                    self.inner.put_with(key, PutBody::Bytes(b), opts),
                )
                .await
            }
            PutBody::Stream(s) => self.put_stream(key, s, opts).await,
        }
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StorageResult<GetObject> {
        let t = &self.timeouts;
        let got = self
            .within("get", key, t.operation, self.inner.get(key, range))
            .await?;
        let error = self.timeout("get", key, t.read, "no data");
        Ok(GetObject {
            size: got.size,
            body: read_within(got.body, t.read, error),
        })
    }

    async fn head(&self, key: &str) -> StorageResult<Option<ObjectMeta>> {
        self.within("head", key, self.timeouts.operation, self.inner.head(key))
            .await
    }

    async fn list_page(&self, req: &ListRequest) -> StorageResult<ListPage> {
        self.within(
            "list",
            &req.prefix,
            self.timeouts.operation,
            self.inner.list_page(req),
        )
        .await
    }

    async fn delete_many(&self, keys: &[String]) -> StorageResult<()> {
        let first = keys.first().map(String::as_str).unwrap_or_default();
        let batches = u32::try_from(keys.len().div_ceil(1000).max(1)).unwrap_or(u32::MAX);
        let limit = self.timeouts.operation.saturating_mul(batches);
        self.within("delete", first, limit, self.inner.delete_many(keys))
            .await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// A store whose every call waits `delay` before it does anything (forever if `None`).
    #[derive(Debug)]
    struct Slow {
        delay: Option<Duration>,
    }

    impl Slow {
        async fn wait(&self) {
            match self.delay {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        }
    }

    #[async_trait]
    impl ObjectStore for Slow {
        async fn put_with(&self, _: &str, body: PutBody, _: &PutOptions) -> StorageResult<()> {
            if let PutBody::Stream(mut s) = body {
                while let Some(c) = s.next().await {
                    c?;
                    self.wait().await;
                }
                return Ok(());
            }
            self.wait().await;
            Ok(())
        }
        async fn get(&self, _: &str, _: Option<Range<u64>>) -> StorageResult<GetObject> {
            let delay = self.delay;
            let body = futures::stream::once(async move {
                match delay {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
                Ok(Bytes::from_static(b"x"))
            });
            Ok(GetObject {
                size: 1,
                body: Box::pin(body),
            })
        }
        async fn head(&self, _: &str) -> StorageResult<Option<ObjectMeta>> {
            self.wait().await;
            Ok(None)
        }
        async fn list_page(&self, _: &ListRequest) -> StorageResult<ListPage> {
            self.wait().await;
            Ok(ListPage::default())
        }
        async fn delete_many(&self, _: &[String]) -> StorageResult<()> {
            self.wait().await;
            Ok(())
        }
        fn describe(&self) -> String {
            "slow://".into()
        }
    }

    const MS: Duration = Duration::from_millis(1);

    /// Real time, kept short: read 200 ms, operation 500 ms.
    fn limits() -> StoreTimeouts {
        StoreTimeouts {
            connect: 100 * MS,
            read: 200 * MS,
            operation: 500 * MS,
        }
    }

    fn store(delay: Option<Duration>) -> TimeoutStore {
        TimeoutStore::new(Arc::new(Slow { delay }), limits())
    }

    /// `elapsed` is `limit`, give or take a loaded machine's lateness.
    fn about(elapsed: Duration, limit: Duration) {
        assert!(
            elapsed >= limit && elapsed < limit + 2000 * MS,
            "{elapsed:?} for a limit of {limit:?}"
        );
    }

    #[tokio::test]
    async fn a_call_that_never_answers_times_out_as_transient() {
        let s = store(None);
        let t0 = Instant::now();
        let e = s.head("k").await.expect_err("times out");
        assert!(
            matches!(e, StorageError::Timeout { .. }) && e.is_transient(),
            "{e}"
        );
        about(t0.elapsed(), 500 * MS);
        assert!(e.to_string().contains("head `k`"), "{e}");
        let e = s
            .list_page(&ListRequest::default())
            .await
            .expect_err("list");
        assert!(matches!(e, StorageError::Timeout { .. }));
    }

    #[tokio::test]
    async fn a_slow_call_within_its_limit_succeeds() {
        let s = store(Some(100 * MS));
        s.head("k").await.expect("within the limit");
        s.put("k", Bytes::from_static(b"v").into())
            .await
            .expect("put");
    }

    #[tokio::test]
    async fn a_body_in_memory_gets_an_operation_per_started_5_mib() {
        let s = store(Some(700 * MS));
        s.put("big", Bytes::from(vec![0u8; 6 << 20]).into())
            .await
            .expect("two operations' time for 6 MiB");
        let e = s.put("small", Bytes::from_static(b"v").into()).await;
        assert!(matches!(e, Err(StorageError::Timeout { .. })), "{e:?}");
    }

    #[tokio::test]
    async fn a_stream_put_times_out_only_without_progress() {
        // Each chunk takes 300 ms to store: 5 chunks, 1.5 s in all, never 500 ms without
        // progress.
        let s = store(Some(300 * MS));
        let chunks: Vec<StorageResult<Bytes>> =
            (0..5).map(|_| Ok(Bytes::from_static(b"c"))).collect();
        s.put(
            "k",
            PutBody::Stream(Box::pin(futures::stream::iter(chunks))),
        )
        .await
        .expect("progressing put");
        // A chunk that never gets stored: the put fails after 500 ms without progress.
        let s = store(None);
        let one: Vec<StorageResult<Bytes>> = vec![Ok(Bytes::from_static(b"c"))];
        let t0 = Instant::now();
        let e = s
            .put("k", PutBody::Stream(Box::pin(futures::stream::iter(one))))
            .await;
        assert!(matches!(e, Err(StorageError::Timeout { .. })), "{e:?}");
        about(t0.elapsed(), 500 * MS);
    }

    #[tokio::test]
    async fn waiting_for_a_slow_producer_is_not_a_stall() {
        let s = store(Some(MS));
        let slow_producer = futures::stream::unfold(0, |n| async move {
            if n == 3 {
                return None;
            }
            tokio::time::sleep(700 * MS).await;
            Some((Ok(Bytes::from_static(b"c")), n + 1))
        });
        s.put("k", PutBody::Stream(Box::pin(slow_producer)))
            .await
            .expect("a slow producer is not the store's fault");
    }

    #[tokio::test]
    async fn a_body_that_stops_coming_times_out_per_chunk() {
        let s = store(None);
        let got = s.get("k", None).await.expect("headers come");
        let t0 = Instant::now();
        let e = got.collect().await.expect_err("no data");
        assert!(matches!(e, StorageError::Timeout { .. }), "{e}");
        about(t0.elapsed(), 200 * MS);
        let s = store(Some(50 * MS));
        let body = s.get("k", None).await.expect("get").collect().await;
        assert_eq!(&body.expect("within the read timeout")[..], b"x");
    }

    #[test]
    fn a_stall_is_reported_at_half_the_read_timeout_or_ten_seconds() {
        assert_eq!(
            StoreTimeouts::default().stall_after(),
            Duration::from_secs(10)
        );
        assert_eq!(limits().stall_after(), 100 * MS);
        let zero = StoreTimeouts {
            read: Duration::ZERO,
            ..Default::default()
        };
        assert!(zero.check().unwrap_err().contains("read"));
        assert!(StoreTimeouts::default().check().is_ok());
    }
}
