"""Shared helpers for tests/deploy: repository paths, linters, the walship binary, demo data.

Linters are looked up next to the running interpreter first (target/test-venv/bin, where
scripts/test-deploy-deps.sh installs them), then on PATH. A missing linter FAILS the test
that needs it: a skipped lint is a lint that silently stopped running.
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

DEPS_HINT = "run `bash scripts/test-deploy-deps.sh` and use target/test-venv/bin/python"

# The demo database every runbook starts from (see docs/runbook-restore.md, "The demo").
DEMO_TABLE = "items"
DEMO_ROWS = 200


def tool(name: str) -> str:
    """Absolute path of a linter executable, or fail the calling test."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(f"{name} is not installed ({DEPS_HINT})", pytrace=False)


def run(cmd: list[str], *, cwd: Path = ROOT, env: dict | None = None, timeout: float = 120,
        input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, input=input, capture_output=True, text=True,
                          timeout=timeout)


def walship_bin() -> Path:
    """The walship binary under test, from WALSHIP_BIN (required for end-to-end tests)."""
    value = os.environ.get("WALSHIP_BIN")
    if not value:
        pytest.fail(
            "WALSHIP_BIN is not set: point it at the walship binary to test, e.g. "
            "`cargo build -p walship && WALSHIP_BIN=$PWD/target/debug/walship "
            "target/test-venv/bin/python -m pytest tests/deploy`",
            pytrace=False,
        )
    path = Path(value).resolve()
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"WALSHIP_BIN={value} is not an executable file", pytrace=False)
    return path


def walship_env(demo_dir: Path) -> dict[str, str]:
    """Environment for running walship (and scripts that call it) against a local replica."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WALSHIP_"))}
    env["PATH"] = f"{walship_bin().parent}{os.pathsep}{env.get('PATH', '')}"
    env["WALSHIP_DEMO_DIR"] = str(demo_dir)
    env.setdefault("RUST_LOG", "info")
    return env


def create_demo_db(path: Path, rows: int = DEMO_ROWS) -> None:
    """A WAL-mode database with `rows` rows of incompressible text in table `items`."""
    rng = random.Random(8)
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        con.execute(
            f"CREATE TABLE {DEMO_TABLE} ("
            " id INTEGER PRIMARY KEY,"
            " body TEXT NOT NULL,"
            " created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"
        )
        with con:
            con.executemany(
                f"INSERT INTO {DEMO_TABLE}(body) VALUES (?)",
                [(f"demo-{i}-{rng.randbytes(96).hex()}",) for i in range(rows)],
            )
    finally:
        con.close()


def count_rows(path: Path, where: str = "1") -> int:
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return con.execute(f"SELECT count(*) FROM {DEMO_TABLE} WHERE {where}").fetchone()[0]
    finally:
        con.close()


@pytest.fixture
def demo(tmp_path: Path):
    """A fresh demo dir holding app.db, already snapshotted to file://<dir>/replica."""
    demo_dir = tmp_path / "demo"
    demo_dir.mkdir()
    env = walship_env(demo_dir)
    db = demo_dir / "app.db"
    create_demo_db(db)
    replica = f"file://{demo_dir / 'replica'}"
    result = run(["walship", "snapshot", str(db), replica], env=env, timeout=60)
    assert result.returncode == 0, (
        f"setup: `walship snapshot {db} {replica}` failed ({result.returncode})\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return demo_dir, env
