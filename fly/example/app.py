"""A tiny example application for the walship fly.io image (standard library only).

It keeps a visit counter in the SQLite database named by WALSHIP_DB (WAL mode, as walship
requires) and serves it over HTTP on PORT (default 8080). walship restores the database
before this process starts and replicates every committed write while it runs.

  GET /         count this visit and return the number of visits so far
  GET /healthz  200 once the database is open
"""

import http.server
import json
import os
import signal
import sqlite3
import sys
import threading

DB = os.environ.get("WALSHIP_DB", "/data/app.db")
PORT = int(os.environ.get("PORT", "8080"))

_lock = threading.Lock()


def open_db() -> sqlite3.Connection:
    con = sqlite3.connect(DB, check_same_thread=False, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    # walship runs the checkpoints; the app may keep its own, walship copes either way.
    con.execute("PRAGMA busy_timeout=5000")
    con.execute(
        "CREATE TABLE IF NOT EXISTS visits ("
        " id INTEGER PRIMARY KEY,"
        " at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),"
        " path TEXT NOT NULL)"
    )
    return con


CON = open_db()


class Handler(http.server.BaseHTTPRequestHandler):
    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        if self.path == "/healthz":
            self._send(200, {"status": "ok"})
            return
        with _lock:
            CON.execute("INSERT INTO visits(path) VALUES (?)", (self.path,))
            (count,) = CON.execute("SELECT count(*) FROM visits").fetchone()
        self._send(200, {"visits": count})

    def log_message(self, fmt: str, *args) -> None:
        sys.stderr.write("app: " + (fmt % args) + "\n")


def main() -> None:
    server = http.server.ThreadingHTTPServer(("0.0.0.0", PORT), Handler)

    def stop(signum, _frame):
        sys.stderr.write(f"app: signal {signum}, shutting down\n")
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sys.stderr.write(f"app: serving {DB} on :{PORT}\n")
    server.serve_forever()
    CON.close()


if __name__ == "__main__":
    main()
