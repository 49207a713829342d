"""The residual Transformer block: self-attention, optional cross-attention, feed-forward."""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from tformer.nn.attend import ScoreBias
from tformer.nn.attention import MultiHeadAttention
from tformer.nn.kv_cache import CrossKV, LayerKV
from tformer.nn.masks import Mask


class Block(nn.Module):
    """Pre-norm (GPT-2 and later): x + f(norm(x)). Post-norm (Vaswani et al., BERT):
    norm(x + f(x)). Sub-layers are injected; `norm` builds one fresh norm per sub-layer."""

    def __init__(self, attn: MultiHeadAttention, ffn: nn.Module, norm: Callable[[], nn.Module], *,
                 cross_attn: MultiHeadAttention | None = None, pre_norm: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.attn, self.attn_norm = attn, norm()
        self.cross_attn = cross_attn
        self.cross_norm = norm() if cross_attn is not None else None
        self.ffn, self.ffn_norm = ffn, norm()
        self.pre_norm = pre_norm
        self.dropout = nn.Dropout(dropout)

    def _residual(self, x: Tensor, norm: nn.Module, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(norm(x)))
        return norm(x + self.dropout(sublayer(x)))

    def forward(self, x: Tensor, mask: Mask | None = None, *, bias: ScoreBias | None = None,
                rope: tuple[Tensor, Tensor] | None = None, cache: LayerKV | None = None,
                context: Tensor | None = None, context_mask: Mask | None = None,
                cross_cache: CrossKV | None = None) -> Tensor:
        """x: (B, T, d_model); context: (B, S, d_context) for cross-attention."""
        x = self._residual(x, self.attn_norm,
                           lambda h: self.attn(h, mask, bias=bias, rope=rope, cache=cache))
        if self.cross_attn is not None:
            x = self._residual(x, self.cross_norm, lambda h: self.cross_attn(
                h, context_mask, context=context, cache=cross_cache))
        return self._residual(x, self.ffn_norm, self.ffn)
