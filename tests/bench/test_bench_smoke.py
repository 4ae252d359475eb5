"""Smoke run of the benchmark harness (`benches/run.py --smoke`), so that it cannot rot.

Runs every section (write load, lag, restore/memory/snapshot cost, idle, operations) at toy sizes against
file:// and a moto S3 server on 127.0.0.1, without Litestream, in well under a minute. It checks
that the harness works and that what it measured is sane (every replicator exited 0, every
restore was verified equal to its source, every commit became restorable); it does not judge
the performance targets, which only the full run (`python3 benches/run.py`) measures.

Needs: moto_server (scripts/test-deps.sh puts it in target/test-venv) and a walship binary
(WALSHIP_BIN, else the newer of target/release/walship and target/debug/walship).

    target/test-venv/bin/python -m pytest tests/bench -q
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def walship_bin() -> Path:
    value = os.environ.get("WALSHIP_BIN")
    if value:
        return Path(value).resolve()
    cands = [p for p in (ROOT / "target/release/walship", ROOT / "target/debug/walship")
             if p.is_file()]
    if not cands:
        pytest.fail("no walship binary: `cargo build -p walship` or set WALSHIP_BIN",
                    pytrace=False)
    return max(cands, key=lambda p: p.stat().st_mtime)


def moto_available() -> bool:
    return any(p.is_file() for p in (Path(sys.executable).parent / "moto_server",
                                     ROOT / "target/test-venv/bin/moto_server")) or \
        shutil.which("moto_server") is not None


def test_bench_smoke(tmp_path: Path) -> None:
    if not moto_available():
        pytest.fail("moto_server not found: run scripts/test-deps.sh", pytrace=False)
    out = tmp_path / "results.md"
    cmd = [sys.executable, str(ROOT / "benches/run.py"), "--smoke", "--bin", str(walship_bin()),
           "--out", str(out), "--work", str(tmp_path / "work")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-6000:]}"

    report = out.read_text()
    for heading in ("## Targets", "## 1. Write-load impact", "## 2. Replication lag",
                    "## 3. Restore speed", "## 6. Snapshot cost", "## 5. Idle cost",
                    "## 7. Operations"):
        assert heading in report, f"{heading!r} missing from the report:\n{report}"
    assert report in r.stdout, "the report is not printed"
    # every write-throughput target names the machine's own noise beside it
    assert report.count("A/A control") >= 4, report

    raw = json.loads(out.with_suffix(".json").read_text())
    configs = {"walship/file", "walship/s3"}
    for kind in ("small", "large"):
        got = {x["config"] for x in raw["load"] if x["kind"] == kind}
        assert got == configs | {"none", "none again (A/A)"}, (kind, got)
    for x in raw["load"]:
        assert x["txns"] > 0 and x["errors"] == 0, x
        if not x["config"].startswith("none"):
            assert x["exit"] == 0 and x["maxrss_mib"] > 0, x

    assert {x["config"] for x in raw["bursts"]} == configs | {"none again (A/A)"}
    for x in raw["bursts"]:
        assert x["a"]["txns"] > 0 and x["b"]["txns"] > 0 and x["errors"] == 0, x
        assert sorted(w for w, *_ in x["slices"]) == [0, 1], x
        assert all(0 < h <= n for _, n, _, h in x["slices"]), x
        assert x["head_ratio"] > 0, x
        if not x["config"].startswith("none"):
            assert x["exit"] == 0 and x["maxrss_mib"] > 0, x
    assert "### Bursts" in report and "bursts after idle, walship/file" in report, report
    assert "first 300 ms B/A" in report, report

    assert {x["config"] for x in raw["lag"]} == configs
    for x in raw["lag"]:
        assert x["commits"] > 0 and x["not_seen"] == 0 and x["exit"] == 0, x
        assert 0 <= x["p50_s"] <= x["p99_s"] < 30, x
        # every commit is matched to the object that carries it, by WAL position
        assert x["durable_unmatched"] == 0, x
        assert 0 <= x["durable_p50_s"] <= x["durable_p99_s"] < 30, x

    assert {x["config"] for x in raw["big"]} == configs
    for x in raw["big"]:
        assert x["replicate_exit"] == 0 and x["objects"] >= 2 and x["snapshot_s"] > 0, x
    assert {x["base"] for x in raw["restore"]} == configs
    for x in raw["restore"]:
        assert x["exit"] == 0 and x["verified"] is True and x["mb_per_s"] > 0, x

    assert {x["config"] for x in raw["idle"]} == configs
    for x in raw["idle"]:
        assert x["exit"] == 0 and x["requests"]["total"] >= 0 and x["cpu_pct"] is not None, x

    ops = raw["ops"]
    assert {x["what"] for x in ops} == {"app_truncate", "restart"}, ops
    for x in ops:
        assert x["exit"] == 0 and x["config"] == "walship/file", x
        if x["what"] == "app_truncate":
            # Judged here only for what it proves about the harness: the calls ran, and the
            # replica restored equal to the source afterwards.
            assert len(x["seconds"]) == 5 and x["verified"] is True, x
        else:
            assert x["catch_up_s"] is not None and x["not_seen"] == 0, x
