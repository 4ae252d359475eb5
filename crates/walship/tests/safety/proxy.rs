//! A TCP proxy on 127.0.0.1 in front of the local S3 server, for the tests of a store that
//! misbehaves on the wire: it can stop forwarding while it keeps every connection open (a
//! black hole: what a store whose packets are dropped looks like to a client, connections
//! accepted but nothing answered), refuse the store (every connection closed at once: a
//! store that is down), and it can rename the root element of
//! `CompleteMultipartUpload` replies (what moto 5.2.1 did: it answered
//! `CompleteMultipartUploadResponse` where AWS answers `CompleteMultipartUploadResult`; the
//! installed moto is fixed, so the proxy plays the old one).
//!
//! Threads, one per direction of each connection; everything stops when the proxy is
//! dropped (its sockets are shut down, its threads end).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

const FORWARD: u8 = 0;
const BLACK_HOLE: u8 = 1;
const REFUSE: u8 = 2;

/// The root element AWS names its `CompleteMultipartUpload` reply with, and the name the
/// proxy gives it instead (the same length, so the reply's `Content-Length` still holds;
/// any name but the expected one makes the SDK refuse the reply the same way).
const ROOT: &[u8] = b"CompleteMultipartUploadResult";
const OTHER_ROOT: &[u8] = b"CompleteMultipartUploadAnswer";

struct Shared {
    mode: AtomicU8,
    rename_root: AtomicBool,
    refuse_multipart: AtomicBool,
    stopped: AtomicBool,
    sockets: Mutex<Vec<TcpStream>>,
}

/// The proxy; dropping it stops it.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            mode: AtomicU8::new(FORWARD),
            rename_root: AtomicBool::new(false),
            refuse_multipart: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            sockets: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.stopped.load(Ordering::Acquire) {
                    break;
                }
                let Ok(client) = client else { continue };
                if s.mode.load(Ordering::Acquire) == REFUSE {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut sockets = s.sockets.lock().unwrap();
                    sockets.push(client.try_clone().unwrap());
                    sockets.push(server.try_clone().unwrap());
                }
                let (c2, c3) = (client.try_clone().unwrap(), client.try_clone().unwrap());
                let s2 = server.try_clone().unwrap();
                let up = s.clone();
                std::thread::spawn(move || pump(client, s2, Some(c3), &up));
                let down = s.clone();
                std::thread::spawn(move || pump(server, c2, None, &down));
            }
        });
        Proxy { addr, shared }
    }

    /// The port to connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops forwarding: bytes either way are dropped, connections stay open and new ones
    /// are accepted.
    pub fn black_hole(&self) {
        self.shared.mode.store(BLACK_HOLE, Ordering::Release);
    }

    /// Closes every connection and, until [`Proxy::forward`], every new one at once.
    pub fn refuse(&self) {
        self.shared.mode.store(REFUSE, Ordering::Release);
        for s in self.shared.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Forwards again.
    pub fn forward(&self) {
        self.shared.mode.store(FORWARD, Ordering::Release);
    }

    /// Answers every request that starts a multipart upload with HTTP 503 (on) or forwards
    /// them (off).
    pub fn refuse_multipart_uploads(&self, on: bool) {
        self.shared.refuse_multipart.store(on, Ordering::Release);
    }

    /// Renames the root element of `CompleteMultipartUpload` replies (on) or not (off).
    pub fn rename_complete_multipart_root(&self, on: bool) {
        self.shared.rename_root.store(on, Ordering::Release);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::Release);
        for s in self.shared.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        // Wake the accept loop so it sees the stop.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Copies `from` into `to` until either end closes. On the client-to-server way, `client`
/// is the client's socket (for the proxy's own answers); on the way back it is `None`.
fn pump(mut from: TcpStream, mut to: TcpStream, client: Option<TcpStream>, shared: &Shared) {
    let reply = client.is_none();
    let mut buf = vec![0u8; 64 * 1024];
    // Bytes held back because they may be the start of a root element split across reads,
    // sent after a short quiet spell, so the end of a reply never waits for more.
    let mut held: Vec<u8> = Vec::new();
    let _ = from.set_read_timeout(Some(std::time::Duration::from_millis(50)));
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if shared.stopped.load(Ordering::Acquire) {
                    break;
                }
                if !held.is_empty() && to.write_all(&std::mem::take(&mut held)).is_err() {
                    break;
                }
                continue;
            }
            Err(_) => break,
        };
        if shared.stopped.load(Ordering::Acquire) {
            break;
        }
        if shared.mode.load(Ordering::Acquire) == BLACK_HOLE {
            held.clear();
            continue;
        }
        if let Some(c) = &client
            && shared.refuse_multipart.load(Ordering::Acquire)
            && starts_multipart_upload(&buf[..n])
        {
            let mut c = c;
            let _ = c.write_all(UNAVAILABLE.as_bytes());
            let _ = c.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
        let mut out = std::mem::take(&mut held);
        out.extend_from_slice(&buf[..n]);
        if reply && shared.rename_root.load(Ordering::Acquire) {
            replace_all(&mut out, ROOT, OTHER_ROOT);
            let keep = partial_suffix(&out, ROOT);
            held = out.split_off(out.len() - keep);
        }
        if to.write_all(&out).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// What the proxy answers a refused request with.
const UNAVAILABLE: &str = "HTTP/1.1 503 Service Unavailable\r\n\
    Content-Type: application/xml\r\n\
    Content-Length: 91\r\n\
    Connection: close\r\n\r\n\
    <Error><Code>ServiceUnavailable</Code><Message>refused by the test proxy</Message></Error>\n";

/// True if `request` (the start of one) is a `POST ...?uploads` (CreateMultipartUpload).
fn starts_multipart_upload(request: &[u8]) -> bool {
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    line.starts_with(b"POST ") && line.windows(8).any(|w| w == b"?uploads")
}

fn replace_all(data: &mut [u8], from: &[u8], to: &[u8]) {
    let mut i = 0;
    while i + from.len() <= data.len() {
        if &data[i..i + from.len()] == from {
            data[i..i + from.len()].copy_from_slice(to);
            i += from.len();
        } else {
            i += 1;
        }
    }
}

/// The length of the longest proper prefix of `pattern` that `data` ends with.
fn partial_suffix(data: &[u8], pattern: &[u8]) -> usize {
    (1..pattern.len())
        .rev()
        .find(|&k| k <= data.len() && data.ends_with(&pattern[..k]))
        .unwrap_or(0)
}
