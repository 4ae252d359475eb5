//! Test support (feature `testkit`): [`MotoServer`], a real S3-protocol server on 127.0.0.1.
//!
//! It runs `moto_server` (Python's moto, installed by `scripts/test-deps.sh` into
//! `target/test-venv`), found through `WALSHIP_MOTO_SERVER`, then
//! `<workspace>/target/test-venv/bin/moto_server`, then `PATH`. The server listens on
//! 127.0.0.1 only, on a free port, and sets nothing global: tests pass
//! [`MotoServer::options`] (static `test`/`test` credentials) to the store.
//!
//! The server runs under a small `sh` wrapper, in a process group of its own, that kills it
//! when its standard input closes — when the server is dropped, or when the test process
//! exits in any way (so a server kept in a `static` by [`MotoServer::shared`] does not
//! outlive its test binary). Drop also kills the group by its id if the wrapper lingers.
//!
//! ```no_run
//! # async fn demo() -> Result<(), walship_storage::StorageError> {
//! use walship_storage::{ObjectStore, S3Store, testkit::MotoServer};
//! let moto = MotoServer::shared();
//! let url = moto.url(moto.bucket(), &MotoServer::unique_prefix("demo"));
//! let store = S3Store::from_url(&url, &moto.options()).await?;
//! store.put("k", bytes::Bytes::from_static(b"v").into()).await?;
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::{ReplicaUrl, S3Options, StaticCredentials};

/// The bucket [`MotoServer::start`] creates.
pub const DEFAULT_BUCKET: &str = "walship-test";

/// How long a starting server may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Kills the server when stdin closes; `$0` is the server, `$@` its arguments.
const WRAPPER: &str = r#""$0" "$@" </dev/null &
pid=$!
read -r _ || true
kill "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
exit 0
"#;

/// How to start a [`MotoServer`].
#[derive(Debug, Clone, Default)]
pub struct MotoOptions {
    /// Bucket to create; `None` = [`DEFAULT_BUCKET`]. Ignored with `enforce_auth`.
    pub bucket: Option<String>,
    /// Check credentials (moto's `INITIAL_NO_AUTH_ACTION_COUNT=0`): with no IAM user
    /// defined, every request fails with `InvalidAccessKeyId`. For access-denied tests.
    pub enforce_auth: bool,
}

/// A `moto_server` child process on 127.0.0.1.
#[derive(Debug)]
pub struct MotoServer {
    child: Child,
    stdin: Option<ChildStdin>,
    port: u16,
    bucket: String,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl MotoServer {
    /// Starts a server and creates [`DEFAULT_BUCKET`]. Panics (saying to run
    /// `scripts/test-deps.sh`) if moto is not installed, or if it does not come up.
    pub fn start() -> Self {
        Self::start_with(MotoOptions::default())
    }

    /// Starts a server as `opts` says.
    pub fn start_with(opts: MotoOptions) -> Self {
        let exe = find_moto_server().unwrap_or_else(|| {
            panic!(
                "moto_server not found (looked at $WALSHIP_MOTO_SERVER, {}, and PATH): \
                 run scripts/test-deps.sh from the workspace root",
                venv_moto_server().display()
            )
        });
        let bucket = opts
            .bucket
            .clone()
            .unwrap_or_else(|| DEFAULT_BUCKET.to_string());
        let mut last_error = String::new();
        // A free port can be taken between finding and binding it: try a few.
        for _ in 0..3 {
            match Self::spawn(&exe, &bucket, opts.enforce_auth) {
                Ok(server) => {
                    if !opts.enforce_auth {
                        server.create_bucket(&bucket);
                    }
                    return server;
                }
                Err(e) => last_error = e,
            }
        }
        panic!(
            "moto_server ({}) did not start: {last_error}",
            exe.display()
        );
    }

    /// One server per test binary, started on first use and never dropped: the wrapper
    /// kills it when the test process exits.
    pub fn shared() -> &'static MotoServer {
        static SHARED: OnceLock<MotoServer> = OnceLock::new();
        SHARED.get_or_init(MotoServer::start)
    }

    fn spawn(exe: &Path, bucket: &str, enforce_auth: bool) -> Result<Self, String> {
        let port = free_port().map_err(|e| format!("finding a free port: {e}"))?;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(WRAPPER)
            .arg(exe)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_remove("INITIAL_NO_AUTH_ACTION_COUNT")
            .env("PYTHONUNBUFFERED", "1");
        if enforce_auth {
            cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", "0");
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawning sh for {}: {e}", exe.display()))?;
        let stdin = child.stdin.take();
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(pipe) = child.stderr.take() {
            let sink = Arc::clone(&stderr);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut buf = sink.lock().unwrap_or_else(|e| e.into_inner());
                    if buf.len() == 40 {
                        buf.pop_front();
                    }
                    buf.push_back(line);
                }
            });
        }
        let mut server = MotoServer {
            child,
            stdin,
            port,
            bucket: bucket.to_string(),
            stderr,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!(
                    "it exited with {status} before answering; its last output:\n{}",
                    server.stderr_tail()
                ));
            }
            if http(port, "GET", "/").is_ok() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                let tail = server.stderr_tail();
                server.stop();
                return Err(format!(
                    "no answer on 127.0.0.1:{port} within {START_TIMEOUT:?}; its last output:\n{tail}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines the server wrote to stderr, for failure messages.
    pub fn stderr_tail(&self) -> String {
        let buf = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        buf.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The bucket created at start.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Creates a bucket (unauthenticated, as moto allows); panics if moto refuses.
    pub fn create_bucket(&self, name: &str) {
        match http(self.port, "PUT", &format!("/{name}")) {
            Ok(200) => {}
            Ok(status) => panic!(
                "moto answered HTTP {status} to creating bucket `{name}`:\n{}",
                self.stderr_tail()
            ),
            Err(e) => panic!("creating bucket `{name}` on moto: {e}"),
        }
    }

    /// A replica URL for `bucket` and `prefix` on this server (path style, `us-east-1`).
    pub fn url(&self, bucket: &str, prefix: &str) -> ReplicaUrl {
        ReplicaUrl::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".to_string()),
            force_path_style: Some(true),
        }
    }

    /// Store options for this server: static `test`/`test` credentials, endpoint, region,
    /// path style, and one SDK attempt per request (tests see errors at once).
    pub fn options(&self) -> S3Options {
        S3Options {
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".to_string()),
            force_path_style: Some(true),
            credentials: Some(StaticCredentials::new("test", "test")),
            sdk_max_attempts: 1,
            ..Default::default()
        }
    }

    /// A prefix no other test in this process (or a concurrent one) uses: `tag-<n>-<random>`.
    pub fn unique_prefix(tag: &str) -> String {
        static N: AtomicU64 = AtomicU64::new(0);
        format!(
            "{tag}-{}-{:08x}",
            N.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        )
    }

    fn stop(&mut self) {
        // Closing stdin makes the wrapper kill the server and exit.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The wrapper leads its own process group: kill the group by its id.
        let pgid = self.child.id();
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn venv_moto_server() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = manifest.parent().and_then(Path::parent).unwrap_or(manifest);
    workspace.join("target/test-venv/bin/moto_server")
}

fn find_moto_server() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WALSHIP_MOTO_SERVER") {
        return Some(PathBuf::from(p));
    }
    let venv = venv_moto_server();
    if venv.is_file() {
        return Some(venv);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("moto_server"))
        .find(|p| p.is_file())
}

fn free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Sends a bodiless HTTP/1.1 request to 127.0.0.1:`port` and returns the status code.
fn http(port: u16, method: &str, path: &str) -> std::io::Result<u16> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\
         Connection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    let text = String::from_utf8_lossy(&head);
    text.get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {text:?}")))
}
