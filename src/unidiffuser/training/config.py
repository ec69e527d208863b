"""The options of a training run: one frozen dataclass, read from TOML and/or flags.

Defaults follow the paper's recipe (UNIDIFFUSER.md section 4, U-ViT's optimiser): AdamW with lr
2e-4, weight decay 0.03, betas (0.9, 0.9), 5000 linear warm-up steps, EMA 0.9999.

Every check raises a ValueError that names the key, the value and a fix. ``load_config`` merges a
TOML file with overrides (flags win); ``TrainConfig.to_toml`` writes a file that loads back to the
same config. The helpers below (type checks, TOML, unknown keys) serve every config of a training
stage; the caption decoder's stage (``DecoderTrainConfig`` below) uses them too.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from ..network import PRESETS, UViTConfig
from ..objective import WEIGHTINGS

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

MIXED_PRECISION = ("no", "bf16", "fp16")
DISTRIBUTED = ("ddp", "fsdp")
# Names other trainers use for our keys, suggested when one of them is given.
ALIASES = {
    "learning_rate": "lr",
    "max_steps": "steps",
    "num_steps": "steps",
    "train_steps": "steps",
    "global_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "max_grad_norm": "grad_clip",
    "clip_grad_norm": "grad_clip",
    "precision": "mixed_precision",
    "ema": "ema_decay",
    "out_dir": "output_dir",
    "results_dir": "output_dir",
    "resume_from": "resume",
    "pretrained": "init_from",
}
TOY = "toy"  # the toy world: a data source, and a model name for the toy world's network
DEFAULT_MODEL = "small"  # the architecture when neither model nor init_from says one
# Prompts of the periodic text-to-image samples: generic scenes, so that any caption model has
# something to draw.
DEFAULT_PROMPTS = (
    "a photo of a cat sitting on a sofa",
    "a red car parked on a city street",
    "a bowl of fruit on a wooden table",
    "a mountain lake at sunrise",
)


@dataclass(frozen=True)
class TrainConfig:
    """One training run. See ``FIELD_HELP`` (shown by ``unidiffuser train --help``) for each key."""

    model: str | Mapping[str, Any] | None = None
    data: str = TOY
    output_dir: str = "runs/train"
    steps: int = 10_000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.03
    betas: tuple[float, float] = (0.9, 0.9)
    warmup_steps: int = 5000
    decay_steps: int = 0
    ema_decay: float = 0.9999
    grad_clip: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    compile: bool = False
    weighting: str = "modality"
    loss_weights: Mapping[str, float] = field(default_factory=dict)
    clean_prob: float = 0.0
    snr_gamma: float = 0.0
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 50
    seed: int = 0
    init_from: str | None = None
    resume: bool = False
    components: str | None = None
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = DEFAULT_PROMPTS
    sample_images: tuple[str, ...] = ()
    sample_steps: int = 20
    num_workers: int = 0
    data_in_memory: bool = False
    distributed: str = "ddp"

    def __post_init__(self) -> None:
        check_types(self)
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "loss_weights", {k: float(v) for k, v in self.loss_weights.items()})
        object.__setattr__(self, "sample_prompts", tuple(self.sample_prompts))
        object.__setattr__(self, "sample_images", tuple(self.sample_images))
        if isinstance(self.model, Mapping):  # one canonical, JSON-ready form of an inline config
            object.__setattr__(self, "model", json.loads(json.dumps(self.model_config().to_dict())))
        _check_minimums(self, grad_accum=1, sample_every=0, sample_steps=1, num_workers=0, decay_steps=0)
        if self.decay_steps > self.steps:
            _fail(
                "decay_steps",
                self.decay_steps,
                f"is more than steps = {self.steps}",
                "set it to at most steps",
            )
        _check_optimizer(self, recipe="0.03 (the recipe)", betas="[0.9, 0.9]")
        if self.data_in_memory and self.data == "toy":
            _fail(
                "data_in_memory",
                True,
                "reads feature shards, and the toy world is drawn as it goes",
                "leave it false",
            )
        if self.data_in_memory and self.num_workers:
            _fail(
                "num_workers",
                self.num_workers,
                "reads ahead from the files, and data_in_memory = true reads none",
                "set num_workers = 0",
            )
        if not 0 <= self.ema_decay < 1:
            _fail("ema_decay", self.ema_decay, "must lie in [0, 1)", "use 0.9999 (the recipe)")
        if self.mixed_precision not in MIXED_PRECISION:
            _fail(
                "mixed_precision",
                self.mixed_precision,
                f"is not one of {MIXED_PRECISION}",
                'use "bf16" on recent GPUs, "fp16" on older ones, "no" on CPU',
            )
        if self.distributed not in DISTRIBUTED:
            _fail(
                "distributed",
                self.distributed,
                f"is not one of {DISTRIBUTED}",
                'use "ddp" (every process holds the whole model) or "fsdp" (sharded)',
            )
        if self.distributed == "fsdp" and self.mixed_precision == "fp16":
            _fail(
                "mixed_precision",
                "fp16",
                "does not go with distributed = 'fsdp' (the fp16 loss scaler would check each "
                "process's gradient shard alone)",
                'use "bf16" with FSDP, or distributed = "ddp"',
            )
        if self.weighting not in WEIGHTINGS:
            _fail("weighting", self.weighting, f"is not one of {WEIGHTINGS}", 'use "modality" (default)')
        if not (math.isfinite(self.clean_prob) and 0 <= self.clean_prob < 1):
            _fail(
                "clean_prob",
                self.clean_prob,
                "must lie in [0, 1)",
                "use 0 (the paper) or a share such as 0.5",
            )
        if not (math.isfinite(self.snr_gamma) and self.snr_gamma >= 0):
            _fail("snr_gamma", self.snr_gamma, "must be >= 0", "use 0 (the paper) or a value such as 5")
        if not self.data:
            _fail("data", self.data, "is empty", f'use "{TOY}" or the directory of feature shards')
        _check_output_dir(self.output_dir)
        if self.batch_size % self.grad_accum:
            _fail(
                "batch_size",
                self.batch_size,
                f"is not divisible by grad_accum={self.grad_accum}",
                "batch_size is the global batch of one optimizer step; make it a multiple of grad_accum",
            )
        if not self.sample_prompts or not all(p.strip() for p in self.sample_prompts):
            _fail(
                "sample_prompts",
                list(self.sample_prompts),
                "needs at least one non-empty prompt",
                'give prompts such as ["a photo of a cat"]',
            )
        for key in ("init_from", "components"):
            if getattr(self, key) == "":
                _fail(key, "", "is empty", "leave it out or name a path")
        for name, weight in self.loss_weights.items():
            if not (math.isfinite(weight) and weight >= 0):
                _fail(f"loss_weights.{name}", weight, "must be >= 0", "use a non-negative factor such as 1.0")
        # The architecture of init_from is read when training starts (it needs the files); every
        # other architecture is known now.
        if self.model is not None or not self.init_from:
            self.check_loss_weights(self.model_config())

    def check_loss_weights(self, model_config: UViTConfig) -> None:
        """Every loss_weights key must name a diffused modality of the architecture."""
        diffused = [m.name for m in model_config.diffused]
        for name, weight in self.loss_weights.items():
            if name not in diffused:
                _fail(f"loss_weights.{name}", weight, "names no diffused modality", f"use one of {diffused}")
        if all(self.loss_weights.get(name, 1.0) == 0 for name in diffused):
            _fail("loss_weights", dict(self.loss_weights), "weighs every modality 0, so nothing would be learned",
                  "leave at least one above 0")  # fmt: skip

    def model_config(self) -> UViTConfig:
        """The network architecture: a preset, the toy world's network, or an inline config.

        With ``model`` left out it is the architecture stored with ``init_from`` (read from its
        files), or the "small" preset when training from scratch.
        """
        if self.model is None:
            if not self.init_from:
                return PRESETS[DEFAULT_MODEL]
            from .checkpoint import pretrained_source  # reads files: only when asked

            source = pretrained_source(self.init_from)
            if source.config is None:
                _fail(
                    "model",
                    None,
                    f"is left out and init_from = {self.init_from!r} ({source.description}) does not "
                    "say its architecture",
                    "set model to the architecture of the weights",
                )
            return source.config
        if isinstance(self.model, str):
            if self.model == TOY:
                from ..toy import ToyWorld

                return ToyWorld().config()
            if self.model not in PRESETS:
                close = difflib.get_close_matches(self.model, [*PRESETS, TOY], n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                _fail("model", self.model, "is no preset", f"{hint}choose one of {[*PRESETS, TOY]}")
            return PRESETS[self.model]
        try:
            return UViTConfig.from_dict(self.model)
        except (KeyError, TypeError, ValueError) as e:
            _fail(
                "model",
                "{...}",
                f"is not a valid UViTConfig ({type(e).__name__}: {e})",
                "compare with UViTConfig.to_dict()",
            )

    # -- conversion -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (``model`` as given: a name, a dict or None)."""
        return plain_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Build from plain values, rejecting unknown keys with a suggestion."""
        return from_plain_dict(cls, d, source, ALIASES)

    def to_toml(self) -> str:
        """A TOML document that ``load_config`` reads back to this config (None values omitted)."""
        return to_toml(self.to_dict())


FIELD_HELP: dict[str, str] = {
    "model": f"network: a preset name ({', '.join([*PRESETS, TOY])}) or an inline UViTConfig table; "
    f"left out: the architecture of init_from, else {DEFAULT_MODEL}",
    "data": f'training data: "{TOY}" (the toy world) or a directory of *.safetensors feature shards',
    "output_dir": "run directory: resolved config, log, checkpoints/",
    "steps": "optimizer steps to train to (a resumed run continues up to this number)",
    "batch_size": "global batch of one optimizer step, over all processes and accumulation steps",
    "grad_accum": "micro-batches accumulated per optimizer step",
    "lr": "peak learning rate of AdamW",
    "weight_decay": "AdamW weight decay (never on norms, biases, position embeddings, embedding tables)",
    "betas": "AdamW betas",
    "warmup_steps": "steps of linear learning-rate warm-up from 0",
    "decay_steps": "the last this many steps lower the learning rate linearly to 0 at step `steps` "
    "(raising `steps` on resume moves the decay with it); 0 keeps it constant after the warm-up",
    "ema_decay": "decay of the exponential moving average of the weights (used for sampling)",
    "grad_clip": "clip the global gradient norm to this; 0 turns clipping off",
    "mixed_precision": f"autocast precision, one of {', '.join(MIXED_PRECISION)}",
    "gradient_checkpointing": "recompute block activations in the backward pass to save memory",
    "compile": "torch.compile each transformer block (inductor; the first steps pay the compilation)",
    "weighting": f"loss weighting between modalities, one of {', '.join(WEIGHTINGS)}",
    "loss_weights": "extra loss factor per diffused modality, NAME=WEIGHT",
    "clean_prob": "share of examples in which one timestep group, chosen uniformly, is given clean "
    "(t = 0, no loss on it): trains the conditionals at the timestep sampling gives them; 0 is the "
    "paper's objective",
    "snr_gamma": "weigh each timestep's noise error by min(SNR, snr_gamma) / SNR (Min-SNR-gamma): the "
    "cleanest timesteps count less, the noisy ones, where layout and words are decided, fully; 0 "
    "weighs them alike (the paper)",
    "checkpoint_every": "save a checkpoint every this many steps (and at the last step)",
    "keep_last": "keep this many newest checkpoints",
    "log_every": "log losses, learning rate and throughput every this many steps",
    "seed": "seed of the initial weights, the data order, the timesteps and the noise",
    "init_from": "fine-tune from these weights: a checkpoint step_N directory or a run directory, a "
    ".safetensors state dict (our names), a released uvit_v1.pth/uvit_v0.pth, or a model directory "
    "(ours, the release files, diffusers' unet/)",
    "resume": "continue from the newest complete checkpoint in output_dir",
    "components": "a model directory (any layout) whose autoencoder, CLIP encoders and caption decoder "
    "draw the periodic samples (image-text models only)",
    "sample_every": "write sample grids (t2i, i2t, joint) from the EMA network to "
    "output_dir/samples/step_N/ every this many steps; 0 turns them off; needs components",
    "sample_prompts": "prompts of the text-to-image samples",
    "sample_images": "pictures to caption in the image-to-text samples; none: the text-to-image samples",
    "sample_steps": "solver steps of each sample",
    "num_workers": "worker processes per training process that read the data ahead (the same batches "
    "and resume position as without them); 0 reads in the training process. 2-4 keep a GPU fed from "
    "feature shards",
    "data_in_memory": "read every feature shard into memory at the start and take each batch from there "
    "at once (the same batches, skips and resume position as reading the files; for data that fits "
    "in RAM, with num_workers = 0; each training process holds its own copy)",
    "distributed": "how several processes share the work: ddp (each holds the whole network, "
    "gradients averaged) or fsdp (weights, gradients, optimizer state and EMA sharded over the "
    "processes, for networks too large for one device; checkpoints stay whole)",
}


# ---------------------------------------------------------------------------------------------
# The caption decoder's stage

DECODER_PRECISION = ("no", "bf16")


@dataclass(frozen=True)
class DecoderTrainConfig:
    """The caption decoder's training stage (``decoder.train_decoder``); see ``DECODER_FIELD_HELP``.

    Defaults follow ClipCap, whose prefix decoder UniDiffuser's is: AdamW at 2e-5 with 5000 warm-up
    steps, GPT-2 trained along with the bottleneck.
    """

    captions: str
    text_encoder: str | None = None
    init_from: str | None = None
    decoder: str | Mapping[str, Any] = "released"
    tokenizer: str | None = None
    output_dir: str = "runs/caption-decoder"
    steps: int = 20_000
    batch_size: int = 64
    lr: float = 2e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 5000
    grad_clip: float = 1.0
    max_length: int = 67
    mixed_precision: str = "no"
    device: str = "auto"
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 50
    seed: int = 0
    resume: bool = False

    def __post_init__(self) -> None:
        check_types(self)
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if isinstance(self.decoder, Mapping):
            object.__setattr__(self, "decoder", json.loads(json.dumps(self.decoder)))
        _check_minimums(self, max_length=2)
        _check_optimizer(self, recipe="0.01 (ClipCap's)", betas="[0.9, 0.999]")
        if self.mixed_precision not in DECODER_PRECISION:
            _fail(
                "mixed_precision",
                self.mixed_precision,
                f"is not one of {DECODER_PRECISION}",
                'use "bf16" on recent GPUs, "no" elsewhere',
            )
        if not self.captions:
            _fail(
                "captions", self.captions, "is empty", "name a captions file or a directory of feature shards"
            )
        _check_output_dir(self.output_dir)
        for key in ("text_encoder", "init_from", "tokenizer"):
            if getattr(self, key) == "":
                _fail(key, "", "is empty", "leave it out or name a path")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            _fail("device", self.device, "is no device", 'use "auto", "cpu", "cuda" or "cuda:N"')

    def to_dict(self) -> dict[str, Any]:
        return plain_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> DecoderTrainConfig:
        return from_plain_dict(cls, d, source, ALIASES)


DECODER_FIELD_HELP: dict[str, str] = {
    "captions": 'the captions: a .txt file (one per line), a .jsonl file (a "caption" or "text" field '
    "per line), or a directory of caption feature shards (precomputed text features; see "
    "unidiffuser.training.decoder)",
    "text_encoder": "the frozen CLIP text encoder that turns captions into features: a model directory "
    "(any layout) or a transformers CLIP folder; left out: init_from's, when that is a model directory",
    "init_from": "where the decoder starts: a model directory (any layout; its caption decoder), a "
    "train-decoder checkpoint or run directory, or a transformers GPT-2 folder (pretrained GPT-2, a new "
    "bottleneck); left out: a random decoder",
    "decoder": "architecture of a new decoder (random or from a GPT-2 folder): a preset (released, tiny) "
    "or an inline CaptionDecoderConfig table; feature_dim always follows the text encoder",
    "tokenizer": "GPT-2 tokenizer folder of a random decoder (the tiny preset has its own)",
    "output_dir": "run directory: resolved config, log, checkpoints/",
    "steps": "optimizer steps to train to (a resumed run continues up to this number)",
    "batch_size": "captions per optimizer step",
    "lr": "peak learning rate of AdamW",
    "weight_decay": "AdamW weight decay (never on norms, biases, embedding tables)",
    "betas": "AdamW betas",
    "warmup_steps": "steps of linear learning-rate warm-up from 0",
    "grad_clip": "clip the global gradient norm to this; 0 turns clipping off",
    "max_length": "caption tokens kept, the end token included (the released search generates up to 67)",
    "mixed_precision": f"autocast precision, one of {', '.join(DECODER_PRECISION)}",
    "device": 'where to train: "auto" (CUDA if available), "cpu", "cuda", "cuda:N"',
    "checkpoint_every": "save a checkpoint every this many steps (and at the last step)",
    "keep_last": "keep this many newest checkpoints",
    "log_every": "log the loss, learning rate and throughput every this many steps",
    "seed": "seed of a random decoder, the caption order and dropout",
    "resume": "continue from the newest complete checkpoint in output_dir",
}


# ---------------------------------------------------------------------------------------------
# Reading configs

Config = TypeVar("Config", bound="DataclassInstance")


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    cls: type[Config] = TrainConfig,  # type: ignore[assignment]
) -> Config:
    """Read a TOML file (optional) and apply overrides on top of it.

    Args:
        path: a TOML file of ``cls`` keys.
        overrides: values that replace the file's (flags given on the command line).
        cls: the config class (TrainConfig, or another stage's config with a ``from_dict``).

    Returns:
        The validated config.
    """
    values: dict[str, Any] = {}
    source = "flags"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ValueError(
                f"config file {source!r} does not exist; check the path given to --config"
            ) from None
        try:
            values = parse_toml(text)
        except ValueError as e:  # tomllib.TOMLDecodeError is a ValueError
            raise ValueError(f"config file {source!r} is not valid TOML: {e}") from None
    values.update(overrides or {})
    return cls.from_dict(values, source=source)


def parse_toml(text: str) -> dict[str, Any]:
    """tomllib (Python >= 3.11) or, on 3.10, the tomli package it came from."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ModuleNotFoundError("reading TOML needs Python >= 3.11 or `pip install tomli`") from None
    return tomllib.loads(text)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the configs of every training stage


def _fail(key: str, value: Any, problem: str, fix: str) -> NoReturn:
    raise ValueError(f"{key} = {value!r}: {problem}; {fix}")


def _check_output_dir(output_dir: str) -> None:
    if not output_dir:
        _fail("output_dir", output_dir, "is empty", "name the run's directory")
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        _fail("output_dir", output_dir, "is a file", "name a folder for the run (made if missing)")


def _check_minimums(config: DataclassInstance, **extra: int) -> None:
    """Integer keys with a lower bound: the ones every stage has, and ``extra``."""
    minimums = dict(steps=1, batch_size=1, checkpoint_every=1, keep_last=1, log_every=1, warmup_steps=0)
    for key, minimum in {**minimums, **extra}.items():
        if getattr(config, key) < minimum:
            _fail(key, getattr(config, key), f"must be >= {minimum}", f"set {key} to an integer >= {minimum}")


def _check_optimizer(config: DataclassInstance, *, recipe: str, betas: str) -> None:
    """lr, weight_decay, betas and grad_clip of an AdamW stage."""
    if not (math.isfinite(config.lr) and config.lr > 0):
        _fail("lr", config.lr, "must be a finite number > 0", "use a positive learning rate such as 2e-4")
    if not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
        _fail("weight_decay", config.weight_decay, "must be >= 0", f"use {recipe} or 0 to disable")
    if len(config.betas) != 2 or not all(0 <= b < 1 for b in config.betas):
        _fail("betas", config.betas, "needs two numbers in [0, 1)", f"use betas = {betas}")
    if not (math.isfinite(config.grad_clip) and config.grad_clip >= 0):
        _fail("grad_clip", config.grad_clip, "must be >= 0", "use 1.0, or 0 to turn clipping off")


def plain_dict(config: DataclassInstance) -> dict[str, Any]:
    """A config's JSON-ready values: tuples as lists, mappings as plain dicts."""
    d = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, Mapping):
            value = json.loads(json.dumps(value))
        d[f.name] = value
    return d


def from_plain_dict(
    cls: type[Config], d: Mapping[str, Any], source: str, aliases: Mapping[str, str] = ALIASES
) -> Config:
    """``cls(**d)``, rejecting unknown keys with a suggestion (a known alias or a close name)."""
    fields = dataclasses.fields(cls)
    known = [f.name for f in fields]
    for key in d:
        if key not in known:
            close = (
                [aliases[key]] if aliases.get(key) in known else difflib.get_close_matches(key, known, n=1)
            )
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            raise ValueError(f"{source}: unknown key {key!r}; {hint}")
    for f in fields:
        if f.name not in d and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{source}: {f.name} is required (flag --{f.name.replace('_', '-')})")
    return cls(**dict(d))


def to_toml(values: Mapping[str, Any]) -> str:
    """A TOML document of plain values (None values omitted)."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]
    return "\n".join(lines) + "\n"


def check_types(config: DataclassInstance) -> None:
    """Check every field of a config dataclass against its annotation; a ValueError names the key."""
    for f in dataclasses.fields(config):
        _check_type(f.name, getattr(config, f.name), str(f.type))


def _check_type(key: str, value: Any, kind: str) -> None:
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "an integer"
    elif kind == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        want = "a number"
    elif kind == "bool":
        ok = isinstance(value, bool)
        want = "true or false"
    elif kind == "str":
        ok = isinstance(value, str)
        want = "a string"
    elif kind == "str | None":
        ok = value is None or isinstance(value, str)
        want = "a string (or leave it out)"
    elif kind in ("str | Mapping[str, Any]", "str | Mapping[str, Any] | None"):
        ok = isinstance(value, str | Mapping) or (value is None and kind.endswith("None"))
        want = "a preset name or a table"
    elif kind == "tuple[str, ...]":
        ok = isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        want = "a list of strings"
    elif kind == "tuple[float, float]":
        ok = isinstance(value, list | tuple) and all(
            isinstance(b, int | float) and not isinstance(b, bool) for b in value
        )
        want = "a list of two numbers"
    elif kind == "Mapping[str, float]":
        ok = isinstance(value, Mapping) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()
        )
        want = "a table of NAME = WEIGHT numbers"
    else:  # pragma: no cover - a new field without a type check
        raise NotImplementedError(f"no type check for {key}: {kind}")
    if not ok:
        _fail(key, value, f"has type {type(value).__name__}", f"give {want}")


def _toml_value(value: Any) -> str:
    """A TOML literal: strings, numbers, booleans, arrays and (inline) tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # TOML basic strings share JSON's escapes
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(
            f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items() if v is not None
        )
        return "{" + items + "}" if items else "{}"
    raise ValueError(f"cannot write {type(value).__name__} {value!r} as TOML")
