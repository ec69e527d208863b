"""Beam search for the caption decoder: the search itself, and GPT-2 steps of fixed shape.

The search (``Beams``, ``first_beams``, ``advance``) is the released one, batched: length-
normalised scores, a beam that has emitted EOS continues only with token 0 at no cost, and a
finished sample keeps its beams untouched. Its state lives in tensors of fixed shape that are
updated in place and never read back to the host, so one step of it can be captured as a CUDA
graph. ``CaptionDecoder.beam_search`` runs it over transformers' GPT-2 and its growing KV cache.

``FastBeamSearch`` runs the same search over ``StaticGPT2``: GPT-2's own layers called one by one
over a KV cache allocated once at full length (the prefix plus every generated token), a new
token's keys and values written at a position held in a device tensor and attention masked past
it. On CUDA one step (GPT-2 on the newest token of every beam, the search's update, the cache
reordered by beam) is captured once per batch, prefix length, beam size and token budget, and
each later step is one graph replay; a step of eager transformers costs a few hundred kernel
launches and the Python around them, which at batch 1 is most of a caption's time.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..fast import capture_graph

# How many graph replays run between two reads of "is every sample finished?": each read waits for
# the GPU. The steps after the last sample finished change nothing that is returned.
CHECK_EVERY = 8


def log_probs(logits: Tensor) -> Tensor:
    """Softmax then log, as the released search does (not log_softmax), in fp32.

    The same scores bit for bit, so that ties and near-ties resolve the same way; fp32 whatever the
    model's dtype, since scores summed over 67 tokens in bf16 would keep 2 to 3 significant digits.
    """
    return logits.float().softmax(dim=-1).log()


@dataclass
class Beams:
    """The search's state for B samples of k beams, T = the token budget; updated in place."""

    scores: Tensor  # (B, k) float32, summed log-probabilities
    lengths: Tensor  # (B, k) int32, tokens up to and including EOS
    stopped: Tensor  # (B, k) bool, the beam has emitted EOS
    finished: Tensor  # (B,) bool, every beam of the sample has emitted EOS
    tokens: Tensor  # (B, k, T) long, column t the token chosen at step t; 0 after a beam's end
    last: Tensor  # (B, k) long, the newest token of each beam (the next GPT-2 input)
    step: Tensor  # () long, the column the next token is written to
    active: Tensor  # () long, the steps taken while some sample was unfinished

    def load(self, other: Beams) -> None:
        """Copy another state of the same shapes into this one's tensors."""
        for f in fields(self):
            getattr(self, f.name).copy_(getattr(other, f.name))

    def best(self) -> tuple[Tensor, Tensor]:
        """The best beam of each sample by mean log-probability: token_ids (B, T'), lengths (B,).

        T' is one more than the steps taken while some sample was unfinished, the width the
        search had when it stopped.
        """
        width = int(self.active) + 1
        best = (self.scores / self.lengths).argsort(dim=-1, descending=True)[:, 0]  # (B,)
        rows = torch.arange(best.shape[0], device=best.device)
        return self.tokens[rows, best, :width], self.lengths[rows, best].long()


def first_beams(logits: Tensor, beam_size: int, eos: int, max_new_tokens: int) -> Beams:
    """The state after the first step: the ``beam_size`` likeliest first tokens per sample.

    Args:
        logits: the next-token logits after the prefix, (B, V).
    """
    batch, device = logits.shape[0], logits.device
    scores, first = log_probs(logits).topk(beam_size, dim=-1)  # (B, k), (B, k)
    tokens = torch.zeros(batch, beam_size, max_new_tokens, dtype=torch.long, device=device)
    tokens[..., 0] = first
    stopped = first == eos
    return Beams(
        scores=scores,
        lengths=torch.ones(batch, beam_size, dtype=torch.int32, device=device),
        stopped=stopped,
        finished=stopped.all(dim=-1),
        tokens=tokens,
        last=first,
        step=torch.ones((), dtype=torch.long, device=device),
        active=torch.zeros((), dtype=torch.long, device=device),
    )


def advance(beams: Beams, logits: Tensor, eos: int) -> Tensor:
    """One step of the search, in place; returns the cache row each beam continues, (B*k,).

    Every live beam is extended by every token and the k candidates with the best mean
    log-probability per token survive; a finished sample is left as it was (the released search
    has stopped there, and another round of mean * length would shift its scores by rounding).

    Args:
        logits: the next-token logits of every beam, (B*k, V), rows sample-major.
    """
    batch, k = beams.scores.shape
    vocab = logits.shape[-1]
    stopped, finished = beams.stopped, beams.finished
    logp = log_probs(logits).reshape(batch, k, vocab)  # (B, k, V)
    # A stopped beam continues only with token 0, at no cost.
    logp = logp.masked_fill(stopped[..., None], float("-inf"))
    logp[..., 0] = logp[..., 0].masked_fill(stopped, 0.0)
    total = beams.scores[..., None] + logp  # (B, k, V) summed log-probabilities
    grown = beams.lengths + (~stopped).to(beams.lengths.dtype)  # (B, k) tokens per beam after this step
    mean = total / grown[..., None]  # (B, k, V)
    best_mean, flat = mean.reshape(batch, k * vocab).topk(k, dim=-1)  # (B, k)
    source = torch.div(flat, vocab, rounding_mode="floor")  # (B, k) the beam each candidate extends
    token = flat % vocab  # (B, k)
    new_lengths = grown.gather(1, source)  # (B, k)
    new_scores = best_mean * new_lengths  # back from the mean to the sum, as released (same rounding)
    new_stopped = stopped.gather(1, source) | (token == eos)  # (B, k)

    keep = finished[:, None]  # (B, 1)
    same_beam = torch.arange(k, device=source.device).expand(batch, k)
    source = torch.where(keep, same_beam, source)
    token = torch.where(keep, torch.zeros_like(token), token)
    history = beams.tokens.gather(1, source[..., None].expand_as(beams.tokens))  # (B, k, T)
    column = torch.arange(beams.tokens.shape[-1], device=token.device)  # (T,)
    beams.active.add_((~finished.all()).long())
    beams.tokens.copy_(torch.where(column == beams.step, token[..., None], history))
    beams.scores.copy_(torch.where(keep, beams.scores, new_scores))
    beams.lengths.copy_(torch.where(keep, beams.lengths, new_lengths))
    beams.stopped.copy_(torch.where(keep, stopped, new_stopped))
    beams.finished.copy_(beams.stopped.all(dim=-1))
    beams.last.copy_(token)
    beams.step.add_(1)
    first_row = torch.arange(batch, device=source.device)[:, None] * k  # (B, 1)
    return (first_row + source).reshape(-1)


class StaticGPT2:
    """GPT-2's forward over a KV cache allocated once, for ``rows`` sequences of ``length`` tokens.

    It calls the model's own modules (embeddings, each block's norms, projections and MLP, the
    final norm and the tied head) and does the attention itself, so that a step has fixed shapes
    and no host synchronisation.

    Args:
        gpt: transformers' GPT2LMHeadModel, in eval mode.
        rows: sequences in the cache (batch x beams).
        length: the most tokens a sequence reaches (prefix and generated).
    """

    def __init__(self, gpt: nn.Module, rows: int, length: int):
        self.gpt = gpt
        cfg = gpt.config
        self.heads, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        weight = gpt.transformer.wte.weight
        shape = (rows, self.heads, length, self.head_dim)
        self.keys = [weight.new_zeros(shape) for _ in gpt.transformer.h]
        self.values = [weight.new_zeros(shape) for _ in gpt.transformer.h]
        self.positions = torch.arange(length, device=weight.device)  # (length,)

    def _split(self, block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(N, S, E) -> queries, keys and values, each (N, heads, S, head_dim)."""
        n, s, _ = x.shape
        q, k, v = block.attn.c_attn(block.ln_1(x)).split(self.heads * self.head_dim, dim=2)
        return tuple(t.view(n, s, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))

    def _finish(self, block: nn.Module, x: Tensor, attended: Tensor) -> Tensor:
        n, _, s, _ = attended.shape
        x = x + block.attn.c_proj(attended.transpose(1, 2).reshape(n, s, -1))
        return x + block.mlp(block.ln_2(x))

    def _logits(self, x: Tensor) -> Tensor:
        return self.gpt.lm_head(self.gpt.transformer.ln_f(x))

    def prefill(self, embeds: Tensor, repeat: int) -> Tensor:
        """Run the prefix (B, L, E) and cache it for ``repeat`` beams each; the last logits (B, V)."""
        for cache in (*self.keys, *self.values):
            cache.zero_()  # nothing of an earlier search stays behind the mask
        length = embeds.shape[1]
        x = embeds + self.gpt.transformer.wpe(self.positions[:length])
        for i, block in enumerate(self.gpt.transformer.h):
            q, k, v = self._split(block, x)
            self.keys[i][:, :, :length] = k.repeat_interleave(repeat, dim=0)
            self.values[i][:, :, :length] = v.repeat_interleave(repeat, dim=0)
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=block.attn.scaling)
            x = self._finish(block, x, attended)
        return self._logits(x[:, -1])

    def step(self, tokens: Tensor, position: Tensor) -> Tensor:
        """One new token per row, (N,), at ``position`` (a () long tensor); its logits (N, V)."""
        wte, wpe = self.gpt.transformer.wte, self.gpt.transformer.wpe
        x = (wte(tokens) + wpe(position))[:, None]  # (N, 1, E)
        seen = (self.positions <= position)[None]  # (1, length) the cached positions attended to
        where = position.reshape(1)
        for i, block in enumerate(self.gpt.transformer.h):
            q, k, v = self._split(block, x)
            self.keys[i].index_copy_(2, where, k)
            self.values[i].index_copy_(2, where, v)
            attended = F.scaled_dot_product_attention(
                q, self.keys[i], self.values[i], attn_mask=seen, scale=block.attn.scaling
            )
            x = self._finish(block, x, attended)
        return self._logits(x[:, 0])

    def reorder(self, rows: Tensor) -> None:
        """Each cache row becomes the row it continues, (N,) indices."""
        for cache in (*self.keys, *self.values):
            cache.copy_(cache.index_select(0, rows))


class _Plan:
    """The buffers of one search shape and, on CUDA, its step captured as a graph."""

    def __init__(
        self,
        gpt: nn.Module,
        batch: int,
        length: int,
        beam_size: int,
        max_new_tokens: int,
        eos: int,
        compile_backend: str | None = None,
    ):
        self.length, self.beam_size, self.max_new_tokens, self.eos = length, beam_size, max_new_tokens, eos
        self.model = StaticGPT2(gpt, batch * beam_size, length + max_new_tokens - 1)
        weight = gpt.transformer.wte.weight
        vocab = weight.shape[0]
        self.beams = first_beams(weight.new_zeros(batch, vocab), beam_size, eos, max_new_tokens)
        self.graph: torch.cuda.CUDAGraph | None = None

        # With a backend, GPT-2's step, the search's update and the cache reorder are compiled
        # each apart (fewer, fused kernels per token). Not as one function: there inductor
        # (torch 2.13, CPU) turns the cache's `index_copy_` followed by
        # `cache.copy_(cache.index_select(0, rows))` into a gather in place without a temporary,
        # so a row that reads a row already overwritten gets the wrong one (reproduced with one
        # 4-d tensor and those two lines alone; either line compiled alone is right). Apart, the
        # three give the reference's captions exactly.
        def wrap(f):
            return torch.compile(f, backend=compile_backend, dynamic=False) if compile_backend else f

        self._model_step, self._advance, self._reorder = (
            wrap(self.model.step),
            wrap(advance),
            wrap(self.model.reorder),
        )

    def step(self) -> None:
        beams = self.beams
        logits = self._model_step(beams.last.reshape(-1), beams.step + (self.length - 1))
        self._reorder(self._advance(beams, logits, self.eos))

    def capture(self, pool) -> None:
        """Capture ``step``; its warm-up steps change the buffers, which ``run`` reloads."""
        self.graph, _ = capture_graph(self.step, pool)

    def run(self, prefix: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model.prefill(prefix, self.beam_size)
        self.beams.load(first_beams(logits, self.beam_size, self.eos, self.max_new_tokens))
        every = CHECK_EVERY if self.graph is not None else 1
        for i in range(self.max_new_tokens - 1):
            if i % every == 0 and bool(self.beams.finished.all()):
                break
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
        return self.beams.best()


class FastBeamSearch:
    """The caption decoder's beam search over ``StaticGPT2``, captured per shape on CUDA.

    It returns what ``CaptionDecoder.beam_search`` returns, up to the rounding of a different
    attention kernel. Buffers (the KV cache: 2 x layers x batch x beams x length x width values)
    and graphs are kept per (batch, prefix length, beam size, token budget) for the object's life.

    Args:
        gpt: the decoder's GPT2LMHeadModel.
        eos: the id of the token that ends a caption.
        cuda_graphs: capture each shape's step as a CUDA graph (CUDA devices only).
        compile: ``torch.compile`` the step first (one compilation per search shape).
        backend: the ``torch.compile`` backend.
    """

    def __init__(
        self,
        gpt: nn.Module,
        eos: int,
        *,
        cuda_graphs: bool = True,
        compile: bool = False,
        backend: str = "inductor",
    ):
        cfg = gpt.config
        unsupported = [
            name
            for name in ("add_cross_attention", "reorder_and_upcast_attn", "scale_attn_by_inverse_layer_idx")
            if getattr(cfg, name, False)
        ]
        if unsupported:
            raise ValueError(
                f"FastBeamSearch: GPT-2 options {unsupported} are not supported; use beam_search"
            )
        self.gpt, self.eos, self.cuda_graphs = gpt, eos, cuda_graphs
        self.compile, self.backend = compile, backend
        self._plans: dict[tuple, _Plan] = {}
        self._pool = None

    @property
    def num_graphs(self) -> int:
        """Steps captured so far (one per search shape)."""
        return sum(plan.graph is not None for plan in self._plans.values())

    def __call__(self, prefix: Tensor, beam_size: int, max_new_tokens: int) -> tuple[Tensor, Tensor]:
        """Search from GPT-2 prefix embeddings (B, L, E): token_ids (B, T) and lengths (B,)."""
        batch, length = prefix.shape[:2]
        key = (batch, length, beam_size, max_new_tokens, prefix.dtype, prefix.device)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _Plan(
                self.gpt,
                batch,
                length,
                beam_size,
                max_new_tokens,
                self.eos,
                self.backend if self.compile else None,
            )
            if self.cuda_graphs and prefix.device.type == "cuda" and max_new_tokens > 1:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()  # the plans never run at once
                plan.capture(self._pool)
        return plan.run(prefix)
