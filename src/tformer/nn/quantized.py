"""int8 linear layers for CPU inference, held as plain tensors so that they save as safetensors.

`QuantizedLinear` keeps W as int8 rows with one float32 scale per output row (symmetric,
scale = max|W_row| / 127), plus the float bias; its state dict is `qweight` (int8), `scale`,
`bias`. Two schemes, chosen by measuring every candidate on this CPU (1 thread, a 768 x 3072
linear, microseconds, median: 1 row | 2048 rows): fp32 451 | 136,121; torch.ao quantize_dynamic
242 | 57,728; fbgemm packed from our buffers 403 | 59,198; our own per-token activations with
`torch._int_mm` 559 | 53,113 (oneDNN re-packs the weight on every call, 2-3x slower at 1 row);
`torch._weight_int8pack_mm` in bf16 194 | 196,808 (its float32 path: 1,648 at 1 row); torchao
int8 dynamic 1,619 | 101,467; torchao int8 weight-only 1,061 | 222,597. So:

- "int8-dynamic": activations are quantized at run time (asymmetric uint8, one scale per call:
  per token while decoding one row) and multiplied by the int8 weight in int32 by
  `quantized::linear_dynamic` (the kernel behind `torch.ao.quantization.quantize_dynamic`,
  without its deprecated module swap), the weight packed once from the buffers (again when they
  change): by fbgemm below 32 rows, by oneDNN from 32 rows on (AMX int8 here: a 768 x 3072
  linear at 2048 rows 3.5 ms vs fbgemm's 12.8 ms; at 1 row 109 us vs 63 us; crossover measured
  at 16-32 rows). Without VNNI, activations use 7 bits (int16 pair sums would saturate).
- "int8-weight": activations stay float; a few rows (decoding) go through
  `torch._weight_int8pack_mm` in bf16, more rows through a float32 matmul of the dequantized
  weight (weight-only int8 saves bytes, not FLOPs).

A call that needs gradients (attributions, attacks) or runs off the CPU takes `F.linear` with the
dequantized weight, so every verb keeps working. `weight` (the dequantized float weight) is there
for code that reads a linear's dtype or device; computing it costs one dequantization.

`replay(model, params)` swaps the named `nn.Linear`s of a freshly built model for empty
`QuantizedLinear`s of the same shapes, so a quantized checkpoint's int8 weights load into them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DYNAMIC, WEIGHT_ONLY = "int8-dynamic", "int8-weight"
SCHEMES = (DYNAMIC, WEIGHT_ONLY)
QMAX = 127  # symmetric int8: -127..127 (-128 unused, so that -W is representable too)
FEW_ROWS = 16  # int8-weight: up to this many rows take _weight_int8pack_mm (decoding)
PACK_WIDTH = 16  # ... and only for in_features a multiple of this: other widths read past the rows
# (torch 2.13: garbage up to 1e30, or a segfault, e.g. 84 or 40 inputs; pruned layers have any width)
MANY_ROWS = 32  # int8-dynamic: from this many rows on, oneDNN (AMX / VNNI) beats fbgemm


@cache
def _has_vnni() -> bool:
    """Whether int8 dot products accumulate in int32 without int16 saturation (VNNI / AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").split()
    except OSError:
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


@cache
def _has_onednn() -> bool:
    return "onednn" in torch.backends.quantized.supported_engines


@cache
def kernel_available(scheme: str) -> bool:
    """Whether this PyTorch has the CPU kernel `scheme` runs on."""
    if scheme == DYNAMIC:
        engines = torch.backends.quantized.supported_engines
        return ("fbgemm" in engines and hasattr(torch.ops.quantized, "linear_dynamic")
                and hasattr(torch, "_make_per_channel_quantized_tensor"))
    if scheme == WEIGHT_ONLY:
        return hasattr(torch, "_weight_int8pack_mm")
    return False


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(out, in) float -> int8 rows and float32 scales (out,): W ~ q * scale[:, None]."""
    w = weight.detach().float()
    peak = w.abs().amax(dim=1)
    scale = torch.where(peak > 0, peak / QMAX, torch.ones_like(peak))  # an all-zero row: any scale
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W = qweight * scale[:, None]; inference only (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: str,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self._packed: dict[str, tuple[tuple[Any, ...], Any]] = {}  # engine -> (buffers' versions, packed)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str) -> QuantizedLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme,
                device=linear.weight.device)
        with torch.no_grad():
            qweight, scale = quantize_rows(linear.weight)
            q.qweight.copy_(qweight)
            q.scale.copy_(scale)
            if linear.bias is not None:
                q.bias.copy_(linear.bias.detach().float())
        return q

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (out, in) in the scales' dtype (float32, or what `.to(dtype)` made
        them: the model's compute dtype); a new tensor on every call."""
        return self.qweight.to(self.scale.dtype) * self.scale[:, None]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme}")

    def __getstate__(self) -> dict[str, Any]:  # the packed weight is a cache, rebuilt on demand
        return {**self.__dict__, "_packed": {}}

    def _packed_weight(self, engine: str) -> Any:
        tensors = (self.qweight, self.scale, self.bias)
        key = tuple((t._version, t.data_ptr()) if t is not None else None for t in tensors)
        cached = self._packed.get(engine)
        if cached is None or cached[0] != key:
            zero = torch.zeros(self.out_features, dtype=torch.long)
            bias = None if self.bias is None else self.bias.float()
            before = torch.backends.quantized.engine
            try:  # the engine is chosen when the weight is packed; the packed object keeps it
                torch.backends.quantized.engine = engine
                with warnings.catch_warnings():  # qint8 tensors are deprecated; the packing still takes one
                    warnings.filterwarnings("ignore", message=".*quantized tensor creation", category=UserWarning)
                    qt = torch._make_per_channel_quantized_tensor(self.qweight, self.scale.double(), zero, 0)
                    cached = self._packed[engine] = (key, torch.ops.quantized.linear_prepack(qt, bias))
            finally:
                torch.backends.quantized.engine = before
        return cached[1]

    def forward(self, x: Tensor) -> Tensor:
        needs_grad = x.requires_grad and torch.is_grad_enabled()
        if needs_grad or not x.is_cpu or x.numel() == 0 or not kernel_available(self.scheme):
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        rows = x.reshape(-1, x.shape[-1])  # (N, in)
        if self.scheme == DYNAMIC:
            rows = rows if rows.dtype == torch.float32 and rows.is_contiguous() else rows.float().contiguous()
            engine = "onednn" if rows.shape[0] >= MANY_ROWS and _has_onednn() else "fbgemm"
            out = torch.ops.quantized.linear_dynamic(rows, self._packed_weight(engine), not _has_vnni())
        elif rows.shape[0] <= FEW_ROWS and self.in_features % PACK_WIDTH == 0:
            out = torch._weight_int8pack_mm(rows.bfloat16().contiguous(), self.qweight,
                                            self.scale.bfloat16()).float()
            out = out if self.bias is None else out + self.bias
        else:
            out = F.linear(rows.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        out = out if out.dtype == x.dtype else out.to(x.dtype)
        return out.view(*x.shape[:-1], self.out_features)


def swap_linears(model: nn.Module, names: Iterable[str], scheme: str, *, empty: bool = False) -> None:
    """Replace the named `nn.Linear`s of `model` by `QuantizedLinear`s (quantized from their
    weights, or `empty` ones of the same shapes for a checkpoint to fill). A name that is not a
    Linear raises ValueError/AttributeError; nothing is swapped then."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    names = list(names)
    linears = []
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"a module name must be a string, got {type(name).__name__}")
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            raise ValueError(f"{name} is a {type(module).__name__}, not a Linear")
        linears.append(module)
    for name, linear in zip(names, linears, strict=True):
        new = (QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None, scheme,
                               device=linear.weight.device)
               if empty else QuantizedLinear.from_linear(linear, scheme))
        model.set_submodule(name, new)


def replay(model: nn.Module, params: dict[str, Any]) -> None:
    """Rebuild a `quantize` edit ({"scheme": ..., "modules": [names]}) by shape on a fresh model."""
    scheme, modules = params["scheme"], params["modules"]
    if not isinstance(modules, list) or not modules:
        raise TypeError(f"modules must be a non-empty list of module names, got {modules!r}")
    swap_linears(model, modules, scheme, empty=True)


__all__ = ["DYNAMIC", "SCHEMES", "WEIGHT_ONLY", "QuantizedLinear", "kernel_available", "quantize_rows",
           "replay", "swap_linears"]
