//! Encryption keys and generations: a generation is written under one key or none.
//!
//! A replicator (or `walship snapshot`) given no key, or only a key the replica's newest
//! generation was not encrypted with, refuses with one line and writes nothing into any
//! generation; a new key with the old one given for reading starts a new generation (a
//! rotation), and so does a key given to a replica that was not encrypted. Every test runs
//! on a local directory and on the local S3 server, and reads every object's key id from the
//! store to check that no generation mixes keys.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use walship_format::crypto::id_hex;
use walship_format::object::{HEAD_WITH_KEY_ID, ObjectReader, ObjectWriter, header_and_key_id};
use walship_storage::testkit::MotoServer;
use walship_storage::{ObjectStore, StoreOptions};

use crate::common::*;

const K: &str = "7f3a9c0d4e5b6a718293a4b5c6d7e8f90123456789abcdeffedcba9876543210";
const K2: &str = "1111111111111111111111111111111111111111111111111111111111111102";

/// How long a refused start may take, and how long an accepted one may take to upload.
const START_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug)]
enum Backend {
    Local,
    S3,
}

/// A database and its replica on one backend, and the key files.
struct Rig {
    dir: tempfile::TempDir,
    db: PathBuf,
    url: String,
    store_opts: StoreOptions,
    k: PathBuf,
    k2: PathBuf,
    rt: tokio::runtime::Runtime,
    /// The app's connection, open throughout as an app's would be (closing the last one
    /// checkpoints and deletes the WAL, a break that starts a new generation by itself).
    app: Connection,
}

impl Rig {
    fn new(backend: Backend, tag: &str) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let (url, store_opts) = match backend {
            Backend::Local => (
                file_url(&dir.path().join("replica")),
                StoreOptions::default(),
            ),
            Backend::S3 => {
                let moto = MotoServer::shared();
                let url = moto.url(moto.bucket(), &MotoServer::unique_prefix(tag));
                let opts = StoreOptions {
                    s3: moto.options(),
                    ..Default::default()
                };
                (url.to_string(), opts)
            }
        };
        let db = dir.path().join("app.db");
        create_db(&db);
        let k = dir.path().join("k.key");
        let k2 = dir.path().join("k2.key");
        std::fs::write(&k, format!("{K}\n")).unwrap();
        std::fs::write(&k2, format!("{K2}\n")).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let app = Connection::open(&db).unwrap();
        Rig {
            app,
            dir,
            db,
            url,
            store_opts,
            k,
            k2,
            rt,
        }
    }

    fn k(&self) -> &str {
        self.k.to_str().unwrap()
    }

    fn k2(&self) -> &str {
        self.k2.to_str().unwrap()
    }

    fn store(&self) -> std::sync::Arc<dyn ObjectStore> {
        self.rt
            .block_on(walship_storage::open(
                &self.url.parse().unwrap(),
                &self.store_opts,
            ))
            .unwrap()
    }

    /// Every object in the replica (lease objects too), sorted.
    fn objects(&self) -> Vec<String> {
        let store = self.store();
        let mut keys: Vec<String> = self
            .rt
            .block_on(walship_storage::list_all(store.as_ref(), "", None))
            .unwrap()
            .into_iter()
            .map(|m| m.key)
            .collect();
        keys.sort();
        keys
    }

    /// The objects of the generations, without the lease.
    fn data_objects(&self) -> Vec<String> {
        self.objects()
            .into_iter()
            .filter(|k| k.starts_with("generations/"))
            .collect()
    }

    /// For each generation (oldest first), the key ids its objects are encrypted with
    /// ("plaintext" for objects that are not).
    fn keys_by_generation(&self) -> BTreeMap<String, BTreeSet<String>> {
        let store = self.store();
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for key in self.data_objects() {
            let generation = key.split('/').nth(1).unwrap().to_string();
            let head = self
                .rt
                .block_on(async {
                    store
                        .get(&key, Some(0..HEAD_WITH_KEY_ID as u64))
                        .await?
                        .collect()
                        .await
                })
                .unwrap();
            let (_, id) = header_and_key_id(&head).unwrap();
            let id = id.as_ref().map_or_else(|| "plaintext".to_string(), id_hex);
            out.entry(generation).or_default().insert(id);
        }
        // Generation names sort newest first.
        out
    }

    /// Checks that no generation mixes keys; returns each generation's key, oldest first.
    fn one_key_per_generation(&self) -> Vec<String> {
        let by_gen = self.keys_by_generation();
        let mut out = Vec::new();
        for (generation, ids) in by_gen.iter().rev() {
            assert_eq!(
                ids.len(),
                1,
                "generation {generation} mixes keys: {ids:?} (all: {by_gen:?})"
            );
            out.push(ids.iter().next().unwrap().clone());
        }
        out
    }

    fn insert(&self, from: usize, n: usize) {
        for i in from..from + n {
            self.app
                .execute(
                    "INSERT INTO t(v) VALUES (?1)",
                    [format!("row {i}").into_bytes()],
                )
                .unwrap();
        }
    }

    fn rows(&self) -> Vec<(i64, Vec<u8>)> {
        rows(&self.app)
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `walship replicate` with `args` until it uploaded something new, then stops it
    /// with SIGTERM (a final sync) and checks it exited 0.
    fn replicate(&self, args: &[&str], name: &str) {
        let before = self.data_objects();
        let log = self.log(name);
        let rep = Replicator::start(&self.db, &self.url, args, &log);
        let deadline = Instant::now() + START_DEADLINE;
        while self.data_objects() == before {
            assert!(
                Instant::now() < deadline,
                "{name}: nothing uploaded in {START_DEADLINE:?}:\n{}",
                tail(&log)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let st = rep.terminate(START_DEADLINE);
        assert!(st.success(), "{name}: {st:?}\n{}", tail(&log));
    }

    /// Runs `walship replicate` with `args`, expecting it to refuse to start: returns its
    /// single `error:` line. A replicator still running at the deadline fails the test.
    fn replicate_refused(&self, args: &[&str], name: &str) -> String {
        let log = self.log(name);
        let mut rep = Replicator::start(&self.db, &self.url, args, &log);
        let deadline = Instant::now() + START_DEADLINE;
        let st = loop {
            if let Some(st) = rep.child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let st = rep.terminate(START_DEADLINE);
                panic!(
                    "{name}: replicate ran (and exited {st:?}) instead of refusing:\n{}",
                    tail(&log)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(!st.success(), "{name}: {st:?}");
        one_error_line(&std::fs::read_to_string(&log).unwrap())
    }

    /// Restores into a new file with `args`; returns its rows, or the one error line.
    fn restore(&self, args: &[&str], name: &str) -> Result<Vec<(i64, Vec<u8>)>, String> {
        let out = self.dir.path().join(name);
        let o = restore(&self.url, &out, args);
        if o.status.success() {
            Ok(rows(&Connection::open(&out).unwrap()))
        } else {
            assert!(!out.exists(), "a failed restore left {}", out.display());
            Err(one_error_line(&String::from_utf8_lossy(&o.stderr)))
        }
    }
}

fn one_error_line(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line:\n{stderr}");
    lines[0].to_string()
}

fn key_id(hex: &str) -> String {
    walship_format::crypto::Key::parse(hex).unwrap().id_hex()
}

/// (a), (b): a replica written with K; then a replicator and `walship snapshot` given no key
/// (or, with `other_key`, K2 only) are refused with one line naming K's id, and upload
/// nothing; a restore with K returns every committed row, and a replicator given K goes on
/// in the same generation.
fn refused_without_the_key(backend: Backend, other_key: bool, tag: &str) {
    let rig = Rig::new(backend, tag);
    let bad: &[&str] = if other_key {
        &["--encryption-key-file", rig.k2()]
    } else {
        &[]
    };
    rig.insert(0, 100);
    rig.replicate(
        &["--sync-interval", "100ms", "--encryption-key-file", rig.k()],
        "r1.log",
    );
    let committed = rig.rows();
    assert_eq!(committed.len(), 100);
    // Rows a wrongly keyed replicator would ship.
    rig.insert(100, 20);
    let before = rig.objects();

    let mut args = vec!["--sync-interval", "100ms"];
    args.extend_from_slice(bad);
    let line = rig.replicate_refused(&args, "refused.log");
    assert!(line.contains(&key_id(K)), "{line}");
    assert!(line.contains("--encryption-key-file"), "{line}");
    let o = walship()
        .arg("snapshot")
        .arg(&rig.db)
        .arg(&rig.url)
        .args(bad)
        .output()
        .unwrap();
    assert!(!o.status.success(), "walship snapshot was not refused");
    let line = one_error_line(&String::from_utf8_lossy(&o.stderr));
    assert!(line.contains(&key_id(K)), "{line}");

    // Nothing was written, not even a lease.
    assert_eq!(rig.objects(), before);
    assert_eq!(rig.one_key_per_generation(), vec![key_id(K)]);

    // K still restores every committed row.
    assert_eq!(
        rig.restore(&["--encryption-key-file", rig.k()], "out1.db"),
        Ok(committed)
    );

    // Given K, replication goes on in the same generation.
    rig.replicate(
        &["--sync-interval", "100ms", "--encryption-key-file", rig.k()],
        "r2.log",
    );
    assert_eq!(rig.one_key_per_generation(), vec![key_id(K)]);
    assert_eq!(
        rig.restore(&["--encryption-key-file", rig.k()], "out2.db"),
        Ok(rig.rows())
    );
}

#[test]
fn a_replicator_without_the_key_is_refused_and_uploads_nothing_local() {
    refused_without_the_key(Backend::Local, false, "nokey");
}

#[test]
fn a_replicator_without_the_key_is_refused_and_uploads_nothing_s3() {
    refused_without_the_key(Backend::S3, false, "nokey");
}

#[test]
fn a_replicator_with_another_key_is_refused_and_uploads_nothing_local() {
    refused_without_the_key(Backend::Local, true, "wrongkey");
}

#[test]
fn a_replicator_with_another_key_is_refused_and_uploads_nothing_s3() {
    refused_without_the_key(Backend::S3, true, "wrongkey");
}

/// (c): a new key K2 with the old K given for reading starts a new generation under K2;
/// both keys restore everything, and K2 alone restores the newest state.
fn rotation_starts_a_new_generation(backend: Backend) {
    let rig = Rig::new(backend, "rotate");
    rig.insert(0, 100);
    rig.replicate(
        &["--sync-interval", "100ms", "--encryption-key-file", rig.k()],
        "r1.log",
    );
    rig.insert(100, 50);
    rig.replicate(
        &[
            "--sync-interval",
            "100ms",
            "--encryption-key-file",
            rig.k2(),
            "--decryption-key-file",
            rig.k(),
        ],
        "r2.log",
    );
    assert_eq!(rig.one_key_per_generation(), vec![key_id(K), key_id(K2)]);
    let all = rig.rows();
    assert_eq!(all.len(), 150);
    let both = [
        "--encryption-key-file",
        rig.k2(),
        "--decryption-key-file",
        rig.k(),
    ];
    assert_eq!(rig.restore(&both, "both.db"), Ok(all.clone()));
    assert_eq!(
        rig.restore(&["--encryption-key-file", rig.k2()], "k2.db"),
        Ok(all)
    );
    // The old key alone cannot read the newest state, and says which key it needs.
    let line = rig
        .restore(&["--encryption-key-file", rig.k()], "k.db")
        .unwrap_err();
    assert!(line.contains(&key_id(K2)), "{line}");
}

#[test]
fn a_new_key_with_the_old_one_for_reading_starts_a_new_generation_local() {
    rotation_starts_a_new_generation(Backend::Local);
}

#[test]
fn a_new_key_with_the_old_one_for_reading_starts_a_new_generation_s3() {
    rotation_starts_a_new_generation(Backend::S3);
}

/// (d): a plaintext replica restarted with a key starts a new, encrypted generation; the
/// key restores everything.
fn plaintext_then_key(backend: Backend) {
    let rig = Rig::new(backend, "plainkey");
    rig.insert(0, 100);
    rig.replicate(&["--sync-interval", "100ms"], "r1.log");
    rig.insert(100, 50);
    rig.replicate(
        &["--sync-interval", "100ms", "--encryption-key-file", rig.k()],
        "r2.log",
    );
    assert_eq!(
        rig.one_key_per_generation(),
        vec!["plaintext".to_string(), key_id(K)]
    );
    let all = rig.rows();
    assert_eq!(all.len(), 150);
    assert_eq!(
        rig.restore(&["--encryption-key-file", rig.k()], "k.db"),
        Ok(all)
    );
}

#[test]
fn a_plaintext_replica_restarted_with_a_key_starts_a_new_generation_local() {
    plaintext_then_key(Backend::Local);
}

#[test]
fn a_plaintext_replica_restarted_with_a_key_starts_a_new_generation_s3() {
    plaintext_then_key(Backend::S3);
}

/// A generation an older walship left mixed: a plaintext snapshot, its segments under K.
/// A replicator given no key passes the look before the lease (the snapshot is plaintext)
/// and is refused at the generation's end, read under the lease: it writes nothing into any
/// generation and releases the lease it took, so the next replicator goes on at once.
fn refused_at_a_mixed_generations_end(backend: Backend) {
    let rig = Rig::new(backend, "mixed");
    rig.insert(0, 100);
    rig.replicate(&["--sync-interval", "100ms"], "r1.log");
    rig.insert(100, 20);
    rig.replicate(&["--sync-interval", "100ms"], "r2.log");
    let store = rig.store();
    let key = walship_format::crypto::Key::parse(K).unwrap();
    let segments: Vec<String> = rig
        .data_objects()
        .into_iter()
        .filter(|k| k.contains("/segments/"))
        .collect();
    assert!(!segments.is_empty());
    for name in &segments {
        let bytes = rig
            .rt
            .block_on(async { store.get(name, None).await?.collect().await })
            .unwrap();
        let mut r = ObjectReader::new(&bytes[..]).unwrap();
        let header = *r.header();
        let mut raw = Vec::new();
        r.read_to_end(&mut raw).unwrap();
        let mut w = ObjectWriter::new_encrypted(Vec::new(), &header, &key, [7u8; 8]).unwrap();
        w.write_all(&raw).unwrap();
        let sealed = w.finish().unwrap();
        rig.rt
            .block_on(async {
                store.delete_many(std::slice::from_ref(name)).await?;
                store.put(name, sealed.into()).await
            })
            .unwrap();
    }
    rig.insert(120, 20);
    let before = rig.objects();

    let line = rig.replicate_refused(&["--sync-interval", "100ms"], "refused.log");
    assert!(line.contains(&key_id(K)), "{line}");
    assert_eq!(rig.data_objects(), rig_data(&before));
    let new: Vec<String> = rig
        .objects()
        .into_iter()
        .filter(|k| !before.contains(k))
        .collect();
    assert!(
        !new.is_empty() && new.iter().all(|k| k.starts_with("lease/")),
        "{new:?}"
    );
    // Lease keys sort newest first: the newest is the refused replicator's, released.
    let newest = rig
        .objects()
        .into_iter()
        .find(|k| k.starts_with("lease/"))
        .unwrap();
    assert!(new.contains(&newest), "{newest} {new:?}");
    let newest = &newest;
    let lease = rig
        .rt
        .block_on(async { store.get(newest, None).await?.collect().await })
        .unwrap();
    let lease = String::from_utf8_lossy(&lease);
    assert!(lease.contains("\"released\""), "{lease}");
}

fn rig_data(objects: &[String]) -> Vec<String> {
    objects
        .iter()
        .filter(|k| k.starts_with("generations/"))
        .cloned()
        .collect()
}

#[test]
fn a_mixed_generation_refuses_a_replicator_without_its_key_and_releases_the_lease_local() {
    refused_at_a_mixed_generations_end(Backend::Local);
}

#[test]
fn a_mixed_generation_refuses_a_replicator_without_its_key_and_releases_the_lease_s3() {
    refused_at_a_mixed_generations_end(Backend::S3);
}
