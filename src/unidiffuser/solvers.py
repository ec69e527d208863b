"""Samplers: pure functions over a noise-prediction function eps(x, t), t continuous in [0, 1].

Every solver works in data prediction, x0(x, t) = (x - sigma_t eps(x, t)) / alpha_t, over any
tensor shape (all rows share t). The grid of times is built by separate functions, and guidance or
the choice of task lives in the model function (see ``tasks.py``), never here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .schedule import NoiseSchedule

ModelFn = Callable[[Tensor, float], Tensor]  # (x, t) -> predicted noise, shaped like x
Callback = Callable[[int, float, Tensor], None]  # (step index, time reached, state)

SOLVERS = ("dpm++2m", "dpm++3s", "ddim")
DEFAULT_SOLVER = "dpm++3s"  # the released sampler: the pipeline's and the commands' default
GRIDS = ("time", "logsnr")  # uniform in t (as released), uniform in log-SNR


# ---------------------------------------------------------------------------------------------
# Time grids


def _check_grid_args(steps: int, t_start: float, t_end: float) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps={steps!r}: expected an integer >= 1")
    if not 0.0 <= t_end < t_start <= 1.0:
        raise ValueError(f"times t_start={t_start}, t_end={t_end}: expected 0 <= t_end < t_start <= 1")


def time_uniform_grid(steps: int, t_start: float = 1.0, t_end: float = 1e-3) -> Tensor:
    """steps + 1 times, uniform in t, from t_start down to t_end (float64)."""
    _check_grid_args(steps, t_start, t_end)
    return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)


def logsnr_grid(schedule: NoiseSchedule, steps: int, t_start: float = 1.0, t_end: float = 1e-3) -> Tensor:
    """steps + 1 times, uniform in lambda = log(alpha / sigma), from t_start down to t_end."""
    _check_grid_args(steps, t_start, t_end)
    if t_end == 0.0:
        raise ValueError("t_end=0 has infinite log-SNR: use t_end > 0 for a log-SNR grid")
    lam = torch.linspace(
        float(schedule.lambda_(t_start)),
        float(schedule.lambda_(t_end)),
        steps + 1,
        dtype=torch.float64,
    )
    ts = schedule.inverse_lambda(lam)
    ts[0], ts[-1] = t_start, t_end  # exact end points
    return ts


def check_grid(grid, where: str = "grid") -> str:
    """``grid`` if it names one of ``GRIDS``, else a ValueError that says what ``where`` holds."""
    if grid not in GRIDS:
        raise ValueError(
            f"{where}={grid!r}: expected 'time' (uniform in t, the released sampler's) or 'logsnr' "
            "(uniform in log-SNR, more steps near the clean end)"
        )
    return grid


def time_grid(
    schedule: NoiseSchedule, steps: int, grid: str = "time", t_start: float = 1.0, t_end: float = 1e-3
) -> Tensor:
    """steps + 1 times from t_start down to t_end on the named grid (``GRIDS``)."""
    if check_grid(grid) == "time":
        return time_uniform_grid(steps, t_start, t_end)
    return logsnr_grid(schedule, steps, t_start, t_end)


def official_orders(evaluations: int) -> list[int]:
    """Step orders of the released sampler ("fast" singlestep, order 3) for a number of evaluations."""
    if not isinstance(evaluations, int) or evaluations < 1:
        raise ValueError(f"evaluations={evaluations!r}: expected an integer >= 1")
    k = evaluations // 3 + 1
    if evaluations % 3 == 0:
        return [3] * (k - 2) + [2, 1]
    if evaluations % 3 == 1:
        return [3] * (k - 1) + [1]
    return [3] * (k - 1) + [2]


# ---------------------------------------------------------------------------------------------
# Solvers


class _Marginals:
    """alpha, sigma, lambda at the grid times, as Python floats (computed in float64)."""

    def __init__(self, schedule: NoiseSchedule, ts: Tensor):
        ts = torch.as_tensor(ts, dtype=torch.float64)
        if ts.ndim != 1 or len(ts) < 2:
            raise ValueError(
                f"timesteps: expected a 1-D grid of at least 2 times, got shape {tuple(ts.shape)}"
            )
        # decreasing times sample; increasing times invert (run the ODE from data towards noise)
        monotone = bool((ts[:-1] > ts[1:]).all() or (ts[:-1] < ts[1:]).all())
        if not torch.isfinite(ts).all() or not monotone or ts.max() > 1 or ts.min() < 0:
            raise ValueError(
                f"timesteps: expected strictly monotone times in [0, 1], got {ts.tolist()[:6]}..."
            )
        self.t = ts.tolist()
        self.alpha = schedule.alpha(ts).tolist()
        self.sigma = schedule.sigma(ts).clamp_min(0).tolist()
        self.lam = schedule.lambda_(ts).tolist()


def _data_prediction(model_fn: ModelFn, x: Tensor, m: _Marginals, i: int) -> Tensor:
    eps = model_fn(x, m.t[i])
    if eps.shape != x.shape:
        raise ValueError(f"model_fn returned shape {tuple(eps.shape)} for a state of shape {tuple(x.shape)}")
    return (x - m.sigma[i] * eps) / m.alpha[i]


def _first_order(x: Tensor, x0: Tensor, m: _Marginals, s: int, t: int) -> Tensor:
    """One DPM-Solver++(1) = DDIM step from grid point s to t."""
    if m.sigma[t] == 0.0:
        return x0  # the limit h -> inf: the clean prediction
    h = m.lam[t] - m.lam[s]
    return (m.sigma[t] / m.sigma[s]) * x - m.alpha[t] * torch.expm1(torch.tensor(-h)).item() * x0


def sample_ddim(
    model_fn: ModelFn,
    x: Tensor,
    timesteps: Tensor,
    schedule: NoiseSchedule,
    *,
    callback: Callback | None = None,
) -> Tensor:
    """Deterministic DDIM (Song et al. 2021), i.e. first-order DPM-Solver++ (Lu et al. 2022)."""
    m = _Marginals(schedule, timesteps)
    for i in range(len(m.t) - 1):
        x = _first_order(x, _data_prediction(model_fn, x, m, i), m, i, i + 1)  # one evaluation a step
        if callback is not None:
            callback(i, m.t[i + 1], x)
    return x


def sample_dpmpp_2m(
    model_fn: ModelFn,
    x: Tensor,
    timesteps: Tensor,
    schedule: NoiseSchedule,
    *,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M), multistep second order (Lu et al. 2022, arXiv 2211.01095)."""
    m = _Marginals(schedule, timesteps)
    prev = None  # the previous step's data prediction
    for i in range(len(m.t) - 1):
        x0 = _data_prediction(model_fn, x, m, i)
        if prev is None or m.sigma[i + 1] == 0.0:
            # first step has no history; the step to sigma = 0 is exact at first order
            x = _first_order(x, x0, m, i, i + 1)
        else:
            h = m.lam[i + 1] - m.lam[i]
            r = (m.lam[i] - m.lam[i - 1]) / h
            d1 = (x0 - prev) / r  # backward difference, rescaled to this step
            phi1 = torch.expm1(torch.tensor(-h)).item()
            x = (m.sigma[i + 1] / m.sigma[i]) * x - m.alpha[i + 1] * phi1 * (x0 + 0.5 * d1)
        prev = x0
        if callback is not None:
            callback(i, m.t[i + 1], x)
    return x


def sample_dpmpp_singlestep(
    model_fn: ModelFn,
    x: Tensor,
    timesteps: Tensor,
    schedule: NoiseSchedule,
    orders: Sequence[int],
    *,
    callback: Callback | None = None,
) -> Tensor:
    """Singlestep DPM-Solver++ of orders 1-3 (Lu et al. 2022), intermediate points on the grid.

    A step of order k spans k grid intervals and evaluates the model at each grid point it
    crosses, so the grid has sum(orders) intervals and the model is called sum(orders) times.
    """
    m = _Marginals(schedule, timesteps)
    if any(k not in (1, 2, 3) for k in orders) or sum(orders) != len(m.t) - 1:
        raise ValueError(
            f"orders={list(orders)}: expected values in 1..3 summing to the {len(m.t) - 1} grid intervals"
        )
    expm1 = lambda v: torch.expm1(torch.tensor(v, dtype=torch.float64)).item()  # noqa: E731
    s = 0
    for step, k in enumerate(orders):
        t = s + k
        x0_s = _data_prediction(model_fn, x, m, s)
        if k == 1 or m.sigma[t] == 0.0:
            if k != 1:
                raise ValueError("a step of order > 1 cannot end at sigma = 0; end the grid at t > 0")
            x = _first_order(x, x0_s, m, s, t)
        else:
            h = m.lam[t] - m.lam[s]
            phi1 = expm1(-h)
            s1 = s + 1
            r1 = (m.lam[s1] - m.lam[s]) / h
            # intermediate state at s1, first order from s
            x_s1 = (m.sigma[s1] / m.sigma[s]) * x - m.alpha[s1] * expm1(-r1 * h) * x0_s
            x0_s1 = _data_prediction(model_fn, x_s1, m, s1)
            if k == 2:
                x = (m.sigma[t] / m.sigma[s]) * x - m.alpha[t] * phi1 * (x0_s + (x0_s1 - x0_s) / (2 * r1))
            else:
                s2 = s + 2
                r2 = (m.lam[s2] - m.lam[s]) / h
                phi12 = expm1(-r2 * h)
                phi22 = phi12 / (r2 * h) + 1
                # intermediate state at s2, second order from s and s1
                x_s2 = (
                    (m.sigma[s2] / m.sigma[s]) * x
                    - m.alpha[s2] * phi12 * x0_s
                    + (r2 / r1) * m.alpha[s2] * phi22 * (x0_s1 - x0_s)
                )
                x0_s2 = _data_prediction(model_fn, x_s2, m, s2)
                phi2 = phi1 / h + 1
                x = (
                    (m.sigma[t] / m.sigma[s]) * x
                    - m.alpha[t] * phi1 * x0_s
                    + (1 / r2) * m.alpha[t] * phi2 * (x0_s2 - x0_s)
                )
        s = t
        if callback is not None:
            callback(step, m.t[t], x)
    return x


def sample(
    model_fn: ModelFn,
    x: Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int = 50,
    solver: str = "dpm++2m",
    grid: str = "time",
    t_end: float = 1e-3,
    callback: Callback | None = None,
) -> Tensor:
    """Integrate from t = 1 to t_end with a named solver on a named grid.

    Args:
        steps: model evaluations (for "dpm++3s", the released "fast" order-3 schedule; for the
            others one evaluation per step).
        solver: "dpm++2m" (default), "dpm++3s" (the released sampler) or "ddim".
        grid: "time" (uniform in t, as released) or "logsnr" (uniform in lambda).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: expected one of {SOLVERS}")
    ts = time_grid(schedule, steps, grid, 1.0, t_end)
    if solver == "dpm++3s":
        return sample_dpmpp_singlestep(model_fn, x, ts, schedule, official_orders(steps), callback=callback)
    if solver == "ddim":
        return sample_ddim(model_fn, x, ts, schedule, callback=callback)
    return sample_dpmpp_2m(model_fn, x, ts, schedule, callback=callback)
