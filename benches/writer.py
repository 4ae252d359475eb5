#!/usr/bin/env python3
"""The benchmark's application: one SQLite writer in its own process.

The same program runs for every configuration (no replicator, walship, Litestream), so the
configurations differ only in what runs beside it. Stdlib only.

Kinds of transaction:
  small   one INSERT of a ~100-byte row into `bench`
  large   one INSERT ... SELECT of 256 rows of 1 KiB into `bench` (~256 KiB, ~70 pages)
  update  UPDATE of --rows random rows of table `big` (made by run.py's generator): body and v

Runs --seconds (or until SIGTERM, which ends it cleanly with its summary written).

Writes a JSON summary to --stats (txn count, txn/s, latency percentiles of a whole
transaction, BEGIN to COMMIT returned) and, with --timeline, a binary file of float64 pairs
(wall-clock commit time, last row id) for every committed transaction. With --wal-pos each
record has three more: the WAL's salt-1, salt-2 and last valid frame after the commit, read
from the WAL index (`-shm`) SQLite just updated, so a driver can match each commit to the
replica object that carries it.

With --alt-db the writer alternates between two databases in slices of --slice seconds (A B B
A A B ...), with --gap seconds of pause after each, small or large transactions at the max
rate; --seconds is then each database's writing time, and the summary has one entry per
database (`per_db`) and the transactions of each slice (`slices`).
"""

from __future__ import annotations

import argparse
import array
import json
import mmap
import random
import signal
import sqlite3
import struct
import sys
import time

SMALL_SQL = "INSERT INTO bench(t, body) VALUES (?, randomblob(50) || zeroblob(50))"
LARGE_SQL = (
    "INSERT INTO bench(t, body) SELECT ?, randomblob(512) || zeroblob(512) FROM "
    "(WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r WHERE x < 256) "
    "SELECT x FROM r)"
)


def percentile(sorted_values, q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


class WalIndex:
    """Reads the WAL index header's first copy: mxFrame (native byte order, offset 16) and
    the WAL salts (as the WAL header holds them, big-endian, offset 32)."""

    def __init__(self, db: str):
        self.f = open(db + "-shm", "rb")
        self.m = mmap.mmap(self.f.fileno(), 0, access=mmap.ACCESS_READ)

    def position(self) -> tuple[int, int, int]:
        (mx_frame,) = struct.unpack_from("=I", self.m, 16)
        salt1, salt2 = struct.unpack_from(">II", self.m, 32)
        return salt1, salt2, mx_frame


def open_db(args, path: str):
    con = sqlite3.connect(path, isolation_level=None, timeout=30)
    mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        print(f"writer: journal_mode is {mode}, not wal", file=sys.stderr)
        return None
    con.execute(f"PRAGMA synchronous={args.synchronous}")
    con.execute(f"PRAGMA wal_autocheckpoint={args.autocheckpoint}")
    con.execute("PRAGMA busy_timeout=30000")
    if args.kind in ("small", "large"):
        con.execute(
            "CREATE TABLE IF NOT EXISTS bench(id INTEGER PRIMARY KEY, t REAL NOT NULL, body BLOB)"
        )
    return con


def roll_back(con, e: Exception) -> None:
    print(f"writer: {e}", file=sys.stderr)
    try:
        con.execute("ROLLBACK")
    except sqlite3.OperationalError:
        pass


def summary(lat, elapsed: float) -> dict:
    s = sorted(lat)
    return {
        "txns": len(lat),
        "seconds": elapsed,
        "txn_per_s": len(lat) / elapsed if elapsed > 0 else 0.0,
        "p50_ms": percentile(s, 0.50) * 1e3,
        "p99_ms": percentile(s, 0.99) * 1e3,
        "max_ms": (s[-1] * 1e3) if s else float("nan"),
    }


# The head of a slice: its first this many seconds, when a replicator woken from an idle
# spell has not caught up yet.
HEAD_S = 0.3


def alternate(args, a, b) -> int:
    """Max-rate transactions on two databases in turn, --slice seconds each, in the order
    A B B A A B B A ... (so that a drift of the machine's speed during the run falls on both
    alike), with --gap seconds of pause after each slice. --seconds is the writing time of
    each database. Each slice records (database, transactions, seconds, transactions in its
    first HEAD_S seconds)."""
    sql = SMALL_SQL if args.kind == "small" else LARGE_SQL
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    cons = (a, b)
    lats = (array.array("d"), array.array("d"))
    spent = [0.0, 0.0]
    slices_done = []
    errors = 0
    wall_start = time.time()
    slices = max(2, round(2 * args.seconds / args.slice))
    slices += slices % 2
    for i in range(slices):
        if stop:
            break
        which = (0, 1, 1, 0)[i % 4]
        con, lat = cons[which], lats[which]
        n0 = len(lat)
        t_start = time.perf_counter()
        deadline = t_start + args.slice
        head_end = t_start + min(HEAD_S, args.slice)
        n_head = None
        while time.perf_counter() < deadline and not stop:
            t0 = time.perf_counter()
            try:
                con.execute("BEGIN IMMEDIATE")
                con.execute(sql, (time.time(),))
                con.execute("COMMIT")
            except sqlite3.OperationalError as e:
                errors += 1
                roll_back(con, e)
                continue
            t1 = time.perf_counter()
            lat.append(t1 - t0)
            if n_head is None and t1 >= head_end:
                n_head = len(lat) - n0
        took = time.perf_counter() - t_start
        spent[which] += took
        slices_done.append((which, len(lat) - n0, took,
                            len(lat) - n0 if n_head is None else n_head))
        if args.gap:
            time.sleep(args.gap)
    a.close()
    b.close()
    stats = {
        "kind": args.kind,
        "rate": 0.0,
        "errors": errors,
        "wall_start": wall_start,
        "slice_s": args.slice,
        "gap_s": args.gap,
        "per_db": [summary(lats[k], spent[k]) for k in (0, 1)],
        "slices": slices_done,
    }
    with open(args.stats, "w") as f:
        json.dump(stats, f)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--kind", choices=["small", "large", "update"], default="small")
    ap.add_argument("--rate", type=float, default=0.0, help="transactions/s; 0 = as fast as possible")
    ap.add_argument("--rows", type=int, default=8, help="rows per update transaction")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--synchronous", default="NORMAL")
    ap.add_argument("--autocheckpoint", type=int, default=1000,
                    help="PRAGMA wal_autocheckpoint (SQLite's default 1000; 0 = off)")
    ap.add_argument("--stats", required=True)
    ap.add_argument("--timeline")
    ap.add_argument("--wal-pos", action="store_true",
                    help="add the WAL position after each commit to the timeline")
    ap.add_argument("--start-at", type=float, default=0.0,
                    help="wall-clock time to start at (lets the driver align windows)")
    ap.add_argument("--alt-db",
                    help="a second database: the writer alternates between the two in slices "
                         "(A B B A A B ...), and the summary has one entry per database")
    ap.add_argument("--slice", type=float, default=1.0, help="seconds per slice with --alt-db")
    ap.add_argument("--gap", type=float, default=0.0,
                    help="seconds of pause after each slice with --alt-db (counted in neither)")
    args = ap.parse_args()

    con = open_db(args, args.db)
    if con is None:
        return 2
    if args.alt_db:
        if args.kind not in ("small", "large") or args.rate or args.timeline:
            print("writer: --alt-db is for small or large transactions at the max rate",
                  file=sys.stderr)
            return 2
        alt = open_db(args, args.alt_db)
        if alt is None:
            return 2
        return alternate(args, con, alt)
    max_big = 0
    if args.kind == "update":
        max_big = con.execute("SELECT max(id) FROM big").fetchone()[0] or 0
        if max_big == 0:
            print("writer: table big is empty", file=sys.stderr)
            return 2
    wal_index = WalIndex(args.db) if args.wal_pos and args.timeline else None
    rng = random.Random(args.seed)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))

    lat = array.array("d")
    timeline = array.array("d")
    errors = 0
    if args.start_at:
        delay = args.start_at - time.time()
        if delay > 0:
            time.sleep(delay)
    t_start = time.perf_counter()
    wall_start = time.time()
    deadline = t_start + args.seconds
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    n = 0
    while True:
        now = time.perf_counter()
        if interval:
            due = t_start + n * interval
            if due >= deadline:
                break
            if due > now:
                time.sleep(due - now)
        elif now >= deadline:
            break
        if stop:
            break
        t0 = time.perf_counter()
        try:
            con.execute("BEGIN IMMEDIATE")
            if args.kind == "small":
                cur = con.execute(SMALL_SQL, (time.time(),))
            elif args.kind == "large":
                cur = con.execute(LARGE_SQL, (time.time(),))
            else:
                ids = [(rng.randint(1, max_big),) for _ in range(args.rows)]
                cur = con.executemany(
                    "UPDATE big SET v = v + 1, body = randomblob(length(body) / 2) || "
                    "zeroblob(length(body) - length(body) / 2) WHERE id = ?",
                    ids,
                )
            con.execute("COMMIT")
        except sqlite3.OperationalError as e:
            errors += 1
            roll_back(con, e)
            n += 1
            continue
        t1 = time.perf_counter()
        lat.append(t1 - t0)
        if args.timeline is not None:
            timeline.append(time.time())
            timeline.append(float(cur.lastrowid or 0))
            if wal_index is not None:
                timeline.extend(wal_index.position())
        n += 1
    elapsed = time.perf_counter() - t_start
    con.close()

    stats = {
        "kind": args.kind,
        "rate": args.rate,
        "errors": errors,
        "wall_start": wall_start,
        **summary(lat, elapsed),
    }
    with open(args.stats, "w") as f:
        json.dump(stats, f)
    if args.timeline is not None:
        with open(args.timeline, "wb") as f:
            timeline.tofile(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
