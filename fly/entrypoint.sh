#!/bin/sh
# walship container entrypoint: restore the SQLite database, then run the application
# under `walship replicate` so every committed transaction is shipped while it runs and a
# final sync happens when the machine is stopped.
#
# Usage (as the image's ENTRYPOINT, with the application as CMD):
#
#   ENTRYPOINT ["/usr/local/bin/walship-entrypoint"]
#   CMD ["python3", "/app/app.py"]
#
# Environment:
#   WALSHIP_DB            required  path of the application's SQLite database, e.g. /data/app.db
#   WALSHIP_REPLICA_URL   required  file:///abs/dir or s3://bucket/prefix?region=...&endpoint=...
#   WALSHIP_LISTEN        optional  address for walship's HTTP status server (/health, /metrics),
#                                   e.g. 0.0.0.0:9090; passed as `--listen` when set (and when
#                                   the walship build supports it)
#   WALSHIP_BIN           optional  walship executable to run (default: `walship` from PATH)
#   WALSHIP_RESTORE_ALLOW_PARTIAL
#                         optional  `1` or `true`: boot even when the replica has a gap (a
#                                   missing or damaged segment, a damaged newest snapshot),
#                                   on the older point the restore reaches (`--allow-partial`).
#                                   Unset by default: a partial restore stops the boot. Set it
#                                   only after reading docs/runbook-emergency.md, section 3,
#                                   and unset it once the machine is up.
#   AWS_ROLE_ARN, AWS_WEB_IDENTITY_TOKEN_FILE, AWS_REGION, ...
#                                   read by walship's AWS SDK credential chain, not by this script
#
# Boot sequence:
#   1. `walship restore --if-db-not-exists --if-replica-exists`: a fresh machine gets the newest
#      restorable state; a machine that still has its database keeps it; an empty replica (the
#      very first boot) starts the app on a new, empty database. Any other failure (bucket
#      unreachable, access denied, nothing consistent to restore, a partial restore: objects
#      beyond a gap the restore cannot cross) stops the boot here: starting the app on an
#      empty or older database would fork the history, so we refuse and let the platform
#      retry. See docs/runbook-emergency.md.
#   2. `exec walship replicate DB URL --exec "APP"`: walship replaces this shell as the main
#      process (no shell stays in between to swallow signals), starts the app after its first
#      sync in a process group of its own, forwards SIGTERM/SIGINT/SIGHUP to the whole group,
#      makes a final sync once every process of the app has exited (SIGKILLing them after
#      --shutdown-timeout, 30 s), and exits with the app's status. Give the platform's kill
#      timeout room for the app's shutdown and that sync (fly.toml uses 60 s).
#
# The application command is handed to `--exec` as one string (the CLI contract), which walship
# runs with `/bin/sh -c`. Arguments that are not plain words are single-quoted (sh word rules),
# so arguments with spaces or quotes survive the shell's word splitting of that string.

set -eu

prog='walship-entrypoint'

die() {
    printf '%s: error: %s\n' "$prog" "$*" >&2
    exit 64
}

missing=""
[ -n "${WALSHIP_DB:-}" ] || missing="$missing WALSHIP_DB"
[ -n "${WALSHIP_REPLICA_URL:-}" ] || missing="$missing WALSHIP_REPLICA_URL"
if [ -n "$missing" ]; then
    die "required environment variable(s) not set:$missing (set WALSHIP_DB to the database path, e.g. /data/app.db, and WALSHIP_REPLICA_URL to file:///dir or s3://bucket/prefix; on fly.io put them in fly.toml [env])"
fi

if [ "$#" -eq 0 ]; then
    die "no application command given (pass it as the image CMD or as arguments, e.g. walship-entrypoint python3 /app/app.py)"
fi

case "$WALSHIP_DB" in
    /*) ;;
    *) die "WALSHIP_DB must be an absolute path, got '$WALSHIP_DB'" ;;
esac

case "$WALSHIP_REPLICA_URL" in
    file:///*|s3://?*) ;;
    *) die "WALSHIP_REPLICA_URL must start with file:/// or s3://, got '$WALSHIP_REPLICA_URL'" ;;
esac

walship=${WALSHIP_BIN:-walship}
if ! command -v "$walship" >/dev/null 2>&1; then
    die "walship executable '$walship' not found (install it at /usr/local/bin/walship or set WALSHIP_BIN)"
fi

db_dir=$(dirname -- "$WALSHIP_DB")
mkdir -p -- "$db_dir" || die "cannot create database directory '$db_dir'"

# Quote one argument for sh-style word splitting. Plain words (letters, digits and
# _ . / : = @ % + , -) pass unchanged, so simple commands read the same under any splitting
# rule; anything else is wrapped in single quotes, each embedded single quote becoming '\''.
quote() {
    case "$1" in
        '' | *[!A-Za-z0-9_./:=@%+,-]*)
            printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")" ;;
        *)
            printf '%s' "$1" ;;
    esac
}

app_cmd=""
for arg in "$@"; do
    if [ -z "$app_cmd" ]; then
        app_cmd=$(quote "$arg")
    else
        app_cmd="$app_cmd $(quote "$arg")"
    fi
done

set -- restore --if-db-not-exists --if-replica-exists
case "${WALSHIP_RESTORE_ALLOW_PARTIAL:-}" in
    '' | 0 | false) ;;
    1 | true)
        printf '%s: warning: WALSHIP_RESTORE_ALLOW_PARTIAL is set: a partial restore (an older point, objects beyond a gap left out) will boot the app\n' "$prog" >&2
        set -- "$@" --allow-partial ;;
    *) die "WALSHIP_RESTORE_ALLOW_PARTIAL must be 1, true, 0 or false, got '$WALSHIP_RESTORE_ALLOW_PARTIAL'" ;;
esac

printf '%s: restoring %s from %s (skipped if the database exists or the replica is empty)\n' \
    "$prog" "$WALSHIP_DB" "$WALSHIP_REPLICA_URL" >&2
rc=0
"$walship" "$@" -o "$WALSHIP_DB" "$WALSHIP_REPLICA_URL" || rc=$?
if [ "$rc" -eq 3 ]; then
    printf '%s: error: the restore would be partial (the replica has a gap; see its line above); refusing to start the application on an older point (see docs/runbook-emergency.md, section 3; WALSHIP_RESTORE_ALLOW_PARTIAL=1 accepts it)\n' "$prog" >&2
    exit 1
elif [ "$rc" -ne 0 ]; then
    printf '%s: error: restore failed; refusing to start the application on an empty or stale database (see docs/runbook-emergency.md)\n' "$prog" >&2
    exit 1
fi

set -- replicate

# First boot of a new app: nothing was restored and the app has not created its database yet.
# walship replicates only an existing database, so create an empty one and let walship switch
# it to WAL mode (--enable-wal, only for this file we created; an existing database that is
# not in WAL mode is still refused, since silently changing an app's journal mode is not ours).
if [ ! -e "$WALSHIP_DB" ]; then
    printf '%s: no database at %s yet (first boot): creating an empty one\n' "$prog" "$WALSHIP_DB" >&2
    : >"$WALSHIP_DB" || die "cannot create '$WALSHIP_DB'"
    set -- "$@" --enable-wal
fi

# The HTTP status server (/health, /metrics). Skipped with a warning, not a failed boot, when
# this walship build has no --listen: the app keeps running and replicating, and the platform's
# health check on the status port reports the problem.
if [ -n "${WALSHIP_LISTEN:-}" ]; then
    if "$walship" replicate --help 2>/dev/null | grep -q -e '--listen'; then
        set -- "$@" --listen "$WALSHIP_LISTEN"
    else
        printf '%s: warning: this walship has no --listen; WALSHIP_LISTEN=%s ignored, /health is not served\n' \
            "$prog" "$WALSHIP_LISTEN" >&2
    fi
fi

printf '%s: starting replication of %s to %s; application: %s\n' \
    "$prog" "$WALSHIP_DB" "$WALSHIP_REPLICA_URL" "$app_cmd" >&2
exec "$walship" "$@" "$WALSHIP_DB" "$WALSHIP_REPLICA_URL" --exec "$app_cmd"
