//! "Nothing to restore" only for a replica that holds nothing (issue 34, item 5).
//!
//! A replica whose objects all fail to restore is an error under every flag, so
//! `restore --if-replica-exists` (and fly/entrypoint.sh behind it) never boots an empty
//! database over a broken backup; read-only commands never create a replica directory; and
//! a `file://` URL whose parent directory is missing is refused, so a typo never passes for
//! an empty replica.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use walship_storage::testkit::MotoServer;
use walship_storage::{ObjectStore, S3Store};

use crate::common::{Replicator, create_db, tail, walship, walship_bin};

fn run(args: &[&str]) -> Output {
    walship().args(args).output().unwrap()
}

/// Runs a command that should stop by itself (a `replicate` that did not refuse to start
/// is stopped after a minute, by its PID, and counts as having accepted).
fn run_bounded(args: &[String], work: &Path) -> Output {
    let err_path = work.join("bounded.stderr");
    let mut child = walship()
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status: if status.success() || status.code().is_none() {
            // Killed by us: it was running, so it accepted the URL.
            std::process::ExitStatus::default()
        } else {
            status
        },
        stdout: Vec::new(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The error line of a failed command (the last line of its stderr).
fn error_line(o: &Output) -> String {
    stderr(o).lines().last().unwrap_or_default().to_string()
}

/// Objects of a replica, read and written behind walship's back.
enum Raw {
    Dir(PathBuf),
    /// The bucket through walship's own S3 client (moto's test credentials).
    S3(Arc<dyn ObjectStore>, tokio::runtime::Runtime),
}

impl Raw {
    fn keys(&self) -> Vec<String> {
        match self {
            Raw::Dir(root) => {
                let mut out = Vec::new();
                let mut stack = vec![root.clone()];
                while let Some(d) = stack.pop() {
                    for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                        if e.file_type().unwrap().is_dir() {
                            stack.push(e.path());
                        } else {
                            let rel = e.path().strip_prefix(root).unwrap().to_owned();
                            out.push(rel.to_string_lossy().into_owned());
                        }
                    }
                }
                out.sort();
                out
            }
            Raw::S3(store, rt) => rt
                .block_on(walship_storage::list_all(store.as_ref(), "", None))
                .unwrap()
                .into_iter()
                .map(|o| o.key)
                .collect(),
        }
    }

    fn get(&self, key: &str) -> Vec<u8> {
        match self {
            Raw::Dir(root) => std::fs::read(root.join(key)).unwrap(),
            Raw::S3(store, rt) => rt
                .block_on(async { store.get(key, None).await?.collect().await })
                .unwrap()
                .to_vec(),
        }
    }

    fn put(&self, key: &str, body: Vec<u8>) {
        match self {
            Raw::Dir(root) => {
                let p = root.join(key);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, body).unwrap();
            }
            Raw::S3(store, rt) => rt
                .block_on(store.put(key, bytes::Bytes::from(body).into()))
                .unwrap(),
        }
    }
}

/// A replica for one test: its URL and raw access to its objects.
fn replica(backend: &str, work: &Path, tag: &str) -> (String, Raw) {
    match backend {
        "file" => {
            let dir = work.join(tag);
            (format!("file://{}", dir.display()), Raw::Dir(dir))
        }
        _ => {
            let moto = MotoServer::shared();
            let url = moto.url(moto.bucket(), &MotoServer::unique_prefix(tag));
            let rt = tokio::runtime::Runtime::new().unwrap();
            let store: Arc<dyn ObjectStore> = Arc::new(
                rt.block_on(S3Store::from_url(&url, &moto.options()))
                    .unwrap(),
            );
            (url.to_string(), Raw::S3(store, rt))
        }
    }
}

/// Replicates a small database into `url` and adds a one-shot snapshot: two generations.
fn fill(work: &Path, url: &str) {
    let db = work.join("app.db");
    create_db(&db);
    let log = work.join("rep.log");
    let rep = Replicator::start(&db, url, &[], &log);
    let conn = rusqlite::Connection::open(&db).unwrap();
    for i in 0..50 {
        conn.execute("INSERT INTO t(id, v) VALUES (?1, x'00')", [i])
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(1500));
    let st = rep.terminate(Duration::from_secs(60));
    assert!(st.success(), "replicate exited {st}:\n{}", tail(&log));
    let o = walship()
        .arg("snapshot")
        .arg(&db)
        .arg(url)
        .output()
        .unwrap();
    assert!(o.status.success(), "snapshot: {}", stderr(&o));
}

/// `sh fly/entrypoint.sh` booting an app that leaves a marker, against `url`.
fn boot(work: &Path, url: &str) -> (Output, PathBuf, PathBuf) {
    let entrypoint = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fly/entrypoint.sh");
    let db = work.join("machine/app.db");
    let marker = work.join("app-started");
    let mut c = Command::new("sh");
    // The same environment `walship()` gives the binary (test credentials for moto).
    for (k, v) in walship().get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    let o = c
        .arg(entrypoint)
        .arg("touch")
        .arg(&marker)
        .env("WALSHIP_BIN", walship_bin())
        .env("WALSHIP_DB", &db)
        .env("WALSHIP_REPLICA_URL", url)
        .output()
        .unwrap();
    (o, db, marker)
}

/// Every snapshot corrupt (and, before that, a target time before every object): the
/// replica is not absent, so every form of restore fails with one line naming what it
/// tried, and the entrypoint does not start the app on an empty database.
fn broken_replica_is_an_error_under_every_flag(backend: &str) {
    let work = tempfile::tempdir().unwrap();
    let (url, raw) = replica(backend, work.path(), "broken");
    fill(work.path(), &url);
    let out = work.path().join("out.db");
    let out_s = out.to_str().unwrap();

    // Objects exist, none at or before the time asked: not absent.
    let o = run(&[
        "restore",
        "--if-replica-exists",
        "--timestamp",
        "2001-01-01T00:00:00Z",
        "-o",
        out_s,
        &url,
    ]);
    assert!(
        !o.status.success(),
        "a replica with objects, none before the target, passed for absent: {}",
        stderr(&o)
    );
    assert!(!out.exists());

    let snapshots: Vec<String> = raw
        .keys()
        .into_iter()
        .filter(|k| k.ends_with(".wsnap"))
        .collect();
    assert_eq!(snapshots.len(), 2, "{:?}", raw.keys());
    for key in &snapshots {
        let mut body = raw.get(key);
        let mid = body.len() / 2;
        body[mid] ^= 0x5a;
        raw.put(key, body);
    }

    for flags in [
        &[][..],
        &["--if-replica-exists"][..],
        &["--if-db-not-exists", "--if-replica-exists"][..],
    ] {
        let mut args = vec!["restore"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["-o", out_s, &url]);
        let o = run(&args);
        let line = error_line(&o);
        assert!(
            !o.status.success(),
            "restore {flags:?} of a replica whose every snapshot is corrupt exited 0: {}",
            stderr(&o)
        );
        assert!(line.starts_with("error: "), "{flags:?}: {}", stderr(&o));
        for key in &snapshots {
            let name = key.rsplit('/').next().unwrap();
            assert!(
                line.contains(name),
                "{flags:?}: the error does not name {key}: {line}"
            );
        }
        assert!(
            line.contains("corrupt"),
            "{flags:?}: the error does not say why: {line}"
        );
        assert!(!out.exists(), "{flags:?} wrote {out_s}");
    }

    let (o, db, marker) = boot(work.path(), &url);
    assert!(
        !o.status.success(),
        "the entrypoint booted over a broken replica: {}",
        stderr(&o)
    );
    assert!(
        !marker.exists(),
        "the app started although the restore failed"
    );
    assert!(!db.exists(), "the entrypoint created an empty database");
}

#[test]
fn a_replica_whose_objects_all_fail_is_an_error_under_every_flag_file() {
    broken_replica_is_an_error_under_every_flag("file");
}

#[test]
fn a_replica_whose_objects_all_fail_is_an_error_under_every_flag_s3() {
    broken_replica_is_an_error_under_every_flag("s3");
}

/// Only a replica with no objects (a lease alone holds no data) is absent.
fn empty_replica_is_absent(backend: &str) {
    let work = tempfile::tempdir().unwrap();
    let (url, raw) = replica(backend, work.path(), "empty");
    if let Raw::Dir(d) = &raw {
        std::fs::create_dir(d).unwrap();
    }
    let out = work.path().join("out.db");
    let out_s = out.to_str().unwrap();
    for lease_only in [false, true] {
        if lease_only {
            // What a replicator that never finished its first snapshot leaves behind.
            raw.put("lease/fffffffffffffffe", b"{}".to_vec());
        }
        let o = run(&["restore", "--if-replica-exists", "-o", out_s, &url]);
        assert!(
            o.status.success(),
            "an empty replica (lease only: {lease_only}) is absent: {}",
            stderr(&o)
        );
        assert!(!out.exists());
        let o = run(&["restore", "-o", out_s, &url]);
        assert!(!o.status.success());
        assert!(
            error_line(&o).contains("holds no objects"),
            "{}",
            stderr(&o)
        );
    }
}

#[test]
fn only_a_replica_without_objects_is_absent_file() {
    empty_replica_is_absent("file");
}

#[test]
fn only_a_replica_without_objects_is_absent_s3() {
    empty_replica_is_absent("s3");
}

/// The read-only commands, each against `url`, writing under `work`.
fn read_only_commands(url: &str, work: &Path) -> Vec<(&'static str, Vec<String>)> {
    let w = |name: &str| work.join(name).to_string_lossy().into_owned();
    vec![
        (
            "restore",
            vec!["restore".into(), "-o".into(), w("r.db"), url.into()],
        ),
        (
            "restore --if-replica-exists",
            vec![
                "restore".into(),
                "--if-replica-exists".into(),
                "-o".into(),
                w("r2.db"),
                url.into(),
            ],
        ),
        ("generations", vec!["generations".into(), url.into()]),
        ("verify", vec!["verify".into(), url.into()]),
        (
            "dump",
            vec![
                "dump".into(),
                "--replica".into(),
                url.into(),
                "-o".into(),
                w("d.sql"),
            ],
        ),
        ("schema-diff", vec!["schema-diff".into(), url.into()]),
    ]
}

#[test]
fn read_only_commands_never_create_the_replica_directory() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("not-yet-a-replica");
    let url = format!("file://{}", dir.display());
    for (name, args) in read_only_commands(&url, work.path()) {
        let o = walship().args(&args).output().unwrap();
        assert!(
            !dir.exists(),
            "`walship {name}` created the replica directory {} ({})",
            dir.display(),
            stderr(&o)
        );
    }
}

#[test]
fn a_file_url_whose_parent_is_missing_is_refused_by_every_command() {
    let work = tempfile::tempdir().unwrap();
    let parent = work.path().join("typo");
    let url = format!("file://{}", parent.join("replica").display());
    let db = work.path().join("app.db");
    create_db(&db);
    let db_s = db.to_string_lossy().into_owned();
    let mut commands = read_only_commands(&url, work.path());
    commands.push((
        "snapshot",
        vec!["snapshot".into(), db_s.clone(), url.clone()],
    ));
    commands.push(("replicate", vec!["replicate".into(), db_s, url.clone()]));
    for (name, args) in commands {
        let o = run_bounded(&args, work.path());
        let line = error_line(&o);
        assert!(
            !o.status.success(),
            "`walship {name}` accepted a replica whose parent directory is missing: {}",
            stderr(&o)
        );
        assert!(
            line.contains(&format!(
                "parent directory {} does not exist",
                parent.display()
            )),
            "`walship {name}`: {}",
            stderr(&o)
        );
        assert!(
            !parent.exists(),
            "`walship {name}` created {}",
            parent.display()
        );
    }
}
