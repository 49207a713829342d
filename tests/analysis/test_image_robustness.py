"""Robustness sweeps of image classifiers: the perturbations against independent references
(scipy's Gaussian filter, counted occluded pixels, the noise's measured spread), accuracies against
scikit-learn's accuracy_score, level 0 as the clean accuracy, PGD rows as the attack's own success,
the figures written, and bad levels refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from sklearn.metrics import accuracy_score
from torch import Tensor, nn

from tformer.analysis.image_robustness import (
    accuracy, blur_sweep, gaussian_blur, gaussian_noise, noise_sweep, occlude, occlusion_sweep, pgd_sweep,
    plot_sweeps, write_adversarial_grid)
from tformer.attacks.image import pgd

SHAPE = (6, 6, 1)


class LinearImageClassifier(nn.Module):
    """logits = W x + b on flattened pixels: an ImageClassifier by its methods."""

    def __init__(self, n_classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(n_classes, 36, generator=g))
        self.bias = nn.Parameter(torch.zeros(n_classes))

    @property
    def labels(self) -> tuple[str, ...]:
        return ("zero", "one", "two")[: len(self.bias)]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return SHAPE

    def classify(self, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        return inputs.flatten(1) @ self.weight.T + self.bias


def data(n: int = 40, seed: int = 1) -> tuple[LinearImageClassifier, Tensor, Tensor]:
    model = LinearImageClassifier()
    x = torch.rand(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed))
    labels = model.classify(x).argmax(-1)
    labels[::4] = (labels[::4] + 1) % 3  # a quarter wrong: clean accuracy 0.75
    return model, x, labels


def test_accuracy_matches_scikit_learn() -> None:
    model, x, y = data()
    predicted = model.classify(x).argmax(-1)
    assert accuracy(model, x, y, batch_size=7) == pytest.approx(accuracy_score(y.numpy(), predicted.numpy()))


@pytest.mark.parametrize("sigma", [0.6, 1.0, 2.5])
def test_blur_matches_scipy(sigma: float) -> None:
    x = torch.rand(3, 2, 9, 9, generator=torch.Generator().manual_seed(0))
    expected = gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=3.0)
    assert np.allclose(gaussian_blur(x, sigma).numpy(), expected, atol=1e-6)


def test_occlusion_covers_one_seeded_square_per_image() -> None:
    x = torch.ones(20, 3, 10, 10)
    for size in (1, 4, 10):
        out = occlude(x, size, seed=3)
        assert ((out == 0).flatten(1).sum(1) == 3 * size * size).all()  # exactly the square, every channel
        assert torch.equal(out, occlude(x, size, seed=3))
    first, other = occlude(x, 3, seed=3), occlude(x, 3, seed=4)
    assert not torch.equal(first, other)
    assert torch.equal(occlude(x, 0), x)


def test_noise_has_the_asked_spread_and_is_seeded() -> None:
    x = torch.full((50, 1, 20, 20), 0.5)
    noisy = gaussian_noise(x, 0.05, seed=1)
    assert float((noisy - x).std()) == pytest.approx(0.05, rel=0.05)
    assert torch.equal(noisy, gaussian_noise(x, 0.05, seed=1)) and not torch.equal(noisy, gaussian_noise(x, 0.05, seed=2))
    assert gaussian_noise(x, 3.0).min() >= 0 and gaussian_noise(x, 3.0).max() <= 1


def test_level_zero_is_the_clean_accuracy_and_rows_are_complete() -> None:
    model, x, y = data()
    clean = accuracy(model, x, y)
    assert clean == pytest.approx(0.75)
    for rows in (noise_sweep(model, x, y, [0, 0.2]), blur_sweep(model, x, y, [0, 1.0]),
                 occlusion_sweep(model, x, y, [0, 3]), pgd_sweep(model, x, y, [0, 0.1], steps=3)[0]):
        assert rows[0]["accuracy"] == pytest.approx(clean) and rows[0]["level"] == 0
        assert all(set(row) >= {"perturbation", "level", "accuracy", "examples", "seconds"} for row in rows)
        assert all(row["examples"] == 40 for row in rows)


def test_pgd_rows_are_the_attacks_own_success() -> None:
    model, x, y = data()
    rows, results = pgd_sweep(model, x, y, [0.05, 0.2], steps=4, seed=2)
    for row in rows:
        expected = pgd(model, x, y, row["level"], steps=4, step_size=2.5 * row["level"] / 4, seed=2)
        assert row["accuracy"] == pytest.approx(1 - expected.success.float().mean().item())
        assert torch.equal(results[row["level"]].images, expected.images)
    assert rows[1]["accuracy"] <= rows[0]["accuracy"] <= 0.75  # a linear model: a larger ball only does worse


def test_figures_are_written(tmp_path: Path) -> None:
    model, x, y = data()
    rows, results = pgd_sweep(model, x, y, [0, 0.1], steps=2)
    curves = {"a": rows + noise_sweep(model, x, y, [0, 0.3]), "b": blur_sweep(model, x, y, [0, 1])}
    png = plot_sweeps(curves, tmp_path / "curves.png", title="linear")
    assert Image.open(png).size[0] > 3 * Image.open(png).size[1] / 2  # three panels side by side
    grid = write_adversarial_grid(model, x, y, results[0.1], tmp_path / "grid.png", n=5)
    assert Image.open(grid).size[0] > 0 and not list(tmp_path.glob("*.tmp*"))


BAD = {
    "negative sigma": (lambda m, x, y: noise_sweep(m, x, y, [-0.1]), "noise sigmas must be"),
    "nan blur": (lambda m, x, y: blur_sweep(m, x, y, [float("nan")]), "blur sigmas must be"),
    "occlusion larger than the image": (lambda m, x, y: occlusion_sweep(m, x, y, [7]), "occlusion sizes must be"),
    "fractional occlusion": (lambda m, x, y: occlusion_sweep(m, x, y, [1.5]), "integers"),
    "negative epsilon": (lambda m, x, y: pgd_sweep(m, x, y, [-0.1]), "PGD epsilons must be"),
    "not a classifier": (lambda m, x, y: noise_sweep(nn.Linear(2, 2), x, y, [0.1]), "not an image classifier"),
    "wrong shape": (lambda m, x, y: noise_sweep(m, torch.rand(2, 1, 5, 5), y[:2], [0.1]), "this model takes"),
    "no images": (lambda m, x, y: noise_sweep(m, x[:0], y[:0], [0.1]), "no images"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_one_line(case: str) -> None:
    call, message = BAD[case]
    model, x, y = data()
    with pytest.raises(ValueError) as error:
        call(model, x, y)
    assert message in str(error.value) and "\n" not in str(error.value)
