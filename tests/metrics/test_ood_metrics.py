"""OOD metrics equal scikit-learn's (roc_auc_score, average_precision_score, an FPR95 read off
roc_curve) on random scores, ties included; bad input is one line."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as sk

from tformer.metrics.ood import auroc, fpr_at_tpr, ood_metrics, roc_points


def sklearn_reference(in_scores: np.ndarray, out_scores: np.ndarray) -> dict[str, float]:
    scores = np.concatenate([in_scores, out_scores])
    is_in = np.r_[np.ones(len(in_scores)), np.zeros(len(out_scores))]
    fpr, tpr, _ = sk.roc_curve(is_in, scores, drop_intermediate=False)
    return {"auroc": sk.roc_auc_score(is_in, scores), "aupr_in": sk.average_precision_score(is_in, scores),
            "aupr_out": sk.average_precision_score(1 - is_in, -scores),
            "fpr95": fpr[np.searchsorted(tpr, 0.95, side="left")]}


def assert_matches_sklearn(in_scores: np.ndarray, out_scores: np.ndarray) -> None:
    ours = ood_metrics(in_scores, out_scores)
    for name, expected in sklearn_reference(in_scores, out_scores).items():
        assert getattr(ours, name) == pytest.approx(expected, abs=1e-12), name


@pytest.mark.parametrize("seed", range(5))
def test_equal_to_sklearn_on_random_scores_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    in_scores = rng.normal(1.0, 1.0, 300).round(1)  # rounding: many ties, within and across sets
    out_scores = rng.normal(0.0, 1.0, 200).round(1)
    assert len(np.unique(np.r_[in_scores, out_scores])) < 100
    assert_matches_sklearn(in_scores, out_scores)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(-4, 4), min_size=1, max_size=40), st.lists(st.integers(-4, 4), min_size=1, max_size=40))
def test_equal_to_sklearn_on_any_small_integer_scores(in_scores: list[int], out_scores: list[int]) -> None:
    assert_matches_sklearn(np.array(in_scores, float), np.array(out_scores, float))


def test_closed_form_cases() -> None:
    perfect = ood_metrics([3.0, 4.0, 5.0], [0.0, 1.0])
    assert (perfect.auroc, perfect.aupr_in, perfect.aupr_out, perfect.fpr95) == (1.0, 1.0, 1.0, 0.0)
    reversed_ = ood_metrics([0.0, 1.0], [3.0, 4.0])
    assert reversed_.auroc == 0.0 and reversed_.fpr95 == 1.0
    assert auroc([1.0, 1.0], [1.0, 1.0]) == 0.5  # all tied: chance
    # 20 in-distribution scores 1..20, out-of-distribution 0.5 and 2.5: 95 % TPR keeps scores >= 2,
    # which accepts 2.5 only
    assert fpr_at_tpr(np.arange(1.0, 21.0), np.array([0.5, 2.5])) == 0.5
    fpr, tpr = roc_points([2.0, 1.0], [0.0])
    assert fpr.tolist() == [0.0, 0.0, 0.0, 1.0] and tpr.tolist() == [0.0, 0.5, 1.0, 1.0]


def test_metrics_do_not_depend_on_order_or_a_monotone_transform() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(1, 1, 50), rng.normal(0, 1, 60)
    base = ood_metrics(a, b)
    assert ood_metrics(rng.permutation(a), rng.permutation(b)) == base
    assert ood_metrics(np.exp(a), np.exp(b)).auroc == pytest.approx(base.auroc)


@pytest.mark.parametrize("in_scores, out_scores, message", [
    ([], [1.0], "in-distribution scores is empty"),
    ([1.0], [], "out-of-distribution scores is empty"),
    ([1.0, float("nan")], [0.0], "non-finite"),
    ([1.0], [float("inf")], "non-finite"),
    ([[1.0, 2.0]], [0.0], "1-D"),
])
def test_bad_input_is_one_line(in_scores, out_scores, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        ood_metrics(in_scores, out_scores)
    assert "\n" not in str(error.value)


def test_bad_level_is_one_line() -> None:
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        fpr_at_tpr([1.0], [0.0], level=0.0)
