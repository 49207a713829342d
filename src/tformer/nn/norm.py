"""Normalisation layers: LayerNorm (bias optional) and RMSNorm, by name."""

from __future__ import annotations

from torch import nn

NORMS = ("layernorm", "rmsnorm")


def make_norm(kind: str, dim: int, *, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    """`layernorm` (Ba et al. 2016; bias optional) or `rmsnorm` (Zhang & Sennrich 2019)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; choose one of {list(NORMS)}")
