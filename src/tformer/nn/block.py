"""The residual Transformer block: self-attention, optional cross-attention, feed-forward.

The block owns the residual wiring and the norms; the attention is injected, and whatever it
reads besides the hidden states (masks, positions, caches, a recurrent memory) travels as one
inputs object that the block hands over without looking inside:

    Block(MultiHeadAttention(...), MLP(...), norm)            block(x, AttentionInputs(mask, rope=rope))
    Block(RelativeMultiHeadAttention(...), MLP(...), norm)    block(x, RelativeInputs(pos, mask, memory))

A block with `checkpointed = True` keeps only its input while training with gradients and
recomputes its activations in the backward pass (non-reentrant `torch.utils.checkpoint`; the CPU
and device RNG states are restored for the recompute, so dropout draws the same masks).
"""

from __future__ import annotations

from typing import Callable, Generic, Protocol, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tformer.nn.attention import AttentionInputs
from tformer.nn.dropout import Dropout

I = TypeVar("I", contravariant=True)  # what the injected attention reads besides x


class Attention(Protocol[I]):
    """An attention sub-layer: (B, T, d) hidden states and its own inputs -> (B, T, d)."""

    def __call__(self, x: Tensor, inputs: I) -> Tensor: ...


class Block(nn.Module, Generic[I]):
    """Pre-norm (GPT-2 and later): x + f(norm(x)). Post-norm (Vaswani et al., BERT):
    norm(x + f(x)). Sub-layers are injected; `norm` builds one fresh norm per sub-layer.
    `cross_attn` (a cross-attention MultiHeadAttention) reads `AttentionInputs` with a context."""

    def __init__(self, attn: Attention[I], ffn: nn.Module, norm: Callable[[], nn.Module], *,
                 cross_attn: Attention[AttentionInputs] | None = None, pre_norm: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.attn, self.attn_norm = attn, norm()
        self.cross_attn = cross_attn
        self.cross_norm = norm() if cross_attn is not None else None
        self.ffn, self.ffn_norm = ffn, norm()
        self.pre_norm = pre_norm
        self.dropout = Dropout(dropout)
        self.checkpointed = False  # recompute activations in backward (training with gradients only)

    def _residual(self, x: Tensor, norm: nn.Module, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(norm(x)))
        return norm(x + self.dropout(sublayer(x)))

    def forward(self, x: Tensor, inputs: I | None = None,
                cross_inputs: AttentionInputs | None = None) -> Tensor:
        """x: (B, T, d_model) -> (B, T, d_model). inputs: the self-attention's (None: its
        defaults, e.g. no mask); cross_inputs: the cross-attention's, with the context."""
        if self.checkpointed and self.training and torch.is_grad_enabled():
            # eval, inference and KV-cache decoding (no gradients) never take this path
            return checkpoint(self._forward, x, inputs, cross_inputs, use_reentrant=False)
        return self._forward(x, inputs, cross_inputs)

    def _forward(self, x: Tensor, inputs: I | None, cross_inputs: AttentionInputs | None) -> Tensor:
        x = self._residual(x, self.attn_norm, lambda h: self.attn(h, inputs))
        if self.cross_attn is not None:
            x = self._residual(x, self.cross_norm, lambda h: self.cross_attn(h, cross_inputs))
        return self._residual(x, self.ffn_norm, self.ffn)
