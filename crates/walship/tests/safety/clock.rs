//! A restore's choice never depends on a writer's clock (issue 34, item 1).
//!
//! Writers run under libfaketime (Debian's `faketime`, from scripts/test-deps.sh) with their
//! clock an hour or a day ahead or behind; the restore must return what the newest writer
//! wrote, whichever writer's clock was off, on a local directory and on the local S3 server.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use walship_storage::testkit::MotoServer;

use crate::common::{Replicator, create_db, tail, walship};

/// The skews tried, as libfaketime's relative offsets.
const SKEWS: [(&str, i64); 4] = [
    ("+1h", 3_600_000),
    ("-1h", -3_600_000),
    ("+1d", 86_400_000),
    ("-1d", -86_400_000),
];

/// libfaketime's multi-threaded build (walship runs a multi-threaded runtime).
fn libfaketime() -> PathBuf {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!("libfaketime is missing: run scripts/test-deps.sh (it installs Debian's faketime)")
    })
}

/// `walship` with its wall clock shifted by `skew` (`None`: the real clock). This is what
/// the `faketime` wrapper sets up, without the wrapper's extra process, so the signals the
/// tests send reach walship itself. Monotonic clocks stay real (timers, lease lapses).
fn walship_at(skew: Option<&str>) -> Command {
    let mut c = walship();
    if let Some(s) = skew {
        c.env("LD_PRELOAD", libfaketime())
            .env("FAKETIME", s)
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .env("FAKETIME_NO_CACHE", "1");
    }
    c
}

/// Inserts rows `from..=to` into the writer schema's table `t`, ten to a transaction.
fn insert_rows(db: &Path, from: i64, to: i64) {
    let conn = Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    let mut i = from;
    while i <= to {
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        for id in i..=(i + 9).min(to) {
            conn.execute("INSERT INTO t(id, v) VALUES (?1, x'00')", [id])
                .unwrap();
        }
        conn.execute_batch("COMMIT").unwrap();
        i += 10;
    }
}

fn count_rows(db: &Path) -> i64 {
    let conn = Connection::open(db).unwrap();
    conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap()
}

/// Starts `walship replicate db url` with its clock at `skew`.
fn replicate_at(skew: Option<&str>, db: &Path, url: &str, log: &Path) -> Replicator {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = walship_at(skew)
        .arg("replicate")
        .arg(db)
        .arg(url)
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap();
    Replicator {
        child,
        log: log.to_path_buf(),
    }
}

/// One writer's turn: replicate `db` while rows `from..=to` are written, then stop it
/// cleanly (final sync, lease released).
fn write_under_replication(
    skew: Option<&str>,
    db: &Path,
    url: &str,
    (from, to): (i64, i64),
    log: &Path,
) {
    let rep = replicate_at(skew, db, url, log);
    wait_for_generation(url, log);
    let mid = from + (to - from) / 2;
    insert_rows(db, from, mid);
    std::thread::sleep(Duration::from_millis(1500));
    insert_rows(db, mid + 1, to);
    let st = rep.terminate(Duration::from_secs(60));
    assert!(st.success(), "replicate exited {st}:\n{}", tail(log));
}

/// `walship generations --json`: (generation id, newest object time in ms), newest id first.
fn generations(url: &str) -> Vec<(String, i64)> {
    let o = walship()
        .args(["generations", "--json", url])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["generation"].as_str().unwrap().to_string(),
                parse_key_time(g["newest"].as_str().unwrap()),
            )
        })
        .collect()
}

/// Waits until the replica holds a generation with a snapshot (the replicator is up).
fn wait_for_generation(url: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let before = generations(url).len();
    while generations(url).len() <= before {
        assert!(
            Instant::now() < deadline,
            "no new generation within 120 s:\n{}",
            tail(log)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Parses a time as printed by walship: `YYYYMMDDTHHMMSSmmmZ` or RFC 3339.
fn parse_key_time(s: &str) -> i64 {
    let digits: String = s.chars().filter(char::is_ascii_digit).collect();
    let n = |r: std::ops::Range<usize>| -> i64 { digits[r].parse().unwrap() };
    let (y, m, d) = (n(0..4), n(4..6), n(6..8));
    let (hh, mm, ss) = (n(8..10), n(10..12), n(12..14));
    let ms = if digits.len() >= 17 { n(14..17) } else { 0 };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000) + ms
}

fn rfc3339_in(ms_from_now: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let t = now + ms_from_now;
    let secs = t.div_euclid(1000);
    let o = Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

fn restore_into(url: &str, out: &Path, extra: &[&str]) -> Output {
    let o = walship()
        .arg("restore")
        .arg("-o")
        .arg(out)
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "restore {extra:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Where the scenarios' replicas live.
enum Backend {
    File(tempfile::TempDir),
    S3(&'static MotoServer),
}

impl Backend {
    fn url(&self, tag: &str) -> String {
        match self {
            Backend::File(dir) => format!("file://{}", dir.path().join(tag).display()),
            Backend::S3(moto) => moto
                .url(moto.bucket(), &MotoServer::unique_prefix(tag))
                .to_string(),
        }
    }
}

/// Writer A (rows 1–150) then, on another machine that restored A's state, writer B (rows
/// 151–350), one of them with its clock off by `skew`: the restore must return B's 350 rows,
/// by generation order alone; a point-in-time restore after both gives the same and says
/// so when object times run backwards.
fn skewed_writers(backend: &Backend, skew: (&str, i64), skewed_first: bool) {
    let (offset, skew_ms) = skew;
    let tag = format!(
        "skew{}{}",
        offset.replace(['+', '-'], if offset.starts_with('+') { "p" } else { "m" }),
        if skewed_first { "-first" } else { "-second" }
    );
    let ctx = format!(
        "skew {offset}, skewed writer {}",
        if skewed_first { "first" } else { "second" }
    );
    let work = tempfile::tempdir().unwrap();
    let url = backend.url(&tag);
    let (skew_a, skew_b) = if skewed_first {
        (Some(offset), None)
    } else {
        (None, Some(offset))
    };

    // Machine A.
    let a = work.path().join("a.db");
    create_db(&a);
    write_under_replication(skew_a, &a, &url, (1, 150), &work.path().join("a.log"));

    // Machine B: restores A's state, then writes on.
    let b = work.path().join("b.db");
    restore_into(&url, &b, &[]);
    assert_eq!(count_rows(&b), 150, "{ctx}: B's restore of A");
    write_under_replication(skew_b, &b, &url, (151, 350), &work.path().join("b.log"));

    // The skew took effect: the generations' newest object times differ by about it.
    let gens = generations(&url);
    assert_eq!(gens.len(), 2, "{ctx}: {gens:?}");
    let (newer, older) = (gens[0].1, gens[1].1);
    let a_minus_b = older - newer;
    let expected = if skewed_first { skew_ms } else { -skew_ms };
    assert!(
        (a_minus_b - expected).abs() < 10 * 60_000,
        "{ctx}: libfaketime did not shift walship's clock (A's newest object minus B's: {a_minus_b} ms)"
    );

    // The newest writer's rows, whatever the clocks said.
    let out = work.path().join("restored.db");
    let o = restore_into(&url, &out, &[]);
    assert_eq!(
        count_rows(&out),
        350,
        "{ctx}: restore returned an older writer's state:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // A point-in-time restore after everything: the same rows, and a warning when the older
    // generation holds later times.
    let out = work.path().join("pitr.db");
    let when = rfc3339_in(3 * 86_400_000);
    let o = restore_into(&url, &out, &["--timestamp", &when]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(count_rows(&out), 350, "{ctx}: --timestamp {when}:\n{err}");
    let backwards = older > newer;
    assert_eq!(
        err.contains("times run backwards"),
        backwards,
        "{ctx}: --timestamp should warn exactly when object times run backwards:\n{err}"
    );
}

fn all_skews(backend: &Backend) {
    for skew in SKEWS {
        for skewed_first in [true, false] {
            skewed_writers(backend, skew, skewed_first);
        }
    }
}

#[test]
fn clock_skew_never_restores_an_older_writers_state_file() {
    all_skews(&Backend::File(tempfile::tempdir().unwrap()));
}

#[test]
fn clock_skew_never_restores_an_older_writers_state_s3() {
    all_skews(&Backend::S3(MotoServer::shared()));
}

/// `walship snapshot` while a replicator (its clock an hour behind) runs: the one-shot
/// generation ranks below the live one, whose later rows the restore returns.
fn one_shot_during_replication(backend: &Backend) {
    let work = tempfile::tempdir().unwrap();
    let url = backend.url("oneshot-live");
    let db = work.path().join("app.db");
    let log = work.path().join("rep.log");
    create_db(&db);
    let rep = replicate_at(Some("-1h"), &db, &url, &log);
    wait_for_generation(&url, &log);
    insert_rows(&db, 1, 100);
    let o = walship()
        .arg("snapshot")
        .arg(&db)
        .arg(&url)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "snapshot failed: {err}");
    assert!(
        err.contains("below"),
        "snapshot should say its generation ranks below the running replicator's: {err}"
    );
    insert_rows(&db, 101, 200);
    let st = rep.terminate(Duration::from_secs(60));
    assert!(st.success(), "replicate exited {st}:\n{}", tail(&log));
    let out = work.path().join("restored.db");
    let o = restore_into(&url, &out, &[]);
    assert_eq!(
        count_rows(&out),
        200,
        "the one-shot snapshot outranked the live replicator:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `walship snapshot` after the replicator (its clock an hour ahead) stopped and the app
/// wrote on: the one-shot generation is the newest, and restore returns it.
fn one_shot_after_replication(backend: &Backend) {
    let work = tempfile::tempdir().unwrap();
    let url = backend.url("oneshot-stopped");
    let db = work.path().join("app.db");
    create_db(&db);
    write_under_replication(
        Some("+1h"),
        &db,
        &url,
        (1, 100),
        &work.path().join("rep.log"),
    );
    insert_rows(&db, 101, 120);
    let o = walship()
        .arg("snapshot")
        .arg(&db)
        .arg(&url)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "snapshot failed: {err}");
    assert!(
        err.contains("newest generation"),
        "snapshot should say its generation is the newest: {err}"
    );
    let out = work.path().join("restored.db");
    let o = restore_into(&url, &out, &[]);
    assert_eq!(
        count_rows(&out),
        120,
        "the one-shot snapshot after the replicator stopped was not restored:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_one_shot_snapshot_ranks_below_a_live_replicator_and_above_a_stopped_one_file() {
    let backend = Backend::File(tempfile::tempdir().unwrap());
    one_shot_during_replication(&backend);
    one_shot_after_replication(&backend);
}

#[test]
fn a_one_shot_snapshot_ranks_below_a_live_replicator_and_above_a_stopped_one_s3() {
    let backend = Backend::S3(MotoServer::shared());
    one_shot_during_replication(&backend);
    one_shot_after_replication(&backend);
}
