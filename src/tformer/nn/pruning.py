"""Structured pruning, the torch part: slicing Linear layers, gates that measure (or mask) the
contribution of every attention head and feed-forward unit, magnitude importance, and `replay`,
which restores a pruned model's shapes by counts on a freshly built one.

Prunable modules are found by what they can do, never by family: a module with
`keep_heads(indices)` owns heads (`n_heads`; its `out_proj` reads them, head after head, each
`out_proj.in_features / n_heads` wide), a module with `keep_units(indices)` owns hidden units
(`n_units`; its `down` projection reads them). A gate is a vector of ones multiplied into what
that projection reads (a forward pre-hook), so d loss / d gate_h is the head importance of
Michel et al. 2019 ("Are Sixteen Heads Really Better than One?", eq. 2) and the same for units;
gates of zeros and ones mask heads and units without removing them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn


# -- slicing -------------------------------------------------------------------------------------
def checked_indices(indices: Sequence[int], n: int, what: str) -> list[int]:
    """Sorted distinct indices in [0, n), at least one; a ValueError names what was wrong."""
    kept = sorted({int(i) for i in indices})
    if not kept:
        raise ValueError(f"keep at least one {what} (got none of {n})")
    if kept[0] < 0 or kept[-1] >= n:
        raise ValueError(f"{what} indices must lie in [0, {n}), got {kept[0]}..{kept[-1]}")
    if len(kept) != len(list(indices)):
        raise ValueError(f"{what} indices repeat: {list(indices)}")
    return kept


def spans(blocks: Sequence[int], width: int, offset: int = 0) -> Tensor:
    """Row indices of blocks `blocks` of `width` rows each, starting at `offset`: the rows of
    heads (width head_dim) or units (width 1) inside a fused projection."""
    if not blocks:
        return torch.zeros(0, dtype=torch.long)
    starts = torch.tensor(blocks, dtype=torch.long) * width + offset
    return (starts.unsqueeze(1) + torch.arange(width)).reshape(-1)


def _linear(layer: nn.Module) -> nn.Linear:
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"pruning slices nn.Linear layers, got {type(layer).__name__}; prune before "
                        "other edits (quantization, LoRA)")
    return layer


def keep_rows(layer: nn.Module, rows: Tensor) -> None:
    """Keep output features `rows` of a Linear (weight rows and bias entries), in place."""
    layer = _linear(layer)
    rows = rows.to(layer.weight.device)
    with torch.no_grad():
        weight = nn.Parameter(layer.weight.index_select(0, rows).clone(),
                              requires_grad=layer.weight.requires_grad)
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.index_select(0, rows).clone(),
                                      requires_grad=layer.bias.requires_grad)
    layer.weight, layer.out_features = weight, len(rows)


def keep_columns(layer: nn.Module, columns: Tensor) -> None:
    """Keep input features `columns` of a Linear (weight columns; the bias is untouched)."""
    layer = _linear(layer)
    with torch.no_grad():
        weight = nn.Parameter(layer.weight.index_select(1, columns.to(layer.weight.device)).clone(),
                              requires_grad=layer.weight.requires_grad)
    layer.weight, layer.in_features = weight, len(columns)


def keep_entries(param: nn.Parameter, index: Tensor) -> nn.Parameter:
    """A new Parameter holding `param[index]` (dim 0)."""
    with torch.no_grad():
        return nn.Parameter(param.index_select(0, index.to(param.device)).clone(),
                            requires_grad=param.requires_grad)


# -- finding prunable modules --------------------------------------------------------------------
def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module that owns attention heads (has `keep_heads`), by name, in model order."""
    return {name: m for name, m in model.named_modules() if callable(getattr(m, "keep_heads", None))}


def unit_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module that owns feed-forward units (has `keep_units`), by name, in model order."""
    return {name: m for name, m in model.named_modules() if callable(getattr(m, "keep_units", None))}


# -- gates ---------------------------------------------------------------------------------------
def _head_hook(gate: Tensor, n_heads: int):
    def hook(_: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        x = args[0]  # (..., H * D): the heads' outputs side by side
        gated = x.unflatten(-1, (n_heads, -1)) * gate.to(x.dtype).unsqueeze(-1)
        return (gated.flatten(-2), *args[1:])
    return hook


def _unit_hook(gate: Tensor):
    def hook(_: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return (args[0] * gate.to(args[0].dtype), *args[1:])  # (..., U) * (U,)
    return hook


@contextmanager
def gates(model: nn.Module, values: Mapping[str, Tensor] | None = None, *, heads: bool = True,
          units: bool = True, requires_grad: bool = True) -> Iterator[dict[str, Tensor]]:
    """Gates on every head module (one entry per head) and unit module (one per unit) while the
    block runs: {module name: gate}, ones unless `values` gives one. After a backward pass,
    `gate.grad` is d loss / d gate. The hooks are removed when the block ends."""
    values = dict(values or {})
    found: dict[str, Tensor] = {}
    handles = []
    try:
        for kind, modules in (("heads", head_modules(model) if heads else {}),
                              ("units", unit_modules(model) if units else {})):
            for name, module in modules.items():
                n = module.n_heads if kind == "heads" else module.n_units
                site = module.out_proj if kind == "heads" else module.down
                gate = values.pop(name, None)
                gate = torch.ones(n, device=site.weight.device) if gate is None else gate.detach().clone()
                if gate.shape != (n,):
                    raise ValueError(f"the gate of {name} must have {n} entries, got {tuple(gate.shape)}")
                dtype = torch.promote_types(site.weight.dtype, torch.float32)  # fp64 stays fp64
                gate = gate.to(site.weight.device, dtype).requires_grad_(requires_grad)
                hook = _head_hook(gate, n) if kind == "heads" else _unit_hook(gate)
                handles.append(site.register_forward_pre_hook(hook))
                found[name] = gate
        if values:
            raise ValueError(f"gates given for modules that have no heads or units: {', '.join(values)}")
        yield found
    finally:
        for handle in handles:
            handle.remove()


def masks(model: nn.Module, keep: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
    """Gate values that keep the heads/units `keep[name]` of each named module and zero the rest
    (for `gates(model, masks(...))`: a masked model to compare a pruned one with)."""
    modules = {**head_modules(model), **unit_modules(model)}
    out = {}
    for name, kept in keep.items():
        module = modules[name]
        n = module.n_heads if name in head_modules(model) else module.n_units
        gate = torch.zeros(n)
        gate[list(kept)] = 1.0
        out[name] = gate
    return out


# -- magnitude importance ------------------------------------------------------------------------
def _row_norms(weight: Tensor, n: int) -> Tensor:
    return weight.detach().float().unflatten(0, (n, -1)).pow(2).flatten(1).sum(1)  # (n,) squared


def magnitude(module: nn.Module) -> Tensor:
    """Weight-magnitude importance of each head or unit of `module`: the L2 norm of the weights
    that belong to it alone (query rows and output-projection columns of a head; the input rows,
    gate and up for SwiGLU, and output column of a unit)."""
    if callable(getattr(module, "keep_heads", None)):
        n = module.n_heads
        q_proj = getattr(module, "q_proj", None)
        q = q_proj.weight if q_proj is not None else module.qkv_proj.weight[: module.out_proj.in_features]
        return (_row_norms(q, n) + _row_norms(module.out_proj.weight.t(), n)).sqrt()
    if callable(getattr(module, "keep_units", None)):
        n = module.n_units
        rows = module.input_rows()  # (k, n, d_model): every input weight row of each unit
        inputs = rows.detach().float().pow(2).sum(dim=(0, 2))
        return (inputs + _row_norms(module.down.weight.t(), n)).sqrt()
    raise TypeError(f"{type(module).__name__} has no heads or units to prune")


# -- replay --------------------------------------------------------------------------------------
def head_layout(module: nn.Module, heads: int, kv_heads: int | None) -> list[int]:
    """The query heads a pruned attention with `heads` query and `kv_heads` key/value heads keeps
    as the first heads of its first groups (the shapes are what matters; weights come later)."""
    n, n_kv = module.n_heads, getattr(module, "n_kv_heads", module.n_heads)
    kv_heads = kv_heads if kv_heads is not None else (heads if n_kv == n else n_kv)
    if not (isinstance(heads, int) and isinstance(kv_heads, int)) or kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"heads={heads!r} must be a positive multiple of kv_heads={kv_heads!r}")
    group, per = n // n_kv, heads // kv_heads
    if kv_heads > n_kv or per > group:
        raise ValueError(f"{heads} heads in {kv_heads} groups do not fit {n} heads in {n_kv} groups")
    return [g * group + j for g in range(kv_heads) for j in range(per)]


def replay(model: nn.Module, params: dict[str, Any]) -> None:
    """Restore a prune edit's shapes on `model`: params {"modules": {name: {"heads": H,
    "kv_heads": Hkv, "head_ids": [...]} | {"units": U}}}. Raises KeyError, TypeError or
    ValueError when they do not fit the model."""
    modules = params["modules"]
    if not isinstance(modules, Mapping):
        raise TypeError(f"prune modules must be a mapping, got {type(modules).__name__}")
    for name, spec in modules.items():
        module = model.get_submodule(name)
        if "heads" in spec:
            if not callable(getattr(module, "keep_heads", None)):
                raise ValueError(f"{name} has no heads")
            module.keep_heads(head_layout(module, spec["heads"], spec.get("kv_heads")))
            if spec.get("head_ids") is not None:
                module.set_head_ids(spec["head_ids"])
        if "units" in spec:
            if not callable(getattr(module, "keep_units", None)):
                raise ValueError(f"{name} has no feed-forward units")
            units = spec["units"]
            if not isinstance(units, int) or not 1 <= units <= module.n_units:
                raise ValueError(f"{name}: units={units!r} must be in [1, {module.n_units}]")
            module.keep_units(range(units))


__all__ = ["checked_indices", "gates", "head_layout", "head_modules", "keep_columns", "keep_entries",
           "keep_rows", "magnitude", "masks", "replay", "spans", "unit_modules"]
