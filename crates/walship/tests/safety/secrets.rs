//! Secrets never reach an output.
//!
//! Every command runs at trace level (`WALSHIP_LOG=trace`, or `--log-level trace`; once with
//! the SDK's own targets named explicitly) with a distinctive secret in every place one can
//! come from: the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, `WALSHIP_ENCRYPTION_KEY`), walship.toml (`access-key-id`,
//! `secret-access-key`, `session-token`, `api-token`, `encryption-key` through `${VAR}`, a
//! webhook URL with a password and a token), key files, the API token file, the replica URL
//! and the endpoint (credentials there are refused), and STS (web identity: moto issues the
//! session). Everything the commands write — stdout, stderr, the run history, every HTTP
//! answer — is searched for every secret: as written, percent-encoded and base64.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use walship_storage::testkit::MotoServer;

use crate::common::{Replicator, Rng, create_db, tail, walship};
use crate::http_support::{client, insert_rows, listen_addr, strip_ansi};

const ENV_AKID: &str = "AKIAENVQ7X2Z9W1LEAK";
const ENV_SECRET: &str = "envSecretKey/Q7x2+Zp9WvB4nL8kR3tY6uH1jM5cD0aF";
const ENV_SESSION: &str = "IQoJenvSessionTokenR4v8Ks2/Lp+Qm7Xw3Nz9Tb6Yc1Hd5Jf0Gh==";
const CFG_AKID: &str = "AKIACFGH3J5K7L9LEAK";
const CFG_SECRET: &str = "cfgSecretKey/H3j5+K7l9MnB2vC4xZ6aS8dF0gQ1wE3r";
const CFG_SESSION: &str = "IQoJcfgSessionTokenT5y7Ui9/Op+As2Df4Gh6Jk8Lz0Xc==";
const API_TOKEN_FILE: &str = "apiTokenFromFile7f3a9c1e5b8d2f4a6c0e";
const API_TOKEN_CFG: &str = "apiTokenFromConfig2b4d6f8a0c1e3a5c7e9";
const HOOK_PASSWORD: &str = "hookPassw0rdQz3Wx8Lm";
const HOOK_PATH: &str = "hookPathSecret4Kd8Lm2Nq6Vb";
const HOOK_QUERY: &str = "hookQueryToken6Rt1Yu5Io9Pa";
const PROFILE_AKID: &str = "AKIAPROFILEW3E5R7LEAK";
const PROFILE_SECRET: &str = "profileSecretKey/W3e5+R7t9YuI1oP3aS5dF7g";
const PROFILE_SESSION: &str = "IQoJprofileSessionTokenZ1x3C5/v7B+n9M2q4W==";
const URL_AKID: &str = "AKIAURLM2N4B6V8LEAK";
const URL_SECRET: &str = "urlSecretKey/M2n4+B6v8CxZ1aS3dF5gH7j";
const ENDPOINT_PASSWORD: &str = "endpointPassw0rdJ4k6L8z";
const CFG_ENDPOINT_PASSWORD: &str = "cfgEndpointPassw0rdP2o4I6u";
const WEB_IDENTITY_TOKEN: &str =
    "eyJhbGciOiJSUzI1NiJ9.eyJ3ZWJJZGVudGl0eVNlY3JldCI6MX0.c2lnV2ViSWRMZWFrUTc";
/// Every session token moto's STS issues starts with this.
const MOTO_SESSION_PREFIX: &str = "FQoGZXIvYXdzEBYaD";

/// A 32-byte encryption key: its hex and base64 texts.
struct TestKey {
    hex: String,
    base64: String,
}

impl TestKey {
    fn new(seed: u64) -> Self {
        let bytes = Rng::new(seed).bytes(32);
        TestKey {
            hex: bytes.iter().map(|b| format!("{b:02x}")).collect(),
            base64: base64::engine::general_purpose::STANDARD.encode(&bytes),
        }
    }
}

/// Everything the commands under test wrote, and the secrets none of it may hold.
#[derive(Default)]
struct Outputs {
    /// (where from, text).
    items: Vec<(String, String)>,
    /// (name, value).
    secrets: Vec<(String, String)>,
    /// Commands run, to alternate how trace level is asked for.
    runs: usize,
}

impl Outputs {
    fn secret(&mut self, name: &str, value: &str) {
        self.secrets.push((name.to_string(), value.to_string()));
    }

    fn key(&mut self, name: &str, key: &TestKey) {
        self.secret(&format!("{name} (hex)"), &key.hex);
        self.secret(&format!("{name} (base64)"), &key.base64);
    }

    fn add(&mut self, what: impl Into<String>, bytes: &[u8]) {
        self.items
            .push((what.into(), String::from_utf8_lossy(bytes).into_owned()));
    }

    /// Every file under `dir` (the run history).
    fn add_dir(&mut self, what: &str, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                self.add_dir(what, &p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                self.add(format!("{what} {}", p.display()), &bytes);
            }
        }
    }

    /// Runs `walship ARGS` at trace level (alternating `WALSHIP_LOG=trace` and
    /// `--log-level trace`) with `env`, and keeps its stdout and stderr.
    fn run(&mut self, env: &Env, args: &[&str]) -> Output {
        let mut c = env.command();
        if self.runs.is_multiple_of(2) {
            c.env("WALSHIP_LOG", "trace");
        } else {
            c.env_remove("WALSHIP_LOG").args(["--log-level", "trace"]);
        }
        self.runs += 1;
        let out = c.args(args).output().unwrap();
        let what = format!("`walship {}`", args.join(" "));
        self.add(format!("stdout of {what}"), &out.stdout);
        self.add(format!("stderr of {what}"), &out.stderr);
        out
    }

    /// Like [`Outputs::run`], and the command must succeed.
    fn run_ok(&mut self, env: &Env, args: &[&str]) -> Output {
        let out = self.run(env, args);
        assert!(
            out.status.success(),
            "`walship {}` failed:\n{}",
            args.join(" "),
            last_lines(&out.stderr)
        );
        out
    }

    /// Like [`Outputs::run`]; the command must fail and say `needles`.
    fn run_refused(&mut self, env: &Env, args: &[&str], needles: &[&str]) {
        let out = self.run(env, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "`walship {}` should be refused",
            args.join(" ")
        );
        let last = err.lines().last().unwrap_or_default();
        for n in needles {
            assert!(
                last.contains(n),
                "`walship {}`: the error `{last}` lacks `{n}`",
                args.join(" ")
            );
        }
    }

    /// Panics naming every secret found in any output (shown masked, with its context).
    fn assert_clean(&self) {
        let mut found = Vec::new();
        for (name, value) in &self.secrets {
            for (form, text) in forms(value) {
                for (what, out) in &self.items {
                    if let Some(i) = out.find(&text) {
                        let from = floor(out, i.saturating_sub(100));
                        let to = floor(out, (i + text.len() + 100).min(out.len()));
                        let context = out[from..to].replace(&text, &format!("<{name}>"));
                        found.push(format!("{name} ({form}) in {what}: ...{context}..."));
                    }
                }
            }
        }
        assert!(
            found.is_empty(),
            "{} secret(s) leaked:\n{}",
            found.len(),
            found.join("\n")
        );
    }
}

fn floor(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The forms a secret may take in an output.
fn forms(value: &str) -> Vec<(&'static str, String)> {
    let mut out = vec![("as written", value.to_string())];
    let pct: String = value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    if pct != value {
        out.push(("percent-encoded", pct));
    }
    if value.len() >= 8 {
        out.push((
            "base64",
            base64::engine::general_purpose::STANDARD.encode(value),
        ));
    }
    out
}

fn last_lines(bytes: &[u8]) -> String {
    let s = strip_ansi(&String::from_utf8_lossy(bytes));
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Where credentials come from for a run.
enum Creds {
    /// `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`.
    Env,
    /// The default profile of this shared credentials file.
    Profile(PathBuf),
    /// `AWS_ROLE_ARN` + `AWS_WEB_IDENTITY_TOKEN_FILE`, exchanged with moto's STS.
    WebIdentity { token_file: PathBuf, sts: String },
}

/// The environment of the commands under test: no AWS setting of the machine running the
/// test, no profile files, credentials as `creds` says, plus `vars`.
struct Env {
    home: PathBuf,
    creds: Creds,
    vars: Vec<(String, String)>,
}

impl Env {
    fn command(&self) -> Command {
        let mut c = walship();
        // `walship()` sets test credentials; drop them and anything of the machine's.
        let inherited = std::env::vars()
            .map(|(k, _)| k)
            .filter(|k| k.starts_with("AWS_"));
        for k in inherited.chain(["AWS_ACCESS_KEY_ID".into(), "AWS_SECRET_ACCESS_KEY".into()]) {
            c.env_remove(k);
        }
        c.env_remove("RUST_LOG")
            .env_remove("WALSHIP_ENCRYPTION_KEY")
            .env_remove("WALSHIP_API_TOKEN")
            .env("HOME", &self.home)
            .env("AWS_CONFIG_FILE", self.home.join("no-aws-config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                self.home.join("no-aws-credentials"),
            )
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdin(Stdio::null());
        match &self.creds {
            Creds::Env => {
                c.env("AWS_ACCESS_KEY_ID", ENV_AKID)
                    .env("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
                    .env("AWS_SESSION_TOKEN", ENV_SESSION);
            }
            Creds::Profile(file) => {
                c.env("AWS_SHARED_CREDENTIALS_FILE", file);
            }
            Creds::WebIdentity { token_file, sts } => {
                c.env(
                    "AWS_ROLE_ARN",
                    "arn:aws:iam::123456789012:role/walship-secrets",
                )
                .env("AWS_WEB_IDENTITY_TOKEN_FILE", token_file)
                .env("AWS_ROLE_SESSION_NAME", "walship-secrets-test")
                .env("AWS_ENDPOINT_URL_STS", sts);
            }
        }
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c
    }
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

fn s3_url(moto: &MotoServer, tag: &str) -> String {
    moto.url(moto.bucket(), &MotoServer::unique_prefix(tag))
        .to_string()
}

/// Credentials in a replica URL, in its endpoint, or in walship.toml's `endpoint` are refused
/// with one line saying where credentials go, and no output of any command shows them.
#[test]
fn credentials_in_urls_and_endpoints_are_refused_without_echo() {
    let moto = MotoServer::shared();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    create_db(&db);
    insert_rows(&db, 10);
    let db = db.display().to_string();
    let out = dir.path().join("restored.db").display().to_string();
    let env = Env {
        home: dir.path().to_path_buf(),
        creds: Creds::Env,
        vars: Vec::new(),
    };
    let mut o = Outputs::default();
    o.secret("the URL's access key id", URL_AKID);
    o.secret("the URL's secret", URL_SECRET);
    o.secret("the endpoint's password", ENDPOINT_PASSWORD);
    o.secret("walship.toml's endpoint password", CFG_ENDPOINT_PASSWORD);
    o.secret("the webhook's password", HOOK_PASSWORD);
    o.secret("the webhook's path token", HOOK_PATH);
    o.secret("the webhook's query token", HOOK_QUERY);

    let bucket = moto.bucket();
    let port = moto.port();
    let in_url = [
        format!("s3://{URL_AKID}:{URL_SECRET}@{bucket}/x"),
        format!("s3://{URL_AKID}@{bucket}/x"),
        format!(
            "file://{URL_AKID}:{URL_SECRET}@localhost{}",
            dir.path().join("r").display()
        ),
    ];
    let in_endpoint = [
        format!(
            "s3://{bucket}/x?endpoint=http://epuser:{ENDPOINT_PASSWORD}@127.0.0.1:{port}&force-path-style=true"
        ),
        format!(
            "s3://{bucket}/x?region=us-east-1&endpoint=http%3A%2F%2Fepuser%3A{ENDPOINT_PASSWORD}%40127.0.0.1%3A{port}"
        ),
    ];
    for (url, needles) in in_url
        .iter()
        .map(|u| (u, ["credentials", "access-key-id"]))
        .chain(
            in_endpoint
                .iter()
                .map(|u| (u, ["endpoint", "access-key-id"])),
        )
    {
        let url = url.as_str();
        for args in [
            vec!["generations", url],
            vec!["restore", "-o", &out, url],
            vec!["verify", url],
            vec!["dump", "--replica", url],
            vec!["snapshot", &db, url],
            vec!["replicate", &db, url],
        ] {
            o.run_refused(&env, &args, &needles);
        }
    }

    // walship.toml: the endpoint key, the URL's query, and the URL's userinfo.
    let configs = [
        (
            "endpoint",
            format!(
                "url = \"s3://{bucket}/x?force-path-style=true\"\nendpoint = \"http://cfguser:{CFG_ENDPOINT_PASSWORD}@127.0.0.1:{port}\""
            ),
        ),
        (
            "endpoint",
            format!(
                "url = \"s3://{bucket}/x?endpoint=http://cfguser:{CFG_ENDPOINT_PASSWORD}@127.0.0.1:{port}\""
            ),
        ),
        (
            "credentials",
            format!("url = \"s3://{URL_AKID}:{URL_SECRET}@{bucket}/x\""),
        ),
    ];
    for (i, (needle, replica)) in configs.iter().enumerate() {
        let cfg = dir.path().join(format!("walship-{i}.toml"));
        std::fs::write(
            &cfg,
            format!("version = 1\n\n[[db]]\npath = \"app.db\"\n\n[[db.replica]]\n{replica}\n"),
        )
        .unwrap();
        let cfg = cfg.display().to_string();
        let needles = [*needle, "access-key-id", "AWS_SECRET_ACCESS_KEY"];
        o.run_refused(&env, &["config", "check", "--offline", &cfg], &needles);
        o.run_refused(&env, &["config", "check", &cfg], &needles);
        o.run_refused(&env, &["replicate", "--config", &cfg], &needles);
    }

    // A webhook URL that is not one: refused without showing it.
    let hook = format!(
        "htp://hookuser:{HOOK_PASSWORD}@127.0.0.1:9/services/{HOOK_PATH}?token={HOOK_QUERY}"
    );
    let local = format!("file://{}", dir.path().join("replica").display());
    o.run_refused(
        &env,
        &["replicate", &db, &local, "--webhook", &hook],
        &["webhook"],
    );
    o.assert_clean();
}

/// A `walship replicate --config ... --listen 127.0.0.1:0` whose log is kept, and its
/// address once every replica made its first sync.
fn start_replicate(env: &Env, o: &mut Outputs, args: &[&str], log: &Path) -> (Replicator, String) {
    let mut c = env.command();
    // The SDK's own targets named explicitly: capped all the same.
    c.env(
        "WALSHIP_LOG",
        "trace,aws_sigv4=trace,aws_smithy_runtime=trace,aws_config=trace",
    );
    o.runs += 1;
    let f = std::fs::File::create(log).unwrap();
    let child = c
        .args(args)
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    let rep = Replicator {
        child,
        log: log.to_path_buf(),
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let addr = loop {
        let text = strip_ansi(&std::fs::read_to_string(log).unwrap_or_default());
        if let Some(a) = listen_addr(&text)
            && all_synced(&format!("http://{a}"))
        {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "replicate did not come up; log:\n{}",
            tail(log)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    (rep, format!("http://{addr}"))
}

fn status(base: &str) -> serde_json::Value {
    client()
        .get(format!("{base}/api/v1/status"))
        .timeout(Duration::from_secs(10))
        .send()
        .and_then(|r| r.json())
        .unwrap_or_default()
}

fn all_synced(base: &str) -> bool {
    status(base)["databases"]
        .as_array()
        .is_some_and(|d| !d.is_empty() && d.iter().all(|d| d["last_synced"].is_string()))
}

/// GETs (or POSTs) `path` with an optional bearer token and keeps the answer.
fn http(o: &mut Outputs, base: &str, method: &str, path: &str, token: Option<&str>) -> u16 {
    let mut req = match method {
        "POST" => client().post(format!("{base}{path}")),
        _ => client().get(format!("{base}{path}")),
    };
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().unwrap();
    let code = r.status().as_u16();
    let headers = format!("{:?}", r.headers());
    let body = r.bytes().unwrap();
    o.add(
        format!("{method} {path} ({code}) headers"),
        headers.as_bytes(),
    );
    o.add(format!("{method} {path} ({code})"), &body);
    code
}

/// Every endpoint of the status server, for every database it serves.
fn scrape(o: &mut Outputs, base: &str) {
    for path in ["/healthz", "/health", "/metrics", "/api/v1/status", "/"] {
        http(o, base, "GET", path, None);
    }
    let names: Vec<String> = status(base)["databases"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["name"].as_str().map(str::to_string))
        .collect();
    assert!(!names.is_empty(), "no database in the status");
    for name in names {
        for path in ["", "/backups", "/history", "/restore-guide"] {
            http(
                o,
                base,
                "GET",
                &format!("/api/v1/databases/{name}{path}"),
                None,
            );
        }
        // A wrong token, then the right one.
        let snapshot = format!("/api/v1/databases/{name}/snapshot");
        let refused = http(o, base, "POST", &snapshot, Some("not-the-token-0123456789"));
        assert!(matches!(refused, 401 | 403), "a wrong token got {refused}");
        http(o, base, "POST", &snapshot, Some(API_TOKEN_FILE));
    }
}

/// Replication (walship.toml with static keys, the environment's keys, encryption keys, the
/// API token file, a webhook with credentials), its status server, and every other command
/// (with the environment's keys, and a profile's), all at trace level on the S3 server and a
/// local directory: no secret in any output.
#[test]
fn no_secret_reaches_any_output_at_trace_level() {
    let moto = MotoServer::shared();
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let db = dir.path().join("app.db");
    create_db(&db);
    insert_rows(&db, 50);

    let cfg_key = TestKey::new(1);
    let file_key = TestKey::new(2);
    let old_key = TestKey::new(3);
    std::fs::write(path("key.hex"), format!("{}\n", file_key.hex)).unwrap();
    std::fs::write(path("old.b64"), format!("{}\n", old_key.base64)).unwrap();
    std::fs::write(path("api-token"), format!("{API_TOKEN_FILE}\n")).unwrap();

    let mut o = Outputs::default();
    for (name, value) in [
        ("the environment's access key id", ENV_AKID),
        ("the environment's secret", ENV_SECRET),
        ("the environment's session token", ENV_SESSION),
        ("the profile's access key id", PROFILE_AKID),
        ("the profile's secret", PROFILE_SECRET),
        ("the profile's session token", PROFILE_SESSION),
        ("walship.toml's access key id", CFG_AKID),
        ("walship.toml's secret", CFG_SECRET),
        ("walship.toml's session token", CFG_SESSION),
        ("the API token file", API_TOKEN_FILE),
        ("walship.toml's API token", API_TOKEN_CFG),
        ("the webhook's password", HOOK_PASSWORD),
        (
            "the webhook's user and password",
            &format!("hookuser:{HOOK_PASSWORD}"),
        ),
        ("the webhook's path token", HOOK_PATH),
        ("the webhook's query token", HOOK_QUERY),
    ] {
        o.secret(name, value);
    }
    o.key("walship.toml's encryption key", &cfg_key);
    o.key("the encryption key file", &file_key);
    o.key("the decryption key file", &old_key);

    let cfg_url = s3_url(moto, "secrets-cfg");
    let local = dir.path().join("replica");
    let hook = format!(
        "http://hookuser:${{WS_HOOK_PASSWORD}}@127.0.0.1:{}/services/{HOOK_PATH}?token={HOOK_QUERY}",
        closed_port()
    );
    std::fs::write(
        path("walship.toml"),
        format!(
            r#"version = 1
api-token = "${{WS_API_TOKEN}}"
webhook = ["{hook}"]

[[db]]
path = "app.db"
name = "app"

[[db.replica]]
name = "s3"
url = "{cfg_url}"
access-key-id = "${{WS_AKID}}"
secret-access-key = "${{WS_SECRET}}"
session-token = "${{WS_SESSION}}"
encryption-key = "${{WS_KEY}}"

[[db.replica]]
name = "local"
url = "file://{}"
encryption-key = "${{WS_KEY}}"
"#,
            local.display()
        ),
    )
    .unwrap();
    let env = Env {
        home: dir.path().to_path_buf(),
        creds: Creds::Env,
        vars: [
            ("WS_API_TOKEN", API_TOKEN_CFG),
            ("WS_HOOK_PASSWORD", HOOK_PASSWORD),
            ("WS_AKID", CFG_AKID),
            ("WS_SECRET", CFG_SECRET),
            ("WS_SESSION", CFG_SESSION),
            ("WS_KEY", cfg_key.hex.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    };
    let cfg = path("walship.toml");

    // The daemon: both replicas, the status server, alerts after one failed round.
    let log = dir.path().join("replicate.log");
    let (rep, base) = start_replicate(
        &env,
        &mut o,
        &[
            "replicate",
            "--config",
            &cfg,
            "--listen",
            "127.0.0.1:0",
            "--api-token-file",
            &path("api-token"),
            "--sync-interval",
            "200ms",
            "--alert-after-failures",
            "1",
        ],
        &log,
    );
    insert_rows(&db, 50);
    std::thread::sleep(Duration::from_secs(1));
    scrape(&mut o, &base);
    let download = "/api/v1/databases/app-s3/download";
    let code = http(&mut o, &base, "GET", download, Some(API_TOKEN_FILE));
    assert_eq!(code, 200, "download with the API token");

    // The local replica fails for a while: errors, health, alerts to the webhook.
    std::fs::rename(&local, dir.path().join("replica.off")).unwrap();
    std::fs::write(&local, b"not a directory").unwrap();
    insert_rows(&db, 20);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !status(&base)["databases"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|d| d["last_error"].is_string())
    {
        assert!(
            Instant::now() < deadline,
            "no error seen; log:\n{}",
            tail(&log)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The alert goes to a port nothing listens on: its failure is logged.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("webhook")
    {
        assert!(
            Instant::now() < deadline,
            "no webhook delivery attempted; log:\n{}",
            tail(&log)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    scrape(&mut o, &base);
    std::fs::remove_file(&local).unwrap();
    std::fs::rename(dir.path().join("replica.off"), &local).unwrap();
    insert_rows(&db, 5);
    std::thread::sleep(Duration::from_secs(2));
    let st = rep.terminate(Duration::from_secs(60));
    o.add("the replicate log", &std::fs::read(&log).unwrap());
    assert!(st.success(), "replicate failed:\n{}", tail(&log));
    let log_text = strip_ansi(&std::fs::read_to_string(&log).unwrap());
    assert!(log_text.contains(" TRACE "), "no trace line logged");

    // Every other command, with the environment's keys and the key files.
    let key_args = [
        "--encryption-key-file",
        &path("key.hex"),
        "--decryption-key-file",
        &path("old.b64"),
    ];
    let cli_url = s3_url(moto, "secrets-cli");
    let db_s = db.display().to_string();
    let with_keys = |args: &[&str]| -> Vec<String> {
        args.iter()
            .chain(&key_args)
            .map(|s| s.to_string())
            .collect()
    };
    let runs = [
        with_keys(&["snapshot", &db_s, &cli_url]),
        with_keys(&["generations", &cli_url]),
        with_keys(&["generations", "--json", &cli_url]),
        with_keys(&["restore", "-o", &path("r1.db"), &cli_url]),
        with_keys(&["verify", &cli_url]),
        with_keys(&["dump", "--replica", &cli_url, "-o", &path("dump.sql")]),
        vec!["config".into(), "check".into(), cfg.clone()],
        vec![
            "config".into(),
            "check".into(),
            "--offline".into(),
            cfg.clone(),
        ],
        vec!["history".into(), db_s.clone()],
        vec!["history".into(), "--json".into(), db_s.clone()],
    ];
    for args in &runs {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        o.run_ok(&env, &args);
    }
    // Credentials from a profile file.
    std::fs::write(
        path("aws-credentials"),
        format!(
            "[default]\naws_access_key_id = {PROFILE_AKID}\naws_secret_access_key = {PROFILE_SECRET}\naws_session_token = {PROFILE_SESSION}\n"
        ),
    )
    .unwrap();
    let env_profile = Env {
        home: dir.path().to_path_buf(),
        creds: Creds::Profile(dir.path().join("aws-credentials")),
        vars: Vec::new(),
    };
    for args in [
        with_keys(&["generations", &cli_url]),
        with_keys(&["restore", "-o", &path("r4.db"), &cli_url]),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        o.run_ok(&env_profile, &args);
    }
    // The daemon's replicas, read with the key from the environment.
    let env_key = Env {
        vars: vec![("WALSHIP_ENCRYPTION_KEY".into(), cfg_key.hex.clone())],
        ..env
    };
    o.run_ok(&env_key, &["restore", "-o", &path("r2.db"), &cfg_url]);
    o.run_ok(&env_key, &["--log-json", "generations", &cfg_url]);
    let local_url = format!("file://{}", local.display());
    o.run_ok(&env_key, &["restore", "-o", &path("r3.db"), &local_url]);
    let object = find_object(&local).expect("an object in the local replica");
    o.run_ok(
        &env_key,
        &["decrypt", &object.display().to_string(), &path("plain.bin")],
    );
    o.add_dir("the run history", &dir.path().join("app.db-walship"));
    assert!(
        o.items
            .iter()
            .any(|(w, _)| w.starts_with("the run history")),
        "no run history written"
    );
    o.assert_clean();
}

/// A snapshot or segment file in a local replica.
fn find_object(dir: &Path) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_object(&p) {
                return Some(f);
            }
        } else if p.extension().is_some_and(|x| x == "wsnap" || x == "wseg") {
            return Some(p);
        }
    }
    None
}

/// The temporary credentials moto's STS issued so far: (access key id, secret, session
/// token), from its state dump.
fn sts_issued(moto: &MotoServer) -> Vec<(String, String, String)> {
    let v: serde_json::Value = client()
        .get(format!("{}/moto-api/data.json", moto.endpoint()))
        .send()
        .and_then(|r| r.json())
        .unwrap_or_else(|e| panic!("reading moto's state: {e}"));
    v["sts"]["AssumedRole"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            (
                s("access_key_id"),
                s("secret_access_key"),
                s("session_token"),
            )
        })
        .collect()
}

/// fly.io's way (web identity exchanged with STS for temporary credentials): neither the web
/// identity token nor anything STS issued shows in any output, at trace level.
#[test]
fn sts_issued_credentials_never_reach_any_output() {
    // A server of its own: the shared one's state (every other test's objects) makes the
    // state dump this test reads slow and large.
    let own = MotoServer::start();
    let moto = &own;
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let db = dir.path().join("app.db");
    create_db(&db);
    insert_rows(&db, 50);
    std::fs::write(path("web-identity"), WEB_IDENTITY_TOKEN).unwrap();
    let env = Env {
        home: dir.path().to_path_buf(),
        creds: Creds::WebIdentity {
            token_file: dir.path().join("web-identity"),
            sts: moto.endpoint(),
        },
        vars: Vec::new(),
    };
    let before = sts_issued(moto).len();
    let mut o = Outputs::default();
    let url = s3_url(moto, "secrets-sts");
    let db_s = db.display().to_string();
    let log = dir.path().join("replicate.log");
    let (rep, base) = start_replicate(
        &env,
        &mut o,
        &[
            "replicate",
            &db_s,
            &url,
            "--listen",
            "127.0.0.1:0",
            "--sync-interval",
            "200ms",
        ],
        &log,
    );
    insert_rows(&db, 20);
    std::thread::sleep(Duration::from_secs(1));
    scrape(&mut o, &base);
    let st = rep.terminate(Duration::from_secs(60));
    o.add("the replicate log", &std::fs::read(&log).unwrap());
    assert!(st.success(), "replicate failed:\n{}", tail(&log));
    for args in [
        vec!["snapshot", &db_s, &url],
        vec!["generations", &url],
        vec!["restore", "-o", &path("r.db"), &url],
        vec!["verify", &url],
        vec!["dump", "--replica", &url, "-o", &path("dump.sql")],
    ] {
        o.run_ok(&env, &args);
    }
    o.add_dir("the run history", &dir.path().join("app.db-walship"));

    let issued = sts_issued(moto);
    assert!(
        issued.len() > before,
        "moto's STS issued no credentials: the commands did not use web identity"
    );
    o.secret("the web identity token", WEB_IDENTITY_TOKEN);
    o.secret("the prefix of moto's session tokens", MOTO_SESSION_PREFIX);
    for (id, secret, token) in issued {
        o.secret("an STS-issued access key id", &id);
        o.secret("an STS-issued secret", &secret);
        o.secret("an STS-issued session token", &token);
    }
    o.assert_clean();
}
