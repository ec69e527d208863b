"""Sharded training (distributed = "fsdp") against DDP, two processes on the CPU (gloo).

One launch of two processes trains the tiny image-text network of test_finetune for 3 steps with
DDP, then the same run with FSDP for 2 steps (a sample grid at step 2, data read by a worker
process) and resumes that to step 3. Both runs see the same data and noise, so the sharded one
must reach the DDP weights up to float rounding; its checkpoints must be whole, plain-UViT state
dicts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.fsdp
from conftest import write_tiny_features
from PIL import Image
from safetensors.torch import load_file
from test_finetune import ARCH, config

from unidiffuser.components.images import make_grid
from unidiffuser.network import UViT
from unidiffuser.pipeline import UniDiffuser
from unidiffuser.tiny import tiny_pipeline
from unidiffuser.training import find_checkpoints, load_training_state
from unidiffuser.training.trainer import load_components

if not hasattr(torch.distributed.fsdp, "fully_shard"):
    pytest.skip("FSDP2 (fully_shard) needs torch >= 2.6", allow_module_level=True)

PROMPTS = ("a red square", "a blue circle")
DRIVER = """
import torch
from dataclasses import replace
from unidiffuser.training import TrainConfig, train
train(TrainConfig(**{ddp}))
sharded = TrainConfig(**{fsdp})
train(replace(sharded, steps=2))  # interrupted after step 2, then resumed
result = train(replace(sharded, resume=True))
rank = torch.distributed.get_rank()
torch.save(result.model.state_dict(), f"{out}/model{rank}.pt")
torch.save(result.ema.state_dict(), f"{out}/ema{rank}.pt")
torch.distributed.barrier()  # as `unidiffuser train` does: both done before either tears down
torch.distributed.destroy_process_group()
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(DDP run directory, FSDP run directory, the launch's stderr, the components' model directory)."""
    root = tmp_path_factory.mktemp("fsdp")
    write_tiny_features(root / "features" / "part-0.safetensors", 24)
    model_dir = root / "tiny"
    tiny_pipeline(seed=0).save_pretrained(model_dir)
    common = dict(model=ARCH.to_dict(), steps=3, batch_size=8, checkpoint_every=2, keep_last=5)
    ddp = config(root / "ddp" / "run", root / "features", **common)
    fsdp = config(
        root / "fsdp" / "run", root / "features", **common, distributed="fsdp", num_workers=1,
        components=str(model_dir), sample_every=2, sample_prompts=PROMPTS, sample_steps=2,
    )  # fmt: skip
    (root / "fsdp").mkdir()
    script = DRIVER.replace("{ddp}", repr(ddp.to_dict())).replace("{fsdp}", repr(fsdp.to_dict()))
    (root / "driver.py").write_text(script.replace("{out}", str(root / "fsdp")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo, even beside a GPU
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*cmd, str(root / "driver.py")], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return root / "ddp", root / "fsdp", result.stderr, model_dir


def weights(run: Path, step: int, which: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "run" / "checkpoints" / f"step_{step:06d}" / f"{which}.safetensors"))


def test_both_processes_hold_the_gathered_weights_of_the_checkpoint(runs):
    _, fsdp, stderr, _ = runs
    assert "2 process(es) on cpu" in stderr and "(FSDP)" in stderr and "resumed from" in stderr
    (*_, ckpt) = find_checkpoints(fsdp / "run" / "checkpoints")[0]
    assert ckpt.step == 3 and ckpt.state["config"]["distributed"] == "fsdp"
    assert ckpt.state["data"] == {"cursors": [12, 12], "world_size": 2}  # 3 steps x 4 per process
    for which in ("model", "ema"):
        saved = weights(fsdp, 3, which)
        for rank in (0, 1):
            gathered = torch.load(fsdp / f"{which}{rank}.pt")
            assert gathered.keys() == saved.keys()
            assert all(torch.equal(gathered[k], saved[k]) for k in saved), (which, rank)
        plain = UViT(ckpt.model_config)
        plain.load_state_dict(saved, strict=True)  # whole tensors under the network's own names
        assert all(torch.equal(plain.state_dict()[k], saved[k]) for k in saved)
    torch.manual_seed(0)
    assert not torch.equal(saved["pos_embed"], UViT(ARCH).pos_embed)  # it trained


def test_sharded_training_resumed_equals_ddp(runs):
    ddp, fsdp, _, _ = runs
    log = {run: [json.loads(line) for line in (run / "run" / "log.jsonl").read_text().splitlines()]
           for run in (ddp, fsdp)}  # fmt: skip
    assert [r["step"] for r in log[fsdp]] == [1, 2, 3]
    for a, b in zip(log[ddp], log[fsdp], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=0, abs=1e-5)
        # the global norm over every shard, as clipping used it, not one process's part of it
        assert a["grad_norm"] > 0 and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    for which in ("model", "ema"):
        a, b = weights(ddp, 3, which), weights(fsdp, 3, which)
        for k in a:  # gradients reduced in another order: equal up to float rounding (~1e-7)
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=f"{which} {k}")
    a, b = (load_training_state(run / "run" / "checkpoints" / "step_000003") for run in (ddp, fsdp))
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(b["optimizer"]["state"][i][key], value, rtol=1e-4, atol=1e-9)
    assert a["data"] == b["data"] and a["scheduler"] == b["scheduler"]


def test_samples_come_from_the_gathered_ema(runs):
    _, fsdp, stderr, model_dir = runs
    step = fsdp / "run" / "samples" / "step_000002"
    assert sorted(p.name for p in (fsdp / "run" / "samples").iterdir()) == ["step_000002"]
    assert "samples: wrote" in stderr
    ema = UViT(ARCH).eval()
    ema.load_state_dict(weights(fsdp, 2, "ema"))
    components = load_components(str(model_dir), ARCH, torch.device("cpu"))
    parts = ("autoencoder", "image_encoder", "text_encoder", "caption_decoder")
    pipe = UniDiffuser(ema, *(getattr(components, k) for k in parts))
    expected = np.asarray(make_grid(pipe.text_to_image(list(PROMPTS), steps=2, seed=0).images, list(PROMPTS)))
    with Image.open(step / "t2i_grid.png") as grid:
        written = np.asarray(grid.convert("RGB")).astype(int)
    assert np.abs(written - expected).max() <= 1  # up to the rounding of a pixel
