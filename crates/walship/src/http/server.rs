//! The accept loop: a cap on connections, a timeout on every phase of a connection, and a
//! stop that drops every connection at once. Replication never shares a fate with an HTTP
//! client.
//!
//! - Each connection holds a permit of a semaphore of [`Limits::max_connections`]; one
//!   accepted past the cap is closed at once, so clients hold at most that many descriptors
//!   (and [`connection_cap`] lowers the cap under a small descriptor limit, leaving the rest
//!   to replication).
//! - A connection is closed when its request header is not complete within
//!   `header_timeout` (counted from the connection's start, or from the first byte of a
//!   later request), when it waits for its next request longer than `idle_timeout`, or when
//!   no byte of its response moves for `idle_timeout` (a client that stopped reading). The
//!   decision is [`deadline`], over the connection's [`Phase`].
//! - A handler that has not answered within `request_timeout` is dropped and the client
//!   gets a 503, then the connection is closed.
//! - When the server stops, the accept loop ends and every connection is dropped without
//!   waiting for it.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::http::{HeaderValue, Request, Response, header};
use axum::response::IntoResponse;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::error::ApiError;

/// How many clients the server takes, and how long each may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// A request header must be complete this long after the connection opened, or after
    /// the first byte of a later request on it.
    pub header_timeout: Duration,
    /// A connection waiting for its next request, or whose response has not moved a byte,
    /// is closed after this long.
    pub idle_timeout: Duration,
    /// A handler must answer within this (the snapshot and download endpoints take longest).
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(600),
        }
    }
}

/// Descriptors kept for the process besides its replicators (runtime, logs, listener, the
/// run histories, webhooks).
pub const RESERVED_FDS: u64 = 64;
/// Descriptors kept for each replicator (its database connections, WAL and index files,
/// file watches, overlay runs, store connections and temporary files).
pub const RESERVED_FDS_PER_DATABASE: u64 = 32;
/// The cap never goes below this, however small the limit: a health check must get in.
const MIN_CONNECTIONS: usize = 4;

/// The connection cap: `wanted`, lowered so that HTTP clients can never take the
/// descriptors replication needs under a limit of `nofile` open files (`None`: unknown).
pub fn connection_cap(wanted: usize, nofile: Option<u64>, databases: usize) -> usize {
    let wanted = wanted.max(1);
    let Some(limit) = nofile else {
        return wanted;
    };
    let reserve = RESERVED_FDS + RESERVED_FDS_PER_DATABASE * databases as u64;
    let room = usize::try_from(limit.saturating_sub(reserve)).unwrap_or(usize::MAX);
    wanted.min(room.max(MIN_CONNECTIONS))
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for a request: since the connection opened (`fresh`) or since its previous
    /// response was sent; the next request's first byte came at `header_from`.
    Waiting {
        since: Instant,
        fresh: bool,
        header_from: Option<Instant>,
    },
    /// A handler runs (bounded by the request timeout, not here).
    Handling,
    /// The response is being sent; a byte last moved at `progress`.
    Sending { progress: Instant },
}

/// When a connection in `phase` is closed if nothing changes meanwhile (`None`: not by
/// this rule).
pub fn deadline(phase: Phase, l: &Limits) -> Option<Instant> {
    match phase {
        Phase::Waiting {
            since, fresh: true, ..
        } => Some(since + l.header_timeout),
        Phase::Waiting {
            header_from: Some(t),
            ..
        } => Some(t + l.header_timeout),
        Phase::Waiting { since, .. } => Some(since + l.idle_timeout),
        Phase::Handling => None,
        Phase::Sending { progress } => Some(progress + l.idle_timeout),
    }
}

/// Connection counts, for `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    /// The cap in force.
    pub max: AtomicUsize,
    /// Connections open now.
    pub open: AtomicUsize,
    /// Connections closed at once because the cap was reached.
    pub refused: AtomicU64,
    /// Connections closed by a timeout.
    pub timed_out: AtomicU64,
}

/// Serves `router` on `listener` within `limits` until `stop`.
pub async fn run(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    stats.max.store(limits.max_connections, Ordering::Relaxed);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut refusals = Throttle::default();
    let mut accept_errors = Throttle::default();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => match permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    let conn = Connection {
                        router: router.clone(),
                        limits,
                        stats: stats.clone(),
                        stop: stop.clone(),
                        _permit: permit,
                    };
                    tokio::spawn(conn.serve(stream, peer));
                }
                Err(_) => {
                    drop(stream);
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    if let Some(n) = refusals.tick(Instant::now()) {
                        tracing::warn!(
                            max_connections = limits.max_connections,
                            refused = n,
                            "HTTP connection limit reached; closing new connections at once (replication is not affected)"
                        );
                    }
                }
            },
            Err(e) => {
                // Out of descriptors (or kernel memory): wait for some to come back rather
                // than spin; replication keeps the ones reserved for it.
                if let Some(n) = accept_errors.tick(Instant::now()) {
                    tracing::warn!(error = %e, failures = n, "cannot accept HTTP connections");
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
}

/// At most one report a minute: the first event, then the count since the last report.
#[derive(Debug, Default)]
struct Throttle {
    last: Option<Instant>,
    since: u64,
}

impl Throttle {
    const EVERY: Duration = Duration::from_secs(60);

    fn tick(&mut self, now: Instant) -> Option<u64> {
        self.since += 1;
        if self.last.is_some_and(|t| now < t + Self::EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since))
    }
}

/// One accepted connection and its permit.
struct Connection {
    router: Router,
    limits: Limits,
    stats: Arc<Stats>,
    stop: CancellationToken,
    _permit: OwnedSemaphorePermit,
}

impl Connection {
    async fn serve(self, stream: TcpStream, peer: std::net::SocketAddr) {
        self.stats.open.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::new(Instant::now()));
        let io = TokioIo::new(Watched {
            io: stream,
            activity: activity.clone(),
        });
        let (router, request_timeout) = (self.router.clone(), self.limits.request_timeout);
        let act = activity.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            handle(router.clone(), act.clone(), request_timeout, req)
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(io, svc);
        tokio::pin!(conn);
        loop {
            let due = deadline(activity.phase(), &self.limits);
            let expired = async {
                match due {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                    }
                    break;
                }
                _ = self.stop.cancelled() => break,
                _ = activity.changed.notified() => {}
                _ = expired => {
                    let phase = activity.phase();
                    if deadline(phase, &self.limits).is_some_and(|d| Instant::now() >= d) {
                        self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, ?phase, "closing an HTTP connection that timed out");
                        break;
                    }
                }
            }
        }
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle(
    router: Router,
    activity: Arc<Activity>,
    timeout: Duration,
    req: Request<Incoming>,
) -> Result<Response<Tracked>, Infallible> {
    activity.set(Phase::Handling);
    let resp = match tokio::time::timeout(timeout, router.oneshot(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(never)) => match never {},
        Err(_) => {
            let mut r = ApiError::unavailable(format!(
                "the request did not finish within {}s (--http-request-timeout)",
                timeout.as_secs()
            ))
            .into_response();
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
    };
    activity.set(Phase::Sending {
        progress: Instant::now(),
    });
    Ok(resp.map(|body| Tracked {
        body,
        _sent: Sent(activity),
    }))
}

/// What a connection is doing, shared by its task, its socket and its handlers.
#[derive(Debug)]
struct Activity {
    phase: Mutex<Phase>,
    /// A change that may bring the deadline forward.
    changed: Notify,
}

impl Activity {
    fn new(now: Instant) -> Self {
        Activity {
            phase: Mutex::new(Phase::Waiting {
                since: now,
                fresh: true,
                header_from: None,
            }),
            changed: Notify::new(),
        }
    }

    fn phase(&self) -> Phase {
        self.phase.lock().map_or(Phase::Handling, |p| *p)
    }

    fn set(&self, phase: Phase) {
        if let Ok(mut p) = self.phase.lock() {
            *p = phase;
        }
        self.changed.notify_one();
    }

    /// Bytes came in.
    fn read(&self, now: Instant) {
        let Ok(mut p) = self.phase.lock() else { return };
        match &mut *p {
            Phase::Waiting {
                header_from: h @ None,
                ..
            } => {
                *h = Some(now);
                drop(p);
                self.changed.notify_one();
            }
            Phase::Sending { progress } => *progress = now,
            _ => {}
        }
    }

    /// Bytes went out.
    fn wrote(&self, now: Instant) {
        if let Ok(mut p) = self.phase.lock()
            && let Phase::Sending { progress } = &mut *p
        {
            *progress = now;
        }
    }
}

/// The socket, reporting every byte that moves.
struct Watched {
    io: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.read(Instant::now());
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.wrote(Instant::now());
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.wrote(Instant::now());
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Marks the response sent when hyper drops its body (all of it written, or the connection
/// gone): the connection then waits for its next request.
#[derive(Debug)]
struct Sent(Arc<Activity>);

impl Drop for Sent {
    fn drop(&mut self) {
        self.0.set(Phase::Waiting {
            since: Instant::now(),
            fresh: false,
            header_from: None,
        });
    }
}

/// A response body that reports when it is done with.
#[derive(Debug)]
struct Tracked {
    body: Body,
    _sent: Sent,
}

impl HttpBody for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections: 64,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(600),
        }
    }

    #[test]
    fn the_cap_leaves_descriptors_for_replication() {
        // Plenty of descriptors: the configured cap.
        assert_eq!(connection_cap(64, Some(1 << 20), 1), 64);
        assert_eq!(connection_cap(64, None, 1), 64);
        // 256 descriptors, one database: 96 kept, 160 left; the cap fits.
        assert_eq!(connection_cap(64, Some(256), 1), 64);
        assert_eq!(connection_cap(500, Some(256), 1), 160);
        // Fewer: the cap shrinks, but a health check still gets in.
        assert_eq!(connection_cap(64, Some(128), 1), 32);
        assert_eq!(connection_cap(64, Some(64), 4), MIN_CONNECTIONS);
        assert_eq!(connection_cap(2, Some(64), 4), 2);
        assert_eq!(connection_cap(0, None, 1), 1);
    }

    #[test]
    fn a_fresh_connection_has_the_header_timeout_from_its_start() {
        let t0 = Instant::now();
        let l = limits();
        let silent = Phase::Waiting {
            since: t0,
            fresh: true,
            header_from: None,
        };
        assert_eq!(deadline(silent, &l), Some(t0 + l.header_timeout));
        // A byte now and then does not extend it.
        let trickling = Phase::Waiting {
            since: t0,
            fresh: true,
            header_from: Some(t0 + Duration::from_secs(9)),
        };
        assert_eq!(deadline(trickling, &l), Some(t0 + l.header_timeout));
    }

    #[test]
    fn a_kept_alive_connection_waits_the_idle_timeout_then_the_header_timeout() {
        let t0 = Instant::now();
        let l = limits();
        let idle = Phase::Waiting {
            since: t0,
            fresh: false,
            header_from: None,
        };
        assert_eq!(deadline(idle, &l), Some(t0 + l.idle_timeout));
        let started = t0 + Duration::from_secs(30);
        let reading = Phase::Waiting {
            since: t0,
            fresh: false,
            header_from: Some(started),
        };
        assert_eq!(deadline(reading, &l), Some(started + l.header_timeout));
    }

    #[test]
    fn a_handler_is_bounded_by_the_request_timeout_and_a_response_by_its_progress() {
        let t0 = Instant::now();
        let l = limits();
        assert_eq!(deadline(Phase::Handling, &l), None);
        assert_eq!(
            deadline(Phase::Sending { progress: t0 }, &l),
            Some(t0 + l.idle_timeout)
        );
    }

    #[test]
    fn the_first_byte_after_a_response_starts_the_header_clock() {
        let t0 = Instant::now();
        let a = Activity::new(t0);
        a.set(Phase::Sending { progress: t0 });
        let later = t0 + Duration::from_secs(5);
        a.wrote(later);
        assert_eq!(a.phase(), Phase::Sending { progress: later });
        a.set(Phase::Waiting {
            since: later,
            fresh: false,
            header_from: None,
        });
        let byte = later + Duration::from_secs(1);
        a.read(byte);
        a.read(byte + Duration::from_secs(1));
        assert_eq!(
            a.phase(),
            Phase::Waiting {
                since: later,
                fresh: false,
                header_from: Some(byte),
            }
        );
    }

    #[test]
    fn refusals_are_reported_once_a_minute_with_a_count() {
        let t0 = Instant::now();
        let mut t = Throttle::default();
        assert_eq!(t.tick(t0), Some(1));
        for i in 1..100 {
            assert_eq!(t.tick(t0 + Duration::from_millis(i * 100)), None);
        }
        assert_eq!(t.tick(t0 + Duration::from_secs(61)), Some(100));
    }

    /// Silent, half-sent and idle connections are closed on time; past the cap, new
    /// connections are closed at once; a stop drops the rest.
    #[tokio::test]
    async fn idle_clients_are_timed_out_and_capped() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let limits = Limits {
            max_connections: 3,
            header_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(600),
            request_timeout: Duration::from_secs(5),
        };
        let router = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let stats = Arc::new(Stats::default());
        let stop = CancellationToken::new();
        let server = tokio::spawn(run(listener, router, limits, stats.clone(), stop.clone()));
        let connect = || async {
            TcpStream::connect(addr)
                .await
                .unwrap_or_else(|e| panic!("{e}"))
        };
        // Reads until the server closes (true) or `within` passes (false).
        async fn closed(s: &mut TcpStream, within: Duration) -> bool {
            let mut buf = [0u8; 1024];
            let t = Instant::now() + within;
            loop {
                match tokio::time::timeout_at(t, s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return true,
                    Ok(Ok(_)) => {}
                    Err(_) => return false,
                }
            }
        }
        let mut silent = connect().await;
        let mut partial = connect().await;
        partial
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut kept = connect().await;
        kept.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut buf = [0u8; 256];
        let n = kept.read(&mut buf).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        // The cap: a fourth connection is closed at once.
        let mut over = connect().await;
        assert!(closed(&mut over, Duration::from_millis(200)).await);
        assert!(stats.refused.load(Ordering::Relaxed) >= 1);
        // The silent and the half-sent ones go after the header timeout, the kept-alive one
        // after the idle timeout.
        assert!(!closed(&mut kept, Duration::from_millis(350)).await);
        assert!(closed(&mut silent, Duration::from_secs(2)).await);
        assert!(closed(&mut partial, Duration::from_secs(2)).await);
        assert!(closed(&mut kept, Duration::from_secs(2)).await);
        // Free again: served.
        let mut again = connect().await;
        again
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let n = again.read(&mut buf).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        // A stop drops it at once, long before its idle timeout.
        stop.cancel();
        assert!(closed(&mut again, Duration::from_millis(300)).await);
        server.await.unwrap_or_else(|e| panic!("{e}"));
    }
}
