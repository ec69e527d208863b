"""End-to-end sampling speed: our pipeline against diffusers' UniDiffuserPipeline, same weights.

Both pipelines are built in this process from one set of random weights: our network is copied
into diffusers' UniDiffuserModel with ``unidiffuser.official.to_diffusers_keys``, and the VAE, the
CLIP towers and the GPT-2 caption decoder are copies of our modules. They run on the same device
in the same dtype. Every figure is warm: the first call of each row is timed apart ("first s":
compilation and graph capture included) and the row gives the median of the timed calls after it,
each synchronised. Peak memory is what a call allocated above the weights already in place.

Sections (``--sections``), run in this order (the slowest, throughput, last):

- e2e: at batch 1, text-to-image (prompt encoding, 50 guided network evaluations, VAE decode to
  PIL), joint (image and caption, guided) and image-to-text (image encoding, guided sampling,
  caption beam search); the time ratio diffusers / ours.
- stages: where our batch-1 calls spend their time: encoding, the network calls, the rest of the
  sampling loop (the solver's arithmetic), image decoding and the caption search, each timed with
  the GPU synchronised around it (so the parts add up to a little more than the e2e time). To time
  the network calls apart, the loop runs step by step here (one captured forward per step), not
  as the one loop graph of the e2e rows.
- forward: the network alone at ``--forward-batch``; on CUDA also the share of this device's bf16
  matrix-multiply rate, measured here on an 8192^3 product.
- accuracy: our path as benchmarked (``--dtype``, ``--compile`` ...) against our eager fp32 path
  with the same seed: one forward, and the text-to-image latents after all steps.
- throughput: text-to-image at ``--batch-sizes``, images per second.
- variants (not run by default): text-to-image at batch 1 for each of ``--variants``, to see
  which means pay.
- kernels (not run by default): one warm batch-1 call of each task under ``torch.profiler``: its
  device time by kind of kernel (matrix products, attention, generated fused kernels, top-k and
  sorting, copies, the rest) against the call's wall time, and its costliest kernels. On the CPU
  it lists operators instead of kernels.

``--tasks`` limits the e2e, stages and kernels sections to some of t2i, joint and i2t.

Guidance: ours s = 7 is diffusers' guidance_scale = 8 (they write s + 1). Solvers: ours the
released singlestep DPM-Solver++ (``dpm++3s``), diffusers' DPMSolverMultistepScheduler; both make
``--steps`` network evaluations. Ours batches the guidance passes of a step into one network call,
diffusers makes one call per pass. With random weights the caption decoder seldom emits its end
token, so captions run to the full 67 tokens (beam 5): the worst case, for both.

    python benchmarks/sampling.py --preset tiny --device cpu                  # CPU smoke test
    python benchmarks/sampling.py --preset unidiffuser-v1 --device cuda       # bf16, compiled, CUDA graphs
    python benchmarks/sampling.py --preset unidiffuser-v1 --device cuda --sections variants \\
        --variants eager compile+graphs compile+graphs+loop compile+graphs+loop+vae+fp8

CPU smoke test: the tiny random components at 64x64 pixels, fp32, not compiled, one thread of a
2-core machine that was busy with other work (torch 2.13). Absolute CPU times say nothing about a
GPU, and with components this small the ratio mostly measures Python overhead per step. Measured
with ``OMP_NUM_THREADS=1 python benchmarks/sampling.py --preset tiny --device cpu --repeats 5``
(time ratio diffusers / ours, above 1 where ours is faster):

    | task    | batch | diffusers / ours |
    |---------|-------|------------------|
    | t2i     | 1     | 1.92             |
    | joint   | 1     | 5.49             |
    | i2t     | 1     | 2.38             |
    | t2i     | 8     | 1.60             |
    | t2i     | 32    | 1.70             |
    | forward | 8     | 1.29             |

and, with ``--sections accuracy``, the relative error against our eager fp32 path: bf16
(``--dtype bf16``) 6.4e-3 to 6.8e-3 for one forward, 1.7e-3 to 2.2e-3 for the text-to-image
latents after 50 steps; with fp8 block linears (``--dtype bf16 --fp8``) 3.0e-2 to 4.2e-2 and
3.3e-3 to 4.9e-3.

GPU figures for the released size (one H100 each, 2026-11-26 and 2026-11-27) are in the README's
Speed section and, raw, in ``benchmarks/results/``: in bf16 text-to-image 0.516 to 0.555 s, joint
0.788 to 0.806 s and image-to-text 0.610 to 0.621 s at batch 1, 4.2 to 7.3 times less than
diffusers'; with static fp8 scales 0.423 to 0.438 s, 0.647 to 0.660 s and 0.501 to 0.518 s.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

try:
    from unidiffuser.pipeline import UniDiffuser
except ImportError:  # run from a checkout without installing: use the src/ beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from unidiffuser.pipeline import UniDiffuser
from unidiffuser.devices import device_option
from unidiffuser.fast import Fp8Linear
from unidiffuser.flops import forward_flops
from unidiffuser.network import PRESETS, UViT, UViTConfig
from unidiffuser.official import to_diffusers_keys

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SECTIONS = ("e2e", "stages", "forward", "accuracy", "throughput", "variants", "kernels")  # run in this order
TASKS = ("t2i", "joint", "i2t")
PARTS = ("compile", "graphs", "loop", "vae", "cap", "cudnn", "fp8", "fp8t", "fp8s", "fa")  # see make_fast
CALIBRATION_PROMPT = "an old lighthouse on a rocky coast at dusk"  # not the timed calls' prompt
PROMPT = "a red bicycle leaning against a blue wall"
GUIDANCE = 7.0  # ours: (1 + s) cond - s uncond; diffusers' guidance_scale is s + 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--preset", choices=("tiny", "unidiffuser-v1"), default="tiny", help="model size")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="ours: torch.compile the network's blocks (default: on for CUDA)",
    )
    parser.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        help="ours: capture the network as CUDA graphs (default: on for CUDA; no effect on the CPU)",
    )
    parser.add_argument(
        "--loop-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ours: with CUDA graphs, capture each whole sampling loop as one graph",
    )
    parser.add_argument(
        "--compile-autoencoder",
        action=argparse.BooleanOptionalAction,
        help="ours: torch.compile the image decoder (default: with --compile on CUDA)",
    )
    parser.add_argument(
        "--compile-captions",
        action=argparse.BooleanOptionalAction,
        help="ours: torch.compile the caption search's step (default: with --compile on CUDA)",
    )
    parser.add_argument("--fp8", action="store_true", help="ours: the blocks' linear layers in fp8")
    parser.add_argument(
        "--fp8-scaling",
        choices=("row", "tensor", "static"),
        default="row",
        help="ours: fp8 scales per row, per tensor, or per tensor fixed by a calibration call of each task",
    )
    parser.add_argument(
        "--fp8-fast-accum",
        action="store_true",
        help="ours, with --fp8: the fp8 products in the fast accumulation mode",
    )
    parser.add_argument("--backend", default="inductor", help="the torch.compile backend")
    parser.add_argument(
        "--inductor", nargs="+", default=[], metavar="KEY=VALUE",
        help="ours: torch._inductor.config settings, e.g. coordinate_descent_tuning=True triton.multi_kernel=1",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=50, help="network evaluations per sample")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per batch-1 row")
    parser.add_argument("--throughput-repeats", type=int, default=2, help="timed calls per throughput row")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32], help="throughput batches")
    parser.add_argument("--forward-batch", type=int, default=8, help="batch of the forward section")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS[:5]))
    parser.add_argument(
        "--variants", nargs="+", default=["eager", "compile+graphs"],
        help=f"for the variants section: 'eager' or parts joined by '+', from {', '.join(PARTS)}",
    )  # fmt: skip
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=TASKS,
        default=list(TASKS),
        help="the batch-1 tasks of e2e, stages and kernels",
    )
    parser.add_argument("--no-diffusers", action="store_true", help="time our pipeline alone")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for variant in args.variants:
        if variant != "eager" and not set(variant.split("+")) <= set(PARTS):
            parser.error(
                f"--variants {variant}: expected 'eager' or parts joined by '+', from {', '.join(PARTS)}"
            )
    if args.fp8_fast_accum and not args.fp8:
        parser.error("--fp8-fast-accum goes with --fp8")
    try:
        args.inductor = inductor_settings(args.inductor)
    except ValueError as err:
        parser.error(f"--inductor: {err}")
    if min(args.steps, args.repeats, args.throughput_repeats, args.forward_batch, *args.batch_sizes) < 1:
        parser.error("--steps, the repeats and every batch size must be >= 1")
    return args


def inductor_settings(pairs: list[str]) -> dict[str, object]:
    """KEY=VALUE strings as torch._inductor.config settings; VALUE a Python literal or a string."""
    import ast

    from torch._inductor import config

    settings = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not hasattr(config, key):
            raise ValueError(f"{pair!r}: expected KEY=VALUE with KEY a setting of torch._inductor.config")
        try:
            settings[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            settings[key] = text
    return settings


# -- the two pipelines --------------------------------------------------------------------------


def stand_in_gpt2_tokenizer(vocab_size: int = 50258):
    """A word-level tokenizer of GPT-2's vocabulary size with '<|EOS|>' last (no download needed).

    The caption decoder only needs the size and the end token to run; random weights make
    meaningless captions with any tokenizer.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 2)}
    vocab["<|endoftext|>"] = vocab_size - 2
    words = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"eos_token": "<|EOS|>"})
    return tokenizer


def build_ours(preset: str, device: torch.device, seed: int) -> UniDiffuser:
    """Our pipeline with random weights, fp32, on the device."""
    if preset == "tiny":
        from unidiffuser.tiny import tiny_pipeline

        return tiny_pipeline(seed=seed).to(device)
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    from unidiffuser.components.autoencoder import SD_KL_F8, ImageAutoencoder
    from unidiffuser.components.caption import CaptionDecoder
    from unidiffuser.components.caption import preset as caption_preset
    from unidiffuser.components.clip import (
        VIT_B_32,
        VIT_L_14_TEXT,
        ClipImageEmbedder,
        ClipTextEncoder,
        tiny_clip_tokenizer,
    )

    torch.manual_seed(seed)
    with device:  # initialising 1.4 billion parameters on the CPU takes minutes
        network = UViT(PRESETS["unidiffuser-v1"])
        autoencoder = ImageAutoencoder(SD_KL_F8)
        image_encoder = ClipImageEmbedder(CLIPVisionModelWithProjection(VIT_B_32.transformers_config()))
        # CLIP ViT-L/14's text tower; the small tokenizer only changes which embedding rows are read
        text_encoder = ClipTextEncoder(
            CLIPTextModel(VIT_L_14_TEXT.transformers_config()), tiny_clip_tokenizer()
        )
        decoder = CaptionDecoder(caption_preset("released"), stand_in_gpt2_tokenizer()).frozen()
    return UniDiffuser(network, autoencoder, image_encoder, text_encoder, decoder)


def diffusers_unet_kwargs(config: UViTConfig) -> dict:
    """diffusers' UniDiffuserModel arguments for our image-text config (``config_from_diffusers`` inverted)."""
    img, clip, text = (config.modality(n) for n in ("img", "clip_img", "text"))
    return dict(
        text_dim=text.shape[1], clip_img_dim=clip.shape[0], num_text_tokens=text.shape[0],
        num_attention_heads=config.num_heads, attention_head_dim=config.width // config.num_heads,
        in_channels=img.shape[0], out_channels=img.shape[0], num_layers=config.depth, sample_size=img.shape[1],
        patch_size=img.patch_size, activation_fn="gelu", norm_type="layer_norm", block_type="unidiffuser",
        pre_layer_norm=False, use_data_type_embedding=bool(config.labels), ff_final_dropout=True,
    )  # fmt: skip


def build_diffusers(pipe: UniDiffuser):
    """diffusers' UniDiffuserPipeline holding copies of our pipeline's weights."""
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.pipelines.deprecated.unidiffuser import UniDiffuserPipeline
    from diffusers.pipelines.deprecated.unidiffuser.modeling_text_decoder import UniDiffuserTextDecoder
    from diffusers.pipelines.deprecated.unidiffuser.modeling_uvit import UniDiffuserModel
    from transformers import CLIPImageProcessor

    from unidiffuser.components.clip import CLIP_MEAN, CLIP_STD

    device = pipe.device
    with device:
        unet = UniDiffuserModel(**diffusers_unet_kwargs(pipe.network.config))
        decoder_cfg = pipe.caption_decoder.config
        text_decoder = UniDiffuserTextDecoder(
            prefix_length=pipe.network.config.modality("text").shape[0],
            prefix_inner_dim=decoder_cfg.feature_dim,
            prefix_hidden_dim=decoder_cfg.prefix_dim,
            **decoder_cfg.gpt2,
        )
    unet.load_state_dict(to_diffusers_keys(pipe.network.state_dict()), strict=True)
    # their GPT2LMHeadModel is "transformer", ours "gpt"
    decoder_state = {
        ("transformer." + k[4:] if k.startswith("gpt.") else k): v
        for k, v in pipe.caption_decoder.state_dict().items()
    }
    text_decoder.load_state_dict(decoder_state, strict=True)
    side = pipe.image_encoder.image_size
    processor = CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )  # fmt: skip
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon",
    )  # fmt: skip
    theirs = UniDiffuserPipeline(
        vae=copy.deepcopy(pipe.autoencoder.vae),
        text_encoder=copy.deepcopy(pipe.text_encoder.model),
        image_encoder=copy.deepcopy(pipe.image_encoder.model),
        clip_image_processor=processor,
        clip_tokenizer=pipe.text_encoder.tokenizer,
        text_decoder=text_decoder.eval(),
        text_tokenizer=pipe.caption_decoder.tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
    )
    theirs.set_progress_bar_config(disable=True)
    return theirs


def make_fast(pipe: UniDiffuser, parts: set[str], backend: str, steps: int = 50) -> str:
    """Set our pipeline's sampling path from a set of ``PARTS``; returns its name for the tables.

    compile: compiled blocks; graphs: one CUDA graph per forward; loop: one CUDA graph per whole
    sampling loop (with graphs); vae: the image decoder compiled; cap: the caption search's step
    compiled; cudnn: the network's attention through cuDNN; fp8 / fp8t / fp8s: block linears in
    fp8 with row / tensor / static scales, the static ones calibrated by ``calibrate`` (another
    prompt, picture and seed than the timed calls); fa: with one of those, the fp8 products
    accumulated in the fast mode (``Fp8Linear.fast_accum``).
    """
    unknown = parts - set(PARTS)
    if unknown:
        raise ValueError(f"variant parts {sorted(unknown)}: expected some of {PARTS}")
    if "fa" in parts and not parts & {"fp8", "fp8t", "fp8s"}:
        raise ValueError("variant part fa (fast fp8 accumulation) goes with fp8, fp8t or fp8s")
    if not parts - {"loop"}:  # a loop graph needs the per-forward graphs' path: alone it is eager
        pipe.disable_fast_sampling()
        return "eager"
    scalings = {"fp8": "row", "fp8t": "tensor", "fp8s": "static"}
    fp8 = next((scalings[n] for n in scalings if n in parts), False)
    pipe.enable_fast_sampling(
        compile="compile" in parts, cuda_graphs="graphs" in parts, loop_graphs="loop" in parts, fp8=fp8,
        fp8_calibration=(lambda p: calibrate(p, steps)) if fp8 == "static" else None,
        compile_autoencoder="vae" in parts, compile_captions="cap" in parts,
        attention="cudnn" if "cudnn" in parts else None, backend=backend,
    )  # fmt: skip
    if "fa" in parts:  # set before the first call compiles the layers
        for module in pipe._fast.module.modules():
            if isinstance(module, Fp8Linear):
                module.fast_accum = True
    on_gpu = pipe.device.type == "cuda"
    shown = [n for n in PARTS if n in parts and (on_gpu or n not in ("graphs", "loop"))]
    if "loop" in shown and "graphs" not in shown:
        shown.remove("loop")
    return "+".join(shown) or "eager"


def calibrate(pipe: UniDiffuser, steps: int) -> None:
    """One call of each timed task with another prompt, picture and seed: the static fp8 scales."""
    seed = 12345
    pipe.text_to_image(CALIBRATION_PROMPT, steps=steps, guidance_scale=GUIDANCE, seed=seed)
    pipe.joint(1, steps=steps, guidance_scale=GUIDANCE, seed=seed)
    pipe.image_to_text(picture(pipe.default_size[0], seed), steps=steps, guidance_scale=GUIDANCE, seed=seed)


# -- measuring ----------------------------------------------------------------------------------


@dataclass
class Timing:
    first: float  # seconds of the first call (compilation and capture included)
    median: float  # seconds, median of the timed calls
    peak_mib: float | None  # allocated above the memory in use before the calls (CUDA only)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(call: Callable[[], object], device: torch.device, repeats: int) -> Timing:
    cuda = device.type == "cuda"
    synchronize(device)
    if cuda:
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else None
    return Timing(first, statistics.median(times), peak)


def matmul_rate(device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    """This device's bf16 matrix-multiply rate in TFLOP/s (median of ``repeats`` products)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    timing = measure(lambda: a @ b, device, repeats)
    return 2 * size**3 / timing.median / 1e12


def network_inputs(config: UViTConfig, batch: int, device: torch.device, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    inputs = {}
    for m in config.modalities:
        if m.kind == "label":
            inputs[m.name] = torch.randint(0, m.num_classes, (batch,), generator=g).to(device)
        else:
            inputs[m.name] = torch.randn(batch, *m.shape, generator=g).to(device, dtype)
    times = {grp: (torch.rand(batch, generator=g) * 1000).to(device) for grp in config.groups}
    return inputs, times


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).norm() / b.norm()).item()


def picture(side: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((side, side, 3)) * 255).astype("uint8"))


def table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def seconds(t: Timing | None) -> str:
    return "-" if t is None else f"{t.median:.3f}"


def mib(t: Timing | None) -> str:
    return "-" if t is None or t.peak_mib is None else f"{t.peak_mib:,.0f}"


def ratio(theirs: Timing | None, ours: Timing) -> str:
    return "-" if theirs is None else f"{theirs.median / ours.median:.2f}"


def quiet_libraries() -> None:
    """Errors only from transformers and diffusers: their deprecation and config notes are not results."""
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()


STAGES = ("encode", "network", "solver", "decode image", "caption", "other", "total")
# the pipeline's methods that make up a call, by stage
STAGE_METHODS = {"encode_prompts": "encode", "encode_images": "encode", "decode_images": "decode image",
                 "decode_texts": "caption"}  # fmt: skip


class _Timed:
    """Calls ``target``, adding its synchronised wall time to ``totals[stage]``; other attributes pass through."""

    def __init__(self, target, stage: str, totals: dict[str, float], device: torch.device):
        self._target, self._stage, self._totals, self._device = target, stage, totals, device

    def __call__(self, *args, **kwargs):
        synchronize(self._device)
        start = time.perf_counter()
        try:
            return self._target(*args, **kwargs)
        finally:
            synchronize(self._device)
            self._totals[self._stage] = self._totals.get(self._stage, 0.0) + time.perf_counter() - start

    def __getattr__(self, name):
        return getattr(self._target, name)


def stage_times(pipe: UniDiffuser, call: Callable[[], object], device: torch.device, repeats: int) -> dict:
    """Median seconds per stage of ``call`` (warm): the pipeline's parts wrapped in synchronised timers.

    "solver" is the sampling loop less its network calls; "other" is the call less every stage.
    """
    import unidiffuser.pipeline as pipeline_module

    runs = []
    generate = pipeline_module.generate
    for i in range(repeats + 1):
        totals: dict[str, float] = {}
        saved_fast = pipe._fast
        pipe._fast = _Timed(pipe.sampler, "network", totals, device)
        for method, stage in STAGE_METHODS.items():
            setattr(pipe, method, _Timed(getattr(pipe, method), stage, totals, device))
        pipeline_module.generate = _Timed(generate, "sampling", totals, device)
        try:
            _Timed(call, "total", totals, device)()
        finally:
            pipe._fast = saved_fast
            for method in STAGE_METHODS:
                delattr(pipe, method)  # the class's method again
            pipeline_module.generate = generate
        totals["solver"] = totals.pop("sampling", 0.0) - totals.get("network", 0.0)
        totals["other"] = totals["total"] - sum(v for k, v in totals.items() if k != "total")
        if i:  # the first call is a warm-up
            runs.append(totals)
    return {stage: statistics.median(run.get(stage, 0.0) for run in runs) for stage in STAGES}


# The kinds of kernel in a profile, each found by words in the kernel's name (the first match wins).
KERNEL_KINDS = {
    "fused": ("triton",),  # first: a generated kernel's name also lists what it fused (e.g. _scaled_mm)
    "matmul": ("gemm", "nvjet", "cutlass", "xmma", "scaled_mm", "addmm", "bmm", "::mm", "matmul", "linear"),
    "attention": ("flash", "fmha", "sdpa", "attention", "cudnn"),
    "topk/sort": ("topk", "sort", "radix"),
    "copy": ("memcpy", "memset", "copy", "cat", "index"),
    "other": (),
}


def kernel_kind(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, words in KERNEL_KINDS.items() if any(w in lower for w in words)), "other")


def kernel_profile(call: Callable[[], object], device: torch.device, repeats: int, top: int = 8):
    """Profile ``repeats`` warm calls: wall seconds per call, device seconds per kind, the top kernels.

    On CUDA the device time is the kernels' own (those replayed from CUDA graphs included); on the
    CPU it is each operator's self time. Returns (wall, {kind: seconds}, launches,
    [(name, seconds, calls)]), all per call: launches counts the kernels (operators) run.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    call()  # compilation and capture happen outside the profile
    synchronize(device)
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        synchronize(device)
        wall = (time.perf_counter() - start) / repeats
    kinds: dict[str, float] = {}
    costs, launches = [], 0.0
    for event in prof.key_averages():
        if cuda and event.device_type != DeviceType.CUDA:
            continue
        seconds = (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e6 / repeats
        if seconds <= 0:
            continue
        kind = kernel_kind(event.key)
        kinds[kind] = kinds.get(kind, 0.0) + seconds
        costs.append((event.key[:90], seconds, event.count / repeats))
        launches += event.count / repeats
    costs.sort(key=lambda c: -c[1])
    return wall, kinds, launches, costs[:top]


# -- the sections -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = device_option(args.device, Path(__file__).name)
    quiet_libraries()
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    compile = cuda if args.compile is None else args.compile
    graphs = cuda if args.cuda_graph is None else args.cuda_graph
    vae = compile and cuda if args.compile_autoencoder is None else args.compile_autoencoder
    cap = compile and cuda if args.compile_captions is None else args.compile_captions
    fp8 = {"row": "fp8", "tensor": "fp8t", "static": "fp8s"}[args.fp8_scaling] if args.fp8 else None
    chosen = {n for n, on in (("compile", compile), ("graphs", graphs), ("loop", args.loop_graphs and graphs),
                              ("vae", vae), ("cap", cap), (fp8, fp8), ("fa", args.fp8_fast_accum)) if on}  # fmt: skip
    if cuda:
        where = f"{torch.cuda.get_device_name(device)} | CUDA {torch.version.cuda}"
    else:
        where = f"CPU {platform.processor() or platform.machine()} | {torch.get_num_threads()} threads"
    print(
        f"device: {where} | torch {torch.__version__} | preset {args.preset} | {args.steps} steps", flush=True
    )

    if args.inductor:
        from torch._inductor import config as inductor_config

        for key, value in args.inductor.items():
            setattr(inductor_config, key, value)
        print("inductor: " + " ".join(f"{k}={v}" for k, v in args.inductor.items()), flush=True)
    ours = build_ours(args.preset, device, args.seed)
    side = ours.default_size[0]
    image = picture(side, args.seed)
    steps = args.steps

    reference = {}
    if "accuracy" in args.sections:  # our eager fp32 path, before anything is converted
        inputs, times = network_inputs(ours.network.config, 2, device, torch.float32, args.seed)
        with torch.no_grad():
            reference["forward"] = ours.network(inputs, times)
        reference["t2i"] = ours.text_to_image(
            PROMPT, steps=steps, seed=args.seed, return_latents=True
        ).latents

    theirs = None
    if not args.no_diffusers and set(args.sections) & {"e2e", "throughput", "forward"}:
        theirs = build_diffusers(ours).to(device, dtype)
    ours.to(device, dtype)
    path = make_fast(ours, chosen, args.backend, steps)
    name = str(dtype).removeprefix("torch.")
    print(f"ours: {name}, {path} | diffusers: {'not run' if theirs is None else f'{name}, eager'}")

    def our_call(task: str, batch: int) -> Callable[[], object]:
        if task == "t2i":
            return lambda: ours.text_to_image(
                [PROMPT] * batch, steps=steps, guidance_scale=GUIDANCE, seed=args.seed
            )
        if task == "joint":
            return lambda: ours.joint(batch, steps=steps, guidance_scale=GUIDANCE, seed=args.seed)
        return lambda: ours.image_to_text(
            [image] * batch, steps=steps, guidance_scale=GUIDANCE, seed=args.seed
        )

    def their_call(task: str, batch: int) -> Callable[[], object]:
        kwargs = dict(num_inference_steps=steps, guidance_scale=GUIDANCE + 1)

        def call():
            generator = torch.Generator().manual_seed(args.seed)
            if task == "t2i":
                return theirs(prompt=[PROMPT] * batch, generator=generator, **kwargs)
            if task == "i2t":
                return theirs(image=image, num_prompts_per_image=batch, generator=generator, **kwargs)
            theirs.set_joint_mode()
            try:
                return theirs(
                    num_images_per_prompt=batch, num_prompts_per_image=batch, generator=generator, **kwargs
                )
            finally:
                theirs.reset_mode()

        return call

    def both(task: str, batch: int, repeats: int) -> tuple[Timing | None, Timing]:
        mine = measure(our_call(task, batch), device, repeats)
        other = measure(their_call(task, batch), device, repeats) if theirs is not None else None
        return other, mine

    if "e2e" in args.sections:
        rows = []
        for task in args.tasks:
            other, mine = both(task, 1, args.repeats)
            rows.append((task, 1, seconds(other), seconds(mine), ratio(other, mine), f"{mine.first:.2f}",
                         mib(other), mib(mine)))  # fmt: skip
        print("\nEnd to end (seconds per call, median of warm calls)\n")
        header = ("task", "batch", "diffusers s", "ours s", "diffusers / ours", "ours first s",
                  "diffusers peak MiB", "ours peak MiB")  # fmt: skip
        print(table(header, rows), flush=True)

    if "stages" in args.sections:
        rows = []
        for task in args.tasks:
            parts = stage_times(ours, our_call(task, 1), device, args.repeats)
            rows.append((task, 1, *(f"{1e3 * parts.get(name, 0.0):.1f}" for name in STAGES)))
        print("\nOurs by stage (milliseconds per call, median of warm calls, synchronised per stage)\n")
        print(table(("task", "batch", *STAGES), rows), flush=True)

    if "forward" in args.sections:
        batch = args.forward_batch
        config = ours.network.config
        inputs, times = network_inputs(config, batch, device, dtype, args.seed)
        network = ours.network
        network.check_values = False  # value checks synchronise the GPU; diffusers' model has none
        try:
            eager = measure(lambda: network(inputs, times), device, args.repeats * 4)
        finally:
            network.check_values = True
        fast = (
            None
            if path == "eager"
            else measure(lambda: ours.sampler(inputs, times), device, args.repeats * 4)
        )
        other = None
        if theirs is not None:
            clip = inputs["clip_img"][:, None]
            labels = inputs.get("data_type")
            other = measure(
                lambda: theirs.unet(inputs["img"], clip, inputs["text"], timestep_img=times["image"],
                                    timestep_text=times["text"], data_type=labels),
                device, args.repeats * 4,
            )  # fmt: skip
        flops = forward_flops(config, batch=batch)
        peak = matmul_rate(device) if cuda else None

        def rate(t: Timing | None) -> tuple[str, str]:
            if t is None:
                return "-", "-"
            tflops = flops / t.median / 1e12
            share = "-" if peak is None else f"{100 * tflops / peak:.0f}%"
            return f"{tflops:.3f}", share

        rows = [
            ("forward", batch, "diffusers", f"{1e3 * other.median:.3f}" if other else "-", *rate(other)),
            ("forward", batch, "ours eager", f"{1e3 * eager.median:.3f}", *rate(eager)),
        ]
        if fast is not None:
            rows.append(("forward", batch, f"ours {path}", f"{1e3 * fast.median:.3f}", *rate(fast)))
        matmul = "" if peak is None else f"; bf16 matmul 8192^3 measured at {peak:.0f} TFLOP/s"
        print(f"\nNetwork forward ({flops / 1e9:,.1f} GFLOP per call{matmul})\n")
        print(table(("section", "batch", "path", "median ms", "TFLOP/s", "of matmul rate"), rows), flush=True)

    if "accuracy" in args.sections:
        inputs, times = network_inputs(ours.network.config, 2, device, dtype, args.seed)
        out = ours.sampler(inputs, times)
        rows = [
            (f"forward, {name}", f"{relative_error(out[name], ref):.2e}")
            for name, ref in reference["forward"].items()
        ]
        latents = ours.text_to_image(PROMPT, steps=steps, seed=args.seed, return_latents=True).latents
        rows += [(f"t2i {steps} steps, {name}", f"{relative_error(latents[name], ref):.2e}")
                 for name, ref in reference["t2i"].items()]  # fmt: skip
        label = f"{str(dtype).removeprefix('torch.')}, {path}"
        print(
            f"\nAccuracy: ours as benchmarked ({label}) against ours eager fp32 (relative L2 error, same seed)\n"
        )
        print(table(("output", "relative error"), rows), flush=True)

    if "throughput" in args.sections:
        rows = []
        for batch in args.batch_sizes:
            other, mine = both("t2i", batch, args.throughput_repeats)
            their_rate = "-" if other is None else f"{batch / other.median:.2f}"
            rows.append(("t2i", batch, their_rate, f"{batch / mine.median:.2f}", ratio(other, mine),
                         f"{mine.first:.2f}", mib(other), mib(mine)))  # fmt: skip
        print("\nThroughput (text-to-image, images per second)\n")
        header = ("task", "batch", "diffusers img/s", "ours img/s", "ours / diffusers", "ours first s",
                  "diffusers peak MiB", "ours peak MiB")  # fmt: skip
        print(table(header, rows), flush=True)

    if "variants" in args.sections:
        rows = []
        for variant in args.variants:
            try:
                name = make_fast(ours, set(variant.split("+")) - {"eager"}, args.backend, steps)
                timing = measure(our_call("t2i", 1), device, args.repeats)
            except Exception as err:  # one variant that fails on this device leaves the others' rows
                print(f"variant {variant} failed: {type(err).__name__}: {err}", flush=True)
                rows.append((variant, "failed", "-", "-", "-"))
                continue
            rows.append((variant, name, f"{timing.median:.3f}", f"{timing.first:.2f}", mib(timing)))
            print(f"variant {variant}: {timing.median:.3f} s", flush=True)
        print("\nOurs by variant (text-to-image, batch 1)\n")
        print(table(("variant", "path on this device", "s", "first s", "peak MiB"), rows), flush=True)
        make_fast(ours, chosen, args.backend, steps)

    if "kernels" in args.sections:
        rows, tops = [], []
        for task in args.tasks:
            wall, kinds, launches, top = kernel_profile(our_call(task, 1), device, args.repeats)
            busy = sum(kinds.values())
            rows.append((task, 1, f"{1e3 * wall:.1f}", f"{launches:,.0f}", f"{1e3 * busy:.1f}", f"{1e3 * (wall - busy):.1f}",
                         *(f"{1e3 * kinds.get(kind, 0.0):.1f}" for kind in KERNEL_KINDS)))  # fmt: skip
            tops += [(task, name, f"{1e3 * ms:.2f}", f"{calls:g}") for name, ms, calls in top]
        unit = "kernel" if cuda else "operator"
        print(
            f"\nDevice time by kind of {unit} (milliseconds and runs per warm call, mean of {args.repeats})\n"
        )
        header = ("task", "batch", "wall", f"{unit} runs", f"{unit} time", f"wall less {unit} time",
                  *KERNEL_KINDS)  # fmt: skip
        print(table(header, rows))
        print(f"\nCostliest {unit}s (milliseconds and calls per warm call)\n")
        print(table(("task", unit, "ms", "calls"), tops), flush=True)


if __name__ == "__main__":
    main()
