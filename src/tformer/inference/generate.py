"""Incremental decoding with a KV cache: greedy, temperature, top-k, top-p, repetition penalty,
stop tokens, left-padded batches of prompts, streaming, seeded reproducibility.

Works with any causal LM that has `forward(ids, attention_mask=..., cache=...) -> logits`,
`new_cache(batch, max_len)` and `config.context_length` / `config.vocab_size` (see `CausalLM`).
Beam search lives in `tformer.inference.beam`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from tformer.models.protocols import CausalLM
from tformer.nn import check_token_ids
from tformer.nn.packed import packed_linears

# Upper bounds on the sizes a user types. Each one keeps a typo (--beam 100000) from hanging the
# machine or exhausting its memory: decoding state grows with rows x length.
MAX_NEW_TOKENS = 100_000  # tokens per call; every step is a forward pass and the output grows
MAX_ROWS = 4096  # sequences decoded together (prompts x beams, images per batch): each keeps a KV cache


def check_number(name: str, value: object) -> float:
    """`value` as a finite float, or one ValueError line: NaN passes every `<` check and then
    turns every probability into NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_count(name: str, value: object, minimum: int, maximum: int, why: str = "") -> int:
    """`value` as an int in [minimum, maximum], or one ValueError line that says the bound and why."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{name}={value} is more than {maximum:,}{f' ({why})' if why else ''}")
    return value


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn. `temperature=0` means greedy (argmax)."""

    temperature: float = 1.0
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set whose probability reaches p (nucleus)
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sequence (CTRL)

    def __post_init__(self) -> None:
        if check_number("temperature", self.temperature) < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None:
            check_count("top_k", self.top_k, 1, 2**31 - 1)
        if self.top_p is not None and not 0.0 < check_number("top_p", self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if check_number("repetition_penalty", self.repetition_penalty) <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


GREEDY = Sampling(temperature=0.0)
TEXT_SAMPLING = Sampling(temperature=0.8, top_k=200)  # text defaults: training samples, CLI, pipeline


def text_sampling(temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                  repetition_penalty: float = 1.0) -> Sampling:
    """Sampling settings for text, with TEXT_SAMPLING's temperature and top-k where None is given."""
    return Sampling(TEXT_SAMPLING.temperature if temperature is None else temperature,
                    TEXT_SAMPLING.top_k if top_k is None else top_k, top_p, repetition_penalty)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0,
                device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Left-pad prompts of different lengths: returns ids (B, T) and attention_mask (B, T) bool."""
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[i, width - len(prompt):] = True
    return ids, mask


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL (Keskar et al. 2019): divide positive, multiply negative logits of seen tokens.
    logits: (B, V); seen: (B, V) bool."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf. logits: (B, V)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False  # the top token always survives (a top_p below float32's
        # smallest number compares as 0, which would drop every token)
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -torch.inf)
    return logits


def scale(logits: Tensor, temperature: float) -> Tensor:
    """logits / temperature (B, V). Where that overflows (a tiny temperature or repetition
    penalty makes a logit infinite, and softmax then NaN), the row is shifted by its maximum
    first: the same distribution, with the largest logit at 0."""
    scaled = logits / temperature
    top = torch.finfo(logits.dtype).max
    clamped = logits.clamp(-top, top)
    shifted = (clamped - clamped.max(-1, keepdim=True).values) / temperature
    return torch.where(scaled.isfinite().all(-1, keepdim=True), scaled, shifted)


def choose_next(logits: Tensor, sampling: Sampling, seen: Tensor | None,
                generator: torch.Generator | None) -> Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    logits = logits.float()
    if sampling.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.temperature < torch.finfo(logits.dtype).tiny:  # 0, or a temperature float32 reads as 0
        return logits.argmax(-1)
    logits = filter_logits(scale(logits, sampling.temperature), sampling.top_k, sampling.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prepare_prompt(model: CausalLM, ids: Tensor | Sequence[Sequence[int]],
                   attention_mask: Tensor | None, max_new_tokens: int,
                   sliding: bool = False) -> tuple[Tensor, Tensor]:
    """Validate a prompt batch; return ids (B, T) and a bool attention mask (B, T). With
    `sliding`, a prompt longer than the context keeps its last context - 1 tokens."""
    device = next(model.parameters()).device  # type: ignore[attr-defined]
    if not isinstance(ids, Tensor):
        if attention_mask is not None:
            raise ValueError("give either token lists (padded for you) or a tensor with its "
                             "attention_mask, not token lists with a mask")
        ids, attention_mask = pad_prompts(ids, device=device)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"the prompt must be a non-empty (batch, length) tensor, got {tuple(ids.shape)}")
    mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} must equal the prompt shape "
                         f"{tuple(ids.shape)}")
    if not bool(mask.any(-1).all()):
        raise ValueError("a prompt in the batch is empty (all padding): give at least one token")
    if not bool(mask[:, -1].all()):  # the next token is read off the last position
        raise ValueError("prompts must be left-padded: the last position of every row must be a "
                         "real token (pad_prompts does this)")
    check_count("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS,
                "each token is a forward pass; generate in pieces")
    check_count("the number of prompts", ids.shape[0], 1, MAX_ROWS,
                "each row keeps a KV cache in memory; give fewer prompts per call")
    context = model.config.context_length  # type: ignore[attr-defined]
    if sliding and ids.shape[1] >= context:
        ids, mask = ids[:, -(context - 1):], mask[:, -(context - 1):]
        if not bool(mask.any(-1).all()):
            raise ValueError("a prompt has no real token in its last context - 1 positions")
    if not sliding and ids.shape[1] + max_new_tokens > context:
        raise ValueError(f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the model's context length ({context}); shorten the prompt, "
                         "generate fewer tokens, or pass sliding=True")
    check_token_ids(ids[mask], model.config.vocab_size)  # type: ignore[attr-defined]
    return ids.to(device), mask.to(device)


def last_logits(model: CausalLM, ids: Tensor, mask: Tensor | None, cache: Any) -> Tensor:
    """Next-token logits (B, V) after `ids`: the model's `next_logits` where it has one (no LM head
    at the other positions), else the last row of its logits."""
    fast = getattr(model, "next_logits", None)
    if fast is not None:
        return fast(ids, attention_mask=mask, cache=cache)
    return model(ids, attention_mask=mask, cache=cache)[:, -1]


def _decode(model: CausalLM, ids: Tensor, mask: Tensor, max_new_tokens: int, sampling: Sampling,
            seen: Tensor | None, generator: torch.Generator | None, stop: Tensor, pad: int, context: int,
            cache_len: int, sliding: bool) -> Iterator[Tensor]:
    """The prefill and the decode loop of `stream` (its arguments already checked)."""
    B, T = ids.shape
    with torch.inference_mode():
        cache = model.new_cache(B, cache_len)
        logits = last_logits(model, ids, mask, cache)
    used, finished = T, torch.zeros(B, dtype=torch.bool, device=ids.device)
    for step in range(max_new_tokens):
        with torch.inference_mode():
            token = choose_next(logits, sampling, seen, generator)
            token = torch.where(finished, torch.full_like(token, pad), token)
        yield token
        with torch.inference_mode():
            finished |= torch.isin(token, stop)
            if step == max_new_tokens - 1 or bool(finished.all()):
                return
            if seen is not None:
                seen[torch.arange(B), token] = True
            ids = torch.cat([ids, token.unsqueeze(1)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if used == cache_len:  # only when sliding: restart from the last half context
                keep = max(1, context // 2)
                cache = model.new_cache(B, cache_len)
                logits = last_logits(model, ids[:, -keep:], mask[:, -keep:], cache)
                used = keep
            else:
                logits = model(token.unsqueeze(1), cache=cache)[:, -1]
                used += 1


def stream(model: CausalLM, ids: Tensor | Sequence[Sequence[int]], max_new_tokens: int,
           sampling: Sampling | None = None, *, attention_mask: Tensor | None = None,
           stop_tokens: Sequence[int] = (), pad_id: int | None = None, seed: int | None = None,
           sliding: bool = False) -> Iterator[Tensor]:
    """Yield the next token of every sequence, (B,), one step at a time.

    sampling: None for greedy. Rows that emitted a stop token continue with `pad_id` (default:
    the first stop token) until every row has stopped or max_new_tokens is reached.
    sliding: generate past the context length; when the cache is full, the last half of the
    context is re-encoded into a fresh cache (as nanoGPT crops its input).
    """
    sampling = sampling or GREEDY
    ids, mask = prepare_prompt(model, ids, attention_mask, max_new_tokens, sliding)
    B, T = ids.shape
    generator = None
    if seed is not None:
        generator = torch.Generator(device=ids.device).manual_seed(seed)
    vocab = model.config.vocab_size  # type: ignore[attr-defined]
    context = model.config.context_length  # type: ignore[attr-defined]
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=ids.device)
    pad = pad_id if pad_id is not None else (int(stop[0]) if len(stop) else 0)
    for name, token_id in [("pad_id", pad), *(("stop token", int(t)) for t in stop)]:
        if not 0 <= token_id < vocab:
            raise ValueError(f"{name} {token_id} is outside the vocabulary [0, {vocab})")
    # cache lengths in steps of 64 so a compiled model sees few distinct shapes
    cache_len = context if sliding else min(context, -(-(T + max_new_tokens) // 64) * 64)
    seen = None
    if sampling.repetition_penalty != 1.0:
        counts = torch.zeros(B, vocab, dtype=torch.long, device=ids.device)
        seen = counts.scatter_add_(1, ids, mask.long()) > 0  # (B, V): token occurs in the prompt
    was_training = model.training  # type: ignore[attr-defined]
    model.eval()  # type: ignore[attr-defined]
    try:  # grad mode is set per call, not across `yield`, so the caller's code runs unaffected
        with packed_linears(model):  # bf16 on CPU: weights packed once (nn.packed)
            yield from _decode(model, ids, mask, max_new_tokens, sampling, seen, generator, stop, pad,
                               context, cache_len, sliding)
    finally:
        model.train(was_training)  # type: ignore[attr-defined]


def generate(model: CausalLM, ids: Tensor | Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Sampling | None = None, *, attention_mask: Tensor | None = None,
             stop_tokens: Sequence[int] = (), pad_id: int | None = None, seed: int | None = None,
             on_token: Callable[[Tensor], None] | None = None, sliding: bool = False) -> Tensor:
    """Prompt (B, T) -> prompt followed by the new tokens (B, T + n), n <= max_new_tokens.

    A list of token lists is left-padded for you. `on_token` receives each step's tokens (B,)
    as they are produced (streaming); `seed` makes sampling reproducible.
    """
    if not isinstance(ids, Tensor):
        device = next(model.parameters()).device  # type: ignore[attr-defined]
        ids, attention_mask = pad_prompts(ids, device=device)
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    steps = []
    for token in stream(model, ids, max_new_tokens, sampling, attention_mask=attention_mask,
                        stop_tokens=stop_tokens, pad_id=pad_id, seed=seed, sliding=sliding):
        steps.append(token)
        if on_token is not None:
            on_token(token)
    if sliding and ids.shape[1] >= model.config.context_length:  # type: ignore[attr-defined]
        ids = ids[:, -(model.config.context_length - 1):]  # type: ignore[attr-defined]
    return torch.cat([ids.to(steps[0].device), torch.stack(steps, dim=1)], dim=1)
