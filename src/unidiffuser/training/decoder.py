"""The caption decoder's own training stage: GPT-2 and its bottleneck learn to read captions back
from CLIP text features.

UniDiffuser diffuses text as the caption decoder's latent: CLIP text features (77 x 768) reduced
token-wise by ``encode_prefix`` to 77 x 64, lifted back by ``decode_prefix`` to GPT-2's width. The
decoder is trained first, to reconstruct each caption from its own features (teacher-forced
cross-entropy through encode -> decode_prefix -> GPT-2, ``CaptionDecoder.loss``), and then frozen;
the U-ViT is trained on the latents of that frozen decoder (UNIDIFFUSER.md section 4).

So this stage must come before ``unidiffuser train`` whenever the text encoder changes: the
features of a new encoder mean nothing to the released bottleneck, the U-ViT's feature shards must
be extracted with the new decoder's ``encode``, and a U-ViT trained on one decoder's latents
cannot be sampled through another's. With the released CLIP ViT-L/14 the released decoder serves.

    unidiffuser train-decoder --captions captions.txt --text-encoder MODEL_DIR --init-from gpt2/
    unidiffuser train-decoder --config decoder.toml --resume

Data (``captions``): a .txt file (one caption per line), a .jsonl file (a "caption" or "text" field
per line) whose features the frozen text encoder computes batch by batch, or a directory of feature
shards with the text encoder's features precomputed: ``unidiffuser extract --text-features full``
writes them (the (N, 77, 768) CLIP features as "text", each row's caption in the metadata), and so
does ``write_caption_features``; other tensors in the shards are ignored. Batch k takes positions
[kB, (k+1)B) of a sequence of epochs, each a seeded permutation of the captions, so a resumed run
needs nothing but its step; dropout is seeded by the step too.

Where the decoder starts (``init_from``): the caption decoder of a model directory (any layout of
``loading.py``), a checkpoint of this stage, a transformers GPT-2 folder (pretrained GPT-2 with
'<|EOS|>' added, a new bottleneck), or nothing (a random decoder of the ``decoder`` architecture).
When the text encoder's width differs from the decoder's ``feature_dim``, ``encode_prefix``
starts afresh and everything else is kept.

Checkpoints, ``output_dir/checkpoints/step_NNNNNN/``, written atomically by
``checkpoint.write_checkpoint``: caption_decoder.safetensors (``state_dict_for_saving``, the file
of our model format), caption_decoder.json (its CaptionDecoderConfig), caption_tokenizer/,
optimizer.pt (optimizer and scheduler) and state.json (last). ``load_decoder_checkpoint`` reads one.
One process, on one device.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from ..components.caption import CaptionDecoder, CaptionDecoderConfig, tiny_gpt2_tokenizer
from ..components.caption import preset as caption_preset
from ..components.clip import ClipTextEncoder, no_transformers_bars
from ..devices import resolve_device
from .checkpoint import (
    OPTIMIZER_FILE,
    latest_checkpoint,
    load_training_state,
    read_checkpoint,
    starting_checkpoint,
    write_checkpoint,
)
from .config import DecoderTrainConfig
from .data import derive_seed, read_shard_metadata, write_feature_shard
from .trainer import RunLog, _write_text, parameter_groups, restore_schedule, warmup_factor

DECODER_FORMAT = "unidiffuser.decoder-checkpoint"
TEXT = "text"  # the shard tensor of text features (data.py's feature shards, extract.py)
WEIGHTS_FILE = "caption_decoder.safetensors"  # the names of our model format (loading.py)
CONFIG_FILE = "caption_decoder.json"
TOKENIZER_DIR = "caption_tokenizer"
# GPT2Config keys carried over from a pretrained GPT-2 besides the required ones.
GPT2_CARRIED = (
    "n_inner",
    "activation_function",
    "layer_norm_epsilon",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn",
)


# ---------------------------------------------------------------------------------------------
# Captions and their features


def read_captions(path: str | Path) -> list[str]:
    """Captions from a .txt file (one per line, blank lines skipped) or a .jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"captions = {str(path)!r}: no such file or directory")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"captions = {str(path)!r}: not UTF-8 text ({err}); give a .txt or .jsonl file"
        ) from None
    lines = [line for line in text.splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        captions = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                captions.append(str(record["caption"] if "caption" in record else record["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(
                    f'captions = {str(path)!r}: line {number} is no JSON object with a "caption" or "text"'
                ) from None
        lines = captions
    if not lines:
        raise ValueError(f"captions = {str(path)!r}: holds no caption")
    return lines


def write_caption_features(path: str | Path, features: Tensor, captions: Sequence[str]) -> Path:
    """Write one feature shard of text features (N, L, D) and their N captions, atomically.

    The shard format of ``data.write_feature_shard`` (what ``unidiffuser extract --text-features
    full`` writes), holding only the text.
    """
    if features.ndim != 3 or features.shape[0] != len(captions) or not features.is_floating_point():
        raise ValueError(
            f"features: expected a float tensor (N, L, D) with N = {len(captions)} captions, got "
            f"{features.dtype} {tuple(features.shape)}"
        )
    meta = {"captions": list(captions), "text_features": "full"}
    return write_feature_shard(path, {TEXT: features.detach().cpu()}, meta)


class CaptionTexts:
    """Captions alone: the trainer computes their features with the frozen text encoder."""

    feature_dim = None

    def __init__(self, captions: Sequence[str]):
        self.captions = list(captions)

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, indices: Sequence[int]) -> tuple[list[str], Tensor | None]:
        return [self.captions[i] for i in indices], None


class CaptionFeatureShards:
    """A directory of feature shards with full text features and captions, read row by row."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        self.files = sorted(directory.glob("*.safetensors"))
        if not self.files:
            raise ValueError(f"captions = {str(directory)!r}: a directory without *.safetensors shards")
        self.captions: list[str] = []
        self.rows: list[tuple[int, int]] = []  # (file, row) of each caption
        shapes = set()
        for number, file in enumerate(self.files):
            try:
                meta = read_shard_metadata(file)
            except Exception as e:  # unreadable, or a foreign file: say which and why
                raise ValueError(f"captions: {file} is no feature shard ({type(e).__name__}: {e})") from None
            if meta.get("text_features") == "reduced":
                raise ValueError(
                    f"captions: {file} holds the caption decoder's reduced text latents, not the text "
                    "encoder's features; extract with --text-features full"
                )
            count, info = meta["count"], meta["tensors"].get(TEXT)
            if info is None or len(info["shape"]) != 2 or len(meta.get("captions", ())) != count:
                raise ValueError(
                    f"captions: {file} needs a {TEXT!r} tensor (N, L, D) and N captions in its metadata; it "
                    f"has tensors {sorted(meta['tensors'])} and {len(meta.get('captions', ()))} captions for "
                    f"{count} rows"
                )
            shapes.add(tuple(info["shape"]))
            self.captions += [str(c) for c in meta["captions"]]
            self.rows += [(number, row) for row in range(count)]
        if len(shapes) != 1:
            raise ValueError(
                f"captions = {str(directory)!r}: shards of different text shapes {sorted(shapes)}"
            )
        (self.shape,) = shapes
        self.feature_dim = self.shape[-1]

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: Sequence[int]) -> tuple[list[str], Tensor]:
        features = torch.empty(len(indices), *self.shape)
        by_file: dict[int, list[tuple[int, int]]] = {}
        for slot, i in enumerate(indices):
            file, row = self.rows[i]
            by_file.setdefault(file, []).append((slot, row))
        for file, wanted in by_file.items():
            with safe_open(str(self.files[file]), "pt") as f:
                rows = f.get_slice(TEXT)
                for slot, row in wanted:
                    features[slot] = rows[row : row + 1][0].float()
        return [self.captions[i] for i in indices], features


def open_captions(path: str | Path) -> CaptionTexts | CaptionFeatureShards:
    """The data named by ``captions``: a directory of feature shards, or a captions file."""
    return CaptionFeatureShards(path) if Path(path).is_dir() else CaptionTexts(read_captions(path))


class CaptionOrder:
    """Which captions batch k holds: positions [kB, (k+1)B) of a sequence of seeded permutations."""

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self._epochs: dict[int, Tensor] = {}

    def permutation(self, epoch: int) -> Tensor:
        if epoch not in self._epochs:
            if len(self._epochs) > 1:
                self._epochs.pop(min(self._epochs))
            g = torch.Generator().manual_seed(derive_seed(self.seed, "captions", epoch))
            self._epochs[epoch] = torch.randperm(self.size, generator=g)
        return self._epochs[epoch]

    def batch(self, step: int) -> list[int]:
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [int(self.permutation(p // self.size)[p % self.size]) for p in positions]


# ---------------------------------------------------------------------------------------------
# Where the text encoder and the decoder come from


def load_text_encoder(path: str | Path) -> ClipTextEncoder:
    """The CLIP text encoder of a model directory (any layout) or of a transformers CLIP folder.

    Only the text encoder is read (``loading.load_components``), never the rest of the model.
    """
    from ..loading import load_components

    path = Path(path)
    if (path / "config.json").is_file():
        return ClipTextEncoder.from_pretrained_dir(path)
    try:
        return load_components(path, ["text_encoder"]).text_encoder
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(
            f"text_encoder = {str(path)!r}: not a CLIP folder or a model directory: {e}"
        ) from None


def load_decoder_checkpoint(path: str | Path) -> CaptionDecoder:
    """A caption decoder from a checkpoint of this stage (step_N directory), trainable."""
    from ..loading import load_tokenizer, read_weights

    ckpt = read_checkpoint(path, kind=DECODER_FORMAT)
    config = CaptionDecoderConfig.from_dict(json.loads((ckpt.path / CONFIG_FILE).read_text()))
    tokenizer = load_tokenizer(ckpt.path / TOKENIZER_DIR)
    return CaptionDecoder.from_state_dict(read_weights(ckpt.path / WEIGHTS_FILE), config, tokenizer)


def _new_config(config: DecoderTrainConfig, feature_dim: int) -> CaptionDecoderConfig:
    if isinstance(config.decoder, str):
        try:
            base = caption_preset(config.decoder)
        except ValueError as e:
            raise ValueError(f"decoder = {config.decoder!r}: {e}") from None
    else:
        try:
            base = CaptionDecoderConfig.from_dict(config.decoder)
        except (TypeError, ValueError) as e:
            raise ValueError(f"decoder = {{...}}: not a valid CaptionDecoderConfig ({e})") from None
    return replace(base, feature_dim=feature_dim)


def _random_decoder(config: DecoderTrainConfig, feature_dim: int) -> CaptionDecoder:
    from ..loading import load_tokenizer, with_eos

    decoder_config = _new_config(config, feature_dim)
    if config.tokenizer:
        tokenizer = with_eos(load_tokenizer(Path(config.tokenizer)))
    elif config.decoder == "tiny":
        tokenizer = tiny_gpt2_tokenizer()
    else:
        raise ValueError(
            f"decoder = {config.decoder!r} from scratch needs a tokenizer: give tokenizer (the GPT-2 "
            "tokenizer folder), or init_from a GPT-2 folder or a model directory"
        )
    return CaptionDecoder.random(decoder_config, tokenizer, seed=config.seed)


def _gpt2_decoder(config: DecoderTrainConfig, path: Path, feature_dim: int) -> CaptionDecoder:
    """Pretrained GPT-2 (its token table grown by '<|EOS|>') under a new bottleneck."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ..loading import load_tokenizer, with_eos

    tokenizer = with_eos(load_tokenizer(path))
    with no_transformers_bars():
        gpt = GPT2LMHeadModel.from_pretrained(str(path), local_files_only=True)
    gpt.resize_token_embeddings(len(tokenizer))
    defaults = GPT2Config()
    gpt2 = {k: getattr(gpt.config, k) for k in ("n_embd", "n_layer", "n_head", "n_positions")}
    gpt2["vocab_size"] = len(tokenizer)
    gpt2.update(
        {k: getattr(gpt.config, k) for k in GPT2_CARRIED if getattr(gpt.config, k) != getattr(defaults, k)}
    )
    decoder_config = replace(_new_config(config, feature_dim), gpt2=gpt2)
    decoder = CaptionDecoder.random(decoder_config, tokenizer, seed=config.seed)
    decoder.gpt.load_state_dict(gpt.state_dict(), strict=True)
    return decoder


def _with_feature_dim(decoder: CaptionDecoder, feature_dim: int, seed: int) -> CaptionDecoder:
    """The same decoder for features of another width: a new encode_prefix, the rest kept."""
    config = replace(decoder.config, feature_dim=feature_dim)
    fresh = CaptionDecoder.random(config, decoder.tokenizer, seed=seed)
    kept = {k: v for k, v in decoder.state_dict().items() if not k.startswith("encode_prefix.")}
    fresh.load_state_dict({**fresh.state_dict(), **kept}, strict=True)
    return fresh


def initial_decoder(
    config: DecoderTrainConfig, feature_dim: int | None, log: RunLog, resume_from: Path | None = None
) -> tuple[CaptionDecoder, ClipTextEncoder | None]:
    """The decoder to start from and, when the captions are text, the frozen text encoder.

    Args:
        config: the run's options (init_from, text_encoder, decoder, tokenizer, seed).
        feature_dim: the width of precomputed features, or None when the captions are text.
        log: where to say what was chosen.
        resume_from: a checkpoint of this run to continue from instead of init_from.
    """
    source = Path(config.init_from) if config.init_from else None
    if source is not None and not source.exists():
        raise ValueError(f"init_from = {config.init_from!r}: no such file or directory")
    model_dir = source if source is not None and _is_model_dir(source) else None
    encoder = None
    if feature_dim is None:  # captions as text: the text encoder gives the features
        if config.text_encoder:
            encoder = load_text_encoder(config.text_encoder)
        elif model_dir is not None:
            encoder = load_text_encoder(model_dir)
        else:
            raise ValueError(
                "text_encoder: the captions are text, so a text encoder must compute their features; give "
                "text_encoder (a model directory or a CLIP folder), or init_from a model directory"
            )
        feature_dim = encoder.hidden_size

    if resume_from is not None:
        decoder = load_decoder_checkpoint(resume_from)
        if decoder.config.feature_dim != feature_dim:
            raise ValueError(
                f"resume: {resume_from} takes {decoder.config.feature_dim}-wide features, the captions give "
                f"{feature_dim}; resume with the run's own config"
            )
        return decoder.requires_grad_(True).train(), encoder
    if source is None:
        decoder = _random_decoder(config, feature_dim)
        log.note(f"starting from a random caption decoder ({config.decoder!r}, feature_dim {feature_dim})")
    elif _is_decoder_run(source):
        decoder = load_decoder_checkpoint(_decoder_checkpoint_path(source))
        log.note(f"starting from the caption decoder of {source}")
    elif _is_gpt2(source):
        decoder = _gpt2_decoder(config, source, feature_dim)
        log.note(
            f"starting from pretrained GPT-2 ({source}) under a new bottleneck (feature_dim {feature_dim})"
        )
    elif model_dir is not None:
        from ..loading import load_components

        try:  # the caption decoder alone: the model's other weights stay unread
            decoder = load_components(source, ["caption_decoder"]).caption_decoder
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"init_from = {config.init_from!r}: {e}") from None
        log.note(f"starting from the caption decoder of the model {source}")
    else:
        raise ValueError(
            f"init_from = {config.init_from!r}: not a model directory, a train-decoder checkpoint or run "
            "directory, or a transformers GPT-2 folder"
        )
    if decoder.config.feature_dim != feature_dim:
        log.note(
            f"the text features are {feature_dim}-wide, the decoder's encode_prefix takes "
            f"{decoder.config.feature_dim}: a new encode_prefix, GPT-2 and decode_prefix kept"
        )
        decoder = _with_feature_dim(decoder, feature_dim, config.seed)
    return decoder.requires_grad_(True).train(), encoder


def _is_model_dir(path: Path) -> bool:
    from ..loading import detect_layout

    try:
        detect_layout(path)
    except (ValueError, FileNotFoundError):
        return False
    return True


def _is_decoder_run(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "checkpoints").is_dir()


def _decoder_checkpoint_path(path: Path) -> Path:
    if (path / "state.json").is_file():
        return path
    newest = latest_checkpoint(path / "checkpoints", kind=DECODER_FORMAT)
    if newest is None:
        raise ValueError(f"init_from = {str(path)!r}: a run directory without a complete decoder checkpoint")
    return newest.path


def _is_gpt2(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "gpt2"


# ---------------------------------------------------------------------------------------------
# The training loop


@dataclass
class DecoderTrainResult:
    """What a finished run leaves: the decoder (on the training device) and where."""

    run_dir: Path
    step: int
    checkpoint: Path | None
    decoder: CaptionDecoder


def save_decoder_checkpoint(
    directory: Path,
    step: int,
    decoder: CaptionDecoder,
    training: Mapping,
    config: DecoderTrainConfig,
    keep_last: int | None = None,
) -> Path:
    """Write ``directory/step_N`` atomically: weights, decoder config, tokenizer, optimizer, state."""
    decoder_config = decoder.config.to_dict()
    meta = {"format": DECODER_FORMAT, "step": str(step), "decoder_config": json.dumps(decoder_config)}

    def write_files(tmp: Path) -> None:
        weights = {k: v.detach().cpu().contiguous() for k, v in decoder.state_dict_for_saving().items()}
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata=meta)
        (tmp / CONFIG_FILE).write_text(json.dumps(decoder_config, indent=2) + "\n")
        decoder.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        torch.save(dict(training), tmp / OPTIMIZER_FILE)

    state = {"config": config.to_dict(), "decoder_config": decoder_config}
    return write_checkpoint(directory, step, write_files, state, kind=DECODER_FORMAT, keep_last=keep_last)


def train_decoder(config: DecoderTrainConfig) -> DecoderTrainResult:
    """Train (or resume) the caption decoder as ``config`` says."""
    device = resolve_device(config.device)
    run_dir = Path(config.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    log = RunLog(run_dir, enabled=True)

    # Where to start: the newest complete checkpoint (resume), or init_from, or a random decoder.
    start = starting_checkpoint(
        ckpt_dir, resume=config.resume, output_dir=config.output_dir, note=log.note, kind=DECODER_FORMAT
    )
    data = open_captions(config.captions)
    decoder, encoder = initial_decoder(config, data.feature_dim, log, start.path if start else None)
    _write_text(run_dir / "config.toml", _toml(config))
    resolved = {"train_decoder": config.to_dict(), "decoder_config": decoder.config.to_dict()}
    resolved["captions"] = len(data)
    _write_text(run_dir / "config.json", json.dumps(resolved, indent=2) + "\n")

    decoder.to(device)
    if encoder is not None:
        encoder.to(device)
    optimizer = torch.optim.AdamW(
        parameter_groups(decoder, config.weight_decay), lr=config.lr, betas=config.betas
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: warmup_factor(k, config.warmup_steps))
    step = 0
    if start is not None:
        training = load_training_state(start)
        optimizer.load_state_dict(training["optimizer"])
        restore_schedule(optimizer, scheduler, training["scheduler"], config.lr)
        step = start.step
        log.note(f"resumed from {start.path} at step {step}")
    n_params = sum(p.numel() for p in decoder.parameters())
    log.note(
        f"caption decoder: {n_params:,} parameters on {device} | {len(data):,} captions | batch "
        f"{config.batch_size} | features {'from the text encoder' if encoder is not None else 'precomputed'}"
    )

    order = CaptionOrder(len(data), config.batch_size, config.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.mixed_precision == "bf16")
    window, window_steps, window_start = 0.0, 0, time.perf_counter()
    grad_norm = torch.zeros(())
    last_checkpoint = start.path if start is not None else None  # a finished run resumed stays there
    log.bar = tqdm(total=config.steps, initial=step, desc="caption decoder", unit="step", dynamic_ncols=True)
    while step < config.steps:
        torch.manual_seed(derive_seed(config.seed, "dropout", step))  # a resumed run drops the same units
        captions, features = data.batch(order.batch(step))
        if features is None:
            with torch.no_grad(), autocast:
                features = encoder(captions)
        token_ids, mask = decoder.tokenize(captions, max_length=config.max_length)
        with autocast:
            prefix = decoder.encode(features.to(device).float())  # (B, L, prefix_dim)
            loss = decoder.loss(prefix, token_ids.to(device), mask.to(device))
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(decoder.parameters(), config.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        window += loss.item()
        window_steps += 1
        log.bar.update(1)

        if step % config.log_every == 0 or step == config.steps:
            elapsed = time.perf_counter() - window_start
            metrics = {
                "loss": window / window_steps,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "captions_per_s": config.batch_size * window_steps / elapsed,
            }
            log.metrics(step, metrics)
            log.note(
                f"step {step}/{config.steps}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
                f"grad {metrics['grad_norm']:.3f}  {metrics['captions_per_s']:.1f} captions/s"
            )
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(
                    f"the loss is {metrics['loss']} at step {step}; lower lr or raise warmup_steps, and "
                    "resume from the last checkpoint"
                )
            window, window_steps, window_start = 0.0, 0, time.perf_counter()

        if step % config.checkpoint_every == 0 or step == config.steps:
            training = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
            }
            last_checkpoint = save_decoder_checkpoint(
                ckpt_dir, step, decoder, training, config, keep_last=config.keep_last
            )
            log.note(f"saved {last_checkpoint}")
    log.close()
    return DecoderTrainResult(run_dir, step, last_checkpoint, decoder)


def _toml(config: DecoderTrainConfig) -> str:
    from .config import to_toml

    return to_toml(config.to_dict())
