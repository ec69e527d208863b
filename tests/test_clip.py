"""The frozen CLIP wrappers: preprocessing parity with transformers, shapes, padding, loading."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

from unidiffuser.components.clip import (
    CLIP_MEAN,
    CLIP_STD,
    TINY_TEXT,
    TINY_VISION,
    VIT_B_32,
    VIT_L_14_TEXT,
    ClipImageEmbedder,
    ClipTextEncoder,
    ImageEmbedderConfig,
    TextEncoderConfig,
    tiny_clip_tokenizer,
)

LONG_PROMPT = " ".join(["a small red house on a green hill"] * 25)  # 200 words


@pytest.fixture(scope="module")
def embedder():
    return ClipImageEmbedder.random(TINY_VISION, seed=0)


@pytest.fixture(scope="module")
def text_encoder():
    return ClipTextEncoder.random(TINY_TEXT, seed=0)


def random_pictures(sizes, seed=0):
    rng = np.random.default_rng(seed)
    pictures = []
    for w, h in sizes:
        # smooth content plus noise, so that resampling differences would show
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([128 + 100 * np.sin(xx / 5 + c) * np.cos(yy / 7) for c in range(3)], axis=-1)
        noisy = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        pictures.append(Image.fromarray(noisy))
    return pictures


# -- image embedder ------------------------------------------------------------------------------


# Odd margins (e.g. 57 -> 32x57 crops 12.5 pixels off each side) exercise the crop offset rule.
SIZES = [(40, 30), (30, 57), (32, 32), (101, 33), (300, 200), (17, 23)]


@pytest.mark.parametrize("side", [32, 224])
def test_preprocess_matches_transformers(side):
    # transformers' CLIPImageProcessor is its torchvision backend; without torchvision it falls
    # back to this PIL backend, the one that implements CLIP's resize with Pillow as we do.
    cfg = ImageEmbedderConfig(32, 64, 1, 4, image_size=side, patch_size=side // 4, projection_dim=8)
    ours = ClipImageEmbedder.random(cfg)
    reference = CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": side},
        do_center_crop=True,
        crop_size={"height": side, "width": side},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    pictures = random_pictures(SIZES)
    pictures.append(pictures[0].convert("L"))  # greyscale goes through the RGB conversion
    got = ours.preprocess(pictures)
    expected = torch.as_tensor(np.stack(reference(pictures, return_tensors="np")["pixel_values"]))
    assert got.shape == expected.shape == (len(pictures), 3, side, side)
    assert got.dtype == torch.float32
    # measured: max |difference| 0.0 at both sizes (the same Pillow resize, the same float32 maths)
    assert (got - expected).abs().max() < 1e-6


def test_embedding_shape_and_not_normalised(embedder):
    pictures = random_pictures([(48, 40), (32, 32), (20, 64)])
    with torch.no_grad():
        out = embedder(pictures)
        from_tensor = embedder(embedder.preprocess(pictures))
        direct = embedder.model(pixel_values=embedder.preprocess(pictures)).image_embeds
    assert out.shape == (3, TINY_VISION.projection_dim)
    assert torch.equal(out, from_tensor) and torch.equal(out, direct)
    norms = out.norm(dim=-1)
    assert ((norms - 1).abs() > 1e-2).all(), norms
    assert not torch.allclose(out[0], out[1])


def test_embedder_is_frozen_and_checks_inputs(embedder):
    assert not any(p.requires_grad for p in embedder.parameters())
    embedder.train()
    assert not embedder.training and not embedder.model.training
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        embedder(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="PIL"):
        embedder(["not a picture"])


# -- text encoder --------------------------------------------------------------------------------


def test_tiny_tokenizer_is_clip_like_and_reproducible():
    tok = tiny_clip_tokenizer()
    assert len(tok) == TINY_TEXT.vocab_size
    assert (tok.bos_token_id, tok.eos_token_id) == (TINY_TEXT.bos_token_id, TINY_TEXT.eos_token_id)
    assert tok.pad_token_id == tok.eos_token_id  # CLIP pads with <|endoftext|>
    assert tok.get_vocab() == tiny_clip_tokenizer().get_vocab()
    ids = tok(
        ["A Photo of a CAT"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    pieces = tok.convert_ids_to_tokens(ids[0, :7].tolist())
    assert pieces == ["<|startoftext|>", "a</w>", "pho", "to</w>", "of</w>", "a</w>", "cat</w>"]  # lowercased
    assert ids.shape == (1, 77) and (ids[0, 7:] == tok.eos_token_id).all()


def test_text_features_pad_and_truncate_to_77(text_encoder):
    eos = text_encoder.tokenizer.eos_token_id
    ids = text_encoder.tokenize(["", "a cat", LONG_PROMPT])
    assert ids.shape == (3, 77)
    assert ids[0, 0] == text_encoder.tokenizer.bos_token_id and (ids[0, 1:] == eos).all()  # the empty prompt
    assert ids[2, -1] == eos and (ids[2, :-1] != eos).all()  # truncated, still closed by <|endoftext|>
    with torch.no_grad():
        out = text_encoder(["", "a cat", LONG_PROMPT, "a dog"])
    assert out.shape == (4, 77, TINY_TEXT.hidden_size)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[1], out[3])  # different prompts, different features
    with torch.no_grad():
        alone = text_encoder(["a cat"])
    torch.testing.assert_close(alone[0], out[1], rtol=0, atol=1e-6)  # independent of the batch


def test_text_encoder_checks_inputs(text_encoder):
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        text_encoder(["fine", 3])
    with pytest.raises(ValueError, match="list of strings"):
        text_encoder("a bare string")
    with pytest.raises(ValueError, match="list of strings"):
        text_encoder([])
    assert not any(p.requires_grad for p in text_encoder.parameters())
    small = TextEncoderConfig(100, 16, 32, 1, 2, bos_token_id=98, eos_token_id=99)
    with pytest.raises(ValueError, match="vocab_size=100"):
        ClipTextEncoder.random(small)


def test_presets():
    assert (VIT_B_32.hidden_size, VIT_B_32.num_layers, VIT_B_32.num_heads) == (768, 12, 12)
    assert (VIT_B_32.patch_size, VIT_B_32.image_size, VIT_B_32.projection_dim) == (32, 224, 512)
    assert (VIT_L_14_TEXT.hidden_size, VIT_L_14_TEXT.num_layers, VIT_L_14_TEXT.num_heads) == (768, 12, 12)
    assert (VIT_L_14_TEXT.vocab_size, VIT_L_14_TEXT.max_positions) == (49408, 77)
    with pytest.raises(ValueError, match="num_heads=5"):
        ImageEmbedderConfig(32, 64, 1, 5, 32, 8, 16)


# -- loading -------------------------------------------------------------------------------------


def test_save_and_load_round_trip(embedder, text_encoder, tmp_path):
    embedder.save_pretrained(tmp_path / "image")
    text_encoder.save_pretrained(tmp_path / "text")
    image2 = ClipImageEmbedder.from_pretrained_dir(tmp_path / "image")
    text2 = ClipTextEncoder.from_pretrained_dir(tmp_path / "text")
    pictures = random_pictures([(40, 32), (32, 50)])
    prompts = ["", "a cat on a mat", LONG_PROMPT]
    with torch.no_grad():
        assert torch.equal(image2(pictures), embedder(pictures))
        assert torch.equal(text2(prompts), text_encoder(prompts))
    assert torch.equal(text2.tokenize(prompts), text_encoder.tokenize(prompts))
    assert not image2.training and not any(p.requires_grad for p in text2.parameters())
    # the diffusers layout: the tokenizer in its own folder
    text_encoder.model.save_pretrained(tmp_path / "text_encoder")
    text_encoder.tokenizer.save_pretrained(tmp_path / "tokenizer")
    text3 = ClipTextEncoder.from_pretrained_dir(
        tmp_path / "text_encoder", tokenizer_path=tmp_path / "tokenizer"
    )
    with torch.no_grad():
        assert torch.equal(text3(prompts), text_encoder(prompts))
    with pytest.raises(ValueError, match=r"CLIP tokenizer directory not found"):
        ClipTextEncoder.from_pretrained_dir(tmp_path / "text_encoder", tokenizer_path=tmp_path / "nowhere")


def test_loads_a_full_clip_directory(tmp_path):
    # the standard openai layout: one CLIPModel holding both towers, plus the tokenizer files
    vision, text = TINY_VISION.transformers_config(), TINY_TEXT.transformers_config()
    torch.manual_seed(0)
    full = CLIPModel(
        CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    )
    full.save_pretrained(tmp_path)
    tiny_clip_tokenizer().save_pretrained(tmp_path)
    image = ClipImageEmbedder.from_pretrained_dir(tmp_path)
    encoder = ClipTextEncoder.from_pretrained_dir(tmp_path)
    pixels = image.preprocess(random_pictures([(32, 32)]))
    ids = encoder.tokenize(["a dog running"])
    towers = {
        **image.model.state_dict(),
        **{f"text_model.{k}": v for k, v in encoder.model.state_dict().items()},
    }
    for key, value in towers.items():
        assert torch.equal(value, full.state_dict()[key]), key
    with torch.no_grad():
        # the same weights; only the attention kernels may differ between the two modules
        expected = full.get_image_features(pixel_values=pixels).pooler_output
        torch.testing.assert_close(image(pixels), expected, rtol=0, atol=1e-5)
        expected = full.text_model(input_ids=ids).last_hidden_state
        torch.testing.assert_close(encoder(["a dog running"]), expected, rtol=0, atol=1e-5)


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(
        ValueError, match=r"not found: '.*nowhere'.*Hugging Face Hub.*openai/clip-vit-large-patch14"
    ):
        ClipTextEncoder.from_pretrained_dir(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"not found: '.*nowhere'.*openai/clip-vit-base-patch32"):
        ClipImageEmbedder.from_pretrained_dir(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"lacks model\.safetensors"):
        ClipImageEmbedder.from_pretrained_dir(tmp_path)
    ClipImageEmbedder.random(TINY_VISION).save_pretrained(tmp_path)  # weights, but no tokenizer
    with pytest.raises(ValueError, match=r"lacks tokenizer\.json"):
        ClipTextEncoder.from_pretrained_dir(tmp_path)


def test_saving_and_loading_print_no_progress_bar_and_restore_the_setting(embedder, tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    capsys.readouterr()
    for bar_on in (True, False):
        (hf_logging.enable_progress_bar if bar_on else hf_logging.disable_progress_bar)()
        try:
            embedder.save_pretrained(tmp_path / f"image-{bar_on}")
            assert hf_logging.is_progress_bar_enabled() is bar_on
            ClipImageEmbedder.from_pretrained_dir(tmp_path / f"image-{bar_on}")
            assert hf_logging.is_progress_bar_enabled() is bar_on
        finally:
            hf_logging.enable_progress_bar()
        out = capsys.readouterr()
        assert "Loading weights" not in out.err + out.out
        assert "Writing model shards" not in out.err + out.out
