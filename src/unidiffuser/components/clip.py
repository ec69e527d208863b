"""The frozen CLIP encoders: images -> projected image embedding, strings -> token features.

- ``ClipImageEmbedder``: CLIP ViT-B/32's ``image_embeds`` (512-d, after the visual projection,
  NOT normalised), the released model's clip-image token.
- ``ClipTextEncoder``: CLIP ViT-L/14's text ``last_hidden_state`` (77 x 768) for prompts padded
  or truncated to 77 tokens, fed without an attention mask (as the released pipeline does).

Both wrap transformers' modules and load the standard openai checkpoints from a local directory;
nothing is downloaded here. ``tiny_clip_tokenizer`` builds a small CLIP-style tokenizer in code
for tests.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from .images import _to_rgb, resize_and_crop

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LENGTH = 77  # CLIP's context: prompts are padded or truncated to it
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
IMAGE_MODEL_ID = "openai/clip-vit-base-patch32"
TEXT_MODEL_ID = "openai/clip-vit-large-patch14"


@dataclass(frozen=True)
class ImageEmbedderConfig:
    """Architecture of a CLIP vision tower with its projection.

    Args:
        hidden_size: token width.
        intermediate_size: MLP width.
        num_layers: transformer layers.
        num_heads: attention heads; hidden_size must divide by it.
        image_size: input side in pixels.
        patch_size: patch side; image_size must divide by it.
        projection_dim: width of the projected embedding.
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    projection_dim: int

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")

    def transformers_config(self) -> CLIPVisionConfig:
        return CLIPVisionConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            projection_dim=self.projection_dim,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        )


@dataclass(frozen=True)
class TextEncoderConfig:
    """Architecture of a CLIP text tower (causal transformer over BPE tokens).

    Args:
        vocab_size: token embeddings; at least the tokenizer's vocabulary.
        hidden_size: token width (the feature width returned).
        intermediate_size: MLP width.
        num_layers: transformer layers.
        num_heads: attention heads; hidden_size must divide by it.
        max_positions: position embeddings: the longest padded prompt (77 for CLIP; the context
            is the smaller of this and the tokenizer's ``model_max_length``).
        bos_token_id: id of <|startoftext|>.
        eos_token_id: id of <|endoftext|> (also the padding).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_positions: int = MAX_LENGTH
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.max_positions < 2:
            raise ValueError(f"max_positions={self.max_positions}: a prompt takes at least 2 (start and end)")
        if not (0 <= self.bos_token_id < self.vocab_size and 0 <= self.eos_token_id < self.vocab_size):
            raise ValueError(
                f"bos_token_id={self.bos_token_id} and eos_token_id={self.eos_token_id} must be below "
                f"vocab_size={self.vocab_size}"
            )

    def transformers_config(self) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            max_position_embeddings=self.max_positions,
            projection_dim=self.hidden_size,  # unused by the text model without projection
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.eos_token_id,
        )


def whole_clip_config(vision: ImageEmbedderConfig, text: TextEncoderConfig) -> CLIPConfig:
    """A whole CLIP's config: both towers, projections to the image embedding's width, a learned temperature."""
    return CLIPConfig(
        text_config=text.transformers_config().to_dict(),
        vision_config=vision.transformers_config().to_dict(),
        projection_dim=vision.projection_dim,
    )


# ---------------------------------------------------------------------------------------------
# A tiny CLIP-style tokenizer, built in code

_TINY_CORPUS = (
    "a photo of a cat sitting on a wooden table",
    "a dog running across a green field in the sun",
    "two people riding bicycles down a busy city street",
    "a red car parked next to a tall building",
    "a bowl of fresh fruit on the kitchen counter",
    "an old man reading a newspaper on a park bench",
    "a little girl flying a kite at the beach",
    "a plate of pasta with tomato sauce and basil",
    "a train crossing a bridge over a river",
    "a painting of mountains at sunset in the style of van gogh",
    "a black and white photograph of a lighthouse",
    "a bird perched on a branch covered in snow",
    "a group of friends laughing around a campfire",
    "a close up of a yellow flower with a bee",
    "an astronaut riding a horse on the moon",
    "a cup of coffee next to an open laptop",
    "a boat floating on a calm lake at dawn",
    "a man surfing a large wave in the ocean",
    "a woman holding an umbrella in the rain",
    "a giraffe eating leaves from a tree",
    "a pizza with cheese, mushrooms and peppers",
    "a snowy street at night with glowing lamps",
    "a cartoon drawing of a smiling robot",
    "a tennis player hitting the ball on a clay court",
    "a herd of elephants walking through the savanna",
    "a vase of roses on a windowsill",
    "children playing football in the school yard",
    "a cat sleeping on a pile of books",
    "a watercolor landscape with hills and a small house",
    "an airplane taking off from a busy airport",
    "a motorcycle parked in front of a cafe",
    "a teddy bear sitting on a bed",
    "a chef cooking vegetables in a large pan",
    "a sheep standing in a foggy meadow",
    "the skyline of a modern city with many lights",
    "a wooden bridge in a japanese garden",
    "a zebra and its foal drinking water",
    "a clock tower against a blue sky with clouds",
    "a bathroom with a white sink and a mirror",
    "a skateboarder jumping over stairs",
)
TINY_MERGES = 250  # vocabulary: 256 bytes + 256 word-final bytes + merges + 2 special tokens


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE (GPT-2, CLIP) uses, in order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in sorted(printable)] + [chars[b] for b in range(256) if b not in printable]


def clip_tokenizer_from_merges(
    merges: list[tuple[str, str]], context_length: int = MAX_LENGTH
) -> CLIPTokenizer:
    """A CLIP tokenizer in CLIP's vocabulary layout: bytes, word-final bytes, merges, specials.

    ``context_length`` becomes its ``model_max_length``: the length ``ClipTextEncoder`` pads to.
    """
    base = _bytes_to_unicode()
    tokens = [
        *base,
        *(c + "</w>" for c in base),
        *("".join(m) for m in merges),
        "<|startoftext|>",
        "<|endoftext|>",
    ]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)


def apply_merge(symbols: dict[str, list[str]], pair: tuple[str, str]) -> None:
    """Join every adjacent occurrence of ``pair`` in each word's symbol list (one BPE merge), in place."""
    for word, s in symbols.items():
        merged, i = [], 0
        while i < len(s):
            if i + 1 < len(s) and (s[i], s[i + 1]) == pair:
                merged.append(s[i] + s[i + 1])
                i += 2
            else:
                merged.append(s[i])
                i += 1
        symbols[word] = merged


def tiny_clip_tokenizer(num_merges: int = TINY_MERGES) -> CLIPTokenizer:
    """A small byte-level BPE tokenizer with CLIP's rules, learned from built-in captions.

    It is transformers' ``CLIPTokenizer`` (a ``tokenizers`` BPE model: CLIP's normaliser with
    lowercasing, CLIP's pre-tokeniser, ``</w>`` ends words, <|startoftext|> and <|endoftext|>
    wrap every prompt, padding is <|endoftext|>) with CLIP's vocabulary layout: the 256 byte
    symbols, the same with ``</w>``, one entry per merge, then the two special tokens.

    The merges are learned here by plain counting (most frequent pair, ties broken by the pair
    itself): ``tokenizers``' BpeTrainer breaks ties in an order that changes from process to
    process, and a test tokenizer must be the same in every run.

    Args:
        num_merges: merges to learn (the built-in captions allow a few hundred).

    Returns:
        The tokenizer; ``len(tokenizer) == 514 + num_merges`` and model_max_length 77.
    """
    empty = CLIPTokenizer(model_max_length=MAX_LENGTH)  # CLIP's normaliser and pre-tokeniser
    backend = empty.backend_tokenizer
    words: Counter[str] = Counter()
    for sentence in _TINY_CORPUS:
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(sentence)):
            words[piece] += 1
    symbols = {w: [*w[:-1], w[-1] + "</w>"] for w in words}  # CLIP marks the last symbol of a word

    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            s = symbols[word]
            for pair in pairwise(s):
                pairs[pair] += count
        if not pairs:
            raise ValueError(f"num_merges={num_merges}: the built-in captions allow only {len(merges)}")
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        apply_merge(symbols, best)

    return clip_tokenizer_from_merges(merges)


# ---------------------------------------------------------------------------------------------
# Loading helpers and preprocessing


def clip_pixels(images: Sequence[Image.Image], size: int) -> Tensor:
    """CLIP's preprocessing in Pillow and NumPy: pictures -> (B, 3, size, size) float32 on the CPU.

    See ``ClipImageEmbedder.preprocess``.
    """
    if isinstance(images, Image.Image) or not len(images):
        raise ValueError("images: expected a non-empty sequence of PIL images")
    arrays = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(f"images[{i}]: expected a PIL image, got {type(image).__name__}")
        arrays.append(np.asarray(resize_and_crop(_to_rgb(image), (size, size), "bicubic"), dtype=np.float32))
    x = np.stack(arrays) / np.float32(255.0)  # (B, S, S, 3) in [0, 1]
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # (B, 3, S, S)


def _check_dir(path: str | Path, what: str, model_id: str, tokenizer: bool, model: bool = True) -> Path:
    """A missing directory or file -> a ValueError that says where the standard model is."""
    path = Path(path)
    fetch = (
        f"Download the standard model beforehand from the Hugging Face Hub ({model_id}, for example "
        f'huggingface_hub.snapshot_download("{model_id}", local_dir=...)) and pass that directory.'
    )
    if not path.is_dir():
        raise ValueError(f"{what} directory not found: {str(path)!r}. {fetch}")
    missing = []
    if model and not (path / "config.json").is_file():
        missing.append("config.json")
    if model and not any((path / f).is_file() for f in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if tokenizer and not (
        (path / "tokenizer.json").is_file()
        or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())
    ):
        missing.append("tokenizer.json (or vocab.json and merges.txt)")
    if missing:
        raise ValueError(f"{what} directory {str(path)!r} lacks {'; '.join(missing)}. {fetch}")
    return path


@contextmanager
def no_transformers_bars() -> Iterator[None]:
    """transformers' progress bars ("Loading weights", "Writing model shards") off inside, the
    caller's setting after.

    Our models load and save in well under a second each; a bar per file only clutters a
    command's output.
    """
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


def _from_pretrained(cls, path: Path, what: str):
    """transformers' from_pretrained, local only, float32, failing on missing or misshapen weights."""
    try:
        with no_transformers_bars():
            model, info = cls.from_pretrained(
                path, local_files_only=True, output_loading_info=True, dtype=torch.float32
            )
    except RuntimeError as err:  # transformers refuses misshapen weights itself
        raise ValueError(f"{what} weights in {str(path)!r} do not fit its config.json: {err}") from None
    # unexpected keys are fine: a full CLIP checkpoint also holds the other tower
    bad = sorted(info.get("missing_keys", [])) + [str(k) for k in info.get("mismatched_keys", [])]
    if bad:
        raise ValueError(
            f"{what} weights in {str(path)!r} do not fit the config: missing or misshapen {bad[:10]}"
        )
    return model


class _Frozen(nn.Module):
    """Eval mode and no gradients, whatever a parent module asks."""

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


# ---------------------------------------------------------------------------------------------
# Image embedder


class ClipImageEmbedder(_Frozen):
    """Frozen CLIP vision tower: pictures -> ``image_embeds`` (B, projection_dim), not normalised.

    Args:
        model: transformers' CLIPVisionModelWithProjection.
    """

    def __init__(self, model: CLIPVisionModelWithProjection):
        super().__init__()
        self.model = model
        self._freeze()

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_size)

    @classmethod
    def random(cls, config: ImageEmbedderConfig, seed: int = 0) -> ClipImageEmbedder:
        """Random weights from transformers' initialisation, reproducible by seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(CLIPVisionModelWithProjection(config.transformers_config()))

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> ClipImageEmbedder:
        """Load a local transformers directory without network access.

        Args:
            path: a full CLIP model such as openai/clip-vit-base-patch32, or a vision tower
                written by ``save_pretrained``. A preprocessor_config.json there is not read:
                ``preprocess`` uses CLIP's constants and the model's image_size.
        """
        path = _check_dir(path, "CLIP image encoder", IMAGE_MODEL_ID, tokenizer=False)
        return cls(_from_pretrained(CLIPVisionModelWithProjection, path, "CLIP image encoder"))

    def save_pretrained(self, path: str | Path) -> None:
        with no_transformers_bars():
            self.model.save_pretrained(path)

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """CLIP's preprocessing in Pillow and NumPy: pictures -> (B, 3, S, S) float32 on the CPU.

        Each picture is converted to RGB, resized with bicubic so its shortest side is S, center
        cropped to S x S, scaled to [0, 1] and normalised with CLIP's mean and std. The RGB
        conversion follows ``images.load_image`` (transparency is composited on white, where
        transformers' processor drops the alpha channel); otherwise the result equals
        transformers' CLIPImageProcessor (PIL backend).
        """
        return clip_pixels(images, self.image_size)

    def forward(self, images: Sequence[Image.Image] | Tensor) -> Tensor:
        """Pictures, or a batch already preprocessed to (B, 3, S, S) -> (B, projection_dim)."""
        if isinstance(images, Tensor):
            s = self.image_size
            if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
                raise ValueError(
                    f"images: a tensor must be preprocessed to (B, 3, {s}, {s}), got {tuple(images.shape)}; "
                    "pass PIL images to have it done"
                )
            pixels = images
        else:
            pixels = self.preprocess(images)
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        return self.model(pixel_values=pixels).image_embeds  # (B, projection_dim)


# ---------------------------------------------------------------------------------------------
# Text encoder


class ClipTextEncoder(_Frozen):
    """Frozen CLIP text tower: strings -> last_hidden_state (B, L, hidden), L = ``max_length``.

    Prompts are tokenised with <|startoftext|> ... <|endoftext|>, truncated to L tokens and
    padded to L with <|endoftext|>; the model runs without an attention mask (its causal mask
    keeps the prompt tokens independent of the padding), as the released pipeline does. L is the
    tokenizer's ``model_max_length`` where the model has that many positions (77 for CLIP; the
    shapes world's tokenizer says 24), else the model's number of positions.

    Args:
        model: transformers' CLIPTextModel.
        tokenizer: the matching CLIP tokenizer.
    """

    def __init__(self, model: CLIPTextModel, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        vocab = model.config.vocab_size
        if len(tokenizer) > vocab:
            raise ValueError(
                f"tokenizer: {len(tokenizer)} tokens but the model embeds only vocab_size={vocab}; "
                "use the tokenizer the model was trained with"
            )
        self.max_length = min(int(tokenizer.model_max_length), int(model.config.max_position_embeddings))
        self.model = model
        self.tokenizer = tokenizer
        self._freeze()

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @classmethod
    def random(
        cls, config: TextEncoderConfig, tokenizer: PreTrainedTokenizerBase | None = None, seed: int = 0
    ) -> ClipTextEncoder:
        """Random weights, reproducible by seed; the tokenizer defaults to ``tiny_clip_tokenizer()``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPTextModel(config.transformers_config())
        return cls(model, tokenizer if tokenizer is not None else tiny_clip_tokenizer())

    @classmethod
    def from_pretrained_dir(
        cls, path: str | Path, tokenizer_path: str | Path | None = None
    ) -> ClipTextEncoder:
        """Load a local transformers directory without network access.

        Args:
            path: a full CLIP model such as openai/clip-vit-large-patch14, or a directory written
                by ``save_pretrained``: config.json, the weights and (unless tokenizer_path is
                given) the tokenizer files.
            tokenizer_path: a separate tokenizer directory (the diffusers layout keeps the CLIP
                tokenizer in its own folder).
        """
        path = _check_dir(path, "CLIP text encoder", TEXT_MODEL_ID, tokenizer=tokenizer_path is None)
        if tokenizer_path is not None:
            tokenizer_path = _check_dir(
                tokenizer_path, "CLIP tokenizer", TEXT_MODEL_ID, tokenizer=True, model=False
            )
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path, local_files_only=True)
        return cls(_from_pretrained(CLIPTextModel, path, "CLIP text encoder"), tokenizer)

    def save_pretrained(self, path: str | Path) -> None:
        with no_transformers_bars():
            self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Strings -> token ids (B, max_length) on the CPU."""
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not len(texts):
            raise ValueError("texts: expected a non-empty list of strings (wrap a single prompt in a list)")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"texts[{i}]: expected a string, got {type(t).__name__}")
        tokens = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        # one token past the limit tells a text that was cut from one that fitted
        lengths = self.tokenizer(
            list(texts), max_length=self.max_length + 1, truncation=True, return_length=True
        )
        cut = [i for i, n in enumerate(lengths["length"]) if n > self.max_length]
        if cut:
            warnings.warn(
                f"texts {cut[:5]}{' ...' if len(cut) > 5 else ''}: longer than the {self.max_length} tokens "
                f"the text encoder reads; only their first {self.max_length} tokens count",
                stacklevel=2,
            )
        return tokens.input_ids  # (B, max_length)

    def forward(self, texts: Sequence[str]) -> Tensor:
        """Strings (the empty string is a valid prompt) -> (B, max_length, hidden)."""
        ids = self.tokenize(texts).to(self.device)
        return self.model(input_ids=ids).last_hidden_state  # (B, max_length, hidden)


# ---------------------------------------------------------------------------------------------
# Presets

# openai/clip-vit-base-patch32's vision tower: the released clip-image embedding (512-d).
VIT_B_32 = ImageEmbedderConfig(
    hidden_size=768,
    intermediate_size=3072,
    num_layers=12,
    num_heads=12,
    image_size=224,
    patch_size=32,
    projection_dim=512,
)
# openai/clip-vit-large-patch14's text tower: the released text features (77 x 768).
VIT_L_14_TEXT = TextEncoderConfig(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, max_positions=77
)
TINY_VISION = ImageEmbedderConfig(
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=16,
)
_TINY_VOCAB = 512 + TINY_MERGES + 2  # len(tiny_clip_tokenizer())
TINY_TEXT = TextEncoderConfig(
    vocab_size=_TINY_VOCAB,
    hidden_size=16,
    intermediate_size=32,
    num_layers=2,
    num_heads=2,
    max_positions=77,
    bos_token_id=_TINY_VOCAB - 2,
    eos_token_id=_TINY_VOCAB - 1,
)
IMAGE_PRESETS: dict[str, ImageEmbedderConfig] = {"vit_b_32": VIT_B_32, "tiny": TINY_VISION}
TEXT_PRESETS: dict[str, TextEncoderConfig] = {"vit_l_14": VIT_L_14_TEXT, "tiny": TINY_TEXT}

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGE_PRESETS",
    "TEXT_PRESETS",
    "TINY_TEXT",
    "TINY_VISION",
    "VIT_B_32",
    "VIT_L_14_TEXT",
    "ClipImageEmbedder",
    "ClipTextEncoder",
    "ImageEmbedderConfig",
    "TextEncoderConfig",
    "tiny_clip_tokenizer",
]
