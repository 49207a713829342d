"""Out-of-distribution detection metrics from scores where higher means "more in-distribution":
AUROC, AUPR with either side as the positive class, and the false-positive rate at 95 % true
positives. numpy only; scikit-learn's `roc_auc_score`, `average_precision_score` and `roc_curve`
are the tests' oracle.

Conventions (those of Hendrycks & Gimpel 2017 and the OOD literature since):
    in-distribution is the positive class for AUROC, AUPR-In and FPR95;
    AUPR-Out takes out-of-distribution as positive, scored by the negated score;
    FPR95 is the share of out-of-distribution inputs accepted (score >= threshold) at the highest
    threshold that still accepts at least 95 % of the in-distribution inputs.
Ties count half for AUROC and are one threshold (never split) for the curves, as in scikit-learn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

TPR_LEVEL = 0.95


@dataclass(frozen=True)
class OODMetrics:
    """Detection quality of one scorer. auroc, aupr_in, aupr_out in [0, 1] (higher is better);
    fpr95 in [0, 1] (lower is better)."""

    auroc: float
    aupr_in: float  # average precision, in-distribution positive
    aupr_out: float  # average precision, out-of-distribution positive (scores negated)
    fpr95: float  # out-of-distribution accepted while 95 % of in-distribution is accepted
    n_in: int
    n_out: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def check_scores(scores: np.ndarray | list[float], what: str) -> np.ndarray:
    """A 1-D float64 array of finite scores, at least one; else one ValueError line naming `what`."""
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of scores (one per input), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{what} is empty: OOD metrics need at least one in-distribution and one "
                         "out-of-distribution score")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"{what} holds {bad.size} non-finite score(s) (first at index {bad[0]}: "
                         f"{array[bad[0]]}); fix the scorer or drop those inputs")
    return array


def _checked(in_scores: np.ndarray, out_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return check_scores(in_scores, "in-distribution scores"), check_scores(out_scores, "out-of-distribution scores")


def _labelled(in_scores: np.ndarray, out_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.concatenate([in_scores, out_scores])
    positive = np.concatenate([np.ones(len(in_scores), bool), np.zeros(len(out_scores), bool)])
    return scores, positive


def _curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (true positives, false positives) at each distinct threshold, highest first; one
    entry per distinct score, so tied scores are accepted or rejected together."""
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, hits = scores[order], positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    true_pos = np.cumsum(hits)[last_of_tie]
    false_pos = (last_of_tie + 1) - true_pos
    return true_pos.astype(np.float64), false_pos.astype(np.float64)


def roc_points(in_scores: np.ndarray, out_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) from (0, 0) to (1, 1), in-distribution positive."""
    in_scores, out_scores = _checked(in_scores, out_scores)
    true_pos, false_pos = _curve(*_labelled(in_scores, out_scores))
    return np.r_[0.0, false_pos / len(out_scores)], np.r_[0.0, true_pos / len(in_scores)]


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P(in > out) + P(in == out) / 2: the Mann-Whitney U statistic with mid-ranks for ties."""
    in_scores, out_scores = _checked(in_scores, out_scores)
    scores, positive = _labelled(in_scores, out_scores)
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # 1-based mid-rank of each tie
    n_in, n_out = len(in_scores), len(out_scores)
    u = ranks[positive].sum() - n_in * (n_in + 1) / 2.0
    return float(u / (n_in * n_out))


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """sum over thresholds of (recall step) x precision, thresholds from the highest score down."""
    true_pos, false_pos = _curve(scores, positive)
    precision = true_pos / (true_pos + false_pos)
    recall = true_pos / positive.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(in_scores: np.ndarray, out_scores: np.ndarray, level: float = TPR_LEVEL) -> float:
    """The false-positive rate at the first threshold (from the top) whose true-positive rate
    reaches `level`."""
    if not 0 < level <= 1:
        raise ValueError(f"the true-positive-rate level must be in (0, 1], got {level}")
    fpr, tpr = roc_points(in_scores, out_scores)
    return float(fpr[np.searchsorted(tpr, level, side="left")])


def ood_metrics(in_scores: np.ndarray | list[float], out_scores: np.ndarray | list[float]) -> OODMetrics:
    """AUROC, AUPR-In, AUPR-Out and FPR95 of one scorer (higher score = more in-distribution)."""
    in_scores, out_scores = _checked(in_scores, out_scores)
    scores, positive = _labelled(in_scores, out_scores)
    return OODMetrics(auroc=auroc(in_scores, out_scores), aupr_in=average_precision(scores, positive),
                      aupr_out=average_precision(-scores, ~positive), fpr95=fpr_at_tpr(in_scores, out_scores),
                      n_in=len(in_scores), n_out=len(out_scores))


__all__ = ["OODMetrics", "TPR_LEVEL", "auroc", "average_precision", "check_scores", "fpr_at_tpr",
           "ood_metrics", "roc_points"]
