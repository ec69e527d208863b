"""The UniDiffuser loss: independent uniform timesteps per group, noise targets, weighting."""

import pytest
import torch
from conftest import random_inputs

from unidiffuser.network import PRESETS, UViT
from unidiffuser.objective import unidiffuser_loss
from unidiffuser.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule()


class Zero(UViT):
    """Predicts zero noise and records what it was fed."""

    def forward(self, inputs, timesteps):
        self.seen = (inputs, timesteps)
        super().check_inputs(inputs, timesteps)
        return {m.name: torch.zeros_like(inputs[m.name]) for m in self.config.diffused}


@pytest.fixture(scope="module")
def recorded():
    model = Zero(PRESETS["tiny"])
    n = 20_000
    batch, _ = random_inputs(model.config, n)
    clean = {k: (torch.zeros_like(v) if v.is_floating_point() else v) for k, v in batch.items()}
    loss, parts = unidiffuser_loss(model, SCHEDULE, clean, generator=torch.Generator().manual_seed(0))
    return model, loss, parts, n


def test_timesteps_are_uniform_integers_drawn_independently_per_group(recorded):
    model, _, _, n = recorded
    t_img, t_text = model.seen[1]["image"], model.seen[1]["text"]
    for t in (t_img, t_text):
        assert torch.equal(t, t.round()) and t.min() >= 1 and t.max() <= 1000
        # uniform on 1..1000: mean 500.5, sd 288.7 / sqrt(n) = 2.0; 4 sd of slack
        assert abs(t.mean().item() - 500.5) < 8.2
        assert abs(t.std().item() - 288.7) < 5
    r = torch.corrcoef(torch.stack([t_img, t_text]))[0, 1].item()
    assert abs(r) < 4 / n**0.5  # independent groups: correlation within 4 sd of 0
    assert (t_img == t_text).float().mean() < 0.01


def test_each_modality_gets_its_own_unit_noise_scaled_by_its_groups_sigma(recorded):
    model, _, parts, _ = recorded
    inputs, times = model.seen
    eps = {}
    for name, group in (("img", "image"), ("clip_img", "image"), ("text", "text")):
        sigma = SCHEDULE.sigma(times[group].double() / 1000).float()  # clean data is 0: x_t = sigma_t eps
        x = inputs[name]
        eps[name] = x / sigma.view(-1, *([1] * (x.ndim - 1)))
        assert abs(eps[name].mean().item()) < 0.01 and abs(eps[name].std().item() - 1) < 0.01
        # a zero prediction's loss is the mean squared target: the target is this noise
        torch.testing.assert_close(parts[name], eps[name].square().mean(), rtol=1e-3, atol=1e-4)
    # noises of two modalities in one group are independent
    r = torch.corrcoef(torch.stack([eps["clip_img"][:, 0], eps["img"][:, 0, 0, 0]]))[0, 1].item()
    assert abs(r) < 0.03


def test_weightings(tiny):
    batch, _ = random_inputs(tiny.config, 4)
    total, parts = unidiffuser_loss(tiny, SCHEDULE, batch, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(total, sum(parts.values()))
    weighted, _ = unidiffuser_loss(
        tiny, SCHEDULE, batch, weights={"text": 3.0}, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(weighted, total + 2 * parts["text"])
    element, same = unidiffuser_loss(
        tiny, SCHEDULE, batch, weighting="element", generator=torch.Generator().manual_seed(1)
    )
    numel = {"img": 256, "clip_img": 16, "text": 64}
    expect = sum(parts[k] * numel[k] for k in numel) / sum(numel.values())
    torch.testing.assert_close(element, expect)
    assert all(torch.equal(parts[k], same[k]) for k in parts)


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    model = UViT(PRESETS["tiny"])
    batch, _ = random_inputs(model.config, 4)
    loss, _ = unidiffuser_loss(model, SCHEDULE, batch)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


class Spoiler(UViT):
    """Predicts zero noise, except a huge value wherever its group was given clean (t = 0)."""

    def forward(self, inputs, timesteps):
        self.seen = ({k: v.clone() for k, v in inputs.items()}, timesteps)
        out = {}
        for m in self.config.diffused:
            clean = (timesteps[m.group] == 0).view(-1, *([1] * (inputs[m.name].ndim - 1)))
            out[m.name] = torch.where(clean, 1e6, 0.0).expand_as(inputs[m.name]).clone()
        return out


@pytest.fixture(scope="module")
def clean_run():
    model = Spoiler(PRESETS["tiny"])
    n = 20_000
    batch, _ = random_inputs(model.config, n)
    loss, parts = unidiffuser_loss(
        model, SCHEDULE, batch, generator=torch.Generator().manual_seed(2), clean_prob=0.6
    )
    return model, batch, loss, parts, n


def test_clean_prob_gives_one_group_clean_in_that_share_of_examples(clean_run):
    model, batch, _, _, _ = clean_run
    inputs, times = model.seen
    clean = {g: times[g] == 0 for g in ("image", "text")}
    assert not (clean["image"] & clean["text"]).any()  # never both: something is always learned
    for g in clean:  # each group clean in 0.6 / 2 of the examples: sd sqrt(0.3 * 0.7 / n) = 0.0032
        assert abs(clean[g].float().mean().item() - 0.3) < 0.014
        rest = times[g][~clean[g]]  # the others keep the paper's uniform draw on 1..1000
        assert rest.min() >= 1 and rest.max() <= 1000 and abs(rest.mean().item() - 500.5) < 10
    for name, group in (("img", "image"), ("clip_img", "image"), ("text", "text")):
        assert torch.equal(inputs[name][clean[group]], batch[name][clean[group]])  # no noise at all
        noised = ~clean[group]
        assert not torch.isclose(inputs[name][noised], batch[name][noised]).all()


def test_clean_modalities_carry_no_loss(clean_run):
    # The spoiler's 1e6 predictions on clean examples would dominate the loss if they counted; on
    # the rest it predicts 0, so each part is the mean squared noise of the diffused examples.
    _, _, loss, parts, _ = clean_run
    for name in ("img", "clip_img", "text"):
        assert abs(parts[name].item() - 1.0) < 0.02
    torch.testing.assert_close(loss, sum(parts.values()))
    element, _ = unidiffuser_loss(
        Spoiler(PRESETS["tiny"]),
        SCHEDULE,
        random_inputs(PRESETS["tiny"], 2000)[0],
        weighting="element",
        generator=torch.Generator().manual_seed(3),
        clean_prob=0.9,
    )
    assert abs(element.item() - 1.0) < 0.05


def test_clean_prob_zero_is_the_paper_objective(tiny):
    batch, _ = random_inputs(tiny.config, 8)
    plain = unidiffuser_loss(tiny, SCHEDULE, batch, generator=torch.Generator().manual_seed(4))
    zero = unidiffuser_loss(tiny, SCHEDULE, batch, generator=torch.Generator().manual_seed(4), clean_prob=0.0)
    assert torch.equal(plain[0], zero[0])


def _snr_weight(times: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR at the network's timesteps, computed apart from the objective."""
    alphabar = SCHEDULE.alphas_cumprod[times.long() - 1]  # step n is alphabar_n
    snr = alphabar / (1 - alphabar)
    return (snr.clamp(max=gamma) / snr).float()


def test_snr_gamma_weighs_each_example_by_its_groups_min_snr(tiny):
    """With a zero prediction of clean zero data the error of each example is its own noise; the
    loss must be each modality's mean of (weight x mean squared noise), the weight read at the
    example's group timestep from the schedule's alphabar, and the logged parts stay unweighted."""
    model = Zero(PRESETS["tiny"])
    batch, _ = random_inputs(model.config, 512)
    clean = {k: (torch.zeros_like(v) if v.is_floating_point() else v) for k, v in batch.items()}
    loss, parts = unidiffuser_loss(
        model, SCHEDULE, clean, generator=torch.Generator().manual_seed(5), snr_gamma=5.0
    )
    inputs, times = model.seen
    expected, plain = 0.0, {}
    for name, group in (("img", "image"), ("clip_img", "image"), ("text", "text")):
        sigma = SCHEDULE.sigma(times[group].double() / 1000).float()
        noise = inputs[name] / sigma.view(-1, *([1] * (inputs[name].ndim - 1)))
        per_example = noise.square().flatten(1).mean(1)
        weight = _snr_weight(times[group], 5.0)
        assert weight.min() < 0.1 and weight.max() == 1.0  # both ends of the weight were drawn
        expected += (weight * per_example).mean()
        plain[name] = per_example.mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    for name in plain:
        torch.testing.assert_close(parts[name], plain[name], rtol=1e-4, atol=1e-6)
    assert loss < 0.95 * sum(parts.values())  # the weighting took something off


def test_snr_gamma_above_every_snr_is_the_plain_loss_and_clean_groups_stay_out(tiny):
    batch, _ = random_inputs(tiny.config, 16)
    plain = unidiffuser_loss(tiny, SCHEDULE, batch, generator=torch.Generator().manual_seed(6))
    big = unidiffuser_loss(tiny, SCHEDULE, batch, generator=torch.Generator().manual_seed(6), snr_gamma=1e9)
    torch.testing.assert_close(big[0], plain[0])
    # clean groups (SNR infinite) get weight 0 and no loss: the spoiler's 1e6 stays out, no NaN
    loss, parts = unidiffuser_loss(
        Spoiler(PRESETS["tiny"]),
        SCHEDULE,
        random_inputs(PRESETS["tiny"], 4000)[0],
        generator=torch.Generator().manual_seed(7),
        clean_prob=0.6,
        snr_gamma=5.0,
    )
    assert (
        torch.isfinite(loss) and loss < sum(parts.values()) and all(abs(v - 1) < 0.05 for v in parts.values())
    )


def test_bad_loss_arguments(tiny):
    batch, _ = random_inputs(tiny.config, 2)
    with pytest.raises(ValueError, match="weighting='tokens'"):
        unidiffuser_loss(tiny, SCHEDULE, batch, weighting="tokens")
    with pytest.raises(ValueError, match=r"weights: unknown modalities \['audio'\]"):
        unidiffuser_loss(tiny, SCHEDULE, batch, weights={"audio": 1.0})
    with pytest.raises(ValueError, match=r"batch: got modalities \['clip_img', 'data_type', 'img'\]"):
        unidiffuser_loss(tiny, SCHEDULE, {k: v for k, v in batch.items() if k != "text"})
    with pytest.raises(ValueError, match=r"inputs\['img'\]: contains NaN"):
        unidiffuser_loss(tiny, SCHEDULE, {**batch, "img": batch["img"] * float("nan")})
    with pytest.raises(ValueError, match=r"batch\['text'\]: expected a floating tensor"):
        unidiffuser_loss(tiny, SCHEDULE, {**batch, "text": batch["text"].long()})
    for share in (1.0, -0.1):
        with pytest.raises(ValueError, match=rf"clean_prob={share}: expected a share in \[0, 1\)"):
            unidiffuser_loss(tiny, SCHEDULE, batch, clean_prob=share)
    for gamma in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"snr_gamma={gamma}: expected 0 \(off\) or a positive value"):
            unidiffuser_loss(tiny, SCHEDULE, batch, snr_gamma=gamma)
