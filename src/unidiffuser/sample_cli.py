"""`unidiffuser sample` and `unidiffuser convert`: the pipeline from the command line."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from pathlib import Path

MODES = ("t2i", "i2t", "joint", "i", "t", "i2t2i", "t2i2t", "interp")
NEEDS_PROMPT = ("t2i", "t2i2t")
NEEDS_IMAGE = ("i2t", "i2t2i")
RANKED = ("t2i", "i2t", "joint", "i2t2i", "t2i2t")  # the modes --best-of ranks: each output has a reference
# The modes each option is for; any other mode refuses it rather than leave it unused.
USED_BY = {
    "prompt": NEEDS_PROMPT,
    "image": (*NEEDS_IMAGE, "interp"),
    "negative_prompt": ("t2i",),
    "height": ("t2i", "joint", "i"),
    "width": ("t2i", "joint", "i"),
    "guidance": RANKED,  # the unconditional modes have nothing to guide; interpolation must not be guided
    "guidance_mode": ("t2i",),
    "frames": ("interp",),
    "solver": tuple(m for m in MODES if m != "interp"),  # interpolation runs DDIM there and back
}


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over the target."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


FP8_SCALINGS = ("row", "tensor", "static")  # fast.FP8_SCALINGS, kept here so that --help needs no torch
DTYPES = ("fp32", "bf16", "fp16")


def add_speed_arguments(p: argparse.ArgumentParser, calibration_steps: str) -> None:
    """--dtype, --fast and --fp8, as `sample` and `serve` take them; ``calibration_steps`` says at how
    many steps static fp8 scales calibrate."""
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights dtype")
    p.add_argument(
        "--fast", action="store_true",
        help="compiled network, CUDA graphs on a GPU (the first call at each shape compiles: tens of seconds)",
    )  # fmt: skip
    p.add_argument(
        "--fp8", nargs="?", const="row", choices=FP8_SCALINGS, default=None, metavar="SCALING",
        help="fp8 linear layers (implies --fast; Hopper/Ada GPUs), with scales per row or per tensor "
        "found at every call (no faster than bf16 on an H100), or static: fixed scales from one "
        f"calibration run of joint, t2i and i2t on the plain network at {calibration_steps} (calibrate_on_every_task), "
        "which made t2i 1.2 times as fast as bf16 on an H100; SCALING left out: row",
    )  # fmt: skip


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def apply_speed_arguments(pipe, args: argparse.Namespace, steps: int) -> None:
    """``pipe.enable_fast_sampling`` as --fast and --fp8 ask; static scales calibrate at ``steps``."""
    from .pipeline import calibrate_on_every_task

    if not (args.fast or args.fp8):
        return
    calibration = None
    if args.fp8 == "static":
        print(f"calibrating the fp8 scales: joint, t2i and i2t at {steps} steps", file=sys.stderr)
        calibration = functools.partial(calibrate_on_every_task, steps=steps, seed=0)
    pipe.enable_fast_sampling(fp8=args.fp8 or False, fp8_calibration=calibration)


def cmd_sample(args: argparse.Namespace) -> int:
    """Run one task of a UniDiffuser model and write its images, captions, a grid and the settings."""
    from tqdm import tqdm

    from .cli import output_folder
    from .components.images import make_grid
    from .devices import device_option
    from .fast import FastNetwork
    from .pipeline import UniDiffuser
    from .shipped import shipped_model_dir
    from .solvers import DEFAULT_SOLVER

    # What an option left out means, where its mode uses it (the pipeline's own defaults).
    left_out = {"frames": 5, "guidance_mode": "uncond", "solver": DEFAULT_SOLVER}

    for name, modes in USED_BY.items():
        if getattr(args, name) is not None and args.mode not in modes:
            option = "--" + name.replace("_", "-")
            raise SystemExit(
                f"unidiffuser sample: {option} does not apply to --mode {args.mode} (it is for "
                f"{', '.join(modes)}); leave it out"
            )
    if args.mode in NEEDS_PROMPT and not args.prompt:
        raise SystemExit(f"unidiffuser sample: --mode {args.mode} needs at least one --prompt")
    if any(not prompt.strip() for prompt in args.prompt or []):
        raise SystemExit("unidiffuser sample: --prompt is empty; give words to draw (for the unconditional "
                         "image, use --mode i)")  # fmt: skip
    if args.scorer is not None and args.best_of == 1:
        raise SystemExit("unidiffuser sample: --scorer ranks the candidates of --best-of K (K >= 2); "
                         "give --best-of or leave --scorer out")  # fmt: skip
    if args.scorer is not None and not Path(args.scorer).is_dir():
        raise SystemExit(f"unidiffuser sample: --scorer {args.scorer}: no such folder (a whole CLIP "
                         "checkpoint in transformers' layout)")  # fmt: skip
    if args.mode in NEEDS_IMAGE and not args.image:
        raise SystemExit(f"unidiffuser sample: --mode {args.mode} needs at least one --image")
    for image in args.image or []:
        if Path(image).is_dir():
            raise SystemExit(f"unidiffuser sample: --image {image} is a folder; give an image file (repeat "
                             "--image for several)")  # fmt: skip
        if not Path(image).is_file():
            raise SystemExit(f"unidiffuser sample: --image {image}: no such file")
    if args.mode == "interp":
        if len(args.image or []) != 2:
            got = len(args.image or [])
            raise SystemExit(f"unidiffuser sample: --mode interp joins exactly two --image (got {got})")
        if args.num_samples != 1:
            raise SystemExit(
                "unidiffuser sample: --mode interp draws one path of --frames pictures; -n does not apply"
            )
    for name, value in left_out.items():  # the value used, and so it is in the settings file
        if getattr(args, name) is None and args.mode in USED_BY[name]:
            setattr(args, name, value)
    if args.best_of > 1 and args.mode not in RANKED:
        raise SystemExit(
            f"unidiffuser sample: --best-of ranks samples against their prompt, image or other half; "
            f"--mode {args.mode} has none to rank against (use one of {', '.join(RANKED)})"
        )
    dtype = torch_dtype(args.dtype)
    device = device_option(args.device, "unidiffuser sample")
    out_dir = output_folder(args.out, "sample")  # before the work: a folder that cannot be made fails here
    try:
        model = args.model if args.model is not None else shipped_model_dir()
        pipe = UniDiffuser.from_pretrained(model, device=device, dtype=dtype, scorer=args.scorer)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"unidiffuser sample: --model {args.model}: {err}") from None
    if args.best_of > 1 and pipe.scorer is None:
        raise SystemExit(
            f"unidiffuser sample: --best-of {args.best_of} needs a CLIP scorer and the model "
            f"{model} has no scorer/ folder: pass --scorer DIR, a whole CLIP checkpoint in transformers' "
            "layout (for example openai/clip-vit-base-patch32, downloaded beforehand)"
        )
    pipe.data_type = args.data_type
    try:  # before any calibration or compilation
        pipe.check_size(args.height, args.width)
    except ValueError as err:
        raise SystemExit(f"unidiffuser sample: {err}") from None
    if args.guidance is None and args.mode in USED_BY["guidance"]:
        args.guidance = pipe.guidance_scale  # the model's own, and so it is in the settings file
    if args.grid is None:
        args.grid = pipe.grid  # likewise
    pipe.grid = args.grid
    apply_speed_arguments(pipe, args, args.steps)

    # A sampling loop captured as one CUDA graph has no steps to report: no bar then; nor has
    # interpolation (a caption, an inversion and the way back), which takes no progress callback.
    loops = isinstance(pipe.sampler, FastNetwork) and pipe.sampler.captures_loops
    bar = tqdm(
        total=args.steps,
        desc=args.mode,
        unit="step",
        file=sys.stderr,
        disable=loops or args.mode == "interp",
    )

    def advance(done: int, total: int) -> None:
        bar.update(done - bar.n)

    progress = None if loops else advance

    common = dict(num_samples=args.num_samples, steps=args.steps, seed=args.seed, solver=args.solver)
    ranked = dict(best_of=args.best_of, **common)
    size = dict(height=args.height, width=args.width)
    try:
        if args.mode == "t2i":
            out = pipe.text_to_image(
                args.prompt, guidance_scale=args.guidance, guidance=args.guidance_mode,
                negative_prompt=args.negative_prompt, progress=progress, **size, **ranked,
            )  # fmt: skip
        elif args.mode == "i2t":
            out = pipe.image_to_text(args.image, guidance_scale=args.guidance, progress=progress, **ranked)
        elif args.mode == "joint":
            out = pipe.joint(guidance_scale=args.guidance, progress=progress, **size, **ranked)
        elif args.mode == "i":
            out = pipe.image(progress=progress, **size, **common)
        elif args.mode == "t":
            out = pipe.text(progress=progress, **common)
        elif args.mode == "i2t2i":
            out = pipe.image_variation(args.image, guidance_scale=args.guidance, **ranked)
        elif args.mode == "interp":
            out = pipe.interpolate(*args.image, frames=args.frames, steps=args.steps, seed=args.seed)
        else:
            out = pipe.text_variation(args.prompt, guidance_scale=args.guidance, **ranked)
    except ValueError as err:
        raise SystemExit(f"unidiffuser sample: {err}") from None
    finally:
        bar.close()

    files = []
    for i, image in enumerate(out.images):
        path = out_dir / f"{args.mode}_{i:03d}.png"
        _atomic_write(path, lambda tmp, im=image: im.save(tmp, format="PNG"))
        files.append(path.name)
    if out.texts:
        path = out_dir / f"{args.mode}_captions.txt"
        _atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(out.texts) + "\n", encoding="utf-8"))
        files.append(path.name)
    if out.images:
        captions = out.texts if len(out.texts) == len(out.images) else None
        columns = len(out.images) if args.mode == "interp" else None  # a path reads as one row
        grid = make_grid(out.images, captions, columns=columns)
        path = out_dir / f"{args.mode}_grid.png"
        _atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
        files.append(path.name)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    settings["device"] = str(device)  # the one used, not "auto"
    settings["outputs"] = files
    settings["captions"] = out.texts
    path = out_dir / f"{args.mode}_settings.json"
    _atomic_write(
        path, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    )
    for text in out.texts:
        print(text)
    print(f"wrote {len(files) + 1} files to {out_dir}", file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a model directory (release files, diffusers layout, or ours) to our format."""
    from .pipeline import UniDiffuser

    try:
        pipe = UniDiffuser.from_pretrained(
            args.src, device="cpu", dtype=torch_dtype(args.dtype), scorer=args.scorer
        )
        pipe.save_pretrained(args.dst)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        raise SystemExit(f"unidiffuser convert: {err}") from None
    print(f"wrote {args.dst}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from .cli import (
        HelpFormatter,
        add_scorer_option,
        add_solver_options,
        nonnegative_float,
        positive_int,
        seed,
    )

    fmt = HelpFormatter
    p = sub.add_parser(
        "sample", help="run a task of a model and write images, captions and settings",
        description=cmd_sample.__doc__, formatter_class=fmt,
    )  # fmt: skip
    p.add_argument(
        "--model", default=None,
        help="model directory (ours, the release files, or diffusers layout); the shipped shapes model if left out",
    )  # fmt: skip
    p.add_argument(
        "--mode", "--task", dest="mode", choices=MODES, default="t2i",
        help="task: t2i text to image, i2t image to text, joint, i image, t text, i2t2i image variation, "
        "t2i2t text variation, interp pictures between two --image",
    )  # fmt: skip
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    p.add_argument("--image", action="append", help="an image file (repeat for several)")
    p.add_argument("-n", "--num-samples", type=positive_int, default=1, help="samples per prompt or image")
    p.add_argument("--steps", type=positive_int, default=50, help="model evaluations of the solver")
    p.add_argument(
        "--frames", type=positive_int, default=None,
        help="interp: pictures from the first --image to the second, both included; left out: 5 (DDIM "
        "inversion and back, unguided)",
    )  # fmt: skip
    p.add_argument(
        "--guidance", type=nonnegative_float, default=None,
        help="guidance scale s (default: the model's own, 7 for the released weights)",
    )  # fmt: skip
    p.add_argument(
        "--guidance-mode", choices=("uncond", "empty"), default=None,
        help="t2i's unconditional term: the condition absent (uncond) or the empty prompt (empty); left out: "
        "uncond",
    )  # fmt: skip
    p.add_argument("--negative-prompt", default=None, help="a prompt to steer away from (t2i)")
    p.add_argument("--seed", type=seed, default=0, help="seed of all noise")
    for side in ("height", "width"):
        p.add_argument(f"--{side}", type=positive_int, default=None,
                       help=f"image {side} in pixels (multiple of 16); left out: the model's own")  # fmt: skip
    add_solver_options(p, solver_unset=True)
    p.add_argument(
        "--best-of", type=positive_int, default=1, metavar="K",
        help="draw K samples for each one written and keep the one a CLIP scorer finds nearest its prompt or "
        "image (joint: its own picture and caption nearest each other); K times the work; "
        f"modes {', '.join(RANKED)}",
    )  # fmt: skip
    add_scorer_option(
        p, "to rank --best-of with", "the model's own scorer/ folder (the shipped model has one)"
    )
    p.add_argument("--data-type", type=int, choices=(0, 1), default=1, help="v1 data_type: 1 curated, 0 web")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_speed_arguments(p, "--steps")
    p.add_argument("--out", default="samples", help="output folder")
    p.set_defaults(func=cmd_sample)

    c = sub.add_parser(
        "convert", help="convert release files or a diffusers layout to our format",
        description=cmd_convert.__doc__, formatter_class=fmt,
    )  # fmt: skip
    c.add_argument("src", help="source model directory")
    c.add_argument("dst", help="destination directory (must not exist)")
    c.add_argument(
        "--dtype", choices=DTYPES, default="fp32",
        help="weights dtype of the written files (loading casts them to the dtype asked for)",
    )  # fmt: skip
    add_scorer_option(
        c, "to write as the model's scorer/ (ranks best-of sampling)", "the source's own, if it has one"
    )
    c.set_defaults(func=cmd_convert)
