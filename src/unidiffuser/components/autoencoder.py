"""The image autoencoder: Stable Diffusion's KL-f8 VAE, frozen, as the released model uses it.

Pixels in [-1, 1] -> encoder -> quant_conv -> moments (mean, logvar) -> a SAMPLE of the posterior
times 0.18215 -> the latent the network diffuses; back: latent / 0.18215 -> post_quant_conv ->
decoder -> pixels, clamped to [-1, 1]. The module is diffusers' ``AutoencoderKL``.

Weights come in two layouts. diffusers names (``encoder.down_blocks.0.resnets.0.norm1``) load
directly; the released ``autoencoder_kl.pth`` uses latent-diffusion (LDM) names
(``encoder.down.0.block.0.norm1``, ``encoder.mid.attn_1.q``, ``decoder.up.3...``), mapped by
``ldm_to_diffusers_vae``. Both load strictly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

from ..fast import RECOMPILE_LIMIT
from ..official import load_state_dict_strict

LOGVAR_RANGE = (-30.0, 20.0)  # the clamp of LDM's (and diffusers') DiagonalGaussianDistribution


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture of a KL autoencoder (diffusers' AutoencoderKL with plain encoder/decoder blocks).

    Args:
        block_out_channels: channels of each resolution level; len - 1 halvings of the size.
        layers_per_block: resnets per encoder level (the decoder has one more).
        latent_channels: channels of the latent.
        norm_num_groups: GroupNorm groups; every entry of block_out_channels must divide by it.
        sample_size: nominal image side (diffusers uses it only to tile large images).
        scale_factor: latent = scale_factor * posterior sample.
        in_channels: image channels.
    """

    block_out_channels: tuple[int, ...]
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scale_factor: float = 0.18215
    in_channels: int = 3

    def __post_init__(self) -> None:
        if not self.block_out_channels or any(c < 1 for c in self.block_out_channels):
            raise ValueError(
                f"block_out_channels={self.block_out_channels}: expected positive channel counts"
            )
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"block_out_channels={self.block_out_channels}: {bad} not divisible by "
                f"norm_num_groups={self.norm_num_groups}; pick a group count that divides every entry"
            )
        if self.layers_per_block < 1 or self.latent_channels < 1:
            raise ValueError(
                f"layers_per_block={self.layers_per_block} and latent_channels={self.latent_channels} "
                "must be >= 1"
            )
        if self.scale_factor <= 0:
            raise ValueError(f"scale_factor={self.scale_factor} must be positive")

    @property
    def downsample(self) -> int:
        """Pixels per latent position along each side (8 for KL-f8)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def diffusers_config(self) -> dict:
        """The keyword arguments of diffusers' AutoencoderKL (the ``config.json`` of a vae folder)."""
        n = len(self.block_out_channels)
        return {
            "in_channels": self.in_channels,
            "out_channels": self.in_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": self.sample_size,
            "scaling_factor": self.scale_factor,
        }

    @classmethod
    def from_diffusers_config(cls, config: Mapping) -> AutoencoderConfig:
        """Read a diffusers AutoencoderKL config (``config.json`` of a vae folder, or ``vae.config``).

        Missing entries take AutoencoderKL's own defaults; options this wrapper does not implement
        (other block types or activations, no quant convs, a shift factor) raise a ValueError.
        """
        for key, allowed in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ):
            if any(t != allowed for t in config.get(key, [allowed])):
                raise ValueError(f"config[{key!r}]={config[key]}: only {allowed} blocks are supported")
        unsupported = {
            "act_fn": "silu",
            "use_quant_conv": True,
            "use_post_quant_conv": True,
            "mid_block_add_attention": True,
            "shift_factor": None,
            "latents_mean": None,
            "latents_std": None,
        }
        for key, expected in unsupported.items():
            if config.get(key, expected) != expected:
                raise ValueError(f"config[{key!r}]={config[key]!r}: only {expected!r} is supported")
        in_channels = int(config.get("in_channels", 3))
        if int(config.get("out_channels", in_channels)) != in_channels:
            raise ValueError(
                f"config: in_channels={in_channels} but out_channels={config['out_channels']}; they must match"
            )
        return cls(
            block_out_channels=tuple(config.get("block_out_channels", (64,))),
            layers_per_block=int(config.get("layers_per_block", 1)),
            latent_channels=int(config.get("latent_channels", 4)),
            norm_num_groups=int(config.get("norm_num_groups", 32)),
            sample_size=int(config.get("sample_size", 32)),
            scale_factor=float(config.get("scaling_factor", 0.18215)),
            in_channels=in_channels,
        )

    @classmethod
    def coerce(cls, config: AutoencoderConfig | Mapping) -> AutoencoderConfig:
        """An AutoencoderConfig, ``to_dict()`` output, or a diffusers AutoencoderKL config dict."""
        if isinstance(config, cls):
            return config
        if isinstance(config, Mapping):
            if "scale_factor" in config:  # ours
                return cls.from_dict(config)
            return cls.from_diffusers_config(config)
        raise ValueError(
            f"config: expected an AutoencoderConfig or a config dict, got {type(config).__name__}"
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> AutoencoderConfig:
        return cls(**{**d, "block_out_channels": tuple(d["block_out_channels"])})


# ---------------------------------------------------------------------------------------------
# The LDM key map


_RESNET_PARTS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_ATTENTION_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LINEAR_ATTENTION_PARTS = ("q", "k", "v", "proj_out")  # 1x1 convs in LDM, Linear layers in diffusers
_RES = "(" + "|".join(_RESNET_PARTS) + ")"
_ATT = "(" + "|".join(_ATTENTION_PARTS) + ")"
_WB = r"(weight|bias)"

# (LDM pattern, diffusers name from the match and the number of decoder up-blocks)
_LDM_RULES: list[tuple[re.Pattern, Callable[[re.Match, int], str]]] = [
    (re.compile(rf"(quant_conv|post_quant_conv)\.{_WB}"), lambda m, n: f"{m[1]}.{m[2]}"),
    (re.compile(rf"(encoder|decoder)\.(conv_in|conv_out)\.{_WB}"), lambda m, n: f"{m[1]}.{m[2]}.{m[3]}"),
    (re.compile(rf"(encoder|decoder)\.norm_out\.{_WB}"), lambda m, n: f"{m[1]}.conv_norm_out.{m[2]}"),
    (
        re.compile(rf"encoder\.down\.(\d+)\.block\.(\d+)\.{_RES}\.{_WB}"),
        lambda m, n: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_RESNET_PARTS[m[3]]}.{m[4]}",
    ),
    (
        re.compile(rf"encoder\.down\.(\d+)\.downsample\.conv\.{_WB}"),
        lambda m, n: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}",
    ),
    # LDM numbers decoder levels by resolution (up.0 is the full-size one, run last); diffusers
    # numbers them in the order they run.
    (
        re.compile(rf"decoder\.up\.(\d+)\.block\.(\d+)\.{_RES}\.{_WB}"),
        lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets.{m[2]}.{_RESNET_PARTS[m[3]]}.{m[4]}",
    ),
    (
        re.compile(rf"decoder\.up\.(\d+)\.upsample\.conv\.{_WB}"),
        lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}",
    ),
    (
        re.compile(rf"(encoder|decoder)\.mid\.block_([12])\.{_RES}\.{_WB}"),
        lambda m, n: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_RESNET_PARTS[m[3]]}.{m[4]}",
    ),
    (
        re.compile(rf"(encoder|decoder)\.mid\.attn_1\.{_ATT}\.{_WB}"),
        lambda m, n: f"{m[1]}.mid_block.attentions.0.{_ATTENTION_PARTS[m[2]]}.{m[3]}",
    ),
]
_ATTENTION_WEIGHT = re.compile(
    rf"(encoder|decoder)\.mid\.attn_1\.({'|'.join(_LINEAR_ATTENTION_PARTS)})\.weight"
)
_LDM_PREFIX = "first_stage_model."  # the autoencoder inside a whole latent-diffusion checkpoint


def ldm_to_diffusers_vae(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a latent-diffusion (LDM) autoencoder state dict to diffusers' AutoencoderKL names.

    Training-only ``loss.*`` entries (discriminator, LPIPS, logvar) are dropped. If the keys come
    from a whole latent-diffusion checkpoint, only the ``first_stage_model.`` entries are kept,
    without that prefix. The 1x1-convolution attention weights (q, k, v, proj_out) become Linear
    weights. Keys the map does not know are passed through unchanged, so a strict load reports
    them as unexpected.

    Args:
        state_dict: LDM names (``encoder.down.0.block.0.norm1.weight``, ``decoder.up.3...``).

    Returns:
        A new dict under diffusers names; tensors are views of the inputs where no reshape was
        needed.
    """
    if any(k.startswith(_LDM_PREFIX) for k in state_dict):
        state_dict = {k[len(_LDM_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(_LDM_PREFIX)}
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("loss.")}
    up_levels = [int(m[1]) for k in state_dict if (m := re.match(r"decoder\.up\.(\d+)\.", k))]
    num_up = max(up_levels) + 1 if up_levels else 0

    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new_key = key
        for pattern, rename in _LDM_RULES:
            if m := pattern.fullmatch(key):
                new_key = rename(m, num_up)
                break
        if _ATTENTION_WEIGHT.fullmatch(key) and value.ndim > 2 and all(d == 1 for d in value.shape[2:]):
            value = value.reshape(value.shape[0], value.shape[1])  # (C, C, 1, 1) -> (C, C)
        if new_key in out:
            raise ValueError(f"state_dict: two keys map to {new_key!r} (the second is {key!r})")
        out[new_key] = value
    return out


# ---------------------------------------------------------------------------------------------
# The model


class ImageAutoencoder(nn.Module):
    """Frozen KL autoencoder: pixels in [-1, 1] <-> scaled latents (B, 4, H/8, W/8).

    Always in eval mode with requires_grad False; ``train()`` keeps it in eval mode.

    Args:
        config: the architecture, as an AutoencoderConfig or a diffusers AutoencoderKL config
            dict (every ``config`` argument below takes either); weights start random (see
            ``from_ldm_state_dict``, ``from_diffusers_state_dict`` and ``load`` for trained ones).
    """

    def __init__(self, config: AutoencoderConfig | Mapping):
        super().__init__()
        self.config = config = AutoencoderConfig.coerce(config)
        self.vae = AutoencoderKL(**config.diffusers_config())
        self.memory_format = torch.contiguous_format
        self._compiled_decode = None
        self._compile_backend = None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ImageAutoencoder:
        return super().train(False)  # frozen: a parent's .train() must not change it

    def to_channels_last(self, enabled: bool = True) -> ImageAutoencoder:
        """Hold weights and activations channels-last (NHWC), the layout GPU convolutions run fastest in.

        The results are the same up to rounding. Returns self.
        """
        self.memory_format = torch.channels_last if enabled else torch.contiguous_format
        self.vae.to(memory_format=self.memory_format)
        return self

    def compile_decoder(self, enabled: bool = True, backend: str = "inductor") -> ImageAutoencoder:
        """Decode through ``torch.compile`` (fused norms and activations around the convolutions).

        One compilation per latent shape and layout: the first decode at a shape pays it (tens of
        seconds at 512x512 on a GPU). The results are the same up to rounding. Returns self.
        """
        if not enabled:
            self._compiled_decode = None
        elif self._compiled_decode is None or self._compile_backend != backend:  # else keep its compilations
            self._compiled_decode = torch.compile(self._decode, backend=backend, dynamic=False)
        self._compile_backend = backend
        return self

    @property
    def decoder_compiled(self) -> bool:
        return self._compiled_decode is not None

    @property
    def scale_factor(self) -> float:
        return self.config.scale_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vae.encoder.conv_in.weight.device

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def random(cls, config: AutoencoderConfig | Mapping, seed: int = 0) -> ImageAutoencoder:
        """Random weights from diffusers' default initialisation, reproducible by seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(config)

    @classmethod
    def from_diffusers_state_dict(
        cls, state_dict: Mapping[str, Tensor], config: AutoencoderConfig | Mapping
    ) -> ImageAutoencoder:
        """Load an AutoencoderKL state dict under diffusers' names, strictly."""
        model = cls(config)
        hint = ""
        if any(re.search(r"\b(down|up)\.\d+\.block\.|\bmid\.attn_1\.", k) for k in state_dict):
            hint = "These are latent-diffusion names: use ImageAutoencoder.from_ldm_state_dict."
        _load(model.vae, dict(state_dict), "diffusers AutoencoderKL", hint)
        return model

    @classmethod
    def from_ldm_state_dict(
        cls, state_dict: Mapping[str, Tensor], config: AutoencoderConfig | Mapping
    ) -> ImageAutoencoder:
        """Load a latent-diffusion state dict (the released ``autoencoder_kl.pth``), strictly."""
        diffusers_names = [k for k in state_dict if re.search(r"\b(down_blocks|up_blocks|mid_block)\.", k)]
        if diffusers_names:
            raise ValueError(
                f"state_dict: keys such as {diffusers_names[0]!r} use diffusers' names, not the "
                "latent-diffusion layout; use ImageAutoencoder.from_diffusers_state_dict"
            )
        model = cls(config)
        renamed = ldm_to_diffusers_vae(state_dict)
        _load(model.vae, renamed, "latent-diffusion (LDM)")
        return model

    def save(self, path: str | Path) -> None:
        """Write the weights (diffusers names) to a safetensors file, the config in its metadata."""
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.vae.state_dict().items()}
        save_file(
            tensors, str(tmp), metadata={"config": json.dumps(self.config.to_dict()), "layout": "diffusers"}
        )
        os.replace(tmp, path)  # atomic: a crash never leaves half a file under the real name

    @classmethod
    def load(cls, path: str | Path, config: AutoencoderConfig | Mapping | None = None) -> ImageAutoencoder:
        """Read a file written by ``save`` (or any diffusers-named safetensors file with ``config``)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"autoencoder weights not found: {str(path)!r}")
        if config is None:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            if "config" not in meta:
                raise ValueError(f"{str(path)!r} carries no config in its metadata: pass config=")
            config = AutoencoderConfig.from_dict(json.loads(meta["config"]))
        return cls.from_diffusers_state_dict(load_file(str(path)), config)

    # -- encode and decode ----------------------------------------------------------------------

    def moments(self, pixels: Tensor) -> Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> posterior moments (B, 2 * latent, H/8, W/8), unscaled.

        The first ``latent_channels`` channels are the mean, the others the log-variance.
        """
        self._check_pixels(pixels)
        x = self._in_layout(pixels.to(device=self.device, dtype=self.dtype))
        h = self.vae.encoder(x)  # (B, 2 * latent, H/8, W/8)
        return self.vae.quant_conv(h)  # (B, 2 * latent, H/8, W/8)

    def sample_moments(self, moments: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw a posterior sample and scale it: scale_factor * (mean + std * noise).

        Args:
            moments: (B, 2 * latent, h, w) from ``moments``.
            generator: the noise source; the noise is drawn on the generator's device (the CPU
                for None, from the global generator) and then moved, so a seeded CPU generator
                gives the same latents on every device.

        Returns:
            (B, latent, h, w) latents in the moments' dtype and device.
        """
        c = self.config.latent_channels
        if moments.ndim != 4 or moments.shape[1] != 2 * c:
            raise ValueError(f"moments: expected shape (B, {2 * c}, h, w), got {tuple(moments.shape)}")
        mean, logvar = moments.chunk(2, dim=1)  # each (B, C, h, w)
        std = torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))
        noise_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=torch.float32)
        noise = noise.to(device=mean.device, dtype=mean.dtype)
        return (mean + std * noise) * self.scale_factor  # (B, C, h, w)

    def encode(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8), posterior SAMPLED.

        Sampling (not the mean) is what the released model was trained and sampled with.
        """
        return self.sample_moments(self.moments(pixels), generator)

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, 4, h, w) -> pixels (B, 3, 8h, 8w) clamped to [-1, 1]."""
        c = self.config.latent_channels
        if not isinstance(latents, Tensor) or latents.ndim != 4 or latents.shape[1] != c:
            got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(f"latents: expected shape (B, {c}, h, w), got {got}")
        z = latents.to(device=self.device, dtype=self.dtype) / self.scale_factor
        if self._compiled_decode is None:
            return self._decode(self._in_layout(z))
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return self._compiled_decode(self._in_layout(z))

    def _decode(self, z: Tensor) -> Tensor:
        z = self.vae.post_quant_conv(z)  # (B, C, h, w)
        return self.vae.decoder(z).clamp(-1, 1)  # (B, 3, 8h, 8w)

    def _in_layout(self, x: Tensor) -> Tensor:
        # Inputs are left as they come unless channels-last was asked for: a copy into another
        # layout can change which convolution algorithm runs, and so the last bits.
        if self.memory_format == torch.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _check_pixels(self, pixels: Tensor) -> None:
        f = self.config.downsample
        c = self.config.in_channels
        if not isinstance(pixels, Tensor) or pixels.ndim != 4 or pixels.shape[1] != c:
            got = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
            raise ValueError(f"pixels: expected shape (B, {c}, H, W), got {got}")
        h, w = pixels.shape[-2:]
        if h % f or w % f:
            raise ValueError(
                f"pixels: size {h}x{w} is not a multiple of {f}; resize or crop first "
                "(components.images.to_tensor does both)"
            )
        lo, hi = pixels.aminmax()
        if lo < -1.001 or hi > 1.001:
            raise ValueError(
                f"pixels: values in [{lo.item():.3g}, {hi.item():.3g}], expected [-1, 1] "
                "(x / 127.5 - 1 for 8-bit images; components.images.to_tensor does it)"
            )


def _load(vae: AutoencoderKL, state_dict: dict[str, Tensor], layout: str, hint: str = "") -> None:
    """Strict load (``official.load_state_dict_strict``); a mismatch names the expected layout."""
    try:
        load_state_dict_strict(vae, state_dict, layout)
    except ValueError as err:
        raise ValueError(f"{err}. {hint}".rstrip()) from None


# ---------------------------------------------------------------------------------------------
# Presets

# Stable Diffusion's KL-f8 VAE (the released autoencoder_kl.pth): 83,653,863 parameters.
SD_KL_F8 = AutoencoderConfig(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)
# For tests: the same x8 downsampling with 4 levels, about 0.1M parameters.
TINY = AutoencoderConfig(
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
)
PRESETS: dict[str, AutoencoderConfig] = {"sd_kl_f8": SD_KL_F8, "tiny": TINY}

__all__ = [
    "PRESETS",
    "SD_KL_F8",
    "TINY",
    "AutoencoderConfig",
    "ImageAutoencoder",
    "ldm_to_diffusers_vae",
]
