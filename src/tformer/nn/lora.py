"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a frozen linear
layer plus a trainable low-rank update, y = x W^T + b + (alpha / r) * dropout(x) A^T B^T.

`LoRALinear` keeps the base layer's parameters under their own names (`weight`, `bias`), so a
plain checkpoint loads into an adapted model and the adapters are just two more tensors per layer
(`lora_A` (r, in), `lora_B` (out, r)). B starts at zero: a fresh LoRA computes exactly the base.
It is deliberately not an `nn.Linear` subclass: code that rewrites linear layers by type (bf16
weight packing, quantization) would otherwise replace its forward and silently drop the adapter.

`add_lora(model, targets, r, alpha, dropout)` adapts the linears chosen by name patterns, or by
default the projections of every attention and feed-forward module found by type (whatever the
family); `replay(model, params)` rebuilds a recorded LoRA edit by shape (`models.edits`).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.nn.attention import MultiHeadAttention
from tformer.nn.dropout import dropout as fast_dropout
from tformer.nn.feedforward import MLP, SwiGLU
from tformer.nn.relative import RelativeMultiHeadAttention

# module type -> its linears that LoRA adapts by default: attention projections (the relative
# attention's position projection W_{k,R} reads fixed sinusoids, so it is left out) and the MLP
DEFAULT_PARTS: dict[type, tuple[str, ...]] = {
    MultiHeadAttention: ("qkv_proj", "q_proj", "kv_proj", "out_proj"),
    RelativeMultiHeadAttention: ("q_proj", "kv_proj", "out_proj"),
    MLP: ("up", "down"),
    SwiGLU: ("gate_up", "down"),
}
ADAPTER_NAMES = ("lora_A", "lora_B")


class LoRALinear(nn.Module):
    """A linear layer (its `weight`, `bias` as they were) with a rank-r adapter beside it."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter objects: ties (e.g. to embeddings) survive
        self.bias = base.bias
        factory = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))  # (out, r): zero
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and peft) initialise A
        self.r, self.alpha, self.dropout = r, float(alpha), float(dropout)
        self.merged = False

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def delta(self) -> Tensor:
        """The update the adapter adds to `weight`: (alpha / r) B A, (out, in), in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        h = fast_dropout(x, self.dropout, self.training)
        return out + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling  # (..., r) -> (..., out)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into `weight` (one product per call afterwards); `unmerge` undoes it.
        Merged, the layer ignores its adapter dropout (as in evaluation)."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta()).to(self.weight.dtype))
            self.merged = False

    def plain(self) -> nn.Linear:
        """An `nn.Linear` holding the merged weight (this layer is left as it was)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           dtype=self.weight.dtype, device=self.weight.device)
        with torch.no_grad():
            update = 0.0 if self.merged else self.delta()
            linear.weight.copy_((self.weight.float() + update).to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        if self.merged:  # the stored weight would hold the update twice once loaded and unmerged
            raise ValueError("a merged LoRA layer cannot be saved; unmerge() it first, or save the "
                             "merged model with tformer.compress.lora.merge_lora")
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, dropout={self.dropout:g}{', merged' if self.merged else ''}")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapted layers of `model`, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def default_targets(model: nn.Module) -> list[str]:
    """The linears LoRA adapts when no targets are named: the projections of every attention
    and feed-forward module, found by module type (DEFAULT_PARTS), in model order."""
    chosen = []
    for name, module in model.named_modules():
        for kind, parts in DEFAULT_PARTS.items():
            if isinstance(module, kind):
                chosen += [f"{name}.{part}" if name else part for part in parts
                           if isinstance(getattr(module, part, None), nn.Linear)]
    return chosen


def matches(name: str, pattern: str) -> bool:
    """A module name matches a pattern as a whole ("blocks.0.attn.*") or by its last parts
    ("qkv_proj", "attn.out_proj"); `*` and `?` are shell wildcards and also match dots."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def resolve_targets(model: nn.Module, targets: Sequence[str] | None) -> list[str]:
    """The names of the linears `targets` choose (None: `default_targets`); a pattern that
    chooses no linear layer is one ValueError naming it and examples of what there is."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if targets is None:
        chosen = default_targets(model)
        if not chosen:
            raise ValueError(f"{type(model).__name__} has no attention or feed-forward linears LoRA knows "
                             f"by default; name its linears in targets, e.g. {linears[:4]}")
        return chosen
    if isinstance(targets, str) or not all(isinstance(p, str) and p for p in targets) or not targets:
        raise ValueError(f"LoRA targets must be a non-empty list of module name patterns "
                         f"(e.g. [qkv_proj, out_proj]), got {targets!r}")
    for pattern in targets:
        if not any(matches(name, pattern) for name in linears):
            parts = sorted({name.rsplit(".", 1)[-1] for name in linears})
            raise ValueError(f"LoRA target {pattern!r} matches no linear layer of this "
                             f"{type(model).__name__}; its linears are named {', '.join(parts)} "
                             f"(e.g. {linears[0] if linears else 'none'})")
    chosen = [name for name in linears if any(matches(name, p) for p in targets)]
    _check_not_shared(model, chosen)
    return chosen


def _check_not_shared(model: nn.Module, chosen: list[str]) -> None:
    """A weight tied to another module (an LM head tied to the token embeddings) cannot take an
    adapter: merging it would change the embeddings too, and a merged copy would untie them."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name.rsplit(".", 1)[0])
    for name in chosen:
        others = [o for o in owners[id(model.get_submodule(name).weight)] if o != name]
        if others:
            raise ValueError(f"LoRA cannot adapt {name}: its weight is shared with {others[0]} (tied "
                             "embeddings), so merging it would change both; leave it out of the targets")


def check_params(r: Any, alpha: Any, dropout: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def _check_no_lora(model: nn.Module) -> None:
    if lora_layers(model):
        raise ValueError(f"this {type(model).__name__} already has LoRA adapters; merge them into a plain "
                         "model first (tformer adapter RUN --merge)")


def wrap(model: nn.Module, names: Iterable[str], r: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Replace the named `nn.Linear`s by `LoRALinear`s (no freezing); KeyError/TypeError for a
    name that is not a linear layer of `model`."""
    check_params(r, alpha, dropout)
    _check_no_lora(model)
    modules, names = dict(model.named_modules()), list(names)
    for name in names:
        if name not in modules:
            raise KeyError(f"no module {name!r}")
        if not isinstance(modules[name], nn.Linear):
            raise TypeError(f"{name} is a {type(modules[name]).__name__}, not a linear layer")
    for name in names:
        model.set_submodule(name, LoRALinear(modules[name], r, alpha, dropout))
    return names


def add_lora(model: nn.Module, targets: Sequence[str] | None = None, *, r: int = 8, alpha: float = 16,
             dropout: float = 0.0) -> dict[str, Any]:
    """Adapt the linears `targets` choose (module name patterns; None: every attention and
    feed-forward projection) with rank-r adapters, and freeze everything but the adapters.
    Returns the edit's params for `models.edits.note_edit(model, "lora", params)`."""
    check_params(r, alpha, dropout)
    _check_no_lora(model)
    names = wrap(model, resolve_targets(model, targets), r, alpha, dropout)
    for param_name, param in model.named_parameters():
        param.requires_grad_(param_name.rsplit(".", 1)[-1] in ADAPTER_NAMES)
    return {"targets": None if targets is None else list(targets), "r": r, "alpha": alpha,
            "dropout": dropout, "modules": names}


def replay(model: nn.Module, params: dict[str, Any]) -> None:
    """Rebuild a recorded LoRA edit on a freshly built model: the same layers, the same rank
    (the adapters' values are loaded afterwards)."""
    modules = params["modules"]
    if not isinstance(modules, list) or not modules:
        raise ValueError(f"modules must be a non-empty list of module names, got {modules!r}")
    wrap(model, modules, params["r"], params["alpha"], params.get("dropout", 0.0))


def merge(model: nn.Module) -> int:
    """Merge every adapter of `model` into its weight (in place); returns how many."""
    layers = lora_layers(model)
    for layer in layers.values():
        layer.merge()
    return len(layers)


def unmerge(model: nn.Module) -> int:
    layers = lora_layers(model)
    for layer in layers.values():
        layer.unmerge()
    return len(layers)


def remove_lora(model: nn.Module) -> int:
    """Replace every `LoRALinear` by a plain `nn.Linear` holding the merged weight (in place)."""
    layers = lora_layers(model)
    modules = dict(model.named_modules())
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, layer.plain())
    return len(layers)


__all__ = ["DEFAULT_PARTS", "LoRALinear", "add_lora", "default_targets", "lora_layers", "merge",
           "remove_lora", "replay", "resolve_targets", "unmerge", "wrap"]
