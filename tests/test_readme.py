"""The README's commands run as written.

Every fenced ``bash`` and ``python`` block of the README runs, in the README's order, as one bash
script in an empty folder whose ``.venv`` is this interpreter's environment, so later blocks see
what earlier ones wrote (the tiny model, the samples, the server started in the background). A
block that cannot run here says why in an HTML comment right above it:
``<!-- not run by the tests: REASON -->``. Inline commands (``unidiffuser ... --option``) are
parsed by the real argument parser, so a renamed option or subcommand fails here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from unidiffuser.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = sorted((README.parent / "docs").glob("*.md"))  # the pages the README sends readers to
SKIP = re.compile(r"<!-- not run by the tests: (?P<reason>[^>]*\S)\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>\w*)\n(?P<body>.*?)^```$", re.S | re.M)


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    body: str
    skip_reason: str | None


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        blocks.append(
            Block(
                line=text.count("\n", 0, match.start()) + 1,
                lang=match["lang"],
                body=match["body"],
                skip_reason=skip["reason"] if skip else None,
            )
        )
    return blocks


def as_bash(block: Block) -> str:
    """One block as bash lines: a bash block as it is, a python block fed to the venv's python."""
    header = f'echo "=== README.md line {block.line}" >&2\n'
    if block.lang == "bash":
        return header + block.body
    assert "README_PYTHON_END" not in block.body
    return header + f".venv/bin/python - <<'README_PYTHON_END'\n{block.body}README_PYTHON_END\n"


def test_the_docs_pages_exist_and_hold_no_code_blocks():
    # their commands are checked inline only; a runnable block belongs in the README, whose blocks run
    assert DOCS, "docs/*.md is missing: the README points to it"
    readme = README.read_text()
    for page in DOCS:
        assert page.name in readme, f"the README does not link {page.name}"
        assert not readme_blocks(page.read_text()), f"{page.name} has a fenced block that no test runs"


def test_every_block_is_run_or_says_why_not():
    blocks = readme_blocks(README.read_text())
    assert len(blocks) >= 10
    unknown = [(b.line, b.lang) for b in blocks if b.lang not in ("bash", "python", "")]
    assert not unknown, f"README blocks in a language the test cannot run: {unknown}"
    unlabelled = [b.line for b in blocks if b.lang == "" and b.skip_reason is None]
    assert not unlabelled, f"README blocks at lines {unlabelled} name no language and no reason to skip them"


def test_block_parsing_reads_fences_and_skip_comments():
    text = "intro\n<!-- not run by the tests: needs a GPU -->\n```bash\nnvidia-smi\n```\n\n```python\nx = 1\n```\n"
    first, second = readme_blocks(text)
    assert (first.line, first.lang, first.body, first.skip_reason) == (
        3,
        "bash",
        "nvidia-smi\n",
        "needs a GPU",
    )
    assert (second.line, second.lang, second.body, second.skip_reason) == (7, "python", "x = 1\n", None)


def inline_commands(text: str) -> list[str]:
    prose = FENCE.sub("", text)
    spans = (" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose))
    return [s for s in spans if s.startswith("unidiffuser ") and " --" in s]


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_inline_commands_parse(page):
    commands = inline_commands(page.read_text())
    assert len(commands) >= 5
    parser = build_parser()
    bad = []
    for command in commands:
        try:
            parser.parse_args(shlex.split(command)[1:])
        except SystemExit as exit_:
            if exit_.code != 0:  # --help exits 0
                bad.append(command)
    assert not bad, f"{page.name} commands the CLI refuses: {bad}"


@pytest.mark.slow
def test_readme_blocks_run_as_written(tmp_path):
    venv = Path(sys.prefix)
    if not (venv / "bin" / "unidiffuser").exists():
        pytest.skip("the README's commands call .venv/bin/unidiffuser: run the tests from the project's venv")
    if shutil.which("curl") is None:
        pytest.skip("the README's serve example needs curl")
    blocks = [b for b in readme_blocks(README.read_text()) if b.skip_reason is None]
    script = "set -euo pipefail\n" + "\n".join(as_bash(b) for b in blocks)
    (tmp_path / "readme.sh").write_text(script)
    (tmp_path / ".venv").symlink_to(venv, target_is_directory=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(
        ["bash", "readme.sh"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the server the README starts in the background dies with the group
    )
    try:
        output, _ = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the README's blocks ran past 900 s:\n{output[-4000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"a README block failed (exit {proc.returncode}):\n{output[-6000:]}"
    ran = re.findall(r"=== README.md line (\d+)", output)
    assert [int(n) for n in ran] == [b.line for b in blocks]
    # what the blocks say they make, they made
    assert (tmp_path / "samples" / "t2i_000.png").is_file()
    assert (tmp_path / "samples" / "serve" / "t2i_0.png").is_file()
    assert (tmp_path / "runs" / "toy" / "checkpoints").is_dir()
    assert (tmp_path / "features").is_dir()
