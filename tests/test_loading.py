"""Whole models on disk: our format, the release files, the diffusers layout, convert and sample."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_autoencoder import diffusers_to_ldm

from unidiffuser.cli import main
from unidiffuser.components.autoencoder import TINY
from unidiffuser.components.caption import preset as caption_preset
from unidiffuser.loading import COMPONENTS, load_components, load_pipeline
from unidiffuser.official import to_diffusers_keys, to_official_keys
from unidiffuser.pipeline import UniDiffuser
from unidiffuser.tiny import tiny_pipeline

OFFICIAL_KWARGS = {
    "img_size": 8, "in_chans": 4, "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2,
    "mlp_ratio": 4, "qkv_bias": False, "mlp_time_embed": False, "text_dim": 8, "num_text_tokens": 77,
    "clip_img_dim": 16,
}  # fmt: skip


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=1)


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))


def fingerprint(pipe, image):
    """Outputs that depend on every component: t2i latents, decoded pixels, i2t captions."""
    t2i = pipe.text_to_image("a red circle", steps=3, seed=2, return_latents=True)
    i2t = pipe.image_to_text(image, steps=3, seed=2, return_latents=True)
    return t2i.latents["img"], np.asarray(t2i.images[0]), i2t.latents["text"], i2t.texts


def assert_same(a, b):
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and torch.equal(a[2], b[2]) and a[3] == b[3]


@pytest.fixture(scope="module")
def release_dir(pipe, tmp_path_factory):
    """A tiny model written exactly as the release files are laid out."""
    d = tmp_path_factory.mktemp("release")
    torch.save(to_official_keys(pipe.network.state_dict()), d / "uvit_v1.pth")
    torch.save(
        diffusers_to_ldm(pipe.autoencoder.vae.state_dict(), len(TINY.block_out_channels)),
        d / "autoencoder_kl.pth",
    )
    decoder = pipe.caption_decoder
    weights = dict(decoder.state_dict_for_saving())
    weights["gpt.lm_head.weight"] = weights["gpt.transformer.wte.weight"]  # the release stores the tied copy
    torch.save({f"module.{k}": v for k, v in weights.items()}, d / "caption_decoder.pth")
    pipe.image_encoder.save_pretrained(d / "clip-vit-base-patch32")
    pipe.text_encoder.save_pretrained(d / "clip-vit-large-patch14")
    decoder.tokenizer.save_pretrained(str(d / "gpt2"))
    config = {
        "uvit": OFFICIAL_KWARGS,
        "autoencoder": TINY.to_dict(),
        "caption_decoder": caption_preset("tiny").to_dict(),
    }
    (d / "release_config.json").write_text(json.dumps(config))
    return d


def test_our_format_round_trip(pipe, image, tmp_path):
    pipe.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "autoencoder.safetensors", "caption_decoder.safetensors", "caption_tokenizer", "image_encoder",
        "network.safetensors", "scorer", "text_encoder", "unidiffuser.json",
    ]  # fmt: skip
    assert not list(tmp_path.glob(".model.tmp-*"))  # written to a temp dir, then renamed
    again = UniDiffuser.from_pretrained(tmp_path / "model")
    assert_same(fingerprint(pipe, image), fingerprint(again, image))
    for name, weight in pipe.scorer.model.state_dict().items():
        assert torch.equal(weight, again.scorer.model.state_dict()[name]), name
    with pytest.raises(FileExistsError, match="exists; choose a new directory"):
        pipe.save_pretrained(tmp_path / "model")


def test_release_files_load_to_the_same_model(pipe, image, release_dir):
    loaded = UniDiffuser.from_pretrained(release_dir)
    assert_same(fingerprint(pipe, image), fingerprint(loaded, image))


@pytest.fixture(scope="module")
def diffusers_dir(pipe, tmp_path_factory):
    """The tiny model in the diffusers layout, written by diffusers' own classes."""
    from diffusers.pipelines.deprecated.unidiffuser.modeling_text_decoder import UniDiffuserTextDecoder
    from diffusers.pipelines.deprecated.unidiffuser.modeling_uvit import UniDiffuserModel

    d = tmp_path_factory.mktemp("hub")
    unet = UniDiffuserModel(
        text_dim=8, clip_img_dim=16, num_text_tokens=77, num_attention_heads=2, attention_head_dim=16,
        in_channels=4, out_channels=4, num_layers=2, sample_size=8, patch_size=2, activation_fn="gelu",
        norm_type="layer_norm", block_type="unidiffuser", pre_layer_norm=False, use_data_type_embedding=True,
        ff_final_dropout=True,
    )  # fmt: skip
    unet.load_state_dict(to_diffusers_keys(pipe.network.state_dict()), strict=True)
    unet.save_pretrained(d / "unet")
    pipe.autoencoder.vae.save_pretrained(d / "vae")
    pipe.image_encoder.save_pretrained(d / "image_encoder")
    pipe.text_encoder.model.save_pretrained(d / "text_encoder")
    pipe.text_encoder.tokenizer.save_pretrained(d / "clip_tokenizer")
    cfg = caption_preset("tiny")
    decoder = UniDiffuserTextDecoder(
        prefix_length=77, prefix_inner_dim=cfg.feature_dim, prefix_hidden_dim=cfg.prefix_dim,
        vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.gpt2["n_layer"],
        n_head=cfg.gpt2["n_head"],
    )  # fmt: skip
    ours = pipe.caption_decoder.state_dict_for_saving()
    missing, unexpected = decoder.load_state_dict(
        {("transformer." + k[4:] if k.startswith("gpt.") else k): v for k, v in ours.items()}, strict=False
    )
    assert unexpected == [] and set(missing) <= {"transformer.lm_head.weight"}
    decoder.save_pretrained(d / "text_decoder", safe_serialization=False)  # tied weights: a pickle
    pipe.caption_decoder.tokenizer.save_pretrained(str(d / "text_tokenizer"))
    return d


def test_diffusers_layout_loads_to_the_same_model(pipe, image, diffusers_dir):
    loaded = UniDiffuser.from_pretrained(diffusers_dir)
    assert_same(fingerprint(pipe, image), fingerprint(loaded, image))


NETWORK_FILES = {
    "ours": "network.safetensors",
    "release": "uvit_v1.pth",
    "diffusers": "unet/diffusion_pytorch_model.safetensors",
}


@pytest.mark.parametrize("layout", list(NETWORK_FILES))
def test_components_load_without_reading_the_network(layout, pipe, release_dir, diffusers_dir, tmp_path):
    """The network's weights file is corrupt; the components (and the network's config) still load."""
    source = {"release": release_dir, "diffusers": diffusers_dir}.get(layout)
    if source is None:
        source = tmp_path / "saved"
        pipe.save_pretrained(source)
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    assert (copy / NETWORK_FILES[layout]).is_file()
    (copy / NETWORK_FILES[layout]).write_bytes(b"not a weights file")
    with pytest.raises(ValueError, match="cannot read weights"):
        load_pipeline(copy)  # the whole model needs that file

    parts = load_components(copy)
    assert parts.network_config == pipe.network.config and parts.data_type == pipe.data_type
    for name in COMPONENTS:
        expected, got = getattr(pipe, name).state_dict(), getattr(parts, name).state_dict()
        assert expected.keys() == got.keys(), name
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
        assert not any(p.requires_grad for p in getattr(parts, name).parameters()), name
    assert parts.device == torch.device("cpu")

    # one component: the other components' files are not needed either
    for f in ("autoencoder.safetensors", "autoencoder_kl.pth", "vae"):
        if (copy / f).is_dir():
            shutil.rmtree(copy / f)
        else:
            (copy / f).unlink(missing_ok=True)
    alone = load_components(copy, ["text_encoder"])
    assert alone.autoencoder is alone.image_encoder is alone.caption_decoder is None
    prompts = ["a red circle", "two blue squares"]
    assert torch.equal(alone.text_encoder(prompts), pipe.text_encoder(prompts))
    with pytest.raises(ValueError, match=r"components \['vae'\]: choose one or more of"):
        load_components(copy, ["vae"])


def test_convert_then_sample_from_the_command_line(release_dir, image, tmp_path, capsys):
    assert main(["convert", str(release_dir), str(tmp_path / "ours")]) == 0
    picture = tmp_path / "in.png"
    image.save(picture)
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(tmp_path / "ours"), "--mode", "t2i", "--prompt", "a cat", "--prompt", "a dog",
                 "-n", "2", "--steps", "3", "--out", str(out)]) == 0  # fmt: skip
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"t2i_00{i}.png" for i in range(4)] + ["t2i_grid.png", "t2i_settings.json"]
    settings = json.loads((out / "t2i_settings.json").read_text())
    assert settings["prompt"] == ["a cat", "a dog"] and settings["steps"] == 3 and settings["guidance"] == 7.0
    assert settings["guidance_mode"] == "uncond"  # the default, as used
    assert (
        main(
            [
                "sample",
                "--model",
                str(tmp_path / "ours"),
                "--mode",
                "i2t",
                "--image",
                str(picture),
                "--steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    captions = (out / "i2t_captions.txt").read_text(encoding="utf-8").splitlines()
    assert len(captions) == 1 and captions[0] in capsys.readouterr().out


def test_interpolation_from_the_command_line(release_dir, image, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    image.save(a)
    image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(b)
    out = tmp_path / "samples"
    args = ["sample", "--model", str(release_dir), "--mode", "interp", "--image", str(a), "--image", str(b)]
    assert main([*args, "--frames", "3", "--steps", "3", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"interp_00{i}.png" for i in range(3)] + ["interp_grid.png", "interp_settings.json"]
    settings = json.loads((out / "interp_settings.json").read_text())
    assert settings["frames"] == 3 and settings["image"] == [str(a), str(b)]
    assert settings["guidance"] is None  # unguided, whatever the model's own scale
    assert settings["solver"] is None  # DDIM there and back, whatever --solver would say
    # the files are the pipeline's frames, ends included
    pipe = UniDiffuser.from_pretrained(release_dir)
    frames = pipe.interpolate(str(a), str(b), frames=3, steps=3, seed=0).images
    for i, frame in enumerate(frames):
        assert np.array_equal(np.asarray(Image.open(out / f"interp_00{i}.png")), np.asarray(frame))
    assert not np.array_equal(np.asarray(frames[0]), np.asarray(frames[2]))
    grid = Image.open(out / "interp_grid.png")
    assert grid.width > 2 * grid.height  # the path as one row


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--mode interp joins exactly two --image \\(got 1\\)"),
        (["--image", "{a}", "-n", "2"], "-n does not apply"),
        (["--image", "{a}", "--guidance", "3"], "--guidance does not apply to --mode interp"),
        (["--image", "{a}", "--solver", "ddim"], "--solver does not apply to --mode interp"),
        (["--image", "{a}", "--frames", "1"], "frames=1: expected an integer >= 2"),
    ],
)
def test_interpolation_argument_errors(release_dir, image, tmp_path, extra, message):
    a = tmp_path / "a.png"
    image.save(a)
    extra = [e.format(a=a) for e in extra]
    with pytest.raises(SystemExit, match=message):
        main(
            [
                "sample",
                "--model",
                str(release_dir),
                "--mode",
                "interp",
                "--image",
                str(a),
                *extra,
                "--steps",
                "2",
            ]
        )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "t2i"], "--mode t2i needs at least one --prompt"),
        (["--mode", "i2t"], "--mode i2t needs at least one --image"),
        (["--mode", "i2t", "--image", "missing.png"], "--image missing.png: no such file"),
        (
            ["--mode", "i2t", "--prompt", "a cat"],
            "--prompt does not apply to --mode i2t \\(it is for t2i, t2i2t\\)",
        ),
        (["--mode", "t2i", "--prompt", "a", "--image", "b.png"], "--image does not apply to --mode t2i"),
        (["--mode", "i2t", "--negative-prompt", "a"], "--negative-prompt does not apply to --mode i2t"),
        (["--mode", "t", "--guidance", "3"], "--guidance does not apply to --mode t "),
        (["--mode", "i2t2i", "--height", "64"], "--height does not apply to --mode i2t2i"),
        (["--mode", "t2i", "--prompt", "a", "--frames", "3"], "--frames does not apply to --mode t2i"),
        (["--mode", "joint", "--guidance-mode", "empty"], "--guidance-mode does not apply to --mode joint"),
    ],
)
def test_sample_argument_errors(release_dir, args, message):
    with pytest.raises(SystemExit, match=message):
        main(["sample", "--model", str(release_dir), *args])


def test_sample_refuses_a_bad_size_before_any_speed_setup(release_dir, monkeypatch):
    def no_setup(*args, **kwargs):
        raise AssertionError("the speed options were applied before the size was checked")

    monkeypatch.setattr("unidiffuser.sample_cli.apply_speed_arguments", no_setup)
    args = ["--mode", "t2i", "--prompt", "a cat", "--height", "30", "--fast"]
    with pytest.raises(SystemExit, match="unidiffuser sample: height=30: expected a positive multiple of"):
        main(["sample", "--model", str(release_dir), *args])


def sample_settings(model: Path, out: Path, *extra: str) -> dict:
    """The settings file of a two-step ``unidiffuser sample`` t2i run of ``model``."""
    args = ["sample", "--model", str(model), "--prompt", "a cat", "--steps", "2", "--out", str(out), *extra]
    assert main(args) == 0
    return json.loads((out / "t2i_settings.json").read_text())


def test_the_model_directory_carries_its_default_guidance(pipe, image, tmp_path):
    assert pipe.guidance_scale == 7.0  # the released default, when nothing says otherwise
    own = UniDiffuser(
        pipe.network, pipe.autoencoder, pipe.image_encoder, pipe.text_encoder, pipe.caption_decoder,
        guidance_scale=2.5,
    )  # fmt: skip
    own.save_pretrained(tmp_path / "own")
    meta = json.loads((tmp_path / "own" / "unidiffuser.json").read_text())
    assert meta["sampling"] == {"guidance_scale": 2.5, "grid": "time"}
    again = UniDiffuser.from_pretrained(tmp_path / "own")
    assert again.guidance_scale == 2.5
    # a call that names no scale samples at the model's: the same as naming 2.5, not as naming 7
    left_out = again.text_to_image("a red circle", steps=3, seed=2, return_latents=True).latents["img"]
    named = again.text_to_image("a red circle", steps=3, seed=2, guidance_scale=2.5, return_latents=True)
    released = again.text_to_image("a red circle", steps=3, seed=2, guidance_scale=7.0, return_latents=True)
    assert torch.equal(left_out, named.latents["img"])
    assert not torch.allclose(left_out, released.latents["img"])
    assert sample_settings(tmp_path / "own", tmp_path / "samples")["guidance"] == 2.5
    # a file written before the field existed loads with the released default
    del meta["sampling"]
    shutil.copytree(tmp_path / "own", tmp_path / "older")
    (tmp_path / "older" / "unidiffuser.json").write_text(json.dumps(meta))
    assert UniDiffuser.from_pretrained(tmp_path / "older").guidance_scale == 7.0
    assert load_components(tmp_path / "own", ["autoencoder"]).guidance_scale == 2.5
    for bad in (-1, "7", float("nan"), True):
        meta["sampling"] = {"guidance_scale": bad}
        (tmp_path / "older" / "unidiffuser.json").write_text(json.dumps(meta))
        with pytest.raises(
            ValueError, match=r"unidiffuser\.json: sampling\.guidance_scale=.*finite number >= 0"
        ):
            UniDiffuser.from_pretrained(tmp_path / "older")
    with pytest.raises(ValueError, match=r"guidance_scale=-2: expected a finite number >= 0"):
        UniDiffuser(pipe.network, *[getattr(pipe, n) for n in COMPONENTS], guidance_scale=-2)


def test_the_model_directory_carries_its_time_grid(pipe, image, tmp_path, monkeypatch):
    import unidiffuser.tasks as tasks
    from unidiffuser.solvers import logsnr_grid

    assert pipe.grid == "time"  # the released sampler's, when nothing says otherwise
    own = UniDiffuser(
        pipe.network, pipe.autoencoder, pipe.image_encoder, pipe.text_encoder, pipe.caption_decoder,
        grid="logsnr",
    )  # fmt: skip
    own.save_pretrained(tmp_path / "own")
    meta = json.loads((tmp_path / "own" / "unidiffuser.json").read_text())
    assert meta["sampling"] == {"guidance_scale": 7.0, "grid": "logsnr"}
    again = UniDiffuser.from_pretrained(tmp_path / "own")
    assert again.grid == "logsnr"
    assert load_components(tmp_path / "own", ["autoencoder"]).grid == "logsnr"

    # every sampling call integrates over the pipeline's grid: record the times the solver visits
    visited = []
    real_sample = tasks.sample

    def recording(model_fn, x, schedule, **kwargs):
        def spy(x, t):
            visited.append(float(t))
            return model_fn(x, t)

        spy.__dict__.update(model_fn.__dict__)
        return real_sample(spy, x, schedule, **kwargs)

    monkeypatch.setattr(tasks, "sample", recording)
    logsnr = again.text_to_image("a red circle", steps=4, seed=2, solver="ddim", return_latents=True)
    assert visited == pytest.approx(logsnr_grid(again.schedule, 4)[:-1].tolist())
    visited.clear()
    again.grid = "time"
    time = again.text_to_image("a red circle", steps=4, seed=2, solver="ddim", return_latents=True)
    assert visited == pytest.approx([1.0, 0.75025, 0.5005, 0.25075])
    assert not torch.allclose(logsnr.latents["img"], time.latents["img"])
    monkeypatch.undo()

    # the command line samples at the model's grid unless --grid names another, and records it
    assert sample_settings(tmp_path / "own", tmp_path / "samples")["grid"] == "logsnr"
    assert sample_settings(tmp_path / "own", tmp_path / "samples", "--grid", "time")["grid"] == "time"
    # a file written before the field existed loads with the released grid; a bad one is refused
    del meta["sampling"]["grid"]
    shutil.copytree(tmp_path / "own", tmp_path / "older")
    (tmp_path / "older" / "unidiffuser.json").write_text(json.dumps(meta))
    assert UniDiffuser.from_pretrained(tmp_path / "older").grid == "time"
    meta["sampling"]["grid"] = "karras"
    (tmp_path / "older" / "unidiffuser.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"unidiffuser\.json: sampling\.grid='karras': expected 'time'"):
        UniDiffuser.from_pretrained(tmp_path / "older")
    with pytest.raises(ValueError, match=r"grid='uniform': expected 'time'"):
        UniDiffuser(pipe.network, *[getattr(pipe, n) for n in COMPONENTS], grid="uniform")
    with pytest.raises(ValueError, match=r"pipe\.grid='cosine': expected 'time'"):
        again.grid = "cosine"  # set by hand, it is checked as well
    assert again.grid == "time"


def test_loading_errors(release_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        UniDiffuser.from_pretrained(tmp_path / "nothing")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "weights.bin").write_bytes(b"0")
    with pytest.raises(ValueError, match=r"holds none of the known layouts.*weights\.bin"):
        UniDiffuser.from_pretrained(tmp_path / "odd")
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in Path(release_dir).iterdir():
        (broken / p.name).symlink_to(p)
    (broken / "uvit_v1.pth").unlink()
    (broken / "uvit_v1.pth").write_bytes((release_dir / "uvit_v1.pth").read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match=r"cannot read weights from .*uvit_v1\.pth"):
        UniDiffuser.from_pretrained(broken)
    (broken / "uvit_v1.pth").unlink()
    (broken / "uvit_v1.pth").symlink_to(release_dir / "uvit_v1.pth")
    (broken / "autoencoder_kl.pth").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"missing autoencoder_kl\.pth.*huggingface\.co/thu-ml/unidiffuser-v1"
    ):
        UniDiffuser.from_pretrained(broken)
    (broken / "autoencoder_kl.pth").symlink_to(release_dir / "autoencoder_kl.pth")
    (broken / "release_config.json").unlink()  # now the released v1 architecture is assumed
    with pytest.raises(ValueError, match="released UniDiffuser"):
        UniDiffuser.from_pretrained(broken)


DAMAGED = [
    (
        "autoencoder.safetensors",
        None,
        r"cannot read its autoencoder \(SafetensorError: .*convert or copy the model again",
    ),
    ("image_encoder/model.safetensors", None, r"cannot read its image encoder \(SafetensorError"),
    ("caption_decoder.safetensors", None, r"cannot read weights from .*caption_decoder\.safetensors"),
    ("unidiffuser.json", lambda m: m.pop("network"), r"unidiffuser\.json: no 'network' object"),
    (
        "unidiffuser.json",
        lambda m: m["network"].update(width="big"),
        r"network: width='big': expected a whole",
    ),
    (
        "unidiffuser.json",
        lambda m: m["network"].update(num_heads=0),
        r"network: num_heads=0: expected a whole",
    ),
    (
        "unidiffuser.json",
        lambda m: m["network"].update(colour=1),
        r"network: not a network config \(TypeError",
    ),
    (
        "unidiffuser.json",
        lambda m: m.update(data_type=7),
        r"data_type 7: expected 0 \(web\) or 1 \(curated\)",
    ),
]


@pytest.mark.parametrize(("damaged", "change", "message"), DAMAGED)
def test_a_damaged_model_folder_is_named_in_one_line(pipe, tmp_path, damaged, change, message):
    import json
    import shutil

    good = tmp_path / "good"
    pipe.save_pretrained(good)
    folder = tmp_path / "damaged"
    shutil.copytree(good, folder)
    path = folder / damaged
    if change is None:  # 16 bytes of junk over the start of a weights file
        with path.open("r+b") as file:
            file.write(b"\0" * 16)
    else:
        meta = json.loads(path.read_text())
        change(meta)
        path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        UniDiffuser.from_pretrained(folder)
    (folder / "unidiffuser.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"unidiffuser\.json: not JSON \(Expecting property name"):
        UniDiffuser.from_pretrained(folder)
