"""Preallocated key/value caches for incremental decoding.

Buffers have a fixed shape (batch, kv_heads, max_len, head_dim) and the write position is a
0-d tensor, so a compiled decoding step sees the same shapes every step and does not recompile.
Attention reads the whole buffer; unwritten slots are hidden by the causal mask and `valid`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


class KVCache:
    """Keys and values of every layer of one decoder, plus which slots hold real tokens.

    valid:    (B, max_len) bool: slot holds a token that is not padding
    seen:     (B,) long: real tokens per row so far (the next token's position id)
    position: 0-d long: slots written so far (the same for every row)

    `n_kv_heads` is one count for every layer, or one per layer (a pruned model's layers keep
    different numbers of heads).
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int | Sequence[int], head_dim: int, max_len: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        heads = [n_kv_heads] * n_layers if isinstance(n_kv_heads, int) else list(n_kv_heads)
        if len(heads) != n_layers:
            raise ValueError(f"give one key/value head count per layer ({n_layers}), got {len(heads)}")
        self.layers = [LayerKV(self, torch.zeros((batch, h, max_len, head_dim), dtype=dtype, device=device),
                               torch.zeros((batch, h, max_len, head_dim), dtype=dtype, device=device))
                       for h in heads]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.offset = torch.zeros((), dtype=torch.long, device=device)  # where this step writes
        self.max_len = max_len
        self.length = 0  # Python mirror of `position` for error checks; not updated when compiled

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def append(self, new_valid: Tensor) -> Tensor:
        """Reserve slots for T new tokens (new_valid: (B, T) bool) and return their position ids
        (B, T): each row counts its real tokens only, so left padding does not shift positions."""
        T = new_valid.shape[1]
        if not torch.compiler.is_compiling():
            if self.length + T > self.max_len:
                raise ValueError(f"KV cache is full: it holds {self.max_len} tokens, "
                                 f"{self.length} are used and {T} more were given; "
                                 "create a larger cache (max_len) or shorten the input")
            self.length += T
        self.offset.copy_(self.position)
        slots = self.offset + torch.arange(T, device=new_valid.device)
        self.valid.index_copy_(1, slots, new_valid)
        positions = self.seen.unsqueeze(1) + new_valid.long().cumsum(-1) - 1
        self.seen += new_valid.sum(-1)
        self.position += T
        return positions.clamp(min=0)

    def reorder(self, rows: Tensor) -> None:
        """Keep rows `rows` (B',) of the batch, in that order (beam search)."""
        for layer in self.layers:
            layer.keys = layer.keys.index_select(0, rows)
            layer.values = layer.values.index_select(0, rows)
        self.valid = self.valid.index_select(0, rows)
        self.seen = self.seen.index_select(0, rows)


class LayerKV:
    """One layer's view of a KVCache."""

    def __init__(self, cache: KVCache, keys: Tensor, values: Tensor) -> None:
        self.cache = cache
        self.keys = keys
        self.values = values

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, Hkv, T, D) at the cache's current offset; return the full buffers."""
        slots = self.cache.offset + torch.arange(k.shape[2], device=k.device)
        self.keys.index_copy_(2, slots, k.to(self.keys.dtype))
        self.values.index_copy_(2, slots, v.to(self.values.dtype))
        return self.keys, self.values


class CrossKV:
    """Cross-attention keys/values of a fixed context (encoder output), projected once."""

    def __init__(self) -> None:
        self.keys: Tensor | None = None
        self.values: Tensor | None = None

    def reorder(self, rows: Tensor) -> None:
        if self.keys is not None:
            self.keys = self.keys.index_select(0, rows)
            self.values = self.values.index_select(0, rows)
