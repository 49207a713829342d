"""How an image classifier's accuracy falls as its inputs are perturbed, for any `ImageClassifier`:
PGD of growing epsilon (`attacks.image`), Gaussian noise of growing sigma, Gaussian blur of growing
sigma, and square occlusions of growing size at seeded random positions. Each sweep is a list of
rows `{"perturbation", "level", "accuracy", "examples", "seconds"}`; `plot_sweeps` draws them (one
panel per perturbation, one curve per model) and `write_adversarial_grid` draws adversarial images
beside their originals with the true, clean and adversarial labels.

Every perturbed image stays in [0, 1], the model's input space; level 0 is the clean accuracy.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.attacks.image import AttackResult, check_image_classifier, check_images, check_labels, pgd
from tformer.files import write_figure_atomic
from tformer.nn.modes import evaluating

log = logging.getLogger(__name__)

Row = dict[str, float | int | str]
PERTURBATIONS = ("pgd", "noise", "blur", "occlusion")
AXIS_NAMES = {"pgd": "PGD epsilon (L-inf, pixels in [0, 1])", "noise": "Gaussian noise sigma",
              "blur": "Gaussian blur sigma (pixels)", "occlusion": "occluding square (side, pixels)"}


# -- perturbations: (N, C, H, W) in [0, 1] -> the same shape in [0, 1] ---------------------------


def gaussian_noise(images: Tensor, sigma: float, seed: int = 0) -> Tensor:
    """images + N(0, sigma^2) per pixel, clamped to [0, 1]; seeded."""
    generator = torch.Generator(device=images.device).manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator, device=images.device)
    return (images + sigma * noise).clamp(0, 1)


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """A separable Gaussian blur of each channel, the kernel cut at 3 sigma (radius int(3 sigma + 0.5),
    as scipy.ndimage.gaussian_filter(truncate=3)), edges extended (scipy's mode="nearest")."""
    if sigma == 0:
        return images.clone()
    radius = int(3.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    n, c, h, w = images.shape
    x = images.reshape(n * c, 1, h, w)  # each channel on its own
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))  # along the width
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))  # along the height
    return x.reshape(n, c, h, w).clamp(0, 1)


def occlude(images: Tensor, size: int, seed: int = 0, fill: float = 0.0) -> Tensor:
    """A size x size square of `fill` over every channel, at a seeded random position per image
    (wholly inside the image)."""
    out = images.clone()
    if size == 0:
        return out
    n, _, h, w = images.shape
    rng = np.random.default_rng(seed)
    tops, lefts = rng.integers(0, h - size + 1, n), rng.integers(0, w - size + 1, n)
    for i, (top, left) in enumerate(zip(tops, lefts)):
        out[i, :, top:top + size, left:left + size] = fill
    return out


# -- accuracy ----------------------------------------------------------------------------------


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Share of images the model classifies as their label (eval mode; the model's mode restored)."""
    right = 0
    with evaluating(model), torch.no_grad():
        for start in range(0, len(images), batch_size):
            predicted = model.classify(images[start:start + batch_size]).argmax(-1)  # type: ignore[operator]
            right += int((predicted == labels[start:start + batch_size]).sum())
    return right / len(images)


def check_levels(name: str, levels: Sequence[float], *, integer: bool = False, at_most: float = math.inf) -> None:
    for level in levels:
        bad_type = integer and (not isinstance(level, int) or isinstance(level, bool))
        if bad_type or not isinstance(level, (int, float)) or not math.isfinite(level) or level < 0 or level > at_most:
            kind = "integers" if integer else "finite numbers"
            raise ValueError(f"{name} must be {kind} in [0, {at_most:g}], got {level!r}")


def _checked(model: nn.Module, images: Tensor, labels: Tensor) -> None:
    check_image_classifier(model)
    check_images(model, images)
    check_labels(model, images, labels)
    if len(images) == 0:
        raise ValueError("no images to measure: pass at least one (N >= 1)")


def sweep(model: nn.Module, images: Tensor, labels: Tensor, name: str, levels: Sequence[float],
          perturb: Callable[[Tensor, float], Tensor], batch_size: int = 256) -> list[Row]:
    """Accuracy on perturb(images, level) for each level."""
    rows: list[Row] = []
    for level in levels:
        start = time.perf_counter()
        value = accuracy(model, perturb(images, level), labels, batch_size)
        rows.append({"perturbation": name, "level": float(level), "accuracy": value, "examples": len(images),
                     "seconds": time.perf_counter() - start})
        log.info("%s %g: accuracy %.4f", name, level, value)
    return rows


def noise_sweep(model: nn.Module, images: Tensor, labels: Tensor, sigmas: Sequence[float], seed: int = 0) -> list[Row]:
    _checked(model, images, labels)
    check_levels("noise sigmas", sigmas)
    return sweep(model, images, labels, "noise", sigmas, lambda x, s: gaussian_noise(x, s, seed))


def blur_sweep(model: nn.Module, images: Tensor, labels: Tensor, sigmas: Sequence[float]) -> list[Row]:
    _checked(model, images, labels)
    check_levels("blur sigmas", sigmas)
    return sweep(model, images, labels, "blur", sigmas, gaussian_blur)


def occlusion_sweep(model: nn.Module, images: Tensor, labels: Tensor, sizes: Sequence[int], seed: int = 0,
                    fill: float = 0.0) -> list[Row]:
    _checked(model, images, labels)
    check_levels("occlusion sizes", sizes, integer=True, at_most=min(images.shape[-2:]))
    return sweep(model, images, labels, "occlusion", sizes, lambda x, s: occlude(x, int(s), seed, fill))


def pgd_sweep(model: nn.Module, images: Tensor, labels: Tensor, epsilons: Sequence[float], *, steps: int = 20,
              step_factor: float = 2.5, norm: str = "linf", restarts: int = 1, seed: int = 0,
              batch_size: int = 256) -> tuple[list[Row], dict[float, AttackResult]]:
    """Accuracy under PGD-`steps` (step size step_factor * epsilon / steps, random start) for each
    epsilon; the rows and each epsilon's AttackResult (its images feed `write_adversarial_grid`).
    Epsilon 0 is the clean accuracy (no attack run)."""
    _checked(model, images, labels)
    check_levels("PGD epsilons", epsilons)
    rows: list[Row] = []
    results: dict[float, AttackResult] = {}
    for epsilon in epsilons:
        start = time.perf_counter()
        if epsilon == 0:
            value, passes = accuracy(model, images, labels, batch_size), len(images)
        else:
            result = pgd(model, images, labels, epsilon, steps=steps, step_size=step_factor * epsilon / steps,
                         norm=norm, restarts=restarts, seed=seed, batch_size=batch_size)
            results[float(epsilon)] = result
            value, passes = result.robust_accuracy, result.forward_passes
        seconds = time.perf_counter() - start
        rows.append({"perturbation": "pgd", "level": float(epsilon), "accuracy": value, "examples": len(images),
                     "seconds": seconds, "seconds_per_image": seconds / len(images), "forward_passes": passes})
        log.info("PGD-%d eps %g: accuracy %.4f (%.1f s)", steps, epsilon, value, seconds)
    return rows, results


# -- figures -----------------------------------------------------------------------------------


def plot_sweeps(curves: dict[str, Sequence[Row]], path: str | Path, title: str = "") -> Path:
    """One panel per perturbation present, one line per model: `curves` maps a model's name to its
    rows (any mix of perturbations). Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [p for p in PERTURBATIONS if any(row["perturbation"] == p for rows in curves.values() for row in rows)]
    if not present:
        raise ValueError("no rows to plot: pass each model's sweep rows, e.g. {'standard': rows}")
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.6), squeeze=False)
    for ax, perturbation in zip(axes[0], present):
        for name, rows in curves.items():
            points = sorted((float(r["level"]), float(r["accuracy"])) for r in rows if r["perturbation"] == perturbation)
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set(xlabel=AXIS_NAMES[perturbation], ylabel="accuracy", ylim=(0, 1.02), title=perturbation)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    write_figure_atomic(fig, path, dpi=110)
    return Path(path)


def write_adversarial_grid(model: nn.Module, images: Tensor, labels: Tensor, result: AttackResult,
                           path: str | Path, n: int = 8, title: str = "") -> Path:
    """Originals (top row) over their adversarial images (middle) and the perturbation (bottom,
    grey 0.5 = unchanged), titled with the true, clean and adversarial labels; the first n images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_image_classifier(model)
    check_images(model, images)
    check_labels(model, images, labels)
    if result.images.shape != images.shape:
        raise ValueError(f"the attack result holds images of shape {tuple(result.images.shape)}, the originals "
                         f"{tuple(images.shape)}: pass the images that were attacked")
    names = model.labels  # type: ignore[attr-defined]
    n = min(n, len(images))
    fig, axes = plt.subplots(3, n, figsize=(1.5 * n, 5.0), squeeze=False)
    for i in range(n):
        original, adversarial = images[i].detach().cpu(), result.images[i].detach().cpu()
        delta = adversarial - original
        scale = float(delta.abs().max()) or 1.0
        panels = [(original, f"true {names[int(labels[i])]}\nclean {names[int(result.clean_predictions[i])]}"),
                  (adversarial, f"adv {names[int(result.adversarial_predictions[i])]}"),
                  (0.5 + 0.5 * delta / scale, f"|d| max {scale:.2f}")]
        for row, (picture, caption) in enumerate(panels):
            ax = axes[row][i]
            array = picture.permute(1, 2, 0).numpy()
            ax.imshow(array[..., 0] if array.shape[-1] == 1 else array, cmap="gray", vmin=0, vmax=1)
            colour = "red" if row == 1 and bool(result.success[i]) else "black"
            ax.set_title(caption, fontsize=7, color=colour)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    write_figure_atomic(fig, path, dpi=110)
    return Path(path)


__all__ = ["PERTURBATIONS", "accuracy", "blur_sweep", "gaussian_blur", "gaussian_noise", "noise_sweep", "occlude",
           "occlusion_sweep", "pgd_sweep", "plot_sweeps", "sweep", "write_adversarial_grid"]
