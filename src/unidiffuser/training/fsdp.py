"""Fully sharded training (torch's FSDP2, ``fully_shard``) for networks too large for DDP.

Every block of the U-ViT, then the network around them, is sharded over the processes: each keeps
1/W of the weights, gradients, AdamW moments and EMA, and a block's full weights exist only while
it runs. With bf16 mixed precision the weights are gathered in bf16 and gradients reduced in fp32.
It runs on GPUs (nccl) and CPUs (gloo; the tests run it there) and needs torch >= 2.6 (tested
with 2.13).

Checkpoints keep the format of one-process and DDP runs: the full weights, EMA and optimizer state
are gathered (every process takes part) and the main process writes them. So a checkpoint loads
into a plain UViT, and a run resumes from any checkpoint, sharded or not, on any number of
processes. Resuming loads the full weights before sharding them; the full optimizer state is cut
into each process's shards.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..network import UViT, UViTConfig


def _fsdp():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:
        raise ValueError(
            f"distributed = 'fsdp' needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is torch "
            f"{torch.__version__}: upgrade torch, or train with distributed = 'ddp'"
        ) from None
    return fully_shard, MixedPrecisionPolicy, DTensor, distribute_tensor


def shard_network(model: UViT, device: torch.device, mixed_precision: str = "no") -> UViT:
    """Shard ``model`` in place over every process of the default process group: each block, then
    the rest (embeddings, heads, position embeddings, final norm). Returns the same module.

    Args:
        model: the network, its full weights loaded (on the CPU or on ``device``).
        device: this process's device; the shards are moved there.
        mixed_precision: "bf16" gathers bf16 weights for compute and reduces gradients in fp32.
    """
    fully_shard, MixedPrecisionPolicy, _, _ = _fsdp()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    # Inputs keep their dtype: the timesteps (0..1000) must not be rounded to bf16 before their
    # embedding; the network casts its inputs to the weights' dtype itself.
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if mixed_precision == "bf16" else None,
        reduce_dtype=torch.float32 if mixed_precision == "bf16" else None,
        cast_forward_inputs=False,
    )
    for block in (*model.in_blocks, model.mid_block, *model.out_blocks):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # The vector heads return views (y[:, 0]); FSDP warns that an in-place op on them would skip
    # its backward hook. The objective only reads the predictions, so the warning is noise.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPUViT\) returned a view tensor")
    return model


def _full(value: Any, keep: bool) -> Any:
    """A DTensor's full tensor (every process takes part), on the CPU; other values as they are.
    With ``keep`` False the gathered tensor is dropped (None)."""
    _, _, DTensor, _ = _fsdp()
    if isinstance(value, DTensor):
        value = value.full_tensor()
    if not keep:
        return None
    return value.detach().cpu() if isinstance(value, Tensor) else value


def full_state_dict(module: nn.Module, keep: bool = True) -> dict[str, Tensor]:
    """The full weights of a sharded module under its plain names, on the CPU.

    Every process must call it (it gathers each tensor in turn); those that pass ``keep=False``
    (the ones that write nothing) get an empty dict.
    """
    full = {name: _full(value, keep) for name, value in module.state_dict().items()}
    return full if keep else {}


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict[str, Any]:
    """The optimizer's state dict with full tensors: the form an unsharded optimizer saves.

    Every process must call it; ``keep`` as for ``full_state_dict``.
    """
    state = optimizer.state_dict()
    full = {
        i: {key: _full(value, keep) for key, value in entry.items()} for i, entry in state["state"].items()
    }
    return {**state, "state": full} if keep else {}


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Load an unsharded optimizer state dict into an optimizer of sharded parameters.

    Each state tensor shaped like its parameter is cut like the parameter (no communication:
    every process holds the full state); scalars such as AdamW's step are kept whole.
    """
    _, _, DTensor, distribute_tensor = _fsdp()
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the ids of state_dict
    sharded = {}
    for index, entry in state["state"].items():
        param = params[int(index)]
        sharded[index] = {
            key: distribute_tensor(
                value.to(param.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None
            )
            if isinstance(param, DTensor) and isinstance(value, Tensor) and value.shape == param.shape
            else value
            for key, value in entry.items()
        }
    optimizer.load_state_dict({**state, "state": sharded})


def gathered_network(module: nn.Module, config: UViTConfig, keep: bool = True) -> UViT | None:
    """A plain UViT holding the full weights of a sharded one, on the CPU.

    Every process must call it; those that pass ``keep=False`` get None. The copy is built on the
    meta device and takes the gathered tensors as they are, so no random initialisation is spent
    on it.
    """
    weights = full_state_dict(module, keep)
    if not keep:
        return None
    with torch.device("meta"):
        plain = UViT(config)
    plain.load_state_dict(weights, strict=True, assign=True)
    return plain
