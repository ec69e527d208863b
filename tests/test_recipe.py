"""The shapes recipe end to end at smoke size: every stage runs, resumes, refuses other options; the
finished model loads in the pipeline, is scored by `eval shapes` and fills a gallery."""

import json

import numpy as np
import pytest
import torch

from unidiffuser.cli import main
from unidiffuser.pipeline import UniDiffuser
from unidiffuser.shapes import recipe as recipe_module
from unidiffuser.shapes import render, render_array, sample_scene
from unidiffuser.shapes.evaluate import attribute_shares, evaluate, format_rows, read_images
from unidiffuser.shapes.recipe import (
    SHAPES_DOWNSAMPLE,
    Recipe,
    network_config,
    parse_options,
    run_recipe,
    tune_configs,
)
from unidiffuser.shapes.vae_training import SHAPES_VAE, _batch, vae_loss
from unidiffuser.shapes.world import Object, Scene

STAGES = ("tokenizers", "clip", "vae", "decoder", "components", "data", "features", "uvit", "tune", "model")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe")
    lines: list[str] = []
    model = run_recipe(out, Recipe.smoke(threads=1), log=lines.append)
    return out, model, lines


def test_every_stage_runs_once_and_is_recorded(smoke_run):
    out, model, lines = smoke_run
    record = json.loads((out / "recipe.json").read_text())
    assert list(record["stages"]) == list(STAGES)
    assert all(s["device"] == "cpu" and s["seconds"] >= 0 for s in record["stages"].values())
    assert [line for line in lines if line.endswith("running")] == [f"[{s}] running" for s in STAGES]
    assert (model / "unidiffuser.json").is_file()


def test_the_model_holds_the_tuned_network(smoke_run):
    """tune/ starts from uvit/'s EMA with clean conditions; model/ takes tune/'s EMA, not uvit/'s."""
    from safetensors.torch import load_file

    from unidiffuser.training.checkpoint import latest_checkpoint, load_weights
    from unidiffuser.training.config import parse_toml

    out, model, _ = smoke_run
    recipe = Recipe.smoke()
    config = parse_toml((out / "tune" / "config.toml").read_text())  # the last phase's options
    assert config["clean_prob"] == recipe.tune_clean_prob > 0
    assert config["snr_gamma"] == recipe.snr_gamma
    assert config["mixed_precision"] == recipe.precision
    assert config["init_from"] == str(out / "uvit") and config["seed"] == recipe.seed + 1
    weights = {"img": recipe.tune_img_weight, "text": recipe.tune_text_weight}
    assert config["steps"] == recipe.tune_steps and config["loss_weights"] == weights
    assert latest_checkpoint(out / "tune" / "checkpoints").step == recipe.tune_steps
    # the last phase resumed the image-weighted one: that phase's last checkpoint is still its own
    second = json.loads((out / "tune" / "checkpoints" / "step_000003" / "state.json").read_text())
    assert second["config"]["loss_weights"] == {"img": recipe.tune_img_weight} and recipe.tune_text_from == 3
    shipped = load_file(str(model / "network.safetensors"))
    tuned = load_weights(latest_checkpoint(out / "tune" / "checkpoints"))
    base = load_weights(latest_checkpoint(out / "uvit" / "checkpoints"))
    assert all(torch.equal(shipped[k], tuned[k]) for k in tuned)
    assert any(not torch.equal(tuned[k], base[k]) for k in base)


IMG, BOTH = {"img": 10.0}, {"img": 10.0, "text": 3.0}


@pytest.mark.parametrize(
    ("steps", "weigh_from", "text_from", "phases"),
    [
        (16, 8, 12, [(8, {}), (12, IMG), (16, BOTH)]),
        (16, 0, 12, [(12, IMG), (16, BOTH)]),
        (16, 0, 0, [(16, BOTH)]),
        (16, 8, 8, [(8, {}), (16, BOTH)]),
        (16, 8, 16, [(8, {}), (16, IMG)]),
        (16, 8, 20, [(8, {}), (16, IMG)]),
        (16, 16, 16, [(16, {})]),
        (16, 20, 24, [(16, {})]),
        (0, 8, 12, []),
    ],
)
def test_the_tune_stage_weighs_the_image_then_the_text_too(tmp_path, steps, weigh_from, text_from, phases):
    recipe = Recipe.full(
        tune_steps=steps, tune_weigh_from=weigh_from, tune_text_from=text_from, tune_img_weight=10.0,
        tune_text_weight=3.0, tune_decay=4,
    )  # fmt: skip
    configs = tune_configs(tmp_path, recipe)
    assert [(c.steps, dict(c.loss_weights)) for c in configs] == phases
    assert all(c.output_dir == str(tmp_path / "tune") and c.resume and c.decay_steps == 4 for c in configs)


def test_the_uvit_runs_read_their_features_into_memory_when_they_fit(tmp_path, monkeypatch):
    import torch

    import unidiffuser.training.data as data

    features = tmp_path / "features"
    data.write_feature_shard(features / "a.safetensors", {"clip_img": torch.zeros(1000, 256)})  # 1 MB
    monkeypatch.setattr(data, "available_memory", lambda: 10**8)
    assert all(c.data_in_memory for c in tune_configs(tmp_path, Recipe.full()))
    monkeypatch.setattr(data, "available_memory", lambda: 10**6)  # 80% of it: less than the shard
    assert not any(c.data_in_memory for c in tune_configs(tmp_path, Recipe.full()))


def test_the_data_stage_writes_the_same_pairs_in_parallel_and_resumes(tmp_path, monkeypatch):
    recipe = Recipe.smoke(examples=24)
    alone, parallel = tmp_path / "alone", tmp_path / "parallel"
    recipe_module._data(alone, recipe)  # below the threshold: one process
    monkeypatch.setattr(recipe_module, "RENDER_CHUNK", 5)
    monkeypatch.setattr(recipe_module, "RENDER_PROCESSES_FROM", 10)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    recipe_module._data(parallel, recipe)  # 5 chunks over 2 spawned processes

    def files(folder):
        return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}

    written = files(alone)
    assert len(written) == 2 * 24 + 1  # a picture and a caption per scene, and DONE
    assert files(parallel) == written
    for name in ("000003.txt", "000017.txt", "000017.png"):  # pairs lost to an interrupted run
        (parallel / name).unlink()
    (parallel / "000011.png").write_bytes(b"cut short")  # a picture written, its caption not
    (parallel / "000011.txt").unlink()
    recipe_module._data(parallel, recipe)
    assert files(parallel) == written


def test_a_rerun_skips_finished_stages(smoke_run):
    out, _, _ = smoke_run
    lines: list[str] = []
    run_recipe(out, Recipe.smoke(threads=1), log=lines.append)
    assert lines == [f"[{s}] done already" for s in STAGES]


def test_the_command_says_what_it_made(smoke_run, capsys):
    from unidiffuser.cli import main

    out, model, _ = smoke_run
    assert main(["recipe", "shapes", "--out", str(out), "--smoke", "--threads", "1", "--stage", "uvit"]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("stages uvit done (")  # not "wrote": no model was written
    assert "unidiffuser eval shapes" not in printed.err
    assert main(["recipe", "shapes", "--out", str(out), "--smoke", "--threads", "1"]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith(f"wrote {model} (")
    assert f"unidiffuser eval shapes --model {model}" in printed.err  # what to do with the model next
    assert f"unidiffuser demo --model {model}" in printed.err


def test_preset_smoke_is_smoke_and_a_preset_may_not_be_given_twice(smoke_run, capsys):
    out, model, _ = smoke_run
    # the smoke run's folder resumes only under the same options: --preset smoke has them
    assert main(["recipe", "shapes", "--out", str(out), "--preset", "smoke", "--threads", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {model} (")
    with pytest.raises(SystemExit, match=r"other options \(.*uvit_steps"):
        main(["recipe", "shapes", "--out", str(out), "--preset", "hour", "--threads", "1"])
    with pytest.raises(SystemExit, match=r"--smoke means --preset smoke; give one of them"):
        main(["recipe", "shapes", "--out", str(out), "--preset", "hour", "--smoke"])


def test_the_hour_preset_is_a_smaller_run_of_the_same_stages(tmp_path):
    full, hour = Recipe.full(), Recipe.hour()
    shorter = (
        "clip_steps",
        "vae_steps",
        "decoder_steps",
        "examples",
        "uvit_width",
        "uvit_steps",
        "tune_steps",
    )
    assert all(getattr(hour, name) < getattr(full, name) for name in shorter)
    assert (hour.image_size, hour.uvit_image_tokens) == (full.image_size, full.uvit_image_tokens)
    # its tune is one run with both loss weights from its first step
    configs = tune_configs(tmp_path, hour)
    assert [(c.steps, dict(c.loss_weights)) for c in configs] == [(10_000, {"img": 10.0, "text": 3.0})]
    assert Recipe.hour(uvit_steps=9).uvit_steps == 9  # --set still applies on top of a preset
    # the EMA forgets the random start: less than 0.1% of it is left at the end of the uvit stage
    assert hour.ema_decay**hour.uvit_steps < 1e-3


def test_other_options_are_refused(smoke_run):
    out, _, _ = smoke_run
    with pytest.raises(ValueError, match=r"other options \(uvit_steps\)"):
        run_recipe(out, Recipe.smoke(uvit_steps=5), log=lambda _: None)


def test_a_record_from_before_an_option_existed_still_resumes(smoke_run):
    """recipe.json written before `precision` existed: the missing option counts as its default."""
    out, _, _ = smoke_run
    record = json.loads((out / "recipe.json").read_text())
    del record["recipe"]["precision"]
    (out / "recipe.json").write_text(json.dumps(record))
    lines: list[str] = []
    run_recipe(out, Recipe.smoke(threads=1), log=lines.append)
    assert lines == [f"[{s}] done already" for s in STAGES]
    with pytest.raises(ValueError, match=r"other options \(precision\)"):
        run_recipe(out, Recipe.smoke(precision="bf16"), log=lambda _: None)


def test_set_changes_recipe_options(smoke_run, capsys):
    out, _, _ = smoke_run
    assert parse_options(["uvit_steps=100_000", "uvit-lr=1e-3", "precision=bf16"]) == {
        "uvit_steps": 100_000, "uvit_lr": 1e-3, "precision": "bf16",
    }  # fmt: skip
    assert Recipe.full(**parse_options(["tune_steps=0"])).tune_steps == 0
    # the option reaches the run: the smoke run's folder refuses a recipe with other U-ViT steps
    with pytest.raises(SystemExit, match=r"other options \(uvit_steps\)"):
        main(["recipe", "shapes", "--out", str(out), "--smoke", "--threads", "1", "--set", "uvit_steps=5"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["recipe", "--help"])
    assert "uvit_steps=35000" in capsys.readouterr().out.replace("\n", " ")  # --help lists the options


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["uvit_steps"], r"expected KEY=VALUE"),
        (["uvit_step=3"], r"'uvit_step' is no recipe option; the options are image_size, "),
        (["uvit_steps=3.5"], r"expected an int"),
        (["uvit_lr=fast"], r"expected a float"),
        (["seed=3"], r"seed has a flag of its own \(--seed\)"),
    ],
)
def test_set_refuses_what_is_no_option(pairs, message):
    with pytest.raises(ValueError, match=message):
        parse_options(pairs)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"uvit_steps": 0}, r"uvit_steps=0: expected a finite number > 0"),
        ({"uvit_lr": -1e-4}, r"uvit_lr=-0.0001: expected a finite number > 0"),
        ({"tune_steps": -1}, r"tune_steps=-1: expected a finite number >= 0"),
        ({"snr_gamma": float("nan")}, r"snr_gamma=nan: expected a finite number >= 0"),
        ({"uvit_lr": float("inf")}, r"uvit_lr=inf: expected a finite number > 0"),
        ({"tune_clean_prob": 1.0}, r"tune_clean_prob=1.0: expected a share in \[0, 1\)"),
        ({"clip_colourless": 1.0}, r"clip_colourless=1.0: expected a share in \[0, 1\)"),
        ({"clip_colourless": -0.5}, r"clip_colourless=-0.5: expected a finite number >= 0"),
        ({"ema_decay": 1.0}, r"ema_decay=1.0: expected a value in \(0, 1\)"),
        ({"uvit_width": 100, "uvit_heads": 3}, r"uvit_width=100: expected a multiple of uvit_heads=3"),
        ({"precision": "fp8"}, r"precision='fp8': expected one of \('no', 'bf16', 'fp16'\)"),
        ({"tune_weigh_from": 9, "tune_text_from": 8}, r"tune_text_from=8: expected >= tune_weigh_from=9"),
        (
            {"uvit_image_tokens": 3},
            r"image_size=64, uvit_image_tokens=3: the 4x smaller latent \(16 a side\) .*; use one of \[1, 2, 4, 8, 16\]",
        ),
        ({"image_size": 40, "uvit_image_tokens": 4}, r"latent \(10 a side\) .*; use one of \[1, 2, 5, 10\]"),
        ({"image_size": 66}, r"image_size=66: expected a multiple of 4"),
        ({"grid": "karras"}, r"grid='karras': expected 'time' .* or 'logsnr'"),
    ],
)
def test_a_recipe_refuses_bad_options_before_any_stage_runs(options, message):
    with pytest.raises(ValueError, match=message):
        Recipe.full(**options)


def test_the_clip_stage_draws_the_recipes_share_of_colourless_pairs(tmp_path, monkeypatch):
    from unidiffuser.shapes import clip_training
    from unidiffuser.shapes.recipe import _clip

    given = {}
    monkeypatch.setattr(clip_training, "train_clip", lambda path, **kwargs: given.update(kwargs))
    _clip(tmp_path, Recipe.full(clip_colourless=0.25))
    assert given["colourless"] == 0.25
    _clip(tmp_path, Recipe.full())
    assert given["colourless"] == 0.0  # the shipped model's CLIP saw none


@pytest.mark.parametrize("tokens", [2, 4, 8])
def test_the_image_is_cut_into_uvit_image_tokens_patches_a_side(tokens):
    side = Recipe.full().image_size // SHAPES_DOWNSAMPLE
    assert side == Recipe.full().image_size // SHAPES_VAE.downsample  # the recipe knows the VAE's factor
    config = network_config(Recipe.full(uvit_image_tokens=tokens), 16, 64, 24, side)
    img = config.modality("img")
    assert img.shape == (4, side, side) and img.patch_size * tokens == side


def test_the_model_has_the_worlds_sizes_and_samples(smoke_run):
    _, model, _ = smoke_run
    pipe = UniDiffuser.from_pretrained(model)
    assert pipe.default_size == (64, 64)
    assert (pipe.guidance_scale, pipe.grid) == (3.0, "logsnr")  # the recipe's sampling defaults
    assert pipe.network.config.modality("text").shape == (24, 16)  # the world's context, the decoder's latent
    assert pipe.text_encoder.max_length == 24
    out = pipe.image_to_text(render(sample_scene(0), 64), steps=2)
    assert len(out.texts) == 1 and isinstance(out.texts[0], str)


def test_eval_scores_every_mode(smoke_run):
    _, model, _ = smoke_run
    pipe = UniDiffuser.from_pretrained(model)
    rows = evaluate(pipe, samples=2, steps=2, guidance_scales=(0.0,), batch_size=2)
    tasks = {r.task for r in rows}
    assert tasks == {
        "t2i, 1 object", "t2i, 2 objects", "i2t, 1 object", "i2t, 2 objects", "image variation",
        "text variation", "joint", "image (valid scene)", "text (valid caption)",
    }  # fmt: skip
    assert all(0.0 <= r.score <= 1.0 and r.n == 2 for r in rows)
    assert {r.split for r in rows if r.task.startswith("t2i")} == {"seen", "held-out"}
    table = format_rows(rows)
    assert table.count("\n") == len(rows) + 1
    one_object = [r for r in rows if r.task in ("t2i, 1 object", "i2t, 1 object")]
    assert len(one_object) == 4 and all(r.extra.startswith("one object ") for r in one_object)
    assert all(r.extra == "" for r in rows if r.task == "i2t, 2 objects")
    pictures = [r for r in rows if r.task in ("t2i, 2 objects", "image variation", "joint")]
    assert all(r.extra == "" or r.extra.startswith("not a scene ") for r in pictures)

    # some tasks alone: the same rows, scored on the same scenes and noise as in the whole table
    some = evaluate(pipe, samples=2, steps=2, guidance_scales=(0.0,), batch_size=2, tasks=("i2t", "text"))
    assert [r.task for r in some] == ["i2t, 1 object", "i2t, 2 objects"] * 2 + ["text (valid caption)"]
    assert some == [r for r in rows if r.task.startswith("i2t") or r.task.startswith("text (")]
    for bad in (("t2i", "captions"), ()):
        with pytest.raises(ValueError, match="name one or more of t2i, i2t"):
            evaluate(pipe, samples=2, steps=2, tasks=bad)

    # the solver asked for reaches every pipeline call
    calls = []
    real = pipe.text

    def spy(n, **kw):
        calls.append(kw["solver"])
        return real(n, **kw)

    pipe.text = spy
    evaluate(pipe, samples=2, steps=2, guidance_scales=(0.0,), batch_size=1, tasks=("text",), solver="ddim")
    assert calls == ["ddim", "ddim"]
    with pytest.raises(ValueError, match="solver='rk4': expected one of dpm"):
        evaluate(pipe, samples=2, steps=2, solver="rk4")

    # best-of: the recipe's whole CLIP is the model's scorer, and K reaches the ranked calls only
    assert pipe.scorer is not None
    asked = []

    def spy_on(name):
        real = getattr(pipe, name)

        def spy(*args, **kw):
            asked.append((name, kw.get("best_of", 1), len(args[0]) if name == "text_to_image" else args[0]))
            return real(*args, **kw)

        setattr(pipe, name, spy)

    for name in ("text_to_image", "joint", "image"):
        spy_on(name)
    ranked = evaluate(
        pipe,
        samples=2,
        steps=2,
        guidance_scales=(0.0,),
        batch_size=4,
        tasks=("t2i", "joint", "image"),
        best_of=2,
    )
    assert len(ranked) == 6 and all(r.n == 2 for r in ranked)
    assert set(asked) == {("text_to_image", 2, 2), ("joint", 2, 2), ("image", 1, 2)}  # 2 outputs of 2 a call
    with pytest.raises(ValueError, match="best_of=0: expected an integer >= 1"):
        evaluate(pipe, samples=2, steps=2, best_of=0)


def test_read_images_says_why_pictures_show_no_scene():
    scene = Scene((Object("circle", "red", "large", 1, 1),), "black")
    third = Scene((Object("cross", "green", "small", 0, 2),), "black")
    pair = Scene(
        (Object("circle", "red", "small", 0, 0), Object("square", "blue", "small", 2, 0)), "black", "left of"
    )
    blank = np.zeros((32, 32, 3), np.uint8)
    three = render_array(pair, 32).copy()
    drawn = render_array(third, 32)
    three[(drawn != 0).any(-1)] = drawn[(drawn != 0).any(-1)]
    images = [render(scene, 32), blank, render(pair, 32), blank, three, blank, render(scene, 32), three]
    scenes, line = read_images(images)
    assert scenes == [scene, None, pair, None, None, None, scene, None]
    assert line == "not a scene 0.62: no object 0.38, three or more objects 0.25"
    assert read_images([render(scene, 32)]) == ([scene], "")


def test_attribute_shares_say_which_attribute_went_wrong():
    asked = Scene((Object("circle", "red", "large", 1, 1),), "black")
    two = Scene((Object("circle", "red", "large"), Object("square", "blue", "small")), None, "left of")
    got = [
        asked,  # right on everything
        Scene((Object("square", "red", "large", 1, 1),), "gray"),  # the shape only (backgrounds not judged)
        None,  # did not parse: wrong on everything
        two,  # two objects for one: wrong on everything
        Scene((Object("circle", "red", "large", 2, 1),), "black"),  # the cell only
    ]
    shares = attribute_shares([(asked, g) for g in got])
    assert shares == {"one object": 0.6, "shape": 0.4, "colour": 0.6, "size": 0.6, "cell": 0.4}
    unplaced = Scene((Object("circle", "red", "large"),))
    assert (
        attribute_shares([(unplaced, asked)])["cell"] != attribute_shares([(unplaced, asked)])["cell"]
    )  # NaN
    with pytest.raises(ValueError, match="one-object scenes"):
        attribute_shares([(two, two)])


def test_demo_writes_a_gallery_of_every_mode(smoke_run, tmp_path, capsys):
    _, model, _ = smoke_run
    assert main(["demo", "--model", str(model), "--out", str(tmp_path), "--steps", "2"]) == 0
    names = ("t2i", "i2t", "joint", "image", "text", "image_variation", "text_variation", "interpolation")
    page = (tmp_path / "index.html").read_text()
    for name in names:
        assert (tmp_path / f"{name}.png").stat().st_size > 0
        assert f"src='{name}.png'" in page
    assert "2 steps (logsnr grid), guidance scale 3," in page  # the model's own settings
    assert "wrote" in capsys.readouterr().out
    assert (
        main(["demo", "--model", str(model), "--out", str(tmp_path), "--steps", "2", "--grid", "time"]) == 0
    )
    assert "2 steps (time grid)" in (tmp_path / "index.html").read_text()


def test_the_vae_loss_weighs_object_pixels():
    from diffusers import AutoencoderKL

    from unidiffuser.shapes.vae_training import SHAPES_VAE

    torch.manual_seed(0)
    vae = AutoencoderKL(**SHAPES_VAE.diffusers_config())
    x, mask = _batch(0, 0, 4, 64)
    assert 0.005 < mask.mean() < 0.3  # objects are a small part of each picture
    plain, _ = vae_loss(vae, x, 0.0, torch.Generator().manual_seed(0))
    weighted, _ = vae_loss(vae, x, 0.0, torch.Generator().manual_seed(0), mask)
    # Same reconstruction, other weights: the losses differ, and both are finite.
    assert torch.isfinite(plain) and torch.isfinite(weighted) and not torch.isclose(plain, weighted)
    background_only = torch.zeros_like(mask)
    same, _ = vae_loss(vae, x, 0.0, torch.Generator().manual_seed(0), background_only)
    assert torch.isclose(same, plain, rtol=1e-5)
    assert np.isfinite(float(weighted.detach()))


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_stage_asked_for_alone_refuses_to_run_before_the_stages_it_reads(smoke_run, tmp_path):
    def refuse(stage):
        run_recipe(tmp_path, Recipe.smoke(threads=1), lambda _: None, only=[stage])

    with pytest.raises(ValueError, match=r"stage decoder reads what stages tokenizers, clip make, and .* holds "
                       r"no finished one: run --stage tokenizers --stage clip first"):  # fmt: skip
        refuse("decoder")
    with pytest.raises(
        ValueError, match=r"stage tune reads what stage uvit makes, .*: run --stage uvit first"
    ):
        refuse("tune")
    assert not (tmp_path / "decoder").exists() and not (tmp_path / "tune").exists()
    # with the stages before it finished in the same call or earlier, it runs
    lines: list[str] = []
    run_recipe(tmp_path, Recipe.smoke(threads=1), lines.append, only=["tokenizers", "clip", "decoder"])
    assert lines[-2:] == ["[decoder] running", lines[-1]] and lines[-1].startswith("[decoder] finished")
    # a frozen source stands for the first four stages; the data stage is still missing
    frozen = Recipe.smoke(threads=1, frozen_from=str(smoke_run[1]))
    run_recipe(tmp_path / "f", frozen, lambda _: None, only=["components"])
    with pytest.raises(ValueError, match=r"stage features reads what stage data makes"):
        run_recipe(tmp_path / "f", frozen, lambda _: None, only=["features"])


def test_frozen_from_takes_the_parts_of_a_model_and_trains_a_fresh_uvit(smoke_run, tmp_path):
    _, source, _ = smoke_run
    lines: list[str] = []
    model = run_recipe(tmp_path, Recipe.smoke(threads=1, frozen_from=str(source)), log=lines.append)
    assert lines[:4] == [f"[{s}] taken from {source}" for s in STAGES[:4]]
    assert [line for line in lines if line.endswith("running")] == [f"[{s}] running" for s in STAGES[4:]]
    assert not (tmp_path / "clip").exists() and not (tmp_path / "vae").exists()
    for part in ("autoencoder.safetensors", "caption_decoder.safetensors"):
        mine, theirs = _tensors(model / part), _tensors(source / part)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    fresh, trained = (
        _tensors(tmp_path / "components" / "network.safetensors"),
        _tensors(source / "network.safetensors"),
    )
    assert any(not torch.equal(fresh[k], trained[k]) for k in fresh)
    pipe = UniDiffuser.from_pretrained(model)
    assert pipe.text_to_image("a big red circle in the center", steps=2, seed=0).images[0].size == (64, 64)
    # its folder remembers where the parts came from
    with pytest.raises(ValueError, match=r"other options \(frozen_from\)"):
        run_recipe(tmp_path, Recipe.smoke(threads=1), log=lambda _: None)


def test_frozen_from_refuses_a_missing_model_or_another_picture_size(smoke_run, tmp_path):
    from unidiffuser.shapes.recipe import frozen_source
    from unidiffuser.shipped import shipped_model_dir

    assert frozen_source("shipped") == shipped_model_dir()
    with pytest.raises(FileNotFoundError, match=r"--frozen-from .*nowhere: no unidiffuser.json there"):
        run_recipe(tmp_path / "a", Recipe.smoke(frozen_from=str(tmp_path / "nowhere")), log=lambda _: None)
    assert not (tmp_path / "a" / "components").exists()
    with pytest.raises(SystemExit, match=r"unidiffuser recipe: --frozen-from nowhere: no unidiffuser.json"):
        main(["recipe", "shapes", "--out", str(tmp_path / "c"), "--smoke", "--frozen-from", "nowhere"])
    _, source, _ = smoke_run
    recipe = Recipe.smoke(threads=1, frozen_from=str(source), image_size=32, uvit_image_tokens=2)
    with pytest.raises(
        ValueError, match=r"made for 64 px pictures, .* image_size is 32; use --set image_size=64"
    ):
        run_recipe(tmp_path / "b", recipe, log=lambda _: None)
