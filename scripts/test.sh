#!/usr/bin/env bash
# Runs every test walship has. The one command a new machine needs (after the Rust
# toolchain, Python 3 and git): it installs the test dependencies itself.
#
#   scripts/test.sh
#
# - moto's S3 server and the deploy linters into target/test-venv (scripts/test-deps.sh,
#   scripts/test-deploy-deps.sh);
# - `cargo test --workspace` (unit tests, the storage conformance suite on a local directory
#   and a real S3 server on 127.0.0.1, the engine's fault tests, the CLI's end-to-end and
#   torture tests);
# - the Python suites in tests/ (deployment files, runbooks, the benchmark smoke run)
#   against the walship binary just built.
#
# WALSHIP_TORTURE_TRIALS raises the number of randomized crash trials (default 40).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/test-deps.sh
bash scripts/test-deploy-deps.sh

cargo test --workspace --all-targets
cargo build -p walship

export WALSHIP_BIN="$root/target/debug/walship"
pytest_dirs=()
for d in tests/deploy tests/bench; do
    [[ -d "$d" ]] && pytest_dirs+=("$d")
done
if ((${#pytest_dirs[@]})); then
    target/test-venv/bin/python -m pytest -q "${pytest_dirs[@]}"
fi
