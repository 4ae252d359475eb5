//! [`RetryStore`]: retries transient errors with exponential backoff and jitter.
//!
//! Only errors for which [`StorageError::is_transient`] is true are retried; permanent ones
//! (not found, access denied, already exists, ...) return at once. Every retry is logged at
//! `info` with the attempt number, the delay and the error: a call that fails for good is
//! the caller's to report (the replicator warns once per failure episode, not per attempt).
//!
//! A put whose body is a [`PutBody::Stream`] cannot be replayed (the stream is consumed by the
//! first attempt), so it is passed through once, unretried; the S3 backend still retries each
//! buffered part of such an upload inside the SDK. Callers that need a retried upload of a
//! large object should retry the whole operation, re-creating the stream.
//!
//! A put with `if_none_match` that succeeded on the server but whose answer was lost (a
//! timeout) will, when retried, fail with [`StorageError::AlreadyExists`]: the caller can tell
//! such a false conflict from a real one by reading the object back.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};

use crate::error::{StorageError, StorageResult};
use crate::{GetObject, ListPage, ListRequest, ObjectMeta, ObjectStore, PutBody, PutOptions};

/// How [`RetryStore`] retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = no retry). Default 5.
    pub max_attempts: u32,
    /// Delay before the first retry; it doubles on each further one. Default 200 ms.
    pub initial_delay: Duration,
    /// Cap on the exponential delay (before jitter, which adds up to as much again).
    /// Default 10 s.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..Default::default()
        }
    }

    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.initial_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.max_attempts.saturating_sub(1) as usize)
            .with_jitter()
            .with_jitter_seed(rand::random())
    }
}

/// Wraps a store and retries its transient errors.
#[derive(Debug, Clone)]
pub struct RetryStore {
    inner: Arc<dyn ObjectStore>,
    policy: RetryPolicy,
}

impl RetryStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>, policy: RetryPolicy) -> Self {
        RetryStore { inner, policy }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// The policy in force.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    async fn run<T, F, Fut>(&self, op: &'static str, key: &str, f: F) -> StorageResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = StorageResult<T>>,
    {
        let mut attempt: u32 = 1;
        let store = self.inner.describe();
        f.retry(self.policy.backoff())
            .when(StorageError::is_transient)
            .notify(|error: &StorageError, delay: Duration| {
                tracing::info!(
                    attempt,
                    max_attempts = self.policy.max_attempts,
                    op,
                    key,
                    store = %store,
                    delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    %error,
                    "storage call failed, retrying"
                );
                attempt += 1;
            })
            .await
    }
}

#[async_trait]
impl ObjectStore for RetryStore {
    async fn put_with(&self, key: &str, body: PutBody, opts: &PutOptions) -> StorageResult<()> {
        match body {
            PutBody::Bytes(bytes) => {
                self.run("put", key, || {
                    self.inner
                        .put_with(key, PutBody::Bytes(bytes.clone()), opts)
                })
                .await
            }
            // A stream cannot be replayed: one attempt.
            stream @ PutBody::Stream(_) => self.inner.put_with(key, stream, opts).await,
        }
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StorageResult<GetObject> {
        self.run("get", key, || self.inner.get(key, range.clone()))
            .await
    }

    async fn head(&self, key: &str) -> StorageResult<Option<ObjectMeta>> {
        self.run("head", key, || self.inner.head(key)).await
    }

    async fn list_page(&self, req: &ListRequest) -> StorageResult<ListPage> {
        self.run("list", &req.prefix, || self.inner.list_page(req))
            .await
    }

    async fn delete_many(&self, keys: &[String]) -> StorageResult<()> {
        let first = keys.first().map(String::as_str).unwrap_or_default();
        self.run("delete", first, || self.inner.delete_many(keys))
            .await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_policy() {
        let p = RetryPolicy::default();
        assert_eq!(p.max_attempts, 5);
        assert_eq!(p.initial_delay, Duration::from_millis(200));
        assert_eq!(p.max_delay, Duration::from_secs(10));
        assert_eq!(RetryPolicy::none().max_attempts, 1);
    }

    #[test]
    fn backoff_yields_max_attempts_minus_one_delays_within_bounds() {
        use backon::BackoffBuilder;
        let p = RetryPolicy {
            max_attempts: 4,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(250),
        };
        let delays: Vec<Duration> = p.backoff().build().collect();
        assert_eq!(delays.len(), 3);
        for d in delays {
            assert!(
                d >= Duration::from_millis(100) && d <= Duration::from_millis(500),
                "{d:?}"
            );
        }
    }
}
