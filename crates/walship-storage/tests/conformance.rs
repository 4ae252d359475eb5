//! One conformance suite for every backend: the same test functions run against
//! [`LocalStore`] (a temporary directory) and [`S3Store`] on two independent S3
//! implementations — moto (a child process) and s3s-fs (in this process) on 127.0.0.1, one
//! server each per test binary, a unique prefix per test — then S3-only checks (missing bucket, bad
//! credentials, unreachable endpoint, server-side encryption, checksum modes) and the
//! [`RetryStore`] / [`FaultStore`] wrappers on both backends.
//!
//! Needs `moto_server`: run `scripts/test-deps.sh` once.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tempfile::TempDir;
use walship_storage::testkit::{MotoOptions, MotoServer};
use walship_storage::{
    ByteStream, CallKind, ChecksumMode, Fault, FaultPlan, FaultStore, ListRequest, LocalStore,
    ObjectStore, PutBody, PutOptions, ReplicaUrl, RetryPolicy, RetryStore, S3Options, S3Store,
    ServerSideEncryption, StorageError, StoreOptions, StoreTimeouts, list_all, list_dirs,
};

const MIB: usize = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// A store under test, with what it takes to open another one like it.
struct Harness {
    store: Arc<dyn ObjectStore>,
    backend: Backend,
}

enum Backend {
    Local {
        dir: TempDir,
    },
    /// A prefix on an S3 server, and the options that reach it.
    S3 {
        url: ReplicaUrl,
        opts: Box<S3Options>,
    },
}

impl Harness {
    fn local() -> Self {
        init_tracing();
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(dir.path().join("replica")).expect("local store");
        Harness {
            store: Arc::new(store),
            backend: Backend::Local { dir },
        }
    }

    async fn s3(test: &str) -> Self {
        let moto = MotoServer::shared();
        let url = moto.url(moto.bucket(), &MotoServer::unique_prefix(test));
        Self::s3_at(url, moto.options()).await
    }

    async fn s3s_fs(test: &str) -> Self {
        let server = S3sFsServer::shared();
        let url = server.url(&MotoServer::unique_prefix(test));
        Self::s3_at(url, server.options()).await
    }

    async fn s3_at(url: ReplicaUrl, opts: S3Options) -> Self {
        init_tracing();
        let store = S3Store::from_url(&url, &opts).await.expect("s3 store");
        Harness {
            store: Arc::new(store),
            backend: Backend::S3 {
                url,
                opts: Box::new(opts),
            },
        }
    }

    /// Another store on the same place, with S3 options changed by `f` (ignored locally).
    async fn reopen(&self, f: impl FnOnce(&mut S3Options)) -> Arc<dyn ObjectStore> {
        match &self.backend {
            Backend::Local { dir } => {
                Arc::new(LocalStore::new(dir.path().join("replica")).expect("local store"))
            }
            Backend::S3 { url, opts } => {
                let mut opts = (**opts).clone();
                f(&mut opts);
                Arc::new(S3Store::from_url(url, &opts).await.expect("s3 store"))
            }
        }
    }

    /// A store on a sibling place: another directory, or another prefix in the same bucket.
    async fn sibling(&self, name: &str) -> Arc<dyn ObjectStore> {
        match &self.backend {
            Backend::Local { dir } => {
                Arc::new(LocalStore::new(dir.path().join(name)).expect("local store"))
            }
            Backend::S3 { url, opts } => {
                let mut url = url.clone();
                let ReplicaUrl::S3 { prefix, .. } = &mut url else {
                    unreachable!("an S3 harness has an S3 URL")
                };
                prefix.push_str(name);
                Arc::new(S3Store::from_url(&url, opts).await.expect("s3 store"))
            }
        }
    }
}

/// s3s-fs, an S3 server on a directory, served in this process on 127.0.0.1 (its own thread
/// and runtime, so it outlives each test's runtime), checking signatures of `test`/`test`.
///
/// Its quirks (0.13), none hidden from the suite: a listing cut at `max-keys` says it is
/// truncated but gives no continuation token, and applies `StartAfter` to objects only, not
/// to common prefixes — `S3Store` goes on from the page's last entry instead of ending the
/// listing there (the pagination tests found it); `If-None-Match` is honoured on
/// `PutObject` but not on `CompleteMultipartUpload`, so nothing here fences a multipart
/// upload (0.14 honours both, but needs crc-fast 1.10 where the workspace's aws-sdk-s3
/// pins ~1.9).
struct S3sFsServer {
    port: u16,
    /// Under cargo's scratch directory for tests; kept for the process's life.
    _root: TempDir,
}

impl S3sFsServer {
    const BUCKET: &str = "walship-test";

    fn shared() -> &'static S3sFsServer {
        static SHARED: std::sync::OnceLock<S3sFsServer> = std::sync::OnceLock::new();
        SHARED.get_or_init(S3sFsServer::start)
    }

    fn start() -> Self {
        let root = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
        std::fs::create_dir(root.path().join(Self::BUCKET)).expect("bucket directory");
        let fs = ::s3s_fs::FileSystem::new(root.path()).expect("s3s-fs");
        let mut builder = s3s::service::S3ServiceBuilder::new(fs);
        builder.set_auth(s3s::auth::SimpleAuth::from_single("test", "test"));
        let service = builder.build();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let Ok((socket, _)) = listener.accept().await else {
                        continue;
                    };
                    let service = service.clone();
                    tokio::spawn(async move {
                        let io = hyper_util::rt::TokioIo::new(socket);
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    });
                }
            });
        });
        S3sFsServer { port, _root: root }
    }

    fn url(&self, prefix: &str) -> ReplicaUrl {
        ReplicaUrl::S3 {
            bucket: Self::BUCKET.to_string(),
            prefix: prefix.to_string(),
            endpoint: Some(format!("http://127.0.0.1:{}", self.port)),
            region: Some("us-east-1".to_string()),
            force_path_style: Some(true),
        }
    }

    fn options(&self) -> S3Options {
        S3Options {
            endpoint: Some(format!("http://127.0.0.1:{}", self.port)),
            region: Some("us-east-1".to_string()),
            force_path_style: Some(true),
            credentials: Some(walship_storage::StaticCredentials::new("test", "test")),
            sdk_max_attempts: 1,
            ..Default::default()
        }
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Deterministic, non-repeating-looking bytes.
fn pattern(len: usize, seed: u32) -> Bytes {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// `data` as a stream of `chunk`-sized pieces.
fn chunked(data: Bytes, chunk: usize) -> PutBody {
    let pieces: Vec<_> = (0..data.len())
        .step_by(chunk)
        .map(|i| Ok(data.slice(i..(i + chunk).min(data.len()))))
        .collect();
    let stream: ByteStream = Box::pin(futures::stream::iter(pieces));
    PutBody::Stream(stream)
}

async fn get_all(store: &dyn ObjectStore, key: &str) -> Bytes {
    store
        .get(key, None)
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("read {key}: {e}"))
}

async fn get_range(store: &dyn ObjectStore, key: &str, range: Range<u64>) -> (u64, Bytes) {
    let got = store
        .get(key, Some(range.clone()))
        .await
        .unwrap_or_else(|e| panic!("get {key} {range:?}: {e}"));
    let size = got.size;
    (size, got.collect().await.expect("body"))
}

async fn put(store: &dyn ObjectStore, key: &str, data: &'static [u8]) {
    store
        .put(key, Bytes::from_static(data).into())
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"));
}

async fn put_many(store: &dyn ObjectStore, keys: &[String]) {
    futures::stream::iter(keys)
        .map(|k| async move {
            store
                .put(k, Bytes::from(k.clone()).into())
                .await
                .unwrap_or_else(|e| panic!("put {k}: {e}"))
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
}

fn keys_of(objects: &[walship_storage::ObjectMeta]) -> Vec<String> {
    objects.iter().map(|o| o.key.clone()).collect()
}

// ---------------------------------------------------------------------------------------------
// The suite: each function runs on every backend
// ---------------------------------------------------------------------------------------------

async fn round_trip_empty_and_small(h: &Harness) {
    let s = &*h.store;
    put(s, "empty", b"").await;
    put(s, "dir/small", b"hello, world").await;
    assert_eq!(get_all(s, "empty").await, Bytes::new());
    assert_eq!(&get_all(s, "dir/small").await[..], b"hello, world");
    let meta = s.head("dir/small").await.expect("head").expect("present");
    assert_eq!((meta.key.as_str(), meta.size), ("dir/small", 12));
    assert!(meta.modified_ms.is_some_and(|t| t > 1_600_000_000_000));
    assert_eq!(
        s.head("empty").await.expect("head").map(|m| m.size),
        Some(0)
    );
    let got = s.get("dir/small", None).await.expect("get");
    assert_eq!(got.size, 12);
    // Overwrite without if_none_match replaces.
    put(s, "dir/small", b"bye").await;
    assert_eq!(&get_all(s, "dir/small").await[..], b"bye");
}

async fn round_trip_streamed_small(h: &Harness) {
    let s = &*h.store;
    let data = pattern(100_000, 1);
    s.put("streamed", chunked(data.clone(), 7_000))
        .await
        .expect("put");
    assert_eq!(get_all(s, "streamed").await, data);
    let empty: ByteStream = Box::pin(futures::stream::empty());
    s.put("streamed-empty", PutBody::Stream(empty))
        .await
        .expect("put");
    assert_eq!(get_all(s, "streamed-empty").await, Bytes::new());
}

async fn round_trip_multipart_sized(h: &Harness) {
    // 5 MiB parts above 5 MiB: a 12 MiB body is three parts.
    let s = h
        .reopen(|o| {
            o.multipart_threshold = 5 * MIB;
            o.part_size = 5 * MIB;
        })
        .await;
    let data = pattern(12 * MIB + 123, 2);
    s.put("big/streamed", chunked(data.clone(), 256 * 1024))
        .await
        .expect("streamed put");
    let got = get_all(&*s, "big/streamed").await;
    assert!(got == data, "streamed multipart body differs");
    s.put("big/bytes", data.clone().into())
        .await
        .expect("bytes put");
    let got = get_all(&*s, "big/bytes").await;
    assert!(got == data, "bytes multipart body differs");
    assert_eq!(
        s.head("big/bytes").await.expect("head").map(|m| m.size),
        Some(data.len() as u64)
    );
    // The body streams in chunks, not as one buffer.
    let mut body = s.get("big/bytes", None).await.expect("get").body;
    let mut chunks = 0;
    while let Some(chunk) = body.next().await {
        assert!(chunk.expect("chunk").len() <= 2 * MIB);
        chunks += 1;
    }
    assert!(chunks > 6, "{chunks} chunks");
}

async fn ranged_reads(h: &Harness) {
    let s = &*h.store;
    let data = pattern(10_000, 3);
    s.put("r", data.clone().into()).await.expect("put");
    for range in [0..1, 0..10_000, 5..10, 9_999..10_000, 1_000..9_000] {
        let (size, got) = get_range(s, "r", range.clone()).await;
        assert_eq!(size, 10_000);
        assert_eq!(
            got,
            data.slice(range.start as usize..range.end as usize),
            "{range:?}"
        );
    }
    // Past the end: clamped; starting at or past the end, or empty: no bytes.
    let (size, got) = get_range(s, "r", 9_990..20_000).await;
    assert_eq!((size, got), (10_000, data.slice(9_990..)));
    for range in [10_000..10_010, 20_000..30_000, 5..5] {
        let (size, got) = get_range(s, "r", range.clone()).await;
        assert_eq!((size, got.len()), (10_000, 0), "{range:?}");
    }
    assert!(matches!(
        s.get("absent", Some(0..10)).await,
        Err(StorageError::NotFound { .. })
    ));
    assert!(matches!(
        s.get("absent", Some(3..3)).await,
        Err(StorageError::NotFound { .. })
    ));
}

async fn listing_paginates_past_1000_and_isolates_prefixes(h: &Harness) {
    let s = &*h.store;
    let mut keys: Vec<String> = (0..1_100).map(|i| format!("a/{i:05}")).collect();
    // (Not `a` itself: a directory cannot hold both a file `a` and a file `a/x`.)
    keys.extend(["ab/1", "ab/2", "a-", "b/1", "a0"].map(String::from));
    put_many(s, &keys).await;

    // One page is at most 1000.
    let page = s
        .list_page(&ListRequest {
            prefix: "a/".into(),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(page.objects.len(), 1_000);
    assert!(page.next.is_some());

    let all = list_all(s, "a/", None).await.expect("list_all");
    let mut want: Vec<String> = keys
        .iter()
        .filter(|k| k.starts_with("a/"))
        .cloned()
        .collect();
    want.sort();
    assert_eq!(
        keys_of(&all),
        want,
        "`a/` sees exactly its 1100 keys, in order"
    );
    assert!(all.iter().all(|o| o.size == o.key.len() as u64));

    // Small pages.
    let mut req = ListRequest {
        prefix: "a/".into(),
        max_keys: Some(300),
        ..Default::default()
    };
    let mut pages = 0;
    let mut seen = Vec::new();
    loop {
        let page = s.list_page(&req).await.expect("page");
        assert!(page.objects.len() <= 300);
        pages += 1;
        seen.extend(keys_of(&page.objects));
        match page.next {
            Some(n) => req.continuation = Some(n),
            None => break,
        }
    }
    assert_eq!((pages, seen), (4, want));

    let ab = list_all(s, "ab/", None).await.expect("list");
    assert_eq!(keys_of(&ab), ["ab/1", "ab/2"]);
    let a = list_all(s, "a", None).await.expect("list");
    assert_eq!(a.len(), 1_100 + 4, "`a` sees a-, a/…, a0, ab/…");
    assert_eq!(list_all(s, "zzz", None).await.expect("list"), vec![]);

    // A sibling prefix or directory sees none of it.
    let other = h.sibling("other").await;
    assert_eq!(list_all(&*other, "", None).await.expect("list"), vec![]);
}

async fn delimiter_listing(h: &Harness) {
    let s = &*h.store;
    for k in [
        "d/x/1", "d/x/2", "d/y/1", "d/z", "d/zz/1", "d/zz/2/3", "e/1",
    ] {
        put(s, k, b"v").await;
    }
    let page = s
        .list_page(&ListRequest {
            prefix: "d/".into(),
            delimiter: Some("/".into()),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(page.common_prefixes, ["d/x/", "d/y/", "d/zz/"]);
    assert_eq!(keys_of(&page.objects), ["d/z"]);
    assert_eq!(page.next, None);

    assert_eq!(
        list_dirs(s, "d/").await.expect("dirs"),
        ["d/x/", "d/y/", "d/zz/"]
    );
    assert_eq!(list_dirs(s, "").await.expect("dirs"), ["d/", "e/"]);

    // Pages of one entry walk prefixes and objects alike.
    let mut req = ListRequest {
        prefix: "d/".into(),
        delimiter: Some("/".into()),
        max_keys: Some(1),
        ..Default::default()
    };
    let mut entries = Vec::new();
    loop {
        let page = s.list_page(&req).await.expect("page");
        assert_eq!(page.objects.len() + page.common_prefixes.len(), 1);
        entries.extend(page.common_prefixes);
        entries.extend(keys_of(&page.objects));
        match page.next {
            Some(n) => req.continuation = Some(n),
            None => break,
        }
    }
    assert_eq!(entries, ["d/x/", "d/y/", "d/z", "d/zz/"]);
}

async fn start_after(h: &Harness) {
    let s = &*h.store;
    for k in ["g/0001", "g/0002", "g/0003", "g/0010", "h/0001"] {
        put(s, k, b"v").await;
    }
    let after = list_all(s, "g/", Some("g/0002")).await.expect("list");
    assert_eq!(keys_of(&after), ["g/0003", "g/0010"]);
    let after = list_all(s, "g/", Some("g/0002x")).await.expect("list");
    assert_eq!(keys_of(&after), ["g/0003", "g/0010"]);
    let after = list_all(s, "g/", Some("g/9")).await.expect("list");
    assert!(after.is_empty());
    let after = list_all(s, "", Some("g/0010")).await.expect("list");
    assert_eq!(keys_of(&after), ["h/0001"]);
}

async fn delete_many(h: &Harness) {
    let s = &*h.store;
    let keys: Vec<String> = (0..30).map(|i| format!("del/{i:02}")).collect();
    put_many(s, &keys).await;
    let mut gone: Vec<String> = keys.iter().step_by(2).cloned().collect();
    gone.push("del/absent".into());
    s.delete_many(&gone).await.expect("delete");
    let left = list_all(s, "del/", None).await.expect("list");
    let want: Vec<String> = keys.iter().skip(1).step_by(2).cloned().collect();
    assert_eq!(keys_of(&left), want);
    assert!(matches!(
        s.get("del/00", None).await,
        Err(StorageError::NotFound { .. })
    ));
    s.delete_many(&[]).await.expect("nothing to delete");
    s.delete_many(&want).await.expect("delete the rest");
    assert!(list_all(s, "del/", None).await.expect("list").is_empty());
    // Deleting again is not an error.
    s.delete_many(&want).await.expect("idempotent");
}

async fn missing_key(h: &Harness) {
    let s = &*h.store;
    let err = s.get("no/such/key", None).await.err();
    match err {
        Some(StorageError::NotFound { key, .. }) => assert_eq!(key, "no/such/key"),
        other => panic!("want NotFound, got {other:?}"),
    }
    assert_eq!(s.head("no/such/key").await.expect("head"), None);
    // A key under an existing object name.
    put(s, "file", b"v").await;
    assert_eq!(s.head("file/below").await.expect("head"), None);
}

async fn if_none_match(h: &Harness) {
    let s = &*h.store;
    let fenced = PutOptions {
        if_none_match: true,
    };
    s.put_with("fence/0001", Bytes::from_static(b"first").into(), &fenced)
        .await
        .expect("first put");
    let err = s
        .put_with("fence/0001", Bytes::from_static(b"second").into(), &fenced)
        .await
        .err();
    match &err {
        Some(StorageError::AlreadyExists { key, .. }) => assert_eq!(key, "fence/0001"),
        other => panic!("want AlreadyExists, got {other:?}"),
    }
    assert!(err.is_some_and(|e| !e.is_transient()));
    assert_eq!(&get_all(s, "fence/0001").await[..], b"first");
    // A stream body is fenced too.
    let err = s
        .put_with(
            "fence/0001",
            chunked(Bytes::from_static(b"third"), 2),
            &fenced,
        )
        .await
        .err();
    assert!(
        matches!(err, Some(StorageError::AlreadyExists { .. })),
        "{err:?}"
    );
    assert_eq!(&get_all(s, "fence/0001").await[..], b"first");
    // No temporary leftovers are listed.
    let all = list_all(s, "", None).await.expect("list");
    assert_eq!(keys_of(&all), ["fence/0001"]);
}

async fn bad_keys_are_refused(h: &Harness) {
    let s = &*h.store;
    for key in ["", "/abs", "../up", "a/../../b", "a//b", "a/"] {
        let err = s.put(key, Bytes::from_static(b"v").into()).await.err();
        assert!(
            matches!(err, Some(StorageError::InvalidKey { .. })),
            "{key:?}: {err:?}"
        );
        assert!(s.get(key, None).await.is_err());
    }
    let err = s
        .list_page(&ListRequest {
            prefix: "../".into(),
            ..Default::default()
        })
        .await
        .err();
    assert!(
        matches!(err, Some(StorageError::InvalidKey { .. })),
        "{err:?}"
    );
}

async fn retry_store_retries_transient_errors(h: &Harness) {
    let plan = FaultPlan::new();
    let faulty = Arc::new(FaultStore::new(Arc::clone(&h.store), plan.clone()));
    let store = RetryStore::new(faulty, fast_retries(5));

    plan.fail_next(Some(CallKind::Put), 2, Fault::Transient);
    store
        .put("retried", Bytes::from_static(b"v").into())
        .await
        .expect("third attempt succeeds");
    assert_eq!(plan.counts().put, 3);
    assert_eq!(&get_all(&store, "retried").await[..], b"v");

    plan.reset_counts();
    plan.fail_nth(
        Some(CallKind::Get),
        1,
        Fault::Timeout(Duration::from_millis(20)),
    );
    plan.fail_nth(Some(CallKind::Get), 2, Fault::Transient);
    assert_eq!(&get_all(&store, "retried").await[..], b"v");
    assert_eq!(plan.counts().get, 3);

    // "5xx for a while": the calls during the window fail, then one succeeds.
    plan.reset_counts();
    plan.fail_for(None, Duration::from_millis(60), Fault::Transient);
    let slow = RetryStore::new(
        Arc::new(FaultStore::new(Arc::clone(&h.store), plan.clone())),
        RetryPolicy {
            max_attempts: 20,
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(20),
        },
    );
    let listed = list_all(&slow, "", None)
        .await
        .expect("list after the outage");
    assert_eq!(keys_of(&listed), ["retried"]);
    assert!(plan.counts().list >= 2, "{:?}", plan.counts());
}

async fn retry_store_gives_up_on_permanent_errors(h: &Harness) {
    let plan = FaultPlan::new();
    let store = RetryStore::new(
        Arc::new(FaultStore::new(Arc::clone(&h.store), plan.clone())),
        fast_retries(5),
    );
    plan.fail_next(Some(CallKind::Head), 1, Fault::Permanent);
    assert!(store.head("x").await.is_err());
    assert_eq!(plan.counts().head, 1, "a permanent error is not retried");

    // A real NotFound is not retried either.
    assert!(matches!(
        store.get("x", None).await,
        Err(StorageError::NotFound { .. })
    ));
    assert_eq!(plan.counts().get, 1);

    // Nor is AlreadyExists.
    let fenced = PutOptions {
        if_none_match: true,
    };
    store
        .put_with("f", Bytes::from_static(b"1").into(), &fenced)
        .await
        .expect("put");
    assert!(matches!(
        store
            .put_with("f", Bytes::from_static(b"2").into(), &fenced)
            .await,
        Err(StorageError::AlreadyExists { .. })
    ));
    assert_eq!(plan.counts().put, 2);

    // Transient errors past max_attempts come back.
    plan.reset_counts();
    plan.fail_for(None, Duration::from_secs(60), Fault::Transient);
    let err = store.head("x").await.err();
    assert!(
        err.as_ref().is_some_and(StorageError::is_transient),
        "{err:?}"
    );
    assert_eq!(plan.counts().head, 5);
    plan.clear();

    // A stream body cannot be replayed: one attempt only.
    plan.reset_counts();
    plan.fail_next(Some(CallKind::Put), 1, Fault::Transient);
    let err = store
        .put("s", chunked(Bytes::from_static(b"stream"), 2))
        .await
        .err();
    assert!(matches!(err, Some(StorageError::Injected(_))), "{err:?}");
    assert_eq!(plan.counts().put, 1);
}

async fn fault_store_truncates_and_counts(h: &Harness) {
    let plan = FaultPlan::new();
    let store = FaultStore::new(Arc::clone(&h.store), plan.clone());
    assert_eq!(plan.counts().total(), 0);

    plan.truncate_next_put();
    let data = pattern(1_000, 4);
    store
        .put("half", data.clone().into())
        .await
        .expect("reported as success");
    assert_eq!(get_all(&store, "half").await, data.slice(..500));
    // A stream is truncated the same way.
    plan.truncate_next_put();
    store
        .put("half-stream", chunked(data.clone(), 64))
        .await
        .expect("put");
    assert_eq!(
        store
            .head("half-stream")
            .await
            .expect("head")
            .map(|m| m.size),
        Some(500)
    );

    // Added latency.
    plan.set_latency(Duration::from_millis(30));
    let t = std::time::Instant::now();
    store.head("half").await.expect("head");
    assert!(t.elapsed() >= Duration::from_millis(30));
    plan.set_latency(Duration::ZERO);

    // The nth call overall.
    plan.reset_counts();
    plan.fail_nth(None, 2, Fault::Transient);
    store.head("half").await.expect("1st");
    assert!(store.head("half").await.is_err(), "2nd fails");
    store.head("half").await.expect("3rd");

    let c = plan.counts();
    assert_eq!((c.put, c.get, c.head, c.list, c.delete), (0, 0, 3, 0, 0));
    list_all(&store, "", None).await.expect("list");
    store.delete_many(&["half".into()]).await.expect("delete");
    let _ = store.get("half", None).await;
    let c = plan.counts();
    assert_eq!((c.get, c.head, c.list, c.delete), (1, 3, 1, 1));

    // Idle: no calls at all.
    plan.reset_counts();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(plan.counts().total(), 0);
    assert_eq!(plan.injected(), 0);
}

fn fast_retries(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test]
                async fn $name() {
                    let h = super::Harness::local();
                    super::$name(&h).await;
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test]
                async fn $name() {
                    let h = super::Harness::s3(stringify!($name)).await;
                    super::$name(&h).await;
                }
            )*
        }
        mod s3s_fs {
            $(
                #[tokio::test]
                async fn $name() {
                    let h = super::Harness::s3s_fs(stringify!($name)).await;
                    super::$name(&h).await;
                }
            )*
        }
    };
}

conformance!(
    round_trip_empty_and_small,
    round_trip_streamed_small,
    round_trip_multipart_sized,
    ranged_reads,
    listing_paginates_past_1000_and_isolates_prefixes,
    delimiter_listing,
    start_after,
    delete_many,
    missing_key,
    if_none_match,
    bad_keys_are_refused,
    retry_store_retries_transient_errors,
    retry_store_gives_up_on_permanent_errors,
    fault_store_truncates_and_counts,
);

// ---------------------------------------------------------------------------------------------
// S3 only
// ---------------------------------------------------------------------------------------------

mod s3_only {
    use super::*;

    #[tokio::test]
    async fn missing_bucket_says_to_create_it() {
        init_tracing();
        let moto = MotoServer::shared();
        let url = moto.url("no-such-bucket-walship", "p");
        let store = S3Store::from_url(&url, &moto.options())
            .await
            .expect("store");
        let err = walship_storage::check_access(&store).await.err();
        match &err {
            Some(StorageError::NoSuchBucket { bucket }) => {
                assert_eq!(bucket, "no-such-bucket-walship")
            }
            other => panic!("want NoSuchBucket, got {other:?}"),
        }
        let msg = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("create it"), "{msg}");
        let err = store.put("k", Bytes::from_static(b"v").into()).await.err();
        assert!(
            matches!(err, Some(StorageError::NoSuchBucket { .. })),
            "{err:?}"
        );
        let err = store.get("k", None).await.err();
        assert!(
            matches!(err, Some(StorageError::NoSuchBucket { .. })),
            "{err:?}"
        );
        assert!(!StorageError::NoSuchBucket { bucket: "b".into() }.is_transient());
    }

    /// moto accepts any key pair unless started with `INITIAL_NO_AUTH_ACTION_COUNT=0`; then,
    /// with no IAM user defined, it refuses every key with `InvalidAccessKeyId` (403).
    #[tokio::test]
    async fn bad_credentials_are_access_denied() {
        init_tracing();
        let moto = MotoServer::start_with(MotoOptions {
            enforce_auth: true,
            ..Default::default()
        });
        let mut opts = moto.options();
        opts.credentials = Some(walship_storage::StaticCredentials::new(
            "AKIAWALSHIPBOGUS0000",
            "not-a-real-secret",
        ));
        let store = S3Store::from_url(&moto.url("walship-test", "p"), &opts)
            .await
            .expect("store");
        for err in [
            walship_storage::check_access(&store).await.err(),
            store.put("k", Bytes::from_static(b"v").into()).await.err(),
            store.get("k", None).await.err(),
        ] {
            match &err {
                Some(e @ StorageError::AccessDenied { detail, .. }) => {
                    assert!(!e.is_transient());
                    let msg = e.to_string();
                    assert!(msg.contains("AWS_ACCESS_KEY_ID"), "{msg}");
                    assert!(!msg.contains("not-a-real-secret"), "{msg}");
                    assert!(detail.contains("403"), "{detail}");
                }
                other => panic!("want AccessDenied, got {other:?}"),
            }
        }
        // head has no body to carry a code: the 403 alone says it.
        let err = store.head("k").await.err();
        assert!(
            matches!(err, Some(StorageError::AccessDenied { .. })),
            "{err:?}"
        );
    }

    /// Runs one `#[ignore]`d child test of this binary in a process of its own, with `env` and
    /// none of the AWS settings of this one (no profile, no instance metadata), so the SDK's
    /// default credential chain has only what `env` gives it.
    fn run_child(test: &str, env: &[(&str, String)]) {
        let home = tempfile::tempdir().expect("tempdir");
        let exe = std::env::current_exe().expect("current_exe");
        let mut cmd = std::process::Command::new(exe);
        cmd.args([test, "--exact", "--ignored", "--nocapture"]);
        for (k, _) in std::env::vars() {
            if k.starts_with("AWS_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("HOME", home.path())
            .env("AWS_CONFIG_FILE", home.path().join("none"))
            .env("AWS_SHARED_CREDENTIALS_FILE", home.path().join("none"))
            .env("AWS_EC2_METADATA_DISABLED", "true");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run child test");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "child {test} failed:\n{text}");
        assert!(
            text.contains("1 passed"),
            "child {test} ran nothing:\n{text}"
        );
    }

    /// fly.io's way: `AWS_ROLE_ARN` + `AWS_WEB_IDENTITY_TOKEN_FILE`, exchanged with STS
    /// (moto serves it on the same port) for temporary credentials.
    #[test]
    fn web_identity_credentials_from_the_environment() {
        let moto = MotoServer::shared();
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.e30.c2ln").expect("token");
        run_child(
            "s3_only::child_put_with_the_default_chain",
            &[
                ("WALSHIP_CHILD", "web-identity".into()),
                ("WALSHIP_CHILD_ENDPOINT", moto.endpoint()),
                ("WALSHIP_CHILD_BUCKET", moto.bucket().into()),
                (
                    "AWS_ROLE_ARN",
                    "arn:aws:iam::123456789012:role/walship".into(),
                ),
                ("AWS_WEB_IDENTITY_TOKEN_FILE", token.display().to_string()),
                ("AWS_ROLE_SESSION_NAME", "walship-test".into()),
                ("AWS_ENDPOINT_URL_STS", moto.endpoint()),
                ("AWS_REGION", "us-east-1".into()),
            ],
        );
    }

    /// No credentials anywhere: a permanent access error that says where credentials come
    /// from, before any request is sent.
    #[test]
    fn no_credentials_at_all_is_access_denied() {
        let moto = MotoServer::shared();
        run_child(
            "s3_only::child_put_with_the_default_chain",
            &[
                ("WALSHIP_CHILD", "none".into()),
                ("WALSHIP_CHILD_ENDPOINT", moto.endpoint()),
                ("WALSHIP_CHILD_BUCKET", moto.bucket().into()),
            ],
        );
    }

    /// The child half of the two tests above; does nothing when run directly.
    #[tokio::test]
    #[ignore = "run by web_identity_credentials_from_the_environment"]
    async fn child_put_with_the_default_chain() {
        let (Ok(mode), Ok(endpoint), Ok(bucket)) = (
            std::env::var("WALSHIP_CHILD"),
            std::env::var("WALSHIP_CHILD_ENDPOINT"),
            std::env::var("WALSHIP_CHILD_BUCKET"),
        ) else {
            return;
        };
        init_tracing();
        let url: ReplicaUrl = format!(
            "s3://{bucket}/{}?endpoint={endpoint}&force-path-style=true",
            MotoServer::unique_prefix("chain")
        )
        .parse()
        .expect("url");
        let opts = S3Options {
            sdk_max_attempts: 1,
            ..Default::default()
        };
        let store = S3Store::from_url(&url, &opts).await.expect("store");
        let result = store.put("k", Bytes::from_static(b"v").into()).await;
        match mode.as_str() {
            "web-identity" => {
                result.expect("put with web-identity credentials");
                assert_eq!(&get_all(&store, "k").await[..], b"v");
            }
            "none" => match result {
                Err(e @ StorageError::AccessDenied { .. }) => {
                    assert!(!e.is_transient());
                    assert!(e.to_string().contains("credentials"), "{e}");
                }
                other => panic!("want AccessDenied, got {other:?}"),
            },
            other => panic!("unknown mode {other}"),
        }
    }

    #[tokio::test]
    async fn unreachable_endpoint_is_unavailable_and_names_it() {
        init_tracing();
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let url: ReplicaUrl = format!("s3://bucket/p?endpoint={endpoint}&region=us-east-1")
            .parse()
            .expect("url");
        let opts = S3Options {
            credentials: Some(walship_storage::StaticCredentials::new("test", "test")),
            sdk_max_attempts: 1,
            ..Default::default()
        };
        let store = S3Store::from_url(&url, &opts).await.expect("store");
        let t = std::time::Instant::now();
        for err in [
            walship_storage::check_access(&store).await.err(),
            store.put("k", Bytes::from_static(b"v").into()).await.err(),
            store.head("k").await.err(),
        ] {
            match &err {
                Some(e @ StorageError::Unavailable { .. }) => {
                    assert!(e.is_transient());
                    let msg = e.to_string();
                    assert!(msg.contains(&endpoint), "{msg}");
                }
                other => panic!("want Unavailable, got {other:?}"),
            }
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());

        // Through open(): the retry wrapper gives up after its attempts with the same error.
        let store = walship_storage::open(
            &url,
            &StoreOptions {
                s3: opts,
                retry: Some(fast_retries(2)),
                ..Default::default()
            },
        )
        .await
        .expect("open");
        let err = walship_storage::check_access(&*store).await.err();
        assert!(
            matches!(err, Some(StorageError::Unavailable { .. })),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_silent_endpoint_times_out() {
        init_tracing();
        // Accepts connections and never answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming().take(8) {
                held.push(conn);
            }
            std::thread::sleep(Duration::from_secs(30));
        });
        let endpoint = format!("http://127.0.0.1:{port}");
        let url: ReplicaUrl = format!("s3://bucket?endpoint={endpoint}&region=us-east-1")
            .parse()
            .expect("url");
        let opts = S3Options {
            credentials: Some(walship_storage::StaticCredentials::new("test", "test")),
            sdk_max_attempts: 1,
            timeouts: StoreTimeouts {
                read: Duration::from_millis(300),
                ..Default::default()
            },
            ..Default::default()
        };
        let store = S3Store::from_url(&url, &opts).await.expect("store");
        let t = std::time::Instant::now();
        let err = store.head("k").await.err();
        match &err {
            Some(e @ StorageError::Timeout { detail, .. }) => {
                assert!(e.is_transient());
                assert!(
                    detail.contains("timed out") && detail.contains(&endpoint),
                    "{detail}"
                );
            }
            other => panic!("want Timeout, got {other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    async fn sse_of(store: &S3Store, key: &str) -> Option<aws_sdk_s3::types::ServerSideEncryption> {
        store
            .client()
            .head_object()
            .bucket(store.bucket())
            .key(store.object_key(key))
            .send()
            .await
            .expect("head_object")
            .server_side_encryption()
            .cloned()
    }

    #[tokio::test]
    async fn server_side_encryption_is_requested_on_every_put() {
        init_tracing();
        let moto = MotoServer::shared();
        let url = moto.url(moto.bucket(), &MotoServer::unique_prefix("sse"));
        let opts = S3Options {
            sse: Some(ServerSideEncryption::Aes256),
            multipart_threshold: 5 * MIB,
            part_size: 5 * MIB,
            ..moto.options()
        };
        let store = S3Store::from_url(&url, &opts).await.expect("store");
        store
            .put("small", Bytes::from_static(b"v").into())
            .await
            .expect("put");
        store
            .put("big", chunked(pattern(6 * MIB, 5), MIB))
            .await
            .expect("multipart put");
        for key in ["small", "big"] {
            assert_eq!(
                sse_of(&store, key).await,
                Some(aws_sdk_s3::types::ServerSideEncryption::Aes256),
                "{key}"
            );
        }
        let plain = S3Store::from_url(&url, &moto.options())
            .await
            .expect("store");
        plain
            .put("plain", Bytes::from_static(b"v").into())
            .await
            .expect("put");
        assert_ne!(
            sse_of(&plain, "plain").await,
            Some(aws_sdk_s3::types::ServerSideEncryption::AwsKms)
        );

        let kms = S3Store::from_url(
            &url,
            &S3Options {
                sse: Some(ServerSideEncryption::Kms { key_id: None }),
                ..moto.options()
            },
        )
        .await
        .expect("store");
        kms.put("kms", Bytes::from_static(b"v").into())
            .await
            .expect("put");
        assert_eq!(
            sse_of(&kms, "kms").await,
            Some(aws_sdk_s3::types::ServerSideEncryption::AwsKms)
        );
    }

    #[tokio::test]
    async fn multipart_uploads_are_multipart_and_fenced() {
        init_tracing();
        let moto = MotoServer::shared();
        let url = moto.url(moto.bucket(), &MotoServer::unique_prefix("mpu"));
        let opts = S3Options {
            multipart_threshold: 5 * MIB,
            part_size: 5 * MIB,
            ..moto.options()
        };
        let store = S3Store::from_url(&url, &opts).await.expect("store");
        let data = pattern(12 * MIB, 6);
        let fenced = PutOptions {
            if_none_match: true,
        };
        store
            .put_with("big", chunked(data.clone(), MIB), &fenced)
            .await
            .expect("put");
        let head = store
            .client()
            .head_object()
            .bucket(store.bucket())
            .key(store.object_key("big"))
            .send()
            .await
            .expect("head");
        let etag = head.e_tag().unwrap_or_default().to_string();
        assert!(
            etag.trim_matches('"').ends_with("-3"),
            "three parts: {etag}"
        );

        let err = store
            .put_with("big", data.clone().into(), &fenced)
            .await
            .err();
        assert!(
            matches!(err, Some(StorageError::AlreadyExists { .. })),
            "{err:?}"
        );
        assert!(get_all(&store, "big").await == data);
        // The refused upload was aborted.
        let uploads = store
            .client()
            .list_multipart_uploads()
            .bucket(store.bucket())
            .prefix(store.object_key(""))
            .send()
            .await
            .expect("list uploads");
        assert!(uploads.uploads().is_empty(), "{:?}", uploads.uploads());
    }

    #[tokio::test]
    async fn a_failing_body_aborts_the_multipart_upload() {
        init_tracing();
        let moto = MotoServer::shared();
        let url = moto.url(moto.bucket(), &MotoServer::unique_prefix("abort"));
        let opts = S3Options {
            multipart_threshold: 5 * MIB,
            part_size: 5 * MIB,
            ..moto.options()
        };
        let store = S3Store::from_url(&url, &opts).await.expect("store");
        let chunks: Vec<Result<Bytes, StorageError>> = (0..12)
            .map(|i| {
                if i < 11 {
                    Ok(pattern(MIB, i))
                } else {
                    Err(StorageError::Injected("the source went away".into()))
                }
            })
            .collect();
        let body: ByteStream = Box::pin(futures::stream::iter(chunks));
        let err = store.put("broken", PutBody::Stream(body)).await.err();
        assert!(matches!(err, Some(StorageError::Injected(_))), "{err:?}");
        assert_eq!(store.head("broken").await.expect("head"), None);
        let uploads = store
            .client()
            .list_multipart_uploads()
            .bucket(store.bucket())
            .prefix(store.object_key(""))
            .send()
            .await
            .expect("list uploads");
        assert!(uploads.uploads().is_empty(), "{:?}", uploads.uploads());
    }

    #[tokio::test]
    async fn checksum_when_supported_works_against_the_test_server() {
        init_tracing();
        let moto = MotoServer::shared();
        let url = moto.url(moto.bucket(), &MotoServer::unique_prefix("crc"));
        let opts = S3Options {
            checksum: ChecksumMode::WhenSupported,
            multipart_threshold: 5 * MIB,
            part_size: 5 * MIB,
            ..moto.options()
        };
        let store = S3Store::from_url(&url, &opts).await.expect("store");
        let data = pattern(11 * MIB, 7);
        store
            .put("big", chunked(data.clone(), MIB))
            .await
            .expect("put");
        store
            .put("small", Bytes::from_static(b"v").into())
            .await
            .expect("put");
        assert!(get_all(&store, "big").await == data);
        store
            .delete_many(&["big".into(), "small".into()])
            .await
            .expect("delete");
        assert!(list_all(&store, "", None).await.expect("list").is_empty());
    }

    #[tokio::test]
    async fn keys_are_stored_under_the_url_prefix() {
        init_tracing();
        let moto = MotoServer::shared();
        let prefix = MotoServer::unique_prefix("layout");
        let store = S3Store::from_url(&moto.url(moto.bucket(), &prefix), &moto.options())
            .await
            .expect("store");
        store
            .put("gen/1", Bytes::from_static(b"v").into())
            .await
            .expect("put");
        let whole = S3Store::from_url(&moto.url(moto.bucket(), ""), &moto.options())
            .await
            .expect("store");
        let all = list_all(&whole, &format!("{prefix}/"), None)
            .await
            .expect("list");
        assert_eq!(keys_of(&all), [format!("{prefix}/gen/1")]);
    }

    #[tokio::test]
    async fn read_body_stream_errors_are_typed() {
        // A get's body is a stream of Results: collect() surfaces errors, try_collect too.
        init_tracing();
        let moto = MotoServer::shared();
        let url = moto.url(moto.bucket(), &MotoServer::unique_prefix("stream"));
        let store = S3Store::from_url(&url, &moto.options())
            .await
            .expect("store");
        store
            .put("k", pattern(3 * MIB, 8).into())
            .await
            .expect("put");
        let chunks: Vec<Bytes> = store
            .get("k", Some(MIB as u64..2 * MIB as u64))
            .await
            .expect("get")
            .body
            .try_collect()
            .await
            .expect("body");
        let total: usize = chunks.iter().map(Bytes::len).sum();
        assert_eq!(total, MIB);
    }
}

mod open {
    use super::*;

    #[tokio::test]
    async fn open_file_url_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = ReplicaUrl::File {
            path: dir.path().join("r"),
        };
        let store = walship_storage::open(&url, &StoreOptions::default())
            .await
            .expect("open");
        store
            .put("k", Bytes::from_static(b"v").into())
            .await
            .expect("put");
        walship_storage::check_access(&*store)
            .await
            .expect("access");
        assert_eq!(&get_all(&*store, "k").await[..], b"v");
        assert!(store.describe().starts_with("file:///"));
        assert!(dir.path().join("r/k").is_file());
    }

    #[tokio::test]
    async fn open_s3_url_round_trips() {
        let moto = MotoServer::shared();
        let url = moto.url(moto.bucket(), &MotoServer::unique_prefix("open"));
        let opts = StoreOptions {
            s3: moto.options(),
            ..Default::default()
        };
        let store = walship_storage::open(&url, &opts).await.expect("open");
        walship_storage::check_access(&*store)
            .await
            .expect("access");
        store
            .put("k", Bytes::from_static(b"v").into())
            .await
            .expect("put");
        assert_eq!(&get_all(&*store, "k").await[..], b"v");
    }
}
