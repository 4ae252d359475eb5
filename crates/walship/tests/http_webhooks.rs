//! Webhook alerts, received by a local HTTP server: uploads failing repeatedly, health
//! turning warning then critical, and both recovering; a receiver answering 500 gets the
//! alert again (retry with backoff); replication goes on meanwhile.

#![allow(clippy::unwrap_used)]

mod common;
mod http_support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use http_support::*;
use serde_json::Value;

#[derive(Default)]
struct Received {
    /// Every request body, in arrival order (retries included).
    requests: Vec<Value>,
    /// Answer 500 to this many requests first.
    fail_first: usize,
}

type Shared = Arc<Mutex<Received>>;

async fn hook(State(rx): State<Shared>, body: axum::body::Bytes) -> StatusCode {
    let mut r = rx.lock().unwrap();
    r.requests
        .push(serde_json::from_slice(&body).unwrap_or(Value::Null));
    if r.requests.len() <= r.fail_first {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::NO_CONTENT
    }
}

/// A receiver on 127.0.0.1 on its own runtime; returns its URL.
fn receiver(rx: Shared) -> (String, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/hook", post(hook))
        .with_state(rx);
    rt.spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), rt)
}

fn events(rx: &Shared) -> Vec<String> {
    rx.lock()
        .unwrap()
        .requests
        .iter()
        .filter_map(|v| v["event"].as_str().map(str::to_string))
        .collect()
}

fn wait_event(rx: &Shared, event: &str, s: &Server, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = rx
            .lock()
            .unwrap()
            .requests
            .iter()
            .find(|v| v["event"] == event)
        {
            return v.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no `{event}` alert within {timeout:?}; got {:?}; log:\n{}",
            events(rx),
            common::tail(&s.log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn alerts_on_failures_and_health_changes_then_on_recovery() {
    let rx: Shared = Arc::new(Mutex::new(Received {
        fail_first: 1,
        ..Default::default()
    }));
    let (url, _rt) = receiver(rx.clone());
    let mut s = start(&[
        "--webhook",
        &url,
        "--alert-after-failures",
        "2",
        "--health-warn-age",
        "1s",
        "--health-critical-age",
        "4s",
    ]);
    // Healthy and quiet: no alert at all.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(events(&rx).is_empty(), "{:?}", events(&rx));

    s.break_replica();
    insert_rows(&s.db, 20);
    let failing = wait_event(&rx, "upload_failing", &s, Duration::from_secs(20));
    assert_eq!(failing["db"], "app");
    assert!(
        failing["text"].as_str().unwrap().contains("failed"),
        "{failing:#}"
    );
    assert!(failing["health"]["last_error"].is_string(), "{failing:#}");
    let warning = wait_event(&rx, "health_warning", &s, Duration::from_secs(20));
    assert_eq!(warning["status"], "warning");
    assert_eq!(warning["previous"], "healthy");
    let critical = wait_event(&rx, "health_critical", &s, Duration::from_secs(20));
    assert_eq!(critical["status"], "critical");
    assert_eq!(critical["replica"], s.url);
    assert!(critical["time"].as_str().unwrap().ends_with('Z'));

    // The first request was answered 500: the same alert came again.
    let first = rx.lock().unwrap().requests[0].clone();
    let again = rx
        .lock()
        .unwrap()
        .requests
        .iter()
        .skip(1)
        .filter(|v| v["event"] == first["event"] && v["time_ms"] == first["time_ms"])
        .count();
    assert_eq!(again, 1, "no retry of {first:#}");

    s.fix_replica();
    let recovered = wait_event(&rx, "upload_recovered", &s, Duration::from_secs(30));
    assert_eq!(recovered["db"], "app");
    let healthy = wait_event(&rx, "health_recovered", &s, Duration::from_secs(30));
    assert_eq!(healthy["status"], "healthy");
    assert_eq!(healthy["previous"], "critical");

    // Each change was told once (apart from the retried one).
    let ev = events(&rx);
    for e in [
        "upload_failing",
        "health_warning",
        "health_critical",
        "upload_recovered",
        "health_recovered",
    ] {
        let n = ev.iter().filter(|x| *x == e).count();
        let want = if e == first["event"] { 2 } else { 1 };
        assert_eq!(n, want, "{e}: {ev:?}");
    }
    s.stop();
    // Nothing was lost while alerts were being sent.
    let out = s.dir.path().join("restored.db");
    common::restore_ok(&s.url, &out);
    assert_eq!(count_rows(&out), count_rows(&s.db));
}

#[test]
fn a_dead_webhook_never_holds_up_replication() {
    // Nothing listens on this port: every delivery fails and is retried in the background.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/hook", l.local_addr().unwrap())
    };
    let mut s = start(&[
        "--webhook",
        &dead,
        "--alert-after-failures",
        "1",
        "--health-warn-age",
        "1s",
        "--health-critical-age",
        "2s",
    ]);
    s.break_replica();
    insert_rows(&s.db, 10);
    s.wait_json("/health", "critical", Duration::from_secs(20), |v| {
        v["status"] == "critical"
    });
    s.fix_replica();
    insert_rows(&s.db, 10);
    let t0 = Instant::now();
    s.wait_json("/health", "healthy", Duration::from_secs(20), |v| {
        v["status"] == "healthy"
    });
    assert!(t0.elapsed() < Duration::from_secs(15));
    // SIGTERM still exits promptly, with pending deliveries dropped after a bounded wait.
    let t0 = Instant::now();
    s.stop();
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    let out = s.dir.path().join("restored.db");
    common::restore_ok(&s.url, &out);
    assert_eq!(count_rows(&out), count_rows(&s.db));
}
