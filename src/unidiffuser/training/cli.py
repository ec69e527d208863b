"""`unidiffuser train` and `unidiffuser train-decoder`: options from a TOML file and/or flags
(flags win), then the trainer of that stage.

Registered in ``unidiffuser.cli`` through COMMAND_MODULES; also runnable on its own, e.g.
``torchrun --nproc_per_node 2 -m unidiffuser.training.cli train --config run.toml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..objective import WEIGHTINGS
from .config import (
    DECODER_FIELD_HELP,
    DECODER_PRECISION,
    DISTRIBUTED,
    FIELD_HELP,
    MIXED_PRECISION,
    DecoderTrainConfig,
    TrainConfig,
    load_config,
    to_toml,
)

DESCRIPTION = """\
Train or fine-tune a UniDiffuser network with the paper's objective, on one CPU, one GPU or many.

Options come from --config (a TOML file of the keys below, in snake_case) and from flags, which
override the file. The resolved options are written to OUTPUT_DIR/config.toml and config.json;
checkpoints go to OUTPUT_DIR/checkpoints/step_N/. Several processes:
  torchrun --nproc_per_node N -m unidiffuser.cli train ...            (CPU: gloo, GPU: nccl)
  accelerate launch --num_processes N -m unidiffuser.cli train ...    (GPUs)
with --distributed fsdp the network, its optimizer state and EMA are sharded over them.

Fine-tuning the released model: --init-from uvit_v1.pth (or the release directory, a diffusers
directory, one of our model directories or checkpoints); without --model the network takes the
architecture of those weights. With --components MODEL_DIR --sample-every N, sample grids from the
EMA network go to OUTPUT_DIR/samples/step_N/. A new text encoder needs its caption decoder first:
see `unidiffuser train-decoder --help`.
"""

DECODER_DESCRIPTION = """\
Train the caption decoder: GPT-2 and its bottleneck (features -> prefix_dim -> GPT-2 width) learn to
reconstruct captions from the frozen CLIP text encoder's features. This stage comes first when the
text encoder changes: the U-ViT is then trained on the latents of the decoder it leaves.

Options come from --config (a TOML file of the keys below, in snake_case) and from flags, which
override the file. Checkpoints go to OUTPUT_DIR/checkpoints/step_N/ (caption_decoder.safetensors,
caption_decoder.json, caption_tokenizer/: the files of a model directory); --resume continues.
Example, from pretrained GPT-2 with the text encoder of a model directory:
  unidiffuser train-decoder --captions captions.txt --text-encoder MODEL_DIR --init-from gpt2/
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
    """Add the ``train`` and ``train-decoder`` subcommands."""
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune a network (one CPU to many GPUs)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, metavar="TOML", help="TOML file of options (default: none)")
    choices = {"mixed_precision": MIXED_PRECISION, "weighting": WEIGHTINGS, "distributed": DISTRIBUTED}
    add_config_arguments(parser, TrainConfig, FIELD_HELP, choices)
    parser.add_argument("--dry-run", action="store_true", help="print the resolved options as TOML and exit")
    parser.set_defaults(func=cmd_train)

    parser = subparsers.add_parser(
        "train-decoder",
        help="train the caption decoder (GPT-2 + bottleneck) on captions; precedes `train` on new text encoders",
        description=DECODER_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, metavar="TOML", help="TOML file of options (default: none)")
    add_config_arguments(
        parser, DecoderTrainConfig, DECODER_FIELD_HELP, {"mixed_precision": DECODER_PRECISION}
    )
    parser.add_argument("--dry-run", action="store_true", help="print the resolved options as TOML and exit")
    parser.set_defaults(func=cmd_train_decoder)


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

    distributed = False
    try:
        result = train(config)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:
            torch.distributed.barrier()  # no process closes its connections while another still uses them
    except ValueError as e:
        print(f"unidiffuser train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gc.collect()  # pending collective work held in reference cycles is freed while the group lives
            torch.distributed.destroy_process_group()
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        print(f"trained to step {result.step}; last checkpoint {result.checkpoint}")
    if distributed:
        leave_without_finalizing(0)
    return 0


def leave_without_finalizing(code: int) -> None:
    """End a process of a finished multi-process run at once, skipping the interpreter's teardown.

    Everything the run writes is on disk by now (checkpoints atomically, logs closed). What is left
    is the C++ side of the process group: its Gloo worker threads can outlive
    ``destroy_process_group`` and, torn down during interpreter finalization, abort the process
    ("terminate called without an active exception"). One such abort on a 2-process CPU run made
    torchrun report a run that had finished as failed; leaving here returns ``code`` instead.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_train_decoder(args: argparse.Namespace) -> int:
    """Resolve the options, then train the caption decoder (or print them with --dry-run)."""
    from .decoder import train_decoder

    try:
        config = load_config(args.config, config_overrides(args, DecoderTrainConfig), cls=DecoderTrainConfig)
    except ValueError as e:
        print(f"unidiffuser train-decoder: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("# unidiffuser train-decoder: resolved options (save as a file and pass it to --config)")
        print(to_toml(config.to_dict()), end="")
        return 0
    try:
        result = train_decoder(config)
    except (ValueError, FileNotFoundError) as e:
        print(f"unidiffuser train-decoder: error: {e}", file=sys.stderr)
        return 2
    print(f"trained the caption decoder to step {result.step}; last checkpoint {result.checkpoint}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unidiffuser")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
