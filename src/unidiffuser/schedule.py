"""The noise schedule: Stable Diffusion's scaled-linear betas, seen as a continuous-time VP process.

Every other module speaks continuous time t in [0, 1] (t = 1 is pure noise). ``network_time`` is
the one place where t becomes the network's 0..1000 timestep.

Continuous from discrete: knots t_n = n / N (n = 1..N) carry log alpha_n = 0.5 log alphabar_n and
log alpha is linear between knots. One more knot, t_0 = 0 with log alpha = 0 (the clean data),
lets a solver step to sigma = 0; it changes nothing on [1/N, 1].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def scaled_linear_betas(
    num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """linspace(sqrt(beta_start), sqrt(beta_end), N)^2 in float64 (Stable Diffusion's schedule)."""
    return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_steps, dtype=torch.float64) ** 2


class NoiseSchedule:
    """alpha_t, sigma_t, lambda_t = log(alpha_t / sigma_t) of x_t = alpha_t x_0 + sigma_t eps."""

    def __init__(self, betas: Tensor | None = None):
        betas = scaled_linear_betas() if betas is None else betas.to(torch.float64)
        if betas.ndim != 1 or len(betas) < 2 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError(
                f"betas: expected a 1-D tensor of values in (0, 1), got shape {tuple(betas.shape)}"
            )
        self.betas = betas
        self.num_steps = len(betas)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # alphabar_n, n = 1..N
        # knots t_0 = 0 .. t_N = 1 (float64)
        self.knot_t = torch.arange(self.num_steps + 1, dtype=torch.float64) / self.num_steps
        self.knot_log_alpha = torch.cat(
            [torch.zeros(1, dtype=torch.float64), 0.5 * torch.log(self.alphas_cumprod)]
        )

    # -- the one time conversion ----------------------------------------------------------------

    def network_time(self, t: Tensor) -> Tensor:
        """Continuous t in [0, 1] -> the network's timestep on the 0..N scale (float)."""
        return t * self.num_steps

    # -- marginals ------------------------------------------------------------------------------

    def log_alpha(self, t: Tensor | float) -> Tensor:
        """Piecewise-linear log alpha over the knots; the end segments extend linearly."""
        t = torch.as_tensor(t, dtype=torch.float64)
        kt, ka = self.knot_t, self.knot_log_alpha
        i = torch.clamp(torch.searchsorted(kt, t.reshape(-1).contiguous(), right=True) - 1, 0, len(kt) - 2)
        w = (t.reshape(-1) - kt[i]) / (kt[i + 1] - kt[i])
        return (ka[i] + w * (ka[i + 1] - ka[i])).reshape(t.shape)

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: Tensor | float) -> Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def lambda_(self, t: Tensor | float) -> Tensor:
        """Half log-SNR, log(alpha / sigma); +inf at t = 0."""
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(-torch.expm1(2.0 * la))

    def inverse_lambda(self, lam: Tensor | float) -> Tensor:
        """The t whose lambda_t is lam: through log alpha = -0.5 log(1 + exp(-2 lam))."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        la = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        # log alpha decreases in t: search the flipped knots
        kt, ka = self.knot_t.flip(0), self.knot_log_alpha.flip(0)
        flat = la.reshape(-1).contiguous()
        i = torch.clamp(torch.searchsorted(ka, flat, right=True) - 1, 0, len(ka) - 2)
        w = (flat - ka[i]) / (ka[i + 1] - ka[i])
        return (kt[i] + w * (kt[i + 1] - kt[i])).reshape(la.shape)

    def discrete_time(self, n: Tensor) -> Tensor:
        """Discrete step index n in 1..N -> continuous t = n / N, the knot where alphabar_n holds."""
        return n.to(torch.float64) / self.num_steps


__all__ = ["NoiseSchedule", "scaled_linear_betas"]
