"""The options of a training run: one frozen dataclass, read from TOML and/or flags.

Defaults follow the paper's recipe (UNIDIFFUSER.md section 4, U-ViT's optimiser): AdamW with lr
2e-4, weight decay 0.03, betas (0.9, 0.9), 5000 linear warm-up steps, EMA 0.9999.

Every check raises a ValueError that names the key, the value and a fix. ``load_config`` merges a
TOML file with overrides (flags win); ``TrainConfig.to_toml`` writes a file that loads back to the
same config.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from ..network import PRESETS, UViTConfig
from ..objective import WEIGHTINGS

MIXED_PRECISION = ("no", "bf16", "fp16")
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


@dataclass(frozen=True)
class TrainConfig:
    """One training run. See ``FIELD_HELP`` (shown by ``unidiffuser train --help``) for each key."""

    model: str | Mapping[str, Any] = "small"
    data: str = TOY
    output_dir: str = "runs/train"
    steps: int = 10_000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.03
    betas: tuple[float, float] = (0.9, 0.9)
    warmup_steps: int = 5000
    ema_decay: float = 0.9999
    grad_clip: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    weighting: str = "modality"
    loss_weights: Mapping[str, float] = field(default_factory=dict)
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 50
    seed: int = 0
    init_from: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "loss_weights", {k: float(v) for k, v in self.loss_weights.items()})
        if isinstance(self.model, Mapping):  # one canonical, JSON-ready form of an inline config
            object.__setattr__(self, "model", json.loads(json.dumps(self.model_config().to_dict())))
        for key, minimum in (
            ("steps", 1),
            ("batch_size", 1),
            ("grad_accum", 1),
            ("checkpoint_every", 1),
            ("keep_last", 1),
            ("log_every", 1),
            ("warmup_steps", 0),
        ):
            if getattr(self, key) < minimum:
                _fail(
                    key, getattr(self, key), f"must be >= {minimum}", f"set {key} to an integer >= {minimum}"
                )
        if not (math.isfinite(self.lr) and self.lr > 0):
            _fail("lr", self.lr, "must be a finite number > 0", "use a positive learning rate such as 2e-4")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            _fail("weight_decay", self.weight_decay, "must be >= 0", "use 0.03 (the recipe) or 0 to disable")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            _fail("betas", self.betas, "needs two numbers in [0, 1)", "use betas = [0.9, 0.9]")
        if not 0 <= self.ema_decay < 1:
            _fail("ema_decay", self.ema_decay, "must lie in [0, 1)", "use 0.9999 (the recipe)")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            _fail("grad_clip", self.grad_clip, "must be >= 0", "use 1.0, or 0 to turn clipping off")
        if self.mixed_precision not in MIXED_PRECISION:
            _fail(
                "mixed_precision",
                self.mixed_precision,
                f"is not one of {MIXED_PRECISION}",
                'use "bf16" on recent GPUs, "fp16" on older ones, "no" on CPU',
            )
        if self.weighting not in WEIGHTINGS:
            _fail("weighting", self.weighting, f"is not one of {WEIGHTINGS}", 'use "modality" (default)')
        if not self.data:
            _fail("data", self.data, "is empty", f'use "{TOY}" or the directory of feature shards')
        if not self.output_dir:
            _fail("output_dir", self.output_dir, "is empty", "name the run's directory")
        if self.batch_size % self.grad_accum:
            _fail(
                "batch_size",
                self.batch_size,
                f"is not divisible by grad_accum={self.grad_accum}",
                "batch_size is the global batch of one optimizer step; make it a multiple of grad_accum",
            )
        diffused = [m.name for m in self.model_config().diffused]
        for name, weight in self.loss_weights.items():
            if name not in diffused:
                _fail(f"loss_weights.{name}", weight, "names no diffused modality", f"use one of {diffused}")
            if not (math.isfinite(weight) and weight >= 0):
                _fail(f"loss_weights.{name}", weight, "must be >= 0", "use a non-negative factor such as 1.0")

    def model_config(self) -> UViTConfig:
        """The network architecture: a preset, the toy world's network, or an inline config."""
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
        """JSON-ready values (``model`` as given: a name or a dict)."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["loss_weights"] = dict(self.loss_weights)
        d["model"] = self.model if isinstance(self.model, str) else dict(self.model)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Build from plain values, rejecting unknown keys with a suggestion."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in known:
                close = [ALIASES[key]] if key in ALIASES else difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
                raise ValueError(f"{source}: unknown key {key!r}; {hint}")
        return cls(**dict(d))

    def to_toml(self) -> str:
        """A TOML document that ``load_config`` reads back to this config (None values omitted)."""
        lines = []
        for key, value in self.to_dict().items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


FIELD_HELP: dict[str, str] = {
    "model": f"network: a preset name ({', '.join([*PRESETS, TOY])}) or an inline UViTConfig table",
    "data": f'training data: "{TOY}" (the toy world) or a directory of *.safetensors feature shards',
    "output_dir": "run directory: resolved config, log, checkpoints/",
    "steps": "optimizer steps to train to (a resumed run continues up to this number)",
    "batch_size": "global batch of one optimizer step, over all processes and accumulation steps",
    "grad_accum": "micro-batches accumulated per optimizer step",
    "lr": "peak learning rate of AdamW",
    "weight_decay": "AdamW weight decay (never on norms, biases, position embeddings, embedding tables)",
    "betas": "AdamW betas",
    "warmup_steps": "steps of linear learning-rate warm-up from 0",
    "ema_decay": "decay of the exponential moving average of the weights (used for sampling)",
    "grad_clip": "clip the global gradient norm to this; 0 turns clipping off",
    "mixed_precision": f"autocast precision, one of {', '.join(MIXED_PRECISION)}",
    "gradient_checkpointing": "recompute block activations in the backward pass to save memory",
    "weighting": f"loss weighting between modalities, one of {', '.join(WEIGHTINGS)}",
    "loss_weights": "extra loss factor per diffused modality, NAME=WEIGHT",
    "checkpoint_every": "save a checkpoint every this many steps (and at the last step)",
    "keep_last": "keep this many newest checkpoints",
    "log_every": "log losses, learning rate and throughput every this many steps",
    "seed": "seed of the initial weights, the data order, the timesteps and the noise",
    "init_from": "fine-tune: start from these weights (a checkpoint directory or a .safetensors file)",
    "resume": "continue from the newest complete checkpoint in output_dir",
}


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Read a TOML file (optional) and apply overrides on top of it.

    Args:
        path: a TOML file of TrainConfig keys.
        overrides: values that replace the file's (flags given on the command line).

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
    return TrainConfig.from_dict(values, source=source)


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
# Helpers


def _fail(key: str, value: Any, problem: str, fix: str) -> NoReturn:
    raise ValueError(f"{key} = {value!r}: {problem}; {fix}")


_TYPES = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def _check_type(key: str, value: Any) -> None:
    kind = _TYPES[key]
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
    elif key == "model":
        ok = isinstance(value, str | Mapping)
        want = "a preset name or a table"
    elif key == "betas":
        ok = isinstance(value, list | tuple) and all(
            isinstance(b, int | float) and not isinstance(b, bool) for b in value
        )
        want = "a list of two numbers"
    elif key == "loss_weights":
        ok = isinstance(value, Mapping) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()
        )
        want = "a table of NAME = WEIGHT numbers"
    else:  # pragma: no cover - a new field without a type check
        raise NotImplementedError(f"no type check for {key}")
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
