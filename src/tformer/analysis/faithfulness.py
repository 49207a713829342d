"""Deletion and insertion curves: is a ranking of input positions faithful to the classifier it
claims to explain? (Petsiuk et al. 2018, "RISE"; AOPC from Samek et al. 2017, "Evaluating the
visualization of what a deep neural network has learned".)

    curves = perturbation_curves(bert, ids, relevance, baseline=mask_id, mask=mask)  # text: (B, T)
    curves = perturbation_curves(vit, images, relevance, baseline=blurred(images))    # (B, patches)
    curves.deletion_auc, curves.insertion_auc, curves.aopc                             # (B,) each

Deletion replaces the k highest-ranked positions by the baseline's and records the probability
of the target class (default: the class predicted on the untouched input), for k = round(f n),
f = 0, 1/steps, ..., 1 of the n perturbable positions: a faithful ranking makes it fall fast (a
small area). Insertion starts from the all-baseline input and shows the top k: a faithful
ranking makes it rise fast (a large area). Areas are over f in [0, 1] (trapezoids); AOPC is the
mean drop of the deletion curve from the unperturbed probability over the steps + 1 levels.

Positions, asked of the model by capability, never by family:
- TextClassifier: the token positions of ids (B, T). Only content tokens are perturbed: the first
  and last real token of each row ([CLS] and [SEP], the protocol's frame) and padding (mask 0)
  always stay the input's, and their ranking entries are ignored.
- ImageClassifier: the patches of the model's grid (`config.grid_size`, else the square grid the
  ranking's length implies), row-major: the order of `explain_classifier(...).scores` and of
  integrated gradients' `per_position` on a ViT (its patch embedding holds no [CLS]). A perturbed
  patch takes the baseline image's pixels (blurred, the dataset mean, zeros).

Ties in a ranking go to the earlier position, so every curve is deterministic. Each (example,
level) input is built once (levels repeat when steps > n) and `rows_per_forward` of them share a
forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tformer.models.protocols import ImageClassifier, TextClassifier, can, capabilities
from tformer.nn.modes import evaluating

Mix = Callable[[Tensor, Tensor], Tensor]  # rows (R,), shown (R, N) bool -> model inputs (R, ...)
Classify = Callable[[Tensor, Tensor], Tensor]  # rows (R,), model inputs (R, ...) -> logits (R, C)


@dataclass(frozen=True)
class Positions:
    """What can be perturbed in one batch and how: `mix` shows the input where `shown` is True
    and the baseline elsewhere, for example `rows[r]` of the batch."""

    valid: Tensor  # (B, N) bool: perturbable positions
    mix: Mix
    classify: Classify


def auc(curve: Tensor, fractions: Tensor) -> Tensor:
    """Area under curves (B, L) over fractions (L,) running 0..1: trapezoids, (B,)."""
    return torch.trapezoid(curve, fractions, dim=-1)


def aopc(deletion: Tensor) -> Tensor:
    """Area over the perturbation curve (Samek et al. 2017): the mean over levels 0..L-1 of the
    drop from the unperturbed probability, deletion (B, L) -> (B,); larger is more faithful."""
    return (deletion[:, :1] - deletion).mean(dim=-1)


@dataclass(frozen=True)
class Curves:
    """Deletion and insertion curves of one ranking over B examples at steps + 1 levels."""

    fractions: Tensor  # (L,) f = i / steps: share of the n perturbable positions deleted / shown
    deletion: Tensor  # (B, L) p(target) with the top round(f n) positions replaced by the baseline
    insertion: Tensor  # (B, L) p(target) with only the top round(f n) positions shown
    target: Tensor  # (B,) the class whose probability is recorded
    n_positions: Tensor  # (B,) perturbable positions n per example

    @property
    def deletion_auc(self) -> Tensor:
        """(B,): lower is more faithful."""
        return auc(self.deletion, self.fractions)

    @property
    def insertion_auc(self) -> Tensor:
        """(B,): higher is more faithful."""
        return auc(self.insertion, self.fractions)

    @property
    def aopc(self) -> Tensor:
        """(B,): higher is more faithful."""
        return aopc(self.deletion)


def random_ranking(shape: tuple[int, int], seed: int = 0) -> Tensor:
    """A uniformly random ranking (B, N) from its own seeded generator: the chance baseline every
    explanation must beat. The same seed gives the same ranking on every machine."""
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be (examples, positions) with both >= 1, got {tuple(shape)}")
    return torch.rand(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- what can be perturbed, by capability ---------------------------------------------------------------

def _frame(real: Tensor) -> Tensor:
    """(B, T) bool of real tokens -> (B, T) bool: the first and the last real token of each row."""
    T = real.shape[1]
    index = torch.arange(T, device=real.device).expand_as(real)
    first = torch.where(real, index, T).min(dim=1).values
    last = torch.where(real, index, -1).max(dim=1).values
    return (index == first.unsqueeze(1)) | (index == last.unsqueeze(1))


def _full_baseline(baseline: Tensor | float, inputs: Tensor, what: str) -> Tensor:
    """A scalar, or a tensor shaped like the inputs (batch B or 1) -> (B, ...) like the inputs."""
    if not isinstance(baseline, Tensor):
        return torch.full_like(inputs, baseline)
    if baseline.dim() != inputs.dim() or baseline.shape[0] not in (1, inputs.shape[0]) \
            or baseline.shape[1:] != inputs.shape[1:]:
        rest = ", ".join(str(s) for s in inputs.shape[1:])
        raise ValueError(f"baseline must be {what} shaped like the input ({inputs.shape[0]} or 1, {rest}), "
                         f"got {tuple(baseline.shape)}")
    return baseline.to(inputs.dtype).expand_as(inputs)


def text_positions(model: nn.Module, ids: Tensor, mask: Tensor | None, baseline: Tensor | int) -> Positions:
    """Token positions of [CLS] ... [SEP] ids (B, T); baseline: a token id ([MASK], [PAD]) or
    ids shaped like `ids`, of which only the content tokens are used."""
    if ids.dim() != 2 or ids.is_floating_point():
        raise ValueError(f"ids must be integer token ids (batch, tokens), got {ids.dtype} {tuple(ids.shape)}")
    if mask is not None and mask.shape != ids.shape:
        raise ValueError(f"mask must be shaped like ids {tuple(ids.shape)}, got {tuple(mask.shape)}")
    if isinstance(baseline, float) or (isinstance(baseline, Tensor) and baseline.is_floating_point()):
        raise ValueError("a text baseline is a token id ([MASK] or [PAD]) or integer ids shaped like the input")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    base = _full_baseline(baseline, ids, "token ids")

    def mix(rows: Tensor, shown: Tensor) -> Tensor:
        return torch.where(shown, ids[rows], base[rows])

    def classify(rows: Tensor, x: Tensor) -> Tensor:
        return model.classify(x, None if mask is None else mask[rows])

    return Positions(real & ~_frame(real), mix, classify)


def patch_grid(model: nn.Module, n_positions: int) -> tuple[int, int]:
    """(patches per column, patches per row) of an image classifier: its config's `grid_size`,
    else the square grid of `n_positions` patches that tiles its images."""
    height, width, _ = model.image_shape
    grid = getattr(getattr(model, "config", None), "grid_size", None)
    if grid is None:
        grid = math.isqrt(n_positions)
        if grid * grid != n_positions or height % grid or width % grid:
            raise ValueError(f"ranking has {n_positions} positions per image: give one score per patch of a "
                             f"square grid that tiles the {height}x{width} images")
    if n_positions != grid * grid:
        raise ValueError(f"ranking must hold one score per patch, (batch, {grid * grid}) row-major over the "
                         f"{grid}x{grid} grid ([CLS] left out), got {n_positions} positions per image")
    return grid, grid


def image_positions(model: nn.Module, images: Tensor, n_positions: int, baseline: Tensor | float) -> Positions:
    """Patches of images (B, C, H, W) in [0, 1]; baseline: an image (B or 1, C, H, W) or a
    pixel value whose pixels replace a perturbed patch's."""
    height, width, channels = model.image_shape
    if images.dim() != 4 or tuple(images.shape[1:]) != (channels, height, width) or not images.is_floating_point():
        raise ValueError(f"images must be float (batch, {channels}, {height}, {width}) in [0, 1], got "
                         f"{images.dtype} {tuple(images.shape)}")
    rows_, cols = patch_grid(model, n_positions)
    base = _full_baseline(baseline, images, "an image")
    valid = torch.ones(images.shape[0], n_positions, dtype=torch.bool, device=images.device)

    def mix(rows: Tensor, shown: Tensor) -> Tensor:  # shown (R, N) -> pixels (R, 1, H, W)
        pixels = shown.view(-1, 1, rows_, cols).repeat_interleave(height // rows_, 2)
        return torch.where(pixels.repeat_interleave(width // cols, 3), images[rows], base[rows])

    return Positions(valid, mix, lambda rows, x: model.classify(x))


def positions_of(model: nn.Module, inputs: Tensor, mask: Tensor | None, n_positions: int,
                 baseline: Tensor | float) -> Positions:
    if can(model, TextClassifier):
        return text_positions(model, inputs, mask, baseline)
    if can(model, ImageClassifier):
        return image_positions(model, inputs, n_positions, baseline)
    raise ValueError(f"perturbation curves need a text or image classifier; {type(model).__name__} can: "
                     f"{', '.join(capabilities(model)) or 'nothing listed'}")


# -- the curves ------------------------------------------------------------------------------------------

def _ranks(ranking: Tensor, valid: Tensor) -> Tensor:
    """(B, N) scores -> (B, N) long: 0 for the highest-scored valid position, n-1 for the lowest,
    invalid positions after them; ties go to the earlier position."""
    scores = ranking.double().masked_fill(~valid, -math.inf)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    steps = torch.arange(ranking.shape[1], device=ranking.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, steps)


def _levels(n: Tensor, steps: int) -> Tensor:
    """(B,) perturbable positions -> (B, steps + 1) counts round(i n / steps), halves up."""
    i = torch.arange(steps + 1, device=n.device)
    return (2 * i * n.unsqueeze(1) + steps) // (2 * steps)


def _probabilities(positions: Positions, rows: Tensor, shown: Tensor, target: Tensor,
                   rows_per_forward: int) -> Tensor:
    """p(target) (R,) of the inputs that show the input where `shown` (R, N) is True."""
    out = []
    for start in range(0, len(rows), rows_per_forward):
        part = rows[start:start + rows_per_forward]
        logits = positions.classify(part, positions.mix(part, shown[start:start + rows_per_forward]))
        out.append(torch.softmax(logits.float(), dim=-1).gather(1, target[part].unsqueeze(1)).squeeze(1))
    return torch.cat(out)


def _check(ranking: Tensor, inputs: Tensor, steps: int, rows_per_forward: int) -> None:
    if ranking.dim() != 2 or ranking.shape[0] != inputs.shape[0]:
        raise ValueError(f"ranking must be (batch, positions) with batch {inputs.shape[0]} like the input, "
                         f"got {tuple(ranking.shape)}")
    for name, value in (("steps", steps), ("rows_per_forward", rows_per_forward)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def perturbation_curves(model: nn.Module, inputs: Tensor, ranking: Tensor, baseline: Tensor | float, *,
                        mask: Tensor | None = None, steps: int = 20, target: Tensor | None = None,
                        rows_per_forward: int = 256) -> Curves:
    """Deletion and insertion curves (see the module docstring) of `ranking` (B, N), higher =
    more relevant, for a text classifier's ids (B, T) with `mask` (N = T) or an image
    classifier's images (B, C, H, W) (N = patches). target: (B,) classes (None: predicted).
    Eval mode for the duration (the model's mode is restored), no gradients."""
    _check(ranking, inputs, steps, rows_per_forward)
    positions = positions_of(model, inputs, mask, ranking.shape[1], baseline)
    if positions.valid.shape != ranking.shape:
        raise ValueError(f"ranking must hold one score per token, {tuple(positions.valid.shape)}, got "
                         f"{tuple(ranking.shape)}")
    if not torch.isfinite(ranking[positions.valid]).all():
        raise ValueError("ranking must be finite at every perturbable position (NaN or inf found)")
    B, N = ranking.shape
    everything = torch.arange(B, device=inputs.device)
    with torch.no_grad(), evaluating(model):
        if target is None:
            target = positions.classify(everything, inputs).argmax(-1)
        elif target.shape != (B,) or target.is_floating_point() or not all(0 <= t < len(model.labels)
                                                                          for t in target.tolist()):
            raise ValueError(f"target must be ({B},) class indices in [0, {len(model.labels)}), got "
                             f"{target.dtype} {tuple(target.shape)}")
        rank, n = _ranks(ranking, positions.valid), positions.valid.sum(1)
        # each distinct (example, k) once: levels repeat when steps > n
        keys, inverse = torch.unique(everything.unsqueeze(1) * (N + 1) + _levels(n, steps), return_inverse=True)
        rows, k = keys // (N + 1), keys % (N + 1)
        top = rank[rows] < k.unsqueeze(1)  # (U, N): the k highest-ranked positions
        valid = positions.valid[rows]
        deleted = _probabilities(positions, rows, ~top, target, rows_per_forward)
        inserted = _probabilities(positions, rows, top | ~valid, target, rows_per_forward)
    fractions = torch.arange(steps + 1, dtype=torch.float32, device=inputs.device) / steps
    return Curves(fractions, deleted[inverse], inserted[inverse], target, n)


__all__ = ["Curves", "Positions", "aopc", "auc", "image_positions", "patch_grid", "perturbation_curves",
           "random_ranking", "text_positions"]
