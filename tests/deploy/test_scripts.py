"""Shell scripts: shellcheck, and scripts/setup-github-oidc.sh's arguments and AWS calls."""

from __future__ import annotations

import json
import os
import shlex
import stat
from pathlib import Path

import pytest

from conftest import ROOT, run, tool

SHELL_SCRIPTS = [ROOT / "fly" / "entrypoint.sh", *sorted((ROOT / "scripts").glob("*.sh"))]
# Test ids avoid the word "entrypoint": `-k "not entrypoint"` deselects only the tests that need
# the real walship binary, never these lints.
def script_id(path: Path) -> str:
    return str(path.relative_to(ROOT)).replace("entrypoint", "boot-script")


SETUP = ROOT / "scripts" / "setup-github-oidc.sh"
ARGS = ["--repo", "my-org/walship", "--app", "walship-example", "--fly-org", "my-org",
        "--bucket", "walship-example-backups", "--account-id", "123456789012"]


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=script_id)
def test_shellcheck(path: Path):
    result = run([tool("shellcheck"), "--severity=style", "--external-sources",
                  str(path.relative_to(ROOT))])
    assert result.returncode == 0, f"shellcheck:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=script_id)
def test_script_is_executable_with_shebang(path: Path):
    assert path.stat().st_mode & stat.S_IXUSR, f"{path} is not executable"
    first = path.read_text().splitlines()[0]
    assert first in ("#!/bin/sh", "#!/usr/bin/env bash"), first
    if first.endswith("bash"):
        assert "set -euo pipefail" in path.read_text()


def test_setup_help():
    result = run(["bash", str(SETUP), "--help"])
    assert result.returncode == 0
    assert "Usage:" in result.stdout and "--dry-run" in result.stdout


@pytest.mark.parametrize("args,message", [
    ([], "--repo is required"),
    (["--repo", "no-slash", "--app", "a", "--fly-org", "o", "--bucket", "bucket"], "owner/name"),
    (ARGS + ["--branch", "feature/*"], "no wildcards"),
    (ARGS + ["--bucket", "Not_A_Bucket"], "valid S3 bucket name"),
    (ARGS + ["--account-id", "12345"], "12 digits"),
    (ARGS + ["--app", "Bad App"], "fly.io app name"),
    (ARGS + ["--frobnicate"], "unknown argument"),
    (["--repo"], "--repo needs a value"),
])
def test_setup_rejects_bad_arguments(args, message):
    result = run(["bash", str(SETUP), "--dry-run", *args])
    assert result.returncode == 2
    assert message in result.stderr
    assert "+ aws" not in result.stdout


def test_setup_dry_run_prints_and_runs_nothing(tmp_path: Path):
    # An `aws` that records calls proves the dry run never invokes it.
    log = tmp_path / "calls"
    fake = tmp_path / "aws"
    fake.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\nexit 0\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    result = run(["bash", str(SETUP), "--dry-run", *ARGS], env=env)
    assert result.returncode == 0, result.stderr
    assert not log.exists()
    calls = [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]
    subcommands = [c[2] for c in calls]
    assert subcommands == ["create-open-id-connect-provider", "create-role", "put-role-policy",
                           "create-role", "put-role-policy"]
    for call in calls:
        assert call[:2] == ["aws", "iam"]
        for flag in ("--assume-role-policy-document", "--policy-document"):
            if flag in call:
                json.loads(call[call.index(flag) + 1])


def fake_aws(tmp_path: Path, existing: bool) -> tuple[dict, Path]:
    """A fake aws CLI logging its argv as JSON lines; get-* calls succeed iff `existing`."""
    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "aws"
    fake.write_text(
        "#!/usr/bin/env python3\n"
        "import json, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "sub = sys.argv[2] if len(sys.argv) > 2 else ''\n"
        f"sys.exit(0 if {existing!r} or not sub.startswith('get-') else 254)\n"
    )
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return env, log


def logged(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_setup_creates_missing_resources(tmp_path: Path):
    env, log = fake_aws(tmp_path, existing=False)
    result = run(["bash", str(SETUP), *ARGS], env=env)
    assert result.returncode == 0, result.stderr
    subs = [c[1] for c in logged(log)]
    assert subs == ["get-open-id-connect-provider", "create-open-id-connect-provider",
                    "get-role", "create-role", "put-role-policy",
                    "get-role", "create-role", "put-role-policy"]


def test_setup_updates_existing_resources(tmp_path: Path):
    env, log = fake_aws(tmp_path, existing=True)
    result = run(["bash", str(SETUP), "--no-preview-role", *ARGS], env=env)
    assert result.returncode == 0, result.stderr
    subs = [c[1] for c in logged(log)]
    assert subs == ["get-open-id-connect-provider", "get-role", "update-assume-role-policy",
                    "put-role-policy"]


def test_setup_stops_on_aws_failure(tmp_path: Path):
    env, log = fake_aws(tmp_path, existing=False)
    failing = tmp_path / "aws"
    failing.write_text(failing.read_text().replace("sys.exit(0 if", "sys.exit(1 if sub == "
                                                   "'create-role' else 0 if"))
    result = run(["bash", str(SETUP), *ARGS], env=env)
    assert result.returncode != 0
    assert "put-role-policy" not in [c[1] for c in logged(log)]
