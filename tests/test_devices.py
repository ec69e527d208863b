"""GPU paths: the same seeds give the same samples on CPU and CUDA; low precision stays close.

Skipped without a CUDA device (CI has none); run on a GPU machine with ``pytest tests/test_devices.py``.
"""

import pytest
import torch
from conftest import random_inputs

from unidiffuser.network import PRESETS, UViT
from unidiffuser.objective import unidiffuser_loss
from unidiffuser.schedule import NoiseSchedule
from unidiffuser.tasks import generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
SCHEDULE = NoiseSchedule()


def rel(a, b):
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


@pytest.fixture
def pair():
    torch.manual_seed(0)
    cpu = UViT(PRESETS["tiny"]).eval()
    gpu = UViT(PRESETS["tiny"]).eval().cuda()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


@pytest.mark.parametrize("mode", ["t2i", "joint"])
def test_seeded_samples_match_across_devices(pair, mode):
    cpu, gpu = pair
    text = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(1))
    given = {"text": text} if mode == "t2i" else None
    kwargs = dict(
        given=given, batch_size=None if given else 2, labels={"data_type": 1}, steps=10, guidance_scale=2.0
    )
    a = generate(cpu, SCHEDULE, mode, generator=torch.Generator().manual_seed(5), **kwargs)
    b = generate(gpu, SCHEDULE, mode, generator=torch.Generator().manual_seed(5), **kwargs)
    for name in a:
        assert b[name].device.type == "cuda"
        assert rel(b[name], a[name]) < 1e-4, name


def test_bf16_weights_and_autocast_on_cuda(pair):
    cpu, gpu = pair
    inputs, times = random_inputs(cpu.config, 4)
    ref = cpu(inputs, times)
    cuda_in = {k: v.cuda() for k, v in inputs.items()}
    cuda_t = {k: v.cuda() for k, v in times.items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        auto = gpu(cuda_in, cuda_t)
    gpu.to(torch.bfloat16)
    half = gpu(cuda_in, cuda_t)
    for name in ref:
        assert rel(auto[name], ref[name]) < 0.05 and rel(half[name], ref[name]) < 0.05


def test_training_step_on_cuda_with_checkpointing(pair):
    _, gpu = pair
    gpu.train()
    gpu.gradient_checkpointing = True
    batch, _ = random_inputs(gpu.config, 4)
    loss, parts = unidiffuser_loss(gpu, SCHEDULE, {k: v.cuda() for k, v in batch.items()})
    loss.backward()
    assert loss.device.type == "cuda" and set(parts) == {"img", "clip_img", "text"}
    assert all(p.grad is not None for p in gpu.parameters())


def test_released_parity_on_cuda(official):
    from unidiffuser.official import config_from_official, load_official_state_dict

    model = UViT(config_from_official(official["config"])).eval()
    load_official_state_dict(
        model,
        {k.removeprefix("weights."): v for k, v in official["tensors"].items() if k.startswith("weights.")},
    )
    model.cuda()
    t = {
        k.removeprefix("forward_12x12."): v.cuda()
        for k, v in official["tensors"].items()
        if k.startswith("forward_12x12.")
    }
    with torch.no_grad():
        out = model(
            {
                "img": t["img"],
                "clip_img": t["clip_img"][:, 0],
                "text": t["text"],
                "data_type": t["data_type"],
            },
            {"image": t["t_img"], "text": t["t_text"]},
        )
    assert rel(out["img"], t["out_img"]) < 1e-5 and rel(out["text"], t["out_text"]) < 1e-5


def test_pipeline_on_cuda_matches_cpu():
    """The whole pipeline on the GPU gives the CPU's latents for the same seed (fp32)."""
    from unidiffuser.tiny import tiny_pipeline

    cpu = tiny_pipeline(seed=0)
    gpu = tiny_pipeline(seed=0).to("cuda")
    a = cpu.text_to_image("a red circle", steps=5, return_latents=True)
    b = gpu.text_to_image("a red circle", steps=5, return_latents=True)
    assert rel(b.latents["img"], a.latents["img"]) < 1e-3
    c = cpu.image_to_text(a.images[0], steps=5, return_latents=True)
    d = gpu.image_to_text(a.images[0], steps=5, return_latents=True)
    assert rel(d.latents["text"], c.latents["text"]) < 1e-3
    assert len(d.texts) == 1


def test_training_batches_draw_their_latents_on_the_gpu(tmp_path):
    """In memory or from the files, a stream with latent_device="cuda" hands out the same examples
    as on the CPU, its latents drawn on the GPU: repeatable there, other numbers than the CPU's."""
    from unidiffuser.network import image_text_config
    from unidiffuser.training.data import DataStream, FeatureArrays, FeatureShards, write_feature_shard

    config = image_text_config(
        latent=(4, 4, 4), clip_dim=8, text=(4, 8), width=32, depth=2, num_heads=2, data_type=True
    )
    g = torch.Generator().manual_seed(0)
    tensors = {"img": torch.randn(12, 8, 4, 4, generator=g), "clip_img": torch.randn(12, 8, generator=g),
               "text": torch.randn(12, 4, 8, generator=g)}  # fmt: skip
    write_feature_shard(
        tmp_path / "a.safetensors", tensors, {"moments": ["img"], "constants": {"data_type": 0}}
    )
    files = FeatureShards(tmp_path, config)
    cpu = DataStream(files, 4, seed=0).next_batch()
    for source in (files, FeatureArrays(FeatureShards(tmp_path, config))):
        a, b = (DataStream(source, 4, seed=0, latent_device="cuda").next_batch() for _ in range(2))
        assert a["img"].device.type == "cuda" and a["clip_img"].device.type == "cpu"
        assert torch.equal(a["img"], b["img"]) and torch.equal(a["clip_img"], cpu["clip_img"])
        assert not torch.equal(a["img"].cpu(), cpu["img"])
