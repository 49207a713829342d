"""Partitions: every example in exactly one share, IID sizes, Dirichlet label skew, natural groups
(the source column of labelled sentences), and one-line refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tformer.federated.partition import by_groups, dirichlet, iid, parse_partition, partition
from tformer.training.recipe import prepare, recipe_from_dict


def assert_exact_cover(shares: list[np.ndarray], n: int) -> None:
    every = np.concatenate(shares)
    assert len(every) == n and np.array_equal(np.sort(every), np.arange(n))  # each example exactly once


def test_iid_sizes_and_cover():
    shares = iid(103, 10, seed=0)
    assert_exact_cover(shares, 103)
    assert sorted(len(s) for s in shares) == [10] * 7 + [11] * 3  # near-equal: 103 = 7 x 10 + 3 x 11
    assert all(np.array_equal(a, b) for a, b in zip(shares, iid(103, 10, seed=0)))  # a pure function
    assert not all(np.array_equal(a, b) for a, b in zip(shares, iid(103, 10, seed=1)))


def test_dirichlet_shares_follow_alpha():
    labels = np.repeat(np.arange(10), 300)  # 3,000 examples, 10 balanced classes
    for alpha in (0.1, 1000.0):
        shares = dirichlet(labels, 10, alpha, seed=0)
        assert_exact_cover(shares, len(labels))
        # the largest class share of each client: ~0.1 when nearly IID, most of it when alpha is small
        top = [np.bincount(labels[s], minlength=10).max() / len(s) for s in shares]
        if alpha == 1000.0:
            assert max(top) < 0.2
        else:
            assert np.median(top) > 0.3  # measured 0.49 at seed 0; IID gives ~0.1


def test_dirichlet_by_hand_for_two_classes():
    """Class c's examples go to client k in the proportions the seeded Dirichlet draw gives."""
    labels = np.array([0] * 50 + [1] * 50)
    shares = dirichlet(labels, 2, 0.5, seed=3)
    rng = np.random.default_rng([3, 1])
    for c in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == c))
        cut = int(np.round(rng.dirichlet([0.5, 0.5])[0] * 50))
        assert set(members[:cut]) <= set(shares[0]) and set(members[cut:]) <= set(shares[1])


def test_groups_whole_and_balanced():
    groups = np.array(["imdb"] * 5 + ["amazon"] * 7 + ["yelp"] * 6 + ["x"] * 1)
    shares = by_groups(groups, 3, "source")
    assert_exact_cover(shares, len(groups))
    assert sorted(len(s) for s in shares) == [6, 6, 7]  # amazon | yelp | imdb + x
    assert all(len(set(groups[s])) >= 1 for s in shares)
    assert {frozenset(groups[s]) for s in shares} == {frozenset({"amazon"}), frozenset({"yelp"}),
                                                      frozenset({"imdb", "x"})}


@pytest.mark.parametrize("text, needle", [("dirichlet:0", "alpha must be > 0"), ("dirichlet:-1", "alpha must be > 0"),
                                          ("dirichlet:abc", "needs a number"), ("random", "is not a partition"),
                                          ("iid:3", "is not a partition")])
def test_bad_partition_specs(text, needle, one_line_error):
    assert needle in one_line_error(lambda: parse_partition(text))


def test_bad_sizes(one_line_error):
    assert "use --clients <= 5" in one_line_error(lambda: iid(5, 6, seed=0))
    assert "3 groups" in one_line_error(lambda: by_groups(np.array(list("aabbc")), 4, "source"))
    assert parse_partition("groups").column == "source" and parse_partition("dirichlet:0.5").alpha == 0.5


def sentences(tmp_path: Path) -> Path:
    path = tmp_path / "s.tsv"
    rows = [f"{i % 2}\t{['amazon', 'imdb', 'yelp'][i % 3]}\tsentence number {i} is {'good' if i % 2 else 'bad'}"
            for i in range(60)]
    path.write_text("label\tsource\ttext\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def text_task(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("groups")
    recipe = recipe_from_dict({"task": "classification", "model": {"preset": "bert-tiny", "d_model": 16, "n_layers": 1,
                               "n_heads": 2, "context_length": 32},
                               "tokenizer": {"kind": "bpe", "vocab_size": 280,
                                             "special_tokens": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]},
                               "data": {"source": str(sentences(tmp_path)), "val_fraction": 0.2},
                               "training": {"batch_size": 4}, "run_dir": str(tmp_path / "run")})
    return prepare(recipe).task


def test_text_task_groups_by_source_column(text_task):
    task = text_task
    labels, groups = task.example_labels(), task.example_groups("source")
    assert len(labels) == len(groups) == 48 and set(groups) == {"amazon", "imdb", "yelp"}
    shares = partition(task, parse_partition("groups"), 3, seed=0)
    assert [len(set(groups[s])) for s in shares] == [1, 1, 1]  # one source per client
    kept = task.keep_training(shares[0])
    assert len(kept.train_rows) == len(shares[0]) and np.array_equal(kept.example_labels(), labels[shares[0]])
    assert set(kept.example_groups("source")) == set(groups[shares[0]])
    batch = kept.train_batch(0, 0, 1)  # batches come from the share only
    share_rows = {tuple(task.train_rows[i].tolist()) for i in shares[0]}
    for row, mask in zip(batch["ids"], batch["attention_mask"]):
        assert tuple(row[:int(mask.sum())].tolist()) in share_rows
    assert len(task.val_rows) == len(kept.val_rows)  # validation stays whole


def test_unpartitionable_and_groupless(text_task, one_line_error):
    class LanguageModelling:
        name = "causal_lm"
    assert "cannot be partitioned" in one_line_error(lambda: partition(LanguageModelling(), parse_partition("iid"), 2, 0))

    class Images:
        name = "image_classification"

        def example_labels(self):
            return np.zeros(4)

        def keep_training(self, index):
            return self
    assert "no natural groups" in one_line_error(lambda: partition(Images(), parse_partition("groups"), 2, 0))
    message = one_line_error(lambda: text_task.example_groups("site"))
    assert "'site'" in message
