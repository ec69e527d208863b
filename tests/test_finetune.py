"""Fine-tuning from released weights, the caption decoder's training stage, and periodic samples.

Everything runs on tiny models: a width-32 U-ViT saved under the released names with a
release_config.json (as loading.py documents), feature shards of its shapes written here, and the
tiny random components of ``tiny_pipeline``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_tiny_features
from PIL import Image
from safetensors.torch import save_file

import unidiffuser.training.trainer as trainer_module
from unidiffuser.components.images import make_grid
from unidiffuser.network import UViT, UViTConfig
from unidiffuser.official import config_from_official, from_official_keys, to_diffusers_keys, to_official_keys
from unidiffuser.pipeline import UniDiffuser
from unidiffuser.tiny import tiny_pipeline
from unidiffuser.training import (
    TrainConfig,
    find_checkpoints,
    load_network_weights,
    load_weights,
    train,
    write_feature_shard,
)
from unidiffuser.training.checkpoint import pretrained_source
from unidiffuser.training.cli import main as cli
from unidiffuser.training.config import DecoderTrainConfig, parse_toml
from unidiffuser.training.decoder import (
    initial_decoder,
    load_decoder_checkpoint,
    open_captions,
    read_captions,
    train_decoder,
    write_caption_features,
)
from unidiffuser.training.trainer import RunLog, load_components

# The released network's keyword arguments, shrunk: the architecture of tiny_network_config().
OFFICIAL_KWARGS = {
    "img_size": 8, "in_chans": 4, "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2,
    "mlp_ratio": 4, "qkv_bias": False, "mlp_time_embed": False, "text_dim": 8, "num_text_tokens": 77,
    "clip_img_dim": 16,
}  # fmt: skip
ARCH = config_from_official(OFFICIAL_KWARGS)
CAPTIONS = [
    "a photo of a cat sitting on a red sofa",
    "a dog running on the beach at sunset",
    "a bowl of fruit on a wooden table",
    "a small boat floating on a calm river",
    "a man holding an umbrella in the rain",
    "a train crossing a snowy valley",
    "a cup of coffee next to a laptop",
    "a lighthouse on a rocky coast",
]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), f"weight {k} differs"


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny network as the release ships it: uvit_v1.pth (official names) + release_config.json."""
    d = tmp_path_factory.mktemp("release")
    torch.manual_seed(123)
    official = to_official_keys(UViT(ARCH).state_dict())
    torch.save(official, d / "uvit_v1.pth")
    (d / "release_config.json").write_text(json.dumps({"uvit": OFFICIAL_KWARGS}))
    return d, official


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Synthetic features of the network's modalities: VAE moments, CLIP image embedding, text latent."""
    root = tmp_path_factory.mktemp("features")
    write_tiny_features(root / "part-0.safetensors", 16)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """tiny_pipeline in our format: the components of the samples and of the caption decoder."""
    d = tmp_path_factory.mktemp("model") / "tiny"
    tiny_pipeline(seed=0).save_pretrained(d)
    return d


def config(out: Path, data: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(data), output_dir=str(out), steps=2, batch_size=4, lr=1e-3, warmup_steps=1, ema_decay=0.5,
        checkpoint_every=2, log_every=1, seed=0,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------
# Fine-tuning from released weights


def test_fine_tune_from_the_released_file(released, shards, tmp_path, monkeypatch):
    release_dir, official = released
    started = {}
    real = trainer_module.build_optimizer

    def spy(model, cfg, *args):  # called once the starting weights are loaded, before any step
        started.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(model, cfg, *args)

    monkeypatch.setattr(trainer_module, "build_optimizer", spy)
    run = tmp_path / "run"
    result = train(config(run, shards, init_from=str(release_dir / "uvit_v1.pth")))  # model left out

    assert_same_weights(started, from_official_keys(official))  # the released weights, renamed
    resolved = json.loads((run / "config.json").read_text())
    assert UViTConfig.from_dict(resolved["model_config"]) == ARCH  # that of release_config.json
    assert "model" not in parse_toml((run / "config.toml").read_text())
    assert sorted(losses(run)) == [1, 2] and all(map(math.isfinite, losses(run).values()))
    moved = max((v.cpu() - started[k].cpu()).abs().max().item() for k, v in result.model.state_dict().items())
    assert moved > 1e-5  # it trained

    # The result saves and reloads: the checkpoint's EMA rebuilds the same network.
    (ckpt,) = find_checkpoints(run / "checkpoints")[0]
    assert ckpt.step == 2 and ckpt.model_config == ARCH
    again = UViT(ckpt.model_config).eval()
    again.load_state_dict(load_weights(ckpt, "ema"))
    assert_same_weights(again.state_dict(), result.ema.state_dict())
    g = torch.Generator().manual_seed(1)
    inputs = {
        "img": torch.randn(2, 4, 8, 8, generator=g), "clip_img": torch.randn(2, 16, generator=g),
        "text": torch.randn(2, 77, 8, generator=g), "data_type": torch.tensor([0, 1]),
    }  # fmt: skip
    times = {"image": torch.tensor([10.0, 500.0]), "text": torch.tensor([999.0, 0.0])}
    with torch.no_grad():
        expected, got = result.ema.cpu()(inputs, times), again(inputs, times)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6)

    # ... and seeds the next fine-tune: the run directory means its newest checkpoint's EMA.
    source = pretrained_source(run)
    assert source.config == ARCH and "step_000002" in source.description
    assert_same_weights(load_network_weights(run), load_weights(ckpt, "ema"))


def test_every_form_of_init_from_reads_the_same_weights(released, tmp_path):
    release_dir, official = released
    ours = from_official_keys(official)
    # our model format: unidiffuser.json + network.safetensors
    (tmp_path / "ours").mkdir()
    save_file(ours, str(tmp_path / "ours" / "network.safetensors"))
    meta = {"format": "unidiffuser", "version": 1, "network": ARCH.to_dict()}
    (tmp_path / "ours" / "unidiffuser.json").write_text(json.dumps(meta))
    # the diffusers layout: the unet/ folder of diffusers' own UniDiffuserModel
    modeling = pytest.importorskip("diffusers.pipelines.deprecated.unidiffuser.modeling_uvit")
    unet = modeling.UniDiffuserModel(
        text_dim=8, clip_img_dim=16, num_text_tokens=77, num_attention_heads=2, attention_head_dim=16,
        in_channels=4, out_channels=4, num_layers=2, sample_size=8, patch_size=2, activation_fn="gelu",
        norm_type="layer_norm", block_type="unidiffuser", pre_layer_norm=False, use_data_type_embedding=True,
        ff_final_dropout=True,
    )  # fmt: skip
    unet.load_state_dict(to_diffusers_keys(ours), strict=True)
    unet.save_pretrained(tmp_path / "hub" / "unet")
    # a released file without release_config.json beside it: its architecture is unknown
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "weights.pth").write_bytes((release_dir / "uvit_v1.pth").read_bytes())

    forms = {
        release_dir / "uvit_v1.pth": "the release file uvit_v1.pth",
        release_dir: "the release file uvit_v1.pth",
        tmp_path / "ours": "the model ours",
        tmp_path / "hub": "diffusers",
        tmp_path / "hub" / "unet": "diffusers",
        tmp_path / "bare" / "weights.pth": "the release file weights.pth",
    }
    for path, description in forms.items():
        source = pretrained_source(path)
        assert description in source.description, path
        assert source.config == (None if path.parent.name == "bare" else ARCH), path
        assert_same_weights(load_network_weights(path), ours)
    # an explicit model must agree with the released v1 architecture of a bare uvit_v1.pth
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "uvit_v1.pth").symlink_to(release_dir / "uvit_v1.pth")
    assert pretrained_source(tmp_path / "v1" / "uvit_v1.pth").config.width == 1536


def test_fine_tuning_errors_name_the_mismatch(released, shards, tmp_path):
    release_dir, official = released
    file = str(release_dir / "uvit_v1.pth")
    wider = {**ARCH.to_dict(), "width": 64, "num_heads": 4}
    with pytest.raises(ValueError, match=r"init_from = .*holds another architecture .*\(width 32 vs 64"):
        train(config(tmp_path / "a", shards, init_from=file, model=wider))
    # strict keys: one missing, one unexpected, one of another shape
    broken = dict(official)
    del broken["decoder_pred.bias"]
    broken["extra.weight"] = torch.zeros(1)
    (tmp_path / "b").mkdir()
    torch.save(broken, tmp_path / "b" / "uvit_v1.pth")
    (tmp_path / "b" / "release_config.json").write_text(json.dumps({"uvit": OFFICIAL_KWARGS}))
    with pytest.raises(ValueError, match=r"missing \['head.img.bias'\], unexpected \['extra.weight'\]"):
        train(config(tmp_path / "b" / "run", shards, init_from=str(tmp_path / "b")))
    reshaped = dict(official)
    reshaped["pos_embed"] = torch.zeros(1, 3, 32)
    torch.save(reshaped, tmp_path / "b" / "uvit_v1.pth")
    with pytest.raises(ValueError, match=r"init_from = .*shape mismatch .*pos_embed: \(1, 3, 32\)"):
        train(config(tmp_path / "b" / "run2", shards, init_from=str(tmp_path / "b")))
    # weights that do not say their architecture need model
    save_file(from_official_keys(official), str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match=r"model = None: is left out and init_from = .* does not say"):
        train(config(tmp_path / "c", shards, init_from=str(tmp_path / "plain.safetensors")))
    with pytest.raises(ValueError, match=r"init_from = .*not found: not a checkpoint directory"):
        train(config(tmp_path / "d", shards, init_from=str(tmp_path / "nothing.pth")))
    assert cli(["train", "--init-from", file, "--dry-run"]) == 0  # the architecture is read, nothing trained


# ---------------------------------------------------------------------------------------------
# Sample grids


def test_sample_grids_from_the_ema_network(model_dir, shards, tmp_path, capsys):
    run = tmp_path / "run"
    prompts = ("a red square", "a blue circle")
    cfg = config(
        run, shards, model=ARCH.to_dict(), steps=3, components=str(model_dir), sample_every=2,
        sample_prompts=prompts, sample_steps=2,
    )  # fmt: skip
    device = train(cfg).ema.device  # the trainer's (CUDA where there is one)
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000002"]  # every 2 of 3 steps
    step = run / "samples" / "step_000002"
    assert sorted(p.name for p in step.iterdir()) == [
        "i2t_captions.txt", "i2t_grid.png", "joint_captions.txt", "joint_grid.png", "samples.json",
        "t2i_grid.png",
    ]  # fmt: skip
    assert len((step / "i2t_captions.txt").read_text().splitlines()) == 2
    assert len((step / "joint_captions.txt").read_text().splitlines()) == 2
    assert json.loads((step / "samples.json").read_text())["prompts"] == list(prompts)
    with Image.open(step / "t2i_grid.png") as grid:
        assert grid.width >= 2 * 64  # two 64-pixel pictures side by side
    assert "samples: wrote" in capsys.readouterr().err

    # The pictures are those of the EMA network at that step (saved in the step-2 checkpoint).
    ema = UViT(ARCH).eval()
    ema.load_state_dict(load_weights(run / "checkpoints" / "step_000002", "ema"))
    components = load_components(str(model_dir), ARCH, device)
    parts = ("autoencoder", "image_encoder", "text_encoder", "caption_decoder")

    def t2i_grid(network: UViT) -> np.ndarray:
        pipe = UniDiffuser(network.to(device), *(getattr(components, k) for k in parts))
        return np.asarray(make_grid(pipe.text_to_image(list(prompts), steps=2, seed=0).images, list(prompts)))

    with Image.open(step / "t2i_grid.png") as grid:
        written = np.asarray(grid.convert("RGB")).astype(int)
    # equal up to rounding: CPU kernels may differ in the last bits with the weights' memory alignment
    assert np.abs(written - t2i_grid(ema)).max() <= 1
    ema.load_state_dict(load_weights(run / "checkpoints" / "step_000003", "ema"))
    assert np.abs(written - t2i_grid(ema)).max() > 1  # another step's network draws other pictures
    wide = ARCH.to_dict()
    wide["modalities"] = [{**m, "shape": [77, 16]} if m["name"] == "text" else m for m in wide["modalities"]]
    with pytest.raises(
        ValueError, match=r"components = .*its text has shape \(77, 8\), the run's network \(77, 16\)"
    ):
        load_components(str(model_dir), UViTConfig.from_dict(wide), torch.device("cpu"))


def test_sample_images_that_are_no_pictures_are_refused_before_the_first_step(model_dir, shards, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    cfg = config(
        tmp_path / "run", shards, model=ARCH.to_dict(), steps=3, components=str(model_dir), sample_every=2,
        sample_images=(str(notes),),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"sample_images: cannot read .*notes\.png as an image"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )


def test_no_samples_without_an_image_text_network_or_components(shards, tmp_path, capsys):
    train(TrainConfig(model="toy", data="toy", output_dir=str(tmp_path / "toy"), steps=2, batch_size=4,
                      warmup_steps=1, sample_every=1, checkpoint_every=2))  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("is not the image-text layout") == 1  # said once, not at every step
    assert not (tmp_path / "toy" / "samples").exists()
    train(config(tmp_path / "bare", shards, model=ARCH.to_dict(), steps=2, sample_every=1))
    assert capsys.readouterr().err.count("no components are given") == 1
    assert not (tmp_path / "bare" / "samples").exists()


# ---------------------------------------------------------------------------------------------
# The caption decoder's training stage


def decoder_config(out: Path, captions: Path, **kw) -> DecoderTrainConfig:
    base = dict(
        captions=str(captions), output_dir=str(out), steps=60, batch_size=8, lr=1e-2, warmup_steps=5,
        checkpoint_every=30, log_every=10, seed=0,
    )  # fmt: skip
    return DecoderTrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def captions_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("captions") / "captions.txt"
    path.write_text("\n".join(CAPTIONS) + "\n")
    return path


@pytest.fixture(scope="module")
def learned(model_dir, captions_file, tmp_path_factory):
    """60 steps from the tiny model's random decoder, with its text encoder."""
    run = tmp_path_factory.mktemp("decoder") / "run"
    return run, train_decoder(decoder_config(run, captions_file, init_from=str(model_dir)))


def reproduced(decoder, features) -> int:
    with torch.no_grad():
        return sum(a == b for a, b in zip(decoder.generate(decoder.encode(features)), CAPTIONS, strict=True))


def test_the_decoder_learns_to_read_captions_back(model_dir, learned):
    run, result = learned
    decoder = result.decoder.cpu()  # trained on CUDA where there is one
    pipe = tiny_pipeline(seed=0)  # the components saved in model_dir
    with torch.no_grad():
        features = pipe.text_encoder(CAPTIONS)  # (8, 77, 16)
    assert reproduced(pipe.caption_decoder, features) == 0  # where it started
    assert reproduced(decoder, features) >= 6  # most captions, from their own features
    assert losses(run)[60] < losses(run)[10] / 3

    # A checkpoint holds the files of our model format and loads back to the same decoder.
    ckpt = run / "checkpoints" / "step_000060"
    assert {"caption_decoder.safetensors", "caption_decoder.json", "caption_tokenizer", "optimizer.pt",
            "state.json"} <= {p.name for p in ckpt.iterdir()}  # fmt: skip
    loaded = load_decoder_checkpoint(ckpt)
    assert loaded.config == decoder.config
    with torch.no_grad():
        assert loaded.generate(loaded.encode(features)) == decoder.generate(decoder.encode(features))


def test_decoder_resume_continues_from_the_saved_step(model_dir, captions_file, tmp_path):
    cfg = decoder_config(tmp_path / "straight", captions_file, init_from=str(model_dir), steps=6,
                         checkpoint_every=3, log_every=1, batch_size=3)  # fmt: skip
    straight = train_decoder(cfg)
    cfg = DecoderTrainConfig(**{**cfg.to_dict(), "output_dir": str(tmp_path / "run")})
    half = train_decoder(DecoderTrainConfig(**{**cfg.to_dict(), "steps": 3}))
    assert half.step == 3
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train_decoder(cfg)
    resumed = train_decoder(DecoderTrainConfig(**{**cfg.to_dict(), "resume": True}))
    assert resumed.step == 6
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4, 5, 6]  # 4, 5, 6 after the resume
    # the same captions, dropout and optimizer state as without the interruption
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "straight"), rel=0, abs=1e-6)
    for k, v in straight.decoder.state_dict().items():
        torch.testing.assert_close(resumed.decoder.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)


def test_decoder_resume_follows_a_new_lr_and_warmup(model_dir, captions_file, tmp_path):
    """Resumed with another lr and warm-up, the decoder trains at the new schedule from its first step."""
    cfg = decoder_config(tmp_path, captions_file, init_from=str(model_dir), steps=2, lr=1e-2,
                         warmup_steps=0, checkpoint_every=2, log_every=1, batch_size=3)  # fmt: skip
    train_decoder(cfg)
    train_decoder(
        DecoderTrainConfig(**{**cfg.to_dict(), "steps": 4, "lr": 2e-3, "warmup_steps": 8, "resume": True})
    )
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    logged = {r["step"]: r["lr"] for r in map(json.loads, lines) if "lr" in r}
    # logged after step k (from 1): the rate of the next step, lr * min(1, (k + 1) / warmup_steps)
    assert logged[2] == pytest.approx(1e-2)
    assert logged[3] == pytest.approx(2e-3 * 4 / 8) and logged[4] == pytest.approx(2e-3 * 5 / 8)


def test_decoder_from_pretrained_gpt2_on_precomputed_features(model_dir, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from unidiffuser.components.caption import ENDOFTEXT_TOKEN, tiny_gpt2_tokenizer

    # A "pretrained" GPT-2 folder: weights and a tokenizer without the caption end token.
    tokenizer = tiny_gpt2_tokenizer(eos_token=ENDOFTEXT_TOKEN)
    torch.manual_seed(5)
    gpt = GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tokenizer), n_positions=128)
    )
    gpt.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(str(tmp_path / "gpt2"))
    # Precomputed features of another width than the tiny preset's 16.
    features = torch.randn(len(CAPTIONS), 77, 24, generator=torch.Generator().manual_seed(0))
    write_caption_features(tmp_path / "features" / "part-0.safetensors", features, CAPTIONS)

    cfg = decoder_config(tmp_path / "run", tmp_path / "features", init_from=str(tmp_path / "gpt2"),
                         decoder="tiny", steps=2, checkpoint_every=2, log_every=1)  # fmt: skip
    log = RunLog(tmp_path / "log", enabled=True)
    capsys.readouterr()
    decoder, encoder = initial_decoder(cfg, 24, log)
    loaded = capsys.readouterr()
    assert "Loading weights" not in loaded.err + loaded.out  # transformers' bar stays off
    assert encoder is None and decoder.config.feature_dim == 24 and decoder.config.prefix_dim == 8
    assert len(decoder.tokenizer) == len(tokenizer) + 1  # '<|EOS|>' added, the token table grown
    pretrained = gpt.state_dict()
    for k, v in decoder.gpt.state_dict().items():
        if "wte" not in k and "lm_head" not in k:
            assert torch.equal(v, pretrained[k]), k
    assert torch.equal(
        decoder.gpt.transformer.wte.weight[: len(tokenizer)], pretrained["transformer.wte.weight"]
    )

    # The command line: the same run, then its checkpoint seeds another.
    argv = ["train-decoder", "--captions", str(tmp_path / "features"), "--init-from", str(tmp_path / "gpt2"),
            "--decoder", "tiny", "--output-dir", str(tmp_path / "run"), "--steps", "2", "--batch-size", "4",
            "--lr", "1e-3", "--warmup-steps", "1", "--log-every", "1"]  # fmt: skip
    assert cli(argv) == 0
    assert "trained the caption decoder to step 2" in capsys.readouterr().out
    assert all(map(math.isfinite, losses(tmp_path / "run").values()))
    argv[argv.index("--init-from") + 1] = str(tmp_path / "run")
    argv[argv.index("--output-dir") + 1] = str(tmp_path / "run2")
    assert cli(argv) == 0

    # The caption decoder's reduced latents are no text-encoder features.
    write_feature_shard(
        tmp_path / "reduced" / "part-0.safetensors", {"text": torch.zeros(8, 77, 8)},
        {"captions": CAPTIONS, "text_features": "reduced"},
    )  # fmt: skip
    with pytest.raises(ValueError, match="reduced text latents, not the text encoder's features"):
        open_captions(tmp_path / "reduced")


def test_decoder_command_line_help_and_errors(captions_file, tmp_path, capsys):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "unidiffuser.training.cli", "train-decoder", "--help"],
        capture_output=True,
        text=True,
    ).stdout
    text = " ".join(out.split())
    for name in DecoderTrainConfig.__dataclass_fields__:
        assert f"--{name.replace('_', '-')}" in text, name
    assert "(default: 2e-05)" in text and "must come first" not in text and "comes first" in text
    assert cli(["train-decoder", "--dry-run"]) == 2
    assert "captions is required" in capsys.readouterr().err
    assert cli(["train-decoder", "--captions", str(captions_file), "--steps", "0", "--dry-run"]) == 2
    assert "steps = 0: must be >= 1" in capsys.readouterr().err
    argv = ["train-decoder", "--captions", str(captions_file), "--output-dir", str(tmp_path)]
    assert cli(argv) == 2  # text captions need a text encoder
    assert "text_encoder: the captions are text" in capsys.readouterr().err
    lines = [json.dumps({"caption": "a cat"}), "", json.dumps({"text": "a dog", "key": 3})]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    assert read_captions(tmp_path / "captions.jsonl") == ["a cat", "a dog"]
    (tmp_path / "bad.jsonl").write_text('{"url": "x"}\n')
    with pytest.raises(ValueError, match='line 1 is no JSON object with a "caption" or "text"'):
        read_captions(tmp_path / "bad.jsonl")
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match=r"captions = '.*binary\.txt': not UTF-8 text"):
        read_captions(tmp_path / "binary.txt")
