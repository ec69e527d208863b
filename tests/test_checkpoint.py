"""The checkpoint writer on its own: atomic directories, pruning, and what counts as complete."""

from __future__ import annotations

import json

import pytest
import torch

import unidiffuser.training.checkpoint as ck
from unidiffuser.network import PRESETS, UViT
from unidiffuser.training import find_checkpoints, latest_checkpoint, load_network_weights, save_checkpoint

CONFIG = PRESETS["tiny"]


def write(directory, step, value=0.0, keep_last=None):
    model = UViT(CONFIG)
    with torch.no_grad():
        model.pos_embed.fill_(value)
    weights = model.state_dict()
    training = {"optimizer": {"state": {}, "param_groups": []}, "step": step, "rng": torch.zeros(3)}
    state = {"model_config": CONFIG.to_dict(), "data": {"cursors": [step]}}
    return save_checkpoint(
        directory, step, model=weights, ema=weights, training=training, state=state, keep_last=keep_last
    )


def test_written_checkpoint_describes_itself(tmp_path):
    path = write(tmp_path, 7, value=1.5)
    assert path == tmp_path / "step_000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "ema.safetensors",
        "model.safetensors",
        "optimizer.pt",
        "state.json",
    ]
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.step == 7 and ckpt.model_config == CONFIG and ckpt.state["data"] == {"cursors": [7]}
    assert torch.all(load_network_weights(path)["pos_embed"] == 1.5)
    assert ck.saved_model_config(path / "model.safetensors") == CONFIG  # in the safetensors metadata too
    assert ck.load_training_state(ckpt)["step"] == 7  # weights_only=True


def test_an_ordinary_failure_leaves_no_directory(tmp_path, monkeypatch):
    write(tmp_path, 1)

    def failing(path, training):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "_write_training_state", failing)
    with pytest.raises(OSError, match="disk full"):
        write(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]


def test_temporary_and_half_deleted_directories_are_reported_not_loaded(tmp_path):
    write(tmp_path, 1)
    write(tmp_path, 2)
    (tmp_path / "step_000003.tmp-abcd").mkdir()
    (tmp_path / "step_000004.deleting").mkdir()
    (tmp_path / "step_000005").mkdir()  # a foreign or emptied directory
    broken = write(tmp_path, 6)
    (broken / "state.json").write_text("{")
    complete, incomplete = find_checkpoints(tmp_path)
    assert [c.step for c in complete] == [1, 2]
    reasons = {p.name: r for p, r in incomplete}
    assert set(reasons) == {"step_000003.tmp-abcd", "step_000004.deleting", "step_000005", "step_000006"}
    assert "no state.json" in reasons["step_000005"] and "not valid JSON" in reasons["step_000006"]


def test_keep_last_and_saving_a_step_again(tmp_path):
    for step in range(1, 5):
        write(tmp_path, step, keep_last=2)
    assert [c.step for c in find_checkpoints(tmp_path)[0]] == [3, 4]
    write(tmp_path, 4, value=2.0, keep_last=2)  # the same step again replaces it whole
    complete, incomplete = find_checkpoints(tmp_path)
    assert [c.step for c in complete] == [3, 4] and incomplete == []
    assert torch.all(load_network_weights(complete[-1].path)["pos_embed"] == 2.0)


def test_state_must_match_its_name_and_version(tmp_path):
    path = write(tmp_path, 3)
    state = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**state, "version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        ck.read_checkpoint(path)
    (path / "state.json").write_text(json.dumps({**state, "step": 4}))
    with pytest.raises(ValueError, match=r"the name says step 3, state\.json 4"):
        ck.read_checkpoint(path)
    with pytest.raises(ValueError, match=r"not a checkpoint directory or a \.safetensors file"):
        load_network_weights(tmp_path / "missing.pt")
