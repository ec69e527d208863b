"""The multi-modal U-ViT: every modality is a run of tokens, every timestep group one more token.

The network maps (noisy inputs, timesteps on the 0..1000 scale) to noise predictions, one per
diffused modality. It knows nothing of the noise process: see ``schedule.py`` and
``objective.py``.

Token layout, for modalities m_1..m_k and timestep groups g_1..g_n:

    [time(g_1) .. time(g_n), label tokens .., tokens(m_1) .. tokens(m_k)]

Label modalities (categorical conditions such as v1's data_type) sit right after the time tokens,
each with its own learned position embedding; the other rows share one ``pos_embed``. With the
released layout (groups image, text; modalities text, clip_img, img; label data_type) this is
exactly the released token order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

KINDS = ("image", "vector", "sequence", "label")
MAX_TIME = 1000.0  # the network's timestep scale; schedule.network_time maps onto it


def _is_whole(value, minimum: int) -> bool:
    """Whether ``value`` is an int (not a bool) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_whole(where: str, value, minimum: int) -> None:
    if not _is_whole(value, minimum):
        raise ValueError(f"{where}={value!r}: expected a whole number >= {minimum}")


@dataclass(frozen=True)
class Modality:
    """One input of the network.

    Args:
        name: key of this modality in the input and output dicts.
        kind: "image" (a C x H x W latent split into patches), "vector" (one token),
            "sequence" (L tokens of ``dim``) or "label" (a categorical condition, one token, not
            diffused and without output).
        shape: (C, H, W) for an image at its trained size, (dim,) for a vector, (L, dim) for a
            sequence, () for a label.
        group: the timestep group this modality is diffused with; None for labels.
        patch_size: image patch side.
        num_classes: number of label values.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    group: str | None = None
    patch_size: int = 2
    num_classes: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"modality {self.name!r}: kind={self.kind!r}, expected one of {KINDS}")
        expected_ndim = {"image": 3, "vector": 1, "sequence": 2, "label": 0}[self.kind]
        if len(self.shape) != expected_ndim:
            raise ValueError(
                f"modality {self.name!r}: a {self.kind} needs a shape of {expected_ndim} numbers, "
                f"got shape={self.shape}"
            )
        if not all(_is_whole(s, 1) for s in self.shape):
            raise ValueError(f"modality {self.name!r}: shape={self.shape}: expected whole numbers >= 1")
        _check_whole(f"modality {self.name!r}: patch_size", self.patch_size, 1)
        _check_whole(f"modality {self.name!r}: num_classes", self.num_classes, 0)
        if self.kind == "label":
            if self.group is not None:
                raise ValueError(f"label {self.name!r} is not diffused: group must be None")
            if self.num_classes < 1:
                raise ValueError(f"label {self.name!r}: num_classes={self.num_classes} must be >= 1")
        elif not self.group:
            raise ValueError(f"modality {self.name!r}: a {self.kind} needs a timestep group")
        if self.kind == "image":
            _, h, w = self.shape
            if h % self.patch_size or w % self.patch_size:
                raise ValueError(
                    f"image {self.name!r}: size {h}x{w} is not divisible by patch_size={self.patch_size}"
                )

    @property
    def diffused(self) -> bool:
        return self.kind != "label"

    @property
    def num_tokens(self) -> int:
        if self.kind == "image":
            _, h, w = self.shape
            return (h // self.patch_size) * (w // self.patch_size)
        if self.kind == "sequence":
            return self.shape[0]
        return 1


def image(name: str, channels: int, height: int, width: int, group: str, patch_size: int = 2):
    """An image latent, split into patch_size x patch_size patches."""
    return Modality(name, "image", (channels, height, width), group, patch_size=patch_size)


def vector(name: str, dim: int, group: str) -> Modality:
    """A single vector, one token (for example a CLIP image embedding)."""
    return Modality(name, "vector", (dim,), group)


def sequence(name: str, length: int, dim: int, group: str) -> Modality:
    """A sequence of vectors, one token each (for example the 77 x 64 text latent)."""
    return Modality(name, "sequence", (length, dim), group)


def label(name: str, num_classes: int) -> Modality:
    """A categorical condition, one token, never diffused (for example v1's data_type)."""
    return Modality(name, "label", (), None, num_classes=num_classes)


@dataclass(frozen=True)
class UViTConfig:
    """Architecture of a multi-modal U-ViT.

    Args:
        modalities: the inputs, in token order (labels are placed after the time tokens).
        groups: timestep groups in time-token order; every diffused modality names one.
        width: token width.
        depth: number of in-blocks plus out-blocks (even); one mid-block comes on top.
        num_heads: attention heads; width must divide by it.
        mlp_ratio: hidden width of the MLP over the token width.
        qkv_bias: bias on the attention's qkv projection.
        norm: "post" (the released block: LayerNorm after each residual sum) or "pre" (U-ViT).
    """

    modalities: tuple[Modality, ...]
    groups: tuple[str, ...]
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    norm: str = "post"

    def __post_init__(self) -> None:
        names = [m.name for m in self.modalities]
        if len(set(names)) != len(names):
            raise ValueError(f"modality names must be unique, got {names}")
        if len(set(self.groups)) != len(self.groups) or not self.groups:
            raise ValueError(f"groups must be unique and non-empty, got {self.groups}")
        used = {m.group for m in self.modalities if m.diffused}
        if used != set(self.groups):
            raise ValueError(
                f"groups={self.groups} but the modalities use {sorted(used)}: every group needs "
                f"at least one modality and every modality a declared group"
            )
        _check_whole("width", self.width, 1)
        _check_whole("num_heads", self.num_heads, 1)
        _check_whole("depth", self.depth, 0)
        if self.depth % 2:
            raise ValueError(f"depth={self.depth} must be even and >= 0 (in + out blocks)")
        ratio = self.mlp_ratio
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio < float("inf"):
            raise ValueError(f"mlp_ratio={ratio!r}: expected a number > 0")
        if not isinstance(self.qkv_bias, bool):
            raise ValueError(f"qkv_bias={self.qkv_bias!r}: expected true or false")
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}")
        if self.norm not in ("post", "pre"):
            raise ValueError(f"norm={self.norm!r}, expected 'post' or 'pre'")

    @property
    def diffused(self) -> tuple[Modality, ...]:
        return tuple(m for m in self.modalities if m.diffused)

    @property
    def labels(self) -> tuple[Modality, ...]:
        return tuple(m for m in self.modalities if not m.diffused)

    def modality(self, name: str) -> Modality:
        for m in self.modalities:
            if m.name == name:
                return m
        raise ValueError(f"unknown modality {name!r}; this model has {[m.name for m in self.modalities]}")

    def members(self, group: str) -> tuple[Modality, ...]:
        """The diffused modalities of one timestep group."""
        return tuple(m for m in self.diffused if m.group == group)

    @property
    def num_tokens(self) -> int:
        return len(self.groups) + sum(m.num_tokens for m in self.modalities)

    def to_dict(self) -> dict:
        return {
            "modalities": [
                {k: getattr(m, k) for k in ("name", "kind", "shape", "group", "patch_size", "num_classes")}
                for m in self.modalities
            ],
            "groups": list(self.groups),
            "width": self.width,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": self.qkv_bias,
            "norm": self.norm,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> UViTConfig:
        """The config ``to_dict`` wrote; anything else is a ValueError that says what is wrong."""
        try:
            mods = tuple(Modality(**{**m, "shape": tuple(m["shape"])}) for m in d["modalities"])
            rest = {k: v for k, v in d.items() if k not in ("modalities", "groups")}
            return cls(modalities=mods, groups=tuple(d["groups"]), **rest)
        except (KeyError, TypeError) as err:  # a key missing or unknown, a value of the wrong kind
            raise ValueError(f"not a network config ({type(err).__name__}: {err})") from None


# ---------------------------------------------------------------------------------------------
# Helpers and embedders


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding [cos(t f), sin(t f)], f_i = 10000^(-i/half), t on the 0..1000 scale."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def patchify_grid(modality: Modality, height: int, width: int) -> tuple[int, int]:
    return height // modality.patch_size, width // modality.patch_size


def resize_patch_pos_embed(pos: Tensor, trained: tuple[int, int], target: tuple[int, int]) -> Tensor:
    """Bilinearly resize (1, h*w, D) patch position rows from the trained grid to another one."""
    if trained == target:
        return pos
    d = pos.shape[-1]
    grid = pos.reshape(1, trained[0], trained[1], d).permute(0, 3, 1, 2)  # (1, D, h, w)
    grid = F.interpolate(grid.float(), size=target, mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, target[0] * target[1], d).to(pos.dtype)


class PatchEmbed(nn.Module):
    """Image latent -> patch tokens, row-major over the patch grid."""

    def __init__(self, channels: int, width: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, D)


def unpatchify(x: Tensor, channels: int, grid: tuple[int, int], patch_size: int) -> Tensor:
    """(B, h*w, p*p*C) tokens, each laid out (p1, p2, C), -> (B, C, h*p, w*p)."""
    b = x.shape[0]
    h, w = grid
    p = patch_size
    x = x.reshape(b, h, w, p, p, channels)  # (B, h, w, p1, p2, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p1, w, p2)
    return x.reshape(b, channels, h * p, w * p)


# ---------------------------------------------------------------------------------------------
# Block


class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, Dh)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh), scale Dh^-0.5
        return self.proj(x.transpose(1, 2).reshape(b, n, d))  # (B, N, D)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()  # exact (erf)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Transformer block with an optional long-skip input.

    post-LN (released): x = norm1(skip_linear([x, skip])); x = norm2(x + attn(x));
    x = norm3(x + mlp(x)). pre-LN (U-ViT): x = skip_linear([x, skip]); x = x + attn(norm2(x));
    x = x + mlp(norm3(x)). norm2 always belongs to attention and norm3 to the MLP.
    """

    def __init__(self, cfg: UViTConfig, skip: bool):
        super().__init__()
        d = cfg.width
        self.post_norm = cfg.norm == "post"
        self.skip_linear = nn.Linear(2 * d, d) if skip else None
        self.norm1 = nn.LayerNorm(d) if skip and self.post_norm else None
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.norm2 = nn.LayerNorm(d)
        self.norm3 = nn.LayerNorm(d)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (B, N, D)
            if self.norm1 is not None:
                x = self.norm1(x)
        if self.post_norm:
            x = self.norm2(x + self.attn(x))
            return self.norm3(x + self.mlp(x))
        x = x + self.attn(self.norm2(x))
        return x + self.mlp(self.norm3(x))


# ---------------------------------------------------------------------------------------------
# Model


class UViT(nn.Module):
    """Multi-modal U-ViT noise predictor: eps(inputs at their timesteps) for every modality."""

    def __init__(self, config: UViTConfig):
        super().__init__()
        self.config = config
        d = config.width
        self.gradient_checkpointing = False
        self._block_fn: Callable[[Block, Tensor, Tensor | None], Tensor] = _call_block  # see compile_blocks
        # Checks of values (NaN, timestep range) synchronise a GPU; fast samplers may turn them off.
        self.check_values = True

        self.embed = nn.ModuleDict()
        self.head = nn.ModuleDict()
        self.label_pos = nn.ParameterDict()
        for m in config.modalities:
            if m.kind == "image":
                c = m.shape[0]
                self.embed[m.name] = PatchEmbed(c, d, m.patch_size)
                self.head[m.name] = nn.Linear(d, m.patch_size**2 * c)
            elif m.kind == "label":
                self.embed[m.name] = nn.Embedding(m.num_classes, d)
                self.label_pos[m.name] = nn.Parameter(torch.zeros(1, 1, d))
            else:
                self.embed[m.name] = nn.Linear(m.shape[-1], d)
                self.head[m.name] = nn.Linear(d, m.shape[-1])
        rows = len(config.groups) + sum(m.num_tokens for m in config.diffused)
        self.pos_embed = nn.Parameter(torch.zeros(1, rows, d))

        half = config.depth // 2
        self.in_blocks = nn.ModuleList(Block(config, skip=False) for _ in range(half))
        self.mid_block = Block(config, skip=False)
        self.out_blocks = nn.ModuleList(Block(config, skip=True) for _ in range(half))
        self.norm = nn.LayerNorm(d)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.trunc_normal_(mod.weight, std=0.02)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.LayerNorm):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.trunc_normal_(mod.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for p in self.label_pos.values():
            nn.init.trunc_normal_(p, std=0.02)

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed.dtype

    @property
    def device(self) -> torch.device:
        return self.pos_embed.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- input checks ---------------------------------------------------------------------------

    def check_inputs(self, inputs: Mapping[str, Tensor], timesteps: Mapping[str, Tensor]) -> int:
        """Validate names, shapes, dtypes and (when check_values) values; return the batch size."""
        cfg = self.config
        expected = {m.name for m in cfg.modalities}
        if not isinstance(inputs, Mapping) or set(inputs) != expected:
            got = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise ValueError(f"inputs: got modalities {got}, expected exactly {sorted(expected)}")
        if not isinstance(timesteps, Mapping) or set(timesteps) != set(cfg.groups):
            got = sorted(timesteps) if isinstance(timesteps, Mapping) else type(timesteps).__name__
            raise ValueError(f"timesteps: got groups {got}, expected exactly {sorted(cfg.groups)}")
        batch = None
        for m in cfg.modalities:
            x = inputs[m.name]
            where = f"inputs[{m.name!r}]"
            if not isinstance(x, Tensor):
                raise ValueError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
            if m.kind == "label":
                if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                    raise ValueError(f"{where}: a label needs an integer dtype, got {x.dtype}")
                if x.ndim != 1:
                    raise ValueError(f"{where}: expected shape (batch,), got {tuple(x.shape)}")
            else:
                if not x.is_floating_point():
                    raise ValueError(f"{where}: expected a floating dtype, got {x.dtype}")
                if m.kind == "image":
                    c = m.shape[0]
                    ok = x.ndim == 4 and x.shape[1] == c and x.shape[2] % m.patch_size == 0
                    ok = ok and x.shape[3] % m.patch_size == 0
                    want = f"(batch, {c}, H, W) with H and W multiples of {m.patch_size}"
                else:
                    ok = tuple(x.shape[1:]) == m.shape
                    want = f"(batch, {', '.join(map(str, m.shape))})"
                if not ok:
                    raise ValueError(f"{where}: expected shape {want}, got {tuple(x.shape)}")
            batch = x.shape[0] if batch is None else batch
        sizes = {m.name: inputs[m.name].shape[0] for m in cfg.modalities}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"inputs: batch sizes differ between modalities: {sizes}")
        for g in cfg.groups:
            t = timesteps[g]
            if not isinstance(t, Tensor) or t.ndim != 1 or t.shape[0] != batch:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"timesteps[{g!r}]: expected a tensor of shape ({batch},), got {shape}")
        if self.check_values:
            for m in cfg.modalities:
                x = inputs[m.name]
                if m.kind == "label":
                    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= m.num_classes):
                        raise ValueError(
                            f"inputs[{m.name!r}]: values must lie in [0, {m.num_classes - 1}], got "
                            f"[{int(x.min())}, {int(x.max())}]"
                        )
                elif not torch.isfinite(x).all():
                    raise ValueError(f"inputs[{m.name!r}]: contains NaN or infinite values")
            for g in cfg.groups:
                t = timesteps[g]
                if not torch.isfinite(t).all() or (t.numel() and (t.min() < 0 or t.max() > MAX_TIME)):
                    raise ValueError(
                        f"timesteps[{g!r}]: values must lie in [0, {MAX_TIME:g}] (the network's "
                        f"scale), got {t.tolist() if t.numel() <= 8 else 'values outside it'}"
                    )
        return batch

    # -- forward --------------------------------------------------------------------------------

    def forward(
        self,
        inputs: Mapping[str, Tensor],
        timesteps: Mapping[str, Tensor],
        *,
        run_block: Callable[[Block, Tensor, Tensor | None], Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Predict the noise of every diffused modality.

        Args:
            inputs: one tensor per modality: images (B, C, H, W), vectors (B, dim), sequences
                (B, L, dim), labels (B,) integers.
            timesteps: one (B,) float tensor per timestep group, on the 0..1000 scale.
            run_block: calls each block as run_block(block, x, skip) in place of block(x, skip);
                ``fast.FastNetwork`` passes a compiled one (all blocks share its compilation).

        Returns:
            One tensor per diffused modality, shaped and typed like its input.
        """
        cfg = self.config
        self.check_inputs(inputs, timesteps)
        dtype = self.dtype

        time_tokens = [timestep_embedding(timesteps[g], cfg.width)[:, None] for g in cfg.groups]
        tokens, pos, grids = list(time_tokens), [], {}
        row = len(cfg.groups)
        pos.append(self.pos_embed[:, :row])
        for m in cfg.diffused:
            x = inputs[m.name].to(dtype)
            if m.kind == "image":
                grids[m.name] = patchify_grid(m, x.shape[2], x.shape[3])
                tokens.append(self.embed[m.name](x))  # (B, h*w, D)
                trained = patchify_grid(m, m.shape[1], m.shape[2])
                rows = self.pos_embed[:, row : row + m.num_tokens]
                pos.append(resize_patch_pos_embed(rows, trained, grids[m.name]))
            else:
                seq = x if m.kind == "sequence" else x[:, None]
                tokens.append(self.embed[m.name](seq))  # (B, L or 1, D)
                pos.append(self.pos_embed[:, row : row + m.num_tokens])
            row += m.num_tokens
        x = torch.cat([t.to(dtype) for t in tokens], dim=1) + torch.cat(pos, dim=1)  # (B, N, D)

        n_lead = len(cfg.groups)
        labels = [
            self.embed[m.name](inputs[m.name].long())[:, None] + self.label_pos[m.name] for m in cfg.labels
        ]  # each (B, 1, D)
        if labels:
            x = torch.cat([x[:, :n_lead], *labels, x[:, n_lead:]], dim=1)  # (B, N + labels, D)

        run = run_block or self._run
        skips = []
        for blk in self.in_blocks:
            x = run(blk, x, None)
            skips.append(x)
        x = run(self.mid_block, x, None)
        for blk in self.out_blocks:
            x = run(blk, x, skips.pop())
        x = self.norm(x)  # (B, N + labels, D)

        x = x[:, n_lead + len(labels) :]  # drop time and label tokens
        out, start = {}, 0
        for m in cfg.diffused:
            ref = inputs[m.name]
            if m.kind == "image":
                h, w = grids[m.name]
                y = self.head[m.name](x[:, start : start + h * w])  # (B, h*w, p*p*C)
                out[m.name] = unpatchify(y, m.shape[0], (h, w), m.patch_size).to(ref.dtype)
                start += h * w
            else:
                y = self.head[m.name](x[:, start : start + m.num_tokens])  # (B, L, dim)
                out[m.name] = (y if m.kind == "sequence" else y[:, 0]).to(ref.dtype)
                start += m.num_tokens
        return out

    def compile_blocks(self, backend: str = "inductor") -> UViT:
        """Run every transformer block through ``torch.compile`` (training too; checkpointing kept).

        Blocks of a kind share one compilation per input shape; the weights and the state dict are
        unchanged. Returns self.
        """
        self._block_fn = torch.compile(_call_block, backend=backend)
        return self

    def _run(self, blk: Block, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._block_fn, blk, x, skip, use_reentrant=False)
        return self._block_fn(blk, x, skip)


def _call_block(block: Block, x: Tensor, skip: Tensor | None) -> Tensor:
    return block(x, skip)


# ---------------------------------------------------------------------------------------------
# Presets


def image_text_config(
    *,
    latent: tuple[int, int, int],
    clip_dim: int,
    text: tuple[int, int],
    width: int,
    depth: int,
    num_heads: int,
    data_type: bool,
    patch_size: int = 2,
    norm: str = "post",
) -> UViTConfig:
    """The released layout: groups (image, text); tokens text, clip_img, img; optional data_type."""
    mods = [
        sequence("text", text[0], text[1], group="text"),
        vector("clip_img", clip_dim, group="image"),
        image("img", *latent, group="image", patch_size=patch_size),
    ]
    if data_type:
        mods.append(label("data_type", 2))
    return UViTConfig(tuple(mods), ("image", "text"), width, depth, num_heads, norm=norm)


_RELEASED = dict(latent=(4, 64, 64), clip_dim=512, text=(77, 64), width=1536, depth=30, num_heads=24)

PRESETS: dict[str, UViTConfig] = {
    "tiny": image_text_config(
        latent=(4, 8, 8), clip_dim=16, text=(8, 8), width=64, depth=4, num_heads=4, data_type=True
    ),
    "small": image_text_config(
        latent=(4, 16, 16),
        clip_dim=64,
        text=(16, 16),
        width=256,
        depth=8,
        num_heads=4,
        data_type=True,
    ),
    "base": image_text_config(
        latent=(4, 32, 32),
        clip_dim=512,
        text=(77, 64),
        width=768,
        depth=12,
        num_heads=12,
        data_type=True,
    ),
    # the released sizes; v1 adds the data-type token
    "unidiffuser-v0": image_text_config(**_RELEASED, data_type=False),
    "unidiffuser-v1": image_text_config(**_RELEASED, data_type=True),
}


def preset(name: str) -> UViTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
