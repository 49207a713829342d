"""Attention patterns as mask functions `(b, h, q_idx, kv_idx) -> bool` (True = may attend).

One definition feeds every backend: `Mask.dense(...)` evaluates it on broadcast index grids for
SDPA / eager attention, `Mask.block_mask(...)` hands the same function to FlexAttention.
Query indices are absolute positions: with a KV cache, pass `q_offset` (an int or a 0-d tensor)
and query row i stands at position `q_offset + i`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class Mask:
    """A named mask function. `batch_dependent` masks read per-example tensors (padding, prefix
    lengths); their block masks are rebuilt per call instead of cached."""

    mod: MaskMod
    name: str
    batch_dependent: bool = False
    is_causal: bool = False  # exactly `q_idx >= kv_idx`: lets SDPA use its causal kernels
    _block_masks: dict = field(default_factory=dict, repr=False, compare=False)

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.mod(b, h, q_idx, kv_idx)

    def __and__(self, other: Mask) -> Mask:
        return and_masks(self, other)

    def __or__(self, other: Mask) -> Mask:
        return or_masks(self, other)

    def dense(
        self,
        batch: int,
        heads: int,
        q_len: int,
        kv_len: int,
        *,
        q_offset: int | Tensor = 0,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Boolean mask broadcastable to (batch, heads, q_len, kv_len)."""
        b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
        h = torch.arange(heads, device=device).view(1, -1, 1, 1)
        q = (torch.arange(q_len, device=device) + q_offset).view(1, 1, -1, 1)
        kv = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
        out = self.mod(b, h, q, kv)
        return out.expand(out.shape[0], out.shape[1], q_len, kv_len)

    def block_mask(
        self,
        batch: int,
        heads: int,
        q_len: int,
        kv_len: int,
        *,
        q_offset: int | Tensor = 0,
        device: torch.device | str | None = None,
    ):
        """FlexAttention BlockMask of the same function; cached when it depends on shape alone."""
        from torch.nn.attention.flex_attention import create_block_mask

        mod = self.mod if _is_zero(q_offset) else _shift_queries(self.mod, q_offset)
        cacheable = not self.batch_dependent and isinstance(q_offset, int)
        key = (q_len, kv_len, q_offset, str(device))
        if cacheable and key in self._block_masks:
            return self._block_masks[key]
        b = batch if self.batch_dependent else None
        block_mask = create_block_mask(mod, b, None, q_len, kv_len, device=device or "cpu")
        if cacheable:
            self._block_masks[key] = block_mask
        return block_mask


def _is_zero(offset: int | Tensor) -> bool:
    return isinstance(offset, int) and offset == 0


def _shift_queries(mod: MaskMod, offset: int | Tensor) -> MaskMod:
    def shifted(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return mod(b, h, q_idx + offset, kv_idx)

    return shifted


def full() -> Mask:
    """Every query sees every key (encoders)."""
    return Mask(lambda b, h, q, kv: (q >= 0) & (kv >= 0), "full")


def causal() -> Mask:
    """Query i sees keys 0..i (decoders)."""
    return Mask(lambda b, h, q, kv: q >= kv, "causal", is_causal=True)


def sliding_window(window: int) -> Mask:
    """Causal, and at most `window` keys back including itself (Longformer / Mistral style)."""
    if window < 1:
        raise ValueError(f"sliding window must be >= 1 token, got {window}")
    return Mask(lambda b, h, q, kv: (q >= kv) & (q - kv < window), f"sliding_window({window})")


def key_padding(valid: Tensor) -> Mask:
    """Keys where `valid[b, kv]` is False (padding) are hidden. valid: (batch, kv_len) bool."""
    if valid.dim() != 2 or valid.dtype != torch.bool:
        raise ValueError(f"key padding mask must be a (batch, length) bool tensor, got "
                         f"{tuple(valid.shape)} {valid.dtype}")
    return Mask(lambda b, h, q, kv: valid[b, kv], "key_padding", batch_dependent=True)


def prefix_lm(prefix_lengths: Tensor) -> Mask:
    """Bidirectional over each example's prefix, causal after it (T5 / UniLM prefix-LM).
    prefix_lengths: (batch,) long."""
    if prefix_lengths.dim() != 1:
        raise ValueError(f"prefix lengths must be a (batch,) tensor, got {tuple(prefix_lengths.shape)}")
    return Mask(lambda b, h, q, kv: (kv < prefix_lengths[b]) | (q >= kv), "prefix_lm",
                batch_dependent=True)


def and_masks(*masks: Mask) -> Mask:
    """Intersection: attend only where every mask allows."""
    def mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        out = masks[0].mod(b, h, q, kv)
        for m in masks[1:]:
            out = out & m.mod(b, h, q, kv)
        return out

    return Mask(mod, " & ".join(m.name for m in masks), any(m.batch_dependent for m in masks))


def or_masks(*masks: Mask) -> Mask:
    """Union: attend where any mask allows."""
    def mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        out = masks[0].mod(b, h, q, kv)
        for m in masks[1:]:
            out = out | m.mod(b, h, q, kv)
        return out

    return Mask(mod, " | ".join(m.name for m in masks), any(m.batch_dependent for m in masks))
