"""Caption tokenizers for the shapes world: a CLIP-style one for the text encoder, a GPT-2-style one
for the caption decoder, both byte-level BPE learned from the world's captions.

Merges are learned by plain counting over the words of sampled captions (the most frequent pair
first, ties broken by the pair itself) and continued until every word of the world's vocabulary is
one token, so a caption is as many tokens as words. ``tokenizers``' BpeTrainer breaks ties in an
order that changes from process to process; counting here keeps the vocabulary the same in every
run. (The counting loop follows ``components.clip.tiny_clip_tokenizer``, generalised to any corpus
and both word-boundary conventions: CLIP's ``</w>`` suffix and GPT-2's ``Ġ`` prefix.)

Words outside the world still tokenize, byte by byte. Both tokenizers save with ``save_pretrained``
and load back with ``AutoTokenizer.from_pretrained(path, local_files_only=True)``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from itertools import pairwise

import numpy as np
from transformers import CLIPTokenizer, PreTrainedTokenizerFast

from ..components.caption import ENDOFTEXT_TOKEN, EOS_TOKEN
from ..components.clip import MAX_LENGTH, _bytes_to_unicode, apply_merge, clip_tokenizer_from_merges
from .captions import (
    BACKGROUND_CLAUSES,
    BACKGROUND_WORDS,
    COLOUR_WORDS,
    PICTURE_WORDS,
    POSITION_WORDS,
    RELATION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
    caption,
    templates,
)
from .world import sample_scene

CORPUS_CAPTIONS = 2000  # sampled captions whose word counts order the merges
CONTEXT_LENGTH = 24  # padded caption length: the longest caption of the world is 23 tokens with start and end


def vocabulary() -> list[str]:
    """Every word a caption of this world can contain, sorted."""
    phrases: list[str] = [*PICTURE_WORDS, *templates(1), *templates(2), *BACKGROUND_CLAUSES]
    for table in (SIZE_WORDS, COLOUR_WORDS, SHAPE_WORDS, RELATION_WORDS, BACKGROUND_WORDS, POSITION_WORDS):
        phrases += [form for forms in table.values() for form in forms]
    words = {w for p in phrases for w in re.sub(r"\{\w\}", " ", p).split()}
    return sorted(words)


def caption_corpus(seed: int = 0, n: int = CORPUS_CAPTIONS) -> list[str]:
    """Random captions of random scenes (all splits), reproducible by seed."""
    rng = np.random.default_rng(seed)
    return [caption(sample_scene(rng, "any"), rng) for _ in range(n)]


def _learn_merges(pieces: Counter[str], symbols: dict[str, list[str]]) -> list[tuple[str, str]]:
    """Byte-pair merges by counting, until every piece is a single symbol.

    Args:
        pieces: pre-tokenized pieces (words) and their counts.
        symbols: each piece's initial symbols (modified in place).
    """
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for piece, count in pieces.items():
            for pair in pairwise(symbols[piece]):
                pairs[pair] += count
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        apply_merge(symbols, best)


def _count(sentences: Iterable[str], pre_tokenize) -> Counter[str]:
    pieces: Counter[str] = Counter()
    for sentence in sentences:
        pieces.update(pre_tokenize(sentence))
    return pieces


def _corpus(seed: int) -> list[str]:
    # The sampled captions order the merges; the vocabulary, once each, makes sure every word is whole.
    return [*caption_corpus(seed), " ".join(vocabulary())]


def build_clip_tokenizer(seed: int = 0) -> CLIPTokenizer:
    """A CLIP-style tokenizer (CLIP's normaliser, pre-tokeniser and vocabulary layout) for the world.

    The vocabulary is CLIP's layout: the 256 byte symbols, the same with ``</w>``, the merges, then
    <|startoftext|> and <|endoftext|> (the padding); model_max_length ``CONTEXT_LENGTH`` (24): the
    longest caption of the world takes 23 tokens with its start and end.
    """
    empty = CLIPTokenizer(model_max_length=MAX_LENGTH)  # CLIP's normaliser and pre-tokeniser
    backend = empty.backend_tokenizer

    def pre_tokenize(sentence: str) -> list[str]:
        return [
            p for p, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(sentence))
        ]

    pieces = _count(_corpus(seed), pre_tokenize)
    merges = _learn_merges(pieces, {w: [*w[:-1], w[-1] + "</w>"] for w in pieces})
    return clip_tokenizer_from_merges(merges, CONTEXT_LENGTH)


def build_gpt2_tokenizer(seed: int = 0, eos_token: str = EOS_TOKEN) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer for the world, with ``eos_token`` added as its eos.

    GPT-2's layout: the 256 byte symbols, the merges, ``<|endoftext|>``, then ``eos_token``, as
    ``components.caption.tiny_gpt2_tokenizer`` builds it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)

    def pre_tokenize(sentence: str) -> list[str]:
        return [p for p, _ in pre.pre_tokenize_str(sentence)]

    pieces = _count(_corpus(seed), pre_tokenize)
    merges = _learn_merges(pieces, {w: list(w) for w in pieces})
    tokens = [*_bytes_to_unicode(), *("".join(m) for m in merges)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=ENDOFTEXT_TOKEN, eos_token=ENDOFTEXT_TOKEN, unk_token=ENDOFTEXT_TOKEN
    )
    tokenizer.add_special_tokens({"eos_token": eos_token})
    return tokenizer


def build_caption_tokenizers(seed: int = 0) -> tuple[CLIPTokenizer, PreTrainedTokenizerFast]:
    """The world's (CLIP-style, GPT-2-style) tokenizers, the same for the same seed in every process.

    Args:
        seed: draws the captions whose word counts order the merges.

    Returns:
        The CLIP-style tokenizer for ``ClipTextEncoder`` (pads to 24 with <|endoftext|>, wraps
        prompts in <|startoftext|> ... <|endoftext|>) and the GPT-2-style one for
        ``CaptionDecoder`` (eos ``<|EOS|>``).
    """
    return build_clip_tokenizer(seed), build_gpt2_tokenizer(seed)


__all__ = [
    "CONTEXT_LENGTH",
    "build_caption_tokenizers",
    "build_clip_tokenizer",
    "build_gpt2_tokenizer",
    "caption_corpus",
    "vocabulary",
]
