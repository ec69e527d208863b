"""The caption decoder: the text latent UniDiffuser diffuses, and the GPT-2 that turns it into words.

Text enters UniDiffuser as CLIP text-encoder features (L x 768), reduced token-wise by a linear
``encode_prefix`` to the L x 64 latent that the network diffuses. To read a latent back, a linear
``decode_prefix`` lifts it to GPT-2's width and GPT-2 small (with an added ``<|EOS|>`` token,
vocabulary 50258) continues that prefix by beam search: beam 5, at most 67 tokens, scores
normalised by length, stopping at ``<|EOS|>``.

The beam search runs the whole batch at once over a KV cache and reproduces, caption for caption,
the per-sample search of the released code (as ported to diffusers' ``UniDiffuserTextDecoder``).
The GPT-2 is transformers' ``GPT2LMHeadModel``, its output head tied to the token embedding.

Freezing is the caller's choice: a new decoder is trainable (its own training stage uses
:meth:`CaptionDecoder.loss`); as a component of UniDiffuser call :meth:`CaptionDecoder.frozen`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from .beam import FastBeamSearch, advance, first_beams

EOS_TOKEN = "<|EOS|>"
ENDOFTEXT_TOKEN = "<|endoftext|>"  # GPT-2's own end-of-text token; UniDiffuser ends captions with EOS_TOKEN
GPT2_REQUIRED = ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions")
_GPT2_KWARGS = frozenset(inspect.signature(GPT2Config.__init__).parameters) - {"self", "kwargs"}
# GPT-2's KV-cache argument is past_key_values in transformers 5.17 and cache in 5.24: use what is there.
_CACHE_ARG = (
    "cache" if "cache" in inspect.signature(GPT2LMHeadModel.forward).parameters else "past_key_values"
)

# State-dict names. The output head is tied to the token embedding, so it is one tensor saved once.
LM_HEAD = "gpt.lm_head.weight"
WTE = "gpt.transformer.wte.weight"
OFFICIAL_PREFIX = "module."  # the released caption_decoder.pth was saved from a DataParallel wrapper
# Older transformers kept GPT-2's causal mask as buffers in the state dict; they hold no weights.
_OLD_MASK_BUFFER = re.compile(r"gpt\.transformer\.h\.\d+\.attn\.(bias|masked_bias)")


# ---------------------------------------------------------------------------------------------
# Tokenizer


# A few dozen caption-like sentences: enough for a byte-level BPE of TINY_BPE_VOCAB entries.
_TINY_CORPUS = (
    "a photo of a cat sitting on a red sofa",
    "a dog running on the beach at sunset",
    "two people riding bikes down a city street",
    "a bowl of fruit on a wooden table",
    "a red car parked next to a tall building",
    "an astronaut riding a horse on the moon",
    "a painting of a mountain lake in the morning",
    "a small boat floating on a calm river",
    "a group of children playing football in a park",
    "a close up photo of a yellow flower",
    "a man holding an umbrella in the rain",
    "a plate of pasta with tomato sauce",
    "a black and white photo of an old bridge",
    "a train crossing a snowy valley",
    "a woman reading a book by the window",
    "a bird standing on a branch of a tree",
    "a cup of coffee next to a laptop",
    "a city skyline at night with bright lights",
    "a white horse running across a green field",
    "a teddy bear sitting on a bed",
    "a pizza with cheese and mushrooms",
    "a street market full of people",
    "a lighthouse on a rocky coast",
    "a kitchen with a table and four chairs",
    "an airplane flying over the clouds",
    "a cat sleeping next to a dog",
    "a bicycle leaning against a blue wall",
    "a vase of roses on a shelf",
    "a child eating an ice cream cone",
    "a forest path covered in autumn leaves",
    "a sandwich and a glass of orange juice",
    "a giraffe eating leaves from a tall tree",
    "a bus driving down a busy road",
    "a watercolor painting of a fox in the snow",
    "an elephant walking through tall grass",
    "a person surfing a large wave",
)
TINY_BPE_VOCAB = 384  # 256 byte symbols + 128 merges
TINY_VOCAB_SIZE = TINY_BPE_VOCAB + 2  # + <|endoftext|> + <|EOS|>


def tiny_gpt2_tokenizer(eos_token: str = EOS_TOKEN) -> PreTrainedTokenizerFast:
    """A small GPT-2-style byte-level BPE tokenizer, trained in code on a fixed corpus (no downloads).

    The layout follows GPT-2's: the 256 byte symbols, the merges, then ``<|endoftext|>``, then the
    added ``eos_token`` as the tokenizer's eos token, so ``len(tokenizer) == TINY_VOCAB_SIZE``. For
    the released decoder use GPT-2's own tokenizer with ``eos_token`` added the same way.

    Args:
        eos_token: the caption end token added on top of the BPE vocabulary.

    Returns:
        A transformers fast tokenizer (deterministic: the same ids on every call).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TINY_CORPUS, trainer)
    if bpe.get_vocab_size() != TINY_BPE_VOCAB:
        raise RuntimeError(f"the tiny BPE learned {bpe.get_vocab_size()} entries, expected {TINY_BPE_VOCAB}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=ENDOFTEXT_TOKEN, eos_token=ENDOFTEXT_TOKEN, unk_token=ENDOFTEXT_TOKEN
    )
    tokenizer.add_special_tokens({"eos_token": eos_token})
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Configuration


def _released_gpt2() -> dict[str, Any]:
    return {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50258, "n_positions": 1024}


@dataclass(frozen=True)
class CaptionDecoderConfig:
    """Architecture of the caption decoder.

    Args:
        prefix_dim: width of the text latent UniDiffuser diffuses (64 released).
        feature_dim: width of the text-encoder features the latent is made from (CLIP ViT-L/14: 768).
        gpt2: ``GPT2Config`` keyword arguments; must give n_embd, n_layer, n_head, vocab_size and
            n_positions. Unset ones keep GPT2Config's defaults (gelu_new, dropout 0.1, eps 1e-5).
        eos_token: the token that ends a caption; the tokenizer must hold it.
    """

    prefix_dim: int = 64
    feature_dim: int = 768
    gpt2: dict[str, Any] = field(default_factory=_released_gpt2)
    eos_token: str = EOS_TOKEN

    def __post_init__(self) -> None:
        # A private copy, so that the caller's dict cannot change a frozen config afterwards.
        object.__setattr__(self, "gpt2", dict(self.gpt2))
        for name in ("prefix_dim", "feature_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        missing = [k for k in GPT2_REQUIRED if k not in self.gpt2]
        if missing:
            raise ValueError(f"gpt2 must give {list(GPT2_REQUIRED)}; missing {missing}")
        unknown = sorted(set(self.gpt2) - _GPT2_KWARGS)
        if unknown:
            raise ValueError(f"gpt2 has keys {unknown} that GPT2Config does not take")
        for name in GPT2_REQUIRED:
            value = self.gpt2[name]
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"gpt2[{name!r}]={value!r} must be an int >= 1")
        if self.gpt2["n_embd"] % self.gpt2["n_head"]:
            raise ValueError(
                f"gpt2 n_embd={self.gpt2['n_embd']} is not divisible by n_head={self.gpt2['n_head']}"
            )
        if not self.eos_token:
            raise ValueError("eos_token must be a non-empty string")

    @property
    def n_embd(self) -> int:
        return self.gpt2["n_embd"]

    @property
    def vocab_size(self) -> int:
        return self.gpt2["vocab_size"]

    @property
    def n_positions(self) -> int:
        return self.gpt2["n_positions"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CaptionDecoderConfig:
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Helpers


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Dropout off for the duration (beam search is deterministic), the previous mode restored."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _check_sequence(x: Any, name: str, width: int) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 3 or x.shape[0] < 1 or x.shape[1] < 1 or x.shape[2] != width:
        raise ValueError(f"{name} must have shape (batch, length, {width}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor, got dtype {x.dtype}; convert with .float()"
        )


# ---------------------------------------------------------------------------------------------
# Model


class CaptionDecoder(nn.Module):
    """Text latent <-> caption: ``encode_prefix`` (features -> latent), ``decode_prefix`` + GPT-2.

    A new decoder is trainable and in train mode, like any module. As a frozen component of
    UniDiffuser call :meth:`frozen`. :meth:`generate` and :meth:`beam_search` always run without
    dropout and without gradients, whatever the mode.

    Args:
        config: the architecture.
        tokenizer: a GPT-2-style tokenizer holding ``config.eos_token``, with exactly
            ``config.vocab_size`` entries.
    """

    def __init__(self, config: CaptionDecoderConfig, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        vocab = tokenizer.get_vocab()
        if config.eos_token not in vocab:
            raise ValueError(
                f"tokenizer has no {config.eos_token!r} token; add it with "
                f"tokenizer.add_special_tokens({{'eos_token': {config.eos_token!r}}})"
            )
        if len(tokenizer) != config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but config.gpt2 vocab_size={config.vocab_size}; "
                f"they must match"
            )
        self.config = config
        self.tokenizer = tokenizer
        self.eos_token_id: int = vocab[config.eos_token]
        bos = tokenizer.bos_token_id
        gpt2 = {"eos_token_id": self.eos_token_id, "bos_token_id": bos, **config.gpt2}

        self.encode_prefix = nn.Linear(config.feature_dim, config.prefix_dim)
        self.decode_prefix = nn.Linear(config.prefix_dim, config.n_embd)
        self.gpt = GPT2LMHeadModel(GPT2Config(**gpt2))
        self._fast_search: FastBeamSearch | None = None  # see enable_fast_search

    @classmethod
    def random(
        cls, config: CaptionDecoderConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0
    ) -> CaptionDecoder:
        """A randomly initialised decoder (GPT-2's init), the same for the same seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(config, tokenizer)

    def frozen(self) -> CaptionDecoder:
        """Eval mode and no gradients for every parameter (UniDiffuser's use); returns self."""
        self.eval()
        self.requires_grad_(False)
        return self

    @property
    def _tied(self) -> bool:
        return self.gpt.lm_head.weight is self.gpt.transformer.wte.weight

    # ---- text features -> latent ------------------------------------------------------------

    def encode(self, features: Tensor) -> Tensor:
        """Text-encoder features (B, L, feature_dim) -> the text latent (B, L, prefix_dim)."""
        _check_sequence(features, "features", self.config.feature_dim)
        return self.encode_prefix(features.to(self.encode_prefix.weight.dtype))  # (B, L, prefix_dim)

    # ---- training -----------------------------------------------------------------------------

    def tokenize(self, captions: Sequence[str], *, max_length: int = 67) -> tuple[Tensor, Tensor]:
        """Captions -> (token_ids, attention_mask), each (B, T): EOS appended, padded on the right.

        Captions longer than ``max_length - 1`` tokens are cut; the EOS is always kept, so the
        decoder learns where captions end. T is the longest row, at most ``max_length``.
        """
        if isinstance(captions, str) or len(captions) == 0:
            raise ValueError(f"captions must be a non-empty sequence of strings, got {captions!r}")
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be >= 2 (one token and the EOS)")
        rows = [
            [*self.tokenizer(c, add_special_tokens=False)["input_ids"][: max_length - 1], self.eos_token_id]
            for c in captions
        ]
        width = max(len(r) for r in rows)
        token_ids = torch.zeros(len(rows), width, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            token_ids[i, : len(r)] = torch.tensor(r)
            attention_mask[i, : len(r)] = 1
        return token_ids, attention_mask

    def loss(self, prefix: Tensor, token_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Teacher-forced cross-entropy of the caption tokens given the text latent.

        ``decode_prefix(prefix)`` is prepended to the caption's token embeddings; every caption
        token is predicted from what precedes it (the first from the last prefix position). The
        prefix positions and the padding carry no loss. The mean is over the batch's caption tokens.

        Args:
            prefix: the text latent, (B, L, prefix_dim).
            token_ids: caption tokens, (B, T), ending with the EOS token (see :meth:`tokenize`).
            attention_mask: (B, T), 1 on caption tokens and 0 on right padding.

        Returns:
            The scalar loss.
        """
        _check_sequence(prefix, "prefix", self.config.prefix_dim)
        batch, length = prefix.shape[:2]
        if not isinstance(token_ids, Tensor) or token_ids.ndim != 2 or token_ids.shape[0] != batch:
            got = tuple(token_ids.shape) if isinstance(token_ids, Tensor) else type(token_ids).__name__
            raise ValueError(f"token_ids must have shape ({batch}, T) to match prefix, got {got}")
        if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
            raise ValueError(f"token_ids must be an integer tensor, got dtype {token_ids.dtype}")
        if token_ids.numel() and (token_ids.min() < 0 or token_ids.max() >= self.config.vocab_size):
            raise ValueError(f"token_ids must lie in [0, {self.config.vocab_size}), the vocabulary")
        if not isinstance(attention_mask, Tensor) or attention_mask.shape != token_ids.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else attention_mask
            raise ValueError(
                f"attention_mask must have the shape of token_ids {tuple(token_ids.shape)}, got {got}"
            )
        mask = attention_mask.long()
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError("attention_mask must hold only 0 and 1")
        if (mask[:, 1:] > mask[:, :-1]).any():
            raise ValueError("attention_mask must be right-padded: each row is ones, then zeros")
        if not mask.any():
            raise ValueError("attention_mask marks no caption token; there is nothing to learn")
        steps = token_ids.shape[1]
        if length + steps > self.config.n_positions:
            raise ValueError(
                f"prefix length {length} + token_ids length {steps} exceeds GPT-2's "
                f"n_positions={self.config.n_positions}"
            )

        dtype = self.decode_prefix.weight.dtype
        prefix_embeds = self.decode_prefix(prefix.to(dtype))  # (B, L, n_embd)
        token_embeds = self.gpt.transformer.wte(token_ids)  # (B, T, n_embd)
        embeds = torch.cat([prefix_embeds, token_embeds], dim=1)  # (B, L + T, n_embd)
        full_mask = torch.cat([mask.new_ones(batch, length), mask], dim=1)  # (B, L + T)
        # Only the logits at positions L-1 .. L+T-2 predict caption tokens: keep the last T + 1.
        out = self.gpt(
            inputs_embeds=embeds, attention_mask=full_mask, use_cache=False, logits_to_keep=steps + 1
        )
        logits = out.logits[:, :-1].float()  # (B, T, vocab)
        labels = token_ids.masked_fill(mask == 0, -100)  # (B, T)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    # ---- latent -> caption --------------------------------------------------------------------

    @torch.no_grad()
    def beam_search(
        self, latents: Tensor, *, beam_size: int = 5, max_new_tokens: int = 67
    ) -> tuple[Tensor, Tensor]:
        """Length-normalised beam search for the whole batch at once over GPT-2's KV cache.

        Per sample this is the released search: the first step keeps the ``beam_size`` likeliest
        tokens; then every live beam is extended by every token, a beam that has emitted EOS only
        by token 0 at no cost (so it competes with its final score), and the ``beam_size``
        candidates with the best mean log-probability per token survive. A sample is finished
        when all its beams have emitted EOS; the search stops when every sample is finished or
        after ``max_new_tokens`` tokens. The best beam by mean log-probability is returned.

        Args:
            latents: text latents, (B, L, prefix_dim).
            beam_size: beams kept per sample.
            max_new_tokens: the most tokens generated per caption (EOS included).

        Returns:
            token_ids (B, T), the best beam of each sample padded with 0 after its end, and
            lengths (B,), its number of tokens up to and including its EOS.
        """
        _check_sequence(latents, "latents", self.config.prefix_dim)
        vocab = self.config.vocab_size
        if not isinstance(beam_size, int) or not 1 <= beam_size <= vocab:
            raise ValueError(f"beam_size={beam_size!r} must be an int in [1, {vocab}] (the vocabulary)")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
        length = latents.shape[1]
        # The last token is chosen from position L + max_new_tokens - 2 and never fed back.
        if length + max_new_tokens - 1 > self.config.n_positions:
            raise ValueError(
                f"latents length {length} + max_new_tokens={max_new_tokens} - 1 exceeds GPT-2's "
                f"n_positions={self.config.n_positions}; lower max_new_tokens"
            )
        weight = self.decode_prefix.weight
        with _eval_mode(self):
            latents = latents.to(device=weight.device, dtype=weight.dtype)
            prefix = self.decode_prefix(latents)  # (B, L, n_embd)
            if self._fast_search is not None:
                return self._fast_search(prefix, beam_size, max_new_tokens)
            # Step 1: the prefix alone, once per sample; its cache is then copied to the k beams.
            cache = DynamicCache(config=self.gpt.config)  # filled in place by every call below
            out = self.gpt(inputs_embeds=prefix, use_cache=True, logits_to_keep=1, **{_CACHE_ARG: cache})
            beams = first_beams(out.logits[:, -1], beam_size, self.eos_token_id, max_new_tokens)
            cache.batch_repeat_interleave(beam_size)
            wte = self.gpt.transformer.wte
            for _ in range(max_new_tokens - 1):
                if beams.finished.all():
                    break
                embeds = wte(beams.last).reshape(-1, 1, wte.embedding_dim)  # (B*k, 1, n_embd)
                out = self.gpt(inputs_embeds=embeds, use_cache=True, **{_CACHE_ARG: cache})
                cache.reorder_cache(advance(beams, out.logits[:, -1], self.eos_token_id))
        return beams.best()

    def enable_fast_search(
        self, *, cuda_graphs: bool = True, compile: bool = False, backend: str = "inductor"
    ) -> CaptionDecoder:
        """Search over a fixed-size KV cache, each step one CUDA graph replay on CUDA (opt-in).

        See ``components.beam.FastBeamSearch``: the same captions up to the rounding of another
        attention kernel; the first caption of each batch size captures its graph (and with
        ``compile``, compiles its step first). Returns self.
        """
        self._fast_search = FastBeamSearch(
            self.gpt, self.eos_token_id, cuda_graphs=cuda_graphs, compile=compile, backend=backend
        )
        return self

    @property
    def fast_search(self) -> FastBeamSearch | None:
        """The fixed-cache search after ``enable_fast_search``, else None."""
        return self._fast_search

    def disable_fast_search(self) -> CaptionDecoder:
        """Back to transformers' GPT-2 forward over its growing cache; returns self."""
        self._fast_search = None
        return self

    def generate(self, latents: Tensor, *, beam_size: int = 5, max_new_tokens: int = 67) -> list[str]:
        """Text latents (B, L, prefix_dim) -> one caption per sample, by :meth:`beam_search`.

        Each caption is the best beam's tokens up to and including its EOS, decoded with special
        tokens skipped (so without the EOS) and otherwise unchanged, as the released code does.
        """
        token_ids, lengths = self.beam_search(latents, beam_size=beam_size, max_new_tokens=max_new_tokens)
        return [
            self.tokenizer.decode(ids[:n].tolist(), skip_special_tokens=True)
            for ids, n in zip(token_ids.cpu(), lengths.tolist(), strict=True)
        ]

    # ---- weights ------------------------------------------------------------------------------

    def state_dict_for_saving(self) -> dict[str, Tensor]:
        """The weights under our names, the tied output head left out (safetensors refuses shared tensors)."""
        state = self.state_dict()
        if self._tied:
            del state[LM_HEAD]
        return {name: t.detach().contiguous() for name, t in state.items()}

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, Tensor],
        config: CaptionDecoderConfig,
        tokenizer: PreTrainedTokenizerBase,
    ) -> CaptionDecoder:
        """Load :meth:`state_dict_for_saving` weights (our names, strict); the output head is re-tied."""
        model = cls(config, tokenizer)
        model._load(dict(state_dict), prefix="", layout="CaptionDecoder.state_dict_for_saving")
        return model

    @classmethod
    def from_official_state_dict(
        cls,
        state_dict: Mapping[str, Tensor],
        config: CaptionDecoderConfig,
        tokenizer: PreTrainedTokenizerBase,
    ) -> CaptionDecoder:
        """Load the released caption_decoder.pth weights, strictly.

        Its names are ours behind ``module.``: encode_prefix.*, decode_prefix.*, gpt.transformer.*
        and gpt.lm_head.weight (which must equal the tied token embedding). The causal-mask buffers
        older transformers saved (gpt.transformer.h.N.attn.bias / masked_bias) are dropped.
        """
        model = cls(config, tokenizer)
        state, foreign = {}, []
        for name, tensor in state_dict.items():
            if not name.startswith(OFFICIAL_PREFIX):
                foreign.append(name)
                continue
            ours = name[len(OFFICIAL_PREFIX) :]
            if not _OLD_MASK_BUFFER.fullmatch(ours):
                state[ours] = tensor
        model._load(state, prefix=OFFICIAL_PREFIX, layout="the released caption_decoder.pth", foreign=foreign)
        return model

    def _load(
        self, state: dict[str, Tensor], *, prefix: str, layout: str, foreign: Sequence[str] = ()
    ) -> None:
        expected = self.state_dict()
        if self._tied and LM_HEAD not in state and WTE in state:
            state[LM_HEAD] = state[WTE]
        missing = sorted(prefix + k for k in set(expected) - set(state))
        unexpected = sorted([*foreign, *(prefix + k for k in set(state) - set(expected))])
        if missing or unexpected:
            raise ValueError(
                f"caption decoder weights do not match the expected layout of {layout}: "
                f"missing keys {missing}, unexpected keys {unexpected}"
            )
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise ValueError(
                    f"{prefix}{name} has shape {tuple(tensor.shape)} but this config needs "
                    f"{tuple(expected[name].shape)} (expected the layout of {layout})"
                )
        if self._tied and not torch.equal(state[LM_HEAD], state[WTE]):
            raise ValueError(
                f"{prefix}{LM_HEAD} differs from {prefix}{WTE}; this decoder ties its output head to the "
                f"token embedding"
            )
        self.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------
# Presets


PRESETS: dict[str, CaptionDecoderConfig] = {
    # GPT-2 small with <|EOS|> added; the 768-wide CLIP ViT-L/14 text features, the 64-d latent.
    "released": CaptionDecoderConfig(),
    # For tests: the tiny tokenizer's vocabulary (tiny_gpt2_tokenizer()).
    "tiny": CaptionDecoderConfig(
        prefix_dim=8,
        feature_dim=16,
        gpt2={"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": TINY_VOCAB_SIZE, "n_positions": 1024},
    ),
}


def preset(name: str) -> CaptionDecoderConfig:
    """A named configuration (a fresh copy: its gpt2 dict can be edited freely)."""
    if name not in PRESETS:
        raise ValueError(f"unknown caption decoder preset {name!r}; choose one of {sorted(PRESETS)}")
    return CaptionDecoderConfig.from_dict(PRESETS[name].to_dict())
