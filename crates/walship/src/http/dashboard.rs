//! The dashboard at `/`: one HTML page with its script and style embedded in the binary
//! (`assets/`), no external requests. The page carries the current status and recent runs
//! inline, so it renders at once; the script then refreshes from the JSON API every 5 s.

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::AppState;
use super::api::status_doc;
use super::error::ApiError;
use super::monitor::runs_of;

const PAGE: &str = include_str!("../../assets/dashboard.html");
const SCRIPT: &str = include_str!("../../assets/dashboard.js");
const STYLE: &str = include_str!("../../assets/dashboard.css");

/// Runs per database carried in the page.
const PAGE_RUNS: usize = 200;

pub async fn page(State(state): State<AppState>) -> Html<String> {
    let mut history = Map::new();
    for d in &state.inner.dbs {
        history.insert(d.db.name.clone(), json!(runs_of(d, PAGE_RUNS)));
    }
    let initial = json!({ "status": status_doc(&state), "history": Value::Object(history) });
    Html(PAGE.replace("{{INITIAL}}", &script_json(&initial)))
}

/// JSON safe inside a `<script>` element.
fn script_json(v: &Value) -> String {
    v.to_string()
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
}

pub async fn asset(Path(file): Path<String>) -> Response {
    let (body, ty) = match file.as_str() {
        "dashboard.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "dashboard.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return ApiError::not_found(format!("no asset `{file}`")).into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, ty),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_json_cannot_close_the_script() {
        let s = script_json(&json!({"e": "</script><b>&"}));
        assert!(!s.contains('<') && !s.contains('>'), "{s}");
        let back: Value = serde_json::from_str(&s).unwrap_or_default();
        assert_eq!(back["e"], "</script><b>&");
    }

    #[test]
    fn the_page_has_its_placeholder_and_no_external_url() {
        assert!(PAGE.contains("{{INITIAL}}"));
        for text in [PAGE, SCRIPT, STYLE] {
            assert!(
                !text.contains("https://"),
                "assets must not load anything external"
            );
            assert!(
                !text.contains("//cdn"),
                "assets must not load anything external"
            );
        }
    }
}
