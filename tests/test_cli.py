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
        (["toy", "--seconds", "0"], "expected a finite number > 0, got 0"),
        (["toy", "--seconds", "inf"], "expected a finite number > 0, got inf"),
        (["toy", "--seed", str(2**64)], "expected a seed from 0 to 2**63 - 1, got 18446744073709551616"),
        (["eval", "shapes", "--threads", "-1"], "--threads: expected an integer >= 0, got -1"),
        (["toy", "--steps", "-1"], "expected an integer >= 1, got -1"),
        (["toy", "--guidance", "-2"], "expected a finite number >= 0, got -2"),
        (["fly"], "invalid choice: 'fly'"),
        # an unknown option is refused under the command's own usage, with the nearest known ones
        (["sample", "--tsk", "t2i"], "usage: unidiffuser sample"),
        (["sample", "--tsk", "t2i"], "unrecognized arguments: --tsk t2i (--tsk: did you mean --task"),
        (["toy", "--sconds", "3"], "(--sconds: did you mean --seconds?)"),
        (["toy", "extra"], "unidiffuser toy: error: unrecognized arguments: extra; see --help"),
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


def test_the_task_option_names_the_mode_of_sample():
    from unidiffuser.cli import build_parser

    assert build_parser().parse_args(["sample", "--task", "i2t"]).mode == "i2t"


def test_an_output_folder_that_cannot_be_made_is_refused_before_the_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for args in (["sample", "--prompt", "a red square", "--steps", "1"], ["demo", "--steps", "1"]):
        with pytest.raises(SystemExit) as exit_:
            main([*args, "--out", str(blocker / "out")])
        message = str(exit_.value)
        assert message.startswith(f"unidiffuser {args[0]}: {blocker / 'out'}: Not a directory"), message
    assert "step/s" not in capsys.readouterr().err  # refused before sampling began
    with pytest.raises(SystemExit, match=r"--out .*: its folder does not exist; create it first"):
        main(["eval", "shapes", "--samples", "1", "--out", str(tmp_path / "missing" / "table.md")])
    with pytest.raises(SystemExit, match=r"--out .* is a folder; name the Markdown file to write"):
        main(["eval", "shapes", "--samples", "1", "--out", str(tmp_path)])


def test_sample_refuses_empty_prompts_unused_scorers_and_folders_for_files(tmp_path):
    folder, file = tmp_path / "a-folder", tmp_path / "a-file"
    folder.mkdir()
    file.write_text("not a model")
    prompt = ["--prompt", "a red square"]
    refused = [
        (["--prompt", " "], "--prompt is empty; give words to draw"),
        ([*prompt, "--scorer", str(folder)], r"--scorer ranks the candidates of --best-of K \(K >= 2\)"),
        ([*prompt, "--best-of", "2", "--scorer", str(tmp_path / "no")], "--scorer .*no: no such folder"),
        (["--mode", "i2t", "--image", str(folder)], "--image .*a-folder is a folder; give an image file"),
        ([*prompt, "--model", str(file)], "--model .*a-file: .*a-file is a file, not a model directory"),
        ([*prompt, "--out", str(file)], "--out .*a-file is a file; name a folder to write into"),
    ]
    for args, message in refused:
        with pytest.raises(SystemExit, match=f"^unidiffuser sample: {message}"):
            main(["sample", "--steps", "1", *args])
    with pytest.raises(SystemExit, match=r"^unidiffuser demo: --out .*a-file is a file"):
        main(["demo", "--steps", "1", "--out", str(file)])


def test_sample_counts_its_progress_in_steps_and_records_the_device_it_used(tmp_path, capsys):
    import json

    assert (
        main(
            ["sample", "--prompt", "a big red circle in the center", "--steps", "10", "--out", str(tmp_path)]
        )
        == 0
    )
    bar = capsys.readouterr().err.replace("\r", "\n")
    assert "10/10" in bar and "/4 " not in bar  # ten evaluations, in four steps of the order-3 solver
    assert json.loads((tmp_path / "t2i_settings.json").read_text())["device"] == "cpu"


def test_version_is_the_package_version():
    from pathlib import Path

    import unidiffuser

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    (version,) = re.findall(r'^version = "([^"]+)"$', pyproject, re.M)  # tomllib needs Python 3.11
    assert unidiffuser.__version__ == version
    result = subprocess.run(
        [sys.executable, "-m", "unidiffuser.cli", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip() == f"unidiffuser {version}"
