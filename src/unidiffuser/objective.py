"""The UniDiffuser objective: independent timesteps per group, one noise regression for all.

Each timestep group draws its own discrete step n ~ U{1..N} (continuous t = n / N) for every
example, each diffused modality gets its own Gaussian noise, x_t = alpha_t x_0 + sigma_t eps, and
the network regresses the noise of every modality at once.

Weighting between modalities. ``weighting="modality"`` (the default) averages the squared error
over each modality's own elements and sums these means, so each modality counts the same however
many numbers it has: a 4x64x64 image latent (16,384 numbers) would otherwise outweigh the CLIP
token (512) and the 77x64 text latent (4,928) by 3 to 32 times, and in small models the text would
barely be learned. ``weighting="element"`` is the paper's plain MSE over the concatenation of all
modalities, for fine-tuning in the released model's own balance. ``weights`` scales single
modalities on top of either.

Clean conditions. The paper draws every group's timestep from U{1..N}, so the network never sees
the clean (t = 0) condition that conditional sampling gives it, and learns each conditional only
from the rare draws where one group is nearly clean. ``clean_prob`` > 0 sets, for that share of
the examples, one group (chosen uniformly) clean: timestep 0, no noise, and no loss on its
modalities for those examples. The other groups keep their uniform draws, so the network learns
the conditionals at the very timesteps sampling uses, alongside the joint and the marginals.

Weighting over timesteps. The paper weighs every timestep alike. ``snr_gamma`` > 0 weighs each
example's error on a modality by min(SNR_t, gamma) / SNR_t of its group's timestep (Min-SNR-gamma,
Hang et al., ICCV 2023; SNR_t = alpha_t^2 / sigma_t^2, and the error is of the noise): timesteps
noisier than SNR = gamma keep weight 1, cleaner ones weigh less, down to about gamma / 1200 at
n = 1 under the released schedule. Training time then goes to the noisy steps, where a picture's
layout and a caption's words are decided, instead of to removing the last grain of noise. The
per-modality errors returned for logging stay unweighted, so runs with and without it compare.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .network import UViT
from .schedule import NoiseSchedule

WEIGHTINGS = ("modality", "element")


def unidiffuser_loss(
    network: UViT,
    schedule: NoiseSchedule,
    batch: Mapping[str, Tensor],
    *,
    weighting: str = "modality",
    weights: Mapping[str, float] | None = None,
    generator: torch.Generator | None = None,
    clean_prob: float = 0.0,
    snr_gamma: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The noise-prediction loss of one batch.

    Args:
        network: the U-ViT.
        schedule: the noise schedule.
        batch: clean values of every modality (labels as integer tensors).
        weighting: "modality" (sum of per-modality means) or "element" (one mean over all).
        weights: optional extra factor per diffused modality.
        generator: source of timesteps and noise (drawn on its device).
        clean_prob: share of examples with one group clean (see the module docstring); with 0
            (the paper's objective) no extra random numbers are drawn.
        snr_gamma: weigh each timestep by min(SNR, snr_gamma) / SNR (see the module docstring);
            0 weighs them alike, as the paper does.

    Returns:
        The total loss (a scalar with gradient) and the detached per-modality mean squared errors.
    """
    cfg = network.config
    if not 0.0 <= clean_prob < 1.0:
        raise ValueError(f"clean_prob={clean_prob}: expected a share in [0, 1), such as 0.5")
    if not (math.isfinite(snr_gamma) and snr_gamma >= 0):
        raise ValueError(f"snr_gamma={snr_gamma}: expected 0 (off) or a positive value, such as 5")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}: expected one of {WEIGHTINGS}")
    weights = dict(weights or {})
    unknown = set(weights) - {m.name for m in cfg.diffused}
    if unknown:
        raise ValueError(
            f"weights: unknown modalities {sorted(unknown)}; diffused ones are {[m.name for m in cfg.diffused]}"
        )
    if not isinstance(batch, Mapping) or set(batch) != {m.name for m in cfg.modalities}:
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(
            f"batch: got modalities {got}, expected exactly {sorted(m.name for m in cfg.modalities)}"
        )
    first = batch[cfg.diffused[0].name]
    b, device = first.shape[0], first.device
    draw_on = generator.device if generator is not None else device

    clean = _clean_groups(cfg.groups, b, clean_prob, generator, draw_on)  # group -> (B,) bool, or None
    timesteps, noisy, noises, kept, factor = {}, {}, {}, {}, {}
    for g in cfg.groups:
        n = torch.randint(1, schedule.num_steps + 1, (b,), generator=generator, device=draw_on)
        if clean is not None:
            n = n.masked_fill(clean[g], 0)
        t = schedule.discrete_time(n).to(device)  # (B,) float64
        timesteps[g] = schedule.network_time(t).float()  # = n, the network's scale
        alpha, sigma = schedule.alpha(t.cpu()).to(device), schedule.sigma(t.cpu()).to(device)
        if snr_gamma:
            snr = (alpha / sigma) ** 2  # inf where the group is clean, which has no loss anyway
            weight = (torch.clamp(snr, max=snr_gamma) / snr).float()
        for m in cfg.members(g):
            x0 = batch[m.name]
            if not isinstance(x0, Tensor) or not x0.is_floating_point():
                raise ValueError(f"batch[{m.name!r}]: expected a floating tensor")
            eps = torch.randn(x0.shape, generator=generator, device=draw_on, dtype=torch.float32).to(
                device, x0.dtype
            )
            view = (b,) + (1,) * (x0.ndim - 1)
            noisy[m.name] = alpha.view(view).to(x0.dtype) * x0 + sigma.view(view).to(x0.dtype) * eps
            noises[m.name] = eps
            if clean is not None:
                kept[m.name] = (~clean[g]).to(device)
            if snr_gamma:
                factor[m.name] = weight
    for m in cfg.labels:
        noisy[m.name] = batch[m.name]

    pred = network(noisy, timesteps)
    # per modality: summed squared error (as logged, and as weighed over timesteps), and how many
    # numbers it is over
    sums, weighed, counts = {}, {}, {}
    for name, eps in noises.items():
        per_example = ((pred[name].float() - eps.float()) ** 2).flatten(1).sum(1)
        if name in kept:  # only the examples where the modality was diffused count
            per_example = per_example * kept[name]
            counts[name] = kept[name].sum() * eps[0].numel()
        else:
            counts[name] = torch.tensor(eps.numel(), device=eps.device)
        sums[name] = per_example.sum()
        weighed[name] = (per_example * factor[name]).sum() if name in factor else sums[name]
    parts = {n: sums[n] / counts[n].clamp(min=1) for n in sums}
    if weighting == "modality":
        total = sum(weights.get(n, 1.0) * weighed[n] / counts[n].clamp(min=1) for n in weighed)
    else:
        total = sum(weights.get(n, 1.0) * weighed[n] for n in weighed) / sum(counts.values()).clamp(min=1)
    return total, {n: v.detach() for n, v in parts.items()}


def _clean_groups(
    groups: tuple[str, ...], b: int, clean_prob: float, generator: torch.Generator | None, device
) -> dict[str, Tensor] | None:
    """For ``clean_prob`` of the examples, one group chosen uniformly is clean: group -> (B,) mask."""
    if clean_prob == 0.0 or len(groups) < 2:  # a single group clean would leave nothing to learn
        return None
    chosen = torch.rand(b, generator=generator, device=device) < clean_prob
    which = torch.randint(0, len(groups), (b,), generator=generator, device=device)
    return {g: chosen & (which == i) for i, g in enumerate(groups)}
