"""fly/entrypoint.sh end to end with the real walship ($WALSHIP_BIN) and a local replica.

What a fly.io machine does at boot, minus fly: restore (or not), run the app under
`walship replicate --exec`, final sync when the app exits; then a restore elsewhere must see
every row the app committed.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from conftest import DEMO_ROWS, ROOT, count_rows, create_demo_db, run, walship_env

ENTRYPOINT = ROOT / "fly" / "entrypoint.sh"

# The "application": writes one row tagged with its first argument, then exits 0.
APP = """
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("PRAGMA journal_mode=WAL")
con.execute("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, body TEXT NOT NULL,"
            " created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))")
con.execute("INSERT INTO items(body) VALUES (?)", (sys.argv[2],))
con.close()
"""


# An application that writes until SIGTERM, then shuts down slowly: a second, a last row, the
# id of that row in <marks>/term, exit 3. <marks>/info holds its pid and process group.
APP_UNTIL_TERM = """
import os, signal, sqlite3, sys, time
db, marks = sys.argv[1], sys.argv[2]
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
con = sqlite3.connect(db, isolation_level=None, timeout=30)
con.execute("PRAGMA journal_mode=WAL")
con.execute("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, body TEXT NOT NULL,"
            " created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))")
with open(os.path.join(marks, "info.tmp"), "w") as f:
    f.write(f"{os.getpid()} {os.getpgrp()}")
os.rename(os.path.join(marks, "info.tmp"), os.path.join(marks, "info"))
while not got:
    con.execute("INSERT INTO items(body) VALUES ('row')")
    time.sleep(0.01)
time.sleep(1)
last = con.execute("INSERT INTO items(body) VALUES ('last') RETURNING id").fetchone()[0]
with open(os.path.join(marks, "term"), "w") as f:
    f.write(str(last))
sys.exit(3)
"""


def group_alive(pgid: int) -> list[int]:
    """PIDs of the processes of group `pgid` that can still run (zombies excluded)."""
    alive = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            alive.append(int(entry))
    return alive


def boot(env: dict, db: Path, replica: str, tag: str, marker: Path | None = None):
    env = dict(env, WALSHIP_DB=str(db), WALSHIP_REPLICA_URL=replica)
    code = APP if marker is None else APP + f"\nopen({str(marker)!r}, 'w').close()\n"
    return run(["sh", str(ENTRYPOINT), "python3", "-c", code, str(db), tag], env=env, timeout=120)


def restored(env: dict, replica: str, out: Path) -> Path:
    result = run(["walship", "restore", "-o", str(out), replica], env=env, timeout=60)
    assert result.returncode == 0, f"restore failed:\n{result.stdout}{result.stderr}"
    return out


def test_entrypoint_fresh_machine_restores_then_replicates(demo, tmp_path: Path):
    demo_dir, env = demo
    replica = f"file://{demo_dir / 'replica'}"
    machine_db = tmp_path / "machine" / "data" / "app.db"

    result = boot(env, machine_db, replica, "written-after-boot")
    assert result.returncode == 0, f"entrypoint:\n{result.stdout}{result.stderr}"
    assert count_rows(machine_db) == DEMO_ROWS + 1, "restored before the app started"

    out = restored(env, replica, tmp_path / "check.db")
    assert count_rows(out) == DEMO_ROWS + 1
    assert count_rows(out, "body = 'written-after-boot'") == 1


def test_entrypoint_keeps_existing_database(demo, tmp_path: Path):
    demo_dir, env = demo
    replica = f"file://{demo_dir / 'replica'}"
    # A machine that still has its database (a restart): restore must leave it alone.
    db = tmp_path / "kept" / "app.db"
    db.parent.mkdir()
    create_demo_db(db, rows=3)
    result = boot(env, db, replica, "after-restart")
    assert result.returncode == 0, f"entrypoint:\n{result.stdout}{result.stderr}"
    assert count_rows(db) == 4


def test_entrypoint_first_boot_with_empty_replica(tmp_path: Path):
    demo_dir = tmp_path / "demo"
    demo_dir.mkdir()
    env = walship_env(demo_dir)
    replica_dir = demo_dir / "empty-replica"
    replica_dir.mkdir()
    replica = f"file://{replica_dir}"
    db = tmp_path / "first" / "app.db"

    result = boot(env, db, replica, "very-first-row")
    assert result.returncode == 0, f"entrypoint:\n{result.stdout}{result.stderr}"
    out = restored(env, replica, tmp_path / "check.db")
    assert count_rows(out, "body = 'very-first-row'") == 1


def test_entrypoint_does_not_start_app_when_restore_fails(tmp_path: Path):
    demo_dir = tmp_path / "demo"
    demo_dir.mkdir()
    env = walship_env(demo_dir)
    # A "replica" that is a regular file cannot be listed: restore must fail, the app must not run.
    bogus = demo_dir / "replica-is-a-file"
    bogus.write_text("not a directory\n")
    marker = tmp_path / "app-started"
    db = tmp_path / "m" / "app.db"
    result = boot(env, db, f"file://{bogus}", "never", marker=marker)
    assert result.returncode != 0
    assert not marker.exists(), "the app ran although restore failed"
    assert not db.exists()
    assert "refusing to start the application" in result.stderr


def test_entrypoint_missing_env_is_refused_before_walship_runs(tmp_path: Path):
    demo_dir = tmp_path / "demo"
    demo_dir.mkdir()
    env = walship_env(demo_dir)
    result = run(["sh", str(ENTRYPOINT), "true"], env=env)
    assert result.returncode == 64
    assert "WALSHIP_DB" in result.stderr and "WALSHIP_REPLICA_URL" in result.stderr


def test_entrypoint_sigterm_reaches_the_app_and_the_final_sync_follows_it(demo, tmp_path: Path):
    """SIGTERM to the machine's main process (walship, exec'd by the entrypoint) reaches the app
    the shell runs, walship ships the rows the app commits while it stops and exits with its
    status."""
    demo_dir, env = demo
    replica = f"file://{demo_dir / 'replica'}"
    db = tmp_path / "m" / "data" / "app.db"
    marks = tmp_path / "marks"
    marks.mkdir()
    env = dict(env, WALSHIP_DB=str(db), WALSHIP_REPLICA_URL=replica)
    log = open(tmp_path / "entrypoint.log", "w+")
    proc = subprocess.Popen(
        ["sh", str(ENTRYPOINT), "python3", "-c", APP_UNTIL_TERM, str(db), str(marks)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    app_pid = None
    try:
        deadline = time.monotonic() + 60
        while not (marks / "info").exists():
            assert proc.poll() is None, f"entrypoint exited early: {Path(log.name).read_text()}"
            assert time.monotonic() < deadline, "the app did not start"
            time.sleep(0.05)
        app_pid, pgid = map(int, (marks / "info").read_text().split())
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        out = Path(log.name).read_text()
        assert (marks / "term").exists(), f"the app did not get SIGTERM:\n{out}"
        assert code == 3, f"entrypoint exited {code}, not with the app's status:\n{out}"
        assert group_alive(pgid) == [], "processes of the app outlived walship"
        app_pid = None
        last = int((marks / "term").read_text())
        check = restored(env, replica, tmp_path / "check.db")
        assert count_rows(check) == count_rows(db), "rows written after the final sync"
        assert count_rows(check, f"id = {last} AND body = 'last'") == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if app_pid is not None and app_pid in group_alive(pgid):
            os.kill(app_pid, signal.SIGKILL)
