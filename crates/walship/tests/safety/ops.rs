//! Scripts and operators: `walship replicate --once` (one pass for cron jobs and deploy
//! hooks), and the times commands print: RFC 3339, accepted back by `restore --timestamp`,
//! with human ages that say "in the future" when a writer's clock ran ahead.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use rusqlite::Connection;
use walship_storage::testkit::MotoServer;

use crate::common::*;

/// Both kinds of replica: (label, URL) of a fresh local directory under `dir` and a fresh
/// prefix on the local S3 server.
fn replicas(dir: &Path, tag: &str) -> Vec<(&'static str, String)> {
    let moto = MotoServer::shared();
    vec![
        ("file", file_url(&dir.join(format!("{tag}-replica")))),
        (
            "s3",
            moto.url(moto.bucket(), &MotoServer::unique_prefix(tag))
                .to_string(),
        ),
    ]
}

/// The app: a database in WAL mode and a connection kept open, as a running app keeps one
/// (the last connection to close checkpoints the WAL and removes it, which the next pass
/// sees as a break).
fn app(db: &Path) -> Connection {
    create_db(db);
    let c = Connection::open(db).unwrap();
    c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    c
}

/// Inserts `n` rows in one transaction.
fn insert(c: &Connection, n: usize) {
    c.execute_batch("BEGIN").unwrap();
    for i in 0..n {
        c.execute(
            "INSERT INTO t(v) VALUES (?1)",
            [format!("row {i} {}", "x".repeat(100)).into_bytes()],
        )
        .unwrap();
    }
    c.execute_batch("COMMIT").unwrap();
}

fn live_rows(db: &Path) -> Vec<(i64, Vec<u8>)> {
    rows(&Connection::open(db).unwrap())
}

/// `walship replicate --once DB URL EXTRA...`.
fn once(db: &Path, url: &str, extra: &[&str]) -> Output {
    walship()
        .args(["replicate", "--once"])
        .arg(db)
        .arg(url)
        .args(extra)
        .output()
        .unwrap()
}

fn once_ok(db: &Path, url: &str, extra: &[&str]) -> String {
    let o = once(db, url, extra);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "replicate --once failed: {err}");
    err
}

fn generations_json(url: &str) -> serde_json::Value {
    let o = walship()
        .args(["generations", "--json", url])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "generations --json: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn generations_text(url: &str) -> String {
    let o = walship().args(["generations", url]).output().unwrap();
    assert!(
        o.status.success(),
        "generations: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// The snapshot keys of every generation, and each generation's segment count and bytes:
/// what changes when anything is uploaded (the lease aside).
fn inventory(url: &str) -> Vec<String> {
    let mut out = Vec::new();
    for g in generations_json(url).as_array().unwrap() {
        out.push(format!(
            "{} segments={} bytes={}",
            g["generation"], g["segments"], g["bytes"]
        ));
        for s in g["snapshots"].as_array().unwrap() {
            out.push(s["key"].as_str().unwrap().to_string());
        }
    }
    out
}

fn snapshot_count(url: &str) -> usize {
    generations_json(url)
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["snapshots"].as_array().unwrap().len())
        .sum()
}

/// Restores `url` (at `timestamp`, if given) into a new file under `dir` and returns its
/// rows.
fn restored_rows(dir: &Path, url: &str, timestamp: Option<&str>) -> Vec<(i64, Vec<u8>)> {
    let out = dir.join(format!("restored-{}.db", rand::random::<u32>()));
    let mut extra = Vec::new();
    if let Some(t) = timestamp {
        extra = vec!["--timestamp", t];
    }
    let o = restore(url, &out, &extra);
    assert!(
        o.status.success(),
        "restore {url} at {timestamp:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r = rows(&Connection::open(&out).unwrap());
    let _ = std::fs::remove_file(&out);
    r
}

#[test]
fn replicate_once_ships_everything_and_a_restore_equals_the_database() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, url) in replicas(dir.path(), "once") {
        let db = dir.path().join(format!("{kind}.db"));
        let conn = app(&db);
        insert(&conn, 50);
        let line = once_ok(&db, &url, &[]);
        assert!(line.contains("new generation"), "{kind}: {line}");
        assert_eq!(snapshot_count(&url), 1, "{kind}: one snapshot");
        assert_eq!(
            restored_rows(dir.path(), &url, None),
            live_rows(&db),
            "{kind}"
        );

        // A second pass continues the generation with the new rows.
        insert(&conn, 30);
        let line = once_ok(&db, &url, &[]);
        assert!(!line.contains("new generation"), "{kind}: {line}");
        assert_eq!(
            generations_json(&url).as_array().unwrap().len(),
            1,
            "{kind}"
        );
        assert_eq!(
            restored_rows(dir.path(), &url, None),
            live_rows(&db),
            "{kind}"
        );

        // The lease was released: a continuous replicator starts at once and continues the
        // generation (with --on-conflict fail it would refuse a held lease).
        insert(&conn, 5);
        let log = dir.path().join(format!("{kind}-rep.log"));
        let rep = Replicator::start(&db, &url, &["--on-conflict", "fail"], &log);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("all replicators up")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{kind}: replicator did not start: {}",
                tail(&log)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(rep.terminate(Duration::from_secs(30)).success());
        assert_eq!(
            generations_json(&url).as_array().unwrap().len(),
            1,
            "{kind}"
        );
        assert_eq!(
            restored_rows(dir.path(), &url, None),
            live_rows(&db),
            "{kind}"
        );

        // The app closed its last connection between passes (SQLite checkpointed the WAL
        // and removed it) and wrote again: the replica cannot be continued from the WAL on
        // disk, so the pass starts a new generation, and a restore still equals the database.
        drop(conn);
        let conn = Connection::open(&db).unwrap();
        insert(&conn, 12);
        let line = once_ok(&db, &url, &[]);
        assert!(line.contains("new generation"), "{kind}: {line}");
        assert_eq!(
            restored_rows(dir.path(), &url, None),
            live_rows(&db),
            "{kind}"
        );
    }
}

#[test]
fn replicate_once_with_force_snapshot_writes_a_new_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, url) in replicas(dir.path(), "force") {
        let db = dir.path().join(format!("{kind}.db"));
        let conn = app(&db);
        insert(&conn, 20);
        once_ok(&db, &url, &[]);
        assert_eq!(snapshot_count(&url), 1, "{kind}");
        insert(&conn, 20);
        // Not due: the snapshot is seconds old.
        once_ok(&db, &url, &[]);
        assert_eq!(snapshot_count(&url), 1, "{kind}: no snapshot due");
        let line = once_ok(&db, &url, &["--force-snapshot"]);
        assert!(line.contains("1 snapshot"), "{kind}: {line}");
        assert_eq!(snapshot_count(&url), 2, "{kind}: forced snapshot");
        // Even with nothing new.
        once_ok(&db, &url, &["--force-snapshot"]);
        assert_eq!(snapshot_count(&url), 3, "{kind}: forced snapshot, idle");
        assert_eq!(
            restored_rows(dir.path(), &url, None),
            live_rows(&db),
            "{kind}"
        );
    }
}

#[test]
fn replicate_once_on_an_idle_database_uploads_nothing_unless_a_snapshot_is_due() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, url) in replicas(dir.path(), "idle") {
        let db = dir.path().join(format!("{kind}.db"));
        let conn = app(&db);
        insert(&conn, 20);
        once_ok(&db, &url, &[]);
        insert(&conn, 20);
        once_ok(&db, &url, &["--snapshot-interval", "1h"]);
        let before = inventory(&url);

        // Nothing written since: nothing uploaded, however often it runs.
        for _ in 0..2 {
            let line = once_ok(&db, &url, &["--snapshot-interval", "1h"]);
            assert!(line.contains("nothing new"), "{kind}: {line}");
            assert_eq!(inventory(&url), before, "{kind}: an idle pass uploaded");
        }
        if kind == "file" {
            // Only the lease changed on disk.
            let files = |d: &Path| -> Vec<PathBuf> {
                let mut v = Vec::new();
                let mut stack = vec![d.to_path_buf()];
                while let Some(d) = stack.pop() {
                    for e in std::fs::read_dir(&d).unwrap() {
                        let p = e.unwrap().path();
                        if p.is_dir() {
                            stack.push(p);
                        } else if !p.to_string_lossy().contains("lease") {
                            v.push(p);
                        }
                    }
                }
                v.sort();
                v
            };
            let root = dir.path().join("idle-replica");
            let a = files(&root);
            once_ok(&db, &url, &["--snapshot-interval", "1h"]);
            assert_eq!(files(&root), a, "an idle pass wrote an object");
        }

        // Segments after the newest snapshot, which is older than the interval: one
        // snapshot is due, then nothing again.
        std::thread::sleep(Duration::from_millis(1500));
        let line = once_ok(&db, &url, &["--snapshot-interval", "1s"]);
        assert!(line.contains("1 snapshot"), "{kind}: {line}");
        assert_eq!(snapshot_count(&url), 2, "{kind}");
        let after = inventory(&url);
        std::thread::sleep(Duration::from_millis(1500));
        let line = once_ok(&db, &url, &["--snapshot-interval", "1s"]);
        assert!(line.contains("nothing new"), "{kind}: {line}");
        assert_eq!(inventory(&url), after, "{kind}");
        assert_eq!(
            restored_rows(dir.path(), &url, None),
            live_rows(&db),
            "{kind}"
        );
    }
}

#[test]
fn replicate_once_with_a_config_file_replicates_every_database() {
    let dir = tempfile::tempdir().unwrap();
    let moto = MotoServer::shared();
    let s3 = moto
        .url(moto.bucket(), &MotoServer::unique_prefix("once-config"))
        .to_string();
    let local = file_url(&dir.path().join("b-replica"));
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    let (ca, cb) = (app(&a), app(&b));
    insert(&ca, 25);
    insert(&cb, 32);
    let cfg = dir.path().join("walship.toml");
    std::fs::write(
        &cfg,
        format!(
            "version = 1\n\
             [[db]]\npath = \"{}\"\n  [[db.replica]]\n  url = \"{s3}\"\n\
             [[db]]\npath = \"{}\"\n  [[db.replica]]\n  url = \"{local}\"\n",
            a.display(),
            b.display()
        ),
    )
    .unwrap();
    let o = walship()
        .args(["replicate", "--once", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(err.matches("replicated ").count(), 2, "{err}");
    assert_eq!(restored_rows(dir.path(), &s3, None), live_rows(&a));
    assert_eq!(restored_rows(dir.path(), &local, None), live_rows(&b));

    // One failing database fails the run, with one line, and the other is still done.
    insert(&ca, 3);
    drop(cb);
    std::fs::remove_file(&b).unwrap();
    let o = walship()
        .args(["replicate", "--once", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains("b.db"),
        "one line naming the database: {err}"
    );
    assert_eq!(restored_rows(dir.path(), &s3, None), live_rows(&a));
}

/// Every RFC 3339 time in a text: words (trimmed of punctuation) shaped like
/// `YYYY-MM-DDTHH:MM:SS...`.
fn times_in(text: &str) -> Vec<String> {
    text.split(|c: char| c.is_whitespace() || "(),\"[]{}".contains(c))
        .map(|w| w.trim_end_matches([':', ';']))
        .filter(|w| {
            let b = w.as_bytes();
            b.len() >= 20 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && b[13] == b':'
        })
        .map(str::to_string)
        .collect()
}

fn parse_rfc3339(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

#[test]
fn every_time_generations_prints_is_rfc3339_and_restores_that_point() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, url) in replicas(dir.path(), "times") {
        let db = dir.path().join(format!("{kind}.db"));
        let conn = app(&db);
        // Three states: a snapshot of the first, a forced snapshot of the second, and
        // segments of the third.
        insert(&conn, 10);
        once_ok(&db, &url, &[]);
        let first = live_rows(&db);
        std::thread::sleep(Duration::from_millis(50));
        insert(&conn, 10);
        once_ok(&db, &url, &["--force-snapshot"]);
        let second = live_rows(&db);
        std::thread::sleep(Duration::from_millis(50));
        insert(&conn, 10);
        once_ok(&db, &url, &[]);
        let third = live_rows(&db);

        // --json: the generation's times and each snapshot's.
        let json = generations_json(&url);
        let g = &json.as_array().unwrap()[0];
        let snaps = g["snapshots"].as_array().unwrap();
        assert_eq!(snaps.len(), 2, "{kind}");
        let mut printed: Vec<String> = vec![
            g["created"].as_str().unwrap().into(),
            g["newest"].as_str().unwrap().into(),
        ];
        printed.extend(
            snaps
                .iter()
                .map(|s| s["time"].as_str().unwrap().to_string()),
        );
        // Text: every time on every line (the lease's, the generation's, the snapshots').
        let text = generations_text(&url);
        let text_times = times_in(&text);
        assert!(
            text_times.len() >= 5,
            "{kind}: lease, created, newest and two snapshot times in:\n{text}"
        );
        printed.extend(text_times);
        for t in &printed {
            assert!(
                t.ends_with('Z') && parse_rfc3339(t).is_some(),
                "{kind}: `{t}` is not RFC 3339 in UTC"
            );
            // restore --timestamp reads it (a time before the first snapshot has nothing
            // to restore, but it parses).
            let out = dir.path().join("probe.db");
            let o = restore(&url, &out, &["--timestamp", t]);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                !err.contains("not RFC 3339"),
                "{kind}: restore --timestamp refused the printed `{t}`: {err}"
            );
            let _ = std::fs::remove_file(&out);
        }

        // Restoring at a printed snapshot time gives that snapshot's content, in text and
        // JSON alike; the newest time gives everything.
        let mut by_time: Vec<(i64, &str)> = snaps
            .iter()
            .map(|s| s["time"].as_str().unwrap())
            .map(|t| (parse_rfc3339(t).unwrap(), t))
            .collect();
        by_time.sort();
        assert_eq!(
            restored_rows(dir.path(), &url, Some(by_time[0].1)),
            first,
            "{kind}: at the first snapshot's printed time"
        );
        assert_eq!(
            restored_rows(dir.path(), &url, Some(by_time[1].1)),
            second,
            "{kind}: at the second snapshot's printed time"
        );
        for line in text
            .lines()
            .filter(|l| l.trim_start().starts_with("snapshot"))
        {
            let t = &times_in(line)[0];
            let want = if parse_rfc3339(t) == Some(by_time[0].0) {
                &first
            } else {
                &second
            };
            assert_eq!(
                &restored_rows(dir.path(), &url, Some(t)),
                want,
                "{kind}: at the time printed in `{line}`"
            );
        }
        assert_eq!(
            restored_rows(dir.path(), &url, Some(g["newest"].as_str().unwrap())),
            third,
            "{kind}: at the newest time"
        );
        for line in text.lines().filter(|l| !times_in(l).is_empty()) {
            assert!(
                line.contains("just now") || line.contains(" ago"),
                "{kind}: no human age in `{line}`"
            );
        }
    }
}

/// `walship` run under Debian's `faketime` with its clock `offset` from ours (e.g. `+1h`).
fn walship_with_clock(offset: &str) -> Command {
    let faketime = Path::new("/usr/bin/faketime");
    assert!(
        faketime.exists(),
        "{} is missing: run scripts/test-deps.sh (it installs Debian's faketime)",
        faketime.display()
    );
    let template = walship();
    let mut c = Command::new(faketime);
    c.args(["-f", offset]).arg(walship_bin());
    for (k, v) in template.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    // Timers and timeouts keep the real monotonic clock.
    c.env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    c
}

#[test]
fn a_replica_written_by_a_clock_an_hour_ahead_shows_in_the_future() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, url) in replicas(dir.path(), "ahead") {
        let db = dir.path().join(format!("{kind}.db"));
        let conn = app(&db);
        insert(&conn, 10);
        let o = walship_with_clock("+1h")
            .args(["replicate", "--once"])
            .arg(&db)
            .arg(&url)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{kind}: replicate --once under faketime: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let text = generations_text(&url);
        let g = text.lines().find(|l| l.starts_with("generation")).unwrap();
        assert!(g.contains("in the future"), "{kind}: {text}");
        assert!(!g.contains(" ago"), "{kind}: {text}");
        assert!(
            text.lines()
                .filter(|l| l.trim_start().starts_with("snapshot"))
                .all(|l| l.contains("in the future")),
            "{kind}: {text}"
        );
        // The same replica by a correct clock: ages in the past.
        let db2 = dir.path().join(format!("{kind}-now.db"));
        let conn2 = app(&db2);
        insert(&conn2, 3);
        let (_, url2) = replicas(dir.path(), "now")
            .into_iter()
            .find(|(k, _)| *k == kind)
            .unwrap();
        once_ok(&db2, &url2, &[]);
        let text = generations_text(&url2);
        assert!(!text.contains("in the future"), "{kind}: {text}");
        assert!(
            text.contains("just now") || text.contains(" s ago"),
            "{kind}: {text}"
        );
    }
}
