"""bf16 linear layers with their weights packed once, for decoding on CPU.

Why bf16 decoding was slower than fp32 on this CPU: oneDNN's bf16 matmul reorders (packs) the
weight into its blocked layout on every call. A one-row decode step reads each weight once, so the
reorder (read + write of the whole weight) costs more than the product: a 3072 x 768 bf16 weight
took 353 us per 1-row product (13 GB/s of weight) against 361 us in fp32 (26 GB/s), on 2 cores.
Packed once (`torch.ops.mkldnn._reorder_linear_weight`, the kernel PyTorch's own compiler uses
when it freezes a CPU model), the same product takes 227 us: bandwidth-bound at half fp32's bytes.

`packed_linears(model)` makes every bf16 `nn.Linear` of a CPU model use a packed copy of its
weight while it is active, for calls that need no gradient; the copy is made once per weight and
made again when the weight changes (its version counter). Everything else is untouched: a call
that needs gradients, another dtype or device, or a PyTorch without the kernel takes `F.linear`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def kernel_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


def packable(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) and module.weight.device.type == "cpu"
            and module.weight.dtype == torch.bfloat16)


def _packed_weight(linear: nn.Linear) -> Tensor:
    weight = linear.weight
    key = (weight._version, weight.data_ptr())
    cached = getattr(linear, "_tformer_packed", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1))
        linear._tformer_packed = cached  # type: ignore[attr-defined]
    return cached[1]


def _packed_forward(linear: nn.Linear):
    def forward(x: Tensor) -> Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad)
        if needs_grad or x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.numel() == 0:
            return F.linear(x, linear.weight, linear.bias)
        rows = x.reshape(-1, x.shape[-1])  # (N, in)
        out = torch.ops.mkldnn._linear_pointwise(rows, _packed_weight(linear), linear.bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])

    return forward


@contextmanager
def packed_linears(model: object) -> Iterator[int]:
    """While active, the model's bf16 CPU linear layers use packed weights; yields how many."""
    modules = model.modules() if isinstance(model, nn.Module) else ()
    chosen = [m for m in modules if packable(m)] if kernel_available() else []
    for linear in chosen:
        linear.forward = _packed_forward(linear)  # an instance attribute shadows the class's
    try:
        yield len(chosen)
    finally:
        for linear in chosen:
            del linear.forward
