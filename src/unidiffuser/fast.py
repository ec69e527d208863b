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

``fp8=True`` runs the transformer blocks' linear layers in float8 (e4m3) with per-tensor scales,
the format of Hopper's fp8 tensor cores (``torch._scaled_mm``; the CPU has it too, slowly):
attention, the norms, embeddings and heads stay in the network's dtype.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .network import UViT

T = TypeVar("T")
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# torch.compile recompiles per shape (dynamic=False); its default limit of 8 shapes per function
# would silently fall back to eager in a process that samples many batch sizes.
RECOMPILE_LIMIT = 64


class Fp8Linear(nn.Module):
    """A frozen linear layer computed in float8 e4m3 with per-tensor scales, accumulated in fp32.

    The weight is scaled once so that its largest magnitude is 448 (e4m3's largest); the input is
    scaled the same way at every call. The product comes out in the input's dtype.

    Args:
        linear: the layer to copy; its in and out features must be multiples of 16 (the fp8
            matrix product's requirement).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        out_features, in_features = linear.weight.shape
        if in_features % 16 or out_features % 16:
            raise ValueError(
                f"Fp8Linear: in_features={in_features} and out_features={out_features} must be "
                "multiples of 16"
            )
        w = linear.weight.detach().float()
        scale = w.abs().amax().clamp_min(1e-12) / FP8_MAX
        self.register_buffer("weight", (w / scale).to(FP8))  # (out, in)
        self.register_buffer("weight_scale", scale)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)  # (M, K)
        m = x2.shape[0]
        scale = x2.abs().amax().float().clamp_min(1e-12) / FP8_MAX
        xq = (x2.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)  # (M, K)
        pad = -m % 16  # the fp8 product on CUDA wants the rows in multiples of 16
        if pad:
            xq = F.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(FP8)  # (M + pad, K)
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=x.dtype)
        y = y[:m]  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, y.shape[-1])


def fp8_copy(network: UViT) -> UViT:
    """A copy of the network whose block linear layers (qkv, proj, fc1, fc2, skip) run in fp8.

    The copy is for sampling only (its buffers are not the network's state dict); the network
    itself is unchanged.
    """
    if network.device.type == "cuda" and torch.cuda.get_device_capability(network.device) < (8, 9):
        name = torch.cuda.get_device_name(network.device)
        raise ValueError(f"fp8: {name} has no fp8 tensor cores (they start with Ada and Hopper, sm_89)")
    fast = copy.deepcopy(network).eval().requires_grad_(False)
    for blk in (*fast.in_blocks, fast.mid_block, *fast.out_blocks):
        for parent, name in ((blk.attn, "qkv"), (blk.attn, "proj"), (blk.mlp, "fc1"), (blk.mlp, "fc2")):
            setattr(parent, name, Fp8Linear(getattr(parent, name)))
        if blk.skip_linear is not None:
            blk.skip_linear = Fp8Linear(blk.skip_linear)
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


class FastNetwork:
    """A U-ViT's forward for sampling, compiled and captured per input shape (see the module doc).

    Args:
        network: the U-ViT, in eval mode.
        compile: compile the forward with ``torch.compile`` (one compilation per input shape).
        cuda_graphs: on a CUDA device, capture the forward as a CUDA graph per input shape and
            replay it; ignored on other devices.
        fp8: run the blocks' linear layers in fp8 (a private copy of the network; see
            ``fp8_copy``).
        backend: the ``torch.compile`` backend; "inductor" generates kernels, "aot_eager" only
            traces (for tests on machines without a C compiler or time to spare).
    """

    def __init__(
        self,
        network: UViT,
        *,
        compile: bool = True,
        cuda_graphs: bool = True,
        fp8: bool = False,
        backend: str = "inductor",
    ):
        if not isinstance(network, UViT):
            raise ValueError(f"network: expected a UViT, got {type(network).__name__}")
        if network.training:
            raise ValueError("network: FastNetwork is for sampling; call network.eval() first")
        self.network = network
        self.module = fp8_copy(network) if fp8 else network
        self.compile, self.cuda_graphs, self.fp8, self.backend = compile, cuda_graphs, fp8, backend
        self._run_block = (
            torch.compile(_call_block, backend=backend, dynamic=False, fullgraph=True) if compile else None
        )
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None

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
        """CUDA graphs captured so far (one per input signature)."""
        return len(self._graphs)

    def _forward(self, inputs: Mapping[str, Tensor], timesteps: Mapping[str, Tensor]) -> dict[str, Tensor]:
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
            if not (self.cuda_graphs and self.device.type == "cuda"):
                return self._forward(inputs, timesteps)
            key = _signature(inputs, timesteps)
            graph = self._graphs.get(key)
            if graph is None:
                if self._pool is None:
                    # One memory pool for every graph: they never run at once, and each call's
                    # outputs are cloned before the next replay.
                    self._pool = torch.cuda.graph_pool_handle()
                graph = self._graphs[key] = _Graph(self._forward, inputs, timesteps, self._pool)
            return graph(inputs, timesteps)
