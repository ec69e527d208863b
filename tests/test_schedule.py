"""The schedule: SD betas, continuous interpolation, the one time conversion."""

import pytest
import torch

from unidiffuser.schedule import NoiseSchedule, scaled_linear_betas

S = NoiseSchedule()


def test_betas_are_stable_diffusions():
    betas = scaled_linear_betas()
    assert betas.dtype == torch.float64 and len(betas) == 1000
    assert abs(betas[0].item() - 0.00085) < 1e-15 and abs(betas[-1].item() - 0.012) < 1e-15
    # the diffusers definition, computed independently
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    torch.testing.assert_close(S.alphas_cumprod.float(), ref, rtol=1e-6, atol=0)


def test_knots_carry_the_discrete_marginals():
    n = torch.tensor([1, 2, 500, 999, 1000])
    t = S.discrete_time(n)
    torch.testing.assert_close(S.alpha(t) ** 2, S.alphas_cumprod[n - 1])
    torch.testing.assert_close(S.alpha(t) ** 2 + S.sigma(t) ** 2, torch.ones(5, dtype=torch.float64))
    assert S.alpha(0.0).item() == 1.0 and S.sigma(0.0).item() == 0.0
    assert torch.isinf(S.lambda_(0.0))


def test_log_alpha_is_linear_between_knots():
    mid = S.log_alpha(torch.tensor(0.4375))  # halfway between knots 437 and 438
    expect = 0.5 * (S.knot_log_alpha[437] + S.knot_log_alpha[438])
    torch.testing.assert_close(mid, expect)


def test_inverse_lambda_round_trip():
    t = torch.linspace(1e-3, 1.0, 97, dtype=torch.float64)
    torch.testing.assert_close(S.inverse_lambda(S.lambda_(t)), t, rtol=0, atol=1e-12)
    assert (S.lambda_(t)[1:] < S.lambda_(t)[:-1]).all()


def test_the_one_time_conversion():
    assert S.network_time(torch.tensor([0.0, 0.4373, 1.0])).tolist() == pytest.approx([0.0, 437.3, 1000.0])


def test_bad_betas():
    with pytest.raises(ValueError, match="betas: expected a 1-D tensor of values in"):
        NoiseSchedule(torch.tensor([0.5, 1.5]))
