//! [`FaultStore`]: a store wrapper that injects faults, for tests.
//!
//! A [`FaultPlan`] is shared (clone it; every clone is the same plan) and can change while a
//! test runs. It holds rules — "fail the 3rd put", "fail the next 5 calls", "fail everything
//! for 2 s", "truncate the next put" — and counts calls by kind, so a test can assert that an
//! idle replicator sends no request at all:
//!
//! ```
//! # async fn demo() -> Result<(), walship_storage::StorageError> {
//! use std::sync::Arc;
//! use walship_storage::{CallKind, Fault, FaultPlan, FaultStore, LocalStore, ObjectStore};
//! # let dir = tempfile::tempdir().map_err(|e| walship_storage::StorageError::io("tempdir", e))?;
//! let plan = FaultPlan::new();
//! let store = FaultStore::new(Arc::new(LocalStore::new(dir.path().into())?), plan.clone());
//! plan.fail_nth(Some(CallKind::Put), 1, Fault::Transient);
//! assert!(store.put("k", bytes::Bytes::from_static(b"v").into()).await.is_err());
//! store.put("k", bytes::Bytes::from_static(b"v").into()).await?;
//! assert_eq!(plan.counts().put, 2);
//! # Ok(()) }
//! ```

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use crate::error::{StorageError, StorageResult};
use crate::{GetObject, ListPage, ListRequest, ObjectMeta, ObjectStore, PutBody, PutOptions};

/// What an injected fault does to a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Fail with a transient error ([`StorageError::Injected`]), as a 5xx or "slow down" would.
    Transient,
    /// Fail with a permanent error, as an access-denied would; a retry does not help.
    Permanent,
    /// Wait this long, then make the call.
    Delay(Duration),
    /// Wait this long, then fail with a transient timeout without making the call.
    Timeout(Duration),
    /// For a put: write only the first half of the body, then report success, as a
    /// half-written object would look. Other calls are made unharmed.
    TruncatePut,
}

/// The kinds of calls, counted apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallKind {
    /// `put` / `put_with`.
    Put,
    /// `get`.
    Get,
    /// `head`.
    Head,
    /// `list_page`.
    List,
    /// `delete_many`.
    Delete,
}

/// Calls seen by a [`FaultStore`], failed ones included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallCounts {
    /// Puts.
    pub put: u64,
    /// Gets.
    pub get: u64,
    /// Heads.
    pub head: u64,
    /// List pages.
    pub list: u64,
    /// Delete batches.
    pub delete: u64,
}

impl CallCounts {
    /// All calls.
    pub fn total(&self) -> u64 {
        self.put + self.get + self.head + self.list + self.delete
    }

    fn of(&self, kind: CallKind) -> u64 {
        match kind {
            CallKind::Put => self.put,
            CallKind::Get => self.get,
            CallKind::Head => self.head,
            CallKind::List => self.list,
            CallKind::Delete => self.delete,
        }
    }

    fn bump(&mut self, kind: CallKind) {
        match kind {
            CallKind::Put => self.put += 1,
            CallKind::Get => self.get += 1,
            CallKind::Head => self.head += 1,
            CallKind::List => self.list += 1,
            CallKind::Delete => self.delete += 1,
        }
    }
}

#[derive(Debug, Clone)]
enum Trigger {
    /// The nth call (1-based) of the rule's kind, or of all calls; counted from when the
    /// counts were last reset.
    Nth(u64),
    /// The next `n` matching calls.
    Next(u64),
    /// Every matching call until then.
    Until(Instant),
}

#[derive(Debug, Clone)]
struct Rule {
    kind: Option<CallKind>,
    trigger: Trigger,
    fault: Fault,
}

#[derive(Debug, Default)]
struct PlanState {
    rules: Vec<Rule>,
    counts: CallCounts,
    total: u64,
    latency: Duration,
    injected: u64,
}

/// The faults a [`FaultStore`] injects, and its call counts. Clones share one plan.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    state: Arc<Mutex<PlanState>>,
}

impl FaultPlan {
    /// A plan with no faults.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, PlanState> {
        // A test that panicked while holding the lock leaves consistent counters behind.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, kind: Option<CallKind>, trigger: Trigger, fault: Fault) -> &Self {
        self.lock().rules.push(Rule {
            kind,
            trigger,
            fault,
        });
        self
    }

    /// Injects `fault` into the `n`th call (1-based, counted since the last
    /// [`reset_counts`](Self::reset_counts)) of `kind`, or of any kind if `None`.
    pub fn fail_nth(&self, kind: Option<CallKind>, n: u64, fault: Fault) -> &Self {
        self.add(kind, Trigger::Nth(n), fault)
    }

    /// Injects `fault` into the next `k` calls of `kind` (any kind if `None`).
    pub fn fail_next(&self, kind: Option<CallKind>, k: u64, fault: Fault) -> &Self {
        self.add(kind, Trigger::Next(k), fault)
    }

    /// Injects `fault` into every call of `kind` (any kind if `None`) for the next `duration`:
    /// "5xx for a while".
    pub fn fail_for(&self, kind: Option<CallKind>, duration: Duration, fault: Fault) -> &Self {
        self.add(kind, Trigger::Until(Instant::now() + duration), fault)
    }

    /// Truncates the next put to half its body, reporting success.
    pub fn truncate_next_put(&self) -> &Self {
        self.fail_next(Some(CallKind::Put), 1, Fault::TruncatePut)
    }

    /// Adds `latency` before every call (zero to stop).
    pub fn set_latency(&self, latency: Duration) -> &Self {
        self.lock().latency = latency;
        self
    }

    /// Removes every rule and the latency; counts are kept.
    pub fn clear(&self) -> &Self {
        let mut s = self.lock();
        s.rules.clear();
        s.latency = Duration::ZERO;
        self
    }

    /// Calls seen so far, by kind.
    pub fn counts(&self) -> CallCounts {
        self.lock().counts
    }

    /// How many faults were injected so far.
    pub fn injected(&self) -> u64 {
        self.lock().injected
    }

    /// Sets every count to zero (the `n` of [`fail_nth`](Self::fail_nth) counts from here).
    pub fn reset_counts(&self) -> &Self {
        let mut s = self.lock();
        s.counts = CallCounts::default();
        s.total = 0;
        s.injected = 0;
        self
    }

    /// Counts a call and picks the fault to inject into it, if any. Returns the latency too.
    fn on_call(&self, kind: CallKind) -> (Duration, Option<Fault>) {
        let mut s = self.lock();
        s.counts.bump(kind);
        s.total += 1;
        let now = Instant::now();
        let (counts, total) = (s.counts, s.total);
        s.rules
            .retain(|r| !matches!(r.trigger, Trigger::Until(t) if t <= now));
        let mut chosen = None;
        for (i, rule) in s.rules.iter_mut().enumerate() {
            if rule.kind.is_some_and(|k| k != kind) {
                continue;
            }
            if rule.fault == Fault::TruncatePut && kind != CallKind::Put {
                continue;
            }
            let (fires, spent) = match &mut rule.trigger {
                Trigger::Nth(n) => {
                    let seen = rule.kind.map_or(total, |k| counts.of(k));
                    (seen == *n, seen >= *n)
                }
                Trigger::Next(left) => {
                    *left = left.saturating_sub(1);
                    (true, *left == 0)
                }
                Trigger::Until(_) => (true, false),
            };
            if fires {
                chosen = Some((i, rule.fault.clone(), spent));
                break;
            }
        }
        let fault = chosen.map(|(i, fault, spent)| {
            if spent {
                s.rules.remove(i);
            }
            fault
        });
        if fault.is_some() {
            s.injected += 1;
        }
        (s.latency, fault)
    }
}

/// A store that injects the faults of a [`FaultPlan`] into the calls it passes on.
#[derive(Debug, Clone)]
pub struct FaultStore {
    inner: Arc<dyn ObjectStore>,
    plan: FaultPlan,
}

impl FaultStore {
    /// Wraps `inner`, injecting the faults of `plan`.
    pub fn new(inner: Arc<dyn ObjectStore>, plan: FaultPlan) -> Self {
        FaultStore { inner, plan }
    }

    /// The plan (a clone shares it).
    pub fn plan(&self) -> &FaultPlan {
        &self.plan
    }

    /// Counts the call, waits the latency, and returns the fault to apply after the
    /// pre-call ones (errors, delays, timeouts) are dealt with.
    async fn before(&self, kind: CallKind, key: &str) -> StorageResult<Option<Fault>> {
        let (latency, fault) = self.plan.on_call(kind);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let Some(fault) = fault else {
            return Ok(None);
        };
        tracing::debug!(?kind, key, ?fault, store = %self.inner.describe(), "injecting fault");
        match fault {
            Fault::Transient => Err(StorageError::Injected(format!(
                "transient failure of {kind:?} `{key}`"
            ))),
            Fault::Permanent => Err(StorageError::Other {
                store: self.inner.describe(),
                detail: format!("injected permanent failure of {kind:?} `{key}`"),
                transient: false,
            }),
            Fault::Delay(d) => {
                tokio::time::sleep(d).await;
                Ok(None)
            }
            Fault::Timeout(d) => {
                tokio::time::sleep(d).await;
                Err(StorageError::Timeout {
                    store: self.inner.describe(),
                    detail: format!("injected timeout of {kind:?} `{key}` after {d:?}"),
                })
            }
            Fault::TruncatePut => Ok(Some(Fault::TruncatePut)),
        }
    }
}

/// Reads a put body into memory (tests only) and keeps its first half.
async fn first_half(body: PutBody) -> StorageResult<Bytes> {
    let all = match body {
        PutBody::Bytes(b) => b,
        PutBody::Stream(mut s) => {
            let mut buf = BytesMut::new();
            while let Some(chunk) = s.next().await {
                buf.extend_from_slice(&chunk?);
            }
            buf.freeze()
        }
    };
    Ok(all.slice(..all.len() / 2))
}

#[async_trait]
impl ObjectStore for FaultStore {
    async fn put_with(&self, key: &str, body: PutBody, opts: &PutOptions) -> StorageResult<()> {
        match self.before(CallKind::Put, key).await? {
            Some(Fault::TruncatePut) => {
                let half = first_half(body).await?;
                self.inner.put_with(key, PutBody::Bytes(half), opts).await
            }
            _ => self.inner.put_with(key, body, opts).await,
        }
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StorageResult<GetObject> {
        self.before(CallKind::Get, key).await?;
        self.inner.get(key, range).await
    }

    async fn head(&self, key: &str) -> StorageResult<Option<ObjectMeta>> {
        self.before(CallKind::Head, key).await?;
        self.inner.head(key).await
    }

    async fn list_page(&self, req: &ListRequest) -> StorageResult<ListPage> {
        self.before(CallKind::List, &req.prefix).await?;
        self.inner.list_page(req).await
    }

    async fn delete_many(&self, keys: &[String]) -> StorageResult<()> {
        let first = keys.first().map(String::as_str).unwrap_or_default();
        self.before(CallKind::Delete, first).await?;
        self.inner.delete_many(keys).await
    }

    fn describe(&self) -> String {
        format!("{} (with injected faults)", self.inner.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nth_call_of_a_kind_fires_once() {
        let plan = FaultPlan::new();
        plan.fail_nth(Some(CallKind::Put), 2, Fault::Transient);
        assert_eq!(plan.on_call(CallKind::Get).1, None);
        assert_eq!(plan.on_call(CallKind::Put).1, None);
        assert_eq!(plan.on_call(CallKind::Put).1, Some(Fault::Transient));
        assert_eq!(plan.on_call(CallKind::Put).1, None);
        assert_eq!(plan.injected(), 1);
        assert_eq!(
            plan.counts(),
            CallCounts {
                put: 3,
                get: 1,
                ..Default::default()
            }
        );
    }

    #[test]
    fn nth_call_overall_counts_every_kind() {
        let plan = FaultPlan::new();
        plan.fail_nth(None, 3, Fault::Permanent);
        assert_eq!(plan.on_call(CallKind::Head).1, None);
        assert_eq!(plan.on_call(CallKind::List).1, None);
        assert_eq!(plan.on_call(CallKind::Delete).1, Some(Fault::Permanent));
        assert_eq!(plan.counts().total(), 3);
    }

    #[test]
    fn next_k_calls_then_clear() {
        let plan = FaultPlan::new();
        plan.fail_next(None, 2, Fault::Transient);
        assert!(plan.on_call(CallKind::Get).1.is_some());
        assert!(plan.on_call(CallKind::Put).1.is_some());
        assert!(plan.on_call(CallKind::Put).1.is_none());
        plan.fail_for(None, Duration::from_secs(60), Fault::Transient);
        assert!(plan.on_call(CallKind::Get).1.is_some());
        plan.clear();
        assert!(plan.on_call(CallKind::Get).1.is_none());
    }

    #[test]
    fn a_window_of_failures_ends() {
        let plan = FaultPlan::new();
        plan.fail_for(None, Duration::from_millis(30), Fault::Transient);
        assert!(plan.on_call(CallKind::Get).1.is_some());
        std::thread::sleep(Duration::from_millis(40));
        assert!(plan.on_call(CallKind::Get).1.is_none());
    }

    #[test]
    fn truncation_waits_for_a_put() {
        let plan = FaultPlan::new();
        plan.truncate_next_put();
        assert_eq!(plan.on_call(CallKind::Get).1, None);
        assert_eq!(plan.on_call(CallKind::Put).1, Some(Fault::TruncatePut));
        assert_eq!(plan.on_call(CallKind::Put).1, None);
    }
}
