"""OOD scorers equal independent computations (scipy's logsumexp and softmax, scipy's Mahalanobis
distance with a hand-fitted shared covariance, scikit-learn's NearestNeighbors); the detector reads
the features the head reads, on any classifier, batched, without gradients, the model's mode
restored; statistics survive a save; bad input is one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.distance import mahalanobis
from scipy.special import logsumexp, softmax
from sklearn.neighbors import NearestNeighbors

from tformer.analysis.ood import (MARKER, OODDetector, draw_report, energy_score, fit, fit_gaussian, free_energy,
                                  knn_score, l2_normalise, mahalanobis_score, msp_score, ood_report)
from tformer.inference.pipeline import Pipeline
from tformer.metrics.ood import ood_metrics
from tformer.models import build_model
from tformer.models.vit import normalise
from tformer.runs import open_run

pytestmark = pytest.mark.usefixtures("one_thread")


# -- scorers on synthetic numbers ------------------------------------------------------------------
def test_msp_and_energy_equal_scipy() -> None:
    logits = np.random.default_rng(0).normal(0, 5, (50, 7))
    assert msp_score(logits) == pytest.approx(softmax(logits, axis=1).max(axis=1), rel=1e-12)
    assert free_energy(logits, 1.0) == pytest.approx(-logsumexp(logits, axis=1), rel=1e-12)
    assert energy_score(logits, 1.0) == pytest.approx(logsumexp(logits, axis=1), rel=1e-12)
    assert free_energy(logits, 2.5) == pytest.approx(-2.5 * logsumexp(logits / 2.5, axis=1), rel=1e-12)
    assert np.isfinite(energy_score(np.array([[1e4, -1e4]]))).all()  # no overflow


def test_mahalanobis_equals_a_hand_computed_distance() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], 40)
    features = rng.normal(0, 1, (120, 4)) @ rng.normal(0, 1, (4, 4)) + labels[:, None] * 3.0
    means, precision = fit_gaussian(features, labels, 3)
    by_hand = np.stack([features[labels == c].mean(axis=0) for c in range(3)])
    centred = features - by_hand[labels]
    shared = sum(np.cov(centred[labels == c].T, bias=True) * (labels == c).sum() for c in range(3)) / len(features)
    assert means == pytest.approx(by_hand) and precision == pytest.approx(np.linalg.inv(shared), rel=1e-8)
    queries = rng.normal(0, 3, (10, 4))
    expected = [-min(mahalanobis(q, by_hand[c], np.linalg.inv(shared)) ** 2 for c in range(3)) for q in queries]
    assert mahalanobis_score(queries, means, precision) == pytest.approx(expected, rel=1e-8)


def test_mahalanobis_skips_a_class_without_examples() -> None:
    features = np.random.default_rng(2).normal(0, 1, (30, 3))
    means, precision = fit_gaussian(features, np.zeros(30, int), 2)  # class 1 never seen
    assert np.isnan(means[1]).all() and np.isfinite(mahalanobis_score(features, means, precision)).all()


@pytest.mark.parametrize("k", [1, 5])
def test_knn_equals_sklearn_nearest_neighbours(k: int) -> None:
    rng = np.random.default_rng(3)
    bank, queries = rng.normal(0, 1, (200, 8)), rng.normal(0, 1, (30, 8))
    reference = NearestNeighbors(n_neighbors=k).fit(l2_normalise(bank))
    distances, _ = reference.kneighbors(l2_normalise(queries))
    assert knn_score(queries, l2_normalise(bank), k, chunk=7) == pytest.approx(-distances[:, k - 1], abs=1e-7)


# -- the detector on a tiny image classifier --------------------------------------------------------
def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("vit-digits", n_layers=1, d_model=16, n_heads=2, d_ff=32, n_classes=3)


def images(n: int, seed: int, shape: tuple[int, ...] = (8, 8, 1)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def test_features_are_what_the_head_reads_batched_without_gradients_mode_restored() -> None:
    model = tiny_vit().train()
    model.blocks[0].eval()  # a mixed mode must come back as it was
    x = images(20, 0)
    detector = fit(model, x, k=3, batch_size=3)
    outputs = detector.outputs(x)
    pixels = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    model.eval()
    with torch.no_grad():
        assert outputs.features == pytest.approx(model.features(normalise(pixels)).double().numpy(), abs=1e-6)
        assert outputs.logits == pytest.approx(model.classify(pixels).double().numpy(), abs=1e-6)
    model.train()
    model.blocks[0].eval()
    detector.score(x)
    assert detector.layer == "head" and model.training and not model.blocks[0].training and model.head.training
    assert all(p.grad is None for p in model.parameters())
    one_batch = fit(model, x, k=3, batch_size=64).score(x)
    for name, scores in detector.score(x).items():
        assert scores == pytest.approx(one_batch[name], rel=1e-5, abs=1e-6), name


def test_fitted_statistics_are_the_features_statistics_and_survive_a_save(tmp_path: Path) -> None:
    model, x = tiny_vit(), images(30, 1)
    labels = np.arange(30) % 3
    detector = fit(model, x, labels=labels, k=4, temperature=2.0)
    features = detector.outputs(x).features
    means, precision = fit_gaussian(features, labels, 3)
    assert detector.means == pytest.approx(means) and detector.precision == pytest.approx(precision)
    assert detector.bank == pytest.approx(l2_normalise(features))
    assert detector.score(x[:1], ["knn"])["knn"][0] == pytest.approx(  # a fitted point: k-th neighbour
        knn_score(features[:1], l2_normalise(features), 4)[0])
    folder = detector.save(tmp_path / "stats")
    loaded = OODDetector.load(folder, model)
    assert (loaded.layer, loaded.k, loaded.temperature) == ("head", 4, 2.0)
    for name, scores in loaded.score(x).items():
        assert scores == pytest.approx(detector.score(x)[name]), name
    assert (folder / MARKER).is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files tformer ood did not write"):
        detector.save(tmp_path / "mine")
    with pytest.raises(ValueError, match="another classifier"):
        OODDetector.load(folder, build_model("vit-digits", n_layers=1, d_model=16, n_heads=2, d_ff=32, n_classes=4))


def test_report_metrics_are_the_scores_metrics_and_figures_are_written(tmp_path: Path) -> None:
    model = tiny_vit()
    detector = fit(model, images(30, 2), k=5)
    report = ood_report(detector, images(12, 3), np.zeros((9, 8, 8, 1), np.uint8))
    for name, metrics in report.metrics.items():
        assert metrics == ood_metrics(report.in_scores[name], report.out_scores[name])
        assert (metrics.n_in, metrics.n_out) == (12, 9)
    assert set(report.seconds) == {"fit", "forward", "msp", "energy", "mahalanobis", "knn"}
    draw_report(report, tmp_path / "h.png", tmp_path / "roc.png", title="t")
    for png in ("h.png", "roc.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_image_files_are_read_like_arrays(tmp_path: Path) -> None:
    model, x = tiny_vit(), images(4, 4)
    paths = []
    for i, image in enumerate(x):
        Image.fromarray(image[..., 0]).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    detector = fit(model, x, k=2)
    assert detector.score(paths)["msp"] == pytest.approx(detector.score(x)["msp"])


# -- a text classifier (the session's tiny sentiment run) -------------------------------------------
def test_text_classifier_scores_match_the_pipeline(trained) -> None:
    run = open_run(trained["bert-sentiment"])
    sentences = ["the film was good", "a poor and dull war", "my lord speaks of love", "great fine film",
                 "bad king", "the queen"]
    detector = fit(run.model, sentences, tokenizer=run.tokenizer, k=2, batch_size=4)
    scores = detector.score(sentences + ["and of the"])
    probabilities = [max(p.probabilities.values()) for p in Pipeline(run).classify(sentences + ["and of the"])]
    assert scores["msp"] == pytest.approx(probabilities, rel=1e-5)
    assert all(np.isfinite(s).all() and s.shape == (7,) for s in scores.values())
    assert detector.outputs(sentences).features.shape == (6, run.model.config.d_model)


# -- bad input: one line each ----------------------------------------------------------------------
@pytest.mark.parametrize("inputs, message", [
    (images(3, 5, (16, 16, 1)), r"\(H, W, C\) = \(16, 16, 1\) but the model takes \(8, 8, 1\)"),
    (images(3, 5, (8, 8, 3)), r"\(8, 8, 3\) but the model takes \(8, 8, 1\)"),
    (np.zeros((0, 8, 8, 1), np.uint8), "is empty"),
    ([], "is empty"),
    (np.zeros((2, 8, 8, 1), np.float32), "uint8"),
    (["not-an-image.txt"], "is not an image file"),
])
def test_bad_images_are_one_line(inputs, message: str) -> None:
    detector = fit(tiny_vit(), images(6, 6), k=2)
    with pytest.raises(ValueError, match=message) as error:
        detector.score(inputs, what="the out-of-distribution data")
    assert "\n" not in str(error.value)


def test_bad_models_and_settings_are_one_line(trained) -> None:
    masked_lm = build_model("bert-tiny", n_layers=1, d_model=16, n_heads=2, head="mlm")
    for call, message in [(lambda: fit(masked_lm, ["a sentence"]), "needs a classifier"),
                          (lambda: fit(tiny_vit(), images(4, 0), temperature=0.0), "temperature must be a positive"),
                          (lambda: fit(tiny_vit(), images(4, 0), labels=np.array([0, 1, 2, 7])), "class indices"),
                          (lambda: fit(tiny_vit(), images(4, 0)).score(images(2, 0), ["odin"]), "unknown scorer")]:
        with pytest.raises(ValueError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
    run = open_run(trained["bert-sentiment"])
    with pytest.raises(ValueError, match="not a sentence"):
        fit(run.model, ["fine", "  "], tokenizer=run.tokenizer)
