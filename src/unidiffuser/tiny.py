"""A complete UniDiffuser of tiny random components, built in code (no downloads).

For tests and examples of the pipeline's plumbing: every mode runs end to end in well under a
second on a CPU. It generates noise, not pictures; the trained small model is a separate thing.
"""

from __future__ import annotations

import torch

from .components.autoencoder import TINY as TINY_AUTOENCODER
from .components.autoencoder import ImageAutoencoder
from .components.caption import CaptionDecoder, tiny_gpt2_tokenizer
from .components.caption import preset as caption_preset
from .components.clip import TINY_TEXT, TINY_VISION, ClipImageEmbedder, ClipTextEncoder
from .components.scorer import ClipScorer
from .network import UViT, image_text_config
from .pipeline import UniDiffuser

TINY_IMAGE_SIZE = 64  # pixels; the tiny autoencoder downsamples 8x to an 8x8 latent


def tiny_network_config(data_type: bool = True):
    """The network that fits the tiny components: 8x8 latent, 16-d CLIP token, 77 x 8 text."""
    decoder = caption_preset("tiny")
    return image_text_config(
        latent=(4, TINY_IMAGE_SIZE // 8, TINY_IMAGE_SIZE // 8),
        clip_dim=TINY_VISION.projection_dim,
        text=(77, decoder.prefix_dim),
        width=32,
        depth=2,
        num_heads=2,
        data_type=data_type,
    )


def tiny_pipeline(seed: int = 0, data_type: bool = True, scorer: bool = True) -> UniDiffuser:
    """Random tiny network and components (with a tiny CLIP scorer unless ``scorer`` is False),
    reproducible by seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = UViT(tiny_network_config(data_type))
    return UniDiffuser(
        network,
        ImageAutoencoder.random(TINY_AUTOENCODER, seed=seed),
        ClipImageEmbedder.random(TINY_VISION, seed=seed),
        ClipTextEncoder.random(TINY_TEXT, seed=seed),
        CaptionDecoder.random(caption_preset("tiny"), tiny_gpt2_tokenizer(), seed=seed).frozen(),
        scorer=ClipScorer.random(TINY_VISION, TINY_TEXT, seed=seed) if scorer else None,
    )
