"""Pass-through modules that make tensors inside a forward visible to forward hooks."""

from __future__ import annotations

from torch import Tensor, nn


class QKProbe(nn.Module):
    """Returns (q, k) unchanged. Every attention module passes its queries and keys through one,
    named `qk`, right before the scores q·kᵀ are computed, so that

        attn.qk.register_forward_hook(lambda module, inputs, output: store(*output))

    reads them per layer (attention maps, probing) without touching the attention code.
    q: (B, H, T, D) after norms and rotary positions; k: (B, H_kv, K, D), every key the queries
    see (cached keys included, before grouped-query heads are repeated). Holds no parameters.
    """

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return q, k


class ValueProbe(nn.Module):
    """Returns v unchanged. Every attention module passes its values through one, named `values`,
    right after its `qk` probe: v: (B, H_kv, K, D), before grouped-query heads are repeated. With
    the gradient of the attention output it gives the gradient of the attention weights
    (dL/dA = dL/dO · vᵀ) on any backend (gradient-weighted attention rollout). No parameters."""

    def forward(self, v: Tensor) -> Tensor:
        return v
