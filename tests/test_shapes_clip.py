"""The shapes world's caption tokenizers and its small CLIP training stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from unidiffuser.components.caption import CaptionDecoder, CaptionDecoderConfig
from unidiffuser.components.clip import ClipImageEmbedder, ClipTextEncoder
from unidiffuser.shapes import COLOURS, caption, clip_training, normalize, render, sample_scene
from unidiffuser.shapes.clip_training import load_clip, retrieval_accuracy, train_clip
from unidiffuser.shapes.tokenizer import build_caption_tokenizers, caption_corpus, vocabulary

# ---------------------------------------------------------------------------------------------
# Tokenizers


@pytest.fixture(scope="module")
def tokenizers():
    return build_caption_tokenizers(0)


def _fingerprint(clip_tok, gpt2_tok) -> str:
    """Everything of both tokenizers but the padding and truncation state that calls leave behind."""
    parts = []
    for tok in (clip_tok, gpt2_tok):
        d = json.loads(tok.backend_tokenizer.to_str())
        parts.append(json.dumps({k: v for k, v in d.items() if k not in ("padding", "truncation")}))
    return "".join(parts)


def test_tokenizers_round_trip_captions(tokenizers):
    clip_tok, gpt2_tok = tokenizers
    captions = caption_corpus(seed=11, n=300)  # not the corpus the merges were learned from
    captions += ["A Small RED circle   in the centre", "a big plus sign on the left side"]
    for c in captions:
        ids = clip_tok(c)["input_ids"]
        assert ids[0] == clip_tok.bos_token_id and ids[-1] == clip_tok.eos_token_id
        assert clip_tok.decode(ids, skip_special_tokens=True).strip() == normalize(c)
        assert gpt2_tok.decode(gpt2_tok(c)["input_ids"]) == c
        assert len(clip_tok(c)["input_ids"]) == len(c.split()) + 2  # one token per word


def test_every_word_is_one_token(tokenizers):
    clip_tok, gpt2_tok = tokenizers
    words = vocabulary()
    assert {"circle", "magenta", "rhombus", "beneath", "shaded", "centre"} <= set(words)
    for w in words:
        assert len(clip_tok(w)["input_ids"]) == 3, w  # <|startoftext|> w <|endoftext|>
        assert len(gpt2_tok(" " + w)["input_ids"]) == 1, w  # a word inside a caption
        assert len(gpt2_tok(w)["input_ids"]) <= 3, w  # a caption's first word (no leading space)


def test_tokenizers_special_tokens_and_padding(tokenizers):
    clip_tok, gpt2_tok = tokenizers
    assert (clip_tok.bos_token, clip_tok.eos_token, clip_tok.pad_token) == (
        "<|startoftext|>",
        "<|endoftext|>",
        "<|endoftext|>",
    )
    assert clip_tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [
        len(clip_tok) - 2,
        len(clip_tok) - 1,
    ]
    ids = clip_tok(["a small red circle in the center"], padding="max_length", max_length=77).input_ids[0]
    assert len(ids) == 77 and ids[-1] == clip_tok.eos_token_id
    assert gpt2_tok.eos_token == "<|EOS|>" and gpt2_tok.eos_token_id == len(gpt2_tok) - 1
    assert gpt2_tok.convert_tokens_to_ids("<|endoftext|>") == len(gpt2_tok) - 2
    # "purple" is not a word of the world: it still tokenizes, byte by byte, and round-trips
    assert gpt2_tok.decode(gpt2_tok("a purple circle")["input_ids"]) == "a purple circle"


def test_tokenizers_deterministic_across_builds_and_processes(tokenizers):
    assert _fingerprint(*build_caption_tokenizers(0)) == _fingerprint(*tokenizers)
    assert _fingerprint(*build_caption_tokenizers(1)) != _fingerprint(*tokenizers)  # the seed matters
    # A fresh process with another hash seed (the BpeTrainer's ties change across processes)
    code = (
        "import sys; from test_shapes_clip import _fingerprint; "
        "from unidiffuser.shapes.tokenizer import build_caption_tokenizers as b; "
        "sys.stdout.write(_fingerprint(*b(0)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.path.dirname(__file__)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout == _fingerprint(*tokenizers)


def test_tokenizers_save_and_reload(tokenizers, tmp_path):
    clip_tok, gpt2_tok = tokenizers
    clip_tok.save_pretrained(tmp_path / "clip")
    gpt2_tok.save_pretrained(tmp_path / "gpt2")
    assert (tmp_path / "clip" / "tokenizer.json").is_file()
    clip_again = AutoTokenizer.from_pretrained(tmp_path / "clip", local_files_only=True)
    gpt2_again = AutoTokenizer.from_pretrained(tmp_path / "gpt2", local_files_only=True)
    texts = caption_corpus(seed=3, n=20)
    assert len(clip_again) == len(clip_tok) and len(gpt2_again) == len(gpt2_tok)
    assert (
        clip_again(texts, padding="max_length", max_length=77).input_ids
        == clip_tok(texts, padding="max_length", max_length=77).input_ids
    )
    assert gpt2_again(texts).input_ids == gpt2_tok(texts).input_ids
    assert gpt2_again.eos_token == "<|EOS|>" and gpt2_again.eos_token_id == gpt2_tok.eos_token_id


def test_gpt2_tokenizer_fits_the_caption_decoder(tokenizers):
    _, gpt2_tok = tokenizers
    config = CaptionDecoderConfig(
        prefix_dim=8,
        feature_dim=16,
        gpt2={"n_embd": 32, "n_layer": 1, "n_head": 2, "vocab_size": len(gpt2_tok), "n_positions": 64},
    )
    decoder = CaptionDecoder.random(config, gpt2_tok)
    ids, mask = decoder.tokenize(["a small red circle in the center"])
    assert ids[0, int(mask[0].sum()) - 1] == gpt2_tok.eos_token_id
    assert int(mask[0].sum()) == 8  # seven words, one token each, then <|EOS|>


def test_batches_without_colourless_pairs_are_the_world_as_it_is():
    images, texts = clip_training.sample_batch(np.random.default_rng(4), 16, 32)
    rng = np.random.default_rng(4)
    scenes = [sample_scene(rng, "train") for _ in range(16)]
    assert np.array_equal(images, np.stack([np.asarray(render(s, 32)) for s in scenes]))
    assert texts == [caption(s, rng) for s in scenes]


def test_colourless_pairs_are_gray_pictures_with_captions_that_name_no_colour():
    images, texts = clip_training.sample_batch(np.random.default_rng(5), 400, 32, colourless=0.5)
    low, high = clip_training.COLOURLESS_GRAYS
    hues = np.array([rgb for rgb in COLOURS.values() if len(set(rgb)) > 1])  # the palette but white
    colourless = 0
    for image, text in zip(images, texts, strict=True):
        named = bool(set(text.split()) & set(COLOURS))
        assert named == ("white" in text or (image.reshape(-1, 1, 3) == hues).all(-1).any()), text
        if not named:
            colourless += 1
            gray = (
                (image[..., 0] == image[..., 1]) & (image[..., 1] == image[..., 2]) & (image[..., 0] >= low)
            )
            assert gray.sum() >= 9 and (image[gray] < high).all()  # the objects, in grays of the range
    assert 160 <= colourless <= 240  # a share of 0.5 of 400: 200, +-4 standard deviations


def test_training_refuses_a_colourless_share_outside_zero_to_one(tmp_path):
    with pytest.raises(ValueError, match=r"colourless=1.0: expected a share in \[0, 1\)"):
        train_clip(tmp_path, steps=1, colourless=1.0)


# ---------------------------------------------------------------------------------------------
# CLIP training

STEPS, BATCH, EVERY = 240, 32, 120
# Measured with this recipe (240 steps of 32 pairs at 32 px, about 8 s on one core), held-out
# image -> text top-1 among 16 candidates: 0.74, 0.83, 0.63 for seeds 0, 1, 2 (chance 1/16 = 0.0625;
# seen combinations 0.78, 0.88, 0.70). 0.5 is eight times chance and below every seed measured.
MIN_RETRIEVAL = 0.5


@pytest.fixture(scope="module")
def single_thread():
    # Ops this small are dominated by thread synchronisation: one thread is faster on 2 cores,
    # and far faster when another process shares them.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, single_thread):
    out = tmp_path_factory.mktemp("clip")
    kwargs = dict(
        steps=STEPS, batch_size=BATCH, seed=0, checkpoint_every=EVERY, eval_groups=0, progress=False
    )
    image_encoder, text_encoder = train_clip(out, **kwargs)
    return out, kwargs, image_encoder, text_encoder


def _losses(step_dir):
    from unidiffuser.training.checkpoint import load_training_state

    return load_training_state(step_dir)["losses"]


def test_training_writes_checkpoints_towers_and_report(trained):
    out, *_ = trained
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps == ["step_000120", "step_000240"]
    state = json.loads((out / "checkpoints" / "step_000240" / "state.json").read_text())
    assert state["step"] == STEPS and state["options"]["batch_size"] == BATCH
    for d in ("image_encoder", "text_encoder", "clip"):
        assert (out / d / "config.json").is_file() and (out / d / "model.safetensors").is_file()
    assert (out / "text_encoder" / "tokenizer.json").is_file()
    report = json.loads((out / "clip_training.json").read_text())
    assert report["steps"] == STEPS and report["final_loss"] is not None
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_loss_decreases(trained):
    out, *_ = trained
    losses = _losses(out / "checkpoints" / "step_000240")
    assert len(losses) == STEPS
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert first > np.log(BATCH) - 0.3  # starts near chance: log(32) = 3.47
    assert last < 0.5 * first, (first, last)


def test_retrieval_on_held_out_scenes_is_well_above_chance(trained):
    out, *_ = trained
    model, tokenizer = load_clip(out / "clip")
    accuracy = retrieval_accuracy(model, tokenizer, split="heldout", groups=32, group_size=16)
    assert accuracy >= MIN_RETRIEVAL, accuracy
    # An untrained CLIP of the same shape is at chance: the measure is not trivially high.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = type(model)(model.config).eval()
    assert retrieval_accuracy(untrained, tokenizer, split="heldout", groups=32) < 0.2


def _features(out):
    # transformers 5.24 returns an output object whose pooler_output is the projected embedding
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_saved_towers_load_and_match(trained):
    out, _, image_encoder, text_encoder = trained
    images = ClipImageEmbedder.from_pretrained_dir(out / "image_encoder")
    texts = ClipTextEncoder.from_pretrained_dir(out / "text_encoder")
    rng = np.random.default_rng(5)
    scenes = [sample_scene(rng, "heldout") for _ in range(4)]
    pictures = [render(s) for s in scenes]
    captions = [caption(s, rng) for s in scenes]
    # training's preprocessing of rendered arrays is the wrapper's preprocessing of the pictures
    arrays = np.stack([np.asarray(p) for p in pictures])
    torch.testing.assert_close(clip_training.pixels(arrays), images.preprocess(pictures), rtol=0, atol=1e-6)
    with torch.no_grad():
        e = images(pictures)
        f = texts(captions)
        assert e.shape == (4, 64) and f.shape == (4, 24, 64)
        torch.testing.assert_close(e, image_encoder(pictures), rtol=0, atol=0)
        torch.testing.assert_close(f, text_encoder(captions), rtol=0, atol=0)
        # ... and the towers are the CLIP's: the same image embedding and pooled text embedding
        model, tokenizer = load_clip(out / "clip")
        torch.testing.assert_close(
            e, _features(model.get_image_features(pixel_values=images.preprocess(pictures)))
        )
        ids = texts.tokenize(captions)
        pooled = f[torch.arange(4), (ids == tokenizer.eos_token_id).int().argmax(-1)]
        torch.testing.assert_close(
            model.text_projection(pooled), _features(model.get_text_features(input_ids=ids))
        )


def test_resume_continues_from_the_saved_step(trained, tmp_path, monkeypatch):
    out, kwargs, *_ = trained
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step_000120", run / "checkpoints" / "step_000120")
    calls = []
    sample = clip_training.sample_batch
    monkeypatch.setattr(clip_training, "sample_batch", lambda *a, **k: calls.append(1) or sample(*a, **k))
    train_clip(run, **kwargs)
    assert len(calls) == STEPS - EVERY  # only the remaining steps ran
    losses = _losses(run / "checkpoints" / "step_000240")
    assert losses[:EVERY] == _losses(out / "checkpoints" / "step_000120")
    # Batches depend on (seed, step) and the optimizer state is restored: the same result as
    # the uninterrupted run.
    resumed = load_file(str(run / "checkpoints" / "step_000240" / "clip.safetensors"))
    straight = load_file(str(out / "checkpoints" / "step_000240" / "clip.safetensors"))
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-5, atol=1e-6)


def test_resume_refuses_other_options(trained, tmp_path):
    out, kwargs, *_ = trained
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step_000120", run / "checkpoints" / "step_000120")
    with pytest.raises(ValueError, match="batch_size"):
        train_clip(run, **{**kwargs, "batch_size": 16})
