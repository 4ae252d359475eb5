#!/usr/bin/env python3
"""Stand-ins for one part of a replicator each, for the harness's `diag` section: they show
which part of replication costs the writer what. Each runs until SIGTERM. Stdlib only.

  pin DB     holds a read transaction open on DB (what a replicator's pin does)
  watch DIR  reads inotify events of DIR as they come (what a file-notification wake-up does)
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sqlite3
import sys

stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))


def pin(db: str) -> None:
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("BEGIN")
    con.execute("SELECT count(*) FROM sqlite_master").fetchone()
    con.execute("SELECT count(*) FROM bench").fetchone()
    while not stop:
        signal.pause()


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


if __name__ == "__main__":
    {"pin": pin, "watch": watch}[sys.argv[1]](sys.argv[2])
