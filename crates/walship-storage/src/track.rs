//! [`TrackedStore`]: which calls of a store are running, how long each has gone without
//! progress, and when the store last answered — so a watchdog can report a store that
//! stopped answering within seconds, long before any timeout ends the call.
//!
//! Put it outside [`crate::RetryStore`]: a call then counts from its first attempt to its
//! last, and a store that times out attempt after attempt stays one stalled call.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::time::Instant;

use crate::error::StorageResult;
use crate::timeout::Progress;
use crate::{GetObject, ListPage, ListRequest, ObjectMeta, ObjectStore, PutBody, PutOptions};

/// A running call, as [`CallTracker::idlest`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningCall {
    /// `put`, `get`, `head`, `list` or `delete`.
    pub op: &'static str,
    /// The key (the prefix of a listing, the first key of a delete).
    pub key: String,
    /// When it started (ms since the Unix epoch).
    pub started_ms: i64,
    /// How long it has gone without progress (since it started, or since it last took a
    /// chunk of its streamed body; time spent waiting for the body's producer excluded).
    pub idle: Duration,
}

impl std::fmt::Display for RunningCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} `{}`", self.op, self.key)
    }
}

#[derive(Debug)]
struct Call {
    op: &'static str,
    key: String,
    started_ms: i64,
    progress: Progress,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    calls: HashMap<u64, Call>,
    last_answer: Option<Instant>,
}

/// What a [`TrackedStore`] knows of its calls; shared with whoever watches them.
#[derive(Debug, Default)]
pub struct CallTracker {
    state: Mutex<State>,
}

impl CallTracker {
    /// The running call that has gone longest without progress, if any call runs.
    pub fn idlest(&self) -> Option<RunningCall> {
        let s = self.state.lock().ok()?;
        s.calls
            .values()
            .map(|c| RunningCall {
                op: c.op,
                key: c.key.clone(),
                started_ms: c.started_ms,
                idle: c.progress.idle(),
            })
            .max_by_key(|c| (c.idle, std::cmp::Reverse(c.started_ms)))
    }

    /// When a call last ended with an answer from the store (a success, or an error a
    /// retry cannot help with, such as "not found"); `None` if none has yet.
    pub fn last_answer(&self) -> Option<Instant> {
        self.state.lock().ok()?.last_answer
    }

    fn begin(self: &Arc<Self>, op: &'static str, key: &str) -> CallGuard {
        let progress = Progress::new();
        let mut id = 0;
        if let Ok(mut s) = self.state.lock() {
            id = s.next_id;
            s.next_id += 1;
            s.calls.insert(
                id,
                Call {
                    op,
                    key: key.to_string(),
                    started_ms: now_ms(),
                    progress: progress.clone(),
                },
            );
        }
        CallGuard {
            tracker: self.clone(),
            id,
            progress,
        }
    }
}

/// Removes its call when dropped (ended, or abandoned by its caller).
struct CallGuard {
    tracker: Arc<CallTracker>,
    id: u64,
    progress: Progress,
}

impl CallGuard {
    fn end<T>(self, r: StorageResult<T>) -> StorageResult<T> {
        let answered = match &r {
            Ok(_) => true,
            Err(e) => !e.is_transient(),
        };
        if answered && let Ok(mut s) = self.tracker.state.lock() {
            s.last_answer = Some(Instant::now());
        }
        r
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if let Ok(mut s) = self.tracker.state.lock() {
            s.calls.remove(&self.id);
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Wraps a store and records its calls in a [`CallTracker`].
#[derive(Debug, Clone)]
pub struct TrackedStore {
    inner: Arc<dyn ObjectStore>,
    tracker: Arc<CallTracker>,
}

impl TrackedStore {
    /// Wraps `inner` with a new tracker.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        TrackedStore {
            inner,
            tracker: Arc::default(),
        }
    }

    /// The tracker, to watch the calls from elsewhere.
    pub fn tracker(&self) -> Arc<CallTracker> {
        self.tracker.clone()
    }
}

#[async_trait]
impl ObjectStore for TrackedStore {
    async fn put_with(&self, key: &str, body: PutBody, opts: &PutOptions) -> StorageResult<()> {
        let call = self.tracker.begin("put", key);
        let body = match body {
            PutBody::Stream(s) => PutBody::Stream(call.progress.watch(s)),
            bytes => bytes,
        };
        call.end(self.inner.put_with(key, body, opts).await)
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StorageResult<GetObject> {
        let call = self.tracker.begin("get", key);
        call.end(self.inner.get(key, range).await)
    }

    async fn head(&self, key: &str) -> StorageResult<Option<ObjectMeta>> {
        let call = self.tracker.begin("head", key);
        call.end(self.inner.head(key).await)
    }

    async fn list_page(&self, req: &ListRequest) -> StorageResult<ListPage> {
        let call = self.tracker.begin("list", &req.prefix);
        call.end(self.inner.list_page(req).await)
    }

    async fn delete_many(&self, keys: &[String]) -> StorageResult<()> {
        let first = keys.first().map(String::as_str).unwrap_or_default();
        let call = self.tracker.begin("delete", first);
        call.end(self.inner.delete_many(keys).await)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FaultPlan, FaultStore, LocalStore};
    use bytes::Bytes;

    #[tokio::test]
    async fn running_calls_and_answers_are_tracked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let local: Arc<dyn ObjectStore> =
            Arc::new(LocalStore::new(dir.path().into()).expect("store"));
        let plan = FaultPlan::new();
        let store = TrackedStore::new(Arc::new(FaultStore::new(local, plan.clone())));
        let tracker = store.tracker();
        assert_eq!(tracker.idlest(), None);
        assert_eq!(tracker.last_answer(), None);
        store
            .put("k", Bytes::from_static(b"v").into())
            .await
            .expect("put");
        let first = tracker.last_answer().expect("answered");
        assert_eq!(tracker.idlest(), None, "an ended call is gone");
        // A missing key is an answer too.
        assert_eq!(store.head("absent").await.expect("head"), None);
        assert!(tracker.last_answer().expect("answered") >= first);
        // A transient failure is not.
        plan.fail_next(None, 1, crate::Fault::Transient);
        let before = tracker.last_answer();
        store.head("k").await.expect_err("injected");
        assert_eq!(tracker.last_answer(), before);
    }

    #[tokio::test]
    async fn a_call_in_flight_shows_with_its_idle_time() {
        let (tx, rx) = tokio::sync::mpsc::channel::<StorageResult<Bytes>>(1);
        let dir = tempfile::tempdir().expect("tempdir");
        let store = TrackedStore::new(Arc::new(LocalStore::new(dir.path().into()).expect("store")));
        let tracker = store.tracker();
        let body =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
        let put = tokio::spawn({
            let store = store.clone();
            async move { store.put("streamed", PutBody::Stream(Box::pin(body))).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let running = tracker.idlest().expect("running");
        assert_eq!((running.op, running.key.as_str()), ("put", "streamed"));
        // Waiting for the producer is not idleness of the store.
        assert_eq!(running.idle, Duration::ZERO);
        tx.send(Ok(Bytes::from_static(b"abc"))).await.expect("send");
        drop(tx);
        put.await.expect("join").expect("put");
        assert_eq!(tracker.idlest(), None);
        assert_eq!(running.to_string(), "put `streamed`");
    }
}
