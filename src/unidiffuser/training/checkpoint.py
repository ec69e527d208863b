"""Training checkpoints: one self-describing directory per step, written atomically.

Layout of ``<output_dir>/checkpoints/step_000123/``::

    model.safetensors   the raw weights (safetensors metadata: format, step, model_config)
    ema.safetensors     the EMA weights, the ones to sample with
    optimizer.pt        optimizer, lr scheduler, grad scaler and data position (torch.save of
                        plain containers and tensors; loaded with weights_only=True)
    state.json          format version, step, train config, model config, data position, files;
                        written last

A checkpoint is written into ``step_000123.tmp-XXXX`` and renamed to its final name once every
file, state.json last, is on disk, so a run killed at any moment leaves either a complete
checkpoint or a temporary directory that ``find_checkpoints`` reports and resuming ignores.
Pruning renames a directory out of the ``step_N`` pattern before deleting it, so a crash while
deleting never leaves a half-deleted "complete" checkpoint either. ``write_checkpoint`` does this
for any set of files (the caption decoder's stage writes its own checkpoints with it).

Fine-tuning starts from weights in any of the forms ``pretrained_source`` recognises: our
checkpoints and run directories, a safetensors state dict under our names, the released
``uvit_v1.pth`` / ``uvit_v0.pth``, and model directories in the three layouts of ``loading.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..network import PRESETS, UViTConfig

FORMAT = "unidiffuser.train-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint directory and its state.json."""

    path: Path
    step: int
    state: dict[str, Any]

    @property
    def model_config(self) -> UViTConfig:
        return UViTConfig.from_dict(self.state["model_config"])


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


# ---------------------------------------------------------------------------------------------
# Writing


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk (directories: where the OS allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename still orders the writes
    finally:
        os.close(fd)


def set_default_permissions(path: Path) -> None:
    """Give a file or directory the permissions a plain open/mkdir would (umask applied).

    Temporary files (mkstemp) and safetensors files are created owner-only (0600); checkpoints and
    shards are shared on clusters, so they get the usual 0644 / 0755 before being renamed.
    """
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def _umask() -> int:
    try:  # Linux says it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere it can only be read by setting it
    os.umask(mask)
    return mask


def _write_weights(path: Path, weights: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    save_file(tensors, str(path), metadata=dict(metadata))


def _write_training_state(path: Path, training: Mapping[str, Any]) -> None:
    torch.save(dict(training), path)


def write_checkpoint(
    directory: str | Path,
    step: int,
    write_files: Callable[[Path], None],
    state: Mapping[str, Any],
    *,
    kind: str = FORMAT,
    keep_last: int | None = None,
) -> Path:
    """Write ``directory/step_N`` atomically and prune to the newest ``keep_last`` checkpoints.

    Args:
        directory: the folder of checkpoints (created if missing).
        step: the step the checkpoint is at.
        write_files: fills the temporary directory it is given with the checkpoint's files.
        state: JSON-ready description stored in state.json; format, version, step, the size of
            every file and the time are added.
        kind: the format name in state.json (what ``read_checkpoint`` expects back).
        keep_last: delete older complete checkpoints of this kind beyond this many; None keeps all.

    Returns:
        The final checkpoint directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}.tmp-", dir=directory))
    set_default_permissions(tmp)
    try:
        write_files(tmp)
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.name != STATE_FILE):
            set_default_permissions(f)
            if f.is_file():
                files[f.relative_to(tmp).as_posix()] = f.stat().st_size
                _fsync(f)
        full_state = {
            "format": kind,
            "version": FORMAT_VERSION,
            "step": step,
            **state,
            "files": files,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=2) + "\n")  # the completion marker
        _fsync(tmp / STATE_FILE)
        _fsync(tmp)
        replace_directory(tmp, directory / name)
        _fsync(directory)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)  # an ordinary failure cleans up; a kill leaves tmp
        raise
    if keep_last is not None:
        prune_checkpoints(directory, keep_last, kind=kind)
    return directory / name


def replace_directory(tmp: Path, final: Path) -> None:
    """Rename a finished temporary directory to its final name, retiring an old one of that name."""
    if final.exists():  # the same step saved again (e.g. a rerun): retire the old one first
        old = Path(tempfile.mkdtemp(prefix=f"{final.name}.old-", dir=final.parent))
        os.rename(final, old / final.name)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)


def save_checkpoint(
    directory: str | Path,
    step: int,
    *,
    model: Mapping[str, Tensor],
    ema: Mapping[str, Tensor],
    training: Mapping[str, Any],
    state: Mapping[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Write ``directory/step_N`` atomically and prune to the newest ``keep_last`` checkpoints.

    Args:
        directory: the folder of checkpoints (created if missing).
        step: the optimizer step the weights are at.
        model: the raw weights (our names).
        ema: the EMA weights.
        training: optimizer, scheduler and other resumable state (tensors and plain containers).
        state: JSON-ready description; must hold "model_config" (a UViTConfig dict). Format, step,
            file sizes and time are added.
        keep_last: delete older complete checkpoints beyond this many; None keeps all.

    Returns:
        The final checkpoint directory.
    """
    meta = {"format": FORMAT, "step": str(step), "model_config": json.dumps(state["model_config"])}

    def write_files(tmp: Path) -> None:
        _write_weights(tmp / MODEL_FILE, model, {**meta, "weights": "raw"})
        _write_weights(tmp / EMA_FILE, ema, {**meta, "weights": "ema"})
        _write_training_state(tmp / OPTIMIZER_FILE, training)

    return write_checkpoint(directory, step, write_files, state, keep_last=keep_last)


def prune_checkpoints(directory: str | Path, keep_last: int, *, kind: str = FORMAT) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints; return the deleted paths."""
    complete, _ = find_checkpoints(directory, kind=kind)
    removed = []
    for ckpt in complete[: max(0, len(complete) - keep_last)]:
        doomed = ckpt.path.with_name(f"{ckpt.path.name}.deleting")
        os.rename(ckpt.path, doomed)  # no longer a complete checkpoint, even if deletion stops
        shutil.rmtree(doomed)
        removed.append(ckpt.path)
    return removed


# ---------------------------------------------------------------------------------------------
# Reading


def _open_file(path: Path) -> None:
    """Read a weights file's index (a safetensors header, a torch zip's pickle; the tensors are
    mapped, not read): a file damaged where that lies is a ValueError, found before a run starts."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as file:
                file.keys()
        elif path.suffix == ".pt":
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # the readers raise their own kinds
        raise ValueError(f"{path.parent}: {path.name} cannot be read ({type(err).__name__}: {err})") from None


def read_checkpoint(path: str | Path, *, kind: str = FORMAT) -> Checkpoint:
    """Validate one checkpoint directory; raises ValueError naming what is missing."""
    path = Path(path)
    match = STEP_DIR.match(path.name)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise ValueError(f"{path}: no {STATE_FILE} (an incomplete or foreign checkpoint)")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {STATE_FILE} is not valid JSON ({e})") from None
    if state.get("format") != kind:
        raise ValueError(f"{path}: format {state.get('format')!r}, expected {kind!r}")
    if state.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {state.get('version')!r}; this code reads {FORMAT_VERSION}")
    if match and int(match.group(1)) != state.get("step"):
        raise ValueError(f"{path}: the name says step {int(match.group(1))}, state.json {state.get('step')}")
    for name, size in state.get("files", {}).items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            raise ValueError(f"{path}: {name} is missing or has the wrong size")
        _open_file(f)
    return Checkpoint(path=path, step=int(state["step"]), state=state)


def find_checkpoints(
    directory: str | Path, *, kind: str = FORMAT
) -> tuple[list[Checkpoint], list[tuple[Path, str]]]:
    """Complete checkpoints sorted by step, and (path, reason) of incomplete or temporary ones."""
    directory = Path(directory)
    complete, incomplete = [], []
    if not directory.is_dir():
        return complete, incomplete
    for path in sorted(directory.iterdir()):
        if not path.is_dir() or not path.name.startswith("step_"):
            continue
        if not STEP_DIR.match(path.name):
            incomplete.append((path, "temporary directory of an interrupted write or deletion"))
            continue
        try:
            complete.append(read_checkpoint(path, kind=kind))
        except ValueError as e:
            incomplete.append((path, str(e)))
    complete.sort(key=lambda c: c.step)
    return complete, incomplete


def starting_checkpoint(
    directory: str | Path, *, resume: bool, output_dir: str, note: Callable[[str], None], kind: str = FORMAT
) -> Checkpoint | None:
    """Where a run starts: the newest complete checkpoint when resuming, else None.

    Incomplete or temporary checkpoints are reported through ``note`` and ignored; a directory
    that already holds checkpoints is refused unless the run resumes, so nothing is overwritten.
    """
    complete, incomplete = find_checkpoints(directory, kind=kind)
    for path, reason in incomplete:
        note(f"ignoring checkpoint {path.name}: {reason}")
    if complete and not resume:
        raise ValueError(
            f"output_dir = {output_dir!r} already holds checkpoints (newest {complete[-1].path.name}); "
            "pass --resume to continue that run, or choose another output_dir"
        )
    return complete[-1] if complete and resume else None


def latest_checkpoint(directory: str | Path, *, kind: str = FORMAT) -> Checkpoint | None:
    """The newest complete checkpoint in ``directory``, or None."""
    complete, _ = find_checkpoints(directory, kind=kind)
    return complete[-1] if complete else None


def load_training_state(checkpoint: Checkpoint | str | Path) -> dict[str, Any]:
    """The optimizer file: loaded with weights_only=True (it holds only tensors and containers)."""
    path = checkpoint.path if isinstance(checkpoint, Checkpoint) else Path(checkpoint)
    return torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)


def load_weights(checkpoint: Checkpoint | str | Path, which: str = "ema") -> dict[str, Tensor]:
    """The "ema" or "model" (raw) weights of a checkpoint directory."""
    if which not in ("ema", "model"):
        raise ValueError(f"which={which!r}: expected 'ema' or 'model'")
    path = checkpoint.path if isinstance(checkpoint, Checkpoint) else Path(checkpoint)
    return load_file(str(path / (EMA_FILE if which == "ema" else MODEL_FILE)))


# ---------------------------------------------------------------------------------------------
# Weights to fine-tune from

RELEASE_FILES = ("uvit_v1.pth", "uvit_v0.pth")  # in the order the release directory is read
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
INIT_FROM_FORMS = (
    "a checkpoint step_N directory or a run directory, a .safetensors state dict under our names, a "
    "released uvit_v1.pth/uvit_v0.pth, or a model directory (ours: unidiffuser.json; the release "
    "files: uvit_v*.pth; diffusers: unet/)"
)


@dataclass(frozen=True)
class PretrainedSource:
    """Network weights to start from, as found on disk (nothing but configs read yet).

    Attributes:
        path: the path given.
        description: what it is, for messages ("the release file uvit_v1.pth", ...).
        weights: the file (or, for diffusers, the unet folder) holding the weights.
        names: their naming: "ours", "official" (the release files) or "diffusers".
        config: the architecture stored with them, or None when the source does not say.
    """

    path: Path
    description: str
    weights: Path
    names: str
    config: UViTConfig | None

    def load(self) -> dict[str, Tensor]:
        """The weights as a state dict under our names (pickles read with weights_only=True)."""
        from ..loading import diffusers_weights, read_weights
        from ..official import from_diffusers_keys, from_official_keys

        if self.names == "diffusers":
            return from_diffusers_keys(diffusers_weights(self.weights))
        weights = read_weights(self.weights)
        return from_official_keys(weights) if self.names == "official" else weights


def pretrained_source(path: str | Path) -> PretrainedSource:
    """Recognise what ``init_from`` names and read its architecture; the weights stay on disk.

    Args:
        path: one of the forms in ``INIT_FROM_FORMS``.

    Returns:
        Where the weights are, how they are named and, where the source says, the architecture.
    """
    path = Path(path)
    if path.is_dir():
        return _directory_source(path)
    if path.is_file() and path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as err:  # safetensors raises its own kind
            raise ValueError(
                f"init_from = {str(path)!r}: cannot read it ({type(err).__name__}: {err})"
            ) from None
        config = UViTConfig.from_dict(json.loads(meta["model_config"])) if "model_config" in meta else None
        return PretrainedSource(path, f"the state dict {path.name}", path, "ours", config)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        return _release_source(path, path)
    problem = "not found" if not path.exists() else "of an unknown kind"
    raise ValueError(
        f"init_from = {str(path)!r}: {problem}: not a checkpoint directory or a .safetensors file, a "
        f"released uvit_v*.pth or a model directory; give {INIT_FROM_FORMS}"
    )


def _directory_source(path: Path) -> PretrainedSource:
    from ..loading import FORMAT as MODEL_FORMAT
    from ..official import config_from_diffusers

    if (path / STATE_FILE).is_file():  # one of our checkpoints: its EMA, the weights to sample with
        ckpt = read_checkpoint(path)
        return PretrainedSource(
            path, f"the EMA of checkpoint {path.name}", path / EMA_FILE, "ours", ckpt.model_config
        )
    if (path / "checkpoints").is_dir():  # a run directory: its newest complete checkpoint
        newest = latest_checkpoint(path / "checkpoints")
        if newest is None:
            raise ValueError(f"init_from = {str(path)!r}: a run directory without a complete checkpoint")
        source = _directory_source(newest.path)
        return dataclasses.replace(source, path=path, description=f"{source.description} of run {path.name}")
    if (path / "unidiffuser.json").is_file():  # our model format
        meta = json.loads((path / "unidiffuser.json").read_text())
        if meta.get("format") != MODEL_FORMAT:
            raise ValueError(f"init_from = {str(path)!r}: unidiffuser.json has format {meta.get('format')!r}")
        config = UViTConfig.from_dict(meta["network"])
        return PretrainedSource(path, f"the model {path.name}", path / "network.safetensors", "ours", config)
    for name in RELEASE_FILES:
        if (path / name).is_file():
            return _release_source(path, path / name)
    unet = path / "unet" if (path / "unet").is_dir() else path
    if (unet / "config.json").is_file():
        cfg = json.loads((unet / "config.json").read_text())
        if cfg.get("_class_name") == "UniDiffuserModel" or unet != path:
            return PretrainedSource(
                path,
                f"the diffusers UniDiffuserModel in {unet}",
                unet,
                "diffusers",
                config_from_diffusers(cfg),
            )
    found = sorted(p.name for p in path.iterdir())[:12]
    raise ValueError(
        f"init_from = {str(path)!r}: a directory of none of the known forms (found {found}); give {INIT_FROM_FORMS}"
    )


def _release_source(path: Path, file: Path) -> PretrainedSource:
    """A released network file: its architecture from release_config.json beside it (as
    ``loading.py`` reads it), else from its name (uvit_v1.pth: the v1 preset)."""
    from ..official import config_from_official

    custom = file.parent / "release_config.json"
    config = None
    if custom.is_file():
        uvit = json.loads(custom.read_text()).get("uvit")
        config = config_from_official(uvit) if uvit is not None else None
    if config is None and file.name in RELEASE_FILES:
        config = PRESETS[f"unidiffuser-{file.stem.removeprefix('uvit_')}"]
    return PretrainedSource(path, f"the release file {file.name}", file, "official", config)


def load_network_weights(path: str | Path) -> dict[str, Tensor]:
    """The weights to start a fine-tuning run from, as a state dict under our names.

    Any form ``pretrained_source`` recognises: our checkpoint directories (their EMA weights, the
    ones meant for sampling) and run directories (the newest checkpoint), a plain .safetensors state
    dict under our names, the released uvit_v*.pth (official names, renamed), and model directories
    in our format, the release layout or the diffusers layout.
    """
    return pretrained_source(path).load()


def saved_model_config(path: str | Path) -> UViTConfig | None:
    """The architecture stored with weights, or None when the source does not say."""
    return pretrained_source(path).config


def describe_difference(a: UViTConfig, b: UViTConfig) -> str:
    """The fields where two architectures differ, e.g. "width 32 vs 64, text.shape (77, 8) vs (16, 16)"."""
    da, db = a.to_dict(), b.to_dict()
    parts = []
    for key in da:
        if key == "modalities":
            ma = {m["name"]: m for m in da[key]}
            mb = {m["name"]: m for m in db[key]}
            if list(ma) != list(mb):
                parts.append(f"modalities {list(ma)} vs {list(mb)}")
            for name in [n for n in ma if n in mb]:
                for field, value in ma[name].items():
                    if value != mb[name][field]:
                        parts.append(f"{name}.{field} {_short(value)} vs {_short(mb[name][field])}")
        elif da[key] != db[key]:
            parts.append(f"{key} {_short(da[key])} vs {_short(db[key])}")
    return ", ".join(parts) or "no difference"


def _short(value: Any) -> str:
    return str(tuple(value)) if isinstance(value, list) else str(value)
