"""Training end to end on tiny models: config, optimizer groups, EMA, resume, shards, two processes.

Every run trains a width-32, depth-2 U-ViT for a few steps on the toy world or on tiny feature
shards written here. Equalities between runs are exact in practice on one CPU; they are asserted
with rtol = 0, atol = 1e-6 (float32 weights of size ~0.1, after a few AdamW steps of ~1e-3).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from unidiffuser.network import PRESETS, UViT, UViTConfig, image_text_config
from unidiffuser.toy import ToyWorld
from unidiffuser.training import (
    DataStream,
    FeatureShards,
    TrainConfig,
    find_checkpoints,
    load_config,
    load_training_state,
    sample_latent,
    train,
    write_feature_shard,
)
from unidiffuser.training.cli import main as train_cli
from unidiffuser.training.config import parse_toml
from unidiffuser.training.data import FeatureArrays, ReadAhead, UnusableData
from unidiffuser.training.trainer import lr_factor, parameter_groups, warmup_factor

TOY_ARCH = ToyWorld().config(width=32, depth=2, num_heads=2)
TOY_MODEL = TOY_ARCH.to_dict()
SHARD_MODEL = image_text_config(
    latent=(4, 4, 4), clip_dim=8, text=(4, 8), width=32, depth=2, num_heads=2, data_type=True
)
TOL = dict(rtol=0, atol=1e-6)


def toy_config(out: Path, **kw) -> TrainConfig:
    base = dict(
        model=TOY_MODEL,
        data="toy",
        output_dir=str(out),
        steps=4,
        batch_size=8,
        lr=1e-3,
        warmup_steps=3,  # resuming at step 2 lands inside the warm-up
        ema_decay=0.9,
        checkpoint_every=2,
        log_every=1,
        seed=3,
    )
    return TrainConfig(**{**base, **kw})


def weights(path: Path, which: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(path / f"{which}.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].cpu(), b[k].cpu(), **TOL, msg=f"weight {k} differs")


def losses(run: Path) -> dict[int, float]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The reference: 4 uninterrupted steps, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("straight")
    result = train(toy_config(out, grad_accum=2))
    return out, result


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learning_rate": 1e-4}, "unknown key 'learning_rate'; did you mean 'lr'?"),
        ({"lr": -1.0}, "lr = -1.0: must be a finite number > 0; use a positive learning rate"),
        ({"mixed_precision": "fp8"}, "mixed_precision = 'fp8': is not one of ('no', 'bf16', 'fp16')"),
        ({"steps": "10"}, "steps = '10': has type str; give an integer"),
        ({"model": "smal"}, "model = 'smal': is no preset; did you mean 'small'?"),
        ({"loss_weights": {"img2": 1.0}}, "loss_weights.img2 = 1.0: names no diffused modality"),
        (
            {"loss_weights": {"img": 0, "clip_img": 0, "text": 0}},
            "weighs every modality 0, so nothing would be learned; leave at least one above 0",
        ),
        ({"batch_size": 10, "grad_accum": 4}, "batch_size = 10: is not divisible by grad_accum=4"),
        ({"betas": [0.9]}, "betas = (0.9,): needs two numbers in [0, 1)"),
        ({"distributed": "zero3"}, "distributed = 'zero3': is not one of ('ddp', 'fsdp')"),
        ({"distributed": "fsdp", "mixed_precision": "fp16"}, "does not go with distributed = 'fsdp'"),
        ({"num_workers": -1}, "num_workers = -1: must be >= 0"),
        ({"clean_prob": 1.0}, "clean_prob = 1.0: must lie in [0, 1)"),
        ({"snr_gamma": -5.0}, "snr_gamma = -5.0: must be >= 0; use 0 (the paper) or a value such as 5"),
    ],
)
def test_config_errors_name_key_value_and_fix(values, message):
    with pytest.raises(ValueError) as info:
        TrainConfig.from_dict(values, source="run.toml")
    assert message in str(info.value)


def test_an_output_dir_or_init_from_that_is_a_damaged_file_is_named(tmp_path):
    file = tmp_path / "afile"
    file.write_text("x")
    with pytest.raises(ValueError, match=r"output_dir = '.*afile': is a file; name a folder for the run"):
        TrainConfig(model="toy", data="toy", output_dir=str(file))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(
        ValueError, match=r"init_from = '.*junk\.safetensors': cannot read it \(SafetensorError"
    ):
        train(TrainConfig(init_from=str(junk), data="toy", output_dir=str(tmp_path / "run"), steps=1))


def test_toml_file_flags_and_round_trip(tmp_path):
    file = tmp_path / "run.toml"
    file.write_text(
        textwrap.dedent(
            """
            model = "tiny"
            steps = 7
            lr = 1e-4
            betas = [0.9, 0.99]
            [loss_weights]
            img = 2.0
            """
        )
    )
    config = load_config(file, {"steps": 9})
    assert (config.steps, config.lr, config.betas, config.loss_weights) == (
        9,
        1e-4,
        (0.9, 0.99),
        {"img": 2.0},
    )
    # the written form loads back to the same config, inline model tables included
    inline = replace(config, model=PRESETS["tiny"].to_dict())
    again = tmp_path / "again.toml"
    again.write_text(inline.to_toml())
    assert load_config(again) == inline
    assert load_config(again).model_config() == PRESETS["tiny"]
    (tmp_path / "bad.toml").write_text("lr = 1e-4\nwarmup = 10\n")
    with pytest.raises(ValueError, match=r"bad.toml: unknown key 'warmup'; did you mean 'warmup_steps'\?"):
        load_config(tmp_path / "bad.toml")


def test_dry_run_prints_the_resolved_config(tmp_path, capsys):
    file = tmp_path / "run.toml"
    file.write_text('model = "tiny"\nsteps = 7\nmixed_precision = "bf16"\n')
    argv = ["train", "--config", str(file), "--steps", "11", "--loss-weight", "text=0.5", "--dry-run"]
    assert train_cli(argv) == 0
    printed = parse_toml(capsys.readouterr().out)
    assert printed["steps"] == 11 and printed["mixed_precision"] == "bf16" and printed["model"] == "tiny"
    assert printed["loss_weights"] == {"text": 0.5} and printed["lr"] == 2e-4
    assert not (tmp_path / "runs").exists()
    assert train_cli(["train", "--lr", "-3", "--dry-run"]) == 2
    assert "lr = -3.0: must be a finite number > 0" in capsys.readouterr().err


def test_help_shows_every_option_with_a_default():
    result = subprocess.run(
        [sys.executable, "-m", "unidiffuser.training.cli", "train", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag in [f"--{f.replace('_', '-')}" for f in TrainConfig.__dataclass_fields__ if f != "loss_weights"]:
        assert flag in text, flag
    for shown in ("(default: 0.0002)", "(default: 0.9 0.9)", "(default: 5000)", "(default: 0.9999)"):
        assert shown in text
    assert text.count("(default:") >= len(TrainConfig.__dataclass_fields__) + 1
    import unidiffuser.cli

    assert "unidiffuser.training.cli" in unidiffuser.cli.COMMAND_MODULES


def test_command_line_run_in_bf16_with_gradient_checkpointing(tmp_path):
    """The whole command: flags, autocast bf16 on CPU, checkpointed blocks, a checkpoint."""
    argv = ["train", "--model", json.dumps(TOY_MODEL), "--output-dir", str(tmp_path), "--steps", "2"]
    argv += ["--batch-size", "4", "--mixed-precision", "bf16", "--gradient-checkpointing", "--log-every", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "unidiffuser.training.cli", *argv], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mixed precision bf16" in result.stderr and "trained to step 2" in result.stdout
    config = parse_toml((tmp_path / "config.toml").read_text())
    assert config["mixed_precision"] == "bf16" and config["gradient_checkpointing"] is True
    saved = weights(tmp_path / "checkpoints" / "step_000002")
    assert all(v.dtype == torch.float32 for v in saved.values())  # autocast leaves the weights fp32
    assert all(map(math.isfinite, losses(tmp_path).values()))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_blocks_give_the_same_loss_and_gradients(checkpointing):
    from unidiffuser.objective import unidiffuser_loss
    from unidiffuser.schedule import NoiseSchedule

    torch.manual_seed(0)
    plain = UViT(TOY_ARCH).train()
    compiled = UViT(TOY_ARCH).train().compile_blocks(backend="aot_eager")
    compiled.load_state_dict(plain.state_dict())
    names = {m.name for m in TOY_ARCH.modalities}
    batch = {k: v for k, v in ToyWorld().sample(8, torch.Generator().manual_seed(1)).items() if k in names}
    results = []
    for model in (plain, compiled):
        model.gradient_checkpointing = checkpointing
        loss, _ = unidiffuser_loss(model, NoiseSchedule(), batch, generator=torch.Generator().manual_seed(2))
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
    assert all(g is not None and g.abs().sum() > 0 for g in grads_b.values())
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-6, msg=f"gradient {name}")


def test_train_with_compile_matches_the_plain_run(straight, tmp_path):
    """``train --compile`` (inductor) trains the same weights as the plain run, up to rounding."""
    train(toy_config(tmp_path, grad_accum=2, compile=True))
    a = weights(straight[0] / "checkpoints" / "step_000004")
    b = weights(tmp_path / "checkpoints" / "step_000004")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=f"weight {k} differs")
    assert parse_toml((tmp_path / "config.toml").read_text())["compile"] is True


def test_train_with_clean_conditions_feeds_clean_groups_to_the_network(tmp_path, monkeypatch):
    """``clean_prob`` and ``snr_gamma`` reach the loss."""
    import unidiffuser.training.trainer as trainer

    seen = []
    real = trainer.unidiffuser_loss

    def spy(network, schedule, batch, **kw):
        loss, parts = real(network, schedule, batch, **kw)
        seen.append((kw["clean_prob"], kw["snr_gamma"]))
        return loss, parts

    monkeypatch.setattr(trainer, "unidiffuser_loss", spy)
    train(toy_config(tmp_path, clean_prob=0.5, snr_gamma=5.0))
    assert seen == [(0.5, 5.0)] * 4
    written = parse_toml((tmp_path / "config.toml").read_text())
    assert (written["clean_prob"], written["snr_gamma"]) == (0.5, 5.0)
    assert all(math.isfinite(v) for v in losses(tmp_path).values())


# ---------------------------------------------------------------------------------------------
# Optimizer and EMA


def test_no_weight_decay_on_norms_biases_position_and_embedding_tables():
    model = UViT(PRESETS["tiny"])
    decay, no_decay = parameter_groups(model, 0.03)
    assert decay["weight_decay"] == 0.03 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    free = {names[id(p)] for p in no_decay["params"]}
    assert decayed | free == set(names.values()) and not decayed & free
    for n in ("pos_embed", "label_pos.data_type", "embed.data_type.weight", "norm.weight", "norm.bias"):
        assert n in free, n
    assert all(n.endswith(".bias") or "norm" in n or n in free for n in free)
    assert {n for n in free if "norm" in n} == {n for n in names.values() if "norm" in n}
    assert not any(n.endswith(".bias") for n in decayed)
    assert "in_blocks.0.attn.qkv.weight" in decayed and "embed.img.proj.weight" in decayed
    assert all(p.ndim >= 2 for p in decay["params"])


def test_fsdp_with_one_process_trains_unsharded(tmp_path, capsys):
    result = train(toy_config(tmp_path, steps=1, distributed="fsdp"))
    assert result.step == 1
    assert "distributed = 'fsdp' with one process: nothing to shard" in capsys.readouterr().err


def test_linear_warmup():
    assert [warmup_factor(k, 4) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_warmup_constant_then_linear_decay_to_zero():
    factors = [lr_factor(k, warmup_steps=2, decay_steps=4, steps=8) for k in range(8)]
    assert factors == [0.5, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert [lr_factor(k, 0, 0, 3) for k in range(3)] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"decay_steps = 9: is more than steps = 8; set it to at most steps"):
        TrainConfig(steps=8, decay_steps=9)


def test_resume_with_a_new_decay_follows_the_new_schedule_from_the_first_step(tmp_path):
    """Constant for 2 steps, then resumed with steps 4 and a 3-step decay, equals that schedule straight:
    the resumed step 3 trains at 2/3 of lr, not at the rate the checkpoint's schedule had set."""
    straight = train(toy_config(tmp_path / "straight", warmup_steps=0, decay_steps=3))
    config = toy_config(tmp_path / "split", warmup_steps=0)
    train(replace(config, steps=2))
    resumed = train(replace(config, decay_steps=3, resume=True))
    for which in ("model", "ema"):
        assert_same_weights(weights(resumed.checkpoint, which), weights(straight.checkpoint, which))


def test_resume_with_a_new_lr_trains_at_the_new_rate(tmp_path):
    """2 steps at lr 1e-3, resumed with lr 4e-4: steps 3 and 4 train (and log) at 4e-4, and the
    checkpoint's optimizer holds it, not the rate the checkpoint was written with."""
    config = toy_config(tmp_path, warmup_steps=0, lr=1e-3)
    train(replace(config, steps=2))
    resumed = train(replace(config, lr=4e-4, resume=True))
    logged = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())}
    assert logged[2] == pytest.approx(1e-3) and logged[3] == logged[4] == pytest.approx(4e-4)
    groups = load_training_state(resumed.checkpoint)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([4e-4] * len(groups))


def test_ema_follows_its_closed_form(tmp_path):
    """ema_k = d * ema_{k-1} + (1 - d) * w_k, checked on the saved raw and EMA weights."""
    d = 0.5
    train(toy_config(tmp_path, steps=3, checkpoint_every=1, keep_last=10, ema_decay=d, lr=1e-2))
    ckpts = {c.step: c.path for c in find_checkpoints(tmp_path / "checkpoints")[0]}
    assert sorted(ckpts) == [1, 2, 3]
    for k in (2, 3):
        raw, ema, previous = weights(ckpts[k]), weights(ckpts[k], "ema"), weights(ckpts[k - 1], "ema")
        for name in raw:
            torch.testing.assert_close(ema[name], d * previous[name] + (1 - d) * raw[name], rtol=0, atol=1e-7)
    raw, ema = weights(ckpts[3]), weights(ckpts[3], "ema")
    assert max((raw[n] - ema[n]).abs().max().item() for n in raw) > 1e-4  # not a copy of the raw weights


# ---------------------------------------------------------------------------------------------
# Checkpoints and resuming


def test_run_writes_config_log_and_self_describing_checkpoints(straight):
    out, result = straight
    assert result.step == 4 and result.checkpoint == out / "checkpoints" / "step_000004"
    assert parse_toml((out / "config.toml").read_text())["grad_accum"] == 2
    assert json.loads((out / "config.json").read_text())["micro_batch_size"] == 4
    assert sorted(losses(out)) == [1, 2, 3, 4]
    state = json.loads((result.checkpoint / "state.json").read_text())
    assert state["step"] == 4 and state["version"] == 1 and state["config"]["steps"] == 4
    assert UViTConfig.from_dict(state["model_config"]) == TOY_ARCH
    assert state["data"] == {"cursors": [32], "world_size": 1}  # 4 steps x 2 micro-batches x 4
    training = load_training_state(result.checkpoint)  # weights_only=True
    assert training["scheduler"]["last_epoch"] == 4 and len(training["optimizer"]["state"]) > 0
    assert_same_weights(weights(result.checkpoint, "ema"), result.ema.state_dict())
    mask = os.umask(0o022)
    os.umask(mask)
    assert (result.checkpoint.stat().st_mode & 0o777) == 0o777 & ~mask  # not mkdtemp's 0700
    assert all((f.stat().st_mode & 0o777) == 0o666 & ~mask for f in result.checkpoint.iterdir())


def test_resume_equals_no_interruption(straight, tmp_path):
    out, _ = straight
    config = toy_config(tmp_path, grad_accum=2)
    half = train(replace(config, steps=2))
    assert half.step == 2
    with pytest.raises(ValueError, match=r"already holds checkpoints .* pass --resume"):
        train(config)
    resumed = train(replace(config, resume=True))
    assert resumed.step == 4
    assert losses(tmp_path) == losses(out)  # steps 3 and 4 saw the same data and noise
    again = train(replace(config, resume=True))  # finished already: no step, the same checkpoint
    assert (
        again.step == 4 and again.checkpoint == resumed.checkpoint == tmp_path / "checkpoints" / "step_000004"
    )
    for which in ("model", "ema"):
        assert_same_weights(
            weights(resumed.checkpoint, which), weights(out / "checkpoints/step_000004", which)
        )
    a, b = load_training_state(resumed.checkpoint), load_training_state(out / "checkpoints/step_000004")
    assert a["data"] == b["data"]
    for key, value in a["optimizer"]["state"].items():
        torch.testing.assert_close(value["exp_avg_sq"], b["optimizer"]["state"][key]["exp_avg_sq"], **TOL)


def test_resume_with_data_workers_equals_no_interruption(straight, tmp_path):
    """Workers read ahead in other processes; batches, cursors and resume point stay the same."""
    out, _ = straight
    config = toy_config(tmp_path, grad_accum=2, num_workers=2)
    train(replace(config, steps=2))
    resumed = train(replace(config, resume=True, num_workers=1))
    assert losses(tmp_path) == losses(out)  # the straight run read in the training process
    assert_same_weights(weights(resumed.checkpoint), weights(out / "checkpoints/step_000004"))
    assert load_training_state(resumed.checkpoint)["data"] == {"cursors": [32]}


KILLER = """
import os, signal, sys
import unidiffuser.training.checkpoint as ck
from unidiffuser.training import TrainConfig, train

real = ck._write_training_state
def dying(path, training):
    if training["step"] == 4:  # weights of step 4 are on disk, the rest is not
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, training)
ck._write_training_state = dying
train(TrainConfig(**{config}))
"""


def test_killed_while_writing_a_checkpoint_resumes_from_the_previous(straight, tmp_path):
    out, _ = straight
    config = toy_config(tmp_path / "run", grad_accum=2)
    values = config.to_dict()
    script = KILLER.replace("{config}", repr(values))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == -9, result.stderr[-2000:]
    complete, incomplete = find_checkpoints(tmp_path / "run" / "checkpoints")
    assert [c.step for c in complete] == [2]
    assert len(incomplete) == 1 and incomplete[0][0].name.startswith("step_000004.tmp-")
    assert (incomplete[0][0] / "model.safetensors").exists() and not (
        incomplete[0][0] / "state.json"
    ).exists()
    UViT(complete[0].model_config).load_state_dict(weights(complete[0].path))  # the previous one loads

    resumed = train(replace(config, resume=True))
    assert resumed.step == 4
    assert_same_weights(weights(resumed.checkpoint), weights(out / "checkpoints/step_000004"))


def test_keep_last_and_damaged_checkpoints(tmp_path):
    train(toy_config(tmp_path, steps=4, checkpoint_every=1, keep_last=2))
    complete, incomplete = find_checkpoints(tmp_path / "checkpoints")
    assert [c.step for c in complete] == [3, 4] and incomplete == []
    (complete[-1].path / "optimizer.pt").write_bytes(b"truncated")
    complete, incomplete = find_checkpoints(tmp_path / "checkpoints")
    assert [c.step for c in complete] == [3]
    assert "optimizer.pt is missing or has the wrong size" in incomplete[0][1]
    # damage that keeps the size: 16 bytes of junk over the start of a file
    for name in ("ema.safetensors", "optimizer.pt"):
        with (complete[-1].path / name).open("r+b") as file:
            head = file.read(16)
            file.seek(0)
            file.write(b"\0" * 16)
        damaged, incomplete = find_checkpoints(tmp_path / "checkpoints")
        assert damaged == [] and f"{name} cannot be read" in incomplete[0][1]
        with (complete[-1].path / name).open("r+b") as file:
            file.write(head)
    assert [c.step for c in find_checkpoints(tmp_path / "checkpoints")[0]] == [3]


def test_fine_tune_from_a_checkpoint_or_a_state_dict(straight, tmp_path):
    out, _ = straight
    source = out / "checkpoints" / "step_000004"
    tuned = train(toy_config(tmp_path / "a", steps=1, lr=1e-9, init_from=str(source)))
    assert_same_weights(tuned.model.state_dict(), weights(source, "ema"))  # started from the EMA
    plain = tmp_path / "plain.safetensors"
    save_file(weights(source), str(plain))
    tuned = train(toy_config(tmp_path / "b", steps=1, lr=1e-9, init_from=str(plain)))
    assert_same_weights(tuned.model.state_dict(), weights(source))
    wider = {**TOY_MODEL, "width": 64, "num_heads": 4}
    with pytest.raises(ValueError, match=r"init_from = .*another architecture"):
        train(toy_config(tmp_path / "c", model=wider, init_from=str(source)))


# ---------------------------------------------------------------------------------------------
# Feature shards


def shard_tensors(n: int, seed: int, *, per_example_label: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {
        "img": torch.randn(n, 8, 4, 4, generator=g).half(),  # moments: mean and logvar of 4 channels
        "clip_img": torch.randn(n, 8, generator=g),
        "text": torch.randn(n, 4, 8, generator=g),
    }
    if per_example_label:
        t["data_type"] = torch.arange(n) % 2
    return t


@pytest.fixture
def shards(tmp_path):
    """Good rows 12 + 8 (3 of them NaN), a truncated shard and one of another shape."""
    root = tmp_path / "features"
    write_feature_shard(
        root / "a.safetensors", shard_tensors(12, 0, per_example_label=True), {"moments": ["img"]}
    )
    nan = shard_tensors(8, 1, per_example_label=False)
    nan["clip_img"][[1, 4]] = float("nan")
    nan["img"][6, 0, 0, 0] = float("inf")
    write_feature_shard(root / "b.safetensors", nan, {"moments": ["img"], "constants": {"data_type": 1}})
    write_feature_shard(
        root / "c.safetensors", shard_tensors(5, 2, per_example_label=True), {"moments": ["img"]}
    )
    data = (root / "c.safetensors").read_bytes()
    (root / "c.safetensors").write_bytes(data[: len(data) // 2])
    wrong = shard_tensors(5, 3, per_example_label=True)
    wrong["text"] = torch.randn(5, 3, 8)
    write_feature_shard(root / "d.safetensors", wrong, {"moments": ["img"]})
    assert sorted(p.name for p in root.iterdir()) == [
        "a.safetensors",
        "b.safetensors",
        "c.safetensors",
        "d.safetensors",
    ]
    return root


def test_feature_shards_skip_and_count_bad_data(shards):
    source = FeatureShards(shards, SHARD_MODEL)
    assert len(source) == 20 and source.moments == {"img": 0.18215}
    bad = {Path(p).name: reason for p, reason in source.bad_shards}
    assert set(bad) == {"c.safetensors", "d.safetensors"}
    assert "unreadable" in bad["c.safetensors"] and "'text'" in bad["d.safetensors"]

    stream = DataStream(source, 4, seed=0)
    seen, batches = [], []
    while stream.cursor < 40:  # two epochs
        start = stream.cursor
        batch = stream.next_batch()
        batches.append(batch)
        seen += [source.index(q, 0) for q in range(start, stream.cursor)]
    nan_rows = {12 + 1, 12 + 4, 12 + 6}
    assert stream.skipped["non_finite"] == sum(i in nan_rows for i in seen) >= 6
    assert sorted(seen[:20]) == list(range(20))  # an epoch is a permutation of all rows
    assert seen[:20] != seen[20:40]  # reshuffled per epoch
    for batch in batches:
        assert batch["img"].shape == (4, 4, 4, 4) and batch["img"].dtype == torch.float32
        assert batch["data_type"].dtype == torch.long
        assert all(torch.isfinite(v).all() for k, v in batch.items() if k != "data_type")


def test_feature_shards_labels_and_fresh_latents(shards):
    source = FeatureShards(shards, SHARD_MODEL)
    assert source[12]["data_type"].item() == 1  # the shard's constant
    assert [source[i]["data_type"].item() for i in (4, 5)] == [0, 1]  # per-example values
    stream = DataStream(source, 17, seed=0)  # 17 finite rows: one epoch per batch
    first, second = stream.next_batch(), stream.next_batch()
    a, b = first["clip_img"][:, 0].argsort(), second["clip_img"][:, 0].argsort()
    assert torch.equal(first["clip_img"][a], second["clip_img"][b])  # the same examples, reshuffled
    assert not torch.equal(first["clip_img"], second["clip_img"])
    assert (first["img"][a] - second["img"][b]).abs().min() > 0  # each with a new latent draw
    assert torch.equal(first["img"], DataStream(source, 17, seed=0).next_batch()["img"])  # seeded


def test_data_workers_give_the_same_batches_cursors_and_skips(shards):
    source = FeatureShards(shards, SHARD_MODEL)
    alone = DataStream(source, 4, seed=0, rank=1, world_size=2)
    ahead = DataStream(source, 4, seed=0, rank=1, world_size=2, num_workers=2)
    for i in range(8):  # 3 epochs of this process's 10 rows, 3 of them NaN
        if i == 5:  # a resume: the workers start again from the new cursor
            ahead.cursor = alone.cursor
        a, b = alone.next_batch(), ahead.next_batch()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert alone.cursor == ahead.cursor
    assert alone.skipped == ahead.skipped and alone.skipped["non_finite"] >= 3
    workers = ahead._ahead.chunks._workers  # the DataLoader's processes
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    ahead.close()  # stops them now, not whenever a garbage collection comes
    assert not any(w.is_alive() for w in workers)
    with pytest.raises(ValueError, match="num_workers=-1: must be >= 0"):
        DataStream(source, 4, seed=0, num_workers=-1)


def test_data_workers_hand_over_whole_chunks_when_none_is_skipped(tmp_path, monkeypatch):
    root = tmp_path / "clean"
    write_feature_shard(
        root / "a.safetensors", shard_tensors(12, 0, per_example_label=True), {"moments": ["img"]}
    )
    source = FeatureShards(root, SHARD_MODEL)
    taken = []
    take = ReadAhead.take
    monkeypatch.setattr(ReadAhead, "take", lambda self, cursor: taken.append(cursor) or take(self, cursor))
    alone = DataStream(source, 4, seed=0)
    ahead = DataStream(source, 4, seed=0, num_workers=1)
    for i in range(5):  # past an epoch's end: 12 rows, 3 batches an epoch
        if i == 3:  # a resume mid-epoch: the workers' chunks start again at the new cursor
            alone.cursor = ahead.cursor = 13
        a, b = alone.next_batch(), ahead.next_batch()
        assert all(torch.equal(a[k], b[k]) for k in a) and alone.cursor == ahead.cursor
    assert taken == []  # every batch came as its chunk, none taken apart and stacked again
    ahead.close()


def test_disjoint_shares_across_processes(shards):
    source = FeatureShards(shards, SHARD_MODEL)
    shares = []
    for rank in range(2):
        stream = DataStream(source, 1, seed=5, rank=rank, world_size=2)
        for _ in range(6):
            stream.next_batch()
        shares.append({source.index(j * 2 + rank, 5) for j in range(stream.cursor)})
    assert not shares[0] & shares[1]


def test_sample_latent_statistics():
    mean, logvar = torch.full((4000, 1, 2, 2), 3.0), torch.full((4000, 1, 2, 2), 2 * torch.tensor(0.5).log())
    z = sample_latent(torch.cat([mean, logvar], 1), torch.Generator().manual_seed(0), scale_factor=2.0)
    assert z.shape == (4000, 1, 2, 2)
    assert abs(z.mean().item() - 6.0) < 0.03 and abs(z.std().item() - 1.0) < 0.03
    with pytest.raises(ValueError, match="expected"):
        sample_latent(torch.zeros(2, 3, 4, 4))


def test_write_feature_shard_is_atomic(tmp_path, monkeypatch):
    import unidiffuser.training.data as data

    def broken(tensors, path, metadata):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(data, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        write_feature_shard(tmp_path / "x.safetensors", {"a": torch.zeros(2, 3)})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="same leading example axis"):
        write_feature_shard(tmp_path / "y.safetensors", {"a": torch.zeros(2), "b": torch.zeros(3)})


def test_training_on_shards_reports_the_skips(shards, tmp_path, capsys):
    config = TrainConfig(
        model=SHARD_MODEL.to_dict(),
        data=str(shards),
        output_dir=str(tmp_path / "run"),
        steps=3,
        batch_size=8,
        checkpoint_every=3,
        log_every=3,
        warmup_steps=1,
    )
    result = train(config)
    assert result.step == 3 and result.skipped["shards"] == 2
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert record["skipped/shards"] == 2 and record["skipped/non_finite"] == result.skipped["non_finite"] >= 1
    err = capsys.readouterr().err
    assert "skipping shard c.safetensors: unreadable" in err and "skipping shard d.safetensors" in err
    assert f"{result.skipped['non_finite']} non_finite" in err


def same_batches(a: DataStream, b: DataStream, batches: int, resume_at: int | None = None) -> None:
    for i in range(batches):
        if i == resume_at:  # a resume mid-run: both continue from one cursor
            a.cursor = b.cursor = a.cursor + 1
        x, y = a.next_batch(), b.next_batch()
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), i
        assert a.cursor == b.cursor
    assert a.skipped == b.skipped


@pytest.mark.parametrize("rank", [0, 1])
def test_data_in_memory_gives_the_same_batches_cursors_and_skips(shards, rank):
    files = FeatureShards(shards, SHARD_MODEL)
    memory = FeatureArrays(FeatureShards(shards, SHARD_MODEL))
    assert memory.bad_shards == files.bad_shards and len(memory) == 20
    assert [memory.index(q, 3) for q in range(45)] == [files.index(q, 3) for q in range(45)]
    a = DataStream(files, 3, seed=3, rank=rank, world_size=2)
    b = DataStream(memory, 3, seed=3, rank=rank, world_size=2)
    same_batches(a, b, 12, resume_at=7)  # three epochs of this process's 10 rows, 3 of them NaN
    assert a.skipped["non_finite"] >= 3
    assert memory.values["img"].dtype == torch.float16  # kept as stored, float32 in each batch


def test_data_in_memory_skips_a_shard_that_fails_to_read_as_reading_would(shards, monkeypatch):
    import unidiffuser.training.data as data

    files = FeatureShards(shards, SHARD_MODEL)
    real = data.safe_open

    def failing(path, *args, **kwargs):
        if Path(path).name == "b.safetensors":
            raise OSError("input/output error")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(data, "safe_open", failing)  # after the headers were read: fails on reading
    memory = FeatureArrays(files)
    assert int((memory.bad == 1 + data.BAD_REASONS.index("unreadable")).sum()) == 8
    a, b = DataStream(files, 4, seed=0), DataStream(memory, 4, seed=0)
    same_batches(a, b, 8)
    assert a.skipped["unreadable"] >= 8 and a.skipped["non_finite"] == 0


def test_data_in_memory_gives_up_on_bad_rows_in_a_row_as_reading_does(tmp_path):
    root = tmp_path / "bad"
    nan = shard_tensors(8, 1, per_example_label=True)
    nan["clip_img"][:] = float("nan")
    write_feature_shard(root / "a.safetensors", nan, {"moments": ["img"]})
    write_feature_shard(
        root / "b.safetensors", shard_tensors(2, 2, per_example_label=True), {"moments": ["img"]}
    )
    source = FeatureShards(root, SHARD_MODEL)
    for stream in (
        DataStream(source, 4, seed=0, max_misses=5),
        DataStream(FeatureArrays(source), 4, seed=0, max_misses=5),
    ):
        with pytest.raises(
            UnusableData, match=r"5 bad examples in a row .*non_finite.*unusable: extract it again"
        ):
            for _ in range(4):
                stream.next_batch()
    assert issubclass(UnusableData, ValueError)  # so `unidiffuser train` ends in one line


def test_a_shard_whose_tensors_are_not_the_ones_its_metadata_lists_is_left_out(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    root = tmp_path / "shards"
    write_feature_shard(
        root / "a.safetensors", shard_tensors(8, 1, per_example_label=True), {"moments": ["img"]}
    )
    write_feature_shard(
        root / "b.safetensors", shard_tensors(8, 2, per_example_label=True), {"moments": ["img"]}
    )
    with safe_open(str(root / "b.safetensors"), "pt") as f:
        header = f.metadata()
    tensors = load_file(str(root / "b.safetensors"))
    save_file(
        {k: v for k, v in tensors.items() if k != "clip_img"}, str(root / "b.safetensors"), metadata=header
    )
    source = FeatureShards(root, SHARD_MODEL)
    ((path, reason),) = source.bad_shards
    assert Path(path).name == "b.safetensors" and "its metadata lists" in reason and len(source) == 8
    save_file({k: v[:0] for k, v in tensors.items()}, str(root / "b.safetensors"), metadata=header)  # 0 rows
    assert "its metadata lists" in FeatureShards(root, SHARD_MODEL).bad_shards[0][1]


def test_data_in_memory_refuses_data_larger_than_the_memory_it_may_take(shards):
    with pytest.raises(
        ValueError, match=r"20 examples take 0.0 GiB in memory, more than .*data_in_memory = false"
    ):
        FeatureArrays(FeatureShards(shards, SHARD_MODEL), memory=100)
    with pytest.raises(ValueError, match="num_workers=2: the data is in memory"):
        DataStream(FeatureArrays(FeatureShards(shards, SHARD_MODEL)), 4, seed=0, num_workers=2)


def test_training_with_data_in_memory_ends_with_the_same_weights(shards, tmp_path):
    common = dict(
        model=SHARD_MODEL.to_dict(), data=str(shards), steps=4, batch_size=6, checkpoint_every=4,
        log_every=2, warmup_steps=1,
    )  # fmt: skip
    files = train(TrainConfig(output_dir=str(tmp_path / "files"), **common))
    memory = train(TrainConfig(output_dir=str(tmp_path / "memory"), data_in_memory=True, **common))
    assert files.skipped == memory.skipped and files.skipped["non_finite"] >= 1
    for name, value in files.ema.state_dict().items():
        assert torch.equal(value, memory.ema.state_dict()[name]), name
    assert (tmp_path / "memory" / "log.jsonl").read_text().count('"loss"') == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"data": "toy"}, "data_in_memory = True: reads feature shards"),
        (
            {"num_workers": 2},
            "num_workers = 2: reads ahead from the files, and data_in_memory = true reads none",
        ),
    ],
)
def test_data_in_memory_refuses_what_it_cannot_serve(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"model": SHARD_MODEL.to_dict(), "data": str(tmp_path), "output_dir": str(tmp_path / "run"),
                       "data_in_memory": True, **options})  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Two processes


DDP_DRIVER = """
import sys, torch
from unidiffuser.training import TrainConfig, train
result = train(TrainConfig(**{config}))
rank = torch.distributed.get_rank()
torch.save(result.model.state_dict(), f"{out}/rank{rank}.pt")
torch.save(result.ema.state_dict(), f"{out}/ema{rank}.pt")
torch.distributed.destroy_process_group()
"""


def test_two_processes_agree_on_the_weights(tmp_path):
    config = toy_config(tmp_path / "run", steps=3, checkpoint_every=3, batch_size=8)
    values = config.to_dict()
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER.replace("{config}", repr(values)).replace("{out}", str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo, even beside a GPU
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(driver),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) on cpu" in result.stderr and "batch 8 = 2 x 1 x 4" in result.stderr
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000003"
    saved = weights(checkpoint)
    for rank in (0, 1):
        assert_same_weights(torch.load(tmp_path / f"rank{rank}.pt"), saved)
        assert_same_weights(torch.load(tmp_path / f"ema{rank}.pt"), weights(checkpoint, "ema"))
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["data"] == {"cursors": [12, 12], "world_size": 2}
    torch.manual_seed(config.seed)  # the trainer's initial weights
    initial = UViT(config.model_config())
    assert not torch.equal(saved["pos_embed"], initial.pos_embed.detach())  # it trained
