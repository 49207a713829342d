"""Generation from a memory LM (Transformer-XL): the prompt goes in segments of `seg_len`, then one
token at a time; the segment memory (`mem_len` positions) replaces a KV cache, so the context is
not bounded by a cache size."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor

from tformer.inference.generate import MAX_NEW_TOKENS, Sampling, check_count, choose_next
from tformer.models.protocols import MemoryLM
from tformer.nn.modes import evaluating


@torch.no_grad()
def stream_with_memory(model: MemoryLM, prompt: Sequence[int], max_new_tokens: int, sampling: Sampling, *,
                       mem_len: int | None = None, seed: int | None = None) -> Iterator[int]:
    """Yield up to `max_new_tokens` sampled token ids after `prompt` (default memory length:
    config.eval_memory)."""
    if len(prompt) == 0:
        raise ValueError("the prompt is empty: give at least one token")
    check_count("max_new_tokens", max_new_tokens, 0, MAX_NEW_TOKENS, "each token is a forward pass; "
                "generate in pieces")
    if mem_len is not None:
        check_count("mem_len", mem_len, 0, MAX_NEW_TOKENS, "positions of memory kept per layer")
    device = next(model.parameters()).device  # type: ignore[attr-defined]
    ids = torch.tensor([list(prompt)], device=device)
    memory = model.new_memory(1, model.config.eval_memory if mem_len is None else mem_len)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    with evaluating(model):  # type: ignore[arg-type]
        for chunk in ids.split(model.config.seg_len, dim=1):
            logits, memory = model(chunk, memory)  # type: ignore[operator]
        for _ in range(max_new_tokens):
            token = choose_next(logits[:, -1], sampling, None, generator)  # (1,)
            yield int(token)
            logits, memory = model(token.unsqueeze(1), memory)  # type: ignore[operator]


def generate_with_memory(model: MemoryLM, prompt: Sequence[int], max_new_tokens: int, sampling: Sampling, *,
                         mem_len: int | None = None, seed: int | None = None) -> Tensor:
    """Prompt + up to `max_new_tokens` sampled tokens (1-D)."""
    new = list(stream_with_memory(model, prompt, max_new_tokens, sampling, mem_len=mem_len, seed=seed))
    return torch.tensor([*prompt, *new], dtype=torch.long)
