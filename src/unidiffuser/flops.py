"""Analytic FLOP count of one UViT forward pass.

Counts 2 FLOPs per multiply-add of every matrix product in ``UViT.forward``:

* token embeds: the image patch-embedding convolution, the vector and sequence ``nn.Linear`` embeds
  (label embeds are table lookups and cost nothing);
* per block (``depth // 2`` in-blocks, one mid-block, ``depth // 2`` out-blocks): the attention's
  qkv and output projections, the MLP's fc1 and fc2, the out-blocks' ``skip_linear`` (2 * width ->
  width), and attention's two batched products QK^T and AV, 2 * 2 * N^2 * width per sample;
* the output heads, applied to the diffused tokens only (time and label tokens are dropped first).

N is the full token count: time tokens, label tokens and the tokens of every modality, with image
token counts taken from ``sizes`` when an image is run at another latent size than it was trained
at. Bias additions, LayerNorm, softmax, GELU, residual sums, the sinusoidal time embedding and the
position-embedding resize are not counted. This is the convention of
``torch.utils.flop_counter.FlopCounterMode``, which it matches exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

from .network import UViTConfig

__all__ = ["forward_flops", "num_tokens"]


def _image_grid(
    config: UViTConfig, sizes: Mapping[str, tuple[int, int]] | None
) -> dict[str, tuple[int, int]]:
    """Patch grid (h, w) of every image modality, at the size in ``sizes`` or the trained one."""
    sizes = dict(sizes or {})
    images = {m.name: m for m in config.modalities if m.kind == "image"}
    unknown = sorted(set(sizes) - set(images))
    if unknown:
        raise ValueError(f"sizes names {unknown}, which are not image modalities; images: {sorted(images)}")
    grids = {}
    for name, m in images.items():
        height, width = sizes.get(name, m.shape[1:])
        if height < 1 or width < 1 or height % m.patch_size or width % m.patch_size:
            raise ValueError(
                f"sizes[{name!r}] = {(height, width)}: needs positive multiples of patch_size={m.patch_size}"
            )
        grids[name] = (height // m.patch_size, width // m.patch_size)
    return grids


def num_tokens(config: UViTConfig, sizes: Mapping[str, tuple[int, int]] | None = None) -> int:
    """Total token count N of one sample: time tokens, label tokens and modality tokens.

    Args:
        config: the network architecture.
        sizes: optional latent (height, width) per image modality name; images not named run at
            their trained size.

    Returns:
        N; equal to ``config.num_tokens`` when every image runs at its trained size.
    """
    grids = _image_grid(config, sizes)
    n = len(config.groups)
    for m in config.modalities:
        n += grids[m.name][0] * grids[m.name][1] if m.kind == "image" else m.num_tokens
    return n


def forward_flops(
    config: UViTConfig, batch: int = 1, sizes: Mapping[str, tuple[int, int]] | None = None
) -> int:
    """FLOPs (2 per multiply-add) of one ``UViT`` forward pass.

    Counts the patch-embed convolution, the Linear token embeds, every block's qkv, attention
    projection, MLP fc1/fc2 and (out-blocks) skip_linear, the attention products QK^T and AV, and the
    output heads. Bias additions, normalisations, activations, softmax and elementwise work are not
    counted (see the module docstring).

    Args:
        config: the network architecture.
        batch: batch size; the count is linear in it.
        sizes: optional latent (height, width) per image modality name, for images run at a size
            other than the trained one; images not named run at their trained size.

    Returns:
        The FLOP count as an int.

    Raises:
        ValueError: if batch is negative or ``sizes`` names a non-image or a size that is not a
            multiple of the patch size.
    """
    if batch < 0:
        raise ValueError(f"batch={batch} must be >= 0")
    grids = _image_grid(config, sizes)
    d = config.width
    hidden = int(d * config.mlp_ratio)
    n = num_tokens(config, sizes)

    # Embeds and heads (per sample).
    io = 0
    for m in config.modalities:
        if m.kind == "label":
            continue  # embedding lookup; no head
        if m.kind == "image":
            h, w = grids[m.name]
            patch = m.shape[0] * m.patch_size**2  # C * p * p inputs per patch, outputs per token
            io += 2 * h * w * patch * d  # patch-embed conv
            io += 2 * h * w * d * patch  # head
        else:
            dim = m.shape[-1]
            io += 2 * 2 * m.num_tokens * dim * d  # embed Linear and head Linear

    # One transformer block (per sample).
    linear = 2 * n * d * (3 * d + d + 2 * hidden)  # qkv, proj, fc1, fc2
    attention = 2 * 2 * n * n * d  # QK^T and AV over all heads
    block = linear + attention
    skip = 2 * n * (2 * d) * d  # out-blocks' skip_linear

    half = config.depth // 2
    per_sample = io + (config.depth + 1) * block + half * skip
    return batch * per_sample
