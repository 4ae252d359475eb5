//! Gaps are never silent. A replica written by `walship replicate` with compaction off (one
//! snapshot, then 20 segments) is copied into a local directory and onto the local S3
//! server, then damaged: a middle segment deleted, a valid segment copied under a key naming
//! a wider range. A restore that cannot reach everything the replica holds says so in its
//! result line and its `--json` result, writes nothing and exits 3 unless `--allow-partial`
//! accepts it; `walship verify` fails; `--dry-run` shows the plan and the gap and writes
//! nothing.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use serde_json::Value;
use walship_format::key::ObjectKey;
use walship_storage::testkit::MotoServer;
use walship_storage::{ObjectStore, ReplicaUrl, StoreOptions, list_all};

use crate::common::{Replicator, create_db, file_url, restore, tail, walship};

/// Rows in the database before replication starts (they are in the snapshot).
const FIRST_ROWS: i64 = 10;
/// Transactions after the snapshot, one segment each.
const SEGMENTS: usize = 20;
/// Rows each of them inserts.
const ROWS_PER_TXN: i64 = 17;
/// Rows in the source database.
const TOTAL_ROWS: i64 = FIRST_ROWS + SEGMENTS as i64 * ROWS_PER_TXN;

/// The objects of a replica written once by the real replicator, copied into every test's
/// replicas.
struct Template {
    objects: Vec<(String, Vec<u8>)>,
    _dir: tempfile::TempDir,
}

fn template() -> &'static Template {
    static T: OnceLock<Template> = OnceLock::new();
    T.get_or_init(build_template)
}

fn build_template() -> Template {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let rdir = dir.path().join("replica");
    let url = file_url(&rdir);
    create_db(&db);
    insert(&db, FIRST_ROWS);
    let log = dir.path().join("replicate.log");
    let rep = Replicator::start(
        &db,
        &url,
        &[
            "--compaction-fan-in",
            "0",
            "--sync-interval",
            "50ms",
            "--snapshot-interval",
            "1h",
        ],
        &log,
    );
    wait_for(&log, "the first snapshot", || {
        count_files(&rdir, ".wsnap") == 1
    });
    for i in 1..=SEGMENTS {
        insert(&db, ROWS_PER_TXN);
        wait_for(&log, "a segment", || count_files(&rdir, ".wseg") >= i);
    }
    let st = rep.terminate(Duration::from_secs(60));
    assert!(st.success(), "replicate exited {st:?}:\n{}", tail(&log));
    let mut objects = Vec::new();
    for path in files(&rdir) {
        let key = path
            .strip_prefix(&rdir)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if key.starts_with("generations/") {
            objects.push((key, std::fs::read(&path).unwrap()));
        }
    }
    objects.sort();
    let segs = objects.iter().filter(|(k, _)| k.ends_with(".wseg")).count();
    let snaps = objects
        .iter()
        .filter(|(k, _)| k.ends_with(".wsnap"))
        .count();
    assert_eq!(
        (snaps, segs),
        (1, SEGMENTS),
        "one snapshot and a segment per transaction: {:?}",
        objects.iter().map(|o| &o.0).collect::<Vec<_>>()
    );
    let rows: i64 = Connection::open(&db)
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, TOTAL_ROWS);
    Template { objects, _dir: dir }
}

fn insert(db: &Path, n: i64) {
    let mut c = Connection::open(db).unwrap();
    let tx = c.transaction().unwrap();
    for _ in 0..n {
        tx.execute("INSERT INTO t(v) VALUES (randomblob(300))", [])
            .unwrap();
    }
    tx.commit().unwrap();
}

fn wait_for(log: &Path, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "no {what} within 120 s; replicator log:\n{}",
            tail(log)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn count_files(dir: &Path, ext: &str) -> usize {
    files(dir)
        .iter()
        .filter(|p| p.to_string_lossy().ends_with(ext))
        .count()
}

/// A replica made from the template, on a local directory or the local S3 server, and a
/// store client to damage it with.
struct Replica {
    url: String,
    store: Arc<dyn ObjectStore>,
    rt: tokio::runtime::Runtime,
    /// Where outputs go (nothing else is in it).
    dir: tempfile::TempDir,
    /// The local replica's directory, if local.
    _replica_dir: Option<tempfile::TempDir>,
}

impl Replica {
    fn local() -> Replica {
        let rdir = tempfile::tempdir().unwrap();
        let url = file_url(&rdir.path().join("replica"));
        Replica::with(url, StoreOptions::default(), Some(rdir))
    }

    fn s3() -> Replica {
        let moto = MotoServer::shared();
        let url = moto
            .url(moto.bucket(), &MotoServer::unique_prefix("gaps"))
            .to_string();
        let opts = StoreOptions {
            s3: moto.options(),
            retry: None,
            ..Default::default()
        };
        Replica::with(url, opts, None)
    }

    fn both() -> [Replica; 2] {
        [Replica::local(), Replica::s3()]
    }

    fn with(url: String, opts: StoreOptions, replica_dir: Option<tempfile::TempDir>) -> Replica {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let parsed: ReplicaUrl = url.parse().unwrap();
        let store = rt.block_on(walship_storage::open(&parsed, &opts)).unwrap();
        let r = Replica {
            url,
            store,
            rt,
            dir: tempfile::tempdir().unwrap(),
            _replica_dir: replica_dir,
        };
        for (key, bytes) in &template().objects {
            r.put(key, bytes.clone());
        }
        r
    }

    fn put(&self, key: &str, bytes: Vec<u8>) {
        self.rt.block_on(self.store.put(key, bytes.into())).unwrap();
    }

    fn get(&self, key: &str) -> Vec<u8> {
        self.rt.block_on(async {
            let obj = self.store.get(key, None).await.unwrap();
            obj.collect().await.unwrap().to_vec()
        })
    }

    fn delete(&self, key: &str) {
        self.rt
            .block_on(self.store.delete_many(&[key.to_string()]))
            .unwrap();
    }

    /// Segment keys in log order, parsed.
    fn segments(&self) -> Vec<(String, ObjectKey)> {
        let all = self
            .rt
            .block_on(list_all(self.store.as_ref(), "generations/", None))
            .unwrap();
        let mut segs: Vec<(String, ObjectKey)> = all
            .into_iter()
            .filter_map(|m| match ObjectKey::parse(&m.key) {
                Some(k @ ObjectKey::Segment { .. }) => Some((m.key, k)),
                _ => None,
            })
            .collect();
        segs.sort_by_key(|(_, k)| range(k));
        segs
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn restore(&self, out: &Path, extra: &[&str]) -> Output {
        restore(&self.url, out, extra)
    }
}

fn range(k: &ObjectKey) -> (u64, u64) {
    match *k {
        ObjectKey::Segment { start, end, .. } => (start, end),
        ObjectKey::Snapshot { position, .. } => (position, position),
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> Value {
    let s = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON object on stdout, got:\n{s}");
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{e}: {s}"))
}

fn rows(db: &Path) -> i64 {
    Connection::open(db)
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap()
}

fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

fn parse_rfc3339(s: &str) -> i64 {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("`{s}` is not RFC 3339: {e}"));
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn dir_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn a_deleted_middle_segment_makes_the_restore_fail_naming_the_gap_unless_partial_is_allowed() {
    for r in Replica::both() {
        let segs = r.segments();
        let (tenth, key) = segs[9].clone();
        let (start, end) = range(&key);
        r.delete(&tenth);

        // Refused: exit 3, one error line naming the missing positions, nothing written.
        let out = r.out("refused.db");
        let o = r.restore(&out, &["--json"]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(3), "{}: {err}", r.url);
        let line = err
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("no error line: {err}"));
        assert!(
            line.contains("partial")
                && line.contains(&format!("{start:#x} to {end:#x}"))
                && line.contains("--allow-partial"),
            "{line}"
        );
        assert!(!out.exists(), "a refused partial restore wrote its output");
        assert_eq!(
            dir_entries(r.dir.path()),
            Vec::<String>::new(),
            "left behind"
        );
        let v = json(&o);
        assert_eq!(v["restored"], false, "{v}");
        assert_eq!(v["partial"], true, "{v}");
        assert_eq!(v["gap"]["from"], start, "{v}");
        assert_eq!(v["gap"]["to"], end, "{v}");
        let beyond: Vec<&str> = v["gap"]["objects_beyond"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap())
            .collect();
        let after: Vec<&str> = segs[10..].iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(beyond, after, "{v}");
        assert_eq!(
            v["objects_applied"], 10,
            "the snapshot and nine segments: {v}"
        );

        // Accepted: exit 0, the output holds the point before the gap, and the result
        // still says partial.
        let o = r.restore(&out, &["--json", "--allow-partial"]);
        let err = stderr(&o);
        assert!(o.status.success(), "{}: {err}", r.url);
        let result = err.lines().find(|l| l.starts_with("restored ")).unwrap();
        assert!(
            result.contains("PARTIAL") && result.contains(&format!("{start:#x} to {end:#x}")),
            "{result}"
        );
        let v = json(&o);
        assert_eq!(v["restored"], true, "{v}");
        assert_eq!(v["partial"], true, "{v}");
        assert_eq!(v["position"], start, "{v}");
        assert_eq!(rows(&out), FIRST_ROWS + 9 * ROWS_PER_TXN);
    }
}

#[test]
fn a_point_in_time_restore_is_partial_only_relative_to_what_existed_at_its_target() {
    for r in Replica::both() {
        let segs = r.segments();
        r.delete(&segs[9].0);
        let ninth = segs[8].1.timestamp_ms();
        let eleventh = segs[10].1.timestamp_ms();
        assert!(eleventh > ninth);
        // As of the ninth segment, nothing written by then is missing.
        let out = r.out("pitr.db");
        let o = r.restore(&out, &["--timestamp", &rfc3339(ninth)]);
        assert!(o.status.success(), "{}: {}", r.url, stderr(&o));
        assert_eq!(rows(&out), FIRST_ROWS + 9 * ROWS_PER_TXN);
        // As of the eleventh, the tenth is missing.
        let out = r.out("pitr2.db");
        let o = r.restore(&out, &["--timestamp", &rfc3339(eleventh), "--json"]);
        assert_eq!(o.status.code(), Some(3), "{}: {}", r.url, stderr(&o));
        let v = json(&o);
        assert_eq!(v["partial"], true);
        assert_eq!(
            v["gap"]["objects_beyond"].as_array().unwrap().len(),
            1,
            "{v}"
        );
        assert!(!out.exists());
    }
}

#[test]
fn verify_fails_on_a_gap() {
    for r in Replica::both() {
        let segs = r.segments();
        let (start, end) = range(&segs[9].1);
        let o = walship().args(["verify", &r.url]).output().unwrap();
        assert!(o.status.success(), "{}: {}", r.url, stderr(&o));
        r.delete(&segs[9].0);
        let o = walship()
            .args(["verify", "--json", &r.url])
            .output()
            .unwrap();
        assert!(!o.status.success(), "verify passed a replica with a gap");
        let v: Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)));
        assert_eq!(v["ok"], false, "{v}");
        assert_eq!(v["partial"], true, "{v}");
        let msg = v["message"].as_str().unwrap();
        assert!(
            msg.contains("gap") && msg.contains(&format!("{start:#x} to {end:#x}")),
            "{msg}"
        );
    }
}

#[test]
fn a_segment_under_a_key_naming_a_wider_range_is_refused_and_named() {
    for r in Replica::both() {
        let segs = r.segments();
        let body = r.get(&segs[9].0);
        let ObjectKey::Segment {
            generation,
            start,
            end,
            timestamp_ms,
        } = segs[9].1
        else {
            unreachable!()
        };
        let (_, next_end) = range(&segs[10].1);
        // The tenth segment's bytes under a key that claims the eleventh's range too: the
        // chain prefers it (it reaches further) and must refuse it.
        let forged = ObjectKey::Segment {
            generation,
            start,
            end: next_end,
            timestamp_ms,
        }
        .format();
        r.put(&forged, body.clone());
        let out = r.out("whole.db");
        let o = r.restore(&out, &["--json"]);
        let err = stderr(&o);
        assert!(o.status.success(), "{}: {err}", r.url);
        assert!(
            err.lines().any(|l| l.starts_with("skipped")
                && l.contains(&forged)
                && l.contains("header disagrees with its key")
                && l.contains(&format!(
                    "end {end:#x} in the header, {next_end:#x} in the key"
                ))),
            "{err}"
        );
        let v = json(&o);
        assert_eq!(v["partial"], false, "the real segments carry it all: {v}");
        assert!(
            v["skipped"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["key"] == forged.as_str()),
            "{v}"
        );
        assert_eq!(rows(&out), TOTAL_ROWS);
        r.delete(&forged);

        // The last segment under a key reaching past it: refused, and what it claims lies
        // beyond the point restored, so the restore is partial.
        let (last, last_key) = segs.last().unwrap().clone();
        let (lstart, lend) = range(&last_key);
        let forged = ObjectKey::Segment {
            generation,
            start: lstart,
            end: lend + 5,
            timestamp_ms: last_key.timestamp_ms(),
        }
        .format();
        r.put(&forged, r.get(&last));
        let out = r.out("partial.db");
        let o = r.restore(&out, &["--json"]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(3), "{}: {err}", r.url);
        assert!(
            err.lines()
                .any(|l| l.starts_with("skipped") && l.contains(&forged)),
            "{err}"
        );
        let v = json(&o);
        assert_eq!(v["partial"], true, "{v}");
        assert_eq!(v["gap"]["objects_beyond"][0], forged.as_str(), "{v}");
        assert!(!out.exists());
    }
}

#[test]
fn a_dry_run_lists_the_plan_and_its_gap_and_writes_nothing() {
    for r in Replica::both() {
        let segs = r.segments();
        let out = r.out("never.db");
        let o = r.restore(&out, &["--dry-run"]);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "{}: {}", r.url, stderr(&o));
        for (key, _) in &segs {
            assert!(
                text.contains(key.as_str()),
                "{key} not in the plan:\n{text}"
            );
        }
        let snap = &template()
            .objects
            .iter()
            .find(|(k, _)| k.ends_with(".wsnap"))
            .unwrap();
        assert!(
            text.contains(&format!("snapshot {}  {} bytes", snap.0, snap.1.len())),
            "{text}"
        );
        let total: usize = template().objects.iter().map(|(_, b)| b.len()).sum();
        assert!(
            text.contains(&format!("total: 21 objects, {total} bytes")),
            "{text}"
        );
        assert!(text.contains("gaps: none"), "{text}");
        assert_eq!(dir_entries(r.dir.path()), Vec::<String>::new(), "written");

        // With a gap: listed, and the exit status a restore would have.
        let (start, end) = range(&segs[9].1);
        r.delete(&segs[9].0);
        let o = r.restore(&out, &["--dry-run"]);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        assert_eq!(o.status.code(), Some(3), "{}: {}", r.url, stderr(&o));
        assert!(
            text.contains(&format!(
                "gap: positions {start:#x} to {end:#x} are missing"
            )),
            "{text}"
        );
        assert!(text.contains(&format!("beyond: {}", segs[19].0)), "{text}");
        let o = r.restore(&out, &["--dry-run", "--json", "--allow-partial"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v = json(&o);
        assert_eq!(v["dry_run"], true);
        assert_eq!(v["partial"], true);
        assert_eq!(v["snapshot"]["key"], snap.0.as_str());
        assert_eq!(v["snapshot"]["bytes"], snap.1.len());
        assert_eq!(v["segments"].as_array().unwrap().len(), 9, "{v}");
        assert_eq!(v["segments"][8]["key"], segs[8].0.as_str());
        assert_eq!(v["position"], start);
        assert_eq!(v["gap"]["to"], end);
        assert_eq!(dir_entries(r.dir.path()), Vec::<String>::new(), "written");
    }
}

#[test]
fn the_json_result_names_generation_position_time_and_objects() {
    for r in Replica::both() {
        let segs = r.segments();
        let out = r.out("ok.db");
        let o = r.restore(&out, &["--json"]);
        assert!(o.status.success(), "{}: {}", r.url, stderr(&o));
        let v = json(&o);
        let (last, last_key) = segs.last().unwrap();
        assert_eq!(v["restored"], true);
        assert_eq!(v["output"], out.display().to_string());
        // As keys and every other command show it: the 16-hex name.
        let generation = last.split('/').nth(1).unwrap();
        assert_eq!(v["generation"], generation, "{v}");
        assert_eq!(v["position"], range(last_key).1, "{v}");
        assert_eq!(
            parse_rfc3339(v["time"].as_str().unwrap()),
            last_key.timestamp_ms(),
            "{v}"
        );
        assert_eq!(v["objects_applied"], 1 + SEGMENTS, "{v}");
        assert_eq!(v["skipped"], serde_json::json!([]), "{v}");
        assert_eq!(v["partial"], false, "{v}");
        assert!(v["gap"].is_null(), "{v}");
        assert_eq!(rows(&out), TOTAL_ROWS);
    }
}
