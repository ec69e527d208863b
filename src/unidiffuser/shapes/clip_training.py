"""A small CLIP trained contrastively on the shapes world: the stage that makes our two encoders.

``train_clip`` trains transformers' ``CLIPModel`` (a small config: ``SHAPES_VISION`` and
``SHAPES_TEXT``) with CLIP's symmetric InfoNCE and a learned temperature on freshly sampled
(render(scene), caption(scene)) pairs of the train split, then writes the two towers the rest of
the recipe uses::

    out_dir/image_encoder/    CLIPVisionModelWithProjection  (ClipImageEmbedder.from_pretrained_dir)
    out_dir/text_encoder/     CLIPTextModel + the tokenizer   (ClipTextEncoder.from_pretrained_dir)
    out_dir/clip/             the whole CLIPModel + tokenizer, for retrieval evaluation
    out_dir/clip_training.json  the resolved options, the final loss and retrieval accuracy
    out_dir/checkpoints/step_NNNNNN/  resumable checkpoints (``training.checkpoint.write_checkpoint``)

Batches are a pure function of (seed, step), so a resumed run sees exactly the batches the
uninterrupted run would have. Texts are padded with <|endoftext|> and fed without an attention
mask, as ``ClipTextEncoder`` feeds them, so the trained text features are the ones used.

Measured on a 2-core CPU (fp32, batch 128, 2 threads), seed 0: the defaults (5000 steps of 128 at
32 px) took 355 s (14 steps/s; 64 px: 13 steps/s), final loss 0.040, and reached a held-out
image -> text top-1 of 0.992 among 16 candidates (seen combinations: 0.998; chance 0.0625); 3000
steps took 223 s for 0.986. With another process on the cores, ops this small stall on thread
synchronisation: ``torch.set_num_threads(1)`` then runs at about 9 steps/s instead of crawling.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from ..components.clip import (
    CLIP_MEAN,
    CLIP_STD,
    ClipImageEmbedder,
    ClipTextEncoder,
    ImageEmbedderConfig,
    TextEncoderConfig,
    no_transformers_bars,
    whole_clip_config,
)
from .captions import caption
from .stage import StageCheckpoints, warmup_cosine, write_dir, write_text_atomic
from .tokenizer import CONTEXT_LENGTH, build_clip_tokenizer
from .world import render_array, sample_scene

CLIP_FORMAT = "unidiffuser.shapes-clip-checkpoint"
MODEL_FILE = "clip.safetensors"
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps its temperature so logits stay below 100

DEFAULT_STEPS = 5000
DEFAULT_BATCH_SIZE = 128
DEFAULT_LR = 1e-3
# The grays colourless pairs are painted in, [low, high): far from the gray background (96) and the
# gradient's channels (at most 90), so the outline stays as clear as in a coloured render. The
# lightest is the palette's white, a colour every shape is shown in.
COLOURLESS_GRAYS = (150, 256)


def vision_config(image_size: int = 32) -> ImageEmbedderConfig:
    """The image tower: 16 patches of 8 px at 32 px, 16 of 16 px at 64 px; 64-d embedding."""
    if image_size not in (32, 64):
        raise ValueError(f"image_size={image_size}: expected 32 or 64")
    return ImageEmbedderConfig(
        hidden_size=96,
        intermediate_size=384,
        num_layers=3,
        num_heads=4,
        image_size=image_size,
        patch_size=image_size // 4,
        projection_dim=64,
    )


def text_config(vocab_size: int, bos_token_id: int, eos_token_id: int) -> TextEncoderConfig:
    """The text tower: width 64 (the text feature width UniDiffuser sees), 2 layers."""
    return TextEncoderConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        max_positions=CONTEXT_LENGTH,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


# ---------------------------------------------------------------------------------------------
# Data


def pixels(arrays: np.ndarray) -> Tensor:
    """Rendered (B, S, S, 3) uint8 -> (B, 3, S, S) float32 normalised as ``ClipImageEmbedder.preprocess``."""
    x = arrays.astype(np.float32) / np.float32(255.0)
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # (B, 3, S, S)


def sample_batch(
    rng: np.random.Generator, batch_size: int, image_size: int, split: str = "train", colourless: float = 0.0
) -> tuple[np.ndarray, list[str]]:
    """Fresh scenes: their renders (B, S, S, 3) uint8 and one random caption each.

    ``colourless``: the share of pairs (each drawn) whose objects are painted in random grays
    (``COLOURLESS_GRAYS``) and whose captions leave colour out. Such a pair pins a shape to its
    outline alone, whatever colour it is drawn in; no held-out pair is ever shown. With 0 the rng
    draws nothing for it.
    """
    scenes = [sample_scene(rng, split) for _ in range(batch_size)]
    plain = np.ones(batch_size, dtype=bool) if colourless == 0 else rng.random(batch_size) >= colourless
    images, texts = [], []
    for s, coloured in zip(scenes, plain, strict=True):
        grays = (
            None
            if coloured
            else [(v, v, v) for v in rng.integers(*COLOURLESS_GRAYS, size=len(s.objects)).tolist()]
        )
        images.append(render_array(s, image_size, rgb=grays))
        texts.append(caption(s, rng, colour=bool(coloured)))
    return np.stack(images), texts


def tokenize(tokenizer: CLIPTokenizer, texts: list[str]) -> Tensor:
    """Strings -> (B, L) ids padded with <|endoftext|> to the longest, L <= ``CONTEXT_LENGTH``.

    ``ClipTextEncoder`` pads to ``CONTEXT_LENGTH``; under the causal mask the outputs at the
    prompt's positions and the pooled output (at the first <|endoftext|>) do not depend on how much
    padding follows, so padding to the longest trains the same features for less.
    """
    return tokenizer(
        texts, padding="longest", max_length=CONTEXT_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids


def _batch_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step])  # batches depend on (seed, step) only: resumable


# ---------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def retrieval_accuracy(
    model: CLIPModel,
    tokenizer: CLIPTokenizer,
    *,
    split: str = "heldout",
    groups: int = 32,
    group_size: int = 16,
    image_size: int | None = None,
    seed: int = 1234,
) -> float:
    """Image -> text top-1 accuracy among ``group_size`` candidates (chance 1/group_size).

    Each group is ``group_size`` fresh scenes of ``split`` with one random caption each; an image
    scores if its own caption has the highest similarity in its group.
    """
    was_training = model.training
    model.eval()
    device = model.logit_scale.device
    size = image_size or model.config.vision_config.image_size
    rng = np.random.default_rng(seed)
    correct = 0
    for _ in range(groups):
        images, texts = sample_batch(rng, group_size, size, split)
        out = model(input_ids=tokenize(tokenizer, texts).to(device), pixel_values=pixels(images).to(device))
        correct += int((out.logits_per_image.argmax(-1).cpu() == torch.arange(group_size)).sum())
    model.train(was_training)
    return correct / (groups * group_size)


# ---------------------------------------------------------------------------------------------
# Export


def towers(model: CLIPModel, tokenizer: CLIPTokenizer) -> tuple[ClipImageEmbedder, ClipTextEncoder]:
    """The CLIPModel's towers as frozen component wrappers (copies on the CPU, strict key maps)."""
    vision = CLIPVisionModelWithProjection(model.config.vision_config)
    vision.vision_model.load_state_dict(model.vision_model.state_dict(), strict=True)
    vision.visual_projection.load_state_dict(model.visual_projection.state_dict(), strict=True)
    text = CLIPTextModel(model.config.text_config)
    text.load_state_dict(model.text_model.state_dict(), strict=True)
    return ClipImageEmbedder(vision.to("cpu")), ClipTextEncoder(text.to("cpu"), tokenizer)


# ---------------------------------------------------------------------------------------------
# Training


def train_clip(
    out_dir: str | Path,
    *,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    image_size: int = 32,
    seed: int = 0,
    device: str | torch.device = "cpu",
    lr: float = DEFAULT_LR,
    weight_decay: float = 0.1,
    checkpoint_every: int = 500,
    keep_last: int = 2,
    tokenizer_seed: int = 0,
    eval_groups: int = 32,
    colourless: float = 0.0,
    progress: bool = True,
) -> tuple[ClipImageEmbedder, ClipTextEncoder]:
    """Train the small CLIP on the shapes world and write its towers; resumes from ``out_dir``.

    Args:
        out_dir: the run directory (see the module docstring); if it holds checkpoints of this
            stage, training continues from the newest one (its options must agree).
        steps: optimizer steps in all.
        batch_size: image-caption pairs per step (each pair's caption is the negative of the others).
        image_size: 32 or 64 pixels.
        seed: initial weights and the data stream.
        device: where to train ("cpu", "cuda", ...).
        lr: AdamW peak learning rate (linear warmup over 5% of the steps, then cosine).
        weight_decay: AdamW weight decay (not on biases, norms, embeddings or the temperature).
        checkpoint_every: steps between checkpoints (the last step is always saved).
        keep_last: checkpoints kept.
        tokenizer_seed: seed of ``build_clip_tokenizer``.
        eval_groups: groups of 16 held-out scenes for the final retrieval accuracy; 0 skips it.
        colourless: the share of pairs drawn in grays and captioned without colours
            (``sample_batch``), in [0, 1).
        progress: show a progress bar.

    Returns:
        The trained (image embedder, text encoder), frozen, on the CPU.
    """
    if not 0.0 <= colourless < 1.0:
        raise ValueError(f"colourless={colourless}: expected a share in [0, 1), such as 0.5")
    if steps < 1 or batch_size < 2 or checkpoint_every < 1:
        raise ValueError(
            f"steps={steps}, batch_size={batch_size}, checkpoint_every={checkpoint_every}: "
            "need steps >= 1, batch_size >= 2, checkpoint_every >= 1"
        )
    out_dir = Path(out_dir)
    device = torch.device(device)
    tokenizer = build_clip_tokenizer(tokenizer_seed)
    vision = vision_config(image_size)
    text = text_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    options = {
        "steps": steps,
        "batch_size": batch_size,
        "image_size": image_size,
        "seed": seed,
        "lr": lr,
        "weight_decay": weight_decay,
        "tokenizer_seed": tokenizer_seed,
        "colourless": colourless,
        "vision_config": dataclasses.asdict(vision),
        "text_config": dataclasses.asdict(text),
    }

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(whole_clip_config(vision, text))
    model.to(device).train()
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embedding" in n]
    decay = [p for n, p in model.named_parameters() if not (p.ndim < 2 or "embedding" in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))

    # Resume from the newest complete checkpoint of this run, if any.
    checkpoints = StageCheckpoints(out_dir, CLIP_FORMAT, MODEL_FILE, options, keep_last)
    start, losses = checkpoints.resume(model, optimizer, scheduler, device)

    bar = tqdm(total=steps, initial=start, desc="clip", disable=not progress, dynamic_ncols=True)
    for step in range(start, steps):
        images, texts = sample_batch(_batch_rng(seed, step), batch_size, image_size, colourless=colourless)
        out = model(
            input_ids=tokenize(tokenizer, texts).to(device),
            pixel_values=pixels(images).to(device),
            return_loss=True,
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        losses.append(out.loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", T=f"{1 / model.logit_scale.exp().item():.3f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            checkpoints.save(step + 1, model, optimizer, scheduler, losses)
    bar.close()

    model.eval()
    accuracy = retrieval_accuracy(model, tokenizer, groups=eval_groups) if eval_groups > 0 else None
    image_encoder, text_encoder = towers(model, tokenizer)
    write_dir(out_dir / "image_encoder", image_encoder.save_pretrained)
    write_dir(out_dir / "text_encoder", text_encoder.save_pretrained)

    def save_clip(path: Path) -> None:
        with no_transformers_bars():
            model.save_pretrained(path)
        tokenizer.save_pretrained(path)

    write_dir(out_dir / "clip", save_clip)
    report = {
        **options,
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        "heldout_retrieval_top1_of_16": accuracy,
    }
    write_text_atomic(out_dir / "clip_training.json", json.dumps(report, indent=2) + "\n")
    return image_encoder, text_encoder


def load_clip(path: str | Path) -> tuple[CLIPModel, CLIPTokenizer]:
    """The whole CLIPModel and its tokenizer from ``out_dir/clip`` (local files only)."""
    from transformers import AutoTokenizer

    with no_transformers_bars():
        model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path, local_files_only=True)


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_STEPS",
    "load_clip",
    "retrieval_accuracy",
    "sample_batch",
    "text_config",
    "towers",
    "train_clip",
    "vision_config",
]
