"""Positional information: sinusoidal (Vaswani et al. 2017), learned absolute, rotary (Su et al.
2021, RoPE) and ALiBi (Press et al. 2022).

Absolute encodings map positions (B, T) to vectors (B, T, D) added to token embeddings. RoPE
rotates queries and keys inside attention; ALiBi is an additive score bias.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tformer.nn.attend import ScoreBias


def sinusoid_table(max_len: int, dim: int, base: float = 10000.0) -> Tensor:
    """(max_len, dim): even columns sin(pos / base^(2i/dim)), odd columns cos(...)."""
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even dimension, got {dim}")
    pos = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(max_len, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table.float()


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos encodings; positions (B, T) -> (B, T, D)."""

    def __init__(self, max_len: int, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.register_buffer("table", sinusoid_table(max_len, dim, base), persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        return self.table[positions]


class LearnedPositions(nn.Module):
    """A trained vector per position (GPT-2, BERT, ViT); positions (B, T) -> (B, T, D)."""

    def __init__(self, max_len: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(max_len, dim)

    def forward(self, positions: Tensor) -> Tensor:
        return self.embedding(positions)


class RotaryEmbedding(nn.Module):
    """RoPE in the "rotate half" layout (GPT-NeoX, Llama): dimension i pairs with i + D/2.

    `forward(positions)` returns (cos, sin), each (B, 1, T, D), shared by every layer;
    `apply_rotary(x, cos, sin)` rotates x: (B, H, T, D).
    """

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.arange(max_len, dtype=torch.float64).unsqueeze(1) * inv_freq  # (L, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (L, D)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, D); cos/sin: (B, 1, T, D). Computed in fp32, returned in x's dtype."""
    rotated = x.float() * cos + rotate_half(x.float()) * sin
    return rotated.to(x.dtype)


def alibi_slopes(n_heads: int) -> Tensor:
    """Per-head slopes: a geometric sequence 2^(-8/n), 2^(-16/n), ... (ALiBi, section 3); for a
    head count that is not a power of two, interleave slopes of the next power of two."""
    def power_of_two_slopes(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(power_of_two_slopes(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = power_of_two_slopes(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(power_of_two_slopes(closest) + extra)


class ALiBi(nn.Module):
    """ALiBi: score(q, k) -= slope[h] * (q - k). Keys behind the query are penalised by distance;
    keys ahead are expected to be masked (causal use)."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)

    def forward(self) -> ScoreBias:
        slopes = self.slopes

        def mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return -slopes[h] * (q - kv)

        return ScoreBias(mod, f"alibi({len(slopes)})")
