"""The two published layouts of the UniDiffuser network, each mapped once onto our names.

- The released checkpoints (uvit_v0.pth / uvit_v1.pth) name modules after the image-text layout;
  ours are keyed by modality. Only the prefixes in ``KEY_MAP`` differ; blocks share their names.
- The diffusers layout (the ``unet`` folder of the Hub repository thu-ml/unidiffuser-v1) splits
  q, k and v, names the post-LN norms after diffusers' block, and carries one unused copy of the
  patch embedding (``transformer.pos_embed.proj``), which is dropped on load and filled on export.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .network import UViT, UViTConfig, image_text_config

# released prefix -> our prefix
KEY_MAP: dict[str, str] = {
    "patch_embed.proj.": "embed.img.proj.",
    "text_embed.": "embed.text.",
    "clip_img_embed.": "embed.clip_img.",
    "token_embedding.": "embed.data_type.",
    "pos_embed_token": "label_pos.data_type",
    "decoder_pred.": "head.img.",
    "text_out.": "head.text.",
    "clip_img_out.": "head.clip_img.",
}


def _rename(key: str, mapping: Mapping[str, str]) -> str:
    for src, dst in mapping.items():
        if key.startswith(src):
            return dst + key[len(src) :]
    return key


def from_official_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a released state dict to our names (a leading "module." is dropped)."""
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix("module.")
        out[_rename(k, KEY_MAP)] = v
    return out


def to_official_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename our state dict to the released names."""
    inverse = {v: k for k, v in KEY_MAP.items()}
    return {_rename(k, inverse): v for k, v in state_dict.items()}


def load_official_state_dict(model: UViT, state_dict: Mapping[str, Tensor]) -> None:
    """Load released weights strictly; a mismatch lists the missing and unexpected keys."""
    load_state_dict_strict(model, from_official_keys(state_dict), "released UniDiffuser (uvit_v*.pth)")


def config_from_official(cfg: Mapping) -> UViTConfig:
    """Our config from the released network's keyword arguments (img_size is the latent side)."""
    for flag in ("mlp_time_embed", "qkv_bias"):
        if cfg.get(flag):
            raise ValueError(f"{flag}=True is not part of the released UniDiffuser models")
    size = int(cfg["img_size"])
    return image_text_config(
        latent=(int(cfg["in_chans"]), size, size),
        clip_dim=int(cfg["clip_img_dim"]),
        text=(int(cfg["num_text_tokens"]), int(cfg["text_dim"])),
        width=int(cfg["embed_dim"]),
        depth=int(cfg["depth"]),
        num_heads=int(cfg["num_heads"]),
        patch_size=int(cfg["patch_size"]),
        data_type=bool(cfg.get("use_data_type", True)),
    )


# diffusers prefix -> our prefix (blocks are renamed in _diffusers_block_key)
DIFFUSERS_KEY_MAP: dict[str, str] = {
    "vae_img_in.proj.": "embed.img.proj.",
    "text_in.": "embed.text.",
    "clip_img_in.": "embed.clip_img.",
    "data_type_token_embedding.": "embed.data_type.",
    "data_type_pos_embed_token": "label_pos.data_type",
    "vae_img_out.": "head.img.",
    "text_out.": "head.text.",
    "clip_img_out.": "head.clip_img.",
    "transformer.norm_out.": "norm.",
}
# inside a diffusers block -> inside ours (diffusers' norm1 follows attention: our norm2)
_DIFFUSERS_BLOCK_PARTS: dict[str, str] = {
    "attn1.to_out.0.": "attn.proj.",
    "norm1.": "norm2.",
    "norm3.": "norm3.",
    "ff.net.0.proj.": "mlp.fc1.",
    "ff.net.2.": "mlp.fc2.",
    "skip.skip_linear.": "skip_linear.",
    "skip.norm.": "norm1.",
}
_DIFFUSERS_UNUSED = ("transformer.pos_embed.proj.weight", "transformer.pos_embed.proj.bias")


def _diffusers_block_key(key: str) -> str | None:
    """Our name of a diffusers block parameter, or None when the key is not in a block."""
    for src, dst in (
        ("transformer.transformer_in_blocks.", "in_blocks."),
        ("transformer.transformer_out_blocks.", "out_blocks."),
        ("transformer.transformer_mid_block.", "mid_block."),
    ):
        if key.startswith(src):
            rest = key[len(src) :]
            index = ""
            if dst != "mid_block.":
                number, rest = rest.split(".", 1)
                index = number + "."
            rest = rest.removeprefix("block.")
            for part_src, part_dst in _DIFFUSERS_BLOCK_PARTS.items():
                if rest.startswith(part_src):
                    return dst + index + part_dst + rest[len(part_src) :]
            return dst + index + rest  # attn1.to_q/k/v: fused by the caller
    return None


def from_diffusers_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers UniDiffuserModel state dict to ours, fusing q, k and v into qkv."""
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        if key in _DIFFUSERS_UNUSED:
            continue
        ours = _diffusers_block_key(key)
        if ours is None:
            out[_rename(key, DIFFUSERS_KEY_MAP)] = value
        elif ".attn1.to_" in ours:
            prefix, part = ours.split(".attn1.to_")
            qkv.setdefault(prefix, {})[part] = value  # part: "q.weight", "k.weight", ...
        else:
            out[ours] = value
    for prefix, parts in qkv.items():
        for kind in ("weight", "bias"):
            pieces = [parts.get(f"{p}.{kind}") for p in "qkv"]
            if all(p is not None for p in pieces):
                out[f"{prefix}.attn.qkv.{kind}"] = torch.cat(pieces, dim=0)  # rows [q; k; v]
            elif any(p is not None for p in pieces):
                raise ValueError(f"diffusers state dict: {prefix} has only some of to_q/to_k/to_v.{kind}")
    return out


def to_diffusers_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict in diffusers' UniDiffuserModel names (the inverse of from_diffusers_keys)."""
    inverse_prefix = {v: k for k, v in DIFFUSERS_KEY_MAP.items()}
    inverse_part = {v: k for k, v in _DIFFUSERS_BLOCK_PARTS.items()}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        head, _, rest = key.partition(".")
        if head in ("in_blocks", "out_blocks", "mid_block"):
            if head == "mid_block":
                base, inner = "transformer.transformer_mid_block.", rest
            else:
                number, inner = rest.split(".", 1)
                base = f"transformer.transformer_{head}.{number}."
            if inner.startswith("attn.qkv."):
                kind = inner.rsplit(".", 1)[1]
                inside = "block." if head == "out_blocks" else ""
                for name, piece in zip("qkv", value.chunk(3, dim=0), strict=True):
                    out[f"{base}{inside}attn1.to_{name}.{kind}"] = piece
                continue
            for part_src, part_dst in inverse_part.items():
                if inner.startswith(part_src):
                    inner = part_dst + inner[len(part_src) :]
                    break
            if head == "out_blocks" and not inner.startswith("skip."):
                inner = "block." + inner
            out[base + inner] = value
        else:
            out[_rename(key, inverse_prefix)] = value
    out["transformer.pos_embed.proj.weight"] = state_dict["embed.img.proj.weight"]
    out["transformer.pos_embed.proj.bias"] = state_dict["embed.img.proj.bias"]
    return out


def config_from_diffusers(cfg: Mapping) -> UViTConfig:
    """Our config from a diffusers UniDiffuserModel config.json (the Hub's unet/config.json)."""
    if cfg.get("block_type", "unidiffuser") != "unidiffuser" or cfg.get("pre_layer_norm", False):
        raise ValueError(
            f"unet config: block_type={cfg.get('block_type')!r}, pre_layer_norm={cfg.get('pre_layer_norm')}; "
            "only the released post-LN UniDiffuser blocks are supported"
        )
    size = int(cfg["sample_size"])
    return image_text_config(
        latent=(int(cfg["in_channels"]), size, size),
        clip_dim=int(cfg["clip_img_dim"]),
        text=(int(cfg["num_text_tokens"]), int(cfg["text_dim"])),
        width=int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"]),
        depth=2 * (int(cfg["num_layers"]) // 2),
        num_heads=int(cfg["num_attention_heads"]),
        patch_size=int(cfg["patch_size"]),
        data_type=bool(cfg.get("use_data_type_embedding", False)),
    )


def load_state_dict_strict(model: UViT, renamed: Mapping[str, Tensor], layout: str) -> None:
    """Load a renamed state dict strictly; a mismatch names the keys and the expected layout."""
    own = model.state_dict()
    missing = sorted(set(own) - set(renamed))
    unexpected = sorted(set(renamed) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match the {layout} layout for this config: "
            f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
        )
    wrong = [
        f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in renamed.items()
        if v.shape != own[k].shape
    ]
    if wrong:
        raise ValueError(f"shape mismatch between the {layout} weights and this config: {wrong[:5]}")
    model.load_state_dict(dict(renamed), strict=True)


__all__ = [
    "DIFFUSERS_KEY_MAP",
    "KEY_MAP",
    "config_from_diffusers",
    "config_from_official",
    "from_diffusers_keys",
    "from_official_keys",
    "load_official_state_dict",
    "load_state_dict_strict",
    "to_diffusers_keys",
    "to_official_keys",
]
