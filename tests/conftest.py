import json
import os
from pathlib import Path

import pytest
import torch

from unidiffuser.network import PRESETS, UViT, UViTConfig

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("UNIDIFFUSER_FIXTURES", REPO.parent / "shared" / "fixtures"))
OFFICIAL = FIXTURES / "official_v1_tiny.safetensors"


@pytest.fixture(scope="session")
def official():
    """The released implementation's parity data (../shared/fixtures); required in CI."""
    if not OFFICIAL.exists():
        if os.environ.get("CI"):
            pytest.fail(f"parity data missing: {OFFICIAL} (set UNIDIFFUSER_FIXTURES)")
        pytest.skip(f"parity data not found at {OFFICIAL}")
    from safetensors import safe_open

    f = safe_open(str(OFFICIAL), "pt")
    return {
        "config": json.loads(f.metadata()["config"]),
        "tensors": {k: f.get_tensor(k) for k in f.keys()},
    }


def random_inputs(cfg: UViTConfig, batch: int, generator: torch.Generator | None = None, sizes=None):
    """Random inputs of every modality and random timesteps of every group."""
    g = generator or torch.Generator().manual_seed(0)
    inputs = {}
    for m in cfg.modalities:
        if m.kind == "label":
            inputs[m.name] = torch.randint(0, m.num_classes, (batch,), generator=g)
        else:
            shape = m.shape
            if sizes and m.name in sizes:
                shape = (m.shape[0], *sizes[m.name])
            inputs[m.name] = torch.randn(batch, *shape, generator=g)
    times = {grp: torch.rand(batch, generator=g) * 1000 for grp in cfg.groups}
    return inputs, times


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return UViT(PRESETS["tiny"]).eval()


def write_tiny_features(path: Path, n: int) -> None:
    """One feature shard of ``n`` synthetic examples for the tiny image-text network (seeded)."""
    from unidiffuser.training.data import write_feature_shard

    g = torch.Generator().manual_seed(0)
    tensors = {
        "img": torch.randn(n, 8, 8, 8, generator=g).half(),  # mean and log-variance of 4 channels
        "clip_img": torch.randn(n, 16, generator=g),
        "text": torch.randn(n, 77, 8, generator=g),
        "data_type": torch.arange(n) % 2,
    }
    write_feature_shard(path, tensors, {"moments": ["img"]})
