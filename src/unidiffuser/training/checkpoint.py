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
deleting never leaves a half-deleted "complete" checkpoint either.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..network import UViTConfig

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
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}.tmp-", dir=directory))
    set_default_permissions(tmp)
    try:
        meta = {
            "format": FORMAT,
            "step": str(step),
            "model_config": json.dumps(state["model_config"]),
        }
        _write_weights(tmp / MODEL_FILE, model, {**meta, "weights": "raw"})
        _write_weights(tmp / EMA_FILE, ema, {**meta, "weights": "ema"})
        _write_training_state(tmp / OPTIMIZER_FILE, training)
        files = {f: (tmp / f).stat().st_size for f in (MODEL_FILE, EMA_FILE, OPTIMIZER_FILE)}
        full_state = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "step": step,
            **state,
            "files": files,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for f in files:
            set_default_permissions(tmp / f)
            _fsync(tmp / f)
        (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=2) + "\n")  # the completion marker
        _fsync(tmp / STATE_FILE)
        _fsync(tmp)
        final = directory / name
        if final.exists():  # the same step saved again (e.g. a rerun): retire the old one first
            old = Path(tempfile.mkdtemp(prefix=f"{name}.old-", dir=directory))
            os.rename(final, old / name)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync(directory)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)  # an ordinary failure cleans up; a kill leaves tmp
        raise
    if keep_last is not None:
        prune_checkpoints(directory, keep_last)
    return final


def prune_checkpoints(directory: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints; return the deleted paths."""
    complete, _ = find_checkpoints(directory)
    removed = []
    for ckpt in complete[: max(0, len(complete) - keep_last)]:
        doomed = ckpt.path.with_name(f"{ckpt.path.name}.deleting")
        os.rename(ckpt.path, doomed)  # no longer a complete checkpoint, even if deletion stops
        shutil.rmtree(doomed)
        removed.append(ckpt.path)
    return removed


# ---------------------------------------------------------------------------------------------
# Reading


def read_checkpoint(path: str | Path) -> Checkpoint:
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
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: format {state.get('format')!r}, expected {FORMAT!r}")
    if state.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {state.get('version')!r}; this code reads {FORMAT_VERSION}")
    if match and int(match.group(1)) != state.get("step"):
        raise ValueError(f"{path}: the name says step {int(match.group(1))}, state.json {state.get('step')}")
    for name, size in state.get("files", {}).items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            raise ValueError(f"{path}: {name} is missing or has the wrong size")
    return Checkpoint(path=path, step=int(state["step"]), state=state)


def find_checkpoints(directory: str | Path) -> tuple[list[Checkpoint], list[tuple[Path, str]]]:
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
            complete.append(read_checkpoint(path))
        except ValueError as e:
            incomplete.append((path, str(e)))
    complete.sort(key=lambda c: c.step)
    return complete, incomplete


def latest_checkpoint(directory: str | Path) -> Checkpoint | None:
    """The newest complete checkpoint in ``directory``, or None."""
    complete, _ = find_checkpoints(directory)
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


def load_network_weights(path: str | Path) -> dict[str, Tensor]:
    """The weights to start a fine-tuning run from, as a state dict under our names.

    The hook for other formats (the released checkpoints come later): for now one of our
    checkpoint directories (its EMA weights, the ones meant for sampling) or a plain .safetensors
    state dict under our names.
    """
    path = Path(path)
    if path.is_dir():
        return load_weights(read_checkpoint(path), "ema")
    if path.suffix == ".safetensors" and path.is_file():
        return load_file(str(path))
    raise ValueError(
        f"init_from = {str(path)!r}: not a checkpoint directory or a .safetensors file; give a "
        "step_N directory of a run, or a state dict saved with safetensors under our names"
    )


def saved_model_config(path: str | Path) -> UViTConfig | None:
    """The architecture stored with weights (a checkpoint directory, or safetensors metadata)."""
    path = Path(path)
    if path.is_dir():
        return read_checkpoint(path).model_config
    if path.suffix == ".safetensors" and path.is_file():
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "model_config" in meta:
            return UViTConfig.from_dict(json.loads(meta["model_config"]))
    return None
