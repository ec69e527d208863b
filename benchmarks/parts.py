# Not named kernels.py: transformers probes for a package "kernels", and a script's folder is on sys.path.
"""The parts of one sampling call, each timed alone at the released model's shapes.

Where ``sampling.py`` times whole calls, this times the pieces that the fast path may swap, so a
choice rests on a measured ratio:

- linear: one transformer block's four linear layers at the released width (1536, MLP 6144) for
  the token rows of a guided batch-1 step (2 x 1105) and of batch 8: bf16 ``F.linear`` against
  the fp8 product with row and with tensor scales, the product alone (inputs quantized
  beforehand) and as ``fast.Fp8Linear`` compiled, quantization included (``--batches``).
- attention: scaled dot-product attention over 1105 tokens, 24 heads of 64, per SDPA backend.
- decode: the released-size autoencoder's decoder at 512x512, batch 1, eager in both layouts and
  compiled channels-last.

Random weights; CUDA events around ``--repeats`` calls after a warm-up; medians.

    python benchmarks/parts.py --device cuda
    python benchmarks/parts.py --device cpu --small     # smoke test of this script
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    from unidiffuser.fast import FP8, FP8_MAX, Fp8Linear
except ImportError:  # run from a checkout without installing: use the src/ beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from unidiffuser.fast import FP8, FP8_MAX, Fp8Linear
from unidiffuser.components.autoencoder import ImageAutoencoder
from unidiffuser.devices import device_option

TOKENS = 1105  # the released network's tokens at 512x512: 1024 image, 1 CLIP, 77 text, 2 times, 1 label


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sections", nargs="+", choices=("linear", "attention", "decode"),
                        default=["linear", "attention", "decode"])  # fmt: skip
    parser.add_argument(
        "--batches", nargs="+", type=int, default=[2], help="rows of 1105 tokens (2: a guided step)"
    )
    parser.add_argument(
        "--small", action="store_true", help="tiny shapes (a smoke test; figures mean nothing)"
    )
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    return parser.parse_args(argv)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn`` after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def quantize(x: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    amax = x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().amax()
    scale = amax.float().clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def linear_rows(args, device: torch.device) -> list[tuple]:
    width, hidden = (64, 256) if args.small else (1536, 6144)
    layers = {
        "qkv": (width, 3 * width),
        "proj": (width, width),
        "fc1": (width, hidden),
        "fc2": (hidden, width),
    }
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for batch in args.batches:
        m = batch * (32 if args.small else TOKENS)
        for name, (k, n) in layers.items():
            linear = torch.nn.Linear(k, n).to(device, dtype).requires_grad_(False)
            x = torch.randn(m, k, device=device, dtype=dtype)
            flop = 2 * m * k * n
            ms = {"bf16": timed(partial(F.linear, x, linear.weight, linear.bias), device, args.repeats)}
            for scaling in ("row", "tensor"):
                layer = Fp8Linear(linear, scaling)
                xq, sx = quantize(x, scaling == "row")
                wt = layer.weight.t()
                product = partial(
                    torch._scaled_mm, xq, wt, scale_a=sx, scale_b=layer.weight_scale, out_dtype=dtype
                )
                ms[f"fp8 {scaling} product"] = timed(product, device, args.repeats)
                compiled = torch.compile(layer, backend=args.backend, dynamic=False)
                ms[f"fp8 {scaling} layer"] = timed(partial(compiled, x), device, args.repeats)
            for path, t in ms.items():
                rows.append((batch, name, f"{m}x{k}x{n}", path, f"{t:.4f}", f"{flop / t / 1e9:.1f}",
                             f"{ms['bf16'] / t:.2f}"))  # fmt: skip
    return rows


def attention_rows(args, device: torch.device) -> list[tuple]:
    heads, dim, tokens = (4, 16, 64) if args.small else (24, 64, TOKENS)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip
    rows = []
    for batch in args.batches:
        q, k, v = (torch.randn(batch, heads, tokens, dim, device=device, dtype=dtype) for _ in range(3))
        flop = 4 * batch * heads * tokens * tokens * dim
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        for name, backend in backends.items():
            try:
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, k, v)
                    t = timed(partial(F.scaled_dot_product_attention, q, k, v), device, args.repeats)
            except RuntimeError as err:  # the backend does not take these inputs on this device
                rows.append((batch, name, "-", "-", str(err).splitlines()[0][:60]))
                continue
            error = ((out.float() - ref).norm() / ref.norm()).item()
            rows.append((batch, name, f"{t:.4f}", f"{flop / t / 1e9:.1f}", f"{error:.1e}"))
    return rows


def decode_rows(args, device: torch.device) -> list[tuple]:
    from unidiffuser.components.autoencoder import TINY as TINY_AUTOENCODER
    from unidiffuser.components.autoencoder import AutoencoderConfig

    config = TINY_AUTOENCODER if args.small else AutoencoderConfig(block_out_channels=(128, 256, 512, 512))
    side = 8 if args.small else 64
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = ImageAutoencoder.random(config, seed=0).to(device, dtype)
    z = torch.randn(1, 4, side, side, device=device)
    rows = []
    ref = None
    for name, channels_last, compiled in (("NCHW eager", False, False), ("channels-last eager", True, False),
                                          ("channels-last compiled", True, True)):  # fmt: skip
        vae.to_channels_last(channels_last).compile_decoder(compiled, backend=args.backend)
        start = time.perf_counter()
        out = vae.decode(z).float()
        first = time.perf_counter() - start
        ref = out if ref is None else ref
        t = timed(partial(vae.decode, z), device, args.repeats)
        error = ((out - ref).norm() / ref.norm()).item()
        rows.append((name, f"{t:.3f}", f"{first:.1f}", f"{error:.1e}"))
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = device_option(args.device, Path(__file__).name)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name} | torch {torch.__version__} | median of {args.repeats}", flush=True)
    if "linear" in args.sections:
        print("\nLinear layers (ms per call; TFLOP/s; bf16 ms / this ms)\n")
        header = ("batch", "layer", "MxKxN", "path", "ms", "TFLOP/s", "vs bf16")
        print(table(header, linear_rows(args, device)), flush=True)
    if "attention" in args.sections:
        print("\nAttention per SDPA backend (ms per call; relative error against fp32 math)\n")
        print(table(("batch", "backend", "ms", "TFLOP/s", "error"), attention_rows(args, device)), flush=True)
    if "decode" in args.sections:
        print("\nImage decoder, batch 1 (ms per call; first call s; relative error against NCHW eager)\n")
        print(table(("path", "ms", "first s", "error"), decode_rows(args, device)), flush=True)


if __name__ == "__main__":
    main()
