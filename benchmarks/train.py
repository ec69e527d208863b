"""Time training steps and report throughput, achieved FLOP rates and peak memory.

One row is one configuration of the trainer's optimizer step, built from the trainer's own helpers
(``build_model``, ``build_optimizer``, ``update_ema``): a batch of features moved to the device,
the image latent drawn from its VAE posterior moments (``sample_latent``), the UniDiffuser loss
under autocast, backward, gradient clipping at 1.0, AdamW (weight decay groups and warm-up as in
training) and the EMA update. The loop copies the trainer's step without accelerate (whose
autocast is the same ``torch.autocast``), so that rows of different precision can share a process.

Model FLOPs per step are counted as 3x the forward FLOPs (``unidiffuser.flops.forward_flops``):
forward once, backward twice. Recomputation under gradient checkpointing is not counted, so
a checkpointed row shows the useful rate. The optimizer, EMA and data work are not counted either.

Defaults: on CPU the ``small`` preset in fp32 at batch 8, with and without gradient checkpointing;
on CUDA the small preset in bf16 and ``unidiffuser-v1`` at 512x512 (latents 4x64x64, 1105 tokens)
in bf16 autocast at batch 16, and at batch 32 with gradient checkpointing, each with and without
compiled blocks (``train --compile``; the warm-up steps pay the compilation). Rows that run out of
GPU memory say so.

    python benchmarks/train.py
    python benchmarks/train.py --device cuda --steps 10
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    from unidiffuser.devices import device_option
    from unidiffuser.training.trainer import build_model, build_optimizer, update_ema
except ImportError:  # run from a checkout without installing: use the src/ beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from unidiffuser.devices import device_option
    from unidiffuser.training.trainer import build_model, build_optimizer, update_ema

from unidiffuser.flops import forward_flops
from unidiffuser.network import PRESETS, UViTConfig
from unidiffuser.objective import unidiffuser_loss
from unidiffuser.schedule import NoiseSchedule
from unidiffuser.training.config import TrainConfig
from unidiffuser.training.data import sample_latent

# (preset, precision, gradient checkpointing, batch, compiled blocks)
CPU_ROWS = (("small", "no", False, 8, False), ("small", "no", True, 8, False))
CUDA_ROWS = (
    ("small", "bf16", False, 32, False),
    ("unidiffuser-v1", "bf16", False, 16, False),
    ("unidiffuser-v1", "bf16", False, 16, True),
    ("unidiffuser-v1", "bf16", True, 32, False),
    ("unidiffuser-v1", "bf16", True, 32, True),
)
AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per row (default: 1)")
    parser.add_argument(
        "--rows",
        nargs="+",
        metavar="PRESET:PRECISION:CKPT:BATCH[:COMPILE]",
        help="rows to run, e.g. small:no:0:8 unidiffuser-v1:bf16:1:16:1 (default: see above)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def parse_row(text: str) -> tuple[str, str, bool, int, bool]:
    parts = text.split(":")
    if (
        len(parts) not in (4, 5)
        or parts[0] not in PRESETS
        or parts[1] not in AUTOCAST
        or not parts[3].isdigit()
    ):
        raise SystemExit(
            f"--rows {text}: expected PRESET:PRECISION:CKPT:BATCH[:COMPILE] with the preset one of "
            f"{sorted(PRESETS)} and the precision one of {sorted(AUTOCAST)}, e.g. small:no:0:8"
        )
    on = ("1", "true", "on")
    compiled = len(parts) == 5 and parts[4] in on
    return parts[0], parts[1], parts[2] in on, int(parts[3]), compiled


def feature_batch(config: UViTConfig, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Precomputed features as a shard holds them: the image as VAE moments (mean, logvar)."""
    out = {}
    for m in config.modalities:
        if m.kind == "label":
            out[m.name] = torch.randint(0, m.num_classes, (batch,), generator=generator)
        elif m.kind == "image":
            mean = torch.randn(batch, *m.shape, generator=generator) * 5
            logvar = torch.full((batch, *m.shape), -6.0)
            out[m.name] = torch.cat([mean, logvar], dim=1)  # (B, 2C, h, w)
        else:
            out[m.name] = torch.randn(batch, *m.shape, generator=generator)
    return out


def run_row(
    preset: str, precision: str, checkpointing: bool, batch: int, compiled: bool, device: torch.device, args
) -> tuple[float, float]:
    """Median step seconds and peak GiB (0 on CPU) of one row."""
    config = PRESETS[preset]
    train_config = TrainConfig(
        model=preset, mixed_precision=precision, gradient_checkpointing=checkpointing, compile=compiled
    )
    with device:  # initialising a 1B-parameter model on the CPU is slow
        model = build_model(train_config, config)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer, scheduler = build_optimizer(model, train_config, device)
    schedule = NoiseSchedule()
    g = torch.Generator().manual_seed(args.seed)
    features = feature_batch(config, batch, g)
    if device.type == "cuda":
        features = {k: v.pin_memory() for k, v in features.items()}
    noise = torch.Generator(device=device).manual_seed(args.seed)
    images = [m.name for m in config.modalities if m.kind == "image"]
    dtype = AUTOCAST[precision]

    def step() -> None:
        data = {k: v.to(device, non_blocking=True) for k, v in features.items()}
        for name in images:
            data[name] = sample_latent(data[name], noise)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = unidiffuser_loss(model, schedule, data, generator=noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        update_ema(ema, model, train_config.ema_decay)

    model.train()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return statistics.median(times), peak


COLUMNS = (
    "preset",
    "precision",
    "grad ckpt",
    "compile",
    "batch",
    "tokens",
    "step ms",
    "samples/s",
    "TFLOP/s",
    "peak GiB",
)
WIDTHS = (15, 9, 9, 7, 5, 6, 9, 9, 8, 8)


def format_row(cells: tuple) -> str:
    return "  ".join(
        f"{c:<{w}}" if i < 4 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, WIDTHS, strict=True))
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = device_option(args.device, Path(__file__).name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what a training run on an Ampere+ GPU would use
        header = f"device: {torch.cuda.get_device_name(device)} | torch {torch.__version__} | CUDA {torch.version.cuda}"
        rows = [parse_row(r) for r in args.rows] if args.rows else list(CUDA_ROWS)
    else:
        cpu = platform.processor() or platform.machine()
        header = f"device: CPU {cpu} | torch {torch.__version__} | {torch.get_num_threads()} threads"
        rows = [parse_row(r) for r in args.rows] if args.rows else list(CPU_ROWS)
    header += f" | AdamW + EMA step, warm-up {args.warmup}, median of {args.steps}; FLOPs = 3 x forward"
    print(header, flush=True)
    line = format_row(COLUMNS)
    print(line)
    print("-" * len(line), flush=True)
    for preset, precision, checkpointing, batch, compiled in rows:
        config = PRESETS[preset]
        cells = (preset, "fp32" if precision == "no" else precision, "on" if checkpointing else "off")
        cells += ("on" if compiled else "off", batch, config.num_tokens)
        try:
            seconds, peak = run_row(preset, precision, checkpointing, batch, compiled, device, args)
        except torch.OutOfMemoryError:
            print(format_row((*cells, "OOM", "-", "-", "-")), flush=True)
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        flops = 3 * forward_flops(config, batch=batch)
        mem = f"{peak:.2f}" if device.type == "cuda" else "-"
        cells += (f"{seconds * 1e3:.1f}", f"{batch / seconds:.1f}", f"{flops / seconds / 1e12:.3f}", mem)
        print(format_row(cells), flush=True)


if __name__ == "__main__":
    main()
