"""Reading and writing whole models: our format, the release files, and the diffusers layout.

Our format (written by ``save_pipeline``, read by ``load_pipeline``), one directory::

    unidiffuser.json           format version, the network config, the component configs, data_type
    network.safetensors        the U-ViT, our names
    autoencoder.safetensors    diffusers AutoencoderKL names
    image_encoder/             transformers CLIPVisionModelWithProjection (config.json + safetensors)
    text_encoder/              transformers CLIPTextModel + its tokenizer
    caption_decoder.safetensors  encode/decode prefix + GPT-2 (the tied lm_head stored once)
    caption_tokenizer/         the GPT-2 tokenizer with '<|EOS|>'

The release files (thu-ml/unidiffuser), in one directory: ``uvit_v1.pth`` or ``uvit_v0.pth``,
``autoencoder_kl.pth``, ``caption_decoder.pth``, and three standard folders downloaded beforehand:
``clip-vit-base-patch32/`` (openai/clip-vit-base-patch32), ``clip-vit-large-patch14/``
(openai/clip-vit-large-patch14) and ``gpt2/`` (the GPT-2 tokenizer files). The released
architectures are assumed; a ``release_config.json`` beside the files may describe others
({"uvit": released keyword arguments, "autoencoder": ..., "caption_decoder": ...}), which is how
tests and fine-tuning build small checkpoints in the released format.

The diffusers layout (the Hub repository thu-ml/unidiffuser-v1): folders ``unet``, ``vae``,
``text_encoder``, ``clip_tokenizer``, ``image_encoder``, ``text_decoder``, ``text_tokenizer``, read
directly. Nothing is ever downloaded, and pickles are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .network import PRESETS, UViT, UViTConfig
from .official import (
    config_from_diffusers,
    config_from_official,
    from_diffusers_keys,
    load_official_state_dict,
    load_state_dict_strict,
)

FORMAT = "unidiffuser"
VERSION = 1
RELEASE_HINT = (
    "the release files are at https://huggingface.co/thu-ml/unidiffuser-v1 (uvit_v1.pth, "
    "autoencoder_kl.pth, caption_decoder.pth); the CLIP models are openai/clip-vit-base-patch32 and "
    "openai/clip-vit-large-patch14, the tokenizer gpt2 — download them beforehand"
)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"missing {what}: {path} ({RELEASE_HINT})")
    return path


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch pickle (weights only; never arbitrary code)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated or not a weights file
        raise ValueError(f"cannot read weights from {path}: {type(err).__name__}: {err}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def detect_layout(path: str | Path) -> str:
    """'ours', 'release' or 'diffusers', from the files a directory holds."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path} ({RELEASE_HINT})")
    if (path / "unidiffuser.json").exists():
        return "ours"
    if (path / "uvit_v1.pth").exists() or (path / "uvit_v0.pth").exists():
        return "release"
    if (path / "unet").is_dir() and (path / "text_decoder").is_dir():
        return "diffusers"
    raise ValueError(
        f"{path} holds none of the known layouts: unidiffuser.json (ours), uvit_v1.pth/uvit_v0.pth "
        f"(the release files) or unet/ + text_decoder/ (diffusers); found {sorted(p.name for p in path.iterdir())[:12]}"
    )


def load_pipeline(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
):
    """Load a model directory in any supported layout as a ``UniDiffuser`` pipeline."""
    layout = detect_layout(path)
    loader = {"ours": _load_ours, "release": _load_release, "diffusers": _load_diffusers}[layout]
    pipe = loader(Path(path))
    return pipe.to(device=torch.device(device), dtype=dtype)


# -- our format ---------------------------------------------------------------------------------


def _load_ours(path: Path):
    from .components.autoencoder import ImageAutoencoder
    from .components.caption import CaptionDecoder, CaptionDecoderConfig
    from .components.clip import ClipImageEmbedder, ClipTextEncoder
    from .pipeline import UniDiffuser

    meta = json.loads((path / "unidiffuser.json").read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{path / 'unidiffuser.json'}: format {meta.get('format')!r} version {meta.get('version')!r}, expected {FORMAT!r} {VERSION}"
        )
    network = UViT(UViTConfig.from_dict(meta["network"]))
    load_state_dict_strict(
        network, read_weights(_require(path / "network.safetensors", "network weights")), "unidiffuser"
    )
    autoencoder = ImageAutoencoder.load(_require(path / "autoencoder.safetensors", "autoencoder weights"))
    image_encoder = ClipImageEmbedder.from_pretrained_dir(_require(path / "image_encoder", "image encoder"))
    text_encoder = ClipTextEncoder.from_pretrained_dir(_require(path / "text_encoder", "text encoder"))
    tokenizer = load_tokenizer(_require(path / "caption_tokenizer", "caption tokenizer"))
    decoder = CaptionDecoder.from_state_dict(
        read_weights(_require(path / "caption_decoder.safetensors", "caption decoder weights")),
        CaptionDecoderConfig.from_dict(meta["caption_decoder"]),
        tokenizer,
    ).frozen()
    return UniDiffuser(
        network, autoencoder, image_encoder, text_encoder, decoder, data_type=int(meta.get("data_type", 1))
    )


def save_pipeline(pipe, path: str | Path) -> None:
    """Write a pipeline in our format; the directory appears complete or not at all."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; choose a new directory (nothing is overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in pipe.network.state_dict().items()}
        save_file(cpu, str(tmp / "network.safetensors"))
        pipe.autoencoder.save(tmp / "autoencoder.safetensors")
        pipe.image_encoder.save_pretrained(tmp / "image_encoder")
        pipe.text_encoder.save_pretrained(tmp / "text_encoder")
        dec = pipe.caption_decoder
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in dec.state_dict_for_saving().items()},
            str(tmp / "caption_decoder.safetensors"),
        )
        dec.tokenizer.save_pretrained(str(tmp / "caption_tokenizer"))
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "network": pipe.network.config.to_dict(),
            "autoencoder": pipe.autoencoder.config.to_dict(),
            "caption_decoder": dec.config.to_dict(),
            "data_type": pipe.data_type,
        }
        (tmp / "unidiffuser.json").write_text(json.dumps(meta, indent=2, default=_jsonable) + "\n")
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in unidiffuser.json")


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the tokenizer in {path}: {err}") from None


# -- the release files --------------------------------------------------------------------------


def _load_release(path: Path):
    from .components.autoencoder import SD_KL_F8, ImageAutoencoder
    from .components.caption import CaptionDecoder, CaptionDecoderConfig
    from .components.caption import preset as caption_preset
    from .components.clip import ClipImageEmbedder, ClipTextEncoder
    from .pipeline import UniDiffuser

    version = "v1" if (path / "uvit_v1.pth").exists() else "v0"
    custom = {}
    if (path / "release_config.json").exists():
        custom = json.loads((path / "release_config.json").read_text())
    config = config_from_official(custom["uvit"]) if "uvit" in custom else PRESETS[f"unidiffuser-{version}"]
    network = UViT(config)
    load_official_state_dict(network, read_weights(path / f"uvit_{version}.pth"))
    autoencoder = ImageAutoencoder.from_ldm_state_dict(
        read_weights(_require(path / "autoencoder_kl.pth", "autoencoder_kl.pth")),
        custom.get("autoencoder", SD_KL_F8),
    )
    image_encoder = ClipImageEmbedder.from_pretrained_dir(
        _require(path / "clip-vit-base-patch32", "CLIP ViT-B/32 folder")
    )
    text_encoder = ClipTextEncoder.from_pretrained_dir(
        _require(path / "clip-vit-large-patch14", "CLIP ViT-L/14 folder")
    )
    tokenizer = with_eos(load_tokenizer(_require(path / "gpt2", "GPT-2 tokenizer folder")))
    decoder_config = (
        CaptionDecoderConfig.from_dict(custom["caption_decoder"])
        if "caption_decoder" in custom
        else caption_preset("released")
    )
    decoder = CaptionDecoder.from_official_state_dict(
        read_weights(_require(path / "caption_decoder.pth", "caption_decoder.pth")), decoder_config, tokenizer
    )
    return UniDiffuser(network, autoencoder, image_encoder, text_encoder, decoder.frozen(), data_type=1)


def with_eos(tokenizer):
    """GPT-2's tokenizer as released for captions: '<|EOS|>' added as its eos token."""
    from .components.caption import EOS_TOKEN

    if EOS_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})
    return tokenizer


# -- the diffusers layout -----------------------------------------------------------------------


def diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in (
        "diffusion_pytorch_model.safetensors",
        "model.safetensors",
        "diffusion_pytorch_model.bin",
        "pytorch_model.bin",
    ):
        if (folder / name).exists():
            return read_weights(folder / name)
    raise FileNotFoundError(f"no weights file in {folder} ({RELEASE_HINT})")


def _load_diffusers(path: Path):
    from .components.autoencoder import ImageAutoencoder
    from .components.caption import CaptionDecoder, CaptionDecoderConfig
    from .components.clip import ClipImageEmbedder, ClipTextEncoder
    from .pipeline import UniDiffuser

    unet_cfg = json.loads(_require(path / "unet" / "config.json", "unet config").read_text())
    network = UViT(config_from_diffusers(unet_cfg))
    load_state_dict_strict(
        network, from_diffusers_keys(diffusers_weights(path / "unet")), "diffusers UniDiffuserModel"
    )
    vae_cfg = json.loads(_require(path / "vae" / "config.json", "vae config").read_text())
    autoencoder = ImageAutoencoder.from_diffusers_state_dict(diffusers_weights(path / "vae"), vae_cfg)
    image_encoder = ClipImageEmbedder.from_pretrained_dir(_require(path / "image_encoder", "image encoder"))
    text_encoder = ClipTextEncoder.from_pretrained_dir(
        _require(path / "text_encoder", "text encoder"),
        tokenizer_path=_require(path / "clip_tokenizer", "CLIP tokenizer"),
    )
    dec_cfg = json.loads(_require(path / "text_decoder" / "config.json", "text decoder config").read_text())
    tokenizer = with_eos(load_tokenizer(_require(path / "text_tokenizer", "GPT-2 tokenizer")))
    config = CaptionDecoderConfig(
        prefix_dim=int(dec_cfg["prefix_hidden_dim"]),
        feature_dim=int(dec_cfg["prefix_inner_dim"]),
        gpt2={k: int(dec_cfg[k]) for k in ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions")},
    )
    # diffusers' UniDiffuserTextDecoder names its GPT2LMHeadModel "transformer"; ours is "gpt"
    weights = {
        ("gpt." + k[len("transformer.") :] if k.startswith("transformer.") else k): v
        for k, v in diffusers_weights(path / "text_decoder").items()
    }
    weights.pop("gpt.lm_head.weight", None)  # tied to the token embedding
    weights = {k: v for k, v in weights.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    decoder = CaptionDecoder.from_state_dict(weights, config, tokenizer)
    return UniDiffuser(network, autoencoder, image_encoder, text_encoder, decoder.frozen(), data_type=1)
