#!/usr/bin/env bash
# The main job, end to end, on this machine: builds walship, replicates a demo database to a
# local directory while an app writes to it, stops with SIGTERM (final sync), then restores
# the replica into a new file and compares the two.
#
#   scripts/demo.sh [REPLICA_URL]
#
# REPLICA_URL defaults to a local directory (file:///...); pass an s3:// URL to use S3 (see
# README.md for the URL form and credentials).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo build -p walship
walship="$root/target/debug/walship"

work="$(mktemp -d "${TMPDIR:-/tmp}/walship-demo.XXXXXX")"
db="$work/app.db"
replica="${1:-file://$work/replica}"
echo "demo: database $db, replica $replica"

python3 - "$db" <<'PY'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
c.execute("PRAGMA journal_mode=WAL")
c.execute("CREATE TABLE IF NOT EXISTS notes(id INTEGER PRIMARY KEY, body TEXT)")
c.executemany("INSERT INTO notes(body) VALUES (?)", [(f"note {i}",) for i in range(1000)])
c.commit()
PY

"$walship" replicate "$db" "$replica" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
sleep 1

python3 - "$db" <<'PY'
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1])
for i in range(200):
    c.execute("INSERT INTO notes(body) VALUES (?)", (f"live note {i}",))
    c.commit()
    time.sleep(0.005)
PY

kill -TERM "$pid"
wait "$pid"
trap - EXIT
echo "demo: replicate exited after its final sync"

"$walship" generations "$replica"
"$walship" restore -o "$work/restored.db" "$replica"

python3 - "$db" "$work/restored.db" <<'PY'
import sqlite3, sys
q = "SELECT count(*), max(id), group_concat(body, '|') FROM notes"
a = sqlite3.connect(sys.argv[1]).execute(q).fetchone()
b = sqlite3.connect(sys.argv[2]).execute(q).fetchone()
ok = a == b
print(f"demo: source has {a[0]} notes, restored copy has {b[0]}: {'identical' if ok else 'DIFFERENT'}")
sys.exit(0 if ok else 1)
PY
echo "demo: files are in $work"
