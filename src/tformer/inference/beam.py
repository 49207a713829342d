"""Beam search over a causal LM with a shared KV cache: B prompts x W beams decoded as one batch
of B * W rows, length-normalised scores, eos handling and n-best lists (Hugging Face conventions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from tformer.inference.generate import MAX_ROWS, check_count, check_number, last_logits, prepare_prompt
from tformer.models.protocols import CausalLM
from tformer.nn import KVCache
from tformer.nn.modes import evaluating
from tformer.nn.packed import packed_linears

MAX_BEAM_WIDTH = 256  # every beam is a decoded row with its own KV cache; 4-10 is usual for translation
MAX_LENGTH_PENALTY = 10.0  # score = log_prob / length ** penalty stays finite for any length we allow


@dataclass(frozen=True)
class Hypothesis:
    """A finished beam. tokens: the generated tokens only (eos included if emitted);
    log_prob: their summed log-probability; score: log_prob / len(tokens) ** length_penalty."""

    tokens: list[int]
    score: float
    log_prob: float


class _Finished:
    """The best `width` finished hypotheses of one prompt (Hugging Face's BeamHypotheses)."""

    def __init__(self, width: int, length_penalty: float) -> None:
        self.width, self.length_penalty = width, length_penalty
        self.kept: list[Hypothesis] = []

    def add(self, tokens: list[int], log_prob: float) -> None:
        score = log_prob / len(tokens) ** self.length_penalty
        self.kept.append(Hypothesis(tokens, score, log_prob))
        if len(self.kept) > self.width:  # drop the worst; ties keep the earlier (higher-ranked)
            self.kept.remove(min(reversed(self.kept), key=lambda h: h.score))

    def is_done(self, best_live: float, length: int, max_length: int, early_stopping: bool) -> bool:
        """Whether no live beam can still enter the kept set.

        Log-probs are <= 0, so a live beam's summed log-prob only falls as it grows. Its best
        reachable score is therefore best_live / L ** lp at the most favourable final length L:
        with lp > 0 a longer beam divides by more, so L = max_length (Hugging Face's exact bound,
        its `early_stopping="never"`); with lp <= 0 growing never helps, so L = the current length.
        """
        if len(self.kept) < self.width:
            return False
        if early_stopping:
            return True
        bound_length = max_length if self.length_penalty > 0 else length
        best_reachable = best_live / bound_length ** self.length_penalty
        return min(h.score for h in self.kept) >= best_reachable


def _check_args(model: CausalLM, beam_width: int, n_best: int, eos_token: int | None,
                length_penalty: float) -> None:
    """Refuse, before any work, a width that would not fit: each beam holds a KV cache. A width
    above the vocabulary size is allowed: beams are sequences (V**n of them after n tokens), and
    width V**n makes the search exhaustive."""
    vocab = model.config.vocab_size  # type: ignore[attr-defined]
    check_count("beam_width", beam_width, 1, MAX_BEAM_WIDTH, "every beam keeps a KV cache in memory; "
                "4 to 10 is usual")
    if isinstance(n_best, bool) or not isinstance(n_best, int) or not 1 <= n_best <= beam_width:
        raise ValueError(f"n_best must be between 1 and beam_width ({beam_width}), got {n_best!r}")
    if eos_token is not None and not 0 <= eos_token < vocab:
        raise ValueError(f"eos_token {eos_token} is outside the vocabulary [0, {vocab})")
    if abs(check_number("length_penalty", length_penalty)) > MAX_LENGTH_PENALTY:
        raise ValueError(f"length_penalty must be in [-{MAX_LENGTH_PENALTY:g}, {MAX_LENGTH_PENALTY:g}] "
                         f"(length ** penalty overflows beyond; 0 to 2 is usual), got {length_penalty}")


def _select(scores: Tensor, width: int, eos_token: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """Top 2W candidates of each prompt; scores: (B, W * V) summed log-probs.

    Returns the candidates (scores, flat ids), both (B, 2W) best first, and `live` (B, W): the
    positions of the W best candidates that do not end in eos. With one eos token at most W of
    the 2W end in eos, so W live ones always exist."""
    k = min(2 * width, scores.shape[1])
    top_scores, top_ids = scores.topk(k, dim=-1)  # (B, k), sorted
    vocab = scores.shape[1] // width
    rank = torch.arange(k, device=scores.device).expand_as(top_ids)
    ends = top_ids % vocab == (-1 if eos_token is None else eos_token)  # (B, k) bool
    live = (rank + k * ends.long()).argsort(dim=-1)[:, :width]  # non-eos first, in rank order
    return top_scores, top_ids, live


def beam_search(model: CausalLM, ids: Tensor | Sequence[Sequence[int]], beam_width: int,
                max_new_tokens: int, *, attention_mask: Tensor | None = None,
                length_penalty: float = 1.0, early_stopping: bool = True,
                eos_token: int | None = None, n_best: int = 1) -> list[list[Hypothesis]]:
    """Beam search for each prompt of ids (B, T) (or a list of token lists, left-padded for you).

    Returns one list per prompt of up to n_best hypotheses, best score first (fewer only when
    fewer distinct continuations exist). A hypothesis ends at eos or after max_new_tokens.
    early_stopping=True: a prompt stops once W hypotheses have finished; False: once no live beam
    can beat the worst kept one (see `_Finished.is_done` for the bound). As in transformers'
    beam search: of the top 2W candidates, eos ones ranked within the top W finish and the W best
    others continue; after the last step the live beams of prompts still open are hypotheses too,
    competing with those that ended in eos at that step.
    """
    _check_args(model, beam_width, n_best, eos_token, length_penalty)
    ids, mask = prepare_prompt(model, ids, attention_mask, max_new_tokens)
    B, W = ids.shape[0], beam_width
    check_count("prompts x beam_width", B * W, 1, MAX_ROWS,
                "each beam keeps a KV cache in memory; give fewer prompts per call or fewer beams")
    finished = [_Finished(W, length_penalty) for _ in range(B)]
    done = [False] * B
    with evaluating(model), torch.inference_mode(), packed_linears(model):  # type: ignore[arg-type]
        cache, logits = _prefill(model, ids, mask, W, max_new_tokens)  # logits: (B * W, V)
        beam_scores = torch.full((B, W), -math.inf, device=ids.device)
        beam_scores[:, 0] = 0.0  # only beam 0 is live at first, so no duplicate beams
        history = torch.zeros(B * W, 0, dtype=torch.long, device=ids.device)  # (B * W, step)
        for step in range(max_new_tokens):
            log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B * W, V)
            V = log_probs.shape[-1]
            scores = (beam_scores.unsqueeze(-1) + log_probs.view(B, W, V)).view(B, W * V)
            top_scores, top_ids, live = _select(scores, W, eos_token)  # (B, 2W), (B, 2W), (B, W)
            parents = torch.arange(B, device=ids.device).unsqueeze(1) * W + top_ids // V  # (B, 2W)
            _finish_eos(finished, done, history, top_scores, top_ids, parents, W, V, eos_token)
            beam_scores = top_scores.gather(1, live)  # (B, W)
            rows = parents.gather(1, live).view(-1)  # (B * W,) the parent row of each new beam
            tokens = (top_ids.gather(1, live) % V).view(-1, 1)  # (B * W, 1)
            history = torch.cat([history.index_select(0, rows), tokens], dim=1)
            if step == max_new_tokens - 1:  # live beams are complete too: `_collect` adds them
                break
            best_live = beam_scores.max(dim=1).values.tolist()  # (B,): one device sync
            for b in range(B):
                done[b] = done[b] or finished[b].is_done(best_live[b], step + 1, max_new_tokens,
                                                         early_stopping)
            if all(done):
                break
            cache.reorder(rows)
            logits = model(tokens, cache=cache)[:, -1]  # (B * W, V)
    return _collect(finished, done, history, beam_scores, n_best)


def _prefill(model: CausalLM, ids: Tensor, mask: Tensor, width: int,
             max_new_tokens: int) -> tuple[KVCache, Tensor]:
    """Run the B prompts once, then copy each prompt's cache row and last logits to its W beams.
    Returns the cache (batch B * W) and the next-token logits (B * W, V)."""
    B, T = ids.shape
    cache = model.new_cache(B, T + max_new_tokens)
    logits = last_logits(model, ids, mask, cache)  # (B, V)
    expand = torch.arange(B, device=ids.device).repeat_interleave(width)  # (B * W,): 0,0,..,1,1,..
    cache.reorder(expand)
    return cache, logits.index_select(0, expand)


def _finish_eos(finished: list[_Finished], done: list[bool], history: Tensor, top_scores: Tensor,
                top_ids: Tensor, parents: Tensor, width: int, vocab: int,
                eos_token: int | None) -> None:
    """Store the candidates that end in eos and rank within the top W of their prompt."""
    if eos_token is None:
        return
    ends = (top_ids[:, :width] % vocab == eos_token) & top_scores[:, :width].isfinite()  # (B, W)
    for b, rank in ends.nonzero().tolist():
        if not done[b]:
            tokens = history[int(parents[b, rank])].tolist() + [eos_token]
            finished[b].add(tokens, float(top_scores[b, rank]))


def _collect(finished: list[_Finished], done: list[bool], history: Tensor, beam_scores: Tensor,
             n_best: int) -> list[list[Hypothesis]]:
    """Add the live beams of unfinished prompts, then the n_best hypotheses of each prompt."""
    B, W = beam_scores.shape
    results = []
    for b in range(B):
        if not done[b]:
            for beam in range(W):
                log_prob = float(beam_scores[b, beam])
                if math.isfinite(log_prob):  # -inf: a filler beam that never became live
                    finished[b].add(history[b * W + beam].tolist(), log_prob)
        results.append(sorted(finished[b].kept, key=lambda h: -h.score)[:n_best])
    return results
