"""Perturbations of the token embeddings of any `TextClassifier`, for adversarial training in
embedding space (PGD in L-inf, as FreeLB and Madry et al. 2018 use it on text: Zhu et al. 2020).

The token-embedding layer is found, not named: one probe forward pass of `classify(ids, mask)`
records module calls and takes the first that reads the ids tensor itself and returns float
(B, T, D) embeddings (BERT's `tok_emb`, before positions are added and normalised). A forward
hook then adds a perturbation delta (B, T, D) to that output. Only content tokens move: the frame
[CLS] ... [SEP] that `data.labelled.encode_texts` puts at the first and last real position, and
padding, keep delta = 0. Gradients are taken with `torch.autograd.grad` on delta only, so the
parameters' `.grad` is untouched and DDP's reducer sees one backward (the caller's).

The same site gives `attacks.text` its gradients (HotFlip, saliency) and the embedding table it
searches (rows in the layer's output space, any scaling included).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.models.protocols import TextClassifier, can


def check_text_classifier(model: object) -> None:
    if not can(model, TextClassifier):
        raise ValueError(f"{type(model).__name__} is not a text classifier (it needs labels, max_tokens and "
                         "classify(ids, mask)): attack a classification run (a BERT with a sequence head)")


def find_token_embedding(model: nn.Module, ids: Tensor, mask: Tensor | None = None) -> nn.Module:
    """The module whose call on `ids` turns them into (B, T, D) embeddings (see the docstring);
    it must be an `nn.Embedding` (its table is what word attacks search)."""
    check_text_classifier(model)
    found: list[nn.Module] = []

    def after(module: nn.Module, args: tuple, output: object) -> None:
        if (not found and args and args[0] is ids and isinstance(output, Tensor) and output.dim() == 3
                and tuple(output.shape[:2]) == tuple(ids.shape) and output.is_floating_point()):
            found.append(module)

    handles = [m.register_forward_hook(after) for m in model.modules()]
    was_training = model.training
    model.eval()  # no dropout: the probe draws nothing from the random state, so a resume stays exact
    try:
        with torch.no_grad():
            model.classify(ids, mask)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if not found or not isinstance(found[0], nn.Embedding):
        raise ValueError("no nn.Embedding of the model turns its token ids into (batch, tokens, width) "
                         "embeddings; embedding attacks need a token-embedding table")
    return found[0]


def embedding_table(layer: nn.Module) -> Tensor:
    """Every token's embedding (V, D) as the layer outputs it (scaling included), detached."""
    with torch.no_grad():
        return layer(torch.arange(layer.num_embeddings, device=layer.weight.device)).detach().float()


@contextmanager
def added(layer: nn.Module, delta: Tensor) -> Iterator[None]:
    """Within the block, every call of `layer` returns its output + delta (B, T, D)."""

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if output.shape != delta.shape:
            raise ValueError(f"the embedding output {tuple(output.shape)} does not match the perturbation "
                             f"{tuple(delta.shape)}")
        return output + delta.to(output.dtype)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def content_positions(mask: Tensor) -> Tensor:
    """(B, T) bool: real tokens except the first ([CLS]) and last ([SEP]) real position of each row."""
    valid = mask.bool()
    first = torch.zeros_like(valid)
    first[:, 0] = True
    last_index = valid.long().cumsum(1).argmax(1)  # the last position where the count grows
    last = F.one_hot(last_index, valid.shape[1]).bool()
    return valid & ~first & ~last


def check_ball(epsilon: float, steps: int, step_size: float) -> None:
    for name, value in (("epsilon", epsilon), ("step_size", step_size)):
        if not (isinstance(value, (int, float)) and value == value and 0 < value < float("inf")):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def classify_loss(model: nn.Module, ids: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of the model's class logits."""
    return F.cross_entropy(model.classify(ids, mask).float(), labels)


def pgd_embeddings(model: nn.Module, ids: Tensor, mask: Tensor, labels: Tensor, epsilon: float, *,
                   steps: int = 3, step_size: float | None = None, random_start: bool = True,
                   generator: torch.Generator | None = None, layer: nn.Module | None = None) -> Tensor:
    """A perturbation delta (B, T, D) of the token embeddings with |delta| <= epsilon per
    dimension, zero outside content tokens, that raises the cross-entropy: `steps` ascent steps
    delta <- clip(delta + step_size * sign(grad)) from a uniform random start (or zero). Runs in
    the model's current mode; returns delta detached."""
    check_text_classifier(model)
    check_ball(epsilon, steps, 1.0 if step_size is None else step_size)
    step_size = 2.5 * epsilon / steps if step_size is None else step_size
    layer = layer or find_token_embedding(model, ids, mask)
    keep = content_positions(mask).unsqueeze(-1)  # (B, T, 1)
    shape = (*ids.shape, layer.embedding_dim)
    delta = torch.zeros(shape, device=ids.device)
    if random_start:
        noise = torch.rand(shape, generator=generator, device=generator.device if generator else "cpu")
        delta = (noise.to(ids.device) * 2 - 1) * epsilon
    delta = delta * keep
    for _ in range(steps):
        delta.requires_grad_(True)
        with added(layer, delta):
            loss = classify_loss(model, ids, mask, labels)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = ((delta.detach() + step_size * grad.sign()).clamp(-epsilon, epsilon) * keep).detach()
    return delta


def adversarial_loss(model: nn.Module, ids: Tensor, mask: Tensor, labels: Tensor, delta: Tensor,
                     layer: nn.Module | None = None) -> Tensor:
    """Cross-entropy with `delta` added to the token embeddings (gradients reach the parameters)."""
    layer = layer or find_token_embedding(model, ids, mask)
    with added(layer, delta):
        return classify_loss(model, ids, mask, labels)


__all__ = ["added", "adversarial_loss", "check_text_classifier", "classify_loss", "content_positions",
           "embedding_table", "find_token_embedding", "pgd_embeddings"]
