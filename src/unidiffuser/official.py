"""The released UniDiffuser state-dict names, mapped once onto ours.

The released network (thu-ml/unidiffuser, ``uvit_multi_post_ln``/``_v1``) names its modules after
the image-text layout; ours are keyed by modality. Only the prefixes below differ; the blocks and
final norm share their names.
"""

from __future__ import annotations

from collections.abc import Mapping

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
    renamed = from_official_keys(state_dict)
    own = model.state_dict()
    missing = sorted(set(own) - set(renamed))
    unexpected = sorted(set(renamed) - set(own))
    if missing or unexpected:
        raise ValueError(
            "state dict does not match the released UniDiffuser layout for this config: "
            f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} "
            "(in released names: "
            + ", ".join(_rename(k, {v: k2 for k2, v in KEY_MAP.items()}) for k in missing[:3])
            + ")"
        )
    wrong = [
        f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in renamed.items()
        if v.shape != own[k].shape
    ]
    if wrong:
        raise ValueError(f"shape mismatch between released weights and this config: {wrong[:5]}")
    model.load_state_dict(renamed, strict=True)


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


__all__ = [
    "KEY_MAP",
    "config_from_official",
    "from_official_keys",
    "load_official_state_dict",
    "to_official_keys",
]
