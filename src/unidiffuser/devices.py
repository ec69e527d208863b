"""The device a ``--device`` option names, checked before any work starts.

Every command and stage takes the same names: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (this
process's GPU when torch sees one, else the CPU).
"""

from __future__ import annotations

import torch

NAMES = "cpu, cuda, cuda:N or auto"


def resolve_device(name: str | torch.device, local_rank: int = 0) -> torch.device:
    """The device ``name`` stands for; a ValueError naming the fix when there is no such device.

    With ``auto``, process ``local_rank`` takes GPU ``local_rank`` modulo the GPU count, so more
    processes than GPUs share them.
    """
    if str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r}: not a device name; use {NAMES}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: only CPUs and CUDA GPUs are supported; use {NAMES}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: no CUDA device is available; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                f"numbered from 0; use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    return device


def device_option(name: str, command: str, local_rank: int = 0) -> torch.device:
    """``resolve_device`` for a command's ``--device``: a bad name ends the command with the reason."""
    try:
        return resolve_device(name, local_rank)
    except ValueError as err:
        raise SystemExit(f"{command}: --{err}") from None
