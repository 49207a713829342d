"""Attention probability maps from any backend (sdpa, flex, eager), without switching backends.

Every attention module passes its queries and keys through a parameter-free `qk` probe right
before the scores (`tformer.nn.probe`). Forward hooks read them there, together with what the
attention was called with (mask, ALiBi bias, cache offset, Transformer-XL's relative encodings),
and recompute softmax probabilities only for the layers and heads asked for, the way the eager
backend computes them:

    maps = attention_maps(model, ids, attention_mask=mask)        # any forward
    maps = attention_maps(model.classify, ids, mask)              # or any method of the model
    maps["self", 0]                                               # (B, H, T, S) float32
    maps.query_positions["self", 0], maps.key_positions["self", 0]

Kinds: "self" (GPT, BERT, ViT, Transformer-XL), and for encoder-decoders "encoder", "decoder"
(its self-attention) and "cross" (decoder -> encoder: a translation alignment).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from tformer.nn.attention import AttentionInputs
from tformer.nn.kv_cache import LayerKV
from tformer.nn.probe import QKProbe
from tformer.nn.relative import RelativeInputs, position_scores

Key = tuple[str, int]  # (kind, layer)
KINDS = ("self", "encoder", "decoder", "cross")


class AttentionMaps(Mapping[Key, Tensor]):
    """(kind, layer) -> probabilities (B, len(head_ids[kind, layer]), T, S), float32, rows sum to
    1 over visible keys (a query that sees no key, e.g. padding under padding, is a row of zeros).

    head_ids:        (kind, layer) -> the query heads of dim 1, in that order (the layer's head
                     indices: after pruning, positions among the heads it kept); layers of a
                     pruned model may have different numbers of heads
    heads:           those heads when every captured layer has the same ones (ValueError else)
    query_positions: (kind, layer) -> (T,) absolute position of each query row as the mask sees
                     it (a KV cache's offset, Transformer-XL's memory length added)
    key_positions:   (kind, layer) -> (S,) position of each key column (cache slots, memory first)
    output:          what the model's forward returned (None inside `capture_attention`)
    """

    def __init__(self, head_ids: Mapping[Key, Sequence[int]]) -> None:
        self.head_ids: dict[Key, tuple[int, ...]] = {key: tuple(h) for key, h in head_ids.items()}
        self.maps: dict[Key, Tensor] = {}
        self.query_positions: dict[Key, Tensor] = {}
        self.key_positions: dict[Key, Tensor] = {}
        self.output: Any = None

    @property
    def heads(self) -> tuple[int, ...]:
        different = set(self.head_ids.values())
        if len(different) > 1:
            raise ValueError("the layers have different heads (a pruned model): read head_ids[kind, layer] "
                             f"per layer; heads per layer: {self._counts()}")
        return next(iter(different), ())

    def _counts(self, kind: str | None = None) -> str:
        return ", ".join(f"{k} {layer}: {len(h)}" for (k, layer), h in sorted(self.head_ids.items())
                         if kind is None or k == kind)

    def __getitem__(self, key: Key) -> Tensor:
        if key not in self.maps:
            raise KeyError(f"no attention map for {key}; captured: {sorted(self.maps)}")
        return self.maps[key]

    def __iter__(self) -> Iterator[Key]:
        return iter(self.maps)

    def __len__(self) -> int:
        return len(self.maps)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k in KINDS if any(kind == k for kind, _ in self.maps))

    def layers(self, kind: str) -> list[Tensor]:
        """Every captured layer of one kind, in layer order: [(B, H_l, T, S), ...], each layer
        with its own number of heads H_l."""
        layers = sorted(layer for k, layer in self.maps if k == kind)
        if not layers:
            raise ValueError(f"no {kind!r} attention was captured; kinds: {self.kinds}")
        return [self.maps[kind, layer] for layer in layers]

    def stack(self, kind: str) -> Tensor:
        """Every captured layer of one kind, in layer order: (L, B, H, T, S). ValueError when the
        layers have different numbers of heads (pruned): use `layers(kind)` then."""
        maps = self.layers(kind)
        if len({m.shape[1] for m in maps}) > 1:
            raise ValueError(f"{kind} attention layers have different numbers of heads (pruned: "
                             f"{self._counts(kind)}), so they do not stack; read them with layers({kind!r}) "
                             "or capture heads every layer has")
        return torch.stack(maps)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self.maps.items())
        return f"AttentionMaps({{{shapes}}})"


def module_of(model: Any) -> nn.Module:
    """The nn.Module behind `model`: itself, a bound method's owner (`model.classify`), or the
    model a wrapper holds (a bound decoder's `.model`)."""
    for candidate in (model, getattr(model, "__self__", None), getattr(model, "model", None)):
        if isinstance(candidate, nn.Module):
            return candidate
    raise TypeError(f"expected a model (torch.nn.Module) or one of its methods, got {type(model).__name__}")


def attention_sites(model: Any) -> dict[str, list[nn.Module]]:
    """kind -> the model's attention modules of that kind in layer order. An attention module is
    one with a `qk` probe; its stack is the ModuleList it sits in; a stack whose blocks also
    cross-attend is a decoder, the other stack then an encoder, a lone stack is "self"."""
    stacks: dict[str, dict[str, list[nn.Module]]] = {}
    for name, module in module_of(model).named_modules():
        if not isinstance(getattr(module, "qk", None), QKProbe):
            continue
        stack = name.rsplit(".", 2)[0] if name.count(".") >= 2 else ""
        role = "cross" if getattr(module, "is_cross", False) else "self"
        stacks.setdefault(stack, {"self": [], "cross": []})[role].append(module)
    if not stacks:
        raise ValueError(f"{type(module_of(model)).__name__} has no attention layers "
                         "(no module with a `qk` probe), so there are no attention maps")
    has_cross = any(s["cross"] for s in stacks.values())
    sites: dict[str, list[nn.Module]] = {}
    for roles in stacks.values():
        kind = ("decoder" if roles["cross"] else "encoder") if has_cross else "self"
        if kind in sites:
            raise ValueError(f"more than one {kind!r} attention stack; attention maps need one per kind")
        sites[kind] = roles["self"]
        if roles["cross"]:
            sites["cross"] = roles["cross"]
    return {kind: sites[kind] for kind in KINDS if kind in sites}


def _check_layers(sites: dict[str, list[nn.Module]], kinds: Sequence[str] | None,
                  layers: Sequence[int] | None) -> dict[str, list[int]]:
    """kind -> the layer indices to capture; one-line ValueErrors naming the valid choices."""
    kinds = tuple(sites) if kinds is None else tuple(kinds)
    for kind in kinds:
        if kind not in sites:
            what = "no cross-attention" if kind == "cross" else f"no {kind!r} attention"
            raise ValueError(f"this model has {what}; its attention kinds are {tuple(sites)}")
    chosen = {}
    for kind in kinds:
        n = len(sites[kind])
        picked = list(range(n)) if layers is None else [int(layer) for layer in layers]
        bad = [layer for layer in picked if not 0 <= layer < n]
        if bad:
            raise ValueError(f"layer {bad[0]} is out of range: {kind} attention has layers 0..{n - 1}")
        chosen[kind] = sorted(set(picked))
    return chosen


def _check_heads(sites: dict[str, list[nn.Module]], chosen: dict[str, list[int]],
                 heads: Sequence[int] | None) -> dict[Key, tuple[int, ...]]:
    """(kind, layer) -> the heads to capture: all of the layer's own (None), else `heads`, which
    every chosen layer must have (pruned layers may have fewer); one-line ValueErrors."""
    picked = None if heads is None else tuple(int(h) for h in heads)
    if picked is not None and not picked:
        raise ValueError("no heads asked for: give at least one head index (or none at all for every head)")
    counts = sorted({sites[kind][layer].n_heads for kind, layers in chosen.items() for layer in layers})
    head_ids = {}
    for kind, layers in chosen.items():
        for layer in layers:
            n = sites[kind][layer].n_heads
            bad = [] if picked is None else [h for h in picked if not 0 <= h < n]
            if bad and len(counts) == 1:
                raise ValueError(f"head {bad[0]} is out of range: the attention has heads 0..{n - 1}")
            if bad:
                raise ValueError(f"head {bad[0]} is out of range: {kind} attention layer {layer} has heads 0..{n - 1} "
                                 f"(pruned: the chosen layers have {counts[0]} to {counts[-1]} heads; ask for "
                                 "heads every chosen layer has)")
            head_ids[kind, layer] = tuple(range(n)) if picked is None else picked
    return head_ids


def masked_softmax(scores: Tensor, mask: Any, bias: Any, q_offset: int | Tensor, heads: Tensor) -> Tensor:
    """softmax(scores + bias) over visible keys, as the eager backend computes it, with the mask
    and bias evaluated at the selected heads only. scores: (B, h, T, S) float32; queries stand at
    q_offset + i; a row with no visible key is zeros."""
    B, _, T, S = scores.shape
    device = scores.device
    b = torch.arange(B, device=device).view(-1, 1, 1, 1)
    h = heads.to(device).view(1, -1, 1, 1)
    q = (torch.arange(T, device=device) + q_offset).view(1, 1, -1, 1)
    kv = torch.arange(S, device=device).view(1, 1, 1, -1)
    if bias is not None:
        scores = scores + bias.mod(b, h, q, kv).float()  # ALiBi: a function of (b, h, q, kv)
    visible = None if mask is None else mask.mod(b, h, q, kv)
    if visible is not None:
        scores = scores.masked_fill(~visible, -math.inf)
    weights = torch.softmax(scores, dim=-1)
    if visible is not None:  # all -inf rows give NaN: zeros, as every backend returns
        weights = weights.masked_fill(~visible.any(-1, keepdim=True), 0.0)
    return weights


def head_bias(attn: nn.Module, bias: Any) -> Any:
    """The score bias as `attn` applies it: its own mapping (`_head_bias`: a pruned layer reads a
    per-head bias such as ALiBi's slopes at each kept head's original index), else unchanged."""
    mapping = getattr(attn, "_head_bias", None)
    return bias if bias is None or mapping is None else mapping(bias)


def _multi_head_probabilities(attn: nn.Module, q: Tensor, k: Tensor, inputs: AttentionInputs,
                              heads: Tensor) -> tuple[Tensor, int]:
    """`MultiHeadAttention`: q (B, H, T, D), k (B, Hkv, S, D) as the probe saw them (RoPE and
    QK-norm applied, cached keys included). -> (B, h, T, S) probabilities, first query position."""
    offset = inputs.cache.cache.offset if isinstance(inputs.cache, LayerKV) and not attn.is_cross else 0
    offset = int(offset)  # read now: the cache moves it on the next step
    if attn.n_kv_heads != attn.n_heads:  # grouped-query: repeat k as the model does
        k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
    q, k = q[:, heads], k[:, heads]
    scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5  # (B, h, T, S), fp32 as eager
    bias = head_bias(attn, inputs.bias)  # a pruned layer reads ALiBi at its heads' original indices
    return masked_softmax(scores, inputs.mask, bias, offset, heads), offset


def _relative_probabilities(attn: nn.Module, q: Tensor, k: Tensor, inputs: RelativeInputs,
                            heads: Tensor) -> tuple[Tensor, int]:
    """Transformer-XL: content term (q + u)·k plus the position term (q + v)·r (`nn.relative`),
    both scaled; queries stand behind M = S - T memory positions."""
    T, S, D = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D)
    r = attn.pos_proj(inputs.pos).view(S, attn.n_heads, D).transpose(0, 1)  # (H, S, D)
    u = attn.content_bias.view(attn.n_heads, D)[heads]
    v = attn.position_bias.view(attn.n_heads, D)[heads]
    q, k = q[:, heads], k[:, heads]
    bd = position_scores(q, r[heads], v) * scale  # (B, h, T, S)
    scores = ((q + u.unsqueeze(1)) @ k.transpose(-2, -1)).float() * scale + bd
    return masked_softmax(scores, inputs.mask, None, S - T, heads), S - T


@contextmanager
def capture_attention(model: Any, *, layers: Sequence[int] | None = None,
                      heads: Sequence[int] | None = None,
                      kinds: Sequence[str] | None = None) -> Iterator[AttentionMaps]:
    """Hooks the chosen attention layers for the block's duration; the maps fill in as the model
    runs (one call per layer: capture one forward at a time).

        with capture_attention(model, kinds=["cross"]) as maps:
            logits = model(src, tgt)
    """
    sites = attention_sites(model)
    chosen = _check_layers(sites, kinds, layers)
    maps = AttentionMaps(_check_heads(sites, chosen, heads))
    handles = []
    for kind, layer_ids in chosen.items():
        for layer in layer_ids:
            handles += _hook(sites[kind][layer], (kind, layer), maps, torch.tensor(maps.head_ids[kind, layer]))
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def _hook(attn: nn.Module, key: Key, maps: AttentionMaps, heads: Tensor) -> list[Any]:
    """A pre-hook keeps the call's inputs object; the `qk` probe's hook recomputes from it."""
    seen: dict[str, Any] = {}

    def keep_inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["inputs"] = args[1] if len(args) > 1 else kwargs.get("inputs")

    def recompute(probe: nn.Module, args: tuple, output: tuple[Tensor, Tensor]) -> None:
        if key in maps.maps:
            raise RuntimeError(f"{key[0]} attention layer {key[1]} ran twice inside one capture; "
                               "capture one forward at a time")
        q, k = (t.detach() for t in output)
        inputs = seen.pop("inputs", None)
        with torch.no_grad():
            if isinstance(inputs, RelativeInputs):
                probs, offset = _relative_probabilities(attn, q, k, inputs, heads.to(q.device))
            else:
                inputs = AttentionInputs() if inputs is None else inputs
                probs, offset = _multi_head_probabilities(attn, q, k, inputs, heads.to(q.device))
        T, S = probs.shape[-2:]
        maps.maps[key] = probs
        maps.query_positions[key] = torch.arange(T, device=q.device) + offset
        maps.key_positions[key] = torch.arange(S, device=q.device)

    return [attn.register_forward_pre_hook(keep_inputs, with_kwargs=True),
            attn.qk.register_forward_hook(recompute)]


def attention_maps(model: Callable[..., Any], *inputs: Any, layers: Sequence[int] | None = None,
                   heads: Sequence[int] | None = None, kinds: Sequence[str] | None = None,
                   **forward_kwargs: Any) -> AttentionMaps:
    """Run `model(*inputs, **forward_kwargs)` once without gradients (any backend, any mode of
    the model: it is not switched) and return the attention probabilities of the chosen kinds,
    layers (None: all) and query heads (None: each layer's own, all of them; a pruned model's
    layers may differ) as the eager backend would compute them.

    `model` is a model (e.g. `open_run(path).model`), one of its methods (`model.classify`,
    `model.encode`) or a bound decoder (`model.bind(src)`). Layers count from 0 within a kind.
    """
    with torch.no_grad(), capture_attention(model, layers=layers, heads=heads, kinds=kinds) as maps:
        maps.output = model(*inputs, **forward_kwargs)
    return maps


__all__ = [
    "KINDS",
    "AttentionMaps",
    "attention_maps",
    "attention_sites",
    "capture_attention",
    "head_bias",
    "masked_softmax",
    "module_of",
]
