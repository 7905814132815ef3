"""The README, executed: every ```bash and ```python block runs in order, as a new user
would run it from a checkout, so the README can never drift from the code.

The blocks run in a temporary folder laid out like a checkout: `.venv` points at the
interpreter running the tests and `../shared/data` at the real data, so the README's
relative paths work unchanged and every output (OUT.zarr, runs/, report.html) lands in the
temporary folder. A block preceded by an HTML comment changes how it is checked:

- `<!-- readme-test: skip REASON -->`: not run (the setup block, which is this test suite);
- `<!-- readme-test: fails "TEXT" -->`: every command must exit non-zero with one line
  containing TEXT on stderr and no traceback (examples that need a cluster or the network).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import DATA, REPO, require_data

README = REPO / "README.md"
FENCE = re.compile(r"(?:<!--\s*readme-test:\s*(?P<directive>.*?)\s*-->\s*\n)?```(?P<lang>bash|python)\n(?P<body>.*?)```", re.S)
BLOCK_TIMEOUT_S = 900


@dataclass
class Block:
    lang: str
    body: str
    directive: str
    line: int


def readme_blocks(text: str) -> list[Block]:
    """The fenced bash/python blocks of `text` in order, with their directive and line."""
    return [
        Block(m["lang"], m["body"], (m["directive"] or "").strip(), text.count("\n", 0, m.start("body")) + 1)
        for m in FENCE.finditer(text)
    ]


def shell_commands(body: str) -> list[str]:
    """One entry per command of a bash block (continuation lines joined, comments and
    blank lines dropped)."""
    commands, current = [], ""
    for line in body.splitlines():
        current += line
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip() and not current.strip().startswith("#"):
            commands.append(current.strip())
        current = ""
    return commands


def test_readme_blocks_are_parsed():
    blocks = readme_blocks(README.read_text())
    assert len(blocks) >= 10
    assert blocks[0].directive.startswith("skip"), "the setup block must be marked skip (it is this test suite)"
    assert shell_commands("a \\\n  b # x\n# c\n\nd\n") == ["a    b # x", "d"]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    require_data()
    root = tmp_path_factory.mktemp("readme")
    work = root / "fmri-data"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix))
    (root / "shared").mkdir()
    (root / "shared" / "data").symlink_to(DATA)
    for folder in ("benchmarks",):
        (work / folder).symlink_to(REPO / folder)
    return work


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("FMRI_DATA_ATLAS_DIR", None)
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _run(argv: list[str], cwd: Path, where: str) -> subprocess.CompletedProcess:
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{where}: still running after {BLOCK_TIMEOUT_S} s", pytrace=False)
    print(f"{time.perf_counter() - start:7.1f} s  {where[:160]}")  # shown with pytest -s: where the time goes
    return done


@pytest.mark.slow
def test_readme_runs_top_to_bottom(checkout):
    """Every README block, in order, in one folder (later blocks use earlier outputs)."""
    for block in readme_blocks(README.read_text()):
        where = f"README.md line {block.line} ({block.lang})"
        if block.directive.startswith("skip"):
            continue
        expected = re.fullmatch(r'fails\s+"(.+)"', block.directive)
        if block.lang == "python":
            done = _run([sys.executable, "-c", block.body], checkout, where)
            assert done.returncode == 0, f"{where} failed:\n{done.stderr[-3000:]}"
            continue
        for command in shell_commands(block.body):
            done = _run(["bash", "-c", command], checkout, f"{where}: {command}")
            if expected:
                err = done.stderr.strip()
                assert done.returncode != 0, f"{where}: `{command}` was expected to fail"
                assert "Traceback" not in err and expected[1] in err and len(err.splitlines()) == 1, (
                    f"{where}: `{command}` must fail in one line containing {expected[1]!r}, got:\n{err[-3000:]}"
                )
            else:
                assert done.returncode == 0, f"{where}: `{command}` exited {done.returncode}:\n{done.stderr[-3000:]}"
