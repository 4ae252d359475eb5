"""Static checks of the deployment docs: they exist, their shell commands use only the
walship CLI contract, embedded YAML/TOML parses, and relative links resolve.

(The `sh runbook` blocks are *executed* by test_runbooks.py; these checks need no binary.
Test names avoid the words "runbook" and "entrypoint" on purpose, so `-k "not runbook"`
keeps them.)
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import yaml

from conftest import DOCS, ROOT

OUR_DOCS = ["runbook-restore.md", "runbook-emergency.md", "local-development.md",
            "monitoring.md", "fly-oidc.md", "github-oidc.md", "aws-infrastructure.md"]

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)

# The stable CLI contract (docs and scripts depend on it), plus --listen for the status server.
CONTRACT = {
    "replicate": ({"--config", "--exec", "--listen"}, set(), {0, 2}),
    "restore": ({"-o", "--timestamp"}, {"--if-db-not-exists", "--if-replica-exists",
                                         "--allow-partial", "--dry-run", "--json"}, {1}),
    "snapshot": (set(), set(), {2}),
    "generations": (set(), set(), {1}),
}
SEPARATORS = {";", "&&", "||", "|", "if", "then", "!", "do", "while"}


def fences(name: str) -> list[tuple[str, str]]:
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer((DOCS / name).read_text())]


def logical_lines(script: str) -> list[str]:
    """Shell lines with heredoc bodies removed and backslash continuations joined."""
    out, heredoc_end, pending = [], None, ""
    for line in script.splitlines():
        if heredoc_end is not None:
            if line.strip() == heredoc_end:
                heredoc_end = None
            continue
        m = re.search(r"<<-?\s*'?\"?(\w+)'?\"?", line)
        if m:
            heredoc_end = m.group(1)
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def walship_calls(script: str) -> list[list[str]]:
    calls = []
    for line in logical_lines(script):
        line = line.split(" #", 1)[0]
        if line.lstrip().startswith("#") or "walship" not in line:
            continue
        try:
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True
            tokens = list(lexer)
        except ValueError:
            raise AssertionError(f"cannot parse shell line: {line}")
        current: list[str] | None = None
        for tok in tokens + [";"]:
            if tok in SEPARATORS:
                if current:
                    calls.append(current)
                current = None
            elif current is not None:
                current.append(tok)
            elif tok == "walship":
                current = []
    return calls


def check_call(args: list[str], where: str) -> None:
    assert args, f"{where}: bare `walship`"
    sub, rest = args[0], args[1:]
    assert sub in CONTRACT, f"{where}: `walship {sub}` is not in the CLI contract"
    valued, switches, positional_counts = CONTRACT[sub]
    positionals, i = [], 0
    while i < len(rest):
        tok = rest[i]
        if tok in valued:
            assert i + 1 < len(rest), f"{where}: {tok} needs a value"
            i += 2
            continue
        if tok.startswith("-") and tok != "-":
            assert tok in switches, f"{where}: `walship {sub} {tok}` is not in the contract"
        elif tok.startswith(("2>", ">", "<")):
            break
        else:
            positionals.append(tok)
        i += 1
    assert len(positionals) in positional_counts, \
        f"{where}: `walship {' '.join(args)}`: {len(positionals)} positional argument(s)"


def test_required_docs_exist():
    for name in OUR_DOCS:
        assert (DOCS / name).is_file(), f"docs/{name} is missing"


def test_shell_blocks_use_only_the_cli_contract():
    seen = set()
    for name in OUR_DOCS:
        for lang, body in fences(name):
            if lang.split()[:1] != ["sh"]:
                continue
            for call in walship_calls(body):
                check_call(call, f"docs/{name}")
                seen.add(call[0])
    assert seen == set(CONTRACT), f"docs exercise {seen}"


def test_executable_blocks_are_local_only():
    """`sh runbook` blocks run in CI: local replicas, no cloud CLIs, no sqlite3 shell."""
    count = 0
    for name in OUR_DOCS:
        for lang, body in fences(name):
            if lang != "sh runbook":
                continue
            count += 1
            for line in logical_lines(body):
                assert "s3://" not in line, f"docs/{name}: S3 in a local block: {line}"
                assert not re.match(r"\s*(aws|fly|flyctl|pulumi|docker|curl|sqlite3)\b", line), \
                    f"docs/{name}: `{line.split()[0]}` in a block CI runs locally"
            for call in walship_calls(body):
                for arg in call[1:]:
                    if "://" in arg:
                        assert arg.startswith(("file://", '"file://', "$REPLICA")), arg
    assert count >= 10


def test_blocks_tagged_for_execution_are_in_the_operator_docs():
    for path in DOCS.glob("*.md"):
        tags = {lang for lang, _ in FENCE.findall(path.read_text()) if "runbook" in lang}
        assert tags <= {"sh runbook"}, f"{path.name}: unknown fence tag(s) {tags}"


def test_embedded_yaml_and_toml_parse():
    for name in OUR_DOCS:
        for lang, body in fences(name):
            if lang == "yaml":
                yaml.safe_load(body)
            elif lang == "toml":
                tomllib.loads(body)


def test_relative_links_resolve():
    for name in OUR_DOCS:
        text = (DOCS / name).read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (DOCS / target).exists(), f"docs/{name}: broken link {target}"


def test_fly_toml_is_what_the_docs_describe():
    fly = tomllib.loads((ROOT / "fly" / "fly.toml").read_text())
    oidc = (DOCS / "fly-oidc.md").read_text()
    assert fly["env"]["AWS_WEB_IDENTITY_TOKEN_FILE"] in oidc
    assert "oidc.fly.io/" in oidc and "sts.amazonaws.com" in oidc


def test_executable_blocks_parse_as_bash():
    """`bash -n` over the script test_runbooks.py would run, per document."""
    from conftest import run
    from test_runbooks import RUNBOOKS, script_for

    assert RUNBOOKS
    for path in RUNBOOKS:
        result = run(["bash", "-n", "/dev/stdin"], input=script_for(path))
        assert result.returncode == 0, f"docs/{path.name}: {result.stderr}"


# The docs a newcomer reads first: short enough to read in ten minutes, true to the code.

EVERY_DOC = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
MAP_DOCS = [DOCS / "ARCHITECTURE.md", *sorted((DOCS / "design").glob("*.md"))]


def test_relative_links_resolve_in_every_markdown_file():
    for path in EVERY_DOC:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (path.parent / target).exists(), \
                f"{path.relative_to(ROOT)}: broken link {target}"


def test_readme_and_architecture_stay_short():
    limits = {ROOT / "README.md": 200, DOCS / "ARCHITECTURE.md": 250}
    for path, limit in limits.items():
        n = len(path.read_text().splitlines())
        assert n <= limit, f"{path.relative_to(ROOT)} has {n} lines (at most {limit}): " \
            "move the detail to docs/ (usage.md, monitoring.md, design/)"


def test_every_name_the_code_map_cites_exists():
    """Files, types and functions named in backticks in ARCHITECTURE.md and docs/design/
    exist in the sources (a renamed function makes the map lie)."""
    sources = [*ROOT.glob("crates/**/*.rs"), *ROOT.glob("benches/*.py")]
    text = "\n".join(p.read_text() for p in sources)
    paths = {p.relative_to(ROOT).as_posix() for p in ROOT.glob("crates/**/*") if "target" not in p.parts}
    for doc in MAP_DOCS:
        for span in sorted(set(re.findall(r"`([^`\n]+)`", doc.read_text()))):
            if re.fullmatch(r"[\w/*.-]+\.rs", span):
                pattern = re.escape(span).replace(r"\*", "[^/]*")
                assert any(re.search(rf"(^|/){pattern}$", p) for p in paths), \
                    f"{doc.name}: no file {span}"
            elif re.fullmatch(r"[A-Za-z_]\w*(::[A-Za-z_]\w*)*(\(\))?", span):
                name = span.removesuffix("()").split("::")[-1]
                assert re.search(rf"\b{re.escape(name)}\b", text), f"{doc.name}: no `{span}` in the sources"


def test_every_invariant_keeps_its_place_in_the_map():
    text = (DOCS / "ARCHITECTURE.md").read_text()
    assert text.count("**Invariant:**") >= 23
    for phrase in ("never depends on a writer's clock", "nothing partial is silent",
                   "under one key or none", "readers create nothing",
                   "a refused start leaves nothing behind", "signals go to the app's whole process group",
                   "no credential reaches a log line"):
        assert phrase in text, f"ARCHITECTURE.md lost the invariant: {phrase}"


def test_monitoring_lists_every_metric():
    source = (ROOT / "crates/walship/src/http/metrics.rs").read_text()
    names = set(re.findall(r'"(walship_[a-z_]+)"', source))
    assert len(names) >= 20
    listed = (DOCS / "monitoring.md").read_text()
    for name in sorted(names):
        assert re.search(rf"`{name}(_total)?`", listed), f"docs/monitoring.md does not list {name}"


def test_readme_says_what_a_restore_promises():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## What a restore promises", 1)[1].split("\n## ", 1)[0]
    for phrase in ("Exit 0", "exits 3", "--allow-partial", "--json", "skipped",
                   "--if-replica-exists", "no\n  objects at all"):
        assert phrase.replace("\n  ", " ") in section.replace("\n  ", " "), \
            f"README's 'What a restore promises' no longer says {phrase!r}"
