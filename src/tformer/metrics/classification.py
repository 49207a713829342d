"""Classification metrics (accuracy, per-class precision / recall / F1, macro F1, the confusion
matrix) and the confusion-matrix picture, for any classifier's predictions."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tformer.files import write_figure_atomic


def classification_metrics(truth: np.ndarray, predicted: np.ndarray, n_labels: int) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1 (0 where undefined), macro F1 and the confusion
    matrix (rows: true class, columns: predicted class)."""
    confusion = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    hits = np.diag(confusion).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.nan_to_num(hits / confusion.sum(axis=0))
        recall = np.nan_to_num(hits / confusion.sum(axis=1))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return {"accuracy": float(hits.sum() / max(len(truth), 1)), "precision": precision.tolist(),
            "recall": recall.tolist(), "f1": f1.tolist(), "macro_f1": float(f1.mean()),
            "confusion": confusion}


def plot_confusion(confusion: np.ndarray, labels: Sequence[str], path: Path, title: str = "") -> None:
    """A confusion-matrix heatmap with counts, written atomically to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 2.5 + 0.5 * len(labels)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(confusion, cmap="Blues")
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels, rotation=45, ha="right")
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    for (i, j), count in np.ndenumerate(confusion):
        ax.text(j, i, str(count), ha="center", va="center",
                color="white" if count > confusion.max() / 2 else "black")
    fig.tight_layout()
    write_figure_atomic(fig, path)
