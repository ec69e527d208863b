"""forward_flops against torch's FlopCounterMode on a real UViT forward."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from unidiffuser.flops import forward_flops, num_tokens
from unidiffuser.network import PRESETS, UViT, UViTConfig


def random_inputs(
    config: UViTConfig, batch: int, sizes: dict[str, tuple[int, int]] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    sizes = sizes or {}
    inputs = {}
    for m in config.modalities:
        if m.kind == "image":
            h, w = sizes.get(m.name, m.shape[1:])
            inputs[m.name] = torch.randn(batch, m.shape[0], h, w)
        elif m.kind == "label":
            inputs[m.name] = torch.randint(0, m.num_classes, (batch,))
        else:
            inputs[m.name] = torch.randn(batch, *m.shape)
    timesteps = {g: torch.rand(batch) * 1000 for g in config.groups}
    return inputs, timesteps


def counted_flops(config: UViTConfig, batch: int, sizes: dict[str, tuple[int, int]] | None = None) -> int:
    torch.manual_seed(0)
    model = UViT(config).eval()
    inputs, timesteps = random_inputs(config, batch, sizes)
    # FlopCounterMode has no formula for the CPU fused attention kernel
    # (aten._scaled_dot_product_flash_attention_for_cpu) and would count attention as 0 FLOPs; the
    # math backend runs QK^T and AV as two aten.bmm, which it counts at 2 FLOPs per multiply-add.
    # It counts aten.mm/addmm/bmm/convolution only (bias adds, norms, softmax, GELU and the time
    # embedding's elementwise products are not counted), as forward_flops does, so the two agree
    # exactly; the 1% tolerance only guards against a future torch counting extra ops.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(inputs, timesteps)
    assert set(out) == {m.name for m in config.diffused}
    return counter.get_total_flops()


@pytest.mark.parametrize(
    ("name", "batch", "sizes"),
    [
        ("tiny", 2, None),
        ("small", 2, None),
        ("tiny", 3, {"img": (12, 16)}),  # trained at 8x8: another patch grid and token count
    ],
)
def test_forward_flops_matches_flop_counter(name: str, batch: int, sizes: dict | None) -> None:
    config = PRESETS[name]
    expected = forward_flops(config, batch=batch, sizes=sizes)
    measured = counted_flops(config, batch, sizes)
    assert measured > 0
    assert abs(expected - measured) <= 0.01 * measured, (expected, measured)


def test_forward_flops_is_linear_in_batch_and_uses_sizes() -> None:
    config = PRESETS["unidiffuser-v1"]
    assert forward_flops(config, batch=8) == 8 * forward_flops(config, batch=1)
    assert forward_flops(config, batch=0) == 0
    assert num_tokens(config) == config.num_tokens == 1105
    assert num_tokens(config, {"img": (64, 64)}) == config.num_tokens
    assert num_tokens(config, {"img": (96, 64)}) == config.num_tokens + 512
    assert forward_flops(config, sizes={"img": (96, 64)}) > forward_flops(config)
    # The released v1 network: about 2.3 TFLOP per sample.
    assert 2.2e12 < forward_flops(config) < 2.4e12


def test_forward_flops_rejects_bad_sizes() -> None:
    config = PRESETS["tiny"]
    with pytest.raises(ValueError, match="not image modalities"):
        forward_flops(config, sizes={"text": (8, 8)})
    with pytest.raises(ValueError, match="multiples of patch_size"):
        forward_flops(config, sizes={"img": (7, 8)})
    with pytest.raises(ValueError, match="batch"):
        forward_flops(config, batch=-1)
