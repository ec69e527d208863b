"""Reading and writing whole models: our format, the release files, and the diffusers layout.

Our format (written by ``save_pipeline``, read by ``load_pipeline``), one directory::

    unidiffuser.json           format version, the network config, the component configs, data_type,
                               sampling defaults ({"guidance_scale": s, "grid": g}; 7 and
                               "time", the released sampler's, where absent)
    network.safetensors        the U-ViT, our names
    autoencoder.safetensors    diffusers AutoencoderKL names
    image_encoder/             transformers CLIPVisionModelWithProjection (config.json + safetensors)
    text_encoder/              transformers CLIPTextModel + its tokenizer
    caption_decoder.safetensors  encode/decode prefix + GPT-2 (the tied lm_head stored once)
    caption_tokenizer/         the GPT-2 tokenizer with '<|EOS|>'
    scorer/                    optional: a whole transformers CLIPModel + its tokenizer, which ranks
                               the candidates of ``best_of`` sampling (components/scorer.py)

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

``load_pipeline`` reads a whole model. ``load_components`` reads only the components it is asked
for and the network's config, never the U-ViT's weights: feature extraction and training's sample
grids use a directory's frozen encoders and decoder, not its network, which is the largest file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .network import PRESETS, UViT, UViTConfig
from .official import (
    config_from_diffusers,
    config_from_official,
    from_diffusers_keys,
    load_official_state_dict,
    load_state_dict_strict,
)
from .pipeline import DEFAULT_GUIDANCE_SCALE, check_guidance_scale
from .solvers import check_grid

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
    if path.is_file():
        raise FileNotFoundError(
            f"{path} is a file, not a model directory: give a folder that holds unidiffuser.json, the "
            "release files or the diffusers layout"
        )
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


COMPONENTS = ("autoencoder", "image_encoder", "text_encoder", "caption_decoder")


@dataclass
class Components:
    """Frozen components of a model directory without its network, whose weights stay unread.

    Attributes:
        network_config: the architecture of the directory's network, from its config files.
        data_type: the directory's data_type label for sampling.
        guidance_scale: the directory's default guidance scale for sampling.
        grid: the directory's solver time grid for sampling ("time" or "logsnr").
        autoencoder, image_encoder, text_encoder, caption_decoder: the components asked for;
            None for the others.
    """

    network_config: UViTConfig
    data_type: int = 1
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    grid: str = "time"
    autoencoder: Any = None
    image_encoder: Any = None
    text_encoder: Any = None
    caption_decoder: Any = None

    def loaded(self) -> list[nn.Module]:
        return [part for part in (getattr(self, name) for name in COMPONENTS) if part is not None]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Components:
        for part in self.loaded():
            part.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.loaded()[0].parameters()).device


def load_pipeline(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    scorer: str | Path | None = None,
):
    """Load a model directory in any supported layout as a ``UniDiffuser`` pipeline.

    ``scorer``: a whole CLIP checkpoint's directory for ``best_of`` sampling; None: the model
    directory's own ``scorer/`` where it has one (only our format does).
    """
    from .components.scorer import ClipScorer
    from .pipeline import UniDiffuser, check_placement

    device, dtype = check_placement(device, dtype)  # before any file is read
    directory = model_directory(path)
    network = directory.load("network")
    parts = [directory.load(name) for name in COMPONENTS]
    judge = ClipScorer.from_pretrained_dir(scorer) if scorer is not None else directory.scorer()
    pipe = UniDiffuser(
        network,
        *parts,
        data_type=directory.data_type,
        guidance_scale=directory.guidance_scale,
        grid=directory.grid,
        scorer=judge,
    )
    return pipe.to(device=device, dtype=dtype)


def load_components(
    path: str | Path,
    names: Sequence[str] = COMPONENTS,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Components:
    """Only the named components of a model directory (any layout); its U-ViT weights are not read.

    Args:
        path: a model directory: ours, the release files or the diffusers layout.
        names: any of ``COMPONENTS``.
        device, dtype: where the components go.
    """
    from .pipeline import check_placement

    unknown = [name for name in names if name not in COMPONENTS]
    if unknown or not names:
        raise ValueError(f"components {list(names)}: choose one or more of {list(COMPONENTS)}")
    device, dtype = check_placement(device, dtype)
    directory = model_directory(path)
    loaded = {name: directory.load(name) for name in names}
    components = Components(
        directory.load("network_config"),
        directory.data_type,
        directory.guidance_scale,
        directory.grid,
        **loaded,
    )
    return components.to(device=device, dtype=dtype)


def model_directory(path: str | Path) -> ModelDirectory:
    """The reader of a model directory's layout (nothing but its small config files read yet)."""
    layout = detect_layout(path)
    return {"ours": OursDirectory, "release": ReleaseDirectory, "diffusers": DiffusersDirectory}[layout](
        Path(path)
    )


class ModelDirectory:
    """Where one layout keeps each part; every method reads the files of its own part only."""

    data_type = 1  # the released model samples curated data (v1's label 1)
    guidance_scale = DEFAULT_GUIDANCE_SCALE  # the sampling calls' default
    grid = "time"  # the solvers' time grid, as released

    def __init__(self, path: Path):
        self.path = path

    def load(self, part: str):
        """One part (a method's name: "network", "autoencoder", ...), with any failure to read its
        files (damaged, or written by something else) said in one line that names the folder."""
        try:
            return getattr(self, part)()
        except (FileNotFoundError, ValueError):
            raise  # their messages already name the file and the fix
        except Exception as err:
            what = part.replace("_", " ")
            raise ValueError(
                f"{self.path}: cannot read its {what} ({type(err).__name__}: {err}); its files are damaged "
                "or not written by this package: convert or copy the model again"
            ) from err

    def network_config(self) -> UViTConfig:
        raise NotImplementedError

    def network(self) -> UViT:
        raise NotImplementedError

    def autoencoder(self):
        raise NotImplementedError

    def image_encoder(self):
        raise NotImplementedError

    def text_encoder(self):
        raise NotImplementedError

    def caption_decoder(self):
        raise NotImplementedError

    def scorer(self):
        """The directory's own CLIP scorer, or None (the release files and diffusers have none)."""
        return None


# -- our format ---------------------------------------------------------------------------------


class OursDirectory(ModelDirectory):
    def __init__(self, path: Path):
        super().__init__(path)
        where = path / "unidiffuser.json"
        try:
            self.meta = json.loads(where.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{where}: not JSON ({err}); the model folder is damaged") from None
        if not isinstance(self.meta, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(self.meta).__name__}")
        missing = [key for key in ("network", "caption_decoder") if not isinstance(self.meta.get(key), dict)]
        if missing:
            raise ValueError(
                f"{where}: no {' or '.join(repr(k) for k in missing)} object; the model folder is damaged"
            )
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise ValueError(
                f"{path / 'unidiffuser.json'}: format {self.meta.get('format')!r} version "
                f"{self.meta.get('version')!r}, expected {FORMAT!r} {VERSION}"
            )
        self.data_type = self.meta.get("data_type", 1)
        if self.data_type not in (0, 1) or isinstance(self.data_type, bool):
            raise ValueError(f"{where}: data_type {self.data_type!r}: expected 0 (web) or 1 (curated)")
        sampling = self.meta.get("sampling", {})
        if not isinstance(sampling, dict):
            raise ValueError(f"{path / 'unidiffuser.json'}: 'sampling' must be an object, got {sampling!r}")
        self.guidance_scale = check_guidance_scale(
            sampling.get("guidance_scale", DEFAULT_GUIDANCE_SCALE),
            f"{path / 'unidiffuser.json'}: sampling.guidance_scale",
        )
        self.grid = check_grid(sampling.get("grid", "time"), f"{path / 'unidiffuser.json'}: sampling.grid")

    def network_config(self) -> UViTConfig:
        try:
            return UViTConfig.from_dict(self.meta["network"])
        except ValueError as err:
            raise ValueError(f"{self.path / 'unidiffuser.json'}: network: {err}") from None

    def network(self) -> UViT:
        network = UViT(self.network_config())
        weights = read_weights(_require(self.path / "network.safetensors", "network weights"))
        load_state_dict_strict(network, weights, "unidiffuser")
        return network

    def autoencoder(self):
        from .components.autoencoder import ImageAutoencoder

        return ImageAutoencoder.load(_require(self.path / "autoencoder.safetensors", "autoencoder weights"))

    def image_encoder(self):
        from .components.clip import ClipImageEmbedder

        return ClipImageEmbedder.from_pretrained_dir(_require(self.path / "image_encoder", "image encoder"))

    def text_encoder(self):
        from .components.clip import ClipTextEncoder

        return ClipTextEncoder.from_pretrained_dir(_require(self.path / "text_encoder", "text encoder"))

    def caption_decoder(self):
        from .components.caption import CaptionDecoder, CaptionDecoderConfig

        tokenizer = load_tokenizer(_require(self.path / "caption_tokenizer", "caption tokenizer"))
        weights = read_weights(_require(self.path / "caption_decoder.safetensors", "caption decoder weights"))
        config = CaptionDecoderConfig.from_dict(self.meta["caption_decoder"])
        return CaptionDecoder.from_state_dict(weights, config, tokenizer).frozen()

    def scorer(self):
        from .components.scorer import ClipScorer

        folder = self.path / "scorer"
        return ClipScorer.from_pretrained_dir(folder) if folder.exists() else None


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
        if getattr(pipe, "scorer", None) is not None:
            pipe.scorer.save_pretrained(tmp / "scorer")
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "network": pipe.network.config.to_dict(),
            "autoencoder": pipe.autoencoder.config.to_dict(),
            "caption_decoder": dec.config.to_dict(),
            "data_type": pipe.data_type,
            "sampling": {"guidance_scale": pipe.guidance_scale, "grid": pipe.grid},
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


class ReleaseDirectory(ModelDirectory):
    def __init__(self, path: Path):
        super().__init__(path)
        self.version = "v1" if (path / "uvit_v1.pth").exists() else "v0"
        self.custom = {}
        if (path / "release_config.json").exists():
            self.custom = json.loads((path / "release_config.json").read_text())

    def network_config(self) -> UViTConfig:
        if "uvit" in self.custom:
            return config_from_official(self.custom["uvit"])
        return PRESETS[f"unidiffuser-{self.version}"]

    def network(self) -> UViT:
        network = UViT(self.network_config())
        load_official_state_dict(network, read_weights(self.path / f"uvit_{self.version}.pth"))
        return network

    def autoencoder(self):
        from .components.autoencoder import SD_KL_F8, ImageAutoencoder

        weights = read_weights(_require(self.path / "autoencoder_kl.pth", "autoencoder_kl.pth"))
        return ImageAutoencoder.from_ldm_state_dict(weights, self.custom.get("autoencoder", SD_KL_F8))

    def image_encoder(self):
        from .components.clip import ClipImageEmbedder

        folder = _require(self.path / "clip-vit-base-patch32", "CLIP ViT-B/32 folder")
        return ClipImageEmbedder.from_pretrained_dir(folder)

    def text_encoder(self):
        from .components.clip import ClipTextEncoder

        folder = _require(self.path / "clip-vit-large-patch14", "CLIP ViT-L/14 folder")
        return ClipTextEncoder.from_pretrained_dir(folder)

    def caption_decoder(self):
        from .components.caption import CaptionDecoder, CaptionDecoderConfig
        from .components.caption import preset as caption_preset

        tokenizer = with_eos(load_tokenizer(_require(self.path / "gpt2", "GPT-2 tokenizer folder")))
        config = (
            CaptionDecoderConfig.from_dict(self.custom["caption_decoder"])
            if "caption_decoder" in self.custom
            else caption_preset("released")
        )
        weights = read_weights(_require(self.path / "caption_decoder.pth", "caption_decoder.pth"))
        return CaptionDecoder.from_official_state_dict(weights, config, tokenizer).frozen()


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


class DiffusersDirectory(ModelDirectory):
    def _config(self, folder: str, what: str) -> dict:
        return json.loads(_require(self.path / folder / "config.json", what).read_text())

    def network_config(self) -> UViTConfig:
        return config_from_diffusers(self._config("unet", "unet config"))

    def network(self) -> UViT:
        network = UViT(self.network_config())
        weights = from_diffusers_keys(diffusers_weights(self.path / "unet"))
        load_state_dict_strict(network, weights, "diffusers UniDiffuserModel")
        return network

    def autoencoder(self):
        from .components.autoencoder import ImageAutoencoder

        config = self._config("vae", "vae config")
        return ImageAutoencoder.from_diffusers_state_dict(diffusers_weights(self.path / "vae"), config)

    def image_encoder(self):
        from .components.clip import ClipImageEmbedder

        return ClipImageEmbedder.from_pretrained_dir(_require(self.path / "image_encoder", "image encoder"))

    def text_encoder(self):
        from .components.clip import ClipTextEncoder

        return ClipTextEncoder.from_pretrained_dir(
            _require(self.path / "text_encoder", "text encoder"),
            tokenizer_path=_require(self.path / "clip_tokenizer", "CLIP tokenizer"),
        )

    def caption_decoder(self):
        from .components.caption import CaptionDecoder, CaptionDecoderConfig

        dec_cfg = self._config("text_decoder", "text decoder config")
        tokenizer = with_eos(load_tokenizer(_require(self.path / "text_tokenizer", "GPT-2 tokenizer")))
        config = CaptionDecoderConfig(
            prefix_dim=int(dec_cfg["prefix_hidden_dim"]),
            feature_dim=int(dec_cfg["prefix_inner_dim"]),
            gpt2={k: int(dec_cfg[k]) for k in ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions")},
        )
        # diffusers' UniDiffuserTextDecoder names its GPT2LMHeadModel "transformer"; ours is "gpt"
        weights = {
            ("gpt." + k[len("transformer.") :] if k.startswith("transformer.") else k): v
            for k, v in diffusers_weights(self.path / "text_decoder").items()
        }
        weights.pop("gpt.lm_head.weight", None)  # tied to the token embedding
        weights = {k: v for k, v in weights.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        return CaptionDecoder.from_state_dict(weights, config, tokenizer).frozen()
