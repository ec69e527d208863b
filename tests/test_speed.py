"""The speed paths: compiled and graph-captured forwards, fp8, bf16, channels-last, the benchmark.

On the CPU the compiled path is traced with the "aot_eager" backend (inductor's C++ build takes
tens of seconds on a CI core); inductor, CUDA graphs and fp8 tensor cores are checked by the tests
marked gpu, which run where torch sees a CUDA device.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_inputs

from unidiffuser.components.autoencoder import TINY as TINY_AUTOENCODER
from unidiffuser.components.autoencoder import ImageAutoencoder
from unidiffuser.components.beam import log_probs
from unidiffuser.fast import FastNetwork, Fp8Linear, fp8_copy
from unidiffuser.network import PRESETS, UViT
from unidiffuser.schedule import NoiseSchedule
from unidiffuser.tasks import _noise, generate
from unidiffuser.tiny import tiny_pipeline

SCHEDULE = NoiseSchedule()
BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "sampling.py"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rel(a, b):
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).norm() / b.norm()).item()


def counting_backend():
    """A torch.compile backend that runs the traced graph as is and counts its compilations."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend, graphs


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return UViT(PRESETS["tiny"]).eval()


# -- FastNetwork --------------------------------------------------------------------------------


def test_fast_forward_equals_the_network(tiny):
    inputs, times = random_inputs(tiny.config, 3)
    with torch.no_grad():
        ref = tiny(inputs, times)
    for fast in (
        FastNetwork(tiny, compile=False),
        FastNetwork(tiny, compile=True, backend="aot_eager"),
    ):
        out = fast(inputs, times)
        assert set(out) == set(ref)
        for name in ref:
            # traced, not rewritten: the same operations in the same order (measured: equal)
            assert torch.equal(out[name], ref[name]), name
        assert fast.num_graphs == 0  # CUDA graphs need a CUDA device: on the CPU the call runs as is


def test_one_compilation_per_block_kind_and_shape(tiny):
    backend, graphs = counting_backend()
    fast = FastNetwork(tiny, compile=True, backend=backend)
    for batch in (2, 2, 3, 2):
        inputs, times = random_inputs(tiny.config, batch)
        fast(inputs, times)
    # blocks without a skip input (in, mid) and with one (out), at batch 2 and 3; the repeat
    # calls and the other blocks of each kind reuse those compilations
    assert len(graphs) == 4


def test_fast_forward_leaves_the_network_as_it_was(tiny):
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    inputs, times = random_inputs(tiny.config, 2)
    FastNetwork(tiny, compile=False, fp8=True)(inputs, times)
    assert tiny.check_values  # turned off only for the fast call
    after = tiny.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert all(type(m) is not Fp8Linear for m in tiny.modules())
    bad = dict(inputs, img=inputs["img"].clone().fill_(float("nan")))
    with pytest.raises(ValueError, match="contains NaN"):
        tiny(bad, times)


def test_fast_forward_still_checks_shapes_and_mode(tiny):
    fast = FastNetwork(tiny, compile=False)
    inputs, times = random_inputs(tiny.config, 2)
    with pytest.raises(ValueError, match=r"inputs\['img'\]: expected shape"):
        fast(dict(inputs, img=inputs["img"][:, :3]), times)
    with pytest.raises(ValueError, match=r"call network\.eval"):
        FastNetwork(UViT(PRESETS["tiny"]))
    tiny.train()
    with pytest.raises(ValueError, match="put back in train mode"):
        fast(inputs, times)


@pytest.mark.parametrize("task", ["t2i", "joint", "i2t"])
def test_sampling_through_the_fast_forward_is_unchanged(tiny, task):
    g = torch.Generator().manual_seed(1)
    given = {
        "t2i": {"text": torch.randn(2, 8, 8, generator=g)},
        "i2t": {"img": torch.randn(2, 4, 8, 8, generator=g), "clip_img": torch.randn(2, 16, generator=g)},
        "joint": None,
    }[task]
    kwargs = dict(given=given, batch_size=None if given else 2, labels={"data_type": 1}, steps=4)
    kwargs["guidance_scale"] = 3.0
    a = generate(tiny, SCHEDULE, task, generator=torch.Generator().manual_seed(5), **kwargs)
    fast = FastNetwork(tiny, compile=True, backend="aot_eager")
    b = generate(fast, SCHEDULE, task, generator=torch.Generator().manual_seed(5), **kwargs)
    for name in a:
        assert torch.equal(a[name], b[name]), name


# -- fp8 ----------------------------------------------------------------------------------------


def test_fp8_linear_is_close_to_the_linear_layer():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(3, 37, 64)  # 111 rows: padded to a multiple of 16 inside
    ref = linear(x).detach()
    out = Fp8Linear(linear)(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    # e4m3 keeps 3 mantissa bits; measured 0.035 on these data
    error = rel(out, ref)
    assert 0 < error < 0.06
    with pytest.raises(ValueError, match="in_features=20 and out_features=48 must be multiples of 16"):
        Fp8Linear(torch.nn.Linear(20, 48))


def test_fp8_network_stays_close(tiny):
    inputs, times = random_inputs(tiny.config, 4)
    with torch.no_grad():
        ref = tiny(inputs, times)
        out = fp8_copy(tiny)(inputs, times)
    quantized = [m for m in fp8_copy(tiny).modules() if isinstance(m, Fp8Linear)]
    assert len(quantized) == 5 * 4 + 2  # qkv, proj, fc1, fc2 in 5 blocks; skip in the 2 out-blocks
    for name in ref:
        # measured 0.036 to 0.044 for the tiny preset's random weights
        assert rel(out[name], ref[name]) < 0.1, name


# -- bf16, channels-last and the pipeline -------------------------------------------------------


def test_pipeline_fast_sampling_equals_plain_sampling():
    pipe = tiny_pipeline(seed=0)
    plain = pipe.text_to_image("a red circle", steps=4, return_latents=True)
    assert pipe.sampler is pipe.network
    pipe.enable_fast_sampling(backend="aot_eager")
    assert isinstance(pipe.sampler, FastNetwork)
    assert pipe.autoencoder.memory_format == torch.channels_last
    fast = pipe.text_to_image("a red circle", steps=4, return_latents=True)
    assert torch.equal(plain.latents["img"], fast.latents["img"])
    # channels-last decoding: the same pixels up to rounding (a value on a boundary moves by 1)
    difference = np.abs(np.asarray(plain.images[0], dtype=int) - np.asarray(fast.images[0], dtype=int))
    assert difference.max() <= 1
    captions = pipe.joint(2, steps=3, return_latents=True)
    assert len(captions.texts) == 2 and len(captions.images) == 2
    assert pipe.caption_decoder.fast_search is None  # automatic: only where CUDA graphs run
    pipe.enable_fast_sampling(backend="aot_eager", fast_captions=True)
    fixed = pipe.joint(2, steps=3, return_latents=True)
    search = pipe.caption_decoder.fast_search
    assert search is not None and len(search._plans) == 1  # the captions came from the fixed-cache search
    assert fixed.texts == pipe.caption_decoder.disable_fast_search().generate(fixed.latents["text"])
    pipe.enable_fast_sampling(backend="aot_eager", fast_captions=True)
    before, search = pipe.sampler, pipe.caption_decoder.fast_search
    pipe.to(dtype=torch.float32)  # a new device or dtype: compiled again from the start
    assert isinstance(pipe.sampler, FastNetwork) and pipe.sampler is not before
    assert pipe.caption_decoder.fast_search not in (None, search)
    pipe.disable_fast_sampling()
    assert pipe.sampler is pipe.network and pipe.autoencoder.memory_format == torch.contiguous_format
    assert pipe.caption_decoder.fast_search is None


def test_bf16_pipeline_is_close_to_fp32():
    fp32 = tiny_pipeline(seed=0)
    bf16 = tiny_pipeline(seed=0).to(dtype=torch.bfloat16)
    a = fp32.text_to_image("a red circle", steps=6, return_latents=True)
    b = bf16.text_to_image("a red circle", steps=6, return_latents=True)
    # measured 0.003 for both latents
    for name in ("img", "clip_img"):
        assert rel(b.latents[name], a.latents[name]) < 0.02, name
    c = fp32.image_to_text(a.images[0], steps=6, return_latents=True)
    d = bf16.image_to_text(a.images[0], steps=6, return_latents=True)
    assert rel(d.latents["text"], c.latents["text"]) < 0.02  # measured 0.0024


def test_autoencoder_bf16_and_channels_last_decode():
    vae = ImageAutoencoder.random(TINY_AUTOENCODER, seed=0)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = vae.decode(latents)
    assert vae.to_channels_last() is vae
    last = vae.decode(latents)
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert (last - ref).abs().max() < 1e-5  # measured: below 1e-6
    vae.to(torch.bfloat16)
    half = vae.decode(latents)
    assert half.dtype == torch.bfloat16
    assert rel(half, ref) < 0.02  # measured 0.004
    pixels = ref.clamp(-1, 1)
    moments = vae.moments(pixels)
    assert moments.is_contiguous(memory_format=torch.channels_last)


def test_caption_scores_are_fp32_for_a_bf16_decoder():
    logits = torch.randn(4, 386, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    scores = log_probs(logits)
    assert scores.dtype == torch.float32
    assert torch.equal(scores, logits.float().softmax(-1).log())


# -- the benchmark ------------------------------------------------------------------------------


def load_benchmark(monkeypatch):
    spec = importlib.util.spec_from_file_location("sampling_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_sampling_benchmark_runs_on_the_cpu(capsys, monkeypatch):
    bench = load_benchmark(monkeypatch)
    bench.main(
        ["--preset", "tiny", "--device", "cpu", "--steps", "2", "--repeats", "1", "--batch-sizes", "2",
         "--forward-batch", "2", "--backend", "aot_eager", "--compile"]
    )  # fmt: skip
    out = capsys.readouterr().out
    for row in ("| t2i | 1 |", "| joint | 1 |", "| i2t | 1 |", "| t2i | 2 |", "| forward | 2 |"):
        assert row in out, row
    assert "diffusers" in out and "against ours eager fp32" in out


# -- on a CUDA device ---------------------------------------------------------------------------


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_cuda_graphs_equal_the_network_on_cuda(dtype):
    torch.manual_seed(0)
    network = UViT(PRESETS["small"]).eval().to("cuda", dtype)
    fast = FastNetwork(network, compile=True, cuda_graphs=True)
    for seed in (0, 1, 2):  # later calls replay the graph on new inputs
        inputs, times = random_inputs(network.config, 3, torch.Generator().manual_seed(seed))
        inputs = {k: v.cuda() for k, v in inputs.items()}
        times = {k: v.cuda() for k, v in times.items()}
        with torch.no_grad():
            ref = network(inputs, times)
        out = fast(inputs, times)
        for name in ref:
            assert rel(out[name], ref[name]) < (1e-4 if dtype == torch.float32 else 0.02), name
    assert fast.num_graphs == 1
    inputs, times = random_inputs(network.config, 5)
    fast({k: v.cuda() for k, v in inputs.items()}, {k: v.cuda() for k, v in times.items()})
    assert fast.num_graphs == 2


@pytest.mark.gpu
@cuda
def test_fp8_on_cuda():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no fp8 tensor cores")
    torch.manual_seed(0)
    network = UViT(PRESETS["small"]).eval().to("cuda", torch.bfloat16)
    inputs, times = random_inputs(network.config, 3)
    inputs = {k: v.cuda() for k, v in inputs.items()}
    times = {k: v.cuda() for k, v in times.items()}
    with torch.no_grad():
        ref = network(inputs, times)
    out = FastNetwork(network, compile=True, cuda_graphs=True, fp8=True)(inputs, times)
    for name in ref:
        assert rel(out[name], ref[name]) < 0.1, name


@pytest.mark.gpu
@cuda
def test_fast_pipeline_on_cuda_matches_cpu():
    cpu = tiny_pipeline(seed=0)
    gpu = tiny_pipeline(seed=0).to("cuda").enable_fast_sampling()
    assert gpu.caption_decoder.fast_search is not None  # on by default where CUDA graphs run
    for _ in range(2):  # the first call captures, the second replays
        a = cpu.text_to_image("a red circle", steps=5, return_latents=True)
        b = gpu.text_to_image("a red circle", steps=5, return_latents=True)
        assert rel(b.latents["img"], a.latents["img"]) < 1e-3
    assert gpu.sampler.num_graphs == 1


@pytest.mark.gpu
@cuda
def test_noise_is_the_same_through_pinned_memory():
    a = _noise((3, 5), torch.Generator().manual_seed(0), "cpu", torch.float32)
    b = _noise((3, 5), torch.Generator().manual_seed(0), "cuda", torch.float32)
    assert b.device.type == "cuda" and torch.equal(a, b.cpu())
