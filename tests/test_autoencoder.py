"""The KL autoencoder wrapper, its latent-diffusion key map, and the image helpers feeding it."""

import re

import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from PIL import Image

from unidiffuser.components.autoencoder import (
    SD_KL_F8,
    TINY,
    AutoencoderConfig,
    ImageAutoencoder,
    ldm_to_diffusers_vae,
)
from unidiffuser.components.images import load_image, make_grid, to_pil, to_tensor

ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def diffusers_to_ldm(state_dict, num_levels):
    """The inverse renaming, written independently of the library's map, to fabricate LDM files."""
    out = {}
    n = num_levels
    for key, value in state_dict.items():
        k = key
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.(\d+)\.", r"down.\1.block.\2.", k)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
        k = re.sub(
            r"up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"up.{n - 1 - int(m[1])}.block.{m[2]}.", k
        )
        k = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{n - 1 - int(m[1])}.upsample.", k)
        k = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
        k = re.sub(
            r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
            lambda m: f"mid.attn_1.{ATTENTION_TO_LDM[m[1]]}.",
            k,
        )
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if re.fullmatch(r".*mid\.attn_1\.(q|k|v|proj_out)\.weight", k):
            value = value[:, :, None, None]  # LDM stores them as 1x1 convolutions
        out[k] = value.clone()
    return out


@pytest.fixture(scope="module")
def tiny_ae():
    return ImageAutoencoder.random(TINY, seed=0)


@pytest.fixture(scope="module")
def ldm_state(tiny_ae):
    ldm = diffusers_to_ldm(tiny_ae.vae.state_dict(), len(TINY.block_out_channels))
    # what a training checkpoint adds: discriminator, LPIPS and the learned log-variance
    ldm["loss.logvar"] = torch.zeros(())
    ldm["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    ldm["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(8, 3, 3, 3)
    return ldm


def pixels(batch, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=g) * 2 - 1


# -- the LDM key map -----------------------------------------------------------------------------


def test_ldm_layout_looks_like_the_release(ldm_state):
    # the released names: reversed decoder levels, nin_shortcut, 1x1-conv attention weights
    assert "encoder.down.1.block.0.nin_shortcut.weight" in ldm_state
    assert "decoder.up.0.block.0.nin_shortcut.weight" in ldm_state  # up.0 is the full-size level
    assert (
        "decoder.up.3.upsample.conv.weight" in ldm_state
        and "decoder.up.0.upsample.conv.weight" not in ldm_state
    )
    assert ldm_state["encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert "decoder.mid.block_2.conv2.bias" in ldm_state and "quant_conv.weight" in ldm_state


def test_ldm_map_matches_diffusers_converter(tiny_ae, ldm_state):
    ours = ldm_to_diffusers_vae(ldm_state)
    theirs = convert_ldm_vae_checkpoint(dict(ldm_state), TINY.diffusers_config())
    reference = tiny_ae.vae.state_dict()
    assert set(ours) == set(theirs) == set(reference)
    for key, value in reference.items():
        assert ours[key].shape == value.shape, key
        assert torch.equal(ours[key], theirs[key]), key
        assert torch.equal(ours[key], value), key


def test_ldm_load_decodes_like_diffusers_conversion(tiny_ae, ldm_state):
    ours = ImageAutoencoder.from_ldm_state_dict(ldm_state, TINY)
    theirs = ImageAutoencoder.from_diffusers_state_dict(
        convert_ldm_vae_checkpoint(dict(ldm_state), TINY.diffusers_config()), TINY
    )
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b, ref = ours.decode(z), theirs.decode(z), tiny_ae.decode(z)
    assert torch.equal(a, b) and torch.equal(a, ref)
    assert a.std() > 0.01  # the comparison is not between constants


def test_ldm_prefix_of_a_whole_checkpoint_is_stripped(tiny_ae, ldm_state):
    whole = {f"first_stage_model.{k}": v for k, v in ldm_state.items()}
    whole["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(3)
    assert set(ldm_to_diffusers_vae(whole)) == set(tiny_ae.vae.state_dict())


def test_strict_errors(ldm_state, tiny_ae):
    truncated = {k: v for k, v in ldm_state.items() if "decoder.mid.attn_1" not in k}
    with pytest.raises(
        ValueError, match=r"latent-diffusion \(LDM\) layout.*missing.*decoder\.mid_block\.attentions"
    ):
        ImageAutoencoder.from_ldm_state_dict(truncated, TINY)
    extra = {**ldm_state, "encoder.down.0.block.9.norm1.weight": torch.zeros(8)}
    with pytest.raises(ValueError, match=r"unexpected.*encoder\.down_blocks\.0\.resnets\.9"):
        ImageAutoencoder.from_ldm_state_dict(extra, TINY)
    diffusers_names = tiny_ae.vae.state_dict()
    with pytest.raises(ValueError, match="from_diffusers_state_dict"):
        ImageAutoencoder.from_ldm_state_dict(diffusers_names, TINY)
    with pytest.raises(ValueError, match=r"diffusers AutoencoderKL layout.*from_ldm_state_dict"):
        ImageAutoencoder.from_diffusers_state_dict(ldm_state, TINY)
    with pytest.raises(ValueError, match="shape mismatch"):
        ImageAutoencoder.from_ldm_state_dict(
            ldm_state, AutoencoderConfig((8, 16, 16, 16), norm_num_groups=8, latent_channels=2)
        )


def test_presets():
    assert SD_KL_F8.downsample == 8 and TINY.downsample == 8
    cfg = SD_KL_F8.diffusers_config()
    assert cfg["block_out_channels"] == [128, 256, 512, 512] and cfg["layers_per_block"] == 2
    assert cfg["latent_channels"] == 4 and cfg["norm_num_groups"] == 32 and cfg["scaling_factor"] == 0.18215
    assert AutoencoderConfig.from_diffusers_config(cfg) == SD_KL_F8
    assert AutoencoderConfig.coerce(SD_KL_F8.to_dict()) == SD_KL_F8
    built = ImageAutoencoder(TINY)
    assert AutoencoderConfig.coerce(dict(built.vae.config)) == TINY  # diffusers' own saved config
    with pytest.raises(ValueError, match="shift_factor"):
        AutoencoderConfig.from_diffusers_config({**cfg, "shift_factor": 0.1159})
    with pytest.raises(ValueError, match="norm_num_groups=32"):
        AutoencoderConfig((8, 16), norm_num_groups=32)


# -- encode and decode ---------------------------------------------------------------------------


def test_frozen(tiny_ae):
    assert not any(p.requires_grad for p in tiny_ae.parameters())
    tiny_ae.train()
    assert not tiny_ae.training and not tiny_ae.vae.training


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_shapes(tiny_ae, size):
    h, w = size
    with torch.no_grad():
        z = tiny_ae.encode(pixels(2, h, w), generator=torch.Generator().manual_seed(0))
        x = tiny_ae.decode(z)
    assert z.shape == (2, 4, h // 8, w // 8)
    assert x.shape == (2, 3, h, w) and x.min() >= -1 and x.max() <= 1


def test_posterior_is_sampled_and_seeded(tiny_ae):
    x = pixels(2, 64, 64)
    with torch.no_grad():
        a = tiny_ae.encode(x, generator=torch.Generator().manual_seed(7))
        b = tiny_ae.encode(x, generator=torch.Generator().manual_seed(7))
        c = tiny_ae.encode(x, generator=torch.Generator().manual_seed(8))
        moments = tiny_ae.moments(x)
    assert moments.shape == (2, 8, 8, 8)
    mean, logvar = moments.chunk(2, dim=1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert (a - 0.18215 * mean).abs().mean() > 1e-3  # a sample, not the mean
    # exactly scale * (mean + std * noise), the noise drawn from the CPU generator
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    expected = 0.18215 * (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise)
    torch.testing.assert_close(a, expected, rtol=0, atol=1e-6)


def test_moments_then_sample_equals_encode(tiny_ae):
    x = pixels(3, 64, 96, seed=1)
    with torch.no_grad():
        direct = tiny_ae.encode(x, generator=torch.Generator().manual_seed(11))
        two_steps = tiny_ae.sample_moments(tiny_ae.moments(x), generator=torch.Generator().manual_seed(11))
    assert torch.equal(direct, two_steps)


def test_matches_diffusers_own_encode_and_decode(tiny_ae):
    x = pixels(2, 64, 64, seed=2)
    with torch.no_grad():
        ours = tiny_ae.encode(x, generator=torch.Generator().manual_seed(5))
        dist = tiny_ae.vae.encode(x).latent_dist
        theirs = dist.sample(generator=torch.Generator().manual_seed(5)) * 0.18215
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        torch.testing.assert_close(tiny_ae.moments(x), dist.parameters, rtol=0, atol=0)
        z = ours
        torch.testing.assert_close(
            tiny_ae.decode(z), tiny_ae.vae.decode(z / 0.18215).sample.clamp(-1, 1), rtol=0, atol=0
        )


def test_bad_pixels(tiny_ae):
    with pytest.raises(ValueError, match="multiple of 8"):
        tiny_ae.encode(pixels(1, 60, 64))
    with pytest.raises(ValueError, match=r"expected \[-1, 1\]"):
        tiny_ae.encode(pixels(1, 64, 64) * 127.5 + 127.5)
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        tiny_ae.decode(torch.zeros(1, 3, 8, 8))


def test_safetensors_round_trip(tiny_ae, tmp_path):
    path = tmp_path / "vae.safetensors"
    tiny_ae.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae.safetensors"]  # no temporary left
    loaded = ImageAutoencoder.load(path)
    assert loaded.config == TINY
    x = pixels(1, 64, 64, seed=4)
    with torch.no_grad():
        assert torch.equal(
            loaded.encode(x, generator=torch.Generator().manual_seed(1)),
            tiny_ae.encode(x, generator=torch.Generator().manual_seed(1)),
        )
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        assert torch.equal(loaded.decode(z), tiny_ae.decode(z))
    with pytest.raises(ValueError, match="not found"):
        ImageAutoencoder.load(tmp_path / "missing.safetensors")


# -- the image helpers that prepare the autoencoder's input --------------------------------------


def test_to_tensor_and_back_is_exact_at_the_same_size():
    array = np.random.default_rng(0).integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
    t = to_tensor([Image.fromarray(array)], (24, 40))
    assert t.shape == (1, 3, 24, 40) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1
    assert np.array_equal(np.asarray(to_pil(t)[0]), array)


def test_to_tensor_resizes_the_shortest_side_then_center_crops():
    # a 100x50 (w x h) picture: left fifth red, middle three fifths green, right fifth blue
    array = np.zeros((50, 100, 3), dtype=np.uint8)
    array[:, :20, 0] = 255
    array[:, 20:80, 1] = 255
    array[:, 80:, 2] = 255
    t = to_tensor([Image.fromarray(array)], (16, 16))  # 100x50 -> 32x16 -> the central 16x16
    assert t.shape == (1, 3, 16, 16)
    assert torch.allclose(t[0, 1], torch.ones(16, 16), atol=0.02)  # all green
    assert (t[0, 0] < -0.95).all() and (t[0, 2] < -0.95).all()
    wide = to_tensor([Image.fromarray(array)], (8, 24))  # covers a non-square size too
    assert wide.shape == (1, 3, 8, 24)


def test_load_image_conversions(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # transparent -> white
    out = np.asarray(load_image(rgba))
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [255, 0, 0]
    grey = load_image(Image.new("L", (3, 3), 77))
    assert grey.mode == "RGB" and np.asarray(grey)[0, 0].tolist() == [77, 77, 77]
    palette = Image.new("RGB", (3, 3), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert palette.mode == "P" and np.asarray(load_image(palette))[0, 0].tolist() == [10, 200, 30]
    palette.info["transparency"] = palette.getpixel((0, 0))  # a transparent colour -> white
    assert np.asarray(load_image(palette))[0, 0].tolist() == [255, 255, 255]
    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    path = tmp_path / "deep.png"
    sixteen.save(path)
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 128, 255]


def test_load_image_errors(tmp_path):
    path = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.png"):
        load_image(path)
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ValueError, match=r"text\.jpg.*truncated or corrupt"):
        load_image(tmp_path / "text.jpg")
    with pytest.raises(ValueError, match="not found"):
        load_image(tmp_path / "nothing.png")


def test_make_grid():
    tiles = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    plain = make_grid(tiles, columns=2)
    captioned = make_grid(tiles, ["a very long caption that must wrap over lines", "b", ""], columns=2)
    assert plain.size == (2 * 36 + 4, 2 * 36 + 4)
    assert captioned.width == plain.width and captioned.height > plain.height + 20  # several lines
    pixels_ = np.asarray(captioned)
    assert (pixels_ < 100).all(axis=-1).any()  # black text was drawn
    with pytest.raises(ValueError, match="captions"):
        make_grid(tiles, ["only one"])
