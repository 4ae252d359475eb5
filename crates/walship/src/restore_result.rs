//! What `walship restore` prints: its result line, its `--json` result, and its
//! `--dry-run` plan (as text or JSON). Formatting only; `main` decides the exit code.

use std::path::Path;

use serde_json::{Value, json};
use walship_engine::RestoreReport;
use walship_engine::replica::Listed;
use walship_engine::restore::{Gap, RestorePlan};
use walship_format::key::ObjectKey;

use crate::http::rfc3339;

/// The result line of a restore that wrote `output` (a partial one says so, and what is
/// missing).
pub fn result_line(output: &Path, replica: &str, r: &RestoreReport) -> String {
    let mut line = format!(
        "restored {} from {replica} (generation {}, position {:#x}, {} objects applied, {} \
         bytes, {} pages, as of {}) in {} ms",
        output.display(),
        r.generation.map(|g| g.to_string()).unwrap_or_default(),
        r.position,
        r.objects_applied(),
        r.bytes,
        r.pages,
        rfc3339(r.timestamp_ms),
        r.elapsed_ms
    );
    if let Some(gap) = &r.gap {
        line.push_str(&format!(
            "; PARTIAL (accepted with --allow-partial): {}",
            gap.describe()
        ));
    }
    if let Some(b) = &r.times_backwards {
        line.push_str(&format!(
            "; object times run backwards: generation {} (ranked lower) holds later times",
            b.lower
        ));
    }
    line
}

/// The `--json` result of a restore: `restored` says whether `output` was written (a
/// partial restore without `--allow-partial` writes nothing).
pub fn result_json(output: &Path, replica: &str, r: &RestoreReport, restored: bool) -> Value {
    json!({
        "restored": restored,
        "output": output.display().to_string(),
        "replica": replica,
        "generation": r.generation.map(|g| g.to_string()),
        "snapshot": r.snapshot,
        "position": r.position,
        "time": rfc3339(r.timestamp_ms),
        "objects_applied": r.objects_applied(),
        "segments": r.segments,
        "bytes": r.bytes,
        "pages": r.pages,
        "elapsed_ms": r.elapsed_ms,
        "skipped": r.skipped.iter().map(|(key, reason)| json!({"key": key, "reason": reason})).collect::<Vec<_>>(),
        "partial": r.partial(),
        "gap": r.gap.as_ref().map(gap_json),
        "times_backwards": r.times_backwards.as_ref().map(|b| json!({
            "restored_generation": b.restored.to_string(),
            "restored_newest": rfc3339(b.restored_newest_ms),
            "lower_generation": b.lower.to_string(),
            "lower_newest": rfc3339(b.lower_newest_ms),
            "description": b.to_string(),
        })),
    })
}

/// The `--json` result of a restore that did not get as far as a report (`reason`: why
/// nothing was restored; `error`: set when that is a failure).
pub fn nothing_json(output: &Path, reason: &str, error: bool) -> Value {
    json!({
        "restored": false,
        "output": output.display().to_string(),
        "partial": false,
        (if error { "error" } else { "reason" }): reason,
    })
}

fn gap_json(g: &Gap) -> Value {
    json!({
        "from": g.from,
        "to": g.to,
        "objects_beyond": g.beyond,
        "description": g.describe(),
    })
}

/// The plan of `--dry-run`, for people: one line per object, then the totals and the gap.
pub fn plan_text(output: &Path, replica: &str, p: &RestorePlan) -> String {
    let mut out = format!(
        "plan: restore {} from {replica}, generation {} (dry run: nothing is downloaded or \
         written)\n",
        output.display(),
        p.generation
    );
    for l in std::iter::once(&p.snapshot).chain(&p.segments) {
        out.push_str(&format!("  {}\n", object_line(l)));
    }
    out.push_str(&format!(
        "  total: {} objects, {} bytes; reaches position {:#x}, as of {}\n",
        1 + p.segments.len(),
        p.bytes,
        p.position,
        rfc3339(p.timestamp_ms)
    ));
    match &p.gap {
        None => out.push_str("  gaps: none\n"),
        Some(g) => {
            out.push_str(&format!("  gap: {}\n", g.describe()));
            for key in &g.beyond {
                out.push_str(&format!("    beyond: {key}\n"));
            }
        }
    }
    out
}

fn object_line(l: &Listed) -> String {
    match l.key {
        ObjectKey::Snapshot {
            position,
            timestamp_ms,
            ..
        } => format!(
            "snapshot {}  {} bytes  position {position:#x}  {}",
            l.name,
            l.size,
            rfc3339(timestamp_ms)
        ),
        ObjectKey::Segment {
            start,
            end,
            timestamp_ms,
            ..
        } => format!(
            "segment  {}  {} bytes  positions {start:#x}..{end:#x}  {}",
            l.name,
            l.size,
            rfc3339(timestamp_ms)
        ),
    }
}

/// The plan of `--dry-run` as JSON.
pub fn plan_json(output: &Path, replica: &str, p: &RestorePlan) -> Value {
    json!({
        "dry_run": true,
        "output": output.display().to_string(),
        "replica": replica,
        "generation": p.generation.to_string(),
        "snapshot": object_json(&p.snapshot),
        "segments": p.segments.iter().map(object_json).collect::<Vec<_>>(),
        "objects": 1 + p.segments.len(),
        "bytes": p.bytes,
        "position": p.position,
        "time": rfc3339(p.timestamp_ms),
        "partial": p.gap.is_some(),
        "gap": p.gap.as_ref().map(gap_json),
    })
}

fn object_json(l: &Listed) -> Value {
    match l.key {
        ObjectKey::Snapshot {
            position,
            timestamp_ms,
            ..
        } => json!({
            "key": l.name, "bytes": l.size, "position": position, "time": rfc3339(timestamp_ms),
        }),
        ObjectKey::Segment {
            start,
            end,
            timestamp_ms,
            ..
        } => json!({
            "key": l.name, "bytes": l.size, "start": start, "end": end, "time": rfc3339(timestamp_ms),
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use walship_format::key::GenerationId;

    fn report(gap: Option<Gap>) -> RestoreReport {
        RestoreReport {
            generation: Some(GenerationId(5)),
            snapshot: "generations/x/snapshots/y.wsnap".into(),
            position: 0x20,
            timestamp_ms: 1_700_000_000_000,
            segments: 2,
            skipped: vec![("k".into(), "bad".into())],
            gap,
            ..Default::default()
        }
    }

    #[test]
    fn the_json_result_names_the_generation_as_keys_do_and_the_time_in_rfc_3339() {
        let v = result_json(Path::new("/o.db"), "file:///r", &report(None), true);
        assert_eq!(v["generation"], GenerationId(5).to_string());
        assert_eq!(v["time"], "2023-11-14T22:13:20.000Z");
        assert_eq!(v["objects_applied"], 3);
        assert_eq!(v["partial"], false);
        assert!(v["gap"].is_null());
        assert_eq!(v["skipped"][0]["reason"], "bad");
    }

    #[test]
    fn a_partial_result_says_so_in_its_line_and_json() {
        let gap = Gap {
            from: 0x20,
            to: Some(0x30),
            beyond: vec!["a".into(), "b".into()],
        };
        let r = report(Some(gap));
        let line = result_line(Path::new("/o.db"), "file:///r", &r);
        assert!(
            line.contains("PARTIAL") && line.contains("0x20 to 0x30"),
            "{line}"
        );
        let v = result_json(Path::new("/o.db"), "file:///r", &r, false);
        assert_eq!(v["partial"], true);
        assert_eq!(v["restored"], false);
        assert_eq!(v["gap"]["from"], 0x20);
        assert_eq!(v["gap"]["to"], 0x30);
        assert_eq!(v["gap"]["objects_beyond"].as_array().unwrap().len(), 2);
    }
}
