"""The multi-modal U-ViT: shapes, layouts, precision, checkpointing, resizing and bad inputs."""

import dataclasses
import re

import pytest
import torch
from conftest import random_inputs

from unidiffuser.network import PRESETS, UViT, UViTConfig, image, label, preset, sequence, vector


def test_every_output_has_its_input_shape(tiny):
    inputs, times = random_inputs(tiny.config, 3)
    out = tiny(inputs, times)
    assert set(out) == {"img", "clip_img", "text"}  # the label is not an output
    for name, y in out.items():
        assert y.shape == inputs[name].shape and y.dtype == torch.float32


def test_tokens_see_each_other(tiny):
    """Changing the text changes the image prediction: one attention over all modalities."""
    inputs, times = random_inputs(tiny.config, 2)
    a = tiny(inputs, times)["img"]
    b = tiny({**inputs, "text": inputs["text"] + 1}, times)["img"]
    assert (a - b).abs().max() > 1e-4
    c = tiny(inputs, {**times, "text": times["text"] * 0.5})["img"]
    assert (a - c).abs().max() > 1e-4


def test_batch_rows_are_independent(tiny):
    inputs, times = random_inputs(tiny.config, 4)
    full = tiny(inputs, times)
    one = tiny({k: v[2:3] for k, v in inputs.items()}, {k: v[2:3] for k, v in times.items()})
    for name in full:
        torch.testing.assert_close(full[name][2:3], one[name], rtol=1e-5, atol=1e-5)


def test_pre_norm_block_and_generic_layout():
    cfg = UViTConfig(
        (vector("a", 3, "g1"), sequence("b", 5, 2, "g2"), image("c", 1, 4, 6, "g3"), label("d", 3)),
        ("g1", "g2", "g3"),
        width=32,
        depth=2,
        num_heads=2,
        norm="pre",
    )
    model = UViT(cfg)
    assert cfg.num_tokens == 3 + 1 + 5 + 6 + 1
    assert model.in_blocks[0].norm1 is None and model.out_blocks[0].norm1 is None
    inputs, times = random_inputs(cfg, 2)
    out = model(inputs, times)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"a": (2, 3), "b": (2, 5, 2), "c": (2, 1, 4, 6)}


def test_post_norm_matches_the_released_block_structure(tiny):
    assert tiny.in_blocks[0].norm1 is None and tiny.in_blocks[0].skip_linear is None
    assert tiny.out_blocks[0].norm1 is not None and tiny.out_blocks[0].skip_linear.in_features == 128
    assert tiny.in_blocks[0].attn.qkv.bias is None


@pytest.mark.parametrize("size", [(12, 12), (8, 12), (6, 10)])
def test_other_latent_sizes(tiny, size):
    inputs, times = random_inputs(tiny.config, 2, sizes={"img": size})
    out = tiny(inputs, times)
    assert out["img"].shape == (2, 4, *size)


def test_trained_size_leaves_position_embeddings_untouched(tiny):
    from unidiffuser.network import resize_patch_pos_embed

    pos = torch.randn(1, 16, 8)
    assert resize_patch_pos_embed(pos, (4, 4), (4, 4)) is pos
    up = resize_patch_pos_embed(pos, (4, 4), (8, 8))
    # bilinear, align_corners=False: a 2x upsampling averages to the same mean per channel
    torch.testing.assert_close(up.mean(1), pos.mean(1), rtol=1e-4, atol=1e-4)


def test_bf16_weights_and_autocast_run(tiny):
    inputs, times = random_inputs(tiny.config, 2)
    ref = tiny(inputs, times)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = tiny(inputs, times)
    low = UViT(tiny.config).eval()
    low.load_state_dict(tiny.state_dict())
    low.to(torch.bfloat16)
    half = low(inputs, times)
    for name in ref:
        assert auto[name].dtype == torch.float32 and half[name].dtype == torch.float32
        for y in (auto[name], half[name]):
            assert ((y - ref[name]).norm() / ref[name].norm()).item() < 0.05


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = UViT(PRESETS["tiny"]).train()
    inputs, times = random_inputs(model.config, 2)

    def grads():
        model.zero_grad()
        sum(v.square().mean() for v in model(inputs, times).values()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing = True
    ckpt = grads()
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(model.parameters())) - 0
    for n in plain:
        torch.testing.assert_close(plain[n], ckpt[n], rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_gives_identical_outputs(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    save_file(tiny.state_dict(), tmp_path / "w.safetensors")
    again = UViT(UViTConfig.from_dict(tiny.config.to_dict())).eval()
    again.load_state_dict(load_file(tmp_path / "w.safetensors"), strict=True)
    inputs, times = random_inputs(tiny.config, 2)
    a, b = tiny(inputs, times), again(inputs, times)
    for name in a:
        assert torch.equal(a[name], b[name])
    assert again.config == tiny.config


def test_config_is_frozen_and_validated():
    cfg = preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.width = 3
    with pytest.raises(ValueError, match="width=65 is not divisible by num_heads=4"):
        dataclasses.replace(cfg, width=65)
    with pytest.raises(ValueError, match="depth=3 must be even"):
        dataclasses.replace(cfg, depth=3)
    with pytest.raises(ValueError, match="norm='mid'"):
        dataclasses.replace(cfg, norm="mid")
    with pytest.raises(ValueError, match="every group needs"):
        dataclasses.replace(cfg, groups=("image", "text", "audio"))
    with pytest.raises(ValueError, match="not divisible by patch_size=2"):
        image("x", 4, 7, 8, "g")
    with pytest.raises(ValueError, match="kind='audio'"):
        UViTConfig.from_dict({**cfg.to_dict(), "modalities": [{"name": "a", "kind": "audio", "shape": [1]}]})
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")
    # numbers of the wrong kind are refused here, not met as a ZeroDivisionError or an empty layer
    for field, value, message in [
        ("num_heads", 0, "num_heads=0: expected a whole number >= 1"),
        ("width", 0, "width=0: expected a whole number >= 1"),
        ("width", 64.0, "width=64.0: expected a whole number"),
        ("mlp_ratio", 0, "mlp_ratio=0: expected a number > 0"),
        ("qkv_bias", "yes", "qkv_bias='yes': expected true or false"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            dataclasses.replace(cfg, **{field: value})
    with pytest.raises(ValueError, match=r"patch_size=0: expected a whole number >= 1"):
        image("x", 4, 8, 8, "g", patch_size=0)
    with pytest.raises(ValueError, match=r"shape=\(4, 8.0, 8\): expected whole numbers >= 1"):
        image("x", 4, 8.0, 8, "g")
    with pytest.raises(ValueError, match=r"not a network config \(KeyError: 'groups'\)"):
        UViTConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "groups"})


BAD = [
    (
        lambda i, t: ({k: v for k, v in i.items() if k != "text"}, t),
        r"inputs: got modalities .*expected exactly",
    ),
    (lambda i, t: ({**i, "txt": i["text"]}, t), r"inputs: got modalities"),
    (lambda i, t: (i, {"image": t["image"]}), r"timesteps: got groups \['image'\], expected exactly"),
    (lambda i, t: ({**i, "img": i["img"][:, :3]}, t), r"inputs\['img'\]: expected shape \(batch, 4, H, W\)"),
    (
        lambda i, t: ({**i, "img": i["img"][..., :7]}, t),
        r"inputs\['img'\].*multiples of 2, got \(2, 4, 8, 7\)",
    ),
    (lambda i, t: ({**i, "text": i["text"][:, :5]}, t), r"inputs\['text'\]: expected shape \(batch, 8, 8\)"),
    (
        lambda i, t: ({**i, "clip_img": i["clip_img"].long()}, t),
        r"inputs\['clip_img'\]: expected a floating dtype",
    ),
    (
        lambda i, t: ({**i, "data_type": i["data_type"].float()}, t),
        r"inputs\['data_type'\]: a label needs an integer",
    ),
    (
        lambda i, t: ({**i, "data_type": i["data_type"] + 5}, t),
        r"inputs\['data_type'\]: values must lie in \[0, 1\]",
    ),
    (
        lambda i, t: ({**i, "text": i["text"][:1]}, t),
        r"inputs: batch sizes differ between modalities: \{'text': 1, 'clip_img': 2",
    ),
    (lambda i, t: ({**i, "img": i["img"] * float("nan")}, t), r"inputs\['img'\]: contains NaN"),
    (
        lambda i, t: (i, {**t, "text": t["text"] + 2000}),
        r"timesteps\['text'\]: values must lie in \[0, 1000\]",
    ),
    (lambda i, t: (i, {**t, "text": -t["text"] - 1}), r"timesteps\['text'\]: values must lie"),
    (
        lambda i, t: (i, {**t, "image": torch.zeros(3)}),
        r"timesteps\['image'\]: expected a tensor of shape \(2,\)",
    ),
    (
        lambda i, t: (i, {**t, "image": 5.0}),
        r"timesteps\['image'\]: expected a tensor of shape \(2,\), got float",
    ),
    (lambda i, t: ({**i, "img": [1, 2]}, t), r"inputs\['img'\]: expected a torch.Tensor, got list"),
]


@pytest.mark.parametrize(("corrupt", "message"), BAD)
def test_bad_inputs_name_the_argument(tiny, corrupt, message):
    inputs, times = random_inputs(tiny.config, 2)
    bad_inputs, bad_times = corrupt(inputs, times)
    with pytest.raises(ValueError, match=message):
        tiny(bad_inputs, bad_times)
