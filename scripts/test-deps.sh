#!/usr/bin/env bash
# Installs what the test suites need beyond cargo: moto's S3 server, in target/test-venv.
# Idempotent and fast when already installed. Usage: scripts/test-deps.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/target/test-venv"
moto="$venv/bin/moto_server"

if [[ -x "$moto" ]]; then
    exit 0
fi

python="${PYTHON:-python3}"
if [[ ! -x "$venv/bin/python" ]] && ! command -v "$python" >/dev/null 2>&1; then
    echo "test-deps: $python not found; install Python 3 (e.g. apt-get install python3 python3-venv)" >&2
    exit 1
fi

echo "test-deps: installing moto[server] 5.x into $venv" >&2
if [[ ! -x "$venv/bin/python" ]]; then
    mkdir -p "$root/target"
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input 'moto[server]==5.*'

if [[ ! -x "$moto" ]]; then
    echo "test-deps: pip finished but $moto is missing" >&2
    exit 1
fi
echo "test-deps: moto_server ready at $moto" >&2
