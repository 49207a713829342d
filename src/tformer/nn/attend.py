"""One attention entry point with three interchangeable backends.

    attend = get_backend("sdpa")           # chosen once per model
    out = attend(q, k, v, mask=causal())   # q: (B, H, Tq, D), k/v: (B, H, Tk, D)

- "sdpa":  F.scaled_dot_product_attention (fused kernels; the default)
- "flex":  FlexAttention, compiled; sparse block masks and score modifiers
- "eager": explicit softmax; can return the attention weights (interpretability)

Every backend computes the same function, a test holds them equal. Masks are `masks.Mask`;
additive score biases (ALiBi, relative positions) are `ScoreBias`. Query rows whose every key
is masked produce zeros on every backend.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from tformer.nn.dropout import dropout as drop
from tformer.nn.masks import Mask

log = logging.getLogger(__name__)

BiasMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class ScoreBias:
    """An additive bias on attention scores, `bias(b, h, q_idx, kv_idx) -> float`.

    Dense backends add it to the scores; FlexAttention applies it as a `score_mod`.
    """

    mod: BiasMod
    name: str

    def dense(self, batch: int, heads: int, q_len: int, kv_len: int, *,
              q_offset: int | Tensor = 0, device: torch.device | str | None = None) -> Tensor:
        """Float bias broadcastable to (batch, heads, q_len, kv_len)."""
        b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
        h = torch.arange(heads, device=device).view(1, -1, 1, 1)
        q = (torch.arange(q_len, device=device) + q_offset).view(1, 1, -1, 1)
        kv = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
        return self.mod(b, h, q, kv).float()

    def score_mod(self, q_offset: int | Tensor = 0) -> Callable:
        def modify(score: Tensor, b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return score + self.mod(b, h, q + q_offset, kv)

        return modify


class Attend(Protocol):
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask | None = None, *,
                 bias: ScoreBias | None = None, q_offset: int | Tensor = 0,
                 dropout: float = 0.0, scale: float | None = None) -> Tensor: ...


def _dense_mask_and_bias(q: Tensor, k: Tensor, mask: Mask | None, bias: ScoreBias | None,
                         q_offset: int | Tensor) -> tuple[Tensor | None, Tensor | None]:
    B, H, Tq, _ = q.shape
    Tk = k.shape[-2]
    dense_mask = None if mask is None else mask.dense(B, H, Tq, Tk, q_offset=q_offset, device=q.device)
    dense_bias = None if bias is None else bias.dense(B, H, Tq, Tk, q_offset=q_offset, device=q.device)
    return dense_mask, dense_bias


def _slow_low_precision_backward(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether SDPA's CPU kernel would take its slow bf16/fp16 backward: with heads narrower than
    64 it is 3-7x slower than fp32's (measured fwd+bwd, 2 cores: (12, 4, 64, 32) 4.3 vs 0.9 ms,
    (64, 4, 65, 16) 24 vs 3.5 ms; at (4, 12, 256, 64) bf16 is the faster). Such attention runs in
    fp32 (the rest of the model stays in autocast's bf16)."""
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] < 64
            and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))


def sdpa_attend(q: Tensor, k: Tensor, v: Tensor, mask: Mask | None = None, *,
                bias: ScoreBias | None = None, q_offset: int | Tensor = 0,
                dropout: float = 0.0, scale: float | None = None) -> Tensor:
    """PyTorch's fused scaled-dot-product attention. With attention dropout on CPU, where SDPA's
    fused kernel has no dropout and its fallback draws the slow per-element mask, the explicit
    softmax with tformer's fast dropout (the same function; see `nn.dropout`)."""
    if dropout > 0.0 and q.device.type == "cpu":
        return eager_attend(q, k, v, mask, bias=bias, q_offset=q_offset, dropout=dropout, scale=scale)
    if _slow_low_precision_backward(q, k, v):
        with torch.autocast("cpu", enabled=False):  # CPU autocast would cast the inputs back to bf16
            out = sdpa_attend(q.float(), k.float(), v.float(), mask, bias=bias, q_offset=q_offset, scale=scale)
        return out.to(q.dtype)
    plain_causal = (mask is not None and mask.is_causal and bias is None
                    and isinstance(q_offset, int) and q_offset == 0 and q.shape[-2] == k.shape[-2])
    if plain_causal:  # fast path: no mask tensor, the kernel skips the upper triangle
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale)
    dense_mask, dense_bias = _dense_mask_and_bias(q, k, mask, bias, q_offset)
    attn_mask = dense_mask
    if dense_bias is not None:
        dense_bias = dense_bias.to(q.dtype)
        attn_mask = dense_bias if dense_mask is None else dense_bias.masked_fill(~dense_mask, -math.inf)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=scale)
    if dense_bias is not None and dense_mask is not None:  # float masks give NaN on empty rows
        out = out.masked_fill(~dense_mask.any(-1, keepdim=True), 0.0)
    return out


def eager_attention(q: Tensor, k: Tensor, v: Tensor, mask: Mask | None = None, *,
                    bias: ScoreBias | None = None, q_offset: int | Tensor = 0,
                    dropout: float = 0.0, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Explicit softmax(q kᵀ · scale + bias) v. Returns (output, weights (B, H, Tq, Tk))."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)).float() * scale  # (B, H, Tq, Tk), softmax in fp32
    dense_mask, dense_bias = _dense_mask_and_bias(q, k, mask, bias, q_offset)
    if dense_bias is not None:
        scores = scores + dense_bias
    if dense_mask is not None:  # in place: `scores` is fresh and no backward reads it
        scores = scores.masked_fill_(~dense_mask, -math.inf)
    weights = torch.softmax(scores, dim=-1)
    if dense_mask is not None:  # a row with no visible key is all -inf: softmax gives NaN
        empty = ~dense_mask.any(-1, keepdim=True)
        if torch.compiler.is_compiling() or bool(empty.any()):  # (a copy of B x H x Tq x Tk only then)
            weights = weights.masked_fill(empty, 0.0)
    weights = weights.to(q.dtype)
    return drop(weights, dropout) @ v, weights


def eager_attend(q: Tensor, k: Tensor, v: Tensor, mask: Mask | None = None, *,
                 bias: ScoreBias | None = None, q_offset: int | Tensor = 0,
                 dropout: float = 0.0, scale: float | None = None) -> Tensor:
    """Explicit softmax attention; see `eager_attention` for the weights."""
    return eager_attention(q, k, v, mask, bias=bias, q_offset=q_offset, dropout=dropout, scale=scale)[0]


@functools.cache
def _compiled_flex_attention() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    # flex compiles one kernel per (shape, mask function); past dynamo's default limit of 8 it
    # would silently run the uncompiled, dense path, so allow a working set of shapes and masks
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _warn_flex_fallback_once(device_type: str) -> None:
    log.warning("FlexAttention has no backward pass on %s in this PyTorch; attention that needs "
                "gradients falls back to SDPA with the same dense mask (same result, no sparsity "
                "speed-up). Use a GPU for sparse training.", device_type)


def flex_attend(q: Tensor, k: Tensor, v: Tensor, mask: Mask | None = None, *,
                bias: ScoreBias | None = None, q_offset: int | Tensor = 0,
                dropout: float = 0.0, scale: float | None = None) -> Tensor:
    """FlexAttention: the mask becomes a (cached) BlockMask, the bias a score_mod."""
    if dropout > 0.0:
        raise ValueError("the flex attention backend does not support attention dropout; set the "
                         "attention dropout to 0 or choose attn_backend='sdpa'")
    if not torch.is_grad_enabled():  # flex refuses inputs that require grad, even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    needs_grad = any(t.requires_grad for t in (q, k, v))
    if q.device.type == "cpu" and needs_grad:
        _warn_flex_fallback_once(q.device.type)
        return sdpa_attend(q, k, v, mask, bias=bias, q_offset=q_offset, scale=scale)
    if q.device.type == "cpu" and q.shape[-2] == 1:
        # a decode step: one query row has nothing to skip block-wise, and building its BlockMask
        # (new every step: the cache offset and padding change) cost 13x SDPA's whole step on CPU
        # (gpt-mini, 46.5 vs 3.6 ms/token). Same function, dense mask over the cached keys.
        return sdpa_attend(q, k, v, mask, bias=bias, q_offset=q_offset, scale=scale)
    B, H, Tq, _ = q.shape
    block_mask = None if mask is None else mask.block_mask(B, H, Tq, k.shape[-2], q_offset=q_offset,
                                                           device=q.device)
    score_mod = None if bias is None else bias.score_mod(q_offset)
    flex = _compiled_flex_attention()
    return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


BACKENDS: dict[str, Attend] = {"sdpa": sdpa_attend, "flex": flex_attend, "eager": eager_attend}


def get_backend(name: str) -> Attend:
    """The attention function for a backend name ('sdpa', 'flex' or 'eager')."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]
