"""Time the UViT forward pass and report achieved FLOP rates.

For every (preset, batch size) the network is built with random weights, put in eval mode, warmed
up, then timed ``--repeats`` times under ``torch.no_grad``; the table gives the median time, the
analytic FLOP count of one forward (``unidiffuser.flops.forward_flops``) and the achieved TFLOP/s
(that count over the median time). On CUDA it also gives the peak memory allocated by torch.

Defaults: on CPU the tiny and small presets in fp32 at batch 1 and 8; on CUDA additionally
unidiffuser-v1 in bf16 at batch 1 and 8. ``--dtype`` forces one dtype for every row.

    python benchmarks/forward.py
    python benchmarks/forward.py --device cuda --presets tiny small unidiffuser-v1 --dtype bf16
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    from unidiffuser.devices import device_option
    from unidiffuser.flops import forward_flops, num_tokens
    from unidiffuser.network import PRESETS, UViT, UViTConfig
except ImportError:  # run from a checkout without installing: use the src/ beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from unidiffuser.devices import device_option
    from unidiffuser.flops import forward_flops, num_tokens
    from unidiffuser.network import PRESETS, UViT, UViTConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU_DEFAULT = (("tiny", "fp32"), ("small", "fp32"))
CUDA_EXTRA = (("unidiffuser-v1", "bf16"),)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--presets",
        nargs="+",
        choices=sorted(PRESETS),
        help="presets to time (default: tiny small, plus unidiffuser-v1 on CUDA)",
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8], help="default: 1 8")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="weights and inputs dtype for every row (default: fp32, bf16 for the unidiffuser-v0/v1 presets)",
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per row (default: 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forwards per row (default: 3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or any(b < 1 for b in args.batch_sizes):
        parser.error("--repeats and every batch size must be >= 1, --warmup >= 0")
    return args


def plan(args: argparse.Namespace, device: torch.device) -> list[tuple[str, str]]:
    """(preset, dtype name) pairs to run, in order."""
    if args.presets:
        pairs = [(p, args.dtype or ("bf16" if p.startswith("unidiffuser") else "fp32")) for p in args.presets]
    else:
        pairs = list(CPU_DEFAULT) + (list(CUDA_EXTRA) if device.type == "cuda" else [])
        if args.dtype:
            pairs = [(p, args.dtype) for p, _ in pairs]
    return pairs


def random_inputs(
    config: UViTConfig, batch: int, device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    inputs = {}
    for m in config.modalities:
        if m.kind == "label":
            inputs[m.name] = torch.randint(0, m.num_classes, (batch,), device=device)
        else:
            inputs[m.name] = torch.randn(batch, *m.shape, device=device, dtype=dtype)
    timesteps = {g: torch.rand(batch, device=device) * 1000 for g in config.groups}
    return inputs, timesteps


def time_forward(model: UViT, inputs: dict, timesteps: dict, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` forwards, after ``warmup`` untimed ones."""
    cuda = model.device.type == "cuda"
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            model(inputs, timesteps)
        if cuda:
            torch.cuda.synchronize()
        for _ in range(repeats):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(inputs, timesteps)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                model(inputs, timesteps)
                times.append((time.perf_counter() - t0) * 1e3)
    return times


WIDTHS = (16, 6, 5, 5, 6, 10, 10, 8, 9)


def format_row(cells: tuple) -> str:
    """The first three cells left-aligned, the numbers right-aligned."""
    return "  ".join(
        f"{c:<{w}}" if i < 3 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, WIDTHS, strict=True))
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = device_option(args.device, Path(__file__).name)
    cuda = device.type == "cuda"
    if cuda:
        name = torch.cuda.get_device_name(device)
        tf32 = "on" if torch.backends.cuda.matmul.allow_tf32 else "off"
        header = f"device: {name} | torch {torch.__version__} | CUDA {torch.version.cuda} | fp32 matmul TF32 {tf32}"
    else:
        cpu = platform.processor() or platform.machine()
        header = f"device: CPU {cpu} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    header += f" | warm-up {args.warmup}, median of {args.repeats}"
    print(header, flush=True)

    columns = (
        "preset",
        "device",
        "dtype",
        "batch",
        "tokens",
        "median ms",
        "GFLOP/fwd",
        "TFLOP/s",
        "peak MiB",
    )
    line = format_row(columns)
    print(line)
    print("-" * len(line), flush=True)

    for preset_name, dtype_name in plan(args, device):
        config = PRESETS[preset_name]
        dtype = DTYPES[dtype_name]
        torch.manual_seed(args.seed)
        if cuda:
            torch.cuda.empty_cache()
        with device:  # build on the device: initialising a 1B-parameter model on the CPU is slow
            model = UViT(config)
        model = model.to(dtype).eval()
        # The value checks (NaN, label and timestep ranges) read values back to the host and so
        # synchronise the GPU every forward; turn them off to time the network alone.
        model.check_values = False
        for batch in args.batch_sizes:
            inputs, timesteps = random_inputs(config, batch, device, dtype)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            times = time_forward(model, inputs, timesteps, args.warmup, args.repeats)
            ms = statistics.median(times)
            flops = forward_flops(config, batch=batch)
            peak = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f}" if cuda else "-"
            cells = (
                preset_name,
                device.type,
                dtype_name,
                batch,
                num_tokens(config),
                f"{ms:.3f}",
                f"{flops / 1e9:.3f}",
                f"{flops / (ms * 1e-3) / 1e12:.3f}",
                peak,
            )
            print(format_row(cells), flush=True)
            del inputs, timesteps
        del model


if __name__ == "__main__":
    main()
