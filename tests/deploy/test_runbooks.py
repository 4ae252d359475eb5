"""Run the commands of the operator runbooks in docs/ against a local replica.

Every fenced block tagged ```sh runbook in docs/*.md is executed, in order, one bash script per
document (`set -euo pipefail`, so variables set in one block are seen by the next), from the
repository root, with:

  PATH              prefixed by the directory of $WALSHIP_BIN (required)
  WALSHIP_DEMO_DIR  a fresh directory holding app.db: a WAL-mode database, table `items`
                    (id, body, created_at) with 200 rows, already copied to the replica
                    file://$WALSHIP_DEMO_DIR/replica by `walship snapshot`

These need the real walship binary: WALSHIP_BIN=target/debug/walship.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import DOCS, ROOT, run

BLOCK = re.compile(r"^```sh runbook[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def runbook_blocks(path: Path) -> list[tuple[int, str]]:
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in BLOCK.finditer(text)]


RUNBOOKS = sorted(p for p in DOCS.glob("*.md") if runbook_blocks(p))


def script_for(path: Path) -> str:
    blocks = runbook_blocks(path)
    parts = ["set -euo pipefail", f"cd {ROOT}"]
    for i, (line, body) in enumerate(blocks, 1):
        where = f"{path.relative_to(ROOT)}:{line}"
        parts.append(f"printf '\\n### block {i}/{len(blocks)} ({where})\\n' >&2")
        parts.append(body)
    parts.append("printf '\\n### all blocks passed\\n' >&2")
    return "\n".join(parts) + "\n"


def test_runbooks_found():
    names = {p.name for p in RUNBOOKS}
    for required in ("runbook-restore.md", "runbook-emergency.md", "local-development.md"):
        assert required in names, f"docs/{required} has no ```sh runbook blocks"


@pytest.mark.parametrize("path", RUNBOOKS, ids=lambda p: p.name)
def test_runbook(path: Path, demo, tmp_path: Path):
    demo_dir, env = demo
    script = tmp_path / f"{path.stem}.sh"
    script.write_text(script_for(path))
    result = run(["bash", str(script)], env=env, timeout=300)
    assert result.returncode == 0, (
        f"{path.relative_to(ROOT)}: a runbook command failed (exit {result.returncode}); the "
        f"last '### block' marker below says which block.\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )
