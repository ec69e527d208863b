"""A toy two-modality world whose joint law is known exactly, and a small trainer for it.

"image": a 2-D point from one of K Gaussian clusters. "text": the cluster's label written as a
short sequence of code vectors (its "caption"). Labels have unequal priors, so marginals are
checkable; clusters overlap a little, so the exact posterior p(label | point) is not trivially 1
and guidance has room to sharpen it. An optional third modality, "colour", is the label's colour
vector plus noise, in a timestep group of its own.

Used by the demo (``unidiffuser demo``) and by the tests that show the framework learns.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .network import UViT, UViTConfig, sequence, vector
from .objective import unidiffuser_loss
from .schedule import NoiseSchedule


@dataclass(frozen=True)
class ToyWorld:
    """The law: label ~ priors; point ~ N(center[label], spread^2 I); caption = code[label]."""

    priors: tuple[float, ...] = (0.4, 0.3, 0.2, 0.1)
    radius: float = 1.2
    spread: float = 0.4
    code_length: int = 2
    code_dim: int = 4
    colour: bool = False
    colour_noise: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if abs(sum(self.priors) - 1) > 1e-6 or min(self.priors) <= 0:
            raise ValueError(f"priors={self.priors}: expected positive numbers summing to 1")

    @property
    def num_labels(self) -> int:
        return len(self.priors)

    @property
    def centers(self) -> Tensor:
        k = self.num_labels
        angles = torch.arange(k, dtype=torch.float32) * (2 * math.pi / k)
        return self.radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)  # (K, 2)

    @property
    def codes(self) -> Tensor:
        """One ±1 code sequence per label, (K, L, D), fixed by the world's seed."""
        g = torch.Generator().manual_seed(self.seed + 1)
        return (
            torch.randint(0, 2, (self.num_labels, self.code_length, self.code_dim), generator=g).float() * 2
            - 1
        )

    @property
    def colours(self) -> Tensor:
        """One RGB-like vector in [-1, 1]^3 per label, (K, 3)."""
        g = torch.Generator().manual_seed(self.seed + 2)
        return torch.rand(self.num_labels, 3, generator=g) * 2 - 1

    def config(self, width: int = 64, depth: int = 2, num_heads: int = 4) -> UViTConfig:
        mods = [
            sequence("caption", self.code_length, self.code_dim, group="text"),
            vector("point", 2, group="image"),
        ]
        groups = ["image", "text"]
        if self.colour:
            mods.append(vector("colour", 3, group="colour"))
            groups.append("colour")
        return UViTConfig(
            tuple(mods), tuple(groups), width=width, depth=depth, num_heads=num_heads, norm="pre"
        )

    # -- the law --------------------------------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """n examples: "point" (n, 2), "caption" (n, L, D), "label" (n,), "colour" (n, 3) if on."""
        labels = torch.multinomial(torch.tensor(self.priors), n, replacement=True, generator=generator)
        out = {
            "label": labels,
            "point": self.centers[labels] + self.spread * torch.randn(n, 2, generator=generator),
            "caption": self.codes[labels],
        }
        if self.colour:
            out["colour"] = self.colours[labels] + self.colour_noise * torch.randn(n, 3, generator=generator)
        return out

    def posterior(self, point: Tensor) -> Tensor:
        """Exact p(label | point), (n, K)."""
        d2 = ((point[:, None, :].float() - self.centers[None]) ** 2).sum(-1)  # (n, K)
        logits = torch.log(torch.tensor(self.priors)) - d2 / (2 * self.spread**2)
        return torch.softmax(logits, dim=1)

    # -- readers of generated values ------------------------------------------------------------

    def read_point(self, point: Tensor) -> Tensor:
        """The most probable label of each point (the Bayes decision)."""
        return self.posterior(point).argmax(1)

    def read_caption(self, caption: Tensor) -> Tensor:
        """The label whose code is nearest to each caption."""
        d = ((caption[:, None].float() - self.codes[None]) ** 2).sum((-1, -2))  # (n, K)
        return d.argmin(1)

    def read_colour(self, colour: Tensor) -> Tensor:
        return ((colour[:, None].float() - self.colours[None]) ** 2).sum(-1).argmin(1)


def train_toy(
    world: ToyWorld,
    *,
    steps: int = 2500,
    seconds: float | None = None,
    batch_size: int = 256,
    lr: float = 2e-3,
    width: int = 64,
    depth: int = 2,
    seed: int = 0,
    log: Callable[[int, float, dict], None] | None = None,
) -> UViT:
    """Train a small U-ViT on the world with the UniDiffuser loss (stops at steps or seconds).

    A deliberately minimal loop (in memory: no accelerate, checkpoints or EMA) for the demo's
    one-minute budget and the learning tests; ``unidiffuser train --model toy --data toy`` trains
    the same world with the full trainer.

    The learning rate decays linearly to zero over ``steps``; with a time budget the schedule
    follows the elapsed fraction of it instead. Returns the model in eval mode.
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: expected >= 1")
    torch.manual_seed(seed)
    model = UViT(world.config(width=width, depth=depth))
    schedule = NoiseSchedule()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        progress = (time.perf_counter() - start) / seconds if seconds else step / steps
        if progress >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 100) * max(0.0, 1 - progress)
        data = world.sample(batch_size, gen)
        batch = {m.name: data[m.name] for m in model.config.modalities}
        loss, parts = unidiffuser_loss(model, schedule, batch, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None:
            log(step, loss.item(), {k: v.item() for k, v in parts.items()})
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Measuring a sampler against the law

Draw = Callable[[str, "dict[str, Tensor] | None", int], "dict[str, Tensor]"]


def true_draw(world: ToyWorld, generator: torch.Generator | None = None) -> Draw:
    """Exact samples of every task of the image-text layout, chains included, from the law."""

    def conditional(task: str, given: dict[str, Tensor] | None, n: int) -> dict[str, Tensor]:
        if task == "t2i":
            labels = world.read_caption(given["caption"])
            return {"point": world.centers[labels] + world.spread * torch.randn(n, 2, generator=generator)}
        if task == "i2t":
            labels = torch.multinomial(world.posterior(given["point"]), 1, generator=generator)[:, 0]
            return {"caption": world.codes[labels]}
        data = world.sample(n, generator)
        keep = {"joint": ("point", "caption"), "i": ("point",), "t": ("caption",)}[task]
        return {k: data[k] for k in keep}

    def draw(mode: str, given: dict[str, Tensor] | None, n: int) -> dict[str, Tensor]:
        from .tasks import CHAINS

        out: dict[str, Tensor] = {}
        known = dict(given or {})
        for task in CHAINS.get(mode, (mode,)):
            stage = conditional(task, known, n)
            known.update(stage)
            out.update(stage)
        return out

    return draw


def measure(
    world: ToyWorld, draw: Draw, n: int = 1000, generator: torch.Generator | None = None
) -> dict[str, float]:
    """Statistics of every mode of a sampler; run it on ``true_draw`` for the law's own values."""
    k = world.num_labels
    prompts = torch.arange(n) % k  # balanced prompts
    sources = world.sample(n, generator)
    priors = torch.tensor(world.priors)

    def max_error(labels: Tensor) -> float:
        return (torch.bincount(labels, minlength=k) / len(labels) - priors).abs().max().item()

    r: dict[str, float] = {}
    out = draw("t2i", {"caption": world.codes[prompts]}, n)
    r["t2i: point lies in the prompted cluster"] = (
        (world.read_point(out["point"]) == prompts).float().mean().item()
    )
    r["t2i: mean p(prompt | point)"] = world.posterior(out["point"]).gather(1, prompts[:, None]).mean().item()
    out = draw("i2t", {"point": sources["point"]}, n)
    r["i2t: caption names the point's label"] = (
        (world.read_caption(out["caption"]) == sources["label"]).float().mean().item()
    )
    out = draw("joint", None, n)
    lp, lc = world.read_point(out["point"]), world.read_caption(out["caption"])
    r["joint: point and caption agree"] = (lp == lc).float().mean().item()
    r["joint: max |caption share - prior|"] = max_error(lc)
    out = draw("i", None, n)
    r["i: max |cluster share - prior|"] = max_error(world.read_point(out["point"]))
    out = draw("t", None, n)
    r["t: max |caption share - prior|"] = max_error(world.read_caption(out["caption"]))
    out = draw("i2t2i", {"point": sources["point"]}, n)
    r["i2t2i: new point in the source's cluster"] = (
        (world.read_point(out["point"]) == world.read_point(sources["point"])).float().mean().item()
    )
    out = draw("t2i2t", {"caption": world.codes[prompts]}, n)
    r["t2i2t: new caption names the prompt"] = (
        (world.read_caption(out["caption"]) == prompts).float().mean().item()
    )
    return r


def model_draw(
    model: UViT,
    schedule: NoiseSchedule,
    *,
    steps: int = 25,
    guidance_scale: float = 0.0,
    generator: torch.Generator | None = None,
) -> Draw:
    """The same interface as ``true_draw``, sampling a trained model."""
    from .tasks import CHAINS, generate, generate_chain

    def draw(mode: str, given: dict[str, Tensor] | None, n: int) -> dict[str, Tensor]:
        kwargs = dict(steps=steps, guidance_scale=guidance_scale, generator=generator)
        if mode in CHAINS:
            return generate_chain(model, schedule, mode, given=given, **kwargs)
        return generate(model, schedule, mode, given=given, batch_size=None if given else n, **kwargs)

    return draw
