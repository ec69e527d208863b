"""The composition diagnosis: the shape probe on embeddings whose answer is known, and the CLIP swap."""

import pytest
import torch

import unidiffuser.pipeline
from unidiffuser.shapes.composition import (
    COMPLETE_COLOURS,
    OTHER_COLOURS,
    clip_blind,
    clip_swap,
    main,
    reader_probe,
    representations,
    shape_probe,
)
from unidiffuser.shapes.world import COLOURS, HELD_OUT, SHAPES
from unidiffuser.shipped import load_shipped, shipped_model_dir


def code(pairs, noise=0.05, seed=0):
    """An embedding writing each scene's object through ``pairs(shape, colour) -> vector``, plus noise."""
    generator = torch.Generator().manual_seed(seed)

    def embed(scenes):
        rows = torch.stack([pairs(s.objects[0].shape, s.objects[0].colour) for s in scenes])
        return rows + noise * torch.randn(rows.shape, generator=generator)

    return embed


def one_hot(index, size):
    return torch.nn.functional.one_hot(torch.tensor(index), size).float()


def additive(shape, colour):
    return torch.cat(
        [one_hot(SHAPES.index(shape), len(SHAPES)), one_hot(list(COLOURS).index(colour), len(COLOURS))]
    )


def test_the_complete_colours_are_those_shown_with_every_shape():
    assert set(COMPLETE_COLOURS) == {"green", "white"}
    assert set(OTHER_COLOURS) == {c for _, c in HELD_OUT}


def test_shape_probe_reads_a_code_that_writes_shape_and_colour_apart():
    scores = shape_probe(code(additive), train=400, test=200)
    assert scores["other colours, seen pairs"] > 0.95 and scores["held-out pairs"] > 0.95


def test_shape_probe_fails_a_code_that_writes_each_pair_its_own_way():
    vectors = torch.randn(len(SHAPES), len(COLOURS), 32, generator=torch.Generator().manual_seed(1))
    pair_code = code(lambda shape, colour: vectors[SHAPES.index(shape), list(COLOURS).index(colour)])
    scores = shape_probe(pair_code, train=400, test=200)
    assert scores["other colours, seen pairs"] < 0.6 and scores["held-out pairs"] < 0.6


def test_shape_probe_tells_a_held_out_pair_written_as_a_seen_one():
    # the failure the shipped CLIP tower shows: a held-out pair's shape written as a seen pair's
    instead = {colour: next(s for s in SHAPES if (s, colour) not in HELD_OUT) for _, colour in HELD_OUT}

    def seen_like(shape, colour):
        return additive(instead[colour] if (shape, colour) in HELD_OUT else shape, colour)

    scores = shape_probe(code(seen_like), train=400, test=200)
    assert scores["other colours, seen pairs"] > 0.95 and scores["held-out pairs"] < 0.05


def test_reader_probe_reads_a_code_that_holds_no_colour_to_rule_a_shape_out():
    shape_only = code(lambda shape, colour: one_hot(SHAPES.index(shape), len(SHAPES)))
    scores = reader_probe(shape_only, train=1000, test=300, steps=300, readers=2)
    assert scores["held-out shape"] > 0.95 and len(scores["readers"]) == 2
    assert scores["held-out colour"] < 0.5  # nothing to read it from: about chance, 1/5 here


def test_reader_probe_fails_a_code_that_writes_each_pair_its_own_way():
    vectors = torch.randn(len(SHAPES), len(COLOURS), 32, generator=torch.Generator().manual_seed(1))
    pair_code = code(lambda shape, colour: vectors[SHAPES.index(shape), list(COLOURS).index(colour)])
    scores = reader_probe(pair_code, train=1000, test=300, steps=300, readers=2)
    assert scores["held-out shape"] < 0.6


@pytest.fixture(scope="module")
def pipe():
    return load_shipped()


def test_clip_swap_gives_the_network_the_donors_embedding(pipe):
    real = pipe.encode_images
    seen = []

    def spy(images, generator, size=None):
        given = real(images, generator, size)
        seen.append(given["clip_img"])
        return given

    pipe.encode_images = spy
    try:
        results = clip_swap(pipe, samples=4, steps=2)
    finally:
        pipe.encode_images = real
    assert list(results) == ["the render itself", "same shape, a seen colour", "same colour, a seen shape"]
    itself = results["the render itself"]
    assert itself["shape as rendered"] == itself["shape as the CLIP donor"]
    assert itself["colour as rendered"] == itself["colour as the CLIP donor"]
    assert all(0.0 <= v <= 1.0 for shares in results.values() for v in shares.values())
    # each donor set is encoded, then each captioning encodes the renders: 3 + 3 calls; the
    # renders' own embeddings equal the first donor set's, the edited scenes' differ
    assert len(seen) == 6
    assert torch.equal(seen[0], seen[1])
    assert not torch.allclose(seen[2], seen[1]) and not torch.allclose(seen[4], seen[1])
    assert pipe.encode_images is real  # put back


def test_clip_blind_gives_the_network_one_embedding_for_every_render(pipe, monkeypatch):
    given = []
    real = unidiffuser.pipeline.generate

    def spy(*args, **kwargs):
        given.append(kwargs["given"]["clip_img"].clone())
        return real(*args, **kwargs)

    monkeypatch.setattr(unidiffuser.pipeline, "generate", spy)
    encode = pipe.encode_images
    results = clip_blind(pipe, samples=3, steps=2)
    assert pipe.encode_images == encode  # put back
    assert {name: list(shares) for name, shares in results.items()} == {
        "the render's own": ["seen pairs", "held-out pairs"],
        "the mean of seen scenes": ["seen pairs", "held-out pairs"],
    }
    assert all(0.0 <= v <= 1.0 for shares in results.values() for v in shares.values())
    # per split: the renders' own embeddings (three different rows), then the mean (one row, thrice)
    assert len(given) == 4
    for own, mean in (given[0:2], given[2:4]):
        assert not torch.allclose(own[0], own[1]) and (mean == mean[0]).all()
    assert torch.equal(given[1], given[3])  # the same mean for both splits


def test_command_names_a_missing_model(tmp_path):
    with pytest.raises(SystemExit, match=r"--model .*missing"):
        main(["--model", str(tmp_path / "missing")])


def test_command_refuses_a_sample_count_below_one(capsys):
    with pytest.raises(SystemExit):
        main(["--samples", "0"])
    assert "--samples" in capsys.readouterr().err


def test_command_probes_one_image_tower_on_its_own(pipe, capsys):
    folder = str(shipped_model_dir() / "image_encoder")
    assert main(["--image-encoder", folder]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    # the same figures as the probe of the pipeline's own CLIP embedding
    expected = shape_probe(representations(pipe)["CLIP image embedding"])
    assert cells[0] == folder
    assert [float(c) for c in cells[1:3]] == pytest.approx(list(expected.values()), abs=0.0015)
    mean, each = cells[3].split(" ", 1)
    readers = [float(v) for v in each.strip("()").split(", ")]
    assert len(readers) == 3 and float(mean) == pytest.approx(sum(readers) / 3, abs=0.0015)
    assert 0.0 <= float(mean) <= 1.0 and float(cells[4]) > 0.9  # colours are read, held-out or not


def test_command_refuses_a_model_beside_an_image_tower(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--image-encoder", str(tmp_path), "--model", str(tmp_path)])
    assert "leave out --model" in capsys.readouterr().err


def test_command_names_a_missing_image_tower(tmp_path):
    with pytest.raises(SystemExit, match=r"--image-encoder .*missing"):
        main(["--image-encoder", str(tmp_path / "missing")])
