#!/usr/bin/env python3
"""Stand-ins for one part of a replicator each, for the harness's `diag` section: they show
which part of replication costs the writer what. Each runs until SIGTERM. Stdlib only.

  pin DB [MS]      holds a read transaction open on DB (what a replicator's pin does); with
                   MS, takes a new one every MS milliseconds before ending the old, so the WAL
                   is never unpinned but checkpoints can copy up to the newer mark (what a
                   replicator that ships and moves its pin on does)
  watch DIR        reads inotify events of DIR as they come (what a file-notification wake-up
                   does)
  framewrite DIR   no database: writes 4120-byte WAL-sized frames (two pwrites each, as
                   SQLite does) round a 4 MiB and a 256 MiB region of a file already in the page
                   cache, 2 s each, and prints frames/s of each as JSON: what writing into a
                   WAL larger than the CPU's cache costs, whoever keeps it large
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import sqlite3
import sys
import time

stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))


def _begin_read(con: sqlite3.Connection) -> None:
    con.execute("BEGIN")
    con.execute("SELECT count(*) FROM sqlite_master").fetchone()
    con.execute("SELECT count(*) FROM bench").fetchone()


def pin(db: str, every_ms: str | None = None) -> None:
    cons = [sqlite3.connect(db, isolation_level=None) for _ in range(2)]
    _begin_read(cons[0])
    if every_ms is None:
        while not stop:
            signal.pause()
        return
    moves = 0
    while not stop:
        time.sleep(int(every_ms) / 1000)
        # The new read transaction begins before the old one ends: never unpinned.
        _begin_read(cons[1])
        cons[0].execute("COMMIT")
        cons.reverse()
        moves += 1
    print(f"pin: moved {moves} times", file=sys.stderr)


def watch(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    # IN_MODIFY | IN_CLOSE_WRITE | IN_CREATE | IN_DELETE | IN_MOVED_TO, like a file watcher
    libc.inotify_add_watch(fd, path.encode(), 0x2 | 0x8 | 0x100 | 0x200 | 0x80)
    events = 0
    while not stop:
        try:
            r, _, _ = select.select([fd], [], [], 0.5)
        except InterruptedError:
            continue
        if r:
            os.read(fd, 1 << 16)
            events += 1
    print(f"watch: {events} wake-ups", file=sys.stderr)


def framewrite(d: str) -> None:
    frame, header = os.urandom(4096), os.urandom(24)
    out = {}
    for mib in (4, 256):
        path = os.path.join(d, f"framewrite-{mib}.bin")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            n = mib * 1024 * 1024 // 4120
            for i in range(n):  # first pass: the region is in the page cache afterwards
                os.pwrite(fd, header, 32 + i * 4120)
                os.pwrite(fd, frame, 56 + i * 4120)
            k, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 2:
                for _ in range(1000):
                    i = k % n
                    os.pwrite(fd, header, 32 + i * 4120)
                    os.pwrite(fd, frame, 56 + i * 4120)
                    k += 1
            out[f"{mib}MiB"] = k / (time.perf_counter() - t0)
        finally:
            os.close(fd)
            os.unlink(path)
    print(json.dumps(out))


if __name__ == "__main__":
    {"pin": pin, "watch": watch, "framewrite": framewrite}[sys.argv[1]](*sys.argv[2:])
