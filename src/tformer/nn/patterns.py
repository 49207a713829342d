"""Sparse attention patterns (Longformer, BigBird, Sparse Transformer, block-local) as `Mask`s,
and a registry that builds them by name from config values: `pattern_mask("strided", causal=True,
stride=64)`.

Each pattern function returns the *bidirectional* pattern; `causal() & pattern` is its decoder
form (the registry does this for `causal=True`). Indices are token positions; `at_positions`
evaluates a pattern at per-row position ids instead of buffer slots (left padding, KV caches).

A pattern whose reach (window, block, stride) exceeds the longest sequence (`max_len`) would be
plain dense attention: `pattern_mask` refuses it. On a shorter input the pattern is evaluated
exactly as defined, e.g. a 256-token window over 100 tokens equals causal attention there.

Backends: every pattern runs on all three. "flex" is the sparse one (a BlockMask, cached on the
Mask per length: build the Mask once); "sdpa" and "eager" materialise the dense (T, T) mask and
do dense work, the reference. On CPU, flex has no backward in PyTorch 2.13: with gradients it
falls back to SDPA with the dense mask and logs so once (`tformer.nn.attend`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tformer.nn import masks
from tformer.nn.masks import Mask

__all__ = ["PATTERNS", "at_positions", "bigbird", "block_local", "check_pattern", "dilated_window",
           "fixed", "global_tokens", "local_window", "pattern_mask", "strided"]


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")  # noqa: TRY004 (a config value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def local_window(window: int) -> Mask:
    """Keys within `window - 1` positions on either side: |q - kv| < window.
    `causal() & local_window(w)` equals `sliding_window(w)` (w keys, itself included)."""
    _check_int("window", window, 1)
    return Mask(lambda b, h, q, kv: (q - kv).abs() < window, f"local_window({window})")


def dilated_window(window: int, dilation: int) -> Mask:
    """`window` keys spaced `dilation` apart on each side: |q - kv| in {0, d, 2d, ..., (w-1)d}
    (Longformer's dilated sliding window, Beltagy et al. 2020, section 3.1)."""
    _check_int("window", window, 1)
    _check_int("dilation", dilation, 1)

    def mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        distance = (q - kv).abs()
        return (distance % dilation == 0) & (distance < window * dilation)

    return Mask(mod, f"dilated_window({window}, {dilation})")


def global_tokens(count: int) -> Mask:
    """The first `count` tokens attend to every token and every token attends to them
    (Longformer's global attention). With `causal()`: visible to every later query."""
    _check_int("global tokens", count, 1)
    return Mask(lambda b, h, q, kv: (q < count) | (kv < count), f"global_tokens({count})")


def block_local(block_size: int, previous: bool = False) -> Mask:
    """Attend within the same block of `block_size` tokens; with `previous`, also to the whole
    block before (Image Transformer's local 1D attention, Parmar et al. 2018)."""
    _check_int("block_size", block_size, 1)
    if previous:
        def mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            gap = q // block_size - kv // block_size
            return (gap == 0) | (gap == 1)
    else:
        def mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return q // block_size == kv // block_size
    return Mask(mod, f"block_local({block_size}{', previous' if previous else ''})")


def strided(stride: int) -> Mask:
    """Sparse Transformer strided pattern (Child et al. 2019, section 4.3), both heads merged:
    the last `stride` positions, A(1) = {j : i - j < l}, and every l-th one, A(2) = {j : (i - j)
    mod l = 0}. The paper's A(1) includes i - l, which A(2) holds anyway."""
    _check_int("stride", stride, 1)

    def mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        distance = (q - kv).abs()
        return (distance < stride) | (distance % stride == 0)

    return Mask(mod, f"strided({stride})")


def fixed(stride: int, c: int) -> Mask:
    """Sparse Transformer fixed pattern (Child et al. 2019, section 4.3), merged: the same block
    of l = `stride` tokens, A(1) = {j : floor(j/l) = floor(i/l)}, and the last `c` positions of
    every block, A(2) = {j : j mod l in {l - c, ..., l - 1}} ("summary" cells)."""
    _check_int("stride", stride, 1)
    _check_int("c", c, 1)
    if c > stride:
        raise ValueError(f"c (summary positions per block) must be <= stride ({stride}), got {c}")

    def mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return (q // stride == kv // stride) | (kv % stride >= stride - c)

    return Mask(mod, f"fixed({stride}, c={c})")


def bigbird_blocks(n_blocks: int, window_blocks: int, global_blocks: int, random_blocks: int,
                   seed: int, causal: bool) -> Tensor:
    """(n_blocks, n_blocks) bool block adjacency of BigBird (Zaheer et al. 2020, ITC): a window
    of `window_blocks` blocks centred on the query block, the first `global_blocks` blocks
    global, and `random_blocks` more key blocks per query block drawn without replacement from
    the rest (earlier blocks only when `causal`), reproducibly from `seed`."""
    idx = torch.arange(n_blocks)
    qb, kb = idx.view(-1, 1), idx.view(1, -1)
    adj = ((qb - kb).abs() <= window_blocks // 2) | (qb < global_blocks) | (kb < global_blocks)
    if causal:
        adj &= qb >= kb
    generator = torch.Generator().manual_seed(seed)
    for i in range(n_blocks):
        candidates = (~adj[i]).nonzero().flatten()
        if causal:
            candidates = candidates[candidates < i]
        order = torch.randperm(len(candidates), generator=generator)
        adj[i, candidates[order[:random_blocks]]] = True
    return adj


def bigbird(block_size: int, max_len: int, *, window_blocks: int = 3, global_blocks: int = 1,
            random_blocks: int = 3, seed: int = 0, causal: bool = False,
            device: torch.device | str | None = None) -> Mask:
    """BigBird block-sparse attention over sequences of up to `max_len` tokens: sliding window +
    global + random key blocks (see `bigbird_blocks`); the same `seed` gives the same mask.
    `causal` draws random blocks from earlier blocks only (combine with `causal()`). Random blocks
    are drawn for the first `max_len` tokens; past them a query keeps its window and the global
    blocks (the pattern's deterministic part), so a longer input is masked, not an IndexError."""
    _check_int("block_size", block_size, 1)
    _check_int("max_len", max_len, 1)
    _check_int("window_blocks", window_blocks, 1)
    _check_int("global_blocks", global_blocks, 0)
    _check_int("random_blocks", random_blocks, 0)
    _check_int("seed", seed, 0)
    if window_blocks % 2 == 0:
        raise ValueError(f"window_blocks must be odd (the query block and as many on each side), "
                         f"got {window_blocks}")
    n_blocks = -(-max_len // block_size)
    adj = bigbird_blocks(n_blocks, window_blocks, global_blocks, random_blocks, seed, causal)
    adj = adj.to(device)  # indexed inside the mask function: must live where q and k live
    last, half = n_blocks - 1, window_blocks // 2

    def mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        qb, kb = q // block_size, kv // block_size
        drawn = adj[qb.clamp(max=last), kb.clamp(max=last)]  # the table covers max_len tokens
        # past max_len (no index error, no clamped lookalike): window + global blocks, no random
        beyond = ((qb - kb).abs() <= half) | (qb < global_blocks) | (kb < global_blocks)
        if causal:
            beyond = beyond & (qb >= kb)
        return torch.where((qb <= last) & (kb <= last), drawn, beyond)

    name = (f"bigbird(block={block_size}, window={window_blocks}, global={global_blocks}, "
            f"random={random_blocks}, seed={seed}{', causal' if causal else ''})")
    return Mask(mod, name)


def at_positions(mask: Mask, positions: Tensor) -> Mask:
    """`mask` evaluated at token positions instead of buffer slots. positions: (B, L) long, the
    position id of each slot (e.g. `valid.cumsum(-1) - 1` under left padding)."""
    def mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return mask.mod(b, h, positions[b, q], positions[b, kv])

    return Mask(mod, f"{mask.name} at positions", batch_dependent=True)


REQUIRED = object()
Builder = Callable[[dict[str, Any], bool, "int | None", "torch.device | str | None"], Mask]


@dataclass(frozen=True)
class PatternSpec:
    """A registered pattern: `build(params, causal, max_len, device)` (bidirectional form unless
    `causal`), its parameters with defaults (REQUIRED: no default) and how far it reaches."""

    build: Builder
    params: dict[str, Any]
    reach: Callable[[dict[str, Any]], int] | None
    summary: str


def _global(p: dict[str, Any], causal_: bool, max_len: int | None, device: Any) -> Mask:
    pattern = global_tokens(p["tokens"])
    return pattern if p["window"] is None else pattern | local_window(p["window"])


PATTERNS: dict[str, PatternSpec] = {
    "causal": PatternSpec(lambda p, c, n, d: masks.causal(), {}, None, "dense causal attention"),
    "full": PatternSpec(lambda p, c, n, d: masks.full(), {}, None, "dense attention"),
    "sliding_window": PatternSpec(
        lambda p, c, n, d: local_window(p["window"]),
        {"window": REQUIRED}, lambda p: p["window"], "Longformer / Mistral window"),
    "dilated_window": PatternSpec(
        lambda p, c, n, d: dilated_window(p["window"], p["dilation"]),
        {"window": REQUIRED, "dilation": REQUIRED}, lambda p: (p["window"] - 1) * p["dilation"] + 1,
        "Longformer dilated window"),
    "global_tokens": PatternSpec(_global, {"tokens": REQUIRED, "window": None},
                                 lambda p: max(p["tokens"], p["window"] or 0),
                                 "Longformer global tokens, optionally | a local window"),
    "bigbird": PatternSpec(
        lambda p, c, n, d: bigbird(p["block_size"], _need_max_len(n), window_blocks=p["window_blocks"],
                                   global_blocks=p["global_blocks"], random_blocks=p["random_blocks"],
                                   seed=p["seed"], causal=c, device=d),
        {"block_size": 64, "window_blocks": 3, "global_blocks": 1, "random_blocks": 3, "seed": 0},
        lambda p: p["block_size"], "BigBird window + global + random blocks"),
    "strided": PatternSpec(lambda p, c, n, d: strided(p["stride"]), {"stride": REQUIRED},
                           lambda p: p["stride"], "Sparse Transformer strided"),
    "fixed": PatternSpec(lambda p, c, n, d: fixed(p["stride"], p["c"]), {"stride": REQUIRED, "c": 1},
                         lambda p: p["stride"], "Sparse Transformer fixed"),
    "block_local": PatternSpec(lambda p, c, n, d: block_local(p["block_size"], p["previous"]),
                               {"block_size": REQUIRED, "previous": False},
                               lambda p: p["block_size"], "attention within blocks"),
}


def _need_max_len(max_len: int | None) -> int:
    if max_len is None:
        raise ValueError("the bigbird pattern draws its random blocks for a maximum length: pass "
                         "max_len (a model passes its context length)")
    return max_len


def _suggest(name: str, options: list[str]) -> str:
    """' (did you mean 'x'?)' (tformer.config.did_you_mean; nn imports torch only)."""
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_pattern(name: str, params: dict[str, Any], max_len: int | None = None) -> dict[str, Any]:
    """Validate a pattern name and its parameters; return the parameters with defaults filled.
    Raises ValueError naming the problem (unknown name or parameter, missing or bad value, a
    reach beyond `max_len`)."""
    if name not in PATTERNS:
        raise ValueError(f"unknown attention pattern {name!r}{_suggest(name, list(PATTERNS))}; "
                         f"choose one of {', '.join(PATTERNS)}")
    spec = PATTERNS[name]
    allowed = list(spec.params)
    for key in params:
        if key not in spec.params:
            raise ValueError(f"unknown parameter {key!r} for attention pattern {name!r}"
                             f"{_suggest(key, allowed)}; its parameters: {', '.join(allowed) or 'none'}")
    missing = [k for k, v in spec.params.items() if v is REQUIRED and k not in params]
    if missing:
        raise ValueError(f"attention pattern {name!r} needs parameter {missing[0]!r}, e.g. "
                         f"{{{missing[0]}: 64}}")
    full_params = {**spec.params, **params}
    for key, value in full_params.items():
        if key == "previous":
            if not isinstance(value, bool):
                raise ValueError(f"previous must be true or false, got {value!r}")
        elif value is not None:
            _check_int(key, value, 0 if key in ("global_blocks", "random_blocks", "seed") else 1)
    reach = spec.reach(full_params) if spec.reach else None
    if max_len is not None and reach is not None and reach > max_len:
        raise ValueError(f"attention pattern {name!r} with {params} reaches {reach} tokens, more "
                         f"than the sequence ({max_len}): it would be dense attention; make it "
                         f"at most {max_len} or use 'causal'")
    spec.build(full_params, False, reach or 1, None)  # the pattern's own checks, at minimal size
    return full_params


def pattern_mask(name: str, *, causal: bool, max_len: int | None = None,
                 device: torch.device | str | None = None, **params: Any) -> Mask:
    """The registered pattern `name` built from `params`, `& causal()` when `causal` (decoders).

    max_len: the longest sequence it will see (a model's context length): checked against the
    pattern's reach; BigBird needs it. device: where BigBird's block table lives.
    """
    full_params = check_pattern(name, params, max_len)
    pattern = PATTERNS[name].build(full_params, causal, max_len, device)
    if not causal or pattern.is_causal:
        return pattern
    if name == "full":
        return masks.causal()  # keeps SDPA's causal fast path
    if name == "sliding_window":
        return masks.sliding_window(full_params["window"])  # the same function, one comparison less
    return masks.causal() & pattern
