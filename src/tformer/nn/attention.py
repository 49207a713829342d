"""Multi-head attention: self- or cross-attention, grouped key/value heads, KV cache, and
`AttentionInputs`, what one call reads besides the hidden states."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from tformer.nn.attend import ScoreBias, get_backend
from tformer.nn.kv_cache import CrossKV, LayerKV
from tformer.nn.masks import Mask
from tformer.nn.position import apply_rotary
from tformer.nn.probe import QKProbe, ValueProbe
from tformer.nn.pruning import checked_indices, keep_columns, keep_rows, spans


@dataclass(frozen=True, eq=False)
class AttentionInputs:
    """Everything a MultiHeadAttention call reads besides x; a model builds one per layer and
    call, a `Block` hands it through without looking inside.

    mask:    attention pattern over absolute positions (queries offset by a cache)
    bias:    additive score bias (ALiBi), indexed like the mask
    rope:    (cos, sin) of the new tokens' positions, (B, 1, T, head_dim) each
    cache:   LayerKV (self-attention: new keys appended, all cached keys attended) or CrossKV
             (cross-attention: context keys/values projected on the first call only)
    context: (B, S, d_context), what cross-attention's keys/values are projected from
    """

    mask: Mask | None = None
    bias: ScoreBias | None = None
    rope: tuple[Tensor, Tensor] | None = None
    cache: LayerKV | CrossKV | None = None
    context: Tensor | None = None


NO_INPUTS = AttentionInputs()


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over `n_heads` query heads and `n_kv_heads` key/value heads
    (grouped-query attention when fewer; multi-query when 1).

    Self-attention uses one fused QKV projection laid out [q heads | k heads | v heads]; pass
    `d_context` to build cross-attention instead (queries from x, keys/values from a context).
    `qkv_bias` covers the q, k, v projections, `out_bias` the output projection (ViT checkpoints
    without qkv bias keep the output one; Llama-style models drop both). Queries and keys pass
    through `self.qk` (a `QKProbe`) just before the scores, values through `self.values`: hook
    them to read them.

    `keep_heads` prunes heads physically; `head_ids` (None until then) holds the original index
    of each remaining query head, so a per-head score bias (ALiBi) keeps each head's slope.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, *,
                 d_context: int | None = None, qkv_bias: bool = True, out_bias: bool = True,
                 dropout: float = 0.0, backend: str = "sdpa",
                 qk_norm: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        q_dim, kv_dim = n_heads * self.head_dim, n_kv_heads * self.head_dim
        self.is_cross = d_context is not None
        if self.is_cross:
            self.q_proj = nn.Linear(d_model, q_dim, bias=qkv_bias)
            self.kv_proj = nn.Linear(d_context, 2 * kv_dim, bias=qkv_bias)
        else:
            self.qkv_proj = nn.Linear(d_model, q_dim + 2 * kv_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(q_dim, d_model, bias=out_bias)
        self.q_norm = qk_norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = qk_norm(self.head_dim) if qk_norm else nn.Identity()
        self.qk = QKProbe()
        self.values = ValueProbe()
        self.dropout = dropout
        self.backend = backend
        self.attend = get_backend(backend)
        self.register_buffer("head_ids", None, persistent=False)

    def keep_heads(self, heads: Sequence[int]) -> None:
        """Keep query heads `heads` (indices among the current ones) and remove the rest from the
        weights: q rows (and k, v rows of key/value heads no kept query head reads) of the fused
        projection, out_proj columns; head_dim and the q/k norms (shared by heads) stay.

        Grouped-query attention stays consistent: a key/value head is kept when any query head of
        its group is, and every kept group must keep the same number of query heads (whole groups,
        or equal numbers per group). ValueError otherwise, or when no head would be left."""
        heads = checked_indices(heads, self.n_heads, "head")
        group = self.n_heads // self.n_kv_heads
        kv = sorted({h // group for h in heads})
        per_group = {sum(1 for h in heads if h // group == g) for g in kv}
        if len(per_group) != 1:
            raise ValueError(f"grouped-query attention ({self.n_heads} heads, {self.n_kv_heads} key/value "
                             "heads) must keep whole groups or the same number of heads in each kept group")
        D, q_dim, kv_dim = self.head_dim, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q_rows, kv_rows = spans(heads, D), spans(kv, D)
        if self.is_cross:
            keep_rows(self.q_proj, q_rows)
            keep_rows(self.kv_proj, torch.cat([kv_rows, kv_dim + kv_rows]))
        else:
            keep_rows(self.qkv_proj, torch.cat([q_rows, q_dim + kv_rows, q_dim + kv_dim + kv_rows]))
        keep_columns(self.out_proj, q_rows)
        ids = self.head_ids if self.head_ids is not None else torch.arange(self.n_heads)
        self.head_ids = ids.index_select(0, torch.tensor(heads, device=ids.device))
        self.n_heads, self.n_kv_heads = len(heads), len(kv)

    def set_head_ids(self, ids: Sequence[int]) -> None:
        """The original index of each current query head (restored when a pruned model opens)."""
        if len(ids) != self.n_heads or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ValueError(f"head_ids must be {self.n_heads} indices >= 0, got {list(ids)!r}")
        self.head_ids = torch.tensor(list(ids), dtype=torch.long, device=self.out_proj.weight.device)

    def _head_bias(self, bias: ScoreBias | None) -> ScoreBias | None:
        """A per-head bias built for the unpruned heads, read at each remaining head's index."""
        if bias is None or self.head_ids is None:
            return bias
        ids, mod = self.head_ids, bias.mod
        return ScoreBias(lambda b, h, q, kv: mod(b, ids[h], q, kv), f"{bias.name}[heads]")

    def _split_heads(self, x: Tensor, heads: int) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, heads, self.head_dim).transpose(1, 2)  # (B, heads, T, D)

    def _project_self(self, x: Tensor, inputs: AttentionInputs) -> tuple[Tensor, Tensor, Tensor,
                                                                         int | Tensor]:
        """q (B, H, T, D) and every key/value the queries see (B, Hkv, K, D), with the absolute
        position of the first query (the cache's write offset, else 0)."""
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = self.q_norm(self._split_heads(q, self.n_heads))
        k = self.k_norm(self._split_heads(k, self.n_kv_heads))
        v = self._split_heads(v, self.n_kv_heads)
        if inputs.rope is not None:
            q, k = apply_rotary(q, *inputs.rope), apply_rotary(k, *inputs.rope)
        if isinstance(inputs.cache, LayerKV):
            k, v = inputs.cache.update(k, v)  # (B, Hkv, max_len, D)
            return q, k, v, inputs.cache.cache.offset
        return q, k, v, 0

    def _project_cross(self, x: Tensor, inputs: AttentionInputs) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, H, T, D) from x; keys/values (B, Hkv, S, D) from the context, or from the
        CrossKV cache once it holds them (projected once per source)."""
        cache = inputs.cache if isinstance(inputs.cache, CrossKV) else None
        if inputs.context is None and not (cache is not None and cache.keys is not None):
            raise ValueError("cross-attention needs a context (encoder output)")
        q = self.q_norm(self._split_heads(self.q_proj(x), self.n_heads))
        if cache is not None and cache.keys is not None:
            return q, cache.keys, cache.values
        k, v = self.kv_proj(inputs.context).chunk(2, dim=-1)
        k, v = self.k_norm(self._split_heads(k, self.n_kv_heads)), self._split_heads(v, self.n_kv_heads)
        if cache is not None:
            cache.keys, cache.values = k, v
        return q, k, v

    def forward(self, x: Tensor, inputs: AttentionInputs | None = None) -> Tensor:
        """x: (B, T, d_model) -> (B, T, d_model); see `AttentionInputs` for the rest."""
        inputs = NO_INPUTS if inputs is None else inputs
        q_offset: int | Tensor = 0
        if self.is_cross:
            q, k, v = self._project_cross(x, inputs)
        else:
            q, k, v, q_offset = self._project_self(x, inputs)
        q, k = self.qk(q, k)  # hook point: the queries and keys the scores are made of
        v = self.values(v)  # hook point: the values the weights average
        if self.n_kv_heads != self.n_heads:  # grouped-query: each KV head serves a group of q heads
            repeats = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        dropout = self.dropout if self.training else 0.0
        out = self.attend(q, k, v, inputs.mask, bias=self._head_bias(inputs.bias), q_offset=q_offset, dropout=dropout)
        B, _, T, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, T, -1))
