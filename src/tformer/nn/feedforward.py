"""Position-wise feed-forward networks: an MLP with a chosen activation, and SwiGLU."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.nn.dropout import Dropout
from tformer.nn.pruning import checked_indices, keep_columns, keep_rows

ACTIVATIONS: dict[str, type[nn.Module] | tuple] = {
    "relu": nn.ReLU,  # original Transformer
    "gelu": nn.GELU,  # BERT, ViT (exact erf form)
    "gelu_tanh": nn.GELU,  # GPT-2's "gelu_new" (tanh approximation)
    "silu": nn.SiLU,
}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return nn.GELU(approximate="tanh") if name == "gelu_tanh" else ACTIVATIONS[name]()


class MLP(nn.Module):
    """x -> W2 act(W1 x): (B, T, d_model) -> (B, T, d_model). `keep_units` prunes hidden units."""

    def __init__(self, d_model: int, d_ff: int, activation: nn.Module, *, bias: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.activation = activation
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = Dropout(dropout)

    @property
    def n_units(self) -> int:
        return self.down.in_features

    def keep_units(self, units: Sequence[int]) -> None:
        """Keep hidden units `units` (indices among the current ones): up rows, down columns."""
        index = torch.tensor(checked_indices(units, self.n_units, "unit"))
        keep_rows(self.up, index)
        keep_columns(self.down, index)

    def input_rows(self) -> Tensor:
        """(1, n_units, d_model): each unit's input weights (magnitude importance)."""
        return self.up.weight.unsqueeze(0)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.dropout(self.activation(self.up(x))))


class SwiGLU(nn.Module):
    """x -> W2 (silu(W_gate x) * W_up x) (Shazeer 2020, "GLU Variants Improve Transformer").
    `keep_units` prunes hidden units, the gate and up halves of the fused projection together."""

    def __init__(self, d_model: int, d_ff: int, *, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=bias)  # fused [gate | up]
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = Dropout(dropout)

    @property
    def n_units(self) -> int:
        return self.down.in_features

    def keep_units(self, units: Sequence[int]) -> None:
        """Keep hidden units `units`: their gate and up rows (aligned), their down columns."""
        index = torch.tensor(checked_indices(units, self.n_units, "unit"))
        keep_rows(self.gate_up, torch.cat([index, self.n_units + index]))
        keep_columns(self.down, index)

    def input_rows(self) -> Tensor:
        """(2, n_units, d_model): each unit's gate and up weights (magnitude importance)."""
        return self.gate_up.weight.unflatten(0, (2, self.n_units))

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.dropout(F.silu(gate) * up))
