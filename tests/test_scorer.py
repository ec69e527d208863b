"""The CLIP scorer that ranks best-of candidates: embeddings, loading, and its place in a model."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from unidiffuser.cli import main
from unidiffuser.components.clip import TINY_TEXT, TINY_VISION, ClipImageEmbedder, tiny_clip_tokenizer
from unidiffuser.components.scorer import ClipScorer
from unidiffuser.pipeline import UniDiffuser
from unidiffuser.tiny import tiny_pipeline


@pytest.fixture(scope="module")
def scorer():
    return ClipScorer.random(TINY_VISION, TINY_TEXT, seed=0)


def pictures(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")) for _ in range(n)]


def test_embeddings_are_unit_vectors_of_the_shared_width(scorer):
    images, texts = scorer.embed_images(pictures(3)), scorer.embed_texts(["a cat", "a dog on a mat", ""])
    assert images.shape == texts.shape == (3, TINY_VISION.projection_dim)
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(texts[0], texts[1])


def test_embeddings_are_those_of_transformers_clip(scorer):
    # the same numbers as CLIPModel's own features, normalised; padding to the longest changes nothing
    ids = scorer.tokenizer(["a dog running"], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = scorer.model.get_text_features(input_ids=ids).pooler_output
    expected = expected / expected.norm(dim=-1, keepdim=True)
    both = scorer.embed_texts(["a dog running", "a much longer prompt about a dog running in a park"])
    torch.testing.assert_close(both[0], expected[0], rtol=0, atol=1e-6)
    alone = scorer.embed_images(pictures(1))
    together = scorer.embed_images(pictures(1) + pictures(1, seed=1))
    torch.testing.assert_close(alone[0], together[0], rtol=0, atol=1e-6)


def test_save_and_load_round_trip(scorer, tmp_path):
    scorer.save_pretrained(tmp_path / "scorer")
    again = ClipScorer.from_pretrained_dir(tmp_path / "scorer")
    # the same weights; only the attention kernel transformers picks on loading may differ
    torch.testing.assert_close(
        scorer.embed_images(pictures(2)), again.embed_images(pictures(2)), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        scorer.embed_texts(["a red circle"]), again.embed_texts(["a red circle"]), rtol=0, atol=1e-6
    )
    assert torch.equal(scorer.model.text_projection.weight, again.model.text_projection.weight)
    assert not any(p.requires_grad for p in again.parameters()) and not again.training


def test_loading_errors_say_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match=r"CLIP scorer directory not found: '.*nowhere'"):
        ClipScorer.from_pretrained_dir(tmp_path / "nowhere")
    tower = tmp_path / "tower"
    ClipImageEmbedder.random(TINY_VISION).save_pretrained(tower)  # one tower, no tokenizer
    with pytest.raises(ValueError, match=r"lacks tokenizer\.json"):
        ClipScorer.from_pretrained_dir(tower)
    tiny_clip_tokenizer().save_pretrained(tower)
    with pytest.raises(ValueError, match=r"a whole CLIPModel"):
        ClipScorer.from_pretrained_dir(tower)
    big = CLIPConfig(
        text_config={**TINY_TEXT.transformers_config().to_dict(), "vocab_size": 40},
        vision_config=TINY_VISION.transformers_config().to_dict(),
        projection_dim=16,
    )
    small_vocab = tmp_path / "small_vocab"
    CLIPModel(big).save_pretrained(small_vocab)
    tiny_clip_tokenizer().save_pretrained(small_vocab)
    with pytest.raises(ValueError, match=r"vocab_size=40; use the tokenizer the model was trained with"):
        ClipScorer.from_pretrained_dir(small_vocab)


def test_a_model_without_a_scorer_takes_one_by_path(scorer, tmp_path):
    tiny_pipeline(seed=0, scorer=False).save_pretrained(tmp_path / "bare")
    assert not (tmp_path / "bare" / "scorer").exists()
    assert UniDiffuser.from_pretrained(tmp_path / "bare").scorer is None
    scorer.save_pretrained(tmp_path / "clip")
    pipe = UniDiffuser.from_pretrained(tmp_path / "bare", scorer=tmp_path / "clip")
    assert len(pipe.text_to_image("a cat", steps=2, best_of=2).images) == 1
    # convert writes the given scorer into the new model directory
    assert (
        main(
            ["convert", str(tmp_path / "bare"), str(tmp_path / "judged"), "--scorer", str(tmp_path / "clip")]
        )
        == 0
    )
    assert (tmp_path / "judged" / "scorer" / "config.json").is_file()


def test_sample_best_of_from_the_command_line(tmp_path, capsys):
    tiny_pipeline(seed=0, scorer=False).save_pretrained(tmp_path / "bare")
    tiny_pipeline(seed=0).save_pretrained(tmp_path / "judged")
    common = ["sample", "--prompt", "a cat", "--steps", "2", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"--best-of 3 needs a CLIP scorer.*--scorer DIR"):
        main([*common, "--model", str(tmp_path / "bare"), "--best-of", "3"])
    with pytest.raises(SystemExit, match=r"--mode i has none to rank against"):
        main(["sample", "--model", str(tmp_path / "judged"), "--mode", "i", "--best-of", "2", "--steps", "2"])
    assert main([*common, "--model", str(tmp_path / "judged"), "-n", "2", "--best-of", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("t2i_0*.png")) == ["t2i_000.png", "t2i_001.png"]
