"""FGSM and PGD (L-inf and L2) on the pixels of any `ImageClassifier`.

The attack lives in the model's input space: images (N, C, H, W) with values in [0, 1], which the
model's `classify` normalises itself. Every step is projected back onto the epsilon-ball around
the clean image and then clamped to [0, 1] (clamping only moves a pixel towards its clean value,
which lies in [0, 1], so the ball still holds). Gradients are taken with `torch.autograd.grad` on
the input only: the parameters' `.grad` is never touched, and the model's train/eval mode is put
back as it was. FGSM: Goodfellow et al. 2015; PGD with random start and restarts: Madry et al. 2018.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.models.protocols import ImageClassifier, can
from tformer.nn.modes import evaluating

NORMS = ("linf", "l2")


@dataclass(frozen=True)
class AttackResult:
    """What an attack did to a batch of images.

    images:                  (N, C, H, W) adversarial images in [0, 1], detached
    success:                 (N,) bool: untargeted, the adversarial prediction is not the true label;
                             targeted, it is the target (an already misclassified image counts as a
                             success, so robust accuracy is 1 - success.mean())
    clean_predictions:       (N,) classes the model gives the clean images
    adversarial_predictions: (N,) classes it gives the adversarial images
    forward_passes / backward_passes: counted per image (a batch of 8 through the model counts 8),
                             so they do not depend on how the images were batched
    """

    images: Tensor
    success: Tensor
    clean_predictions: Tensor
    adversarial_predictions: Tensor
    forward_passes: int
    backward_passes: int

    @property
    def robust_accuracy(self) -> float:
        """Share of images whose adversarial prediction is still right (untargeted attacks)."""
        return float((~self.success).float().mean()) if len(self.success) else float("nan")


# -- checks: one line each ---------------------------------------------------------------------


def check_image_classifier(model: object) -> None:
    if not can(model, ImageClassifier):
        raise ValueError(f"{type(model).__name__} is not an image classifier (it needs labels, image_shape and "
                         "classify(images in [0, 1])): attack a ViT classification run")


def check_images(model: nn.Module, images: Tensor) -> None:
    """(N, C, H, W) float images in [0, 1] of the model's size and channels."""
    height, width, channels = model.image_shape  # type: ignore[attr-defined]
    if not isinstance(images, Tensor) or not images.is_floating_point():
        kind = images.dtype if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor with values in [0, 1], got {kind}; divide uint8 pixels by 255")
    if images.dim() != 4 or tuple(images.shape[1:]) != (channels, height, width):
        raise ValueError(f"images have shape {tuple(images.shape)}, this model takes (N, {channels}, {height}, "
                         f"{width}) (N, channels, height, width); resize or convert them")
    if images.numel() and (not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1):
        raise ValueError("image values must be finite and in [0, 1]; scale pixels by 1/255 and clamp")


def check_labels(model: nn.Module, images: Tensor, labels: Tensor, name: str = "labels") -> None:
    n_classes = len(model.labels)  # type: ignore[attr-defined]
    if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32) or tuple(labels.shape) != (len(images),):
        raise ValueError(f"{name} must be an integer tensor of shape ({len(images)},), one class index per image")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"{name} must be class indices in [0, {n_classes}), got {int(labels.min())}..{int(labels.max())}")


def check_budget(epsilon: float, steps: int = 1, step_size: float | None = None, restarts: int = 1,
                 norm: str = "linf") -> None:
    if not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon must be a finite number >= 0 (the perturbation's radius in [0, 1] pixels), got {epsilon}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    if step_size is not None and (not isinstance(step_size, (int, float)) or not math.isfinite(step_size) or step_size <= 0):
        raise ValueError(f"step_size must be a finite number > 0 (or None for 2.5 * epsilon / steps), got {step_size}")
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")


# -- the pieces of a step ----------------------------------------------------------------------


def per_example_norm(x: Tensor) -> Tensor:
    """(N, ...) -> (N, 1, 1, 1) L2 norms, for broadcasting over images."""
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))


def project(delta: Tensor, epsilon: float, norm: str) -> Tensor:
    """The nearest point of the epsilon-ball (L-inf: clamp each pixel; L2: rescale the whole image)."""
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    scale = (epsilon / per_example_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return delta * scale


def ascent_direction(grad: Tensor, norm: str) -> Tensor:
    """The steepest ascent direction of unit norm: sign(g) for L-inf, g / ||g||_2 for L2."""
    if norm == "linf":
        return grad.sign()
    return grad / per_example_norm(grad).clamp_min(1e-12)


def random_start(images: Tensor, epsilon: float, norm: str, generator: torch.Generator | None) -> Tensor:
    """A random point of the ball (L-inf: uniform per pixel; L2: a random direction, radius
    epsilon * U(0, 1)), clamped to [0, 1]."""
    if norm == "linf":
        delta = (torch.rand(images.shape, generator=generator, device=images.device) * 2 - 1) * epsilon
    else:
        direction = torch.randn(images.shape, generator=generator, device=images.device)
        radius = torch.rand((len(images), 1, 1, 1), generator=generator, device=images.device) * epsilon
        delta = direction / per_example_norm(direction).clamp_min(1e-12) * radius
    return (images + delta).clamp(0, 1)


def attack_loss(logits: Tensor, labels: Tensor, targets: Tensor | None, reduction: str = "sum") -> Tensor:
    """What the attack climbs: the true class's cross-entropy, or minus the target's. Summed, so each
    image's gradient does not depend on the batch it sits in."""
    if targets is None:
        return F.cross_entropy(logits.float(), labels, reduction=reduction)
    return -F.cross_entropy(logits.float(), targets, reduction=reduction)


def input_gradient(model: nn.Module, x: Tensor, labels: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor]:
    """(d attack_loss / d x, the logits at x), without touching any parameter's .grad."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model.classify(x)  # type: ignore[operator]
        (grad,) = torch.autograd.grad(attack_loss(logits, labels, targets), x)
    return grad, logits.detach()


Observer = Callable[[Tensor, Tensor], None]  # (images, their logits)


def pgd_images(model: nn.Module, images: Tensor, labels: Tensor, epsilon: float, *, steps: int,
               step_size: float, norm: str = "linf", random_init: bool = True, targets: Tensor | None = None,
               generator: torch.Generator | None = None, observe: Observer | None = None) -> Tensor:
    """One PGD run on one batch, no checks, no mode switch: the last iterate (N, C, H, W), detached.
    Adversarial training calls this directly (the caller puts the model in eval mode). `observe`,
    if given, sees every iterate with its logits (the last one costs one more forward pass)."""
    images = images.detach()
    x = random_start(images, epsilon, norm, generator) if random_init and epsilon > 0 else images.clone()
    for _ in range(steps):
        grad, logits = input_gradient(model, x, labels, targets)
        if observe is not None:
            observe(x, logits)
        x = (images + project(x + step_size * ascent_direction(grad, norm) - images, epsilon, norm)).clamp(0, 1)
    if observe is not None:
        with torch.no_grad():
            observe(x, model.classify(x))  # type: ignore[operator]
    return x.detach()


class Strongest:
    """Per image, the strongest candidate offered so far: one that fools the model beats one that
    does not; between equals, the higher attack loss wins."""

    def __init__(self, images: Tensor, labels: Tensor, targets: Tensor | None) -> None:
        self.labels, self.targets = labels, targets
        self.images = images.detach().clone()
        self.predicted = torch.zeros(len(images), dtype=torch.long, device=images.device)
        self.fooled = torch.zeros(len(images), dtype=torch.bool, device=images.device)
        self.loss = torch.full((len(images),), -math.inf, device=images.device)

    def offer(self, index: Tensor, x: Tensor, logits: Tensor) -> None:
        """Candidates x (k, C, H, W) with logits (k, classes) for the images at `index` (k,)."""
        targets = None if self.targets is None else self.targets[index]
        predicted = logits.argmax(-1)
        fooled = succeeded(predicted, self.labels[index], targets)
        loss = attack_loss(logits, self.labels[index], targets, reduction="none")
        was = self.fooled[index]
        better = (fooled & ~was) | ((fooled == was) & (loss > self.loss[index]))
        chosen = index[better]
        self.images[chosen], self.predicted[chosen] = x.detach()[better], predicted[better]
        self.fooled[chosen], self.loss[chosen] = fooled[better], loss[better]


def predictions(model: nn.Module, images: Tensor) -> Tensor:
    with torch.no_grad():
        return model.classify(images).argmax(-1)  # type: ignore[operator]


def succeeded(predicted: Tensor, labels: Tensor, targets: Tensor | None) -> Tensor:
    return predicted != labels if targets is None else predicted == targets


# -- public attacks ----------------------------------------------------------------------------


def fgsm(model: nn.Module, images: Tensor, labels: Tensor, epsilon: float, *, norm: str = "linf",
         targets: Tensor | None = None, batch_size: int = 256) -> AttackResult:
    """The fast gradient sign method: one step of size epsilon from the clean image (L-inf:
    x + eps * sign(g); L2, the fast gradient method: x + eps * g / ||g||), clamped to [0, 1];
    always that image, even where the clean one was already misclassified."""
    return pgd(model, images, labels, epsilon, steps=1, step_size=epsilon if epsilon > 0 else 1.0, norm=norm,
               random_init=False, targets=targets, batch_size=batch_size, keep_best=False)


def pgd(model: nn.Module, images: Tensor, labels: Tensor, epsilon: float, *, steps: int = 10,
        step_size: float | None = None, norm: str = "linf", random_init: bool = True, restarts: int = 1,
        targets: Tensor | None = None, seed: int = 0, batch_size: int = 256, keep_best: bool = True) -> AttackResult:
    """Projected gradient descent: `steps` signed (L-inf) or normalised (L2) gradient steps of
    `step_size` (default 2.5 * epsilon / steps), each projected onto the epsilon-ball and [0, 1].

    Untargeted it raises the true class's loss; with `targets` (N,) it lowers the target's. Each
    image's result is its strongest candidate (one that fools the model first, then the highest
    loss): with `keep_best` the candidates are the clean image and every iterate (so an image the
    model already gets wrong is not attacked, and robust accuracy never exceeds clean accuracy, as
    RobustBench counts it); without, only each restart's last iterate (torchattacks' PGD). With
    `restarts` > 1 each further random start attacks only the images still standing: restarts
    never lower success. Seeded: the same call gives the same images.
    """
    check_image_classifier(model)
    check_budget(epsilon, steps, step_size, restarts, norm)
    check_images(model, images)
    check_labels(model, images, labels)
    if targets is not None:
        check_labels(model, images, targets, "targets")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size}")
    step = step_size if step_size is not None else 2.5 * epsilon / steps
    generator = torch.Generator(device=images.device).manual_seed(seed)
    parts, counts = [], [0, 0]
    with evaluating(model):
        for start in range(0, len(images), batch_size):
            part = slice(start, start + batch_size)
            part_targets = None if targets is None else targets[part]
            parts.append(_attack_batch(model, images[part], labels[part], part_targets, epsilon, steps, step, norm,
                                       random_init, restarts, generator, keep_best, counts))
    if not parts:
        empty = torch.zeros(0, dtype=torch.long, device=images.device)
        return AttackResult(images.detach().clone(), empty.bool(), empty, empty, 0, 0)
    adversarial, clean, predicted = (torch.cat(p) for p in zip(*parts))
    return AttackResult(adversarial, succeeded(predicted, labels, targets), clean, predicted, counts[0], counts[1])


def _attack_batch(model: nn.Module, images: Tensor, labels: Tensor, targets: Tensor | None, epsilon: float,
                  steps: int, step: float, norm: str, random_init: bool, restarts: int,
                  generator: torch.Generator, keep_best: bool, counts: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(adversarial images, clean predictions, adversarial predictions) of one batch; counts
    [forward, backward] passes per image."""
    with torch.no_grad():
        clean_logits = model.classify(images)  # type: ignore[operator]
    counts[0] += len(images)
    strongest = Strongest(images, labels, targets)
    everyone = torch.arange(len(images), device=images.device)
    if keep_best:
        strongest.offer(everyone, images, clean_logits)  # the clean image is in the ball too
    else:
        strongest.predicted = clean_logits.argmax(-1)  # what an image keeps if no candidate is offered
    for _ in range(restarts):
        index = everyone[~strongest.fooled]
        if len(index) == 0:
            break
        sub_targets = None if targets is None else targets[index]
        observe = (lambda x, logits: strongest.offer(index, x, logits)) if keep_best else None
        x = pgd_images(model, images[index], labels[index], epsilon, steps=steps, step_size=step, norm=norm,
                       random_init=random_init, targets=sub_targets, generator=generator, observe=observe)
        if not keep_best:
            with torch.no_grad():
                strongest.offer(index, x, model.classify(x))  # type: ignore[operator]
        counts[0] += len(index) * (steps + 1)
        counts[1] += len(index) * steps
        if not random_init:
            break  # a deterministic attack gives the same images again
    return strongest.images, clean_logits.argmax(-1), strongest.predicted


__all__ = ["AttackResult", "NORMS", "check_budget", "check_image_classifier", "check_images", "check_labels",
           "fgsm", "pgd", "pgd_images"]
