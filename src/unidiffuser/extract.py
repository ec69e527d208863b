"""`unidiffuser extract`: raw image-caption pairs -> the feature shards `unidiffuser train` reads.

Each usable pair (``training.sources``: an image folder or webdataset tar shards) goes through
the frozen encoders of a model directory once:

    picture --resize shortest side, center crop--> (3, R, R) --VAE encoder--> moments (8, R/8, R/8)
                                          the same crop --CLIP image--> embedding (512)
    caption --CLIP text--> (77, 768) --caption decoder encode--> text latent (77, 64)   "reduced"
                                    or the (77, 768) features themselves                  "full"

The VAE posterior is stored as its moments (mean and log-variance), not a sample: training
draws a fresh latent every time it uses an example. The shards are written with
``training.data.write_feature_shard`` (img as moments, data_type as a constant), so
``unidiffuser train --data OUT`` reads them; their metadata also keeps each row's key and caption.

Resuming. The data is cut into parts (``sources``: a tar shard, or --shard-size entries of a
folder); part i becomes ``part{i:06d}-{j:04d}.safetensors``, j = 0, 1, ... (one file per part for a
folder, as many as --shard-size needs for a tar). After every shard the process records in its
``manifest.rank{r}.json`` (atomically) how far the part has been read; a rerun skips finished
parts, continues unfinished ones after their last written shard, and refuses to mix settings. A
shard is written to a temporary name and renamed, so no partial file ever has a final name.

Several processes (torchrun, accelerate launch): RANK and WORLD_SIZE come from the environment;
process r takes parts r, r + W, ... Shard names come from the part, so processes never write the
same file and a rerun with another number of processes still resumes correctly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli import HelpFormatter

if TYPE_CHECKING:  # heavy imports stay inside the functions: `unidiffuser --help` stays fast
    import torch

    from .loading import Components
    from .network import UViTConfig
    from .pipeline import UniDiffuser
    from .training.sources import Example, Part, Record

MANIFEST_FORMAT = "unidiffuser.extract"
MANIFEST_VERSION = 1
TEXT_FEATURES = ("reduced", "full")
DTYPES = ("fp32", "bf16")
SAVE_DTYPES = ("fp16", "fp32")
DESCRIPTION = """\
Encode raw image-caption pairs once with a model's frozen encoders (VAE posterior moments, CLIP
image embedding, text latent) into the feature shards `unidiffuser train --data OUT` reads.
Bad items are skipped and counted. Reruns resume where they stopped. Several processes:
  torchrun --nproc_per_node N -m unidiffuser.cli extract ...     (each takes every N-th part)
"""
PIXEL_MULTIPLE = 16  # the autoencoder downsamples 8x and the network's patches are 2 latents wide


@dataclass(frozen=True)
class ExtractConfig:
    """One extraction. See ``register`` (``unidiffuser extract --help``) for each option."""

    model: str
    data: str | tuple[str, ...]
    out: str
    resolution: int = 512
    batch_size: int = 16
    shard_size: int = 1000
    data_type: int = 1
    text_features: str = "reduced"
    device: str = "auto"
    dtype: str = "fp32"
    save_dtype: str = "fp16"
    workers: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.data, list):
            object.__setattr__(self, "data", tuple(self.data))
        if self.resolution < PIXEL_MULTIPLE or self.resolution % PIXEL_MULTIPLE:
            raise ValueError(
                f"resolution={self.resolution}: expected a positive multiple of {PIXEL_MULTIPLE} pixels "
                "(the autoencoder downsamples 8x and the network's patches are 2 latents wide)"
            )
        for key in ("batch_size", "shard_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)}: expected an integer >= 1")
        if self.workers < 0:
            raise ValueError(f"workers={self.workers}: expected an integer >= 0 (0 decodes inline)")
        if self.data_type < 0:
            raise ValueError(f"data_type={self.data_type}: expected an integer >= 0")
        for key, choices in (
            ("text_features", TEXT_FEATURES),
            ("dtype", DTYPES),
            ("save_dtype", SAVE_DTYPES),
        ):
            if getattr(self, key) not in choices:
                raise ValueError(f"{key}={getattr(self, key)!r}: expected one of {choices}")

    def settings(self) -> dict[str, Any]:
        """What fixes the content of the shards; a resumed extraction must have the same."""
        return {
            "model": str(Path(self.model).resolve()),
            "resolution": self.resolution,
            "shard_size": self.shard_size,
            "data_type": self.data_type,
            "text_features": self.text_features,
            "dtype": self.dtype,
            "save_dtype": self.save_dtype,
        }


@dataclass
class ExtractResult:
    """What one process did: shards written, examples in them, items skipped by reason."""

    rank: int
    world_size: int
    parts: int  # parts of this process
    parts_done_before: int  # of which were finished by an earlier run
    examples: int = 0
    shards: list[Path] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)


# ---------------------------------------------------------------------------------------------
# Helpers


def process_index() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the environment torchrun and accelerate set."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def _write_json(path: Path, value: Any) -> None:
    """Write JSON atomically: a temporary file in the same folder, then a rename."""
    import tempfile

    from .training.checkpoint import set_default_permissions

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f, indent=1)
            f.write("\n")
        set_default_permissions(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _in_order(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """map(fn, items) on a pool of threads, results in order, a bounded number in flight."""
    if workers <= 0:
        yield from map(fn, items)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _prepare(record: Record, resolution: int) -> tuple[Example | None, torch.Tensor | None, str | None]:
    """Decode and crop one record as the pipeline does: (example with the crop, pixels, None) or a
    skip reason (None, None, reason). Runs on the decoding threads."""
    from .components.images import resize_and_crop, to_tensor
    from .training.sources import SkipItem, decode

    try:
        example = decode(record)
    except SkipItem as e:
        return None, None, e.reason
    crop = resize_and_crop(example.image, (resolution, resolution))
    pixels = to_tensor([crop], (resolution, resolution))  # (1, 3, R, R) in [-1, 1]
    return example._replace(image=crop), pixels, None


class Manifest:
    """Progress of every part: the union of all processes' manifests; this process writes its own.

    One entry per part: {"source", "fingerprint", "through" (records read), "shards" (files and
    counts), "skipped" (by reason), "done"}. Where two processes' files hold the same part (a rerun
    with another number of processes), the entry that got further wins.
    """

    def __init__(self, out: Path, rank: int, settings: dict[str, Any]):
        self.path = out / f"manifest.rank{rank}.json"
        self.settings = settings
        self.entries: dict[int, dict[str, Any]] = {}
        self.mine: dict[str, dict[str, Any]] = {}
        for path in sorted(out.glob("manifest.rank*.json")):
            try:
                saved = json.loads(path.read_text())
                if saved.get("format") != MANIFEST_FORMAT or saved.get("version") != MANIFEST_VERSION:
                    raise ValueError(f"format {saved.get('format')!r} {saved.get('version')!r} is not ours")
            except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
                raise ValueError(f"out: cannot read {path} ({e}); remove it to start that work again") from e
            differ = {
                k: (saved["settings"].get(k), v) for k, v in settings.items() if saved["settings"].get(k) != v
            }
            if differ:
                detail = ", ".join(f"{k} {old!r} now {new!r}" for k, (old, new) in differ.items())
                raise ValueError(
                    f"out: {path.parent} was extracted with other settings ({detail}); rerun with the "
                    "same options to resume, or choose a new --out"
                )
            if path == self.path:
                self.mine = saved["parts"]
            for key, entry in saved["parts"].items():
                index, best = int(key), self.entries.get(int(key))
                if best is None or (entry["done"], entry["through"]) > (best["done"], best["through"]):
                    self.entries[index] = entry

    def check(self, part: Part) -> None:
        entry = self.entries.get(part.index)
        if entry is not None and entry["fingerprint"] != part.fingerprint:
            raise ValueError(
                f"out: part {part.index} was read from {entry['source']} ({entry['fingerprint']}), now "
                f"{part.source} ({part.fingerprint}): the data changed; choose a new --out"
            )

    def start(self, part: Part) -> dict[str, Any]:
        entry = self.entries.get(part.index)
        if entry is None:
            entry = {"source": part.source, "fingerprint": part.fingerprint, "through": 0,
                     "shards": [], "skipped": {}, "done": False}  # fmt: skip
        return json.loads(json.dumps(entry))  # a copy, changed only through save()

    def save(self, part: Part, entry: dict[str, Any]) -> None:
        self.entries[part.index] = self.mine[str(part.index)] = entry
        _write_json(
            self.path,
            {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "settings": self.settings,
             "parts": dict(sorted(self.mine.items(), key=lambda kv: int(kv[0])))},
        )  # fmt: skip


class FeatureEncoder:
    """The frozen encoders of a model, as extraction uses them (no sampling anywhere).

    ``pipe`` is a ``UniDiffuser`` or the ``loading.Components`` of a model directory.
    """

    def __init__(self, pipe: UniDiffuser | Components, text_features: str, save_dtype: torch.dtype):
        self.pipe = pipe
        self.text_features = text_features
        self.save_dtype = save_dtype

    def __call__(self, examples: list[Example], pixels: torch.Tensor) -> tuple[dict[str, torch.Tensor], Any]:
        """(B examples, (B, 3, R, R) pixels) -> (features on the CPU, (B,) bool: all finite)."""
        import torch

        pipe = self.pipe
        with torch.inference_mode():
            moments = pipe.autoencoder.moments(pixels.to(pipe.device))  # (B, 8, R/8, R/8), unscaled
            clip_img = pipe.image_encoder([e.image for e in examples])  # (B, 512)
            text = pipe.text_encoder([e.caption for e in examples])  # (B, 77, 768)
            if self.text_features == "reduced":
                text = pipe.caption_decoder.encode(text)  # (B, 77, 64)
        out = {"img": moments, "clip_img": clip_img, "text": text}
        out = {k: v.to(device="cpu", dtype=self.save_dtype) for k, v in out.items()}
        finite = torch.stack([v.flatten(1).isfinite().all(1) for v in out.values()]).all(0)  # (B,)
        return out, finite


# ---------------------------------------------------------------------------------------------
# The extraction


def extract(
    config: ExtractConfig,
    *,
    pipeline: UniDiffuser | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> ExtractResult:
    """Encode this process's share of the data into feature shards under ``config.out``.

    Args:
        config: the options.
        pipeline: ``config.model`` already loaded (by default only the components extraction
            uses are loaded here, not the network's weights); its device and dtype are used as
            they are.
        rank, world_size: this process's place; by default from RANK and WORLD_SIZE.
        progress: show a progress bar (on rank 0).
        log: where notes go (default: standard error).

    Returns:
        What this process wrote and skipped in this run.
    """
    import torch
    from tqdm import tqdm

    from .devices import resolve_device
    from .training.sources import describe_skips, my_parts, open_data

    env_rank, env_world, local_rank = process_index()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    log = log or (lambda text: print(text, file=sys.stderr))
    source = open_data(config.data)
    parts = source.parts(config.shard_size)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out = {config.out!r} is a file; give a directory")
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out, rank, config.settings())
    mine = my_parts(parts, rank, world_size)
    for part in mine:
        manifest.check(part)
    todo = [p for p in mine if not manifest.entries.get(p.index, {}).get("done")]
    result = ExtractResult(rank, world_size, len(mine), len(mine) - len(todo))
    tag = f"rank {rank}/{world_size}: " if world_size > 1 else ""
    if source.missing:
        log(f"{tag}{len(source.missing)} listed shard(s) do not exist, e.g. {source.missing[0]}")
    if not todo:
        log(f"{tag}all {len(mine)} parts already extracted in {out}; nothing to do")
        return result

    if pipeline is None:
        from .loading import load_components

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[config.dtype]
        device = resolve_device(config.device, local_rank)
        names = ["autoencoder", "image_encoder", "text_encoder"]
        names += ["caption_decoder"] if config.text_features == "reduced" else []
        encoders = load_components(config.model, names, device=device, dtype=dtype)
        architecture = encoders.network_config
    else:
        encoders, architecture = pipeline, pipeline.network.config
    _check_model(architecture, encoders.autoencoder.config.downsample, config, log if rank == 0 else None)
    save_dtype = {"fp16": torch.float16, "fp32": torch.float32}[config.save_dtype]
    encode = FeatureEncoder(encoders, config.text_features, save_dtype)
    meta = {
        "moments": {"img": float(encoders.autoencoder.scale_factor)},
        "constants": {"data_type": config.data_type},
        "text_features": config.text_features,
        "resolution": config.resolution,
        "model": config.model,
    }
    log(
        f"{tag}{len(todo)} of {len(mine)} parts to extract ({result.parts_done_before} done before) "
        f"from {source!r} on {encoders.device}"
    )

    total = sum(p.size for p in todo) if all(p.size is not None for p in todo) else None
    if total is not None:
        total -= sum(manifest.entries.get(p.index, {}).get("through", 0) for p in todo)
    bar = tqdm(total=total, desc="extract", unit="item", disable=not progress or rank != 0, file=sys.stderr)
    writer = _PartWriter(config, manifest, encode, meta, result, bar, log)
    try:
        for part in todo:
            writer(part)
    finally:
        bar.close()
    log(
        f"{tag}{result.examples} examples in {len(result.shards)} new shards under {out}; "
        f"{describe_skips(result.skipped)}"
    )
    if not any(out.glob("*.safetensors")):
        log(f"{tag}warning: no shard in {out}: every item was skipped")
    return result


def _check_model(
    architecture: UViTConfig, downsample: int, config: ExtractConfig, log: Callable[[str], None] | None
) -> None:
    """The settings against the model's network (and its autoencoder's pixels per latent):
    pixel multiple, data_type label, trained size."""
    img = architecture.modality("img")
    step = img.patch_size * downsample
    if config.resolution % step:
        raise ValueError(f"resolution={config.resolution}: this model needs a multiple of {step} pixels")
    label = next((m for m in architecture.labels if m.name == "data_type"), None)
    if label is not None and config.data_type >= label.num_classes:
        raise ValueError(
            f"data_type={config.data_type}: the model's data_type label takes 0 .. {label.num_classes - 1}"
        )
    trained = (img.shape[1] * downsample, img.shape[2] * downsample)
    if log is not None and (config.resolution,) * 2 != trained:
        side = config.resolution // downsample
        log(
            f"note: resolution {config.resolution} gives {side}x{side} latents; this model's network "
            f"was built for {trained[0]}x{trained[1]} pixels: train a network of that size"
        )


class _PartWriter:
    """Reads one part from where it stopped and writes its shards, recording each in the manifest.

    A batch never crosses a shard boundary, so when a shard is written every record read so far is
    either in a shard or counted as skipped: the manifest's "through" is exact.
    """

    def __init__(self, config, manifest, encode, meta, result, bar, log):
        self.config, self.manifest, self.encode, self.meta = config, manifest, encode, meta
        self.result, self.bar, self.log = result, bar, log

    def __call__(self, part: Part) -> None:
        import itertools

        entry = self.manifest.start(part)
        self.part, self.entry, self.skipped = part, entry, Counter(entry["skipped"])
        self.batch: list[tuple[Example, torch.Tensor]] = []
        self.rows: list[dict[str, torch.Tensor]] = []  # encoded batches of the shard being filled
        self.keys: list[str] = []
        self.captions: list[str] = []
        records = itertools.islice(part.read(), entry["through"], None)  # records done: not decoded
        resolution, size = self.config.resolution, self.config.shard_size
        for example, pixels, reason in _in_order(
            lambda r: _prepare(r, resolution), records, self.config.workers
        ):
            entry["through"] += 1
            self.bar.update(1)
            if reason is not None:
                self._skip(reason)
                continue
            self.batch.append((example, pixels))
            if len(self.batch) >= min(self.config.batch_size, size - len(self.keys)):
                self._encode()
                if len(self.keys) >= size:
                    self._flush(done=False)
        if self.batch:
            self._encode()
        self._flush(done=True)

    def _skip(self, reason: str) -> None:
        self.skipped[reason] += 1
        self.result.skipped[reason] += 1

    def _encode(self) -> None:
        import torch

        examples = [e for e, _ in self.batch]
        features, finite = self.encode(examples, torch.cat([p for _, p in self.batch]))
        for i in (~finite).nonzero().flatten().tolist():
            self._skip("non_finite")
            self.log(f"skipping {examples[i].key}: non-finite features")
        keep = finite.nonzero().flatten()
        self.rows.append({k: v[keep] for k, v in features.items()})
        self.keys.extend(examples[i].key for i in keep.tolist())
        self.captions.extend(examples[i].caption for i in keep.tolist())
        self.batch.clear()

    def _flush(self, done: bool) -> None:
        import torch

        from .training.data import write_feature_shard
        from .training.sources import describe_skips

        part, entry = self.part, self.entry
        if self.keys:
            name = f"part{part.index:06d}-{len(entry['shards']):04d}.safetensors"
            tensors = {k: torch.cat([r[k] for r in self.rows]) for k in self.rows[0]}
            meta = {**self.meta, "source": part.source, "keys": self.keys, "captions": self.captions}
            self.result.shards.append(write_feature_shard(Path(self.config.out) / name, tensors, meta))
            self.result.examples += len(self.keys)
            entry["shards"].append({"file": name, "count": len(self.keys)})
            self.rows, self.keys, self.captions = [], [], []
        entry["skipped"], entry["done"] = dict(sorted(self.skipped.items())), done
        self.manifest.save(part, entry)
        shards = len(self.result.shards)
        self.bar.set_postfix_str(f"{describe_skips(self.result.skipped)}, {shards} shards", refresh=False)


# ---------------------------------------------------------------------------------------------
# Command line


def _resolution(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < PIXEL_MULTIPLE or value % PIXEL_MULTIPLE:
        raise argparse.ArgumentTypeError(
            f"{value} is not a positive multiple of {PIXEL_MULTIPLE} pixels (the autoencoder downsamples "
            "8x and the network's patches are 2 latents wide); try 256 or 512"
        )
    return value


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


class _Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown as every command shows them, the description kept as written."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``extract`` subcommand."""
    add_arguments(
        subparsers.add_parser(
            "extract",
            help="encode image-caption data once into feature shards for `unidiffuser train`",
            description=DESCRIPTION,
            formatter_class=_Formatter,
        )
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``extract``."""
    p.add_argument("--model", required=True, help="model directory whose frozen encoders to run (any layout)")
    p.add_argument(
        "--data",
        required=True,
        help="an image folder with same-named .txt captions, or webdataset tar shards: paths, globs "
        "or brace lists such as 'data/{00000..00009}.tar' (quote them), or a folder of .tar files",
    )
    p.add_argument("--out", required=True, help="output folder of feature shards (reruns resume in it)")
    p.add_argument(
        "--resolution", type=_resolution, default=512, help="pixels: shortest side resized, center crop"
    )
    p.add_argument("--batch-size", type=_int_at_least(1), default=16, help="examples per encoder call")
    p.add_argument("--shard-size", type=_int_at_least(1), default=1000, help="examples per shard (at most)")
    p.add_argument(
        "--data-type",
        type=_int_at_least(0),
        default=1,
        help="v1's data_type label of all of it: 1 curated, 0 web",
    )
    p.add_argument(
        "--text-features",
        choices=TEXT_FEATURES,
        default="reduced",
        help="reduced: the caption decoder's text latent (77, 64); full: CLIP's (77, 768) features, "
        "for when the caption decoder is not trained yet",
    )
    p.add_argument("--device", default="auto", help="auto (this process's GPU if any), cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype of the encoders' weights")
    p.add_argument("--save-dtype", choices=SAVE_DTYPES, default="fp16", help="dtype of the stored features")
    p.add_argument("--workers", type=_int_at_least(0), default=4, help="threads decoding pictures (0: none)")
    p.set_defaults(func=cmd_extract)


def cmd_extract(args: argparse.Namespace) -> int:
    """Run ``extract`` with the command's options; errors in the options exit with status 2."""
    fields = ExtractConfig.__dataclass_fields__
    try:
        config = ExtractConfig(**{k: v for k, v in vars(args).items() if k in fields})
        if not Path(config.model).is_dir():
            raise ValueError(f"model = {config.model!r}: no such directory")
        result = extract(config)
    except (ValueError, FileNotFoundError) as e:
        print(f"unidiffuser extract: error: {e}", file=sys.stderr)
        return 2
    if result.world_size == 1 and not any(Path(config.out).glob("*.safetensors")):
        from .training.sources import describe_skips

        print(
            f"unidiffuser extract: error: every item was skipped ({describe_skips(result.skipped)}), so "
            f"{config.out} holds no shard; give a folder of images with same-named .txt captions, or "
            "webdataset .tar shards",
            file=sys.stderr,
        )
        return 1
    summary = dict(
        rank=result.rank, world_size=result.world_size, parts=result.parts,
        parts_done_before=result.parts_done_before, examples=result.examples, shards=len(result.shards),
        skipped=dict(result.skipped),
    )  # fmt: skip
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m unidiffuser.extract --model ... --data ... --out ...`` (the same as the subcommand)."""
    parser = argparse.ArgumentParser(
        prog="unidiffuser extract", description=DESCRIPTION, formatter_class=_Formatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
