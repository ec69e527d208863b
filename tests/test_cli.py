"""The command line: info, a short demo, and argument errors."""

import re
import subprocess
import sys

import pytest

from unidiffuser.cli import main


def test_info_lists_the_released_sizes(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"unidiffuser-v1\s+952,509,520\s+1105\s+1536\s+31\s", out)
    assert re.search(r"unidiffuser-v0\s+952,504,912\s+1104\s", out)


def test_short_toy_demo_prints_every_mode(capsys):
    assert main(["toy", "--seconds", "2", "--samples", "40", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    for mode in ("t2i:", "i2t:", "joint:", "i:", "t:", "i2t2i:", "t2i2t:"):
        assert f"\n{mode}" in out
    assert "law" in out and "model, guidance 3" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["toy", "--seconds", "0"], "expected a number > 0, got 0"),
        (["toy", "--steps", "-1"], "expected an integer >= 1, got -1"),
        (["toy", "--guidance", "-2"], "expected a number >= 0, got -2"),
        (["fly"], "invalid choice: 'fly'"),
    ],
)
def test_bad_arguments_exit_with_a_message(args, message):
    result = subprocess.run([sys.executable, "-m", "unidiffuser.cli", *args], capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr


def test_console_script_help_shows_defaults():
    result = subprocess.run(
        [sys.executable, "-m", "unidiffuser.cli", "toy", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "(default: 60.0)" in result.stdout


def test_help_names_defaults_but_never_a_default_of_none():
    import argparse

    from unidiffuser.cli import build_parser

    helps = {}

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        helps[name] = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    walk(subparser, f"{name} {sub}")

    walk(build_parser(), "unidiffuser")
    assert {
        "unidiffuser sample",
        "unidiffuser serve",
        "unidiffuser extract",
        "unidiffuser eval",
    } <= set(helps)
    assert [name for name, text in helps.items() if "default: None" in text] == []
    sample = " ".join(helps["unidiffuser sample"].split())
    assert "seed of all noise (default: 0)" in sample  # a real default is still named
    assert "guidance scale s (default: the model's own, 7 for the released weights) --guidance-mode" in sample
