"""The ``unidiffuser`` command line."""

from __future__ import annotations

import argparse
import difflib
import importlib
import math
import sys
import time
from pathlib import Path

# Modules that add their own subcommands: each defines register(subparsers) and keeps its heavy
# imports inside the command functions, so that `unidiffuser --help` stays fast.
COMMAND_MODULES: tuple[str, ...] = (
    "unidiffuser.sample_cli",
    "unidiffuser.training.cli",
    "unidiffuser.extract",
    "unidiffuser.serve",
    "unidiffuser.shapes.cli",
)


def _integer(text: str, low: int, high: float, expected: str) -> int:
    """An option's integer in [low, high], or argparse's error saying what was ``expected``."""
    value = int(text)
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _integer(text, 1, math.inf, "an integer >= 1")


def nonnegative_int(text: str) -> int:
    return _integer(text, 0, math.inf, "an integer >= 0")


def seed(text: str) -> int:
    return _integer(text, 0, 2**63 - 1, "a seed from 0 to 2**63 - 1")


def port_number(text: str) -> int:
    return _integer(text, 0, 65535, "a port from 0 to 65535 (0: any free one)")


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def output_folder(out: str, command: str) -> Path:
    """The folder ``--out`` names, made if missing; a file there is refused with the fix."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise SystemExit(
            f"unidiffuser {command}: --out {out} is a file; name a folder to write into (made if missing)"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def cmd_toy(args: argparse.Namespace) -> int:
    """Train on the toy world for a while, then sample every mode and compare with the law."""
    import torch
    from tqdm import tqdm

    from .schedule import NoiseSchedule
    from .toy import ToyWorld, measure, model_draw, train_toy, true_draw

    torch.manual_seed(args.seed)
    world = ToyWorld(seed=args.seed)
    print(
        f"Toy world: {world.num_labels} clusters of 2-D points (the 'image') with priors {world.priors}, "
        f"each named by a {world.code_length}x{world.code_dim} code sequence (the 'text')."
    )
    bar = tqdm(total=round(args.seconds), desc="training", unit="s", file=sys.stderr)
    start, last = time.perf_counter(), [0.0]

    def log(step: int, loss: float, parts: dict) -> None:
        elapsed = time.perf_counter() - start
        if elapsed - last[0] >= 1 or step == 0:
            bar.update(min(round(elapsed), bar.total) - bar.n)
            bar.set_postfix(step=step, loss=f"{loss:.3f}")
            last[0] = elapsed

    model = train_toy(world, steps=10**9, seconds=args.seconds, seed=args.seed, log=log)
    bar.update(bar.total - bar.n)
    bar.close()

    schedule = NoiseSchedule()
    gen = torch.Generator().manual_seed(args.seed + 1)
    print(f"Sampling every mode, {args.samples} samples each, {args.steps} DPM-Solver++ steps ...")
    columns = {
        "law": measure(world, true_draw(world, gen), args.samples, gen),
        "model": measure(
            world, model_draw(model, schedule, steps=args.steps, generator=gen), args.samples, gen
        ),
        f"model, guidance {args.guidance:g}": measure(
            world,
            model_draw(model, schedule, steps=args.steps, guidance_scale=args.guidance, generator=gen),
            args.samples,
            gen,
        ),
    }
    width = max(len(k) for k in columns["law"])
    print(f"\n{'statistic':<{width}}  " + "  ".join(f"{c:>20}" for c in columns))
    for key in columns["law"]:
        print(f"{key:<{width}}  " + "  ".join(f"{columns[c][key]:>20.3f}" for c in columns))
    print(
        "\nShares and agreements near the law's column mean the model learned every conditional, "
        "both marginals and the joint; guidance trades diversity for agreement with the condition."
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run every mode of a model (the shipped shapes model by default) and write a gallery."""
    start = time.perf_counter()
    from .gallery import write_gallery
    from .pipeline import UniDiffuser
    from .shipped import shipped_model_dir

    out = output_folder(args.out, "demo")  # before the model loads: a bad folder fails at once
    try:
        pipe = UniDiffuser.from_pretrained(args.model if args.model is not None else shipped_model_dir())
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"unidiffuser demo: {err}") from None
    if args.grid is not None:
        pipe.grid = args.grid
    page = write_gallery(pipe, out, steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
    print(f"wrote {page} in {time.perf_counter() - start:.0f} s: open it in a browser")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """List the network presets with their sizes."""
    import torch

    from .network import PRESETS, UViT

    print(f"{'preset':<16} {'parameters':>14} {'tokens':>7} {'width':>6} {'blocks':>7}  modalities")
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            n = UViT(cfg).num_parameters()
        mods = ", ".join(f"{m.name}{list(m.shape) if m.shape else ''}" for m in cfg.modalities)
        print(f"{name:<16} {n:>14,} {cfg.num_tokens:>7} {cfg.width:>6} {cfg.depth + 1:>7}  {mods}")
    return 0


def add_solver_options(
    parser: argparse.ArgumentParser, *, solver: bool = True, solver_unset: bool = False
) -> None:
    """``--solver`` (unless ``solver`` is False) and ``--grid``: how every sampling call integrates.

    The grid left out is the model's own (``sampling.grid`` in its unidiffuser.json). With
    ``solver_unset`` the solver left out is None, so that a command can tell it from a choice (and
    refuse it where it does not apply); the command then puts ``DEFAULT_SOLVER`` in its place.
    """
    from .solvers import DEFAULT_SOLVER, GRIDS, SOLVERS

    if solver:
        default, left_out = (None, f"; left out: {DEFAULT_SOLVER}") if solver_unset else (DEFAULT_SOLVER, "")
        parser.add_argument("--solver", choices=SOLVERS, default=default, help=f"ODE solver{left_out}")
    parser.add_argument(
        "--grid", choices=GRIDS, default=None,
        help="the solver's time grid: uniform in t (time, as released) or in log-SNR (logsnr); left out: "
        "the model's own",
    )  # fmt: skip


def add_scorer_option(parser: argparse.ArgumentParser, use: str, left_out: str) -> None:
    """``--scorer DIR``: a whole CLIP checkpoint (transformers layout) that ranks best-of sampling."""
    parser.add_argument(
        "--scorer",
        default=None,
        metavar="DIR",
        help=f"a whole CLIP checkpoint (transformers layout) {use}; left out: {left_out}",
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every command's help: an option's default follows its help, except a default of None,
    whose meaning (the model's own, the shipped model, ...) the help says in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unidiffuser",
        description="UniDiffuser: one transformer for every distribution of multi-modal data.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"unidiffuser {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = HelpFormatter

    demo = sub.add_parser(
        "demo",
        help="run every mode of the shipped shapes model and write a gallery (PNG grids, an HTML page)",
        description=cmd_demo.__doc__,
        formatter_class=fmt,
    )
    demo.add_argument("--model", default=None, help="model directory; the shipped shapes model if left out")
    demo.add_argument("--out", default="gallery", help="output folder")
    demo.add_argument("--steps", type=positive_int, default=20, help="solver steps per sample")
    demo.add_argument(
        "--guidance", type=nonnegative_float, default=None, help="guidance scale (default: the model's own)"
    )
    add_solver_options(demo, solver=False)
    demo.add_argument("--seed", type=seed, default=0, help="seed of all noise")
    demo.set_defaults(func=cmd_demo)

    toy = sub.add_parser(
        "toy",
        help="train a small model on a toy two-modality world and sample every mode",
        description=cmd_toy.__doc__,
        formatter_class=fmt,
    )
    toy.add_argument("--seconds", type=positive_float, default=60.0, help="training time budget")
    toy.add_argument("--steps", type=positive_int, default=25, help="solver steps per sample")
    toy.add_argument("--samples", type=positive_int, default=1000, help="samples per mode")
    toy.add_argument(
        "--guidance", type=nonnegative_float, default=3.0, help="guidance scale of the third column"
    )
    toy.add_argument("--seed", type=seed, default=0, help="seed of the world, training and sampling")
    toy.set_defaults(func=cmd_toy)

    info = sub.add_parser(
        "info", help="list network presets", description=cmd_info.__doc__, formatter_class=fmt
    )
    info.set_defaults(func=cmd_info)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def refuse_unknown(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> None:
    """Exit with the command's own usage and, for each unknown option, its nearest known ones
    (argparse alone reports unknown options of a subcommand under the top-level usage)."""
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command_parser = commands.choices[command]
    known = [o for a in command_parser._actions for o in a.option_strings if o.startswith("--")]
    hints = []
    for arg in (a for a in unknown if a.startswith("-")):
        near = difflib.get_close_matches(arg.split("=", 1)[0], known, n=2, cutoff=0.6)
        if near:
            hints.append(f"{arg}: did you mean {' or '.join(near)}?")
    more = f" ({'; '.join(hints)})" if hints else ""
    command_parser.error(f"unrecognized arguments: {' '.join(unknown)}{more}; see --help")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        refuse_unknown(parser, args.command, unknown)
    try:
        return args.func(args)
    except OSError as err:
        if err.filename is None:  # not about a path the user can fix
            raise
        # an output folder that cannot be made, a file that cannot be written or read
        raise SystemExit(f"unidiffuser {args.command}: {err.filename}: {err.strerror}") from None


if __name__ == "__main__":
    sys.exit(main())
