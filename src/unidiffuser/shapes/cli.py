"""`unidiffuser recipe shapes` and `unidiffuser eval shapes`: make the shapes model, and score one."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .evaluate import TASKS
from .recipe import PRESETS, STAGES, recipe_options

WORLDS = ("shapes",)


def cmd_recipe(args: argparse.Namespace) -> int:
    """Train every component of the shapes model from a seed into --out (resumable: rerun to continue)."""
    from ..devices import device_option
    from .recipe import parse_options, run_recipe

    if args.smoke and args.preset not in ("full", "smoke"):
        raise SystemExit(
            f"unidiffuser recipe: --smoke means --preset smoke; give one of them, not --smoke with --preset {args.preset}"
        )
    make = PRESETS["smoke" if args.smoke else args.preset]
    device = str(device_option(args.device, "unidiffuser recipe"))
    try:
        recipe = make(
            seed=args.seed,
            device=device,
            threads=args.threads,
            frozen_from=args.frozen_from or "",
            **parse_options(args.set),
        )
    except ValueError as err:
        raise SystemExit(f"unidiffuser recipe: {err}") from None
    start = time.perf_counter()
    try:
        model = run_recipe(args.out, recipe, log=lambda text: print(text, file=sys.stderr), only=args.stage)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"unidiffuser recipe: {err}") from None
    wrote_model = not args.stage or "model" in args.stage
    done = f"wrote {model}" if wrote_model else f"stages {', '.join(args.stage)} done"
    print(f"{done} ({time.perf_counter() - start:.0f} s this run; stage times in {args.out}/recipe.json)")
    if wrote_model:
        print(
            f"next: unidiffuser demo --model {model}  (every mode, a gallery)\n"
            f"      unidiffuser eval shapes --model {model}  (scored by the world's parsers)",
            file=sys.stderr,
        )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Score every mode of a shapes-world model with the world's exact parsers; prints a Markdown table."""
    import torch

    from ..devices import device_option
    from ..pipeline import UniDiffuser
    from ..shipped import shipped_model_dir
    from .evaluate import evaluate, format_rows

    if args.out and not Path(args.out).resolve().parent.is_dir():  # refused now, not after the evaluation
        raise SystemExit(f"unidiffuser eval: --out {args.out}: its folder does not exist; create it first")
    if args.out and Path(args.out).is_dir():
        raise SystemExit(f"unidiffuser eval: --out {args.out} is a folder; name the Markdown file to write")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_option(args.device, "unidiffuser eval")
    try:
        model = args.model if args.model is not None else shipped_model_dir()
        pipe = UniDiffuser.from_pretrained(model, device=device)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"unidiffuser eval: --model {args.model}: {err}") from None
    if args.grid is not None:
        pipe.grid = args.grid
    if args.best_of > 1 and pipe.scorer is None:
        raise SystemExit(
            f"unidiffuser eval: --best-of {args.best_of}: the model {model} has no scorer/ folder (a whole "
            "CLIP) to rank candidates with; `unidiffuser convert MODEL NEW --scorer CLIP_DIR` adds one"
        )
    start = time.perf_counter()
    print(format_rows([]), flush=True)
    rows = evaluate(
        pipe,
        samples=args.samples,
        steps=args.steps,
        guidance_scales=args.guidance if args.guidance is not None else (0.0, pipe.guidance_scale),
        seed=args.seed,
        batch_size=args.batch_size,
        log=lambda line: print(line, flush=True),
        tasks=args.tasks,
        solver=args.solver,
        best_of=args.best_of,
    )
    seconds = time.perf_counter() - start
    ranked = (
        f", each ranked sample the best of {args.best_of} by the model's scorer" if args.best_of > 1 else ""
    )
    settings = (
        f"{args.samples} samples per row, {args.steps} steps of {args.solver} on the {pipe.grid} grid, "
        f"seed {args.seed}{ranked}"
    )
    print(f"\n{settings}: {seconds:.0f} s", file=sys.stderr)
    if args.out:
        from .stage import write_text_atomic

        write_text_atomic(Path(args.out), format_rows(rows) + f"\n\n{settings}.\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli import (
        HelpFormatter,
        add_solver_options,
        nonnegative_float,
        nonnegative_int,
        positive_int,
        seed,
    )

    fmt = HelpFormatter
    r = sub.add_parser(
        "recipe", help="train every component of the small shapes model from a seed (resumable)",
        description=cmd_recipe.__doc__, formatter_class=fmt,
    )  # fmt: skip
    r.add_argument("world", choices=WORLDS, help="the synthetic world")
    r.add_argument("--out", required=True, help="run directory; rerun with the same options to resume")
    r.add_argument("--seed", type=seed, default=0, help="seed of every stage")
    r.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    r.add_argument(
        "--threads", type=nonnegative_int, default=0, help="torch CPU threads (0: torch's default)"
    )
    r.add_argument(
        "--preset", choices=PRESETS, default="full",
        help="full: the shipped model's recipe (about 16.3 hours on 2 CPU cores); hour: a smaller, weaker "
        "model in about an hour there (46 to 81 min measured); smoke: every stage for a few steps (checks the plumbing)",
    )  # fmt: skip
    r.add_argument("--smoke", action="store_true", help="the same as --preset smoke")
    r.add_argument(
        "--frozen-from", default=None, metavar="MODEL",
        help="take the tokenizers, CLIP, autoencoder and caption decoder from this shapes model "
        "(a folder, or 'shipped') instead of training them; the U-ViT is still trained from --seed",
    )  # fmt: skip
    r.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="change one recipe option (repeat for several), such as uvit_steps=100000 or precision=bf16; "
        f"the options, with the shipped model's values: {', '.join(recipe_options())}",
    )  # fmt: skip
    r.add_argument(
        "--stage", action="append", choices=STAGES, default=None,
        help="run only this stage (repeat for several); the stages before it must be finished",
    )  # fmt: skip
    r.set_defaults(func=cmd_recipe)

    e = sub.add_parser(
        "eval", help="score every mode of a shapes-world model with the world's exact parsers",
        description=cmd_eval.__doc__, formatter_class=fmt,
    )  # fmt: skip
    e.add_argument("world", choices=WORLDS, help="the synthetic world")
    e.add_argument("--model", default=None, help="model directory; the shipped shapes model if left out")
    e.add_argument("--samples", type=positive_int, default=64, help="samples per row")
    e.add_argument(
        "--steps", type=positive_int, default=50, help="solver steps per sample (the pipeline's default)"
    )
    e.add_argument(
        "--guidance",
        type=nonnegative_float,
        nargs="+",
        default=None,
        help="guidance scales to compare (default: 0 and the model's own)",
    )
    e.add_argument(
        "--tasks", nargs="+", choices=TASKS, default=list(TASKS), metavar="TASK",
        help=f"score only these tasks' rows ({', '.join(TASKS)})",
    )  # fmt: skip
    add_solver_options(e)
    e.add_argument(
        "--best-of", type=positive_int, default=1, metavar="K",
        help="score best-of sampling: each conditional and joint sample the best of K candidates by the "
        "model's CLIP scorer (K times the work); the image and text rows stay as drawn",
    )  # fmt: skip
    e.add_argument("--seed", type=seed, default=0, help="seed of the scenes, prompts and noise")
    e.add_argument("--batch-size", type=positive_int, default=64, help="samples per pipeline call")
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    e.add_argument(
        "--threads", type=nonnegative_int, default=0, help="torch CPU threads (0: torch's default)"
    )
    e.add_argument("--out", default=None, help="also write the table to this Markdown file")
    e.set_defaults(func=cmd_eval)
