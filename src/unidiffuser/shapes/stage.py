"""What the shapes world's training stages share: their learning-rate shape and atomic output folders."""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..training.checkpoint import replace_directory

WARMUP_FRACTION = 0.05


def warmup_cosine(steps: int, warmup_fraction: float = WARMUP_FRACTION) -> Callable[[int], float]:
    """The learning-rate factor of a step: linear warm-up over a fraction of the steps, then cosine to zero."""
    warmup = max(1, int(warmup_fraction * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def write_dir(final: Path, save: Callable[[Path], None]) -> None:
    """Write a directory atomically: ``save`` fills a temporary sibling, which is renamed into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    try:
        save(tmp)
        replace_directory(tmp, final)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary name, so a crash never leaves half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
