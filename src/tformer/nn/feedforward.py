"""Position-wise feed-forward networks: an MLP with a chosen activation, and SwiGLU."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from tformer.nn.dropout import Dropout

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
    """x -> W2 act(W1 x): (B, T, d_model) -> (B, T, d_model)."""

    def __init__(self, d_model: int, d_ff: int, activation: nn.Module, *, bias: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.activation = activation
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.dropout(self.activation(self.up(x))))


class SwiGLU(nn.Module):
    """x -> W2 (silu(W_gate x) * W_up x) (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, d_model: int, d_ff: int, *, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=bias)  # fused [gate | up]
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.dropout(F.silu(gate) * up))
