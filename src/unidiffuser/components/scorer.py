"""A whole CLIP as a judge: how well a picture and a caption (or two pictures, or two captions) agree.

UniDiffuser itself uses CLIP's two towers apart (the image embedding is a token of the image group,
the text tower's token features feed the caption decoder); ``ClipScorer`` keeps a whole
``CLIPModel``, both towers with their projections into one embedding space, to rank candidates:
the pipeline's ``best_of`` draws several outputs for each input and keeps the one whose embedding
lies nearest (cosine) to its input's, or, for joint samples, to its own other half.

Any CLIP checkpoint in transformers' layout serves, from a local directory (for example
openai/clip-vit-base-patch32 for the released model); the shipped shapes model carries a small one
of its own (``scorer/``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from transformers import AutoTokenizer, CLIPModel, PreTrainedTokenizerBase

from .clip import (
    IMAGE_MODEL_ID,
    ImageEmbedderConfig,
    TextEncoderConfig,
    _check_dir,
    _from_pretrained,
    _Frozen,
    clip_pixels,
    no_transformers_bars,
    tiny_clip_tokenizer,
    whole_clip_config,
)


class ClipScorer(_Frozen):
    """Frozen CLIPModel: pictures and strings -> unit embeddings in one space.

    Strings are tokenised with <|startoftext|> ... <|endoftext|>, truncated to the model's
    positions and padded with <|endoftext|> to the longest; the text embedding is taken at the first
    <|endoftext|>, so under the causal mask the padding changes nothing.

    Args:
        model: transformers' CLIPModel.
        tokenizer: the matching CLIP tokenizer.
    """

    def __init__(self, model: CLIPModel, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        vocab = model.config.text_config.vocab_size
        if len(tokenizer) > vocab:
            raise ValueError(
                f"tokenizer: {len(tokenizer)} tokens but the model embeds only vocab_size={vocab}; "
                "use the tokenizer the model was trained with"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self._freeze()

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @classmethod
    def random(
        cls,
        vision: ImageEmbedderConfig,
        text: TextEncoderConfig,
        tokenizer: PreTrainedTokenizerBase | None = None,
        seed: int = 0,
    ) -> ClipScorer:
        """Random weights, reproducible by seed; the tokenizer defaults to ``tiny_clip_tokenizer()``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPModel(whole_clip_config(vision, text))
        return cls(model, tokenizer if tokenizer is not None else tiny_clip_tokenizer())

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> ClipScorer:
        """Load a whole CLIP (config.json, weights, tokenizer files) from a local directory."""
        path = _check_dir(path, "CLIP scorer", IMAGE_MODEL_ID, tokenizer=True)
        whole = "a whole CLIPModel (both towers and both projections, as openai/clip-vit-base-patch32 is)"
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type != "clip":
            raise ValueError(
                f"CLIP scorer {str(path)!r}: its config.json is a {model_type!r} model; a scorer is {whole}"
            )
        model = _from_pretrained(CLIPModel, path, "CLIP scorer")
        return cls(model, AutoTokenizer.from_pretrained(path, local_files_only=True))

    def save_pretrained(self, path: str | Path) -> None:
        with no_transformers_bars():
            self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> Tensor:
        """Pictures -> (B, D) unit vectors."""
        pixels = clip_pixels(images, self.image_size).to(device=self.device, dtype=self.dtype)
        return _unit(self.model.get_image_features(pixel_values=pixels).pooler_output)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """Strings -> (B, D) unit vectors."""
        if isinstance(texts, str) or not len(texts) or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts: expected a non-empty list of strings")
        ids = self.tokenizer(
            list(texts), padding="longest", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return _unit(self.model.get_text_features(input_ids=ids.to(self.device)).pooler_output)


def _unit(features: Tensor) -> Tensor:
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
