"""fly/: Dockerfile (hadolint + structure), fly.toml, and the boot script's behaviour.

The boot-script tests here run fly/entrypoint.sh with a stub `walship` that records its
arguments, so they need no real binary; test_entrypoint_e2e.py runs it with the real one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT, run, tool

FLY = ROOT / "fly"
DOCKERFILE = FLY / "Dockerfile"
ENTRYPOINT = FLY / "entrypoint.sh"


# -- Dockerfile ---------------------------------------------------------------------------

def test_hadolint():
    result = run([tool("hadolint"), "--no-color", str(DOCKERFILE.relative_to(ROOT))])
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            current = m.group(2) or m.group(1)
            out[current] = [line]
        elif current:
            out[current].append(line)
    return out


def test_dockerfile_stages():
    s = stages()
    assert list(s) == ["builder", "walship", "example-app"]
    builder = " ".join(s["builder"])
    assert "cargo build --release -p walship --locked" in builder
    assert re.search(r"FROM rust:\S+ AS builder", s["builder"][0])
    runtime = " ".join(s["walship"])
    assert re.search(r"FROM debian:\S*-slim AS walship", s["walship"][0]) or \
        "distroless/cc" in s["walship"][0]
    assert "ca-certificates" in runtime
    assert "COPY --from=builder /out/walship /usr/local/bin/walship" in runtime
    app = " ".join(s["example-app"])
    assert "COPY --from=walship /usr/local/bin/walship " in app
    assert 'ENTRYPOINT ["/usr/local/bin/walship-entrypoint"]' in app


@pytest.mark.parametrize("stage", ["walship", "example-app"])
def test_final_stages_run_as_non_root(stage):
    users = [i.split()[1] for i in stages()[stage] if i.upper().startswith("USER ")]
    assert users, f"{stage}: no USER"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_dockerignore_keeps_build_outputs_out():
    ignore = (FLY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore, "deny by default, then allow what the build reads"
    for needed in ("!Cargo.toml", "!Cargo.lock", "!crates/", "!fly/entrypoint.sh"):
        assert needed in ignore


def test_example_app_compiles():
    result = run(["python3", "-m", "py_compile", str(FLY / "example" / "app.py")])
    assert result.returncode == 0, result.stderr


# -- fly.toml -----------------------------------------------------------------------------

def fly_toml() -> dict:
    return tomllib.loads((FLY / "fly.toml").read_text())


def test_fly_toml_shutdown_leaves_time_for_final_sync():
    cfg = fly_toml()
    assert cfg["kill_signal"] == "SIGTERM"
    timeout = cfg["kill_timeout"]
    seconds = int(timeout.rstrip("s")) if isinstance(timeout, str) else int(timeout)
    assert seconds >= 45, "walship's shutdown deadline is 30 s; leave room on top"
    assert seconds <= 300, "fly caps kill_timeout at 300 s"


def test_fly_toml_env():
    env = fly_toml()["env"]
    for key in ("WALSHIP_DB", "WALSHIP_REPLICA_URL", "AWS_ROLE_ARN", "AWS_REGION"):
        assert env.get(key), key
    assert env["AWS_WEB_IDENTITY_TOKEN_FILE"] == "/.fly/oidc_token"
    assert env["WALSHIP_REPLICA_URL"].startswith("s3://")
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", env["AWS_ROLE_ARN"])
    for key in env:
        assert "SECRET" not in key and "ACCESS_KEY" not in key, "no credentials in fly.toml"


def test_fly_toml_checks_walship_health():
    cfg = fly_toml()
    listen = cfg["env"]["WALSHIP_LISTEN"]
    port = int(listen.rsplit(":", 1)[1])
    checks = [c for c in cfg.get("checks", {}).values() if c.get("path") == "/health"]
    assert checks, "a [checks] entry on walship's /health"
    (check,) = checks
    assert check["type"] == "http" and check["port"] == port
    assert cfg["http_service"]["internal_port"] != port, "walship's port must not be public"
    assert cfg["http_service"]["checks"], "the app's own check"


def test_fly_toml_single_machine_without_volume():
    cfg = fly_toml()
    assert "mounts" not in cfg, "the example is volume-less: S3 is the durable copy"
    assert cfg["http_service"]["auto_stop_machines"] in ("off", False, "suspend")
    assert cfg["build"]["build-target"] == "example-app"


# -- fly/entrypoint.sh with a stub walship --------------------------------------------------

STUB = """#!/bin/sh
if [ "$1 $2" = "replicate --help" ]; then
    [ -n "${STUB_HAS_LISTEN:-}" ] && echo "      --listen <ADDR>  status server"
    exit 0
fi
python3 -c 'import json, sys; open(sys.argv[1], "a").write(json.dumps(sys.argv[2:]) + "\\n")' \\
    "$STUB_LOG" "$@"
case "$1" in
    restore) exit "${STUB_RESTORE_RC:-0}" ;;
    replicate) exit "${STUB_REPLICATE_RC:-0}" ;;
esac
exit 99
"""


@pytest.fixture
def boot(tmp_path: Path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "walship").write_text(STUB)
    (bindir / "walship").chmod(0o755)
    log = tmp_path / "calls.jsonl"

    def go(*app: str, **env_overrides: str | None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("WALSHIP_")}
        env.update(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", STUB_LOG=str(log),
                   WALSHIP_DB=str(tmp_path / "data" / "app.db"),
                   WALSHIP_REPLICA_URL=f"file://{tmp_path / 'replica'}")
        for key, value in env_overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        result = run(["sh", str(ENTRYPOINT), *app], env=env, timeout=30)
        calls = [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        return result, calls

    go.tmp = tmp_path
    return go


def test_boot_script_restores_then_execs_replicate(boot):
    db = boot.tmp / "data" / "app.db"
    db.parent.mkdir()
    db.write_bytes(b"")
    result, calls = boot("python3", "/app/app.py", "--port", "8080", STUB_REPLICATE_RC="7")
    url = f"file://{boot.tmp / 'replica'}"
    assert calls == [
        ["restore", "--if-db-not-exists", "--if-replica-exists", "-o", str(db), url],
        ["replicate", str(db), url, "--exec", "python3 /app/app.py --port 8080"],
    ]
    assert result.returncode == 7, "exec: walship's exit status is the container's"


def test_boot_script_refuses_a_partial_restore_unless_allowed(boot):
    db = boot.tmp / "data" / "app.db"
    url = f"file://{boot.tmp / 'replica'}"
    # walship restore exits 3 for a partial restore it refused: no boot, a line saying why.
    result, calls = boot("app", STUB_RESTORE_RC="3")
    assert result.returncode == 1
    assert [c[0] for c in calls] == ["restore"], "the app must not start"
    assert "--allow-partial" not in calls[0], "not passed by default"
    assert "partial" in result.stderr and "WALSHIP_RESTORE_ALLOW_PARTIAL" in result.stderr
    # Opted in: passed on, with a warning.
    for value in ("1", "true"):
        result, calls = boot("app", WALSHIP_RESTORE_ALLOW_PARTIAL=value)
        assert result.returncode == 0
        assert calls[0] == ["restore", "--if-db-not-exists", "--if-replica-exists",
                            "--allow-partial", "-o", str(db), url]
        assert "WALSHIP_RESTORE_ALLOW_PARTIAL is set" in result.stderr
        db.unlink()
    result, calls = boot("app", WALSHIP_RESTORE_ALLOW_PARTIAL="0")
    assert "--allow-partial" not in calls[0]
    result, calls = boot("app", WALSHIP_RESTORE_ALLOW_PARTIAL="yes please")
    assert result.returncode == 64 and not calls
    assert "WALSHIP_RESTORE_ALLOW_PARTIAL" in result.stderr


def test_boot_script_first_boot_creates_empty_database(boot):
    # Nothing restored (empty replica) and no database yet: the script creates an empty file
    # and lets walship switch it to WAL mode, so replicate has something to open.
    db = boot.tmp / "data" / "app.db"
    result, calls = boot("app")
    assert result.returncode == 0
    assert calls[1][:2] == ["replicate", "--enable-wal"]
    assert db.is_file() and db.stat().st_size == 0
    assert "first boot" in result.stderr


def test_boot_script_passes_listen_address(boot):
    _, calls = boot("app", WALSHIP_LISTEN="0.0.0.0:9090", STUB_HAS_LISTEN="1")
    assert calls[1][:4] == ["replicate", "--enable-wal", "--listen", "0.0.0.0:9090"]


def test_boot_script_skips_listen_when_unsupported(boot):
    result, calls = boot("app", WALSHIP_LISTEN="0.0.0.0:9090")
    assert result.returncode == 0
    assert "--listen" not in calls[1]
    assert "WALSHIP_LISTEN=0.0.0.0:9090 ignored" in result.stderr


def test_boot_script_quotes_arguments_for_exec(boot):
    app = ["python3", "-c", "print('hello world') # $HOME `x`", "a'b", "", "two  spaces"]
    _, calls = boot(*app)
    exec_string = calls[1][calls[1].index("--exec") + 1]
    assert shlex.split(exec_string) == app


def test_boot_script_refuses_app_when_restore_fails(boot):
    result, calls = boot("app", STUB_RESTORE_RC="1")
    assert result.returncode == 1
    assert [c[0] for c in calls] == ["restore"], "the app must not start"
    assert "refusing to start the application" in result.stderr


@pytest.mark.parametrize("missing", [["WALSHIP_DB"], ["WALSHIP_REPLICA_URL"],
                                     ["WALSHIP_DB", "WALSHIP_REPLICA_URL"]])
def test_boot_script_requires_env(boot, missing):
    result, calls = boot("app", **{k: None for k in missing})
    assert result.returncode == 64
    assert calls == []
    line = result.stderr.strip().splitlines()[-1]
    assert "required environment variable" in line
    for key in missing:
        assert key in line


@pytest.mark.parametrize("overrides,message", [
    ({"WALSHIP_DB": "relative/app.db"}, "absolute path"),
    ({"WALSHIP_REPLICA_URL": "http://example.com/x"}, "file:/// or s3://"),
    ({"WALSHIP_BIN": "/nonexistent/walship"}, "not found"),
])
def test_boot_script_rejects_bad_settings(boot, overrides, message):
    result, calls = boot("app", **overrides)
    assert result.returncode == 64 and calls == []
    assert message in result.stderr


def test_boot_script_requires_app_command(boot):
    result, calls = boot()
    assert result.returncode == 64 and calls == []
    assert "no application command" in result.stderr
