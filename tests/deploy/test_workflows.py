"""GitHub Actions workflows: structure, least privilege, OIDC instead of keys, actionlint."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run, tool

WORKFLOWS = ROOT / ".github" / "workflows"
FILES = sorted(WORKFLOWS.glob("*.yml")) + sorted(WORKFLOWS.glob("*.yaml"))


def load(name: str) -> dict:
    with (WORKFLOWS / name).open() as f:
        return yaml.safe_load(f)


def triggers(wf: dict) -> dict:
    # YAML 1.1 reads a bare `on` key as the boolean True.
    on = wf.get("on", wf.get(True))
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return {k: None for k in on}
    return on


def steps(job: dict) -> list[dict]:
    return job.get("steps", [])


def all_steps(wf: dict):
    for name, job in wf["jobs"].items():
        for step in steps(job):
            yield name, job, step


def runs(wf: dict) -> str:
    return "\n".join(step.get("run", "") for _, _, step in all_steps(wf))


def uses(wf: dict, action: str):
    return [(n, j, s) for n, j, s in all_steps(wf) if s.get("uses", "").startswith(action + "@")]


def test_expected_workflows_exist():
    names = {f.name for f in FILES}
    assert {"ci.yml", "infra.yml", "release.yml"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_workflow_structure(path: Path):
    wf = yaml.safe_load(path.read_text())
    assert wf.get("name"), "workflow needs a name"
    assert triggers(wf), "workflow needs triggers"
    assert "permissions" in wf, "set top-level permissions explicitly (least privilege)"
    assert wf["jobs"], "no jobs"
    for name, job in wf["jobs"].items():
        assert "runs-on" in job, f"job {name}: runs-on"
        assert steps(job), f"job {name}: no steps"
        for step in steps(job):
            assert ("uses" in step) != ("run" in step), f"job {name}: step needs uses xor run"
            if "uses" in step and not step["uses"].startswith("./"):
                assert re.search(r"@[\w.-]+$", step["uses"]), f"unpinned action {step['uses']}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_static_cloud_keys(path: Path):
    text = path.read_text()
    for needle in ("aws-access-key-id", "aws-secret-access-key", "AWS_ACCESS_KEY_ID",
                   "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        assert needle not in text, f"{path.name} mentions {needle}: use OIDC role-to-assume"


def test_ci():
    wf = load("ci.yml")
    on = triggers(wf)
    assert "push" in on and "pull_request" in on
    script = runs(wf)
    assert re.search(r"cargo fmt .*--check", script)
    assert re.search(r"cargo clippy .*-D warnings", script)
    assert "bash .ci/run" in script
    assert "scripts/test-deploy-deps.sh" in script
    assert "pytest tests/deploy" in script
    assert wf["permissions"] == {"contents": "read"}


def effective_permissions(wf: dict, job: dict) -> dict:
    return job.get("permissions", wf.get("permissions", {}))


def test_infra_uses_oidc_role():
    wf = load("infra.yml")
    on = triggers(wf)
    assert "pull_request" in on
    assert on["push"]["branches"] == ["main"]
    creds = uses(wf, "aws-actions/configure-aws-credentials")
    assert len(creds) == 2
    for name, job, step in creds:
        assert effective_permissions(wf, job).get("id-token") == "write", \
            f"job {name}: needs permissions id-token: write for OIDC"
        assert step["with"].get("role-to-assume"), f"job {name}: role-to-assume"
        assert step["with"].get("aws-region")
    assert wf["permissions"].get("id-token") == "write"


def test_infra_preview_on_pr_up_on_main():
    wf = load("infra.yml")
    commands = {}
    for name, job, step in uses(wf, "pulumi/actions"):
        commands[step["with"]["command"]] = (job, step)
        assert step["with"]["work-dir"] == "pulumi"
    preview_job, _ = commands["preview"]
    up_job, _ = commands["up"]
    assert "pull_request" in preview_job["if"]
    assert "refs/heads/main" in up_job["if"] and "pull_request" in up_job["if"]
    # The PR job assumes the read-only role, the main job the deploy role.
    def role(job: dict) -> str:
        (cred,) = [s for s in steps(job) if s.get("uses", "").startswith("aws-actions/")]
        return cred["with"]["role-to-assume"]

    assert "PREVIEW" in role(preview_job)
    assert "DEPLOY" in role(up_job)
    assert wf["concurrency"]["cancel-in-progress"] is False


def test_release():
    wf = load("release.yml")
    assert triggers(wf)["push"]["tags"]
    script = runs(wf)
    assert "cargo build --release -p walship --locked" in script
    assert uses(wf, "actions/upload-artifact")
    ((name, job, step),) = uses(wf, "docker/build-push-action")
    assert step["with"]["push"] is True
    assert step["with"]["file"] == "fly/Dockerfile"
    assert step["with"]["target"] == "walship"
    assert effective_permissions(wf, job).get("packages") == "write"
    ((_, _, login),) = uses(wf, "docker/login-action")
    assert login["with"]["registry"] == "ghcr.io"


def test_actionlint():
    """actionlint, with shellcheck on PATH so every `run:` script is shellchecked too."""
    actionlint = tool("actionlint")
    shellcheck = tool("shellcheck")
    env = dict(os.environ)
    env["PATH"] = f"{Path(shellcheck).parent}{os.pathsep}{env.get('PATH', '')}"
    result = run([actionlint, "-no-color", "-oneline", "-shellcheck", shellcheck,
                  *[str(p.relative_to(ROOT)) for p in FILES]], env=env)
    assert result.returncode == 0, f"actionlint:\n{result.stdout}{result.stderr}"
