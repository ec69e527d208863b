"""A small AutoencoderKL trained on the shapes world: the stage that makes the image latent.

``train_vae`` trains diffusers' ``AutoencoderKL`` (``SHAPES_VAE``: 64 px -> 16 x 16 x 4, three levels
of 16/32/64 channels) to reconstruct freshly rendered scenes of the train split. The loss is
the mean squared error plus an L1 term on the pixels, object pixels weighted 10 times a background
pixel's (objects cover a few percent of a picture and carry every attribute), and the KL divergence of the posterior to a
standard normal with a small weight, as latent diffusion's autoencoders use it: enough to keep the
latent smooth and its scale bounded, small enough to keep the colours and outlines exact. After
training, ``scale_factor`` is set to one over the standard deviation of the posterior means over
2048 training scenes, so that the scaled latents the U-ViT diffuses have unit variance (latent
diffusion's choice of 0.18215 for its KL-f8 autoencoder was made the same way).

    out_dir/autoencoder.safetensors   ImageAutoencoder.save (the config, scale included, in its metadata)
    out_dir/vae_training.json         the options, the final loss, the scale and the parse accuracy
    out_dir/checkpoints/step_NNNNNN/  resumable checkpoints (``training.checkpoint.write_checkpoint``)

The proof that the latent keeps what matters: ``roundtrip_accuracy`` encodes and decodes scenes
and reads them back with ``parse_image``; the report states it for held-out scenes.

Batches are a pure function of (seed, step), so a resumed run sees exactly the batches the
uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor
from tqdm.auto import tqdm

from ..components.autoencoder import AutoencoderConfig, ImageAutoencoder
from .parse import parse_image
from .stage import StageCheckpoints, warmup_cosine, write_text_atomic
from .world import background_array, exact, render_array, sample_scene

VAE_FORMAT = "unidiffuser.shapes-vae-checkpoint"
MODEL_FILE = "autoencoder.safetensors"

SHAPES_VAE = AutoencoderConfig(
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    scale_factor=1.0,
)
DEFAULT_STEPS = 1500
DEFAULT_BATCH_SIZE = 16
DEFAULT_LR = 2e-3
DEFAULT_KL_WEIGHT = 1e-5
SCALE_SAMPLES = 2048
OBJECT_WEIGHT = 10.0


def pixels(arrays: np.ndarray) -> Tensor:
    """Rendered (B, S, S, 3) uint8 -> (B, 3, S, S) float32 in [-1, 1]."""
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, S, S) in [-1, 1] -> (B, S, S, 3) uint8, as ``components.images.to_pil`` rounds."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _batch(seed: int, step: int, batch_size: int, image_size: int, stream: int = 0) -> tuple[Tensor, Tensor]:
    """Pixels of train-split scenes and their object masks (B, 1, S, S); stream 0 trains, stream 1 scales."""
    rng = np.random.default_rng([seed, stream, step])
    scenes = [sample_scene(rng) for _ in range(batch_size)]
    arrays = np.stack([render_array(s, image_size) for s in scenes])
    backgrounds = np.stack([background_array(s.background, image_size) for s in scenes])
    masks = torch.from_numpy((arrays != backgrounds).any(-1)).float()[:, None]
    return pixels(arrays), F.max_pool2d(masks, 3, stride=1, padding=1)  # objects and their edge


def vae_loss(
    vae: AutoencoderKL, x: Tensor, kl_weight: float, generator: torch.Generator, mask: Tensor | None = None
) -> tuple[Tensor, dict]:
    """Reconstruction (MSE + L1) of a posterior sample plus ``kl_weight`` times the KL per latent element.

    ``mask`` (B, 1, H, W) marks the objects: their pixels weigh ``OBJECT_WEIGHT`` times a background
    pixel's, since objects cover a few percent of a picture yet carry every attribute.
    """
    moments = vae.quant_conv(vae.encoder(x))  # (B, 2C, h, w)
    mean, logvar = moments.chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    noise = torch.randn(mean.shape, generator=generator).to(mean)
    z = mean + torch.exp(0.5 * logvar) * noise
    recon = vae.decoder(vae.post_quant_conv(z))  # (B, 3, H, W)
    weight = 1 + (OBJECT_WEIGHT - 1) * mask if mask is not None else torch.ones_like(x[:, :1])
    weight = weight / weight.mean()
    mse = (weight * (recon - x).square()).mean()
    l1 = (weight * (recon - x).abs()).mean()
    kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
    return mse + l1 + kl_weight * kl, {"mse": mse.item(), "l1": l1.item(), "kl": kl.item()}


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, image_size: int, seed: int, n: int = SCALE_SAMPLES) -> float:
    """One over the standard deviation of the posterior means of ``n`` training scenes."""
    means = []
    for i in range(0, n, 256):
        x, _ = _batch(seed, i, min(256, n - i), image_size, stream=1)
        means.append(vae.quant_conv(vae.encoder(x)).chunk(2, dim=1)[0])
    return float(1.0 / torch.cat(means).std())


@torch.no_grad()
def roundtrip_accuracy(
    autoencoder: ImageAutoencoder,
    *,
    split: str = "heldout",
    n: int = 512,
    image_size: int = 64,
    seed: int = 4321,
) -> float:
    """The share of scenes that ``parse_image`` reads back exactly after encoding (posterior mean) and decoding."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, split) for _ in range(n)]
    correct = 0
    for i in range(0, n, 128):
        chunk = scenes[i : i + 128]
        x = pixels(np.stack([render_array(s, image_size) for s in chunk]))
        mean = autoencoder.moments(x).chunk(2, dim=1)[0] * autoencoder.scale_factor
        decoded = to_uint8(autoencoder.decode(mean))
        correct += sum(exact(s, parse_image(a)) for s, a in zip(chunk, decoded, strict=True))
    return correct / n


def train_vae(
    out_dir: str | Path,
    *,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    image_size: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
    lr: float = DEFAULT_LR,
    kl_weight: float = DEFAULT_KL_WEIGHT,
    config: AutoencoderConfig = SHAPES_VAE,
    checkpoint_every: int = 500,
    keep_last: int = 2,
    eval_scenes: int = 512,
    scale_samples: int = SCALE_SAMPLES,
    progress: bool = True,
) -> ImageAutoencoder:
    """Train the small autoencoder on the shapes world and write it; resumes from ``out_dir``.

    Args:
        out_dir: the run directory (see the module docstring); if it holds checkpoints of this
            stage, training continues from the newest one (its options must agree).
        steps: optimizer steps in all.
        batch_size: rendered scenes per step.
        image_size: pixels per side; a multiple of the autoencoder's downsampling.
        seed: initial weights and the data stream.
        device: where to train ("cpu", "cuda", ...).
        lr: Adam peak learning rate (linear warm-up over 5% of the steps, then cosine).
        kl_weight: weight of the KL term.
        config: the architecture (its scale_factor is replaced by the measured one).
        checkpoint_every: steps between checkpoints (the last step is always saved).
        keep_last: checkpoints kept.
        eval_scenes: held-out scenes for the final round-trip parse accuracy; 0 skips it.
        scale_samples: training scenes whose posterior means set ``scale_factor``.
        progress: show a progress bar.

    Returns:
        The trained autoencoder, frozen, on the CPU.
    """
    if steps < 1 or batch_size < 1 or checkpoint_every < 1:
        raise ValueError(
            f"steps={steps}, batch_size={batch_size}, checkpoint_every={checkpoint_every}: "
            "need steps >= 1, batch_size >= 1, checkpoint_every >= 1"
        )
    if image_size % config.downsample:
        raise ValueError(f"image_size={image_size}: expected a multiple of {config.downsample}")
    out_dir = Path(out_dir)
    device = torch.device(device)
    options = {
        "steps": steps,
        "batch_size": batch_size,
        "image_size": image_size,
        "seed": seed,
        "lr": lr,
        "kl_weight": kl_weight,
        "object_weight": OBJECT_WEIGHT,
        "config": dataclasses.asdict(config),
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**config.diffusers_config())
    vae.to(device).train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))

    checkpoints = StageCheckpoints(out_dir, VAE_FORMAT, MODEL_FILE, options, keep_last)
    start, losses = checkpoints.resume(vae, optimizer, scheduler, device)

    bar = tqdm(total=steps, initial=start, desc="vae", disable=not progress, dynamic_ncols=True)
    for step in range(start, steps):
        x, mask = _batch(seed, step, batch_size, image_size)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        loss, parts = vae_loss(vae, x.to(device), kl_weight, generator, mask.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(mse=f"{parts['mse']:.4f}", kl=f"{parts['kl']:.1f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            checkpoints.save(step + 1, vae, optimizer, scheduler, losses)
    bar.close()

    vae.eval().to("cpu")
    scale = latent_scale(vae, image_size, seed, scale_samples)
    trained = ImageAutoencoder.from_diffusers_state_dict(
        vae.state_dict(), dataclasses.replace(config, scale_factor=scale)
    )
    accuracy = roundtrip_accuracy(trained, n=eval_scenes, image_size=image_size) if eval_scenes > 0 else None
    out_dir.mkdir(parents=True, exist_ok=True)
    trained.save(out_dir / MODEL_FILE)
    report = {
        **options,
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        "scale_factor": scale,
        "heldout_roundtrip_parse_accuracy": accuracy,
    }
    write_text_atomic(out_dir / "vae_training.json", json.dumps(report, indent=2) + "\n")
    return trained


__all__ = ["SHAPES_VAE", "latent_scale", "roundtrip_accuracy", "train_vae", "vae_loss"]
