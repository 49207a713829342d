"""Relative positional attention of Transformer-XL (Dai et al. 2019, section 3.3).

The score of query i (at absolute position M + i behind M memory positions) and key j is

    A_ij = (q_i + u)·k_j + (q_i + v)·r_{M+i-j},   r_δ = W_{k,R} R_δ           (paper eq. in §3.3:
                                                                              terms (a)+(c), (b)+(d))

with R_δ a sinusoidal encoding of the distance δ and u, v learned per head. `relative_attention`
computes the position term "BD" for every (i, j) with one matmul and the relative shift of the
paper's appendix B, then hands it to any attention backend as an additive `ScoreBias`: SDPA and
eager add the tensor as it is, FlexAttention reads it in a `score_mod`. The content term goes
through the backend's own q·k as softmax((q + u)·k · scale + BD · scale).
`relative_attention_reference` gathers r for every (i, j) explicitly: slow, obviously right.
`RelativeMultiHeadAttention` is the module a `Block` injects; `RelativeInputs` is what it reads
besides x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.nn.attend import ScoreBias, get_backend
from tformer.nn.dropout import dropout as drop
from tformer.nn.masks import Mask
from tformer.nn.position import sinusoid_table
from tformer.nn.probe import QKProbe, ValueProbe
from tformer.nn.pruning import checked_indices, keep_columns, keep_entries, keep_rows, spans

BACKENDS = ("sdpa", "flex", "eager", "reference")


def relative_sinusoids(k_len: int, dim: int, *, clamp_len: int | None = None,
                       device: torch.device | str | None = None) -> Tensor:
    """R: (k_len, dim); row c encodes the distance k_len - 1 - c (descending, the order the
    relative shift expects). Distances above `clamp_len` share the encoding of clamp_len."""
    if k_len < 1:
        raise ValueError(f"relative encodings need at least one key, got k_len={k_len}")
    distances = torch.arange(k_len - 1, -1, -1, device=device)
    if clamp_len is not None:
        distances = distances.clamp(max=clamp_len)
    table = sinusoid_table(int(distances.max()) + 1, dim).to(device)
    return table[distances]


def rel_shift(x: Tensor) -> Tensor:
    """Relative shift trick (Transformer-XL appendix B). x: (..., T, K) whose row i holds scores
    against distances K-1, ..., 0 (column c: distance K-1-c). Returns (..., T, K) whose [i, j] is
    the score at distance i + (K - T) - j, for every j <= i + K - T; entries above that diagonal
    are garbage and must be masked (they are future keys under a causal mask)."""
    *lead, T, K = x.shape
    padded = F.pad(x, (1, 0))  # (..., T, K + 1): a zero column in front of every row
    padded = padded.reshape(*lead, K + 1, T)  # the same memory read with rows of length T
    return padded[..., 1:, :].reshape(*lead, T, K)  # drop T elements: row i moves left by T-1-i


def position_scores(q: Tensor, r: Tensor, position_bias: Tensor) -> Tensor:
    """BD[b, h, i, j] = (q_i + v)·r_{M+i-j} for j <= M + i (M = K - T), by one matmul + shift.
    q: (B, H, T, D); r: (H, K, D) in descending distance; position_bias v: (H, D)."""
    raw = (q + position_bias.unsqueeze(1)) @ r.unsqueeze(0).transpose(-2, -1)  # (B, H, T, K)
    return rel_shift(raw)


@dataclass(frozen=True, eq=False)
class TensorBias(ScoreBias):
    """A score bias that already is a tensor (B, H, T, K) over the call's queries and keys:
    dense backends take it as it is (no gather), FlexAttention reads it through `mod`."""

    tensor: Tensor | None = None

    def dense(self, batch: int, heads: int, q_len: int, kv_len: int, *,
              q_offset: int | Tensor = 0, device: torch.device | str | None = None) -> Tensor:
        if self.tensor is None or self.tensor.shape[-2:] != (q_len, kv_len):
            raise ValueError(f"the bias tensor does not cover ({q_len}, {kv_len}) scores")
        return self.tensor


def relative_attention(q: Tensor, k: Tensor, v: Tensor, r: Tensor, content_bias: Tensor,
                       position_bias: Tensor, mask: Mask, *, backend: str = "sdpa",
                       dropout: float = 0.0) -> Tensor:
    """Fast path. q: (B, H, T, D); k, v: (B, H, K, D), the last T keys being the queries' own
    positions; r: (H, K, D) projected encodings R in descending distance; content_bias u and
    position_bias v: (H, D). `mask` sees absolute query positions M + i. -> (B, H, T, D)."""
    T, K, D = q.shape[-2], k.shape[-2], q.shape[-1]
    offset, scale = K - T, 1.0 / math.sqrt(D)
    bd = position_scores(q, r, position_bias) * scale  # (B, H, T, K): bias added after q·k·scale

    def bias_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return bd[b, h, q_idx - offset, kv_idx]  # q_idx is absolute (offset by the memory)

    attend = get_backend(backend)
    bias = TensorBias(bias_mod, "relative", bd)
    return attend(q + content_bias.unsqueeze(1), k, v, mask, bias=bias, q_offset=offset,
                  dropout=dropout, scale=scale)


def relative_attention_reference(q: Tensor, k: Tensor, v: Tensor, r: Tensor, content_bias: Tensor,
                                 position_bias: Tensor, mask: Mask, *, dropout: float = 0.0) -> Tensor:
    """The same function by an explicit (T, K) gather of r_{M+i-j}; arguments as
    `relative_attention`. Query rows with no visible key give zeros, as every backend does."""
    B, H, T, D = q.shape
    K = k.shape[-2]
    i = torch.arange(T, device=q.device).view(T, 1)
    j = torch.arange(K, device=q.device).view(1, K)
    distance = (i + (K - T) - j).clamp(min=0)  # (T, K); negative ones are future keys (masked)
    r_by_distance = r.flip(1)  # (H, K, D): row δ is distance δ
    r_ij = r_by_distance[:, distance]  # (H, T, K, D)
    ac = torch.einsum("bhid,bhjd->bhij", q + content_bias[None, :, None], k)  # terms (a) + (c)
    bd = torch.einsum("bhid,hijd->bhij", q + position_bias[None, :, None], r_ij)  # terms (b) + (d)
    scores = (ac + bd) / math.sqrt(D)
    visible = mask.dense(B, H, T, K, q_offset=K - T, device=q.device)
    scores = scores.masked_fill(~visible, -math.inf)
    weights = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    return drop(weights, dropout) @ v


@dataclass(frozen=True, eq=False)
class RelativeInputs:
    """What a RelativeMultiHeadAttention call reads besides x (B, T, d).

    pos:    (M + T, d) encodings R in descending distance (`relative_sinusoids`)
    mask:   over queries at absolute positions M..M+T-1 and keys 0..M+T-1
    memory: (B, M, d) hidden states of earlier segments (already detached), or None
    """

    pos: Tensor
    mask: Mask
    memory: Tensor | None = None


class RelativeMultiHeadAttention(nn.Module):
    """Multi-head self-attention over [memory; x] with relative positions (no projection biases,
    as in the paper). forward(x (B, T, d), RelativeInputs) -> (B, T, d). Queries and keys pass
    through `self.qk` (a `QKProbe`) before the scores, values through `self.values`. `keep_heads`
    prunes heads physically (`head_ids`: each remaining head's original index)."""

    def __init__(self, d_model: int, n_heads: int, *, dropout: float = 0.0,
                 backend: str = "sdpa") -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if backend not in BACKENDS:
            raise ValueError(f"unknown relative attention backend {backend!r}; choose one of "
                             f"{list(BACKENDS)}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=False)  # W_q
        self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=False)  # [W_{k,E} | W_v]
        self.pos_proj = nn.Linear(d_model, d_model, bias=False)  # W_{k,R}
        # u and v, stored flat (H * D,) like other biases so that they are not weight-decayed
        self.content_bias = nn.Parameter(torch.zeros(d_model))
        self.position_bias = nn.Parameter(torch.zeros(d_model))
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.qk = QKProbe()
        self.values = ValueProbe()
        self.dropout, self.backend = dropout, backend
        self.register_buffer("head_ids", None, persistent=False)

    def keep_heads(self, heads: Sequence[int]) -> None:
        """Keep heads `heads` (indices among the current ones): their rows of W_q, W_{k,E}, W_v
        and W_{k,R}, their entries of u and v, their out_proj columns; head_dim stays."""
        heads = checked_indices(heads, self.n_heads, "head")
        rows, width = spans(heads, self.head_dim), self.n_heads * self.head_dim
        keep_rows(self.q_proj, rows)
        keep_rows(self.kv_proj, torch.cat([rows, width + rows]))
        keep_rows(self.pos_proj, rows)
        self.content_bias = keep_entries(self.content_bias, rows)
        self.position_bias = keep_entries(self.position_bias, rows)
        keep_columns(self.out_proj, rows)
        ids = self.head_ids if self.head_ids is not None else torch.arange(self.n_heads)
        self.head_ids = ids.index_select(0, torch.tensor(heads, device=ids.device))
        self.n_heads = len(heads)

    def set_head_ids(self, ids: Sequence[int]) -> None:
        """The original index of each current head (restored when a pruned model opens)."""
        if len(ids) != self.n_heads or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ValueError(f"head_ids must be {self.n_heads} indices >= 0, got {list(ids)!r}")
        self.head_ids = torch.tensor(list(ids), dtype=torch.long, device=self.out_proj.weight.device)

    def _heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def _project(self, x: Tensor, memory: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, H, T, D) from x; k, v (B, H, M + T, D) from [memory; x]."""
        context = x if memory is None or memory.shape[1] == 0 else torch.cat([memory, x], dim=1)
        q = self._heads(self.q_proj(x))
        k, v = (self._heads(t) for t in self.kv_proj(context).chunk(2, dim=-1))
        return q, k, v

    def forward(self, x: Tensor, inputs: RelativeInputs) -> Tensor:
        """x: (B, T, d) -> (B, T, d); see `RelativeInputs` for the rest."""
        q, k, v = self._project(x, inputs.memory)
        q, k = self.qk(q, k)  # hook point: the queries and keys of the content term
        v = self.values(v)  # hook point: the values the weights average
        K = k.shape[2]
        if inputs.pos.shape[0] != K:
            raise ValueError(f"pos has {inputs.pos.shape[0]} rows, expected one per key ({K})")
        r = self.pos_proj(inputs.pos).view(K, self.n_heads, self.head_dim).transpose(0, 1)  # (H, K, D)
        u = self.content_bias.view(self.n_heads, self.head_dim)
        v_bias = self.position_bias.view(self.n_heads, self.head_dim)
        dropout = self.dropout if self.training else 0.0
        if self.backend == "reference":
            out = relative_attention_reference(q, k, v, r, u, v_bias, inputs.mask, dropout=dropout)
        else:
            out = relative_attention(q, k, v, r, u, v_bias, inputs.mask, backend=self.backend,
                                     dropout=dropout)
        B, _, T, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, T, -1))
