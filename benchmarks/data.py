"""Time how a training process gets its batches of features, and print a table.

Each row is one way the trainer's ``DataStream`` can serve a batch, on the same feature shards:

* files, 0 workers: every example read from its shard in the training process;
* files, N workers: worker processes read chunks ahead (``train --num-workers N``);
* in memory: every shard read once at the start, each batch one indexing (``--data-in-memory``).

The stream's latent draw from the VAE posterior moments is part of each row; it happens on the
``--device`` (the trainer draws on its training device), whose time is waited for. The time is
the training process's, per batch, after a warm-up: with workers it is what they could not hide.

Without ``--data`` the script writes shards the size of the shipped shapes model's features
(60,000 examples: 16 x 16 x 4 latent moments, one 64-d CLIP embedding, a 24 x 16 text latent; 0.6
GB) into a temporary folder. ``--data DIR`` times a folder made by ``unidiffuser extract`` instead
(``--model`` then names the network it feeds; the shipped shapes model by default).

    python benchmarks/data.py
    python benchmarks/data.py --batch-sizes 256 1024 --workers 2 4 --device cuda
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    from unidiffuser.devices import device_option
except ImportError:  # run from a checkout without installing: use the src/ beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from unidiffuser.devices import device_option

from unidiffuser.network import UViTConfig
from unidiffuser.training.data import DataStream, FeatureArrays, FeatureShards, write_feature_shard

SHARD_SIZE = 1000  # examples per shard, as `unidiffuser extract` writes them
COLUMNS = ("source", "batch", "ms / batch", "examples / s", "vs files, 0 workers")


def write_shards(root: Path, config: UViTConfig, examples: int, seed: int = 0) -> None:
    """Random features of ``config``'s modalities, stored as extract stores them (float32, the image
    as posterior moments)."""
    g = torch.Generator().manual_seed(seed)
    for k, start in enumerate(range(0, examples, SHARD_SIZE)):
        n = min(SHARD_SIZE, examples - start)
        tensors = {}
        for m in config.diffused:
            shape = (2 * m.shape[0], *m.shape[1:]) if m.kind == "image" else m.shape
            tensors[m.name] = torch.randn(n, *shape, generator=g)
        constants = {m.name: 0 for m in config.labels}
        moments = {m.name: 0.18215 for m in config.diffused if m.kind == "image"}
        write_feature_shard(
            root / f"part{k:06d}.safetensors", tensors, {"moments": moments, "constants": constants}
        )


def time_stream(stream: DataStream, device: torch.device, batches: int, warmup: int) -> float:
    """Median seconds per batch."""
    times = []
    for i in range(warmup + batches):
        began = time.perf_counter()
        batch = stream.next_batch()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - began)
    del batch
    stream.close()
    return statistics.median(times)


def format_row(cells) -> str:
    widths = (20, 6, 11, 13, 20)
    return " | ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, help="a folder of feature shards (default: random ones written here)"
    )
    parser.add_argument(
        "--model", help="model directory whose network the data feeds (default: the shipped one)"
    )
    parser.add_argument("--examples", type=int, default=60_000, help="random examples written without --data")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024], help="default: 256 1024")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[2], help="worker counts to time (default: 2)"
    )
    parser.add_argument("--batches", type=int, default=20, help="timed batches per row (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches per row (default: 3)")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where latents are drawn"
    )
    args = parser.parse_args(argv)
    if (
        min(args.batch_sizes) < 1
        or min(args.workers) < 1
        or args.batches < 1
        or args.warmup < 0
        or args.examples < 1
    ):
        parser.error("--batch-sizes, --workers, --batches and --examples must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    from unidiffuser.pipeline import UniDiffuser
    from unidiffuser.shipped import shipped_model_dir

    args = parse_args(argv)
    device = device_option(args.device, Path(__file__).name)
    try:
        config = UniDiffuser.from_pretrained(args.model or shipped_model_dir()).network.config
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"--model {args.model}: {err}") from None
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if root is None:
            root = Path(tmp)
            began = time.perf_counter()
            write_shards(root, config, args.examples)
            print(
                f"wrote {args.examples:,} random examples in {time.perf_counter() - began:.1f} s", flush=True
            )
        try:
            files = FeatureShards(root, config)
        except ValueError as err:
            raise SystemExit(f"--data {root}: {err}") from None
        began = time.perf_counter()
        memory = FeatureArrays(files)
        loaded = time.perf_counter() - began
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
        print(
            f"{len(files):,} examples | latents drawn on {device} ({where}) | torch {torch.__version__} | "
            f"{torch.get_num_threads()} threads | in memory: {memory.nbytes / 2**20:,.0f} MiB read in "
            f"{loaded:.1f} s | median of {args.batches} batches after {args.warmup}"
        )
        line = format_row(COLUMNS)
        print(line + "\n" + "-" * len(line), flush=True)
        for batch in args.batch_sizes:
            rows = [("files, 0 workers", files, 0)]
            rows += [(f"files, {n} workers", files, n) for n in args.workers]
            rows.append(("in memory", memory, 0))
            base = None
            for name, source, workers in rows:
                stream = DataStream(source, batch, seed=0, num_workers=workers, latent_device=device)
                seconds = time_stream(stream, device, args.batches, args.warmup)
                base = base or seconds
                cells = (
                    name,
                    batch,
                    f"{seconds * 1e3:.2f}",
                    f"{batch / seconds:,.0f}",
                    f"{base / seconds:.1f}x",
                )
                print(format_row(cells), flush=True)


if __name__ == "__main__":
    main()
