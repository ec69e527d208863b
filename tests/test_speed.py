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


GIVEN_SHAPES = {
    "t2i": {"text": (8, 8)},
    "i2t": {"img": (4, 8, 8), "clip_img": (16,)},
    "joint": {},
}


def task_inputs(task: str, seed: int, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    given = {name: torch.randn(batch, *shape, generator=g) for name, shape in GIVEN_SHAPES[task].items()}
    return dict(given=given or None, batch_size=None if given else batch, labels={"data_type": 1})


@pytest.mark.parametrize("task", ["t2i", "joint", "i2t"])
@pytest.mark.parametrize("solver", ["dpm++3s", "dpm++2m"])
def test_noise_drawn_ahead_gives_the_plain_samples(tiny, task, solver):
    """The model function of a captured loop (conditions in its own buffers, absent noise from a
    tape filled before the run) samples exactly what the plain loop samples from the same seed."""
    from unidiffuser.solvers import sample
    from unidiffuser.tasks import TASKS, TaskModel

    steps = 5
    kwargs = task_inputs(task, seed=1)
    plain = TaskModel(tiny, SCHEDULE, TASKS[task], guidance_scale=3.0, generator=torch.Generator().manual_seed(5),
                      **kwargs)  # fmt: skip
    x = plain.initial_noise()
    expected = sample(plain, x, SCHEDULE, steps=steps, solver=solver)

    first = TaskModel(tiny, SCHEDULE, TASKS[task], guidance_scale=3.0, generator=torch.Generator(), **kwargs)
    twin = first.with_noise_tape(steps)
    assert twin.noise_tape.shapes  # guidance makes a group absent in every task here
    later = TaskModel(tiny, SCHEDULE, TASKS[task], guidance_scale=3.0, generator=torch.Generator().manual_seed(5),
                      **kwargs)  # fmt: skip
    assert later.signature() == twin.signature()
    x_later = later.initial_noise()
    assert torch.equal(x_later, x)
    twin.load_conditions(later)
    twin.noise_tape.fill(later.generator)
    twin.noise_tape.rewind()
    out = sample(twin, x_later, SCHEDULE, steps=steps, solver=solver)
    twin.noise_tape.check_spent()
    assert torch.equal(out, expected)
    # the twin's conditions are its own buffers: changing a call's values leaves them alone
    kept = {n: v.clone() for n, v in twin.given.items()}
    for value in first.given.values():
        value.add_(1.0)
    assert all(torch.equal(twin.given[n], kept[n]) for n in twin.given)


def test_noise_tape_refuses_runs_that_do_not_match_it():
    from unidiffuser.tasks import NoiseTape

    tape = NoiseTape([(2, 3), (2, 5)], calls=2, device="cpu")
    tape.fill(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(tape.next((2, 3)), torch.randn(2, 3, generator=g))
    assert torch.equal(tape.next((2, 5)), torch.randn(2, 5, generator=g))
    with pytest.raises(RuntimeError, match="made 1 model calls, the tape was made for 2"):
        tape.check_spent()
    with pytest.raises(RuntimeError, match=r"draw 2 has shape \(2, 5\), expected \(2, 3\)"):
        tape.next((2, 5))
    tape.next((2, 3)), tape.next((2, 5))
    tape.check_spent()
    with pytest.raises(RuntimeError, match="more than the 4 draws of 2 calls"):
        tape.next((2, 3))
    with pytest.raises(ValueError, match="calls=0"):
        NoiseTape([(1,)], calls=0, device="cpu")


class ReplayedGraph:
    """Stands in for a captured CUDA graph on the CPU: a replay runs the captured call again and
    writes its result into the output the capture returned, as a graph rewrites its outputs."""

    def __init__(self, run, out):
        self.run, self.out = run, out

    def replay(self):
        self.out.copy_(self.run())


def replaying_capture(run, pool, warmup=2):
    for _ in range(warmup):
        run()
    out = run()
    return ReplayedGraph(run, out), out


@pytest.mark.parametrize("task", ["t2i", "joint", "i2t"])
def test_loop_graph_plumbing_gives_the_plain_samples(tiny, task, monkeypatch):
    """The captured-loop path with the capture itself stood in for (CUDA graphs need a GPU; the
    gpu tests capture for real): conditions copied in, noise drawn ahead, outputs copied out."""
    import unidiffuser.fast as fast_module

    monkeypatch.setattr(fast_module, "capture_graph", replaying_capture)
    monkeypatch.setattr(FastNetwork, "captures_loops", property(lambda self: True))
    monkeypatch.setattr(FastNetwork, "_pool_handle", lambda self: None)
    fast = FastNetwork(tiny, compile=False)
    for seed in (0, 1, 2):
        common = dict(steps=5, guidance_scale=3.0, **task_inputs(task, seed=seed))
        plain = generate(tiny, SCHEDULE, task, generator=torch.Generator().manual_seed(seed), **common)
        looped = generate(fast, SCHEDULE, task, generator=torch.Generator().manual_seed(seed), **common)
        for name in plain:
            assert torch.equal(looped[name], plain[name]), (seed, name)
    assert fast.num_loop_graphs == 1
    generate(fast, SCHEDULE, task, generator=torch.Generator(), **dict(common, steps=4))
    assert fast.num_loop_graphs == 2  # another grid: another loop


def test_attention_kernel_can_be_chosen(tiny):
    inputs, times = random_inputs(tiny.config, 2)
    with torch.no_grad():
        ref = tiny(inputs, times)
    out = FastNetwork(tiny, compile=True, backend="aot_eager", attention="math")(inputs, times)
    for name in ref:
        assert rel(out[name], ref[name]) < 1e-5, name
    with pytest.raises(ValueError, match=r"attention='cudnn2': expected None or one of \('cudnn'"):
        FastNetwork(tiny, attention="cudnn2")
    with pytest.raises(ValueError, match=r"fp8='e5m2': expected True, False or one of"):
        FastNetwork(tiny, fp8="e5m2")


def test_loops_are_captured_only_with_cuda_graphs_on_a_gpu(tiny):
    assert not FastNetwork(tiny, compile=False).captures_loops  # on the CPU
    calls = []
    fast = FastNetwork(tiny, compile=False)
    out = fast.sample_loop("fn", torch.zeros(1), lambda fn, x: calls.append(fn) or x + 1, key=(), calls=1)
    assert calls == ["fn"] and torch.equal(out, torch.ones(1)) and fast.num_loop_graphs == 0


# -- fp8 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scaling", ["row", "tensor"])
def test_fp8_linear_is_close_to_the_linear_layer(scaling):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(3, 37, 64)  # 111 rows, not a multiple of 16
    ref = linear(x).detach()
    out = Fp8Linear(linear, scaling)(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    # e4m3 keeps 3 mantissa bits; measured 0.035 (row) and 0.038 (tensor) on these data
    error = rel(out, ref)
    assert 0 < error < 0.06
    with pytest.raises(ValueError, match="in_features=20 and out_features=48 must be multiples of 16"):
        Fp8Linear(torch.nn.Linear(20, 48), scaling)
    with pytest.raises(ValueError, match="scaling='block'"):
        Fp8Linear(linear, "block")


def test_fp8_row_scales_keep_small_rows_that_a_tensor_scale_loses():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    # rows up to 10^6 times apart in size: one scale for all of them puts the smallest rows among
    # e4m3's subnormals (below 2^-6 after scaling), where few bits are left
    x = torch.randn(32, 64) * torch.logspace(0, -6, 32).unsqueeze(1)
    ref = linear(x).detach() - linear.bias.detach()
    small = slice(24, 32)
    errors = {}
    for scaling in ("row", "tensor"):
        out = Fp8Linear(linear, scaling)(x) - linear.bias.detach()
        errors[scaling] = rel(out[small], ref[small])
    assert errors["row"] < 0.06, errors  # measured 0.047, as for rows of any size
    assert errors["tensor"] > 3 * errors["row"], errors  # measured 0.23


def test_fp8_network_stays_close(tiny):
    inputs, times = random_inputs(tiny.config, 4)
    with torch.no_grad():
        ref = tiny(inputs, times)
        out = fp8_copy(tiny)(inputs, times)
    quantized = [m for m in fp8_copy(tiny).modules() if isinstance(m, Fp8Linear)]
    assert len(quantized) == 5 * 4 + 2  # qkv, proj, fc1, fc2 in 5 blocks; skip in the 2 out-blocks
    for name in ref:
        # measured 0.039 to 0.049 (row scales) for the tiny preset's random weights
        assert rel(out[name], ref[name]) < 0.1, name


def test_fp8_static_scale_clips_beyond_its_calibration():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(50, 64)
    layer = Fp8Linear(linear, "static", input_amax=float(x.abs().max()))
    assert rel(layer(x), linear(x).detach()) < 0.06  # measured 0.037, as with scales found per call
    # inputs past the calibrated magnitude are clipped to it
    wide = x * 5
    clipped = wide.clamp(-float(x.abs().max()), float(x.abs().max()))
    assert rel(layer(wide), linear(clipped).detach()) < 0.06
    assert rel(layer(wide), linear(wide).detach()) > 0.3  # measured 0.51
    with pytest.raises(ValueError, match="input_amax goes with scaling='static'"):
        Fp8Linear(linear, "static")
    with pytest.raises(ValueError, match="input_amax goes with scaling='static'"):
        Fp8Linear(linear, "row", input_amax=1.0)
    with pytest.raises(ValueError, match=r"input_amax=0\.0: expected a positive finite number"):
        Fp8Linear(linear, "static", input_amax=0.0)


def test_recorded_input_amax_sets_static_scales(tiny):
    from unidiffuser.fast import fp8_layers, recorded_input_amax

    a = random_inputs(tiny.config, 3, torch.Generator().manual_seed(1))
    b = random_inputs(tiny.config, 3, torch.Generator().manual_seed(2))
    with torch.no_grad():
        with recorded_input_amax(tiny) as first:
            tiny(*a)
        with recorded_input_amax(tiny) as second:
            tiny(*b)
        with recorded_input_amax(tiny) as both:
            tiny(*a)
            tiny(*b)
        assert set(both) == set(fp8_layers(tiny)) and len(both) == 22
        assert all(both[n] == max(first[n], second[n]) > 0 for n in both)
        assert not tiny.in_blocks[0].attn.qkv._forward_pre_hooks  # the hooks are gone
        ref = tiny(*b)
        static = fp8_copy(tiny, "static", both)(*b)
        starved = fp8_copy(tiny, "static", {n: v / 100 for n, v in both.items()})(*b)
    for name in ref:
        assert rel(static[name], ref[name]) < 0.1, name  # measured 0.039 to 0.050
        assert rel(starved[name], ref[name]) > 0.3, name  # scales 100 times too small clip: 0.67 to 0.77
    with pytest.raises(ValueError, match="fp8_amax goes with fp8='static'"):
        FastNetwork(tiny, fp8=True, fp8_amax=both)
    with pytest.raises(ValueError, match="fp8_amax goes with fp8='static'"):
        FastNetwork(tiny, fp8="static")
    with pytest.raises(ValueError, match="no input magnitude recorded for 1 layers"):
        fp8_copy(tiny, "static", {n: v for n, v in both.items() if n != "mid_block.mlp.fc2"})


def test_pipeline_fp8_static_calibrates_on_the_plain_network():
    from unidiffuser.fast import fp8_layers

    pipe = tiny_pipeline(seed=0)
    plain = pipe.text_to_image("a red circle", steps=4, return_latents=True)
    with pytest.raises(ValueError, match="fp8_calibration goes with fp8='static', not fp8=True"):
        pipe.enable_fast_sampling(fp8=True, fp8_calibration=lambda p: None, backend="aot_eager")
    samplers = []

    def calibrate(p):
        samplers.append(p.sampler)
        p.text_to_image("a blue square", steps=4, seed=1)

    pipe.enable_fast_sampling(fp8="static", fp8_calibration=calibrate, backend="aot_eager")
    assert samplers == [pipe.network] and pipe.sampler.fp8 == "static"
    fast = pipe.text_to_image("a red circle", steps=4, return_latents=True)
    assert 0 < rel(fast.latents["img"], plain.latents["img"]) < 0.1  # measured 0.010
    pipe.to(dtype=torch.float32)  # rebuilt with the same scales
    assert pipe.sampler.fp8 == "static" and set(pipe.sampler.fp8_amax) == set(fp8_layers(pipe.network))


def test_fp8_static_without_a_calibration_calibrates_on_every_task():
    from unidiffuser.fast import recorded_input_amax
    from unidiffuser.pipeline import calibrate_on_every_task

    pipe = tiny_pipeline(seed=0)
    with recorded_input_amax(pipe.network) as t2i_only:
        pipe.text_to_image("a red circle", steps=50)
    with recorded_input_amax(pipe.network) as every_task:
        calibrate_on_every_task(pipe)
    pipe.enable_fast_sampling(fp8="static", backend="aot_eager")
    assert pipe.sampler.fp8_amax == every_task  # the same calls, the same largest inputs
    assert any(every_task[n] > t2i_only[n] for n in every_task)  # joint and i2t reach further


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
    # the decoder is compiled by default only on a GPU; asked for, it is compiled on the CPU too
    assert not pipe.enable_fast_sampling(backend="aot_eager").autoencoder.decoder_compiled
    assert pipe.enable_fast_sampling(
        backend="aot_eager", compile_autoencoder=True
    ).autoencoder.decoder_compiled
    assert not pipe.disable_fast_sampling().autoencoder.decoder_compiled
    pipe.enable_fast_sampling(backend="aot_eager", fast_captions=True, compile_captions=True)
    assert pipe.caption_decoder.fast_search.compile
    assert not pipe.enable_fast_sampling(
        backend="aot_eager", fast_captions=True
    ).caption_decoder.fast_search.compile


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


def test_compiled_decoder_decodes_the_same():
    vae = ImageAutoencoder.random(TINY_AUTOENCODER, seed=0).to_channels_last()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = vae.decode(latents)
    backend, graphs = counting_backend()
    assert vae.compile_decoder(backend=backend).decoder_compiled
    out = vae.decode(latents)
    vae.decode(latents + 1)  # same shape: no second compilation
    assert len(graphs) == 1
    assert (out - ref).abs().max() < 1e-5
    vae.decode(latents[:1])  # a new batch size compiles once more
    assert len(graphs) == 2
    assert not vae.compile_decoder(False).decoder_compiled
    assert torch.equal(vae.decode(latents), ref)


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


def test_kernel_profile_section_lists_the_chosen_tasks(capsys, monkeypatch):
    bench = load_benchmark(monkeypatch)
    bench.main(["--preset", "tiny", "--device", "cpu", "--steps", "2", "--repeats", "1", "--no-diffusers",
                "--sections", "kernels", "--tasks", "joint"])  # fmt: skip
    out = capsys.readouterr().out
    assert "| joint | 1 |" in out and "| t2i | 1 |" not in out
    assert "| joint | aten::addmm |" in out  # the U-ViT's linears, by operator on the CPU
    assert [bench.kernel_kind(n) for n in ("sm90_xmma_gemm_e4m3", "pytorch_flash::flash_fwd_kernel",
            "triton_poi_fused__scaled_mm_add_0", "gatherTopK", "Memcpy DtoD", "void at::native::reduce")] == [
        "matmul", "attention", "fused", "topk/sort", "copy", "other"]  # fmt: skip


def test_benchmark_fast_accumulation_part_reaches_every_fp8_layer(monkeypatch):
    bench = load_benchmark(monkeypatch)
    pipe = tiny_pipeline(seed=0)
    name = bench.make_fast(pipe, {"compile", "fp8", "fa"}, "aot_eager")
    layers = [m for m in pipe._fast.module.modules() if isinstance(m, Fp8Linear)]
    assert name == "compile+fp8+fa" and layers and all(m.fast_accum for m in layers)
    bench.make_fast(pipe, {"compile", "fp8"}, "aot_eager")  # a new fp8 copy: the default accumulation
    assert not any(m.fast_accum for m in pipe._fast.module.modules() if isinstance(m, Fp8Linear))
    with pytest.raises(ValueError, match=r"fa .*goes with fp8"):
        bench.make_fast(pipe, {"compile", "fa"}, "aot_eager")
    with pytest.raises(SystemExit):
        bench.parse_args(["--fp8-fast-accum"])


def test_benchmark_inductor_settings_are_checked(monkeypatch):
    bench = load_benchmark(monkeypatch)
    pairs = ["max_autotune_gemm=True", "max_autotune_gemm_backends=TRITON,CUBLAS", "triton.multi_kernel=1"]
    assert bench.inductor_settings(pairs) == {
        "max_autotune_gemm": True, "max_autotune_gemm_backends": "TRITON,CUBLAS", "triton.multi_kernel": 1}  # fmt: skip
    with pytest.raises(SystemExit):
        bench.parse_args(["--inductor", "no_such_setting=1"])


def test_parts_benchmark_runs_on_the_cpu(capsys, monkeypatch):
    path = BENCHMARK.with_name("parts.py")
    spec = importlib.util.spec_from_file_location("parts_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    module.main(["--device", "cpu", "--small", "--repeats", "1", "--backend", "aot_eager"])
    out = capsys.readouterr().out
    for row in ("| 2 | fc2 | 64x256x64 | fp8 row layer |", "| 2 | flash |", "| channels-last compiled |"):
        assert row in out, row


# -- on a CUDA device ---------------------------------------------------------------------------


def cuda_inputs(config, batch: int, seed: int) -> tuple[dict, dict]:
    """Random inputs and timesteps of ``batch`` rows (seeded on the CPU), on the GPU."""
    inputs, times = random_inputs(config, batch, torch.Generator().manual_seed(seed))
    return {k: v.cuda() for k, v in inputs.items()}, {k: v.cuda() for k, v in times.items()}


def small_on_cuda(batch: int, seed: int = 0):
    """The small preset in bf16 on the GPU, random inputs of ``batch`` rows and its eager outputs."""
    torch.manual_seed(0)
    network = UViT(PRESETS["small"]).eval().to("cuda", torch.bfloat16)
    inputs, times = cuda_inputs(network.config, batch, seed)
    with torch.no_grad():
        ref = network(inputs, times)
    return network, inputs, times, ref


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_cuda_graphs_equal_the_network_on_cuda(dtype):
    torch.manual_seed(0)
    network = UViT(PRESETS["small"]).eval().to("cuda", dtype)
    fast = FastNetwork(network, compile=True, cuda_graphs=True)
    for seed in (0, 1, 2):  # later calls replay the graph on new inputs
        inputs, times = cuda_inputs(network.config, 3, seed)
        with torch.no_grad():
            ref = network(inputs, times)
        out = fast(inputs, times)
        for name in ref:
            assert rel(out[name], ref[name]) < (1e-4 if dtype == torch.float32 else 0.02), name
    assert fast.num_graphs == 1
    fast(*cuda_inputs(network.config, 5, seed=0))
    assert fast.num_graphs == 2


@pytest.mark.gpu
@cuda
def test_fp8_on_cuda():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no fp8 tensor cores")
    network, inputs, times, ref = small_on_cuda(3)
    out = FastNetwork(network, compile=True, cuda_graphs=True, fp8=True)(inputs, times)
    for name in ref:
        assert rel(out[name], ref[name]) < 0.1, name


@pytest.mark.gpu
@cuda
def test_fast_pipeline_on_cuda_matches_cpu():
    cpu = tiny_pipeline(seed=0)
    gpu = tiny_pipeline(seed=0).to("cuda").enable_fast_sampling()
    assert gpu.caption_decoder.fast_search is not None  # on by default where CUDA graphs run
    for _ in range(2):  # the first call captures the whole loop, the second replays it
        a = cpu.text_to_image("a red circle", steps=5, return_latents=True)
        b = gpu.text_to_image("a red circle", steps=5, return_latents=True)
        assert rel(b.latents["img"], a.latents["img"]) < 1e-3
        # joint guidance makes each group absent in one pass: noise drawn ahead, as on the CPU
        c = cpu.joint(2, steps=4, guidance_scale=2.0, return_latents=True)
        d = gpu.joint(2, steps=4, guidance_scale=2.0, return_latents=True)
        for name in ("img", "clip_img", "text"):
            assert rel(d.latents[name], c.latents[name]) < 1e-3, name
    assert gpu.sampler.num_loop_graphs == 2 and gpu.sampler.num_graphs == 0


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("task", ["t2i", "joint", "i2t"])
def test_captured_loops_sample_what_the_plain_loop_samples(task):
    """A whole loop captured as one CUDA graph against the same FastNetwork stepping through the
    loop (one captured forward per step): new seeds and new conditions replay the same graph."""
    torch.manual_seed(0)
    network = UViT(PRESETS["tiny"]).eval().cuda()
    fast = FastNetwork(network, compile=True, cuda_graphs=True)
    assert fast.captures_loops
    for seed in (0, 1, 2):
        kwargs = task_inputs(task, seed=seed)
        kwargs["given"] = {n: v.cuda() for n, v in (kwargs["given"] or {}).items()} or None
        common = dict(steps=6, guidance_scale=3.0, **kwargs)
        stepped = generate(fast, SCHEDULE, task, generator=torch.Generator().manual_seed(seed),
                           callback=lambda *a: None, **common)  # fmt: skip
        looped = generate(fast, SCHEDULE, task, generator=torch.Generator().manual_seed(seed), **common)
        for name in stepped:
            assert rel(looped[name], stepped[name]) < 1e-5, (seed, name)
    assert fast.num_loop_graphs == 1 and fast.num_graphs == 1


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("attention", ["cudnn", "flash"])
def test_attention_kernels_on_cuda(attention):
    network, inputs, times, ref = small_on_cuda(2)
    out = FastNetwork(network, compile=True, cuda_graphs=True, attention=attention)(inputs, times)
    for name in ref:
        assert rel(out[name], ref[name]) < 0.02, name


@pytest.mark.gpu
@cuda
def test_fp8_row_and_tensor_scales_on_cuda():
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("row scales need a Hopper GPU")
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512).cuda().to(torch.bfloat16)
    x = torch.randn(2, 1105, 256, device="cuda", dtype=torch.bfloat16)  # 2210 rows, not a multiple of 16
    ref = linear(x).detach()
    for scaling in ("row", "tensor", "static"):
        amax = float(x.abs().max()) if scaling == "static" else None
        out = Fp8Linear(linear, scaling, amax)(x)
        assert out.dtype == torch.bfloat16 and rel(out, ref) < 0.06, scaling


@pytest.mark.gpu
@cuda
def test_fp8_static_network_on_cuda():
    from unidiffuser.fast import recorded_input_amax

    network, inputs, times, ref = small_on_cuda(3, seed=2)
    with torch.no_grad(), recorded_input_amax(network) as amax:
        network(*cuda_inputs(network.config, 3, seed=1))  # calibrated on other inputs
    out = FastNetwork(network, compile=True, cuda_graphs=True, fp8="static", fp8_amax=amax)(inputs, times)
    for name in ref:
        assert rel(out[name], ref[name]) < 0.1, name


@pytest.mark.gpu
@cuda
def test_fast_pipeline_with_loop_graphs_matches_the_stepped_pipeline():
    pipe = tiny_pipeline(seed=0).to("cuda").enable_fast_sampling()
    assert pipe.autoencoder.decoder_compiled
    stepped = pipe.text_to_image("a red circle", steps=5, return_latents=True, progress=lambda *a: None)
    for _ in range(2):
        looped = pipe.text_to_image("a red circle", steps=5, return_latents=True)
        assert rel(looped.latents["img"], stepped.latents["img"]) < 1e-5
    assert pipe.sampler.num_loop_graphs == 1


@pytest.mark.gpu
@cuda
def test_noise_is_the_same_through_pinned_memory():
    a = _noise((3, 5), torch.Generator().manual_seed(0), "cpu", torch.float32)
    b = _noise((3, 5), torch.Generator().manual_seed(0), "cuda", torch.float32)
    assert b.device.type == "cuda" and torch.equal(a, b.cpu())
