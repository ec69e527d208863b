"""The network's forward made fast for sampling: compiled, captured as CUDA graphs, or in fp8.

A sampling loop calls the network with the same shapes at every step, which is the case that
compilation and CUDA graphs are made for. ``FastNetwork`` wraps a U-ViT and is called like it, so
``tasks.generate`` and the pipeline take either::

    fast = FastNetwork(network, compile=True, cuda_graphs=True)
    latents = generate(fast, schedule, "t2i", given={"text": text}, labels={"data_type": 1})

Per input signature (names, shapes, dtypes) the first call compiles (``torch.compile``, inductor,
``dynamic=False``: one compilation per shape, kept for the life of the object) and, on CUDA,
captures the forward as a graph; later calls copy the inputs into the captured buffers and replay
it. The first call at a new shape therefore costs the compilation (tens of seconds for the
released network); the rest cost one graph launch. CUDA graphs need a CUDA device: elsewhere the
forward runs uncaptured (compiled or not), with the same results.

The network's value checks (NaN, timestep range) read values back to the host and so stall the
GPU at every call; the fast forward skips them (shapes are still checked). It never changes the
network or its state dict: the fp8 option works on a private copy.

``fp8=True`` runs the transformer blocks' linear layers in float8 (e4m3) with a scale per input row
and per output channel (per tensor on Ada GPUs), the format of Hopper's fp8 tensor cores
(``torch._scaled_mm``; the CPU has it too, slowly): attention, the norms, embeddings and heads stay
in the network's dtype. Finding each input's scale at every call costs a pass over it; on an H100
that ate the faster product's gain. ``fp8="static"`` fixes each layer's input scale from
calibration calls (``recorded_input_amax``), and the scaling then fuses into the kernel that
makes the input: text-to-image 1.22 times faster than bf16 end to end there.

A sampling loop has fixed shapes and a fixed time grid, so with CUDA graphs the whole loop, every
network call and every solver update, is captured as one graph per task and shape (``sample_loop``,
used by ``tasks.generate`` when no per-step callback is asked for): a call then costs one copy of
its conditions and noise in and one graph replay, with no Python between the steps. The noise
that absent modalities get at every step is drawn ahead, in the order the plain loop draws it, so
both give the same samples.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .network import UViT

T = TypeVar("T")
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
FP8_SCALINGS = ("row", "tensor", "static")
ATTENTION_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# torch.compile recompiles per shape (dynamic=False); its default limit of 8 shapes per function
# would silently fall back to eager in a process that samples many batch sizes.
RECOMPILE_LIMIT = 64


class Fp8Linear(nn.Module):
    """A frozen linear layer computed in float8 e4m3 with scales, accumulated in fp32.

    A scale maps the largest magnitude it covers to 448 (e4m3's largest). ``scaling``:

    - "row" (the default): a scale per input row and per output channel of the weight, the input's
      found at every call.
    - "tensor": one scale for the whole input, found at every call (a pass over the input before
      the product), and one for the weight.
    - "static": one fixed input scale, from ``input_amax``, the largest input magnitude seen on
      calibration data (``recorded_input_amax``); larger inputs are clipped to it. Scaling is then
      a multiplication that ``torch.compile`` fuses into the kernel that made the input.

    The product comes out in the input's dtype.

    Args:
        linear: the layer to copy; its in and out features must be multiples of 16 (the fp8
            matrix product's requirement).
        scaling: "row", "tensor" or "static".
        input_amax: with "static", the input magnitude that maps to 448.
        fast_accum: accumulate the product in Hopper's faster, less precise fp8 mode
            (``torch._scaled_mm``'s ``use_fast_accum``); the CPU computes the same either way.
    """

    def __init__(
        self,
        linear: nn.Linear,
        scaling: str = "row",
        input_amax: float | None = None,
        fast_accum: bool = False,
    ):
        super().__init__()
        if scaling not in FP8_SCALINGS:
            raise ValueError(f"scaling={scaling!r}: expected one of {FP8_SCALINGS}")
        out_features, in_features = linear.weight.shape
        if in_features % 16 or out_features % 16:
            raise ValueError(
                f"Fp8Linear: in_features={in_features} and out_features={out_features} must be "
                "multiples of 16"
            )
        static = scaling == "static"
        if static != (input_amax is not None):
            raise ValueError("Fp8Linear: input_amax goes with scaling='static', and only with it")
        if static and not (0 < input_amax < float("inf")):
            raise ValueError(f"Fp8Linear: input_amax={input_amax!r}: expected a positive finite number")
        self.scaling, self.fast_accum = scaling, fast_accum
        w = linear.weight.detach().float()  # (out, in)
        amax = w.abs().amax(dim=1, keepdim=True) if scaling == "row" else w.abs().amax()
        scale = amax.clamp_min(1e-12) / FP8_MAX  # (out, 1) or ()
        self.register_buffer("weight", (w / scale).to(FP8))  # (out, in)
        self.register_buffer("weight_scale", scale.t() if scaling == "row" else scale)  # (1, out) or ()
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)
        if static:
            self.register_buffer("input_scale", torch.tensor(input_amax / FP8_MAX, device=w.device))
            self.register_buffer("input_inverse", torch.tensor(FP8_MAX / input_amax, device=w.device))

    def forward(self, x: Tensor) -> Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)  # (M, K)
        if self.scaling == "static":
            scale = self.input_scale
            xq = (x2.float() * self.input_inverse).clamp(-FP8_MAX, FP8_MAX).to(FP8)  # (M, K)
        else:
            if self.scaling == "row":
                amax = x2.abs().amax(dim=1, keepdim=True).float()  # (M, 1)
            else:
                amax = x2.abs().amax().float()
            scale = amax.clamp_min(1e-12) / FP8_MAX
            xq = (x2.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)  # (M, K)
        y = torch._scaled_mm(
            xq, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=x.dtype,
            use_fast_accum=self.fast_accum,
        )  # fmt: skip
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, y.shape[-1])  # (..., N)


def default_fp8_scaling(device: torch.device) -> str:
    """Row scales where the fp8 product takes them (Hopper GPUs and later, the CPU); else tensor."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        return "tensor"
    return "row"


def fp8_layers(network: nn.Module) -> list[str]:
    """The names of the linear layers that fp8 replaces: each block's qkv, proj, fc1, fc2 and skip."""
    ends = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "skip_linear")
    return [
        name
        for name, module in network.named_modules()
        if isinstance(module, nn.Linear)
        and name.split(".")[0] in ("in_blocks", "mid_block", "out_blocks")
        and name.endswith(ends)
    ]


@contextmanager
def recorded_input_amax(network: UViT) -> Iterator[dict[str, float]]:
    """The largest input magnitude of each fp8 layer (``fp8_layers``) over the forwards run inside.

    Yields a dict that is filled, {layer name: amax}, when the block exits; the network runs as
    usual meanwhile (its plain forward: a compiled or captured copy is not seen).
    """
    seen: dict[str, Tensor] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            amax = args[0].detach().abs().amax().float()
            seen[name] = torch.maximum(seen[name], amax) if name in seen else amax

        return hook

    handles = [network.get_submodule(n).register_forward_pre_hook(record(n)) for n in fp8_layers(network)]
    found: dict[str, float] = {}
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()
        found.update({name: float(amax) for name, amax in seen.items()})


def fp8_copy(
    network: UViT, scaling: str | None = None, input_amax: Mapping[str, float] | None = None
) -> UViT:
    """A copy of the network whose block linear layers (qkv, proj, fc1, fc2, skip) run in fp8.

    ``scaling`` is "row", "tensor" or "static" (see ``Fp8Linear``); None picks
    ``default_fp8_scaling``. "static" needs ``input_amax`` for every layer, as
    ``recorded_input_amax`` gives it. The copy is for sampling only (its buffers are not the
    network's state dict); the network itself is unchanged.
    """
    if network.device.type == "cuda" and torch.cuda.get_device_capability(network.device) < (8, 9):
        name = torch.cuda.get_device_name(network.device)
        raise ValueError(f"fp8: {name} has no fp8 tensor cores (they start with Ada and Hopper, sm_89)")
    scaling = default_fp8_scaling(network.device) if scaling is None else scaling
    layers = fp8_layers(network)
    if scaling == "static":
        missing = [n for n in layers if not (input_amax or {}).get(n)]
        if missing:
            raise ValueError(
                f"fp8 static scales: no input magnitude recorded for {len(missing)} layers ({missing[0]}, ...); "
                "record them with recorded_input_amax over sampling calls that reach every block"
            )
    fast = copy.deepcopy(network).eval().requires_grad_(False)
    for name in layers:
        parent_name, _, attr = name.rpartition(".")
        parent = fast.get_submodule(parent_name)
        amax = input_amax[name] if scaling == "static" else None
        setattr(parent, attr, Fp8Linear(getattr(parent, attr), scaling, amax))
    return fast


def _call_block(block: nn.Module, x: Tensor, skip: Tensor | None) -> Tensor:
    """One block, the unit that is compiled: every block of a kind reuses one compilation."""
    return block(x, skip)


@contextmanager
def _values_unchecked(network: UViT) -> Iterator[None]:
    previous = network.check_values
    network.check_values = False
    try:
        yield
    finally:
        network.check_values = previous


def _signature(inputs: Mapping[str, Tensor], timesteps: Mapping[str, Tensor]) -> tuple:
    """What a captured graph depends on: every input's name, shape, dtype and device."""
    return tuple(
        (kind, name, tuple(t.shape), t.dtype, t.device)
        for kind, values in (("input", inputs), ("time", timesteps))
        for name, t in sorted(values.items())
    )


def capture_graph(run: Callable[[], T], pool, warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, T]:
    """``run`` captured as a CUDA graph in the memory ``pool``; returns the graph and what the
    captured call returned (tensors that each replay rewrites in place).

    ``run`` is called ``warmup`` times first on a side stream, as capture requires: compilation,
    autotuning and library workspaces happen there, outside the graph.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = run()
    return graph, out


class _Graph:
    """One forward captured as a CUDA graph: inputs are copied in, outputs cloned out."""

    def __init__(self, forward, inputs: Mapping[str, Tensor], timesteps: Mapping[str, Tensor], pool):
        self.inputs = {k: v.clone() for k, v in inputs.items()}
        self.timesteps = {k: v.clone() for k, v in timesteps.items()}
        self.graph, self.outputs = capture_graph(lambda: forward(self.inputs, self.timesteps), pool)

    def __call__(self, inputs: Mapping[str, Tensor], timesteps: Mapping[str, Tensor]) -> dict[str, Tensor]:
        for name, value in inputs.items():
            self.inputs[name].copy_(value)
        for name, value in timesteps.items():
            self.timesteps[name].copy_(value)
        self.graph.replay()
        # The next replay overwrites the outputs: hand out copies.
        return {name: out.clone() for name, out in self.outputs.items()}


class _LoopGraph:
    """A whole sampling loop, every network call and solver update, captured as one CUDA graph.

    ``fn`` is the task's model function (``tasks.TaskModel``) of the first call; the graph keeps a
    twin of it whose conditions are its own buffers and whose absent-modality noise comes from a
    tape drawn ahead. A later call copies its conditions, start state and freshly drawn noise into
    them and replays.
    """

    def __init__(self, network: FastNetwork, fn, x: Tensor, run: Callable, calls: int, pool):
        self.fn = fn.with_noise_tape(calls)
        self.x = x.clone()

        def loop() -> Tensor:
            self.fn.noise_tape.rewind()
            out = run(self.fn, self.x)
            self.fn.noise_tape.check_spent()
            return out

        with network._capturing_loop():
            self.graph, self.out = capture_graph(loop, pool)

    def __call__(self, fn, x: Tensor) -> Tensor:
        self.fn.load_conditions(fn)
        self.x.copy_(x)
        self.fn.noise_tape.fill(fn.generator)
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites it


class FastNetwork:
    """A U-ViT's forward for sampling, compiled and captured per input shape (see the module doc).

    Args:
        network: the U-ViT, in eval mode.
        compile: compile the forward with ``torch.compile`` (one compilation per input shape).
        cuda_graphs: on a CUDA device, capture the forward as a CUDA graph per input shape and
            replay it; ignored on other devices.
        fp8: run the blocks' linear layers in fp8 (a private copy of the network; see
            ``fp8_copy``): True (the device's default scales), "row", "tensor" or "static".
        fp8_amax: with ``fp8="static"``, each layer's calibrated input magnitude
            (``recorded_input_amax``).
        loop_graphs: with CUDA graphs, capture whole sampling loops too (``sample_loop``).
        attention: the scaled-dot-product attention kernel, one of ``ATTENTION_BACKENDS``
            ("cudnn", "flash", "efficient", "math"); None lets PyTorch choose.
        backend: the ``torch.compile`` backend; "inductor" generates kernels, "aot_eager" only
            traces (for tests on machines without a C compiler or time to spare).
    """

    def __init__(
        self,
        network: UViT,
        *,
        compile: bool = True,
        cuda_graphs: bool = True,
        fp8: bool | str = False,
        fp8_amax: Mapping[str, float] | None = None,
        loop_graphs: bool = True,
        attention: str | None = None,
        backend: str = "inductor",
    ):
        if not isinstance(network, UViT):
            raise ValueError(f"network: expected a UViT, got {type(network).__name__}")
        if network.training:
            raise ValueError("network: FastNetwork is for sampling; call network.eval() first")
        if attention is not None and attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention={attention!r}: expected None or one of {tuple(ATTENTION_BACKENDS)}")
        if fp8 not in (False, True, *FP8_SCALINGS):
            raise ValueError(f"fp8={fp8!r}: expected True, False or one of {FP8_SCALINGS}")
        if (fp8_amax is not None) != (fp8 == "static"):
            raise ValueError(f"fp8_amax goes with fp8='static' (recorded_input_amax), got fp8={fp8!r}")
        self.network = network
        self.module = fp8_copy(network, None if fp8 is True else fp8, fp8_amax) if fp8 else network
        self.fp8_amax = fp8_amax
        self.compile, self.cuda_graphs, self.fp8, self.backend = compile, cuda_graphs, fp8, backend
        self.loop_graphs, self.attention = loop_graphs, attention
        self._run_block = (
            torch.compile(_call_block, backend=backend, dynamic=False, fullgraph=True) if compile else None
        )
        self._graphs: dict[tuple, _Graph] = {}
        self._loops: dict[tuple, _LoopGraph] = {}
        self._pool = None
        self._in_loop = False  # capturing a whole loop: forwards run uncaptured inside it

    @property
    def config(self):
        return self.network.config

    @property
    def device(self) -> torch.device:
        return self.network.device

    @property
    def dtype(self) -> torch.dtype:
        return self.network.dtype

    @property
    def num_graphs(self) -> int:
        """CUDA graphs of single forwards captured so far (one per input signature)."""
        return len(self._graphs)

    @property
    def num_loop_graphs(self) -> int:
        """CUDA graphs of whole sampling loops captured so far (one per task, shape and grid)."""
        return len(self._loops)

    @property
    def captures_loops(self) -> bool:
        """Whether ``sample_loop`` captures: loop graphs on, CUDA graphs on, on a CUDA device."""
        return self.loop_graphs and self.cuda_graphs and self.device.type == "cuda"

    def _pool_handle(self):
        if self._pool is None:
            # One memory pool for every graph: they never run at once, and each call's outputs
            # are cloned before the next replay.
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    @contextmanager
    def _capturing_loop(self) -> Iterator[None]:
        self._in_loop = True
        try:
            yield
        finally:
            self._in_loop = False

    def sample_loop(self, fn, x: Tensor, run: Callable, key: tuple, calls: int) -> Tensor:
        """``run(fn, x)``, a whole sampling loop, captured as one CUDA graph and replayed.

        Args:
            fn: the task's model function (a ``tasks.TaskModel`` around this network).
            x: the start state (B, N).
            run: the loop: ``run(fn, x)`` returns the final state; it must call ``fn`` the same
                way every time for the same ``key`` and ``fn.signature()``.
            key: what fixes the loop besides ``fn``'s shapes (the schedule, steps, solver, grid).
            calls: how many times the loop calls ``fn``.

        The first call per key and signature captures (running the loop twice to warm up); where
        ``captures_loops`` is False, ``run(fn, x)`` runs as it is.
        """
        if not self.captures_loops:
            return run(fn, x)
        signature = (key, fn.signature(), tuple(x.shape), x.dtype, x.device)
        loop = self._loops.get(signature)
        if loop is None:
            loop = self._loops[signature] = _LoopGraph(self, fn, x, run, calls, self._pool_handle())
        return loop(fn, x)

    def _forward(self, inputs: Mapping[str, Tensor], timesteps: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.attention is None:
            return self.module(inputs, timesteps, run_block=self._run_block)
        # entered around the compiled blocks too: their attention kernel is chosen when traced
        with sdpa_kernel(ATTENTION_BACKENDS[self.attention]):
            return self.module(inputs, timesteps, run_block=self._run_block)

    def __call__(self, inputs: Mapping[str, Tensor], timesteps: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The network's forward: one tensor per diffused modality (see ``UViT.forward``)."""
        if self.network.training:
            raise ValueError("network: FastNetwork is for sampling; the network was put back in train mode")
        with (
            torch.no_grad(),
            _values_unchecked(self.module),
            torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT),
        ):
            if self._in_loop or not (self.cuda_graphs and self.device.type == "cuda"):
                return self._forward(inputs, timesteps)
            key = _signature(inputs, timesteps)
            graph = self._graphs.get(key)
            if graph is None:
                graph = self._graphs[key] = _Graph(self._forward, inputs, timesteps, self._pool_handle())
            return graph(inputs, timesteps)
