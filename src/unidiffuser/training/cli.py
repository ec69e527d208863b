"""`unidiffuser train`: options from a TOML file and/or flags (flags win), then the trainer.

Registered in ``unidiffuser.cli`` through COMMAND_MODULES; also runnable on its own, e.g.
``torchrun --nproc_per_node 2 -m unidiffuser.training.cli train --config run.toml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from ..objective import WEIGHTINGS
from .config import FIELD_HELP, MIXED_PRECISION, TrainConfig, load_config

DESCRIPTION = """\
Train or fine-tune a UniDiffuser network with the paper's objective, on one CPU, one GPU or many.

Options come from --config (a TOML file of the keys below, in snake_case) and from flags, which
override the file. The resolved options are written to OUTPUT_DIR/config.toml and config.json;
checkpoints go to OUTPUT_DIR/checkpoints/step_N/. Several processes:
  torchrun --nproc_per_node N -m unidiffuser.cli train ...            (CPU: gloo, GPU: nccl)
  accelerate launch --num_processes N -m unidiffuser.cli train ...    (GPUs)

Fine-tuning the released model: --init-from uvit_v1.pth (or the release directory, a diffusers
directory, one of our model directories or checkpoints); without --model the network takes the
architecture of those weights. With --components MODEL_DIR --sample-every N, sample grids from the
EMA network go to OUTPUT_DIR/samples/step_N/.
"""


def _loss_weight(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT such as img=1.0, got {text!r}") from None


def _model(text: str) -> str | dict:
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"--model: not valid JSON ({e})") from None
    return text


def _shown(value: Any) -> str:
    if value is None or value == {} or value == ():
        return "none"
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return " ".join(json.dumps(v) for v in value)
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    field_help: dict[str, str],
    choices: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """One flag per field of a config dataclass, its help line showing the default.

    Every default is None here, so that only flags actually given override the TOML file.
    """
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.default is not dataclasses.MISSING:
            shown = _shown(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            shown = _shown(f.default_factory())
        else:
            shown = "none, required"
        help_line = f"{field_help[f.name]} (default: {shown})"
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_line)
        elif f.type == "tuple[float, float]":
            parser.add_argument(flag, type=float, nargs=2, metavar=("B1", "B2"), help=help_line)
        elif f.type == "tuple[str, ...]":
            metavar = "PATH" if f.name.endswith("images") else "TEXT"
            parser.add_argument(flag, nargs="+", metavar=metavar, help=help_line)
        elif f.type == "Mapping[str, float]":
            parser.add_argument(
                "--" + f.name.rstrip("s").replace("_", "-"),
                dest=f.name,
                type=_loss_weight,
                action="append",
                metavar="NAME=WEIGHT",
                help=help_line + "; repeat for several",
            )
        elif f.type.startswith("str | Mapping"):
            parser.add_argument(flag, type=_model, metavar="NAME|JSON", help=help_line)
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            parser.add_argument(flag, type=kind, choices=(choices or {}).get(f.name), help=help_line)


def config_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields given as flags."""
    overrides = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name)
        if value is not None:
            overrides[f.name] = dict(value) if f.type == "Mapping[str, float]" else value
    return overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand."""
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune a network (one CPU to many GPUs)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, metavar="TOML", help="TOML file of options (default: none)")
    add_config_arguments(
        parser, TrainConfig, FIELD_HELP, {"mixed_precision": MIXED_PRECISION, "weighting": WEIGHTINGS}
    )
    parser.add_argument("--dry-run", action="store_true", help="print the resolved options as TOML and exit")
    parser.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    """Resolve the options, then train (or print them with --dry-run)."""
    try:
        config = load_config(args.config, config_overrides(args, TrainConfig))
        if args.dry_run and config.model is None and config.init_from:
            architecture = config.model_config()  # reads init_from: fails here if it is unusable
    except ValueError as e:
        print(f"unidiffuser train: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("# unidiffuser train: resolved options (save as a file and pass it to --config)")
        if config.model is None and config.init_from:
            print(f"# model left out: the architecture of init_from, {json.dumps(architecture.to_dict())}")
        print(config.to_toml(), end="")
        return 0

    import torch

    from .trainer import train

    try:
        result = train(config)
    except ValueError as e:
        print(f"unidiffuser train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    print(f"trained to step {result.step}; last checkpoint {result.checkpoint}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unidiffuser")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
