"""Which inputs a decision flowed from: attention rollout (Abnar & Zuidema 2020, "Quantifying
attention flow in transformers") and its gradient-weighted variant (Chefer et al. 2021, "Generic
attention-model explainability for interpreting bi-modal and encoder-decoder transformers").

    explain_classifier(model, ids, mask)          # BERT sequence classifier: relevance per token
    explain_classifier(vit, images)               # ViT: relevance per patch ([CLS] left out)
    explain_generation(gpt, ids, position=-1)     # a CausalLM: prompt tokens -> one generated token

Both read attention probabilities through `analysis.attention` on any backend. The gradient of
the explained score with respect to each layer's attention probabilities A is dL/dA = dL/dO · vᵀ
(O = A v per head): dL/dO is read at the input of the attention's output projection, v at its
`values` probe, so no backend needs to expose A to autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tformer.analysis.attention import attention_maps, attention_sites, capture_attention
from tformer.models.protocols import CausalLM, Classifier, ImageClassifier, can, capabilities

METHODS = ("gradient", "rollout")
Pick = Callable[[Any], tuple[Tensor, Tensor]]  # model output -> (target (B,), score (B,))


def _square(attention: Tensor | Sequence[Tensor]) -> tuple[int, int]:
    """(B, T) of per-layer maps (B, H_l, T, T); a pruned model's layers may differ in H_l."""
    if len(attention) == 0:
        raise ValueError("rollout needs at least one layer of attention")
    B, T, S = attention[0].shape[0], *attention[0].shape[-2:]
    if any(layer.shape[0] != B or layer.shape[-2:] != (T, S) for layer in attention):
        raise ValueError("rollout needs every layer's maps over the same batch, queries and keys")
    if T != S:
        raise ValueError(f"rollout needs square self-attention maps, got {T} queries x {S} keys")
    return B, T


def rollout(attention: Tensor | Sequence[Tensor]) -> Tensor:
    """Abnar & Zuidema's rollout. attention: (L, B, H, T, T) probabilities of layers 1..L, or a
    list of L (B, H_l, T, T) when the layers have different numbers of heads (pruned) -> (B, T, T)
    = Â_L ··· Â_1 with Â = rows renormalised(mean over the layer's heads of A + I): the identity
    stands for the residual connection. Rows sum to 1."""
    B, T = _square(attention)
    eye = torch.eye(T, dtype=attention[0].dtype, device=attention[0].device)
    relevance = eye.expand(B, T, T)
    for layer in attention:  # (B, H_l, T, T), first layer first
        mixed = layer.mean(dim=1) + eye  # (B, T, T)
        relevance = (mixed / mixed.sum(dim=-1, keepdim=True)) @ relevance
    return relevance


def gradient_rollout(attention: Tensor | Sequence[Tensor], gradients: Tensor | Sequence[Tensor]) -> Tensor:
    """Chefer et al.'s self-attention rule. attention, gradients: (L, B, H, T, T), A and dScore/dA
    of layers 1..L (or lists of L (B, H_l, T, T): pruned layers) -> (B, T, T): R = I; per layer
    R += mean_h(relu(dA ⊙ A)) @ R, the mean over that layer's own heads."""
    B, T = _square(attention)
    if len(gradients) != len(attention):
        raise ValueError(f"gradient rollout needs one gradient per layer: {len(attention)} layers of "
                         f"attention, {len(gradients)} of gradients")
    relevance = torch.eye(T, dtype=attention[0].dtype, device=attention[0].device).expand(B, T, T)
    for a, grad in zip(attention, gradients):
        weighted = (grad * a).clamp(min=0).mean(dim=1)  # (B, T, T): positive contributions only
        relevance = relevance + weighted @ relevance
    return relevance


@dataclass(frozen=True)
class Relevance:
    """scores: (B, N) relevance of each input token (text), patch (images, row-major, [CLS] left
    out) or context token (generation); target: (B,) the class or token explained; matrix: (B, T, T)
    the whole rollout, row t = what position t's state flowed from."""

    scores: Tensor
    target: Tensor
    matrix: Tensor
    method: str


def _self_attention_sites(model: Any) -> list[nn.Module]:
    sites = attention_sites(model)
    if list(sites) != ["self"]:
        raise ValueError(f"rollout follows one self-attention stack (a classifier or a decoder-only "
                         f"model); this model's attention kinds are {tuple(sites)}")
    return sites["self"]


def _gradient_hooks(sites: Sequence[nn.Module], zeros: list[Tensor], values: list[Tensor]) -> list[Any]:
    """Adds a zero leaf to each attention output O (the output projection's input), so that
    autograd.grad gives dScore/dO whether or not the parameters require gradients, and keeps v."""
    def add_zero(module: nn.Module, args: tuple) -> tuple:
        zero = torch.zeros_like(args[0], requires_grad=True)  # (B, T, H * D)
        zeros.append(zero)
        return (args[0] + zero, *args[1:])

    def keep_values(module: nn.Module, args: tuple, v: Tensor) -> None:
        values.append(v.detach())  # (B, H_kv, T, D)

    handles = []
    for attn in sites:
        handles.append(attn.out_proj.register_forward_pre_hook(add_zero))
        handles.append(attn.values.register_forward_hook(keep_values))
    return handles


def _attention_gradients(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any],
                         pick: Pick) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Runs fn once with gradients: per layer (B, H_l, T, T) probabilities, their gradients of the
    picked score, and the target (B,)."""
    sites = _self_attention_sites(fn)
    zeros: list[Tensor] = []
    values: list[Tensor] = []
    handles = _gradient_hooks(sites, zeros, values)
    try:
        with torch.enable_grad(), capture_attention(fn, kinds=["self"]) as maps:
            target, score = pick(fn(*args, **kwargs))
            grad_outputs = torch.autograd.grad(score.sum(), zeros)
    finally:
        for handle in handles:
            handle.remove()
    gradients = []
    for attn, grad_o, v in zip(sites, grad_outputs, values):
        B, T, _ = grad_o.shape
        grad_o = grad_o.view(B, T, attn.n_heads, -1).transpose(1, 2)  # (B, H, T, D)
        v = v.repeat_interleave(attn.n_heads // v.shape[1], dim=1)  # grouped-query: (B, H, S, D)
        gradients.append((grad_o @ v.transpose(-2, -1)).float())  # dScore/dA: (B, H, T, S)
    return maps.layers("self"), gradients, target.detach()


def _relevance_matrix(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], pick: Pick,
                      method: str) -> tuple[Tensor, Tensor]:
    """(B, T, T) rollout of `method` and the target (B,)."""
    if method not in METHODS:
        raise ValueError(f"unknown rollout method {method!r}; choose one of {METHODS}")
    if method == "rollout":
        _self_attention_sites(fn)
        maps = attention_maps(fn, *args, kinds=["self"], **kwargs)
        target, _ = pick(maps.output)
        return rollout(maps.layers("self")), target
    attention, gradients, target = _attention_gradients(fn, args, kwargs, pick)
    return gradient_rollout(attention, gradients), target


def class_target(target: int | str | None, labels: Sequence[str]) -> Pick:
    """Picks the logit of `target` (an index or a label name; None: the predicted class)."""
    if isinstance(target, str):
        if target not in labels:
            raise ValueError(f"unknown class {target!r}; the model's classes are {tuple(labels)}")
        target = list(labels).index(target)
    if target is not None and not 0 <= target < len(labels):
        raise ValueError(f"class {target} is out of range: the model has classes 0..{len(labels) - 1}")

    def pick(logits: Tensor) -> tuple[Tensor, Tensor]:  # logits: (B, C)
        chosen = logits.argmax(-1) if target is None else torch.full_like(logits[:, 0], target, dtype=torch.long)
        return chosen, logits.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)

    return pick


def _decision_row(model: nn.Module, matrix: Tensor, mask: Tensor | None) -> Tensor:
    """(B, T): the rollout row the classifier's head reads: [CLS] (position 0), or the mean of
    the real tokens' rows when the model pools by mean (`config.pooling == "mean"`)."""
    if getattr(getattr(model, "config", None), "pooling", "cls") != "mean":
        return matrix[:, 0]
    valid = torch.ones(matrix.shape[:2], device=matrix.device) if mask is None else mask.float()
    return (matrix * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True)


def explain_classifier(model: nn.Module, inputs: Tensor, mask: Tensor | None = None, *,
                       target: int | str | None = None, method: str = "gradient") -> Relevance:
    """Relevance of each input token (text: (B, T)) or patch (images: (B, n_patches)) to the
    logit of `target` (None: the predicted class) through `model.classify(inputs, mask)`.
    method: "gradient" (Chefer et al.) or "rollout" (Abnar & Zuidema). Call on a model in eval
    mode (as `open_run` gives it); any attention backend."""
    if not can(model, Classifier):
        raise ValueError(f"{type(model).__name__} is not a classifier (it can: "
                         f"{', '.join(capabilities(model)) or 'nothing listed'})")
    args = (inputs,) if mask is None else (inputs, mask)
    matrix, chosen = _relevance_matrix(model.classify, args, {}, class_target(target, model.labels), method)
    scores = _decision_row(model, matrix, mask)
    if can(model, ImageClassifier):  # patches are the last grid² tokens, after any [CLS]
        grid = getattr(model.config, "grid_size", None)
        scores = scores[:, -grid * grid:] if grid else scores
    return Relevance(scores, chosen, matrix, method)


def explain_generation(model: nn.Module, ids: Tensor, *, position: int = -1,
                       attention_mask: Tensor | None = None, method: str = "gradient") -> Relevance:
    """Relevance of the tokens before `position` (scores: (B, t) for t = position) to the token
    ids[:, t], i.e. to the logit the model gave it at position t - 1. ids: (B, T), a prompt and
    what was generated after it; attention_mask: (B, T), 0 for left padding."""
    if not can(model, CausalLM):
        raise ValueError(f"{type(model).__name__} is not a causal language model (it can: "
                         f"{', '.join(capabilities(model)) or 'nothing listed'})")
    T = ids.shape[-1]
    if not -T < position < T or position % T == 0:
        raise ValueError(f"position {position} is out of range: explain a token at 1..{T - 1} "
                         f"(or -{T - 1}..-1); the first token has no context")
    t = position % T

    def pick(logits: Tensor) -> tuple[Tensor, Tensor]:  # logits: (B, T, V)
        token = ids[:, t]
        return token, logits[:, t - 1].gather(-1, token.unsqueeze(-1)).squeeze(-1)

    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    matrix, token = _relevance_matrix(model, (ids,), kwargs, pick, method)
    return Relevance(matrix[:, t - 1, :t], token, matrix, method)


__all__ = ["METHODS", "Relevance", "class_target", "explain_classifier", "explain_generation",
           "gradient_rollout", "rollout"]
