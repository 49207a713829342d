"""Classification metrics equal scikit-learn's; the confusion picture is written atomically."""

from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as sk

from tformer.metrics import classification_metrics, plot_confusion


def test_metrics_equal_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 4, 200), rng.integers(0, 3, 200)  # class 3 never predicted
    ours = classification_metrics(truth, predicted, 4)
    assert ours["accuracy"] == pytest.approx(sk.accuracy_score(truth, predicted))
    assert ours["macro_f1"] == pytest.approx(sk.f1_score(truth, predicted, average="macro", zero_division=0))
    assert ours["f1"] == pytest.approx(sk.f1_score(truth, predicted, average=None, labels=range(4),
                                                   zero_division=0).tolist())
    assert ours["precision"] == pytest.approx(sk.precision_score(truth, predicted, average=None, labels=range(4),
                                                                 zero_division=0).tolist())
    assert (ours["confusion"] == sk.confusion_matrix(truth, predicted, labels=range(4))).all()


def test_confusion_png_is_written_and_nothing_else(tmp_path: Path) -> None:
    png = tmp_path / "out" / "confusion.png"
    plot_confusion(np.array([[3, 1], [0, 4]]), ["neg", "pos"], png, title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in png.parent.iterdir()] == ["confusion.png"]
