//! End-to-end tests of the status server against a running `walship replicate --listen`:
//! probes, health (healthy → critical → healthy while the replica fails and comes back),
//! Prometheus metrics, the admin API (status, backups, snapshot, download, restore guide,
//! history) with its bearer token, clean 4xx answers, and `walship history`.

#![allow(clippy::unwrap_used)]

mod common;
mod http_support;

use std::time::Duration;

use http_support::*;
use reqwest::StatusCode;
use rusqlite::Connection;
use serde_json::Value;

fn db0(v: &Value) -> &Value {
    &v["databases"][0]
}

#[test]
fn probes_health_and_metrics() {
    let mut s = start(&[]);
    let r = s.get("/healthz");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().unwrap()["status"], "ok");

    let r = s.get("/health");
    assert_eq!(r.status(), StatusCode::OK);
    let h: Value = r.json().unwrap();
    assert_eq!(h["status"], "healthy", "{h:#}");
    let d = db0(&h);
    assert_eq!(d["name"], "app");
    assert_eq!(d["status"], "healthy");
    assert!(d["backups"].as_u64().unwrap() >= 1, "{d:#}");
    for key in [
        "latest_backup",
        "latest_backup_age_seconds",
        "newest_restorable_age_seconds",
        "replication_lag_seconds",
        "last_error",
        "snapshot_age_seconds",
    ] {
        assert!(d.get(key).is_some(), "/health lacks {key}: {d:#}");
    }

    // Writes show up in the counters.
    insert_rows(&s.db, 200);
    let m = wait_metrics(&s, "frames shipped", |m| {
        sample(m, "walship_wal_frames_total{db=\"app\"}").unwrap_or(0.0) > 0.0
    });
    let r = s.get("/metrics");
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(
        ct.contains("openmetrics-text") || ct.contains("text/plain"),
        "{ct}"
    );
    for series in [
        "walship_replication_lag_seconds{db=\"app\"}",
        "walship_last_sync_timestamp_seconds{db=\"app\"}",
        "walship_uploaded_bytes_total{db=\"app\"}",
        "walship_uploaded_objects_total{db=\"app\"}",
        "walship_snapshot_duration_seconds_count{db=\"app\"}",
        "walship_wal_bytes{db=\"app\"}",
        "walship_checkpoints_total{db=\"app\",mode=\"passive\"}",
        "walship_app_checkpoints_total{db=\"app\"}",
        "walship_app_checkpoints_deferred{db=\"app\"}",
        "walship_slow_copy_backs_total{db=\"app\"}",
        "walship_flushes_before_handoff_total{db=\"app\"}",
        "walship_handoffs_postponed_total{db=\"app\"}",
        "walship_handoffs_forced_total{db=\"app\"}",
        "walship_generation_changes_total{db=\"app\"}",
        "walship_health{db=\"app\"}",
    ] {
        assert!(sample(&m, series).is_some(), "no {series} in:\n{m}");
    }
    assert!(sample(&m, "walship_uploaded_bytes_total{db=\"app\"}").unwrap() > 60_000.0);
    assert_eq!(
        sample(&m, "walship_generation_changes_total{db=\"app\"}"),
        Some(1.0)
    );
    assert!(sample(&m, "walship_snapshot_duration_seconds_count{db=\"app\"}").unwrap() >= 1.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let synced = sample(&m, "walship_last_sync_timestamp_seconds{db=\"app\"}").unwrap();
    assert!((now - synced).abs() < 10.0, "last sync {synced}, now {now}");
    s.stop();
}

fn wait_metrics(s: &Server, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = s.get("/metrics").text().unwrap();
        if ok(&m) {
            return m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}; metrics:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn health_turns_critical_while_uploads_fail_and_recovers() {
    let mut s = start(&["--health-warn-age", "1s", "--health-critical-age", "3s"]);
    s.wait_json("/health", "healthy", Duration::from_secs(10), |v| {
        v["status"] == "healthy"
    });
    s.break_replica();
    insert_rows(&s.db, 20);
    // Lag is real: it grows while the committed rows cannot be shipped.
    let m = wait_metrics(&s, "lag over 1.5 s", |m| {
        sample(m, "walship_replication_lag_seconds{db=\"app\"}").unwrap_or(0.0) > 1.5
    });
    assert!(
        m.lines()
            .any(|l| l.starts_with("walship_upload_errors_total{db=\"app\",kind=")),
        "no upload error counted:\n{m}"
    );
    let h = s.wait_json("/health", "critical", Duration::from_secs(20), |v| {
        v["status"] == "critical"
    });
    assert_eq!(s.get("/health").status(), StatusCode::SERVICE_UNAVAILABLE);
    let d = db0(&h);
    assert!(d["last_error"].is_string(), "{d:#}");
    assert!(d["consecutive_errors"].as_u64().unwrap() >= 1);
    assert!(
        d["reasons"][0]
            .as_str()
            .unwrap()
            .contains("newest restorable point"),
        "{d:#}"
    );
    assert!(
        d["replication_lag_seconds"].as_f64().unwrap() >= 2.0,
        "{d:#}"
    );

    s.fix_replica();
    s.wait_json("/health", "healthy again", Duration::from_secs(30), |v| {
        v["status"] == "healthy"
    });
    assert_eq!(s.get("/health").status(), StatusCode::OK);
    let m = s.get("/metrics").text().unwrap();
    let lag = sample(&m, "walship_replication_lag_seconds{db=\"app\"}").unwrap();
    assert!(lag < 1.0, "lag {lag} after recovery:\n{m}");
    // The episode is in the run history, with its error.
    let runs = s.wait_json(
        "/api/v1/databases/app/history",
        "the failed run",
        Duration::from_secs(10),
        |v| {
            v["runs"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["result"] == "failed")
        },
    );
    let failed = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["result"] == "failed")
        .unwrap()
        .clone();
    assert!(failed["error"].as_str().unwrap().len() > 5, "{failed:#}");
    assert!(failed["attempts"].as_u64().unwrap() >= 1);
    assert!(failed["end_ms"].as_i64().unwrap() >= failed["start_ms"].as_i64().unwrap());
    s.stop();
    let rows = count_rows(&s.db);
    let out = s.dir.path().join("restored.db");
    common::restore_ok(&s.url, &out);
    assert_eq!(count_rows(&out), rows, "nothing lost across the outage");
}

#[test]
fn admin_api_with_token_downloads_and_history() {
    let mut s = start(&[]);
    let c = client();
    let api = |p: &str| format!("{}/api/v1/databases/app{p}", s.base);

    // Status.
    let st = s.json("/api/v1/status");
    assert_eq!(st["status"], "healthy");
    assert_eq!(db0(&st)["name"], "app");
    assert_eq!(db0(&st)["replica"], s.url);
    assert!(db0(&st)["generation"].is_string());
    assert_eq!(s.json("/api/v1/databases/app")["name"], "app");

    // Backups.
    let b = s.json("/api/v1/databases/app/backups");
    let gens = b["generations"].as_array().unwrap();
    assert_eq!(gens.len(), 1, "{b:#}");
    assert_eq!(gens[0]["snapshots"].as_array().unwrap().len(), 1);
    for key in ["key", "position", "time", "bytes"] {
        assert!(gens[0]["snapshots"][0].get(key).is_some(), "{b:#}");
    }

    // Snapshot: token required, compared exactly; bad JSON is a clean 400.
    let post = |token: Option<&str>, body: &str| {
        let mut r = c.post(api("/snapshot")).body(body.to_string());
        if let Some(t) = token {
            r = r.header("Authorization", format!("Bearer {t}"));
        }
        r.send().unwrap()
    };
    let r = post(None, "");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().contains_key("www-authenticate"));
    assert_eq!(r.json::<Value>().unwrap()["code"], "unauthorized");
    let r = post(Some("test-token-0123456789abcdeX"), "");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = post(Some(&TOKEN[..TOKEN.len() - 1]), "");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    for bad in ["{\"reason\":", "[1,2]", "{\"reasn\":\"x\"}", "not json"] {
        let r = post(Some(TOKEN), bad);
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
        let v: Value = r.json().unwrap();
        assert_eq!(v["code"], "bad_request", "{v}");
        assert!(v["error"].as_str().unwrap().contains("JSON"), "{v}");
    }
    insert_rows(&s.db, 50);
    let r = post(Some(TOKEN), "{\"reason\": \"pre-deploy\"}");
    assert_eq!(r.status(), StatusCode::OK);
    let snap: Value = r.json().unwrap();
    assert!(snap["bytes"].as_u64().unwrap() > 0, "{snap:#}");
    let b = s.json("/api/v1/databases/app/backups");
    assert_eq!(
        b["generations"][0]["snapshots"].as_array().unwrap().len(),
        2,
        "{b:#}"
    );
    assert_eq!(
        b["generations"][0]["snapshots"][0]["position"],
        snap["position"]
    );

    // Download: token required; the body is the database, verified.
    let r = c.get(api("/download")).send().unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    insert_rows(&s.db, 25);
    let want = count_rows(&s.db);
    s.wait_json("/api/v1/status", "sync", Duration::from_secs(10), |v| {
        db0(v)["unsynced_since"].is_null() && db0(v)["health"]["replication_lag_seconds"] == 0.0
    });
    std::thread::sleep(Duration::from_millis(500));
    let r = c.get(api("/download")).bearer_auth(TOKEN).send().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/vnd.sqlite3");
    assert!(
        r.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .contains("attachment")
    );
    let body = r.bytes().unwrap();
    assert!(body.starts_with(b"SQLite format 3\0"));
    let got = s.dir.path().join("downloaded.db");
    std::fs::write(&got, &body).unwrap();
    let conn = Connection::open(&got).unwrap();
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    assert_eq!(count_rows(&got), want);
    // Nothing left behind in the state directory.
    let leftovers: Vec<_> = std::fs::read_dir(s.db.with_extension("db-walship"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".download-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Point in time: before the first backup there is nothing; a bad time is a 400.
    let r = c
        .get(api("/download?timestamp=2001-01-01T00:00:00Z"))
        .bearer_auth(TOKEN)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = c
        .get(api("/download?timestamp=yesterday"))
        .bearer_auth(TOKEN)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(
        r.json::<Value>().unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("RFC 3339")
    );
    let r = c
        .get(api("/download?when=now"))
        .bearer_auth(TOKEN)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // Restore guide: the exact commands for this deployment.
    let g = s.get("/api/v1/databases/app/restore-guide").text().unwrap();
    let db = s.db.display().to_string();
    assert!(g.contains(&format!("walship generations {}", s.url)), "{g}");
    assert!(
        g.contains(&format!(
            "walship restore --if-db-not-exists --if-replica-exists -o {db} {}",
            s.url
        )),
        "{g}"
    );
    assert!(
        g.contains(&format!(
            "{}/api/v1/databases/app/download",
            s.base.trim_start_matches("http://")
        )),
        "{g}"
    );
    let gj = s.json("/api/v1/databases/app/restore-guide?format=json");
    assert!(gj["commands"].as_array().unwrap().len() >= 5);
    // The first command of the guide works.
    let cmd = gj["commands"][1].as_str().unwrap().to_string();
    assert!(cmd.starts_with("walship restore -o "), "{cmd}");

    // Unknown names and routes, wrong methods: clean JSON 4xx.
    for (method, path, code) in [
        ("GET", "/api/v1/databases/nope", StatusCode::NOT_FOUND),
        (
            "GET",
            "/api/v1/databases/nope/backups",
            StatusCode::NOT_FOUND,
        ),
        ("GET", "/api/v1/nothing", StatusCode::NOT_FOUND),
        ("GET", "/favicon.ico", StatusCode::NOT_FOUND),
        ("GET", "/assets/nope.js", StatusCode::NOT_FOUND),
        (
            "DELETE",
            "/api/v1/databases/app/snapshot",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            "GET",
            "/api/v1/databases/app/snapshot",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        ("POST", "/health", StatusCode::METHOD_NOT_ALLOWED),
        (
            "GET",
            "/api/v1/databases/app/history?limit=many",
            StatusCode::BAD_REQUEST,
        ),
        (
            "GET",
            "/api/v1/databases/app/restore-guide?format=pdf",
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let r = c
            .request(method.parse().unwrap(), format!("{}{path}", s.base))
            .send()
            .unwrap();
        assert_eq!(r.status(), code, "{method} {path}");
        let v: Value = r
            .json()
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON: {e}"));
        assert!(v["error"].is_string(), "{method} {path}: {v}");
    }

    // The run history: the generation's first snapshot and the one asked for.
    let h = s.json("/api/v1/databases/app/history");
    let runs = h["runs"].as_array().unwrap();
    let triggers: Vec<&str> = runs
        .iter()
        .filter(|r| r["kind"] == "snapshot")
        .filter_map(|r| r["trigger"].as_str())
        .collect();
    assert!(triggers.contains(&"new_generation"), "{h:#}");
    assert!(triggers.contains(&"api: pre-deploy"), "{h:#}");
    for r in runs {
        for key in ["start", "end", "bytes", "result"] {
            assert!(r.get(key).is_some(), "{r}");
        }
    }

    s.stop();
    // `walship history` reads the same file, including the batch of WAL uploads closed at
    // shutdown.
    let o = common::walship()
        .args(["history", "--json"])
        .arg(&s.db)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.iter().any(|r| r["trigger"] == "api: pre-deploy"));
    assert!(
        lines.iter().any(|r| r["kind"] == "sync"
            && r["result"] == "ok"
            && r["bytes"].as_u64().unwrap() > 0),
        "{lines:#?}"
    );
    let o = common::walship()
        .arg("history")
        .arg(&s.db)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.starts_with("START"), "{text}");
    assert!(text.contains("snapshot") && text.contains("ok"), "{text}");
    let o = common::walship()
        .arg("history")
        .arg(s.dir.path().join("other.db"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no run history"));
}

#[test]
fn endpoints_that_need_a_token_are_off_without_one() {
    // An unwritable state directory costs the durable history, not replication.
    let mut s = start(&["--no-token", "--state-dir", "/dev/null/walship-state"]);
    let h = s.json("/api/v1/databases/app/history");
    assert!(h["file"].is_null(), "{h:#}");
    assert!(
        std::fs::read_to_string(&s.log)
            .unwrap()
            .contains("run history kept in memory only")
    );
    let c = client();
    let r = c
        .post(format!("{}/api/v1/databases/app/snapshot", s.base))
        .bearer_auth("anything-at-all-here")
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(
        r.json::<Value>().unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("WALSHIP_API_TOKEN")
    );
    let r = c
        .get(format!("{}/api/v1/databases/app/download", s.base))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Reading stays open.
    assert_eq!(s.get("/api/v1/status").status(), StatusCode::OK);
    s.stop();
}
