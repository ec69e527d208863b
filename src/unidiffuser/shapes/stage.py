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


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary name, so a crash never leaves half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class StageCheckpoints:
    """Resumable checkpoints of one training stage: weights, optimizer, scheduler and losses.

    A checkpoint is ``out_dir/checkpoints/step_NNNNNN/`` (``training.checkpoint.write_checkpoint``,
    atomic) holding ``model_file`` (the weights as safetensors) and ``optimizer.pt``; its state
    records the stage's options, which a resumed run must repeat.
    """

    OPTIMIZER_FILE = "optimizer.pt"

    def __init__(self, out_dir: Path, kind: str, model_file: str, options: dict, keep_last: int):
        self.directory = out_dir / "checkpoints"
        self.kind, self.model_file, self.options, self.keep_last = kind, model_file, options, keep_last

    def resume(self, model, optimizer, scheduler, device) -> tuple[int, list[float]]:
        """Load the newest complete checkpoint into the objects; returns (its step, the losses so far).

        Raises:
            ValueError: the checkpoint was made with other options.
        """
        from safetensors.torch import load_file

        from ..training.checkpoint import find_checkpoints, load_training_state

        complete, _ = find_checkpoints(self.directory, kind=self.kind)
        if not complete:
            return 0, []
        ckpt = complete[-1]
        saved = ckpt.state["options"]
        if saved != self.options:
            differ = sorted(k for k in self.options if saved.get(k) != self.options[k])
            raise ValueError(
                f"{ckpt.path}: a run with other options ({', '.join(differ)}); use another out_dir"
            )
        model.load_state_dict(load_file(str(ckpt.path / self.model_file), device=str(device)), strict=True)
        training = load_training_state(ckpt)
        optimizer.load_state_dict(training["optimizer"])
        scheduler.load_state_dict(training["scheduler"])
        return ckpt.step, list(training["losses"])

    def save(self, step: int, model, optimizer, scheduler, losses: list[float]) -> None:
        import torch
        from safetensors.torch import save_file

        from ..training.checkpoint import write_checkpoint

        def write_files(tmp: Path) -> None:
            weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(weights, str(tmp / self.model_file), metadata={"format": self.kind, "step": str(step)})
            training = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "losses": losses,
            }
            torch.save(training, tmp / self.OPTIMIZER_FILE)

        state = {"options": self.options}
        write_checkpoint(self.directory, step, write_files, state, kind=self.kind, keep_last=self.keep_last)
