#!/usr/bin/env bash
# Installs what the test suites need beyond cargo: moto's S3 server, in target/test-venv.
# Idempotent and fast when already installed. Usage: scripts/test-deps.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/target/test-venv"
moto="$venv/bin/moto_server"

# Debian's Chromium for the dashboard test (crates/walship/tests/http_dashboard.rs), only when
# missing. Needs root (CI runs as root); otherwise the test says how to install it.
if [[ ! -x /usr/bin/chromium ]]; then
    if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "test-deps: installing chromium (apt-get)" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq chromium >/dev/null
    else
        echo "test-deps: /usr/bin/chromium is missing and this is not root with apt-get; install chromium for the dashboard test" >&2
    fi
fi

# Debian's faketime, for the tests of writers whose clock is off (crates/walship/tests/safety/),
# only when missing. Needs root (CI runs as root); otherwise the tests say how to install it.
if [[ ! -x /usr/bin/faketime ]]; then
    if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "test-deps: installing faketime (apt-get)" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq faketime >/dev/null
    else
        echo "test-deps: /usr/bin/faketime is missing and this is not root with apt-get; install faketime for the clock tests" >&2
    fi
fi

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
