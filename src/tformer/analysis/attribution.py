"""Integrated gradients (Sundararajan et al. 2017) on the embedding layer of any tformer model:
which tokens, patches or pixel tokens a class logit or a next-token log-probability comes from.

    explained = text_class(model, ids, label="positive")      # or next_token, image_class,
    result = integrated_gradients(explained, token_baseline(ids, pad_id, keep=(cls_id, sep_id)))
    result.per_position, result.gap                           # conditional_token (seq2seq, image_gen)

The attribution of embedding dimension (i, j) is (e - e')_ij * integral_0^1 dF/de_ij at
e' + a (e - e') da, e the embedding layer's output for the input and e' for the baseline; the
integral is a quadrature over `n_steps` points (captum's methods and names, so the numbers equal
its `LayerIntegratedGradients`). The path is evaluated `steps_per_chunk` points at a time, so
peak memory follows the chunk, not `n_steps`; by default the chunk is sized to `memory_budget`
from the bytes autograd saves for one point (measured, not guessed).

Which module is "the embedding layer" is found, not named: one probe forward pass records module
calls in order and takes the first call that reads the explained input itself (the tensor object
the explained function was given), or, for models that transform their input first (ViT's
`classify` normalises pixels), the first call reading a tensor of the input's shape and dtype.
Its output must be (batch, positions, width). Only that call is replaced along the path, so an
embedding table shared by encoder and decoder (seq2seq) is attributed on the side asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.models.protocols import (
    CausalLM,
    ConditionalDecoder,
    ImageClassifier,
    MemoryLM,
    TextClassifier,
    can,
)
from tformer.nn.modes import evaluating

METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
Score = Callable[[Tensor], Tensor]  # inputs repeated k times, (k * B, ...) -> F (k * B,)


@dataclass(frozen=True)
class Explained:
    """One scalar function of one model, F(inputs) per example, ready to be attributed.

    `score` takes the inputs repeated k times along the batch (row r is example r % B) and
    repeats whatever else the model needs (masks, a condition, a prefix) to match."""

    model: nn.Module
    inputs: Tensor  # (B, T) token ids or (B, C, H, W) images: what the embedding layer reads
    score: Score
    target: tuple[int, ...]  # per example: the class or token whose score F is
    what: str  # e.g. "log p(token 17) at position 5", for messages and figures


@dataclass(frozen=True)
class Attribution:
    """Integrated gradients of one `Explained` (B examples, N embedded positions, D dims)."""

    per_position: Tensor  # (B, N) attributions summed over embedding dims
    per_dim: Tensor  # (B, N, D) the raw attributions
    target: tuple[int, ...]
    what: str
    score: Tensor  # (B,) F(input)
    baseline_score: Tensor  # (B,) F(baseline)
    gap: Tensor  # (B,) completeness gap: sum of attributions - (F(input) - F(baseline))
    n_steps: int
    method: str


@dataclass(frozen=True)
class Site:
    """Where the embedding layer sits: a module and which of its calls in one forward pass."""

    module: nn.Module
    call: int
    output: Tensor  # (B, N, D) its output for the probed inputs


# -- what to explain, by capability ------------------------------------------------------------------

def _label_index(labels: tuple[str, ...], label: int | str) -> int:
    """A class given by index or name -> its index; anything else is one ValueError line."""
    if isinstance(label, str) and label in labels:
        return labels.index(label)
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(labels):
        return label
    raise ValueError(f"class {label!r} is not one of the model's {len(labels)} classes "
                     f"({', '.join(labels)}); give an index in [0, {len(labels)}) or a name")


def _targets(target: int | str | None, predicted: Tensor, labels: tuple[str, ...] | None,
             vocab: int | None = None) -> Tensor:
    """Per-example target indices (B,): the given class/token, or the predicted one (None)."""
    if target is None:
        return predicted
    if labels is not None:
        return torch.full_like(predicted, _label_index(labels, target))
    if not (isinstance(target, int) and not isinstance(target, bool) and 0 <= target < (vocab or 0)):
        raise ValueError(f"token {target!r} is outside the model's vocabulary [0, {vocab})")
    return torch.full_like(predicted, target)


def _check_length(ids: Tensor, limit: int, what: str) -> None:
    if ids.dim() != 2 or not 0 < ids.shape[1] <= limit:
        raise ValueError(f"{what} must be (batch, 1..{limit}) token ids, got shape {tuple(ids.shape)}; "
                         f"the model takes at most {limit} positions, truncate the input")


def _repeat(t: Tensor | None, rows: int) -> Tensor | None:
    """(B, ...) -> (rows, ...), row r is t[r % B]."""
    return None if t is None else t.repeat(rows // t.shape[0], *([1] * (t.dim() - 1)))


def _pick(values: Tensor, index: Tensor) -> Tensor:
    """values (R, C), index (B,) -> values[r, index[r % B]] (R,)."""
    return values.gather(1, _repeat(index, values.shape[0]).unsqueeze(1)).squeeze(1)


def _check_possible(log_probs: Tensor, index: Tensor) -> None:
    """A token the model can never produce here (log p = -inf, e.g. an image generator's start
    token) has no finite score to attribute."""
    picked = _pick(log_probs, index)
    if not torch.isfinite(picked).all():
        token = int(index[int((~torch.isfinite(picked)).nonzero()[0])])
        raise ValueError(f"token {token} can never come next here (the model gives it probability 0); "
                         "explain a token the model can produce")


def _lm_logits(model: nn.Module, ids: Tensor) -> Tensor:
    """A CausalLM's or MemoryLM's next-token logits (B, T, V) on fresh state."""
    out = model(ids)
    return out[0] if isinstance(out, tuple) else out


def next_token(model: nn.Module, ids: Tensor, token: int | None = None, position: int = -1) -> Explained:
    """A language model's log-probability of `token` (default: its top token) after the prefix
    ending at `position`: which prompt tokens it comes from."""
    if not (can(model, CausalLM) or can(model, MemoryLM)):
        raise ValueError("next_token needs a language model (CausalLM or MemoryLM capability)")
    limit = getattr(model.config, "context_length", None) or ids.shape[-1]
    _check_length(ids, limit, "the prompt")
    if not -ids.shape[1] <= position < ids.shape[1]:
        raise ValueError(f"position {position} is outside the prompt of {ids.shape[1]} tokens")
    with torch.no_grad():
        log_probs = F.log_softmax(_lm_logits(model, ids)[:, position].float(), -1)  # (B, V)
    index = _targets(token, log_probs.argmax(-1), None, model.config.vocab_size)
    _check_possible(log_probs, index)

    def score(x: Tensor) -> Tensor:
        return _pick(F.log_softmax(_lm_logits(model, x)[:, position].float(), -1), index)

    return Explained(model, ids, score, tuple(index.tolist()), f"log p(next token) at position {position}")


def text_class(model: nn.Module, ids: Tensor, mask: Tensor | None = None,
               label: int | str | None = None) -> Explained:
    """A text classifier's logit of `label` (default: the predicted class) for [CLS] ... [SEP]
    ids (B, T), through the model's own `classify`."""
    if not can(model, TextClassifier):
        raise ValueError("text_class needs a text classifier (TextClassifier capability)")
    _check_length(ids, model.max_tokens, "the text")
    with torch.no_grad():
        predicted = model.classify(ids, mask).argmax(-1)
    index = _targets(label, predicted, model.labels)
    score = lambda x: _pick(model.classify(x, _repeat(mask, x.shape[0])), index)
    return Explained(model, ids, score, tuple(index.tolist()), "class logit")


def image_class(model: nn.Module, images: Tensor, label: int | str | None = None) -> Explained:
    """An image classifier's logit of `label` (default: the predicted class) for images
    (B, C, H, W) in [0, 1]; the model normalises them itself in `classify`."""
    if not can(model, ImageClassifier):
        raise ValueError("image_class needs an image classifier (ImageClassifier capability)")
    h, w, c = model.image_shape
    if images.dim() != 4 or tuple(images.shape[1:]) != (c, h, w) or not images.is_floating_point():
        raise ValueError(f"images must be float (batch, {c}, {h}, {w}) in [0, 1], got "
                         f"{images.dtype} {tuple(images.shape)}")
    with torch.no_grad():
        predicted = model.classify(images).argmax(-1)
    index = _targets(label, predicted, model.labels)
    score = lambda x: _pick(model.classify(x), index)
    return Explained(model, images, score, tuple(index.tolist()), "class logit")


def conditional_token(model: nn.Module, condition: Tensor, prefix: Tensor, token: int | None = None,
                      position: int = -1, side: str = "condition") -> Explained:
    """A conditional decoder's log-probability of `token` (default: its top token) after
    `prefix` (decoder input ids (B, T), starting with <bos>), given `condition` (B, L) (a source
    sentence, an image's class or prompt). side="condition" attributes the condition tokens,
    side="output" the decoder inputs (pixel tokens of an image generator)."""
    if not can(model, ConditionalDecoder):
        raise ValueError("conditional_token needs an encoder-decoder (ConditionalDecoder capability)")
    if side not in ("condition", "output"):
        raise ValueError(f"side must be 'condition' or 'output', got {side!r}")
    if condition.dim() != 2 or prefix.dim() != 2 or condition.shape[0] != prefix.shape[0]:
        raise ValueError(f"condition (B, L) and prefix (B, T) ids need one row each per example, got "
                         f"{tuple(condition.shape)} and {tuple(prefix.shape)}")
    if not -prefix.shape[1] <= position < prefix.shape[1]:
        raise ValueError(f"position {position} is outside the prefix of {prefix.shape[1]} tokens")

    def logits(cond: Tensor, pre: Tensor) -> Tensor:  # (R, T, V) at `position` -> (R, V)
        return model.bind(cond)(pre)[:, position].float()

    with torch.no_grad():
        log_probs = F.log_softmax(logits(condition, prefix), -1)  # (B, V)
    index = _targets(token, log_probs.argmax(-1), None, log_probs.shape[-1])
    _check_possible(log_probs, index)
    if side == "condition":
        score = lambda x: _pick(F.log_softmax(logits(x, _repeat(prefix, x.shape[0])), -1), index)
    else:
        score = lambda x: _pick(F.log_softmax(logits(_repeat(condition, x.shape[0]), x), -1), index)
    inputs = condition if side == "condition" else prefix
    return Explained(model, inputs, score, tuple(index.tolist()), f"log p(token) at position {position}")


def each_output_token(model: nn.Module, condition: Tensor, decoder_input: Tensor, tokens: Tensor) -> Explained:
    """Every output token of one conditional decoding at once: example t is log p(tokens[t] |
    condition, decoder_input[:t + 1]), attributed to the condition (e.g. a translation's source).
    condition: (1, L); decoder_input: (1, T), <bos> then tokens[:-1]; tokens: (T,). The same
    numbers as T `conditional_token` calls, in one batch of T rows (teacher forcing: the causal
    mask keeps position t from reading later inputs)."""
    if not can(model, ConditionalDecoder):
        raise ValueError("each_output_token needs an encoder-decoder (ConditionalDecoder capability)")
    T = decoder_input.shape[-1]
    if condition.dim() != 2 or condition.shape[0] != 1 or decoder_input.shape != (1, T) or tokens.shape != (T,):
        raise ValueError(f"give one condition (1, L), its decoder input (1, T) and the T tokens it predicts; "
                         f"got {tuple(condition.shape)}, {tuple(decoder_input.shape)}, {tuple(tokens.shape)}")

    def log_probs(x: Tensor) -> Tensor:  # (R, L) conditions, row r explains token r % T -> (R, V)
        rows = torch.arange(x.shape[0], device=x.device)
        logits = model.bind(x)(decoder_input.expand(x.shape[0], -1))  # (R, T, V)
        return F.log_softmax(logits[rows, rows % T].float(), -1)

    with torch.no_grad():
        _check_possible(log_probs(condition.expand(T, -1)), tokens)
    score = lambda x: _pick(log_probs(x), tokens)
    return Explained(model, condition.expand(T, -1).contiguous(), score, tuple(tokens.tolist()),
                     "log p(each output token)")


# -- baselines ------------------------------------------------------------------------------------------

def token_baseline(ids: Tensor, token_id: int, keep: tuple[int, ...] = ()) -> Tensor:
    """Every token replaced by `token_id` ([PAD] or [MASK]) except the ids in `keep` (e.g. [CLS],
    [SEP]), so the baseline is a sentence with the same frame and no content."""
    keep_mask = torch.isin(ids, torch.tensor(keep, dtype=ids.dtype, device=ids.device))
    return torch.where(keep_mask, ids, torch.full_like(ids, token_id))


def blurred(images: Tensor, sigma: float = 2.0) -> Tensor:
    """Gaussian blur of images (B, C, H, W), kernel radius 3 sigma, reflected borders: an image
    with the colours of the input and none of its edges (a baseline for image classifiers)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    radius = min(int(3 * sigma + 0.5), min(images.shape[-2:]) - 1)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).to(images.dtype)  # (K,)
    C = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)  # along width
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)  # along height


# -- the embedding layer ---------------------------------------------------------------------------------

def find_embedding(explained: Explained, inputs: Tensor | None = None) -> Site:
    """Probe one forward pass (see the module docstring): among the module calls that read the
    input itself (else a tensor of its shape and dtype), the first to return (B, N, D) floats:
    the innermost, so a patch embedding rather than its convolution, and never the whole model.
    `inputs`: probe these instead (a baseline), at the same site."""
    x = explained.inputs if inputs is None else inputs
    started: dict[nn.Module, int] = {}
    finished: dict[nn.Module, int] = {}
    reading: dict[tuple[nn.Module, int], str] = {}  # (module, call) -> "exact" | "alike"
    found: dict[str, Site] = {}

    def before(module: nn.Module, args: tuple) -> None:
        started[module] = started.get(module, 0) + 1
        first = args[0] if args else None
        if first is x:
            reading[(module, started[module] - 1)] = "exact"
        elif isinstance(first, Tensor) and first.shape == x.shape and first.dtype == x.dtype:
            reading[(module, started[module] - 1)] = "alike"

    def after(module: nn.Module, args: tuple, output: object) -> None:
        finished[module] = finished.get(module, 0) + 1  # calls of one module never nest
        kind = reading.get((module, finished[module] - 1))
        if kind and kind not in found and _is_embedding(output, x.shape[0]):
            found[kind] = Site(module, finished[module] - 1, output.detach())

    modules = list(explained.model.modules())
    handles = [m.register_forward_pre_hook(before) for m in modules]
    handles += [m.register_forward_hook(after) for m in modules]
    try:
        with torch.no_grad():
            explained.score(x)
    finally:
        for handle in handles:
            handle.remove()
    if not found:
        raise ValueError(f"no module of the model turns the explained input {tuple(x.shape)} into "
                         "embeddings (batch, positions, width); integrated gradients needs one")
    return found.get("exact") or found["alike"]


def _is_embedding(output: object, batch: int) -> bool:
    return (isinstance(output, Tensor) and output.dim() == 3 and output.shape[0] == batch
            and output.is_floating_point())


@contextmanager
def replaced(site: Site, value: Tensor) -> Iterator[None]:
    """Within the block, the site's call returns `value` (R, N, D) instead of its own output."""
    count = [0]

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        count[0] += 1
        if count[0] - 1 != site.call:
            return None
        if output.shape[1:] != value.shape[1:] or output.shape[0] != value.shape[0]:
            raise ValueError(f"the embedding output {tuple(output.shape)} does not match the path "
                             f"{tuple(value.shape)}")
        return value.to(output.dtype)

    handle = site.module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# -- integrated gradients -----------------------------------------------------------------------------------

def quadrature(n_steps: int, method: str) -> tuple[list[float], list[float]]:
    """Points in [0, 1] and weights of the path integral, as captum's approximation_methods."""
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n_steps)  # on [-1, 1]
        return (0.5 * (1 + nodes)).tolist(), (0.5 * weights).tolist()
    if method == "riemann_trapezoid" and n_steps < 2:
        raise ValueError("the trapezoid rule needs n_steps >= 2")
    n = n_steps
    weights = [1 / n] * n
    if method == "riemann_trapezoid":
        weights[0] /= 2
        weights[-1] /= 2
        return torch.linspace(0, 1, n).tolist(), weights
    start, end = {"riemann_left": (0, 1 - 1 / n), "riemann_right": (1 / n, 1),
                  "riemann_middle": (1 / (2 * n), 1 - 1 / (2 * n))}[method]
    return torch.linspace(start, end, n).tolist(), weights


def baseline_embedding(explained: Explained, site: Site, baseline: Tensor | str) -> Tensor:
    """The embedding output e' (B, N, D) of a baseline input of the input's shape (token_baseline,
    blurred images), or zeros ("zeros")."""
    if isinstance(baseline, str):
        if baseline != "zeros":
            raise ValueError(f"a baseline is 'zeros' or a tensor shaped like the input, got {baseline!r}")
        return torch.zeros_like(site.output)
    x = explained.inputs
    if not isinstance(baseline, Tensor) or baseline.shape != x.shape or baseline.dtype != x.dtype:
        got = (baseline.dtype, tuple(baseline.shape)) if isinstance(baseline, Tensor) else type(baseline)
        raise ValueError(f"the baseline must be shaped like the input ({x.dtype}, {tuple(x.shape)}), "
                         f"got {got}")
    at_baseline = find_embedding(explained, baseline)
    if (at_baseline.module, at_baseline.call) != (site.module, site.call):
        raise ValueError("the baseline reaches a different embedding call than the input")
    return at_baseline.output


def path_bytes(explained: Explained, site: Site, embedded: Tensor) -> int:
    """Bytes one point of the path (B rows) adds to a chunk's peak: what autograd saves, plus
    twice the largest module output, which lives beside them whether saved or not (a language
    model's (T, V) logits, and in backward their gradient of the same size, even when the score
    reads one position). Parameters are not counted (they are shared by every row)."""
    params = {p.untyped_storage().data_ptr() for p in explained.model.parameters()}
    seen: dict[int, int] = {}
    largest = [0]

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    def output_size(module: nn.Module, args: tuple, output: object) -> None:
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        largest[0] = max([largest[0], *(t.nbytes for t in outputs if isinstance(t, Tensor))])

    point = embedded.clone().requires_grad_(True)
    handles = [m.register_forward_hook(output_size) for m in explained.model.modules()]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), replaced(site, point):
            explained.score(explained.inputs).sum()
    finally:
        for handle in handles:
            handle.remove()
    return max(sum(seen.values()) + 2 * largest[0], 1)


def _endpoint_scores(explained: Explained, site: Site, x_emb: Tensor, b_emb: Tensor) -> tuple[Tensor, Tensor]:
    """F(input) and F(baseline) (B,) with the embedding output set to e and e'."""
    inputs = _repeat(explained.inputs, 2 * x_emb.shape[0])
    with torch.no_grad(), replaced(site, torch.cat([x_emb, b_emb])):
        both = explained.score(inputs).float()
    return both[: x_emb.shape[0]], both[x_emb.shape[0]:]


def _path_gradients(explained: Explained, site: Site, x_emb: Tensor, b_emb: Tensor,
                    alphas: list[float], weights: list[float], steps_per_chunk: int) -> Tensor:
    """sum_k w_k dF/de at e' + a_k (e - e'), (B, N, D), evaluated `steps_per_chunk` points at a
    time and summed in step order, so the result does not depend on the chunking."""
    B = x_emb.shape[0]
    total = torch.zeros_like(x_emb, dtype=torch.float32)
    delta = x_emb - b_emb
    for start in range(0, len(alphas), steps_per_chunk):
        chunk = alphas[start:start + steps_per_chunk]
        path = torch.cat([b_emb + a * delta for a in chunk]).requires_grad_(True)  # (k B, N, D)
        with replaced(site, path):
            scores = explained.score(_repeat(explained.inputs, len(chunk) * B))  # (k B,)
        (grads,) = torch.autograd.grad(scores.sum(), path)
        for i, w in enumerate(weights[start:start + len(chunk)]):
            total += w * grads[i * B:(i + 1) * B].float()
    return total


def integrated_gradients(explained: Explained, baseline: Tensor | str = "zeros", *, n_steps: int = 64,
                         method: str = "gausslegendre", steps_per_chunk: int | None = None,
                         memory_budget: int = 256 * 2 ** 20) -> Attribution:
    """Integrated gradients of `explained` w.r.t. its embedding layer's output, from `baseline`
    (a tensor shaped like the input: token_baseline, blurred; or "zeros": a zero embedding).

    steps_per_chunk: path points per forward/backward pass (None: as many as `memory_budget`
    bytes of per-point memory hold (`path_bytes`), at least one; the fixed cost of the model and
    the input's own forward comes on top). The model runs in eval mode, its mode restored after."""
    alphas, weights = quadrature(n_steps, method)
    if steps_per_chunk is not None and (not isinstance(steps_per_chunk, int) or steps_per_chunk < 1):
        raise ValueError(f"steps_per_chunk must be an integer >= 1, got {steps_per_chunk!r}")
    with evaluating(explained.model):
        site = find_embedding(explained)
        x_emb = site.output  # (B, N, D)
        b_emb = baseline_embedding(explained, site, baseline)  # (B, N, D)
        if steps_per_chunk is None:
            steps_per_chunk = max(1, memory_budget // path_bytes(explained, site, x_emb))
        grads = _path_gradients(explained, site, x_emb, b_emb, alphas, weights, min(steps_per_chunk, n_steps))
        per_dim = grads * (x_emb - b_emb).float()  # (B, N, D)
        score, baseline_score = _endpoint_scores(explained, site, x_emb, b_emb)
    gap = per_dim.sum(dim=(1, 2)) - (score - baseline_score)
    return Attribution(per_dim.sum(-1), per_dim, explained.target, explained.what, score, baseline_score,
                       gap, n_steps, method)


__all__ = ["METHODS", "Attribution", "Explained", "Site", "baseline_embedding", "blurred",
           "conditional_token", "each_output_token", "find_embedding", "image_class", "integrated_gradients", "next_token",
           "path_bytes", "quadrature", "text_class", "token_baseline"]
