"""Our network, schedule and solver against the released implementation's outputs."""

import pytest
import torch

from unidiffuser.network import PRESETS, UViT
from unidiffuser.official import (
    config_from_official,
    from_official_keys,
    load_official_state_dict,
    to_official_keys,
)
from unidiffuser.schedule import NoiseSchedule
from unidiffuser.solvers import sample
from unidiffuser.tasks import StateLayout, generate

TOL = 1e-5


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def released(official):
    cfg = config_from_official(official["config"])
    model = UViT(cfg).eval()
    weights = {
        k.removeprefix("weights."): v for k, v in official["tensors"].items() if k.startswith("weights.")
    }
    load_official_state_dict(model, weights)
    return model, official["tensors"], weights


@pytest.mark.parametrize("size", [8, 12])
def test_forward_matches_released(released, size):
    model, t, _ = released
    g = lambda name: t[f"forward_{size}x{size}.{name}"]  # noqa: E731
    with torch.no_grad():
        out = model(
            {
                "img": g("img"),
                "clip_img": g("clip_img")[:, 0],
                "text": g("text"),
                "data_type": g("data_type"),
            },
            {"image": g("t_img"), "text": g("t_text")},
        )
    assert rel(out["img"], g("out_img")) < TOL
    assert rel(out["clip_img"], g("out_clip_img")[:, 0]) < TOL
    assert rel(out["text"], g("out_text")) < TOL


def test_schedule_betas_match_released(official):
    assert torch.equal(NoiseSchedule().betas, official["tensors"]["schedule.betas"])


@pytest.mark.parametrize("steps", [5, 10, 20, 50])
def test_solver_alone_matches_released(official, steps):
    t = official["tensors"]
    a = t["sample.fn.A"]

    def eps(x, time):
        return torch.tanh(x @ a.T) * (1 + time) + 0.3 * x * time

    out = sample(eps, t["sample.fn.x_T"], NoiseSchedule(), steps=steps, solver="dpm++3s")
    assert rel(out, t[f"sample.fn.steps{steps}"]) < TOL


def _layouts(model, names):
    cfg = model.config
    shapes = {m.name: m.shape for m in cfg.diffused}
    released_order = StateLayout([cfg.modality(n) for n in names], shapes)
    return released_order, shapes


@pytest.mark.parametrize("steps", [10, 25, 50])
def test_joint_sampling_matches_released(released, steps):
    model, t, _ = released
    theirs, shapes = _layouts(model, ("img", "clip_img", "text"))
    x_T = theirs.unpack(t["sample.joint.x_T"])
    ours = StateLayout([model.config.modality(n) for n in ("clip_img", "img", "text")], shapes)
    out = generate(
        model, NoiseSchedule(), "joint", batch_size=2, labels={"data_type": 1}, steps=steps,
        solver="dpm++3s", x_T=ours.pack(x_T),
    )  # fmt: skip
    assert rel(theirs.pack(out), t[f"sample.joint.steps{steps}"]) < TOL


def test_t2i_sampling_matches_released(released):
    model, t, _ = released
    theirs, shapes = _layouts(model, ("img", "clip_img"))
    ours = StateLayout([model.config.modality(n) for n in ("clip_img", "img")], shapes)
    out = generate(
        model, NoiseSchedule(), "t2i", given={"text": t["sample.t2i.cond_text"]}, labels={"data_type": 1},
        steps=20, solver="dpm++3s", x_T=ours.pack(theirs.unpack(t["sample.t2i.x_T"])),
    )  # fmt: skip
    assert rel(theirs.pack(out), t["sample.t2i.steps20"]) < TOL


def test_key_map_round_trip_and_strict_errors(released):
    model, _, weights = released
    assert to_official_keys(from_official_keys(weights)).keys() == weights.keys()
    assert set(to_official_keys(model.state_dict())) == set(weights)
    broken = dict(weights)
    broken.pop("out_blocks.1.norm1.weight")
    broken["extra.weight"] = torch.zeros(1)
    with pytest.raises(
        ValueError, match=r"missing \['out_blocks.1.norm1.weight'\].*unexpected \['extra.weight'\]"
    ):
        load_official_state_dict(UViT(model.config), broken)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_official_state_dict(UViT(model.config), {**weights, "pos_embed": torch.zeros(1, 3, 64)})
    # a "module." prefix (as in DataParallel checkpoints) is accepted
    load_official_state_dict(UViT(model.config), {f"module.{k}": v for k, v in weights.items()})


@pytest.mark.parametrize(
    ("name", "count", "tokens"),
    [("unidiffuser-v1", 952_509_520, 1105), ("unidiffuser-v0", 952_504_912, 1104)],
)
def test_released_presets_have_exact_sizes(name, count, tokens):
    with torch.device("meta"):
        model = UViT(PRESETS[name])
    assert model.num_parameters() == count
    assert PRESETS[name].num_tokens == tokens
    released = to_official_keys(model.state_dict())
    assert released["pos_embed"].shape == (1, tokens - (name == "unidiffuser-v1"), 1536)
    assert released["in_blocks.14.attn.qkv.weight"].shape == (3 * 1536, 1536)
    assert "in_blocks.15.attn.qkv.weight" not in released and "out_blocks.14.skip_linear.weight" in released
