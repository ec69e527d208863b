"""Solvers on a Gaussian toy with an exact answer, and against diffusers' DPM-Solver++."""

import pytest
import torch

from unidiffuser.schedule import NoiseSchedule
from unidiffuser.solvers import (
    logsnr_grid,
    official_orders,
    sample,
    sample_ddim,
    sample_dpmpp_2m,
    sample_dpmpp_singlestep,
    time_uniform_grid,
)

SCHEDULE = NoiseSchedule()


class Gaussian:
    """x0 ~ N(mu, sd^2) per dimension: exact noise prediction and exact probability-flow ODE."""

    def __init__(self, dim=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(dim, generator=g, dtype=torch.float64)
        self.sd = 0.2 + torch.rand(dim, generator=g, dtype=torch.float64)
        self.calls = 0

    def var(self, t):
        a, s = SCHEDULE.alpha(t).item(), SCHEDULE.sigma(t).clamp_min(0).item()
        return a, s, a * a * self.sd**2 + s * s

    def eps(self, x, t):
        self.calls += 1
        a, s, v = self.var(t)
        return s * (x - a * self.mu) / v  # E[eps | x_t]

    def prior(self, n, seed=1):
        a, _, v = self.var(1.0)
        return a * self.mu + v.sqrt() * torch.randn(
            n, len(self.mu), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )

    def exact(self, x1, t):
        """The ODE is linear here: it rescales the deviation from the mean."""
        a1, _, v1 = self.var(1.0)
        a, _, v = self.var(t)
        return a * self.mu + (v / v1).sqrt() * (x1 - a1 * self.mu)


def error(solver, steps, grid="logsnr"):
    toy = Gaussian()
    x1 = toy.prior(256)
    out = sample(toy.eps, x1, SCHEDULE, steps=steps, solver=solver, grid=grid)
    ref = toy.exact(x1, 1e-3)
    assert toy.calls == steps  # one model evaluation per step counted, for every solver
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize(("solver", "order"), [("ddim", 1), ("dpm++2m", 2)])
def test_convergence_order_on_the_gaussian_toy(solver, order):
    e20, e40 = error(solver, 20), error(solver, 40)
    rate = torch.log2(torch.tensor(e20 / e40)).item()
    # the observed order of a p-th order method approaches p from either side; +-0.35 of slack
    assert abs(rate - order) < 0.35, (e20, e40, rate)


@pytest.mark.parametrize(
    ("solver", "steps", "bound"), [("dpm++2m", 40, 2e-3), ("dpm++3s", 20, 1e-3), ("ddim", 40, 0.03)]
)
def test_solvers_reach_the_exact_answer(solver, steps, bound):
    assert error(solver, steps) < bound
    assert error(solver, steps) < error(solver, 5)


def test_time_uniform_grid_is_what_the_released_sampler_uses():
    ts = time_uniform_grid(50)
    assert len(ts) == 51 and ts[0] == 1.0 and abs(ts[-1] - 1e-3) < 1e-15
    torch.testing.assert_close(ts[:-1] - ts[1:], torch.full((50,), (1 - 1e-3) / 50, dtype=torch.float64))
    lam = SCHEDULE.lambda_(logsnr_grid(SCHEDULE, 10))
    torch.testing.assert_close(
        lam[1:] - lam[:-1], torch.full((10,), (lam[-1] - lam[0]).item() / 10, dtype=torch.float64)
    )


def test_official_orders():
    assert official_orders(50) == [3] * 16 + [2]
    assert official_orders(51) == [3] * 16 + [2, 1]
    assert official_orders(52) == [3] * 17 + [1]
    assert official_orders(1) == [1] and official_orders(2) == [2] and official_orders(3) == [2, 1]
    assert all(sum(official_orders(n)) == n for n in range(1, 60))


def test_callback_sees_every_step():
    toy = Gaussian()
    seen = []
    sample(toy.eps, toy.prior(4), SCHEDULE, steps=7, callback=lambda i, t, x: seen.append((i, t, x.shape)))
    assert [s[0] for s in seen] == list(range(7)) and abs(seen[-1][1] - 1e-3) < 1e-12


def test_ddim_inversion_round_trip():
    """Running the grid backwards inverts the ODE: data -> noise -> data comes back, at first order."""
    toy = Gaussian()
    x0 = toy.exact(toy.prior(64), 1e-3)

    def round_trip(steps):
        grid = logsnr_grid(SCHEDULE, steps)
        noise = sample_ddim(toy.eps, x0, grid.flip(0), SCHEDULE)
        assert ((noise - x0).norm() / x0.norm()).item() > 0.5  # it did travel
        return ((sample_ddim(toy.eps, noise, grid, SCHEDULE) - x0).norm() / x0.norm()).item()

    e200, e400 = round_trip(200), round_trip(400)
    assert e200 < 0.01 and e400 < 0.6 * e200  # the error halves with the step: first order


def test_stepping_to_sigma_zero_returns_the_clean_prediction():
    toy = Gaussian()
    x1 = toy.prior(8)
    ts = torch.tensor([1.0, 0.0], dtype=torch.float64)
    out = sample_ddim(toy.eps, x1, ts, SCHEDULE)
    a, s, _ = toy.var(1.0)
    torch.testing.assert_close(out, (x1 - s * toy.eps(x1, 1.0)) / a)


@pytest.mark.parametrize("steps", [8, 20, 25])
def test_dpmpp_2m_matches_diffusers(steps):
    """diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint) on the same eps."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", prediction_type="epsilon",
    )  # fmt: skip
    sched.set_timesteps(steps)
    toy = Gaussian()
    x = toy.prior(16).float()
    theirs = x.clone()
    for k in sched.timesteps:
        t = (int(k) + 1) / 1000  # their index k holds alphabar_(k+1): our knot t = (k + 1) / 1000
        theirs = sched.step(toy.eps(theirs.double(), t).float(), k, theirs).prev_sample
    # the same grid for our solver, ending at sigma = 0 as diffusers' final step does
    ts = torch.tensor([(int(k) + 1) / 1000 for k in sched.timesteps] + [0.0], dtype=torch.float64)
    ours = sample_dpmpp_2m(lambda v, t: toy.eps(v.double(), t).float(), x.clone(), ts, SCHEDULE)
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5


def test_bad_arguments_are_named():
    toy = Gaussian()
    x = toy.prior(2)
    with pytest.raises(ValueError, match="steps=0: expected an integer >= 1"):
        sample(toy.eps, x, SCHEDULE, steps=0)
    with pytest.raises(ValueError, match="solver='euler'"):
        sample(toy.eps, x, SCHEDULE, solver="euler")
    with pytest.raises(ValueError, match="grid='karras'"):
        sample(toy.eps, x, SCHEDULE, grid="karras")
    with pytest.raises(ValueError, match="strictly monotone"):
        sample_ddim(toy.eps, x, torch.tensor([0.5, 0.7, 0.6]), SCHEDULE)
    with pytest.raises(ValueError, match="summing to the 4 grid intervals"):
        sample_dpmpp_singlestep(toy.eps, x, time_uniform_grid(4), SCHEDULE, [3, 3])
    with pytest.raises(ValueError, match=r"model_fn returned shape \(2, 3\)"):
        sample(lambda v, t: v[:, :3], x, SCHEDULE, steps=2)
    with pytest.raises(ValueError, match=r"t_start=1\.0, t_end=2\.0"):
        time_uniform_grid(3, 1.0, 2.0)
