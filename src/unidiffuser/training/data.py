"""Training data: map-style example sources and each process's resumable stream of batches.

A source maps an index to one example, a dict of tensors without a batch axis, named like the
network's modalities (labels as 0-d long tensors, the rest float32). Two sources:

* ``ToyExamples``: the toy world (``unidiffuser.toy``), unbounded; example i is fixed by the seed.
* ``FeatureShards``: a directory of ``*.safetensors`` shards written by ``write_feature_shard``.

Feature shards. Each shard holds one tensor per modality with a leading example axis and, in its
safetensors header under the key "unidiffuser", JSON metadata::

    {"format": "unidiffuser.features", "version": 1, "count": 512,
     "tensors": {"img": {"shape": [8, 64, 64], "dtype": "float16"}, "clip_img": ..., "text": ...},
     "moments": {"img": 0.18215},      # stored as VAE posterior moments, sampled on the fly
     "constants": {"data_type": 1}}    # a label fixed for the whole shard (or a per-example tensor)

An image stored as moments is (2C, h, w): the posterior's mean and log-variance. Every time an
example is used a fresh latent (mean + exp(logvar / 2) * noise) * scale_factor is drawn, as the
paper does, from a generator seeded by the run seed and the stream position.

Order and sharding. Positions 0, 1, 2, ... form one global sequence fixed by the seed: in epoch e
the shards come in a seeded random order and the rows of each shard in a seeded random order (so
one or two shards are read at a time, not random rows of all of them). Process r of W takes
positions r, r + W, r + 2W, ...: the processes see disjoint examples. A stream's position is one
integer, its cursor, saved with every checkpoint; a resumed stream continues with the same order.

Background reading. With ``num_workers`` > 0 worker processes (a torch DataLoader) read the coming
positions ahead, one chunk of a batch's length each, and the stream takes their results in
position order: the batches, the cursor and the skip counts are exactly those of reading in the
training process, so a resumed run still equals one without interruption.

In memory. ``FeatureArrays`` reads every shard of a directory once into one tensor per modality
(kept in its stored dtype) and hands a stream a whole batch as one indexing of those tensors: the
same order, latents, skips and cursor as reading example by example, without per-example reads or
worker processes (``train --data-in-memory``, for a dataset that fits in RAM).

Bad data is skipped and counted, never fatal and never silent: shards that cannot be opened or do
not match the model are left out when the source is opened (``FeatureShards.bad_shards``), and
examples that cannot be read or hold NaN or infinite values are skipped by the stream
(``DataStream.skipped``); the trainer logs both.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import itertools
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..network import UViTConfig
from .checkpoint import set_default_permissions

VAE_SCALE_FACTOR = 0.18215  # Stable Diffusion's KL-f8 latent scale
SHARD_FORMAT = "unidiffuser.features"
SHARD_VERSION = 1
METADATA_KEY = "unidiffuser"
TOY_CHUNK = 1024  # toy examples are drawn in seeded chunks of this size


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed for one purpose at one place (run seed, purpose, step, rank, ...).

    Randomness derived this way needs no saved generator state: a resumed run recomputes it.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_latent(
    moments: Tensor, generator: torch.Generator | None = None, scale_factor: float = VAE_SCALE_FACTOR
) -> Tensor:
    """Draw latents from VAE posterior moments (B, 2C, h, w) = [mean, logvar] along the channels.

    Returns (mean + exp(logvar / 2) * noise) * scale_factor, (B, C, h, w) float32. The log-variance
    is clamped to [-30, 20] like the KL autoencoder's own posterior. This is deliberately a small
    copy of what the autoencoder component does, so that training needs no autoencoder.
    """
    if moments.ndim != 4 or moments.shape[1] % 2:
        raise ValueError(f"moments: expected (B, 2C, h, w), got {tuple(moments.shape)}")
    mean, logvar = moments.float().chunk(2, dim=1)  # each (B, C, h, w)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    draw_on = generator.device if generator is not None else moments.device
    noise = torch.randn(mean.shape, generator=generator, device=draw_on).to(mean.device)
    return (mean + std * noise) * scale_factor


class UnusableData(ValueError):
    """So many examples in a row could not be used that the data as a whole cannot be."""


class SkipExample(Exception):
    """An example that cannot be used; ``reason`` names the counter it is added to."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ExampleSource(Protocol):
    """What a ``DataStream`` needs of a source."""

    size: int | None  # number of examples; None when unbounded
    moments: Mapping[str, float]  # modalities stored as posterior moments -> their scale factor
    bad_shards: list[tuple[str, str]]  # (path, reason) of parts left out when opening

    def __getitem__(self, index: int) -> dict[str, Tensor]: ...

    def index(self, position: int, seed: int) -> int:
        """The example at one position of the seeded global order."""
        ...


# ---------------------------------------------------------------------------------------------
# Writing and reading feature shards


def write_feature_shard(
    path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write one feature shard atomically (a temporary file in the same folder, then a rename).

    Args:
        path: the shard file; its name should end in ".safetensors" to be found by the loader.
        tensors: one tensor per modality, all with the same leading example axis. Labels are
            integer tensors of shape (count,).
        metadata: optional "moments" (a list of names stored as VAE posterior moments (count,
            2C, h, w), or a dict name -> scale factor, default 0.18215), "constants" (labels fixed
            for the whole shard, e.g. {"data_type": 1}), and any further JSON-serialisable keys,
            kept as they are (e.g. the source of the features).

    Returns:
        The path written.
    """
    path = Path(path)
    meta = dict(metadata or {})
    if not tensors:
        raise ValueError("tensors: a shard needs at least one tensor")
    counts = {name: t.shape[0] if isinstance(t, Tensor) and t.ndim else None for name, t in tensors.items()}
    if None in counts.values() or len(set(counts.values())) != 1 or min(counts.values()) < 1:
        raise ValueError(
            f"tensors: every value must be a tensor with the same leading example axis >= 1, got {counts}"
        )
    moments = meta.pop("moments", {}) or {}
    if not isinstance(moments, Mapping):
        moments = dict.fromkeys(moments, VAE_SCALE_FACTOR)
    for name in moments:
        t = tensors.get(name)
        if t is None or t.ndim != 4 or t.shape[1] % 2:
            got = tuple(t.shape) if t is not None else "no tensor"
            raise ValueError(f"moments: {name!r} must be a tensor (count, 2C, h, w), got {got}")
    constants = dict(meta.pop("constants", {}) or {})
    clash = sorted(set(constants) & set(tensors))
    if clash:
        raise ValueError(f"constants: {clash} are also stored as tensors; give each label one way")
    header = {
        "format": SHARD_FORMAT,
        "version": SHARD_VERSION,
        "count": next(iter(counts.values())),
        "tensors": {
            name: {"shape": list(t.shape[1:]), "dtype": str(t.dtype).removeprefix("torch.")}
            for name, t in tensors.items()
        },
        "moments": {name: float(scale) for name, scale in moments.items()},
        "constants": constants,
        **meta,
    }
    data = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(data, tmp, metadata={METADATA_KEY: json.dumps(header)})
        set_default_permissions(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_shard_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of one shard (raises on an unreadable or foreign file, or one whose
    tensors are not the ones its metadata lists)."""
    with safe_open(str(path), "pt") as f:
        header = (f.metadata() or {}).get(METADATA_KEY)
        stored = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    if header is None:
        raise ValueError(f"{path}: no {METADATA_KEY!r} metadata; not written by write_feature_shard")
    meta = json.loads(header)
    if meta.get("format") != SHARD_FORMAT or meta.get("version") != SHARD_VERSION:
        raise ValueError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r} is not ours")
    listed = {name: [meta["count"], *info["shape"]] for name, info in meta["tensors"].items()}
    if stored != listed:
        raise ValueError(f"{path}: holds tensors {stored}, its metadata lists {listed}")
    return meta


def check_shard(meta: Mapping[str, Any], config: UViTConfig) -> str | None:
    """Why a shard cannot feed this network, or None when it can."""
    tensors, moments, constants = meta["tensors"], meta.get("moments", {}), meta.get("constants", {})
    for m in config.modalities:
        if m.kind == "label":
            if m.name in constants:
                value = constants[m.name]
                if not isinstance(value, int) or not 0 <= value < m.num_classes:
                    return f"constant {m.name}={value!r} is not in [0, {m.num_classes - 1}]"
            elif m.name in tensors:
                info = tensors[m.name]
                if info["shape"] != [] or not info["dtype"].startswith(("int", "uint")):
                    return f"label {m.name!r} must be an integer tensor (count,), got {info}"
            else:
                return f"no values for label {m.name!r} (a per-example tensor or constants.{m.name})"
            continue
        if m.name not in tensors:
            return f"no tensor for modality {m.name!r}"
        want = list(m.shape)
        if m.name in moments:
            want = [2 * m.shape[0], *m.shape[1:]]
        if tensors[m.name]["shape"] != want:
            what = "moments" if m.name in moments else "values"
            return f"{m.name!r}: stored {what} of shape {tensors[m.name]['shape']}, the model needs {want}"
        if not tensors[m.name]["dtype"].startswith(("float", "bfloat")):
            return f"{m.name!r}: dtype {tensors[m.name]['dtype']} is not floating point"
    return None


class FeatureShards:
    """A directory of feature shards as one map-style source, for one network config."""

    def __init__(self, root: str | Path, config: UViTConfig, max_open: int = 4):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(
                f"data = {str(root)!r}: not a directory; give the folder of *.safetensors shards"
            )
        self.config = config
        self.names = tuple(m.name for m in config.modalities)
        self.labels = {m.name for m in config.labels}
        self.paths: list[Path] = []
        self.metas: list[dict[str, Any]] = []
        self.bad_shards: list[tuple[str, str]] = []
        for path in sorted(self.root.glob("*.safetensors")):
            try:
                meta = read_shard_metadata(path)
            except Exception as e:  # any unreadable file is left out and reported, never fatal
                self.bad_shards.append((str(path), f"unreadable: {e}"))
                continue
            reason = check_shard(meta, config)
            if reason is not None:
                self.bad_shards.append((str(path), reason))
                continue
            self.paths.append(path)
            self.metas.append(meta)
        if not self.paths:
            detail = (
                "; ".join(f"{Path(p).name}: {r}" for p, r in self.bad_shards[:5]) or "no *.safetensors files"
            )
            raise ValueError(f"data = {str(root)!r}: no usable feature shard ({detail})")
        scales: dict[str, float] = {}
        for meta in self.metas:
            for name, scale in meta.get("moments", {}).items():
                if scales.setdefault(name, scale) != scale:
                    raise ValueError(f"data = {str(root)!r}: shards disagree on the scale factor of {name!r}")
        stored_as = {frozenset(meta.get("moments", {})) for meta in self.metas}
        if len(stored_as) > 1:
            raise ValueError(
                f"data = {str(root)!r}: some shards store {sorted(scales)} as moments, others not"
            )
        self.moments = scales
        self.counts = [int(meta["count"]) for meta in self.metas]
        self.offsets = [0]
        for c in self.counts:
            self.offsets.append(self.offsets[-1] + c)
        self.size = self.offsets[-1]
        self._open: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._max_open = max_open
        self._epoch_cache: tuple[tuple[int, int], list[int], list[int]] | None = None
        self._rows_cache: collections.OrderedDict[tuple, Tensor] = collections.OrderedDict()

    def __len__(self) -> int:
        return self.size

    def __getstate__(self) -> dict[str, Any]:
        # open files stay with their process: a worker started by spawn opens its own
        return {**self.__dict__, "_open": collections.OrderedDict()}

    def _handle(self, shard: int):
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        handle = safe_open(str(self.paths[shard]), "pt")
        self._open[shard] = handle
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return handle

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        shard = bisect.bisect_right(self.offsets, index) - 1
        row = index - self.offsets[shard]
        meta = self.metas[shard]
        out = {}
        try:
            handle = self._handle(shard)
            for name in self.names:
                if name in meta.get("constants", {}):
                    out[name] = torch.tensor(meta["constants"][name], dtype=torch.long)
                    continue
                value = handle.get_slice(name)[row : row + 1][0]
                out[name] = value.long() if name in self.labels else value.float()
        except Exception as e:  # a file that went bad after opening: skip the example, count it
            self._open.pop(shard, None)
            raise SkipExample("unreadable", f"{self.paths[shard].name} row {row}: {e}") from e
        for name, value in out.items():
            if name not in self.labels and not torch.isfinite(value).all():
                raise SkipExample("non_finite", f"{self.paths[shard].name} row {row}: {name}")
        return out

    def shard_order(self, seed: int, epoch: int) -> list[int]:
        """The shards of one epoch, in their seeded order."""
        g = torch.Generator().manual_seed(derive_seed(seed, "shards", epoch))
        return torch.randperm(len(self.paths), generator=g).tolist()

    def row_order(self, seed: int, epoch: int, shard: int) -> Tensor:
        """The rows of one shard in one epoch, in their seeded order."""
        g = torch.Generator().manual_seed(derive_seed(seed, "rows", epoch, shard))
        return torch.randperm(self.counts[shard], generator=g)

    def index(self, position: int, seed: int) -> int:
        """Shards in a seeded order per epoch, rows in a seeded order per shard and epoch."""
        epoch, offset = divmod(position, self.size)
        key = (seed, epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != key:
            order = self.shard_order(seed, epoch)
            starts = [0]
            for s in order:
                starts.append(starts[-1] + self.counts[s])
            self._epoch_cache = (key, order, starts)
        _, order, starts = self._epoch_cache
        k = bisect.bisect_right(starts, offset) - 1
        shard = order[k]
        rows_key = (seed, epoch, shard)
        if rows_key not in self._rows_cache:
            self._rows_cache[rows_key] = self.row_order(seed, epoch, shard)
            if len(self._rows_cache) > 8:
                self._rows_cache.popitem(last=False)
        return self.offsets[shard] + int(self._rows_cache[rows_key][offset - starts[k]])


# Why an example of ``FeatureArrays`` is skipped: its code in ``FeatureArrays.bad`` (0: good).
BAD_REASONS = ("unreadable", "non_finite")
MEMORY_SHARE = 0.8  # the most of the machine's available memory a dataset may take in memory


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_budget() -> int | None:
    """Bytes a dataset may take in memory: ``MEMORY_SHARE`` of the available memory (None if unknown)."""
    available = available_memory()
    return None if available is None else int(MEMORY_SHARE * available)


def fits_in_memory(root: str | Path) -> bool:
    """Whether every feature shard of ``root`` would fit in ``memory_budget()`` (all their tensors,
    as stored); True where the available memory is unknown."""
    budget = memory_budget()
    if budget is None:
        return True
    need = 0
    for path in Path(root).glob("*.safetensors"):
        try:
            meta = read_shard_metadata(path)
        except Exception:  # left out when the source opens it
            continue
        need += _stored_bytes(meta, list(meta["tensors"]))
    return need <= budget


class FeatureArrays:
    """Every example of a ``FeatureShards`` directory in memory, for batches gathered at once.

    Positions map to examples exactly as in ``FeatureShards`` (the same seeded shard and row
    orders), and an example that reading would skip is skipped for the same reason: a shard whose
    file fails when read whole marks all its rows unreadable, a row with a NaN or infinite value is
    non-finite. So a run reads the same batches in memory as from the files, and resumes either way.

    Args:
        shards: the opened directory.
        memory: bytes it may take; None: ``memory_budget()``.

    Raises:
        ValueError: the examples would take more than that (saying how much, and what to do).
    """

    def __init__(self, shards: FeatureShards, memory: int | None = None):
        self.shards = shards
        self.size, self.moments, self.bad_shards = shards.size, shards.moments, shards.bad_shards
        self.names, self.labels = shards.names, shards.labels
        need = sum(_stored_bytes(meta, self.names) for meta in shards.metas)
        if memory is None:
            memory = memory_budget()
        if memory is not None and need > memory:
            raise ValueError(
                f"data = {str(shards.root)!r}: its {shards.size:,} examples take {need / 2**30:.1f} GiB "
                f"in memory, more than the {memory / 2**30:.1f} GiB this machine can spare; read them from "
                "the files instead (data_in_memory = false, with num_workers = 2-4 to read ahead)"
            )
        parts: dict[str, list[Tensor]] = {name: [] for name in self.names}
        bad: list[Tensor] = []
        for path, meta in zip(shards.paths, shards.metas, strict=True):
            values, codes = _read_shard(path, meta, self.names, self.labels)
            for name in self.names:
                parts[name].append(values[name])
            bad.append(codes)
        self.values = {name: torch.cat(parts[name]) for name in self.names}
        self.bad = torch.cat(bad)  # (size,) uint8: 0 good, else 1 + the index of its BAD_REASONS
        self.nbytes = sum(v.numel() * v.element_size() for v in self.values.values())
        self._orders: collections.OrderedDict[tuple[int, int], Tensor] = collections.OrderedDict()

    def __len__(self) -> int:
        return self.size

    def epoch_order(self, seed: int, epoch: int) -> Tensor:
        """The examples of one epoch in position order: ``FeatureShards.index`` for all of them."""
        key = (seed, epoch)
        if key not in self._orders:
            s = self.shards
            rows = [
                s.offsets[shard] + s.row_order(seed, epoch, shard) for shard in s.shard_order(seed, epoch)
            ]
            self._orders[key] = torch.cat(rows)
            if len(self._orders) > 2:  # a batch spans two epochs at most, unless the data is tiny
                self._orders.popitem(last=False)
        return self._orders[key]

    def indices(self, positions: Tensor, seed: int) -> Tensor:
        """The examples at these positions of the global order."""
        epochs, offsets = positions // self.size, positions % self.size
        out = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            at = epochs == epoch
            out[at] = self.epoch_order(seed, epoch)[offsets[at]]
        return out

    def index(self, position: int, seed: int) -> int:
        return int(self.indices(torch.tensor([position]), seed)[0])

    def gather(self, indices: Tensor) -> dict[str, Tensor]:
        """The examples at ``indices`` (good ones), stacked: labels long, the rest float32."""
        return {
            name: values[indices] if name in self.labels else values[indices].float()
            for name, values in self.values.items()
        }

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        code = int(self.bad[index])
        if code:
            raise SkipExample(BAD_REASONS[code - 1], f"example {index}")
        return {name: value[0] for name, value in self.gather(torch.tensor([index])).items()}


def _stored_bytes(meta: Mapping[str, Any], names: Sequence[str]) -> int:
    per_example = 8 * sum(1 for name in names if name in meta.get("constants", {}))
    for name in names:
        info = meta["tensors"].get(name)
        if info is not None:
            itemsize = torch.empty((), dtype=getattr(torch, info["dtype"])).element_size()
            per_example += itemsize * math.prod(info["shape"])
    return int(meta["count"]) * per_example


def _read_shard(
    path: Path, meta: Mapping[str, Any], names: Sequence[str], labels: set[str]
) -> tuple[dict[str, Tensor], Tensor]:
    """One shard's tensors (labels long, the rest as stored) and each row's ``FeatureArrays.bad``
    code; a shard that cannot be read gives zeros, every row unreadable."""
    count, constants = int(meta["count"]), meta.get("constants", {})
    try:
        values = {}
        with safe_open(str(path), "pt") as f:
            for name in names:
                if name in constants:
                    values[name] = torch.full((count,), int(constants[name]), dtype=torch.long)
                else:
                    value = f.get_tensor(name)
                    values[name] = value.long() if name in labels else value
    except Exception:  # as reading it example by example would: every row unreadable
        shapes = {name: meta["tensors"].get(name, {"shape": [], "dtype": "int64"}) for name in names}
        values = {
            name: torch.zeros((count, *info["shape"]), dtype=torch.long if name in labels else getattr(torch, info["dtype"]))
            for name, info in shapes.items()
        }  # fmt: skip
        return values, torch.full((count,), 1 + BAD_REASONS.index("unreadable"), dtype=torch.uint8)
    finite = torch.ones(count, dtype=torch.bool)
    for name in names:
        if name not in labels:
            finite &= torch.isfinite(values[name].float()).flatten(1).all(1)
    return values, torch.where(finite, 0, 1 + BAD_REASONS.index("non_finite")).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# The toy world


class ToyExamples:
    """The toy world as an unbounded map-style source: example i is fixed by (seed, i)."""

    def __init__(self, config: UViTConfig, seed: int):
        from ..toy import ToyWorld

        names = [m.name for m in config.modalities]
        self.world = ToyWorld(colour="colour" in names)
        reference = self.world.config()
        produced = {m.name: m for m in reference.modalities}
        for m in config.modalities:
            if m.name not in produced or produced[m.name].shape != m.shape or produced[m.name].kind != m.kind:
                raise ValueError(
                    f"data = 'toy': the model's modality {m.name!r} {m.kind} {m.shape} is not one the toy "
                    f"world yields ({', '.join(f'{p.name} {p.shape}' for p in reference.modalities)}); "
                    "use model = 'toy' or an inline config of those modalities"
                )
        self.names = tuple(names)
        self.seed = seed
        self.size = None
        self.moments: dict[str, float] = {}
        self.bad_shards: list[tuple[str, str]] = []
        self._chunk: tuple[int, dict[str, Tensor]] | None = None

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        chunk, row = divmod(index, TOY_CHUNK)
        if self._chunk is None or self._chunk[0] != chunk:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "toy", chunk))
            self._chunk = (chunk, self.world.sample(TOY_CHUNK, g))
        data = self._chunk[1]
        return {name: data[name][row] for name in self.names}

    def index(self, position: int, seed: int) -> int:
        return position  # the examples are already independent draws


def open_source(data: str, config: UViTConfig, seed: int, in_memory: bool = False) -> ExampleSource:
    """The source named by a TrainConfig's ``data``: "toy" or a feature-shard directory, read from
    the files or (``in_memory``) all at once into memory."""
    if data == "toy":
        return ToyExamples(config, seed)
    shards = FeatureShards(data, config)
    return FeatureArrays(shards) if in_memory else shards


# ---------------------------------------------------------------------------------------------
# One process's stream of batches


class DataStream:
    """Batches for one process: its share of the seeded global order, resumable by its cursor.

    Args:
        source: the examples.
        batch_size: examples per batch (this process's micro-batch).
        seed: the run seed; fixes the order and the latent noise.
        rank: this process's index.
        world_size: number of processes.
        max_misses: give up after this many bad examples in a row (a source of bad data only).
        num_workers: worker processes that read ahead; 0 reads in this process. The batches are
            the same either way.
        latent_device: where the latents are drawn from their posterior moments (the training
            device: a GPU draws them faster than the CPU). Each device draws its own noise from the
            same seeds, so a batch's latents differ between devices and repeat on one.
    """

    def __init__(
        self,
        source: ExampleSource,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        max_misses: int = 10_000,
        num_workers: int = 0,
        latent_device: torch.device | str = "cpu",
    ):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"batch_size={batch_size} must be >= 1 and rank={rank} in [0, {world_size})")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers}: must be >= 0 (0 reads in this process)")
        if num_workers and isinstance(source, FeatureArrays):
            raise ValueError(
                f"num_workers={num_workers}: the data is in memory, there is nothing to read ahead; use 0"
            )
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.max_misses = max_misses
        self.num_workers = num_workers
        self.latent_device = torch.device(latent_device)
        self._cursor = 0  # positions of this process's share consumed so far
        self._ahead: ReadAhead | None = None
        self.skipped: collections.Counter[str] = collections.Counter()

    @property
    def cursor(self) -> int:
        return self._cursor

    @cursor.setter
    def cursor(self, value: int) -> None:
        self.close()  # the workers read ahead from the old position
        self._cursor = int(value)

    def __iter__(self) -> DataStream:
        return self

    def __next__(self) -> dict[str, Tensor]:
        return self.next_batch()

    def next_batch(self) -> dict[str, Tensor]:
        """The next batch: labels (B,) long, others (B, ...) float32 on the CPU, moments already
        sampled (the latents on ``latent_device``)."""
        start = self._cursor
        if isinstance(self.source, FeatureArrays):
            batch = self._gather_in_memory(self.source)
        else:
            batch = self._whole_chunk()
            if batch is None:
                batch = self._gather()
        g = torch.Generator(self.latent_device).manual_seed(
            derive_seed(self.seed, "latent", self.rank, start)
        )
        for name, scale in self.source.moments.items():
            batch[name] = sample_latent(batch[name].to(self.latent_device, non_blocking=True), g, scale)
        return batch

    def _whole_chunk(self) -> dict[str, Tensor] | None:
        """With workers, their next chunk as it came when it is exactly the next batch (no example
        skipped, nothing left over from an earlier chunk); else None. The batch is the one that
        ``_gather`` would stack, without taking it apart and stacking it again here. Once an
        example is skipped, batches straddle chunks and are gathered one example at a time."""
        if self.num_workers == 0:
            return None
        batch = self._reader(self._cursor).take_chunk(self._cursor, self.batch_size)
        if batch is not None:
            self._cursor += self.batch_size
        return batch

    def _gather(self) -> dict[str, Tensor]:
        """The next batch_size good examples one by one, stacked; skipped ones counted."""
        items, misses = [], 0
        while len(items) < self.batch_size:
            cursor = self._cursor
            self._cursor += 1
            try:
                items.append(self._example(cursor))
                misses = 0
            except SkipExample as e:
                self.skipped[e.reason] += 1
                misses += 1
                if misses >= self.max_misses:
                    raise UnusableData(
                        f"{misses} bad examples in a row (last: {e}); the data is unusable: extract it again"
                    ) from e
        return {name: torch.stack([item[name] for item in items]) for name in items[0]}

    def _gather_in_memory(self, source: FeatureArrays) -> dict[str, Tensor]:
        """``_gather`` for examples in memory: the same batch, cursor and skips, taken at once.

        Each pass looks at as many positions as examples are still missing, so it never reads past
        the last one the batch takes, as ``_gather`` would not."""
        taken, misses = [], 0
        missing = self.batch_size
        while missing:
            cursors = torch.arange(self._cursor, self._cursor + missing)
            indices = source.indices(cursors * self.world_size + self.rank, self.seed)
            codes = source.bad[indices]
            self._cursor += missing
            if codes.any():
                for code in codes.tolist():
                    misses = misses + 1 if code else 0
                    if code:
                        self.skipped[BAD_REASONS[code - 1]] += 1
                    if misses >= self.max_misses:
                        raise UnusableData(
                            f"{misses} bad examples in a row (last: {BAD_REASONS[code - 1]}); the data is unusable: extract it again"
                        )
                indices = indices[codes == 0]
            else:
                misses = 0
            taken.append(indices)
            missing -= len(indices)
        return source.gather(torch.cat(taken))

    def _example(self, cursor: int) -> dict[str, Tensor]:
        """The example at one cursor of this process's share (raises SkipExample)."""
        if self.num_workers == 0:
            return read_example(self.source, cursor * self.world_size + self.rank, self.seed)
        return self._reader(cursor).take(cursor)

    def _reader(self, cursor: int) -> ReadAhead:
        """The worker processes, started at ``cursor`` if none are running."""
        if self._ahead is None:
            self._ahead = ReadAhead(self, cursor)
        return self._ahead

    def close(self) -> None:
        """Stop the worker processes (a later batch starts them again)."""
        self._ahead = None  # the DataLoader's iterator shuts its workers down when collected

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.cursor = int(state["cursor"])


def read_example(source: ExampleSource, position: int, seed: int) -> dict[str, Tensor]:
    """The example at one position of the global order (raises SkipExample)."""
    return source[source.index(position, seed)]


class PositionChunks(Dataset):
    """Chunk k: the examples at cursors start + k * size ... of one process's share, read in a worker.

    A chunk is (the good examples stacked, one outcome per cursor: the row of its example, or the
    (reason, detail) of a skip), so that few tensors cross between processes.
    """

    def __init__(self, stream: DataStream, start: int, size: int):
        self.source, self.seed = stream.source, stream.seed
        self.rank, self.world_size = stream.rank, stream.world_size
        self.start, self.size = start, size

    def __getitem__(self, k: int) -> tuple[dict[str, Tensor], list[int | tuple[str, str]]]:
        first = self.start + k * self.size
        rows: list[dict[str, Tensor]] = []
        outcomes: list[int | tuple[str, str]] = []
        for cursor in range(first, first + self.size):
            try:
                rows.append(read_example(self.source, cursor * self.world_size + self.rank, self.seed))
                outcomes.append(len(rows) - 1)
            except SkipExample as e:
                outcomes.append((e.reason, e.detail))
        stacked = {name: torch.stack([row[name] for row in rows]) for name in rows[0]} if rows else {}
        return stacked, outcomes


class _Count(Sampler):
    """0, 1, 2, ...: the chunks of an unbounded stream, in order."""

    def __iter__(self):
        return itertools.count()


def _unchanged(chunk):
    return chunk


class ReadAhead:
    """Worker processes reading a stream's coming chunks; ``take`` hands out examples in order.

    The DataLoader returns the chunks in index order whatever worker finishes first, so the
    examples arrive in cursor order.
    """

    def __init__(self, stream: DataStream, start: int):
        loader = DataLoader(
            PositionChunks(stream, start, stream.batch_size),
            batch_size=None,
            sampler=_Count(),
            num_workers=stream.num_workers,
            collate_fn=_unchanged,
            # the workers' base seed is drawn from this generator, not from the global one that
            # seeds the initial weights; nothing in them draws from it
            generator=torch.Generator().manual_seed(derive_seed(stream.seed, "workers", stream.rank)),
        )
        self.chunks = iter(loader)  # its workers stop when it is collected: keep it out of cycles
        self.next_cursor = start
        self.pending: collections.deque[dict[str, Tensor] | tuple[str, str]] = collections.deque()

    def take_chunk(self, cursor: int, size: int) -> dict[str, Tensor] | None:
        """The next chunk's stacked examples, if it holds the ``size`` examples from ``cursor`` on,
        none skipped; else None, and its examples wait for ``take``."""
        self._check(cursor)
        if self.pending:  # an earlier chunk is part-way through: the chunks no longer fit batches
            return None
        stacked, outcomes = next(self.chunks)
        if outcomes == list(range(size)):
            self.next_cursor += size
            return stacked
        self._queue(stacked, outcomes)
        return None

    def _queue(self, stacked: dict[str, Tensor], outcomes: list[int | tuple[str, str]]) -> None:
        for outcome in outcomes:
            if isinstance(outcome, int):
                self.pending.append({name: values[outcome] for name, values in stacked.items()})
            else:
                self.pending.append(outcome)

    def _check(self, cursor: int) -> None:
        if cursor != self.next_cursor:
            raise RuntimeError(f"read ahead to cursor {self.next_cursor}, asked for {cursor}")

    def take(self, cursor: int) -> dict[str, Tensor]:
        self._check(cursor)
        if not self.pending:
            self._queue(*next(self.chunks))
        self.next_cursor += 1
        example = self.pending.popleft()
        if isinstance(example, tuple):
            # a new exception, bound to no local: its traceback must not keep this reader alive
            raise SkipExample(*example)
        return example


def resume_cursor(cursors: Sequence[int], rank: int, world_size: int) -> tuple[int, bool]:
    """This process's cursor from the saved cursors of every process; False if not exact.

    With the same number of processes each takes its own; otherwise each starts where the
    examples consumed so far would put it (examples near the boundary may repeat or be missed).
    """
    if len(cursors) == world_size:
        return int(cursors[rank]), True
    consumed = max(c * len(cursors) for c in cursors)
    return -(-consumed // world_size), False
