//! walship's object stores.
//!
//! One async trait, [`ObjectStore`], and its backends:
//!
//! - [`LocalStore`]: a directory on a local or mounted filesystem (`file:///dir`). Every put
//!   writes a temporary file, fsyncs it and renames it into place, so a reader never sees a
//!   partial object.
//! - [`S3Store`]: AWS S3 or any S3-compatible store (Cloudflare R2, MinIO, ...) through an
//!   endpoint, with the SDK's default credential chain (environment, profile, web identity).
//! - [`FaultStore`]: a wrapper for tests that fails the Nth call, returns transient errors for
//!   a while, or truncates a write.
//! - [`RetryStore`]: a wrapper that retries transient errors with exponential backoff and
//!   jitter; permanent errors pass straight through.
//! - [`TimeoutStore`]: a wrapper that fails a call the store does not answer within
//!   [`StoreTimeouts`] (a transient [`StorageError::Timeout`]), whatever the backend.
//! - [`TrackedStore`]: a wrapper that records the calls running and when the store last
//!   answered ([`CallTracker`]), so a stalled store can be reported before any timeout.
//!
//! Errors are one type, [`StorageError`], and each knows whether a retry can help
//! ([`StorageError::is_transient`]).
//!
//! Replica URLs ([`ReplicaUrl`]) are `file:///absolute/dir` or
//! `s3://bucket/prefix?endpoint=...&region=...&force-path-style=true`; [`open`] turns one into
//! a store wrapped in a [`TimeoutStore`] and a [`RetryStore`]. With the `testkit` feature, `testkit::MotoServer` runs
//! a real S3-protocol server on 127.0.0.1 for other crates' tests (`scripts/test-deps.sh`
//! installs it). `tests/conformance.rs` runs one suite against every backend, and against a
//! second S3 implementation (s3s-fs, in-process).
//!
//! ```no_run
//! # async fn demo() -> Result<(), walship_storage::StorageError> {
//! use walship_storage::{open, ObjectStore, ReplicaUrl};
//! let url: ReplicaUrl = "file:///var/backups/app".parse()?;
//! let store = open(&url, &Default::default()).await?;
//! store.put("hello", bytes::Bytes::from_static(b"world").into()).await?;
//! let body = store.get("hello", None).await?.collect().await?;
//! assert_eq!(&body[..], b"world");
//! # Ok(()) }
//! ```

mod error;
mod fault;
mod local;
mod retry;
mod s3;
#[cfg(feature = "testkit")]
pub mod testkit;
mod timeout;
mod track;
mod url;

use std::fmt;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

pub use crate::error::{StorageError, StorageResult};
pub use crate::fault::{CallCounts, CallKind, Fault, FaultPlan, FaultStore};
pub use crate::local::LocalStore;
pub use crate::retry::{RetryPolicy, RetryStore};
pub use crate::s3::{ChecksumMode, S3Options, S3Store, ServerSideEncryption, StaticCredentials};
pub use crate::timeout::{StoreTimeouts, TimeoutStore};
pub use crate::track::{CallTracker, RunningCall, TrackedStore};
pub use crate::url::{ReplicaUrl, redact_url, validate_endpoint};

/// A stream of byte chunks: the body of a get, or of a streamed put.
pub type ByteStream = Pin<Box<dyn Stream<Item = StorageResult<Bytes>> + Send + 'static>>;

/// The largest chunk a producer of a [`PutBody::Stream`] should send. Stores size the room
/// they keep past a part or a threshold for one such chunk, and a producer's queue of chunks
/// is what an upload holds beside the part it buffers: small chunks keep both small.
pub const STREAM_CHUNK: usize = 256 * 1024;

/// What a put uploads.
pub enum PutBody {
    /// A body already in memory.
    Bytes(Bytes),
    /// A body produced chunk by chunk; the store never holds all of it in memory (S3 uses a
    /// multipart upload past [`S3Options::multipart_threshold`]).
    Stream(ByteStream),
}

impl fmt::Debug for PutBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PutBody::Bytes(b) => write!(f, "PutBody::Bytes({} bytes)", b.len()),
            PutBody::Stream(_) => f.write_str("PutBody::Stream"),
        }
    }
}

impl From<Bytes> for PutBody {
    fn from(b: Bytes) -> Self {
        PutBody::Bytes(b)
    }
}

impl From<Vec<u8>> for PutBody {
    fn from(b: Vec<u8>) -> Self {
        PutBody::Bytes(Bytes::from(b))
    }
}

/// Options of a put.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutOptions {
    /// Fail with [`StorageError::AlreadyExists`] if the key exists (S3 `If-None-Match: *`;
    /// the local store uses a hard link, which fails on an existing name).
    pub if_none_match: bool,
}

/// What a store knows of one object without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The key, relative to the store's prefix.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last-modified time in milliseconds since the Unix epoch, where the store reports one.
    pub modified_ms: Option<i64>,
}

/// One page of a listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListPage {
    /// Objects in this page, in ascending key order (byte order of the UTF-8 key).
    pub objects: Vec<ObjectMeta>,
    /// "Directories" under the prefix when listing with a delimiter, ascending.
    pub common_prefixes: Vec<String>,
    /// Pass this as `continuation` to get the next page; `None` on the last page.
    pub next: Option<String>,
}

/// Arguments of a list call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListRequest {
    /// Only keys starting with this.
    pub prefix: String,
    /// Only keys sorting strictly after this (S3 `StartAfter`).
    pub start_after: Option<String>,
    /// Group keys by this delimiter after the prefix (S3 `Delimiter`), e.g. `/`.
    pub delimiter: Option<String>,
    /// At most this many entries per page (S3 caps it at 1000); `None` = the store's default.
    pub max_keys: Option<usize>,
    /// The `next` of the previous page.
    pub continuation: Option<String>,
}

/// The body of a get: a stream of chunks plus the object's total size.
pub struct GetObject {
    /// Size of the whole object (not of the range).
    pub size: u64,
    /// The bytes asked for.
    pub body: ByteStream,
}

impl fmt::Debug for GetObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GetObject")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl GetObject {
    /// Reads the whole body into memory. Only for objects known to be small.
    pub async fn collect(mut self) -> StorageResult<Bytes> {
        use futures::StreamExt;
        let mut out = bytes::BytesMut::new();
        while let Some(chunk) = self.body.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out.freeze())
    }
}

/// An object store: keys are `/`-separated UTF-8 strings relative to the store's prefix.
///
/// Assumptions the rest of walship relies on (docs/format.md, "Storage assumptions"): a put
/// is atomic (a reader sees the whole object or nothing), a listing after a successful put
/// shows it, and objects are never modified in place.
#[async_trait]
pub trait ObjectStore: Send + Sync + fmt::Debug {
    /// Writes an object.
    async fn put_with(&self, key: &str, body: PutBody, opts: &PutOptions) -> StorageResult<()>;

    /// Writes an object with default options.
    async fn put(&self, key: &str, body: PutBody) -> StorageResult<()> {
        self.put_with(key, body, &PutOptions::default()).await
    }

    /// Reads an object, or the byte range `range` of it. [`StorageError::NotFound`] if absent.
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> StorageResult<GetObject>;

    /// Size and time of an object, or `None` if absent.
    async fn head(&self, key: &str) -> StorageResult<Option<ObjectMeta>>;

    /// One page of a listing.
    async fn list_page(&self, req: &ListRequest) -> StorageResult<ListPage>;

    /// Deletes objects; absent keys are not an error.
    async fn delete_many(&self, keys: &[String]) -> StorageResult<()>;

    /// A short description for logs and messages, e.g. `s3://bucket/prefix`. Never holds a
    /// secret.
    fn describe(&self) -> String;
}

/// Lists every object under `prefix` (after `start_after`), following pagination.
pub async fn list_all(
    store: &dyn ObjectStore,
    prefix: &str,
    start_after: Option<&str>,
) -> StorageResult<Vec<ObjectMeta>> {
    let mut req = ListRequest {
        prefix: prefix.to_string(),
        start_after: start_after.map(str::to_string),
        ..Default::default()
    };
    let mut out = Vec::new();
    loop {
        let page = store.list_page(&req).await?;
        out.extend(page.objects);
        match page.next {
            Some(next) => req.continuation = Some(next),
            None => return Ok(out),
        }
    }
}

/// Lists the common prefixes ("directories") directly under `prefix`, following pagination.
pub async fn list_dirs(store: &dyn ObjectStore, prefix: &str) -> StorageResult<Vec<String>> {
    let mut req = ListRequest {
        prefix: prefix.to_string(),
        delimiter: Some("/".to_string()),
        ..Default::default()
    };
    let mut out = Vec::new();
    loop {
        let page = store.list_page(&req).await?;
        out.extend(page.common_prefixes);
        match page.next {
            Some(next) => req.continuation = Some(next),
            None => return Ok(out),
        }
    }
}

/// Settings of a store that a URL does not carry.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// S3 settings; the URL's query parameters override endpoint, region and path style.
    pub s3: S3Options,
    /// Retry policy applied around the backend; `None` = [`RetryPolicy::default`].
    pub retry: Option<RetryPolicy>,
    /// How long the store may take, for every backend (for S3 it replaces
    /// [`S3Options::timeouts`]).
    pub timeouts: StoreTimeouts,
}

/// Opens the store a replica URL names: the backend, held to `opts.timeouts` by a
/// [`TimeoutStore`], wrapped in a [`RetryStore`] (each attempt has its own deadline).
///
/// For S3 this checks nothing over the network; call [`check_access`] to find a missing
/// bucket or bad credentials early.
pub async fn open(url: &ReplicaUrl, opts: &StoreOptions) -> StorageResult<Arc<dyn ObjectStore>> {
    opts.timeouts
        .check()
        .map_err(|reason| StorageError::InvalidUrl {
            url: url.to_string(),
            reason,
        })?;
    let inner: Arc<dyn ObjectStore> = match url {
        ReplicaUrl::File { path } => Arc::new(LocalStore::new(path.clone())?),
        ReplicaUrl::S3 { .. } => {
            let s3 = S3Options {
                timeouts: opts.timeouts,
                ..opts.s3.clone()
            };
            Arc::new(S3Store::from_url(url, &s3).await?)
        }
    };
    let timed = Arc::new(TimeoutStore::new(inner, opts.timeouts));
    Ok(Arc::new(RetryStore::new(
        timed,
        opts.retry.clone().unwrap_or_default(),
    )))
}

/// Proves the store is reachable and the credentials work, by listing one key.
/// The error says what is wrong (missing bucket, bad credentials, unreachable endpoint).
pub async fn check_access(store: &dyn ObjectStore) -> StorageResult<()> {
    let req = ListRequest {
        max_keys: Some(1),
        ..Default::default()
    };
    store.list_page(&req).await.map(|_| ())
}
