"""`tformer ood` on the session's tiny image and text classifiers: the run's own split is scored,
the written metrics are scikit-learn's on the written scores, the folder rule holds, and bad input
is one line (exit 2) with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.metrics import average_precision_score, roc_auc_score

from tformer.analysis.ood import MARKER
from tformer.cli import main
from tformer.data.images import stratified_holdout
from tformer.data.labelled import load_labelled, train_val_split

pytestmark = pytest.mark.usefixtures("one_thread")


def image_folder(root: Path, n: int, shape: tuple[int, ...], seed: int = 0) -> Path:
    """A folder of images directly (no class sub-folders), random pixels."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / f"{i}.png")
    return root


def check_written(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    scores = np.load(out / "scores.npz")
    for name, m in summary["metrics"].items():
        truth = np.r_[np.ones(m["n_in"]), np.zeros(m["n_out"])]
        both = np.r_[scores[f"in_{name}"], scores[f"out_{name}"]]
        assert m["auroc"] == pytest.approx(roc_auc_score(truth, both))
        assert m["aupr_out"] == pytest.approx(average_precision_score(1 - truth, -both))
    for png in ("scores.png", "roc.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / MARKER).is_file() and (out / "ood-statistics.safetensors").is_file()
    return summary


def test_image_run_scores_its_own_held_out_share_against_an_image_folder(trained, tmp_path, capsys):
    noise = image_folder(tmp_path / "noise", 30, (8, 8))
    out = tmp_path / "out"
    assert main(["ood", str(trained["vit-mnist"]), "--in-data", "digits", "--out-data", str(noise),
                 "--out", str(out), "--k", "5"]) == 0
    printed = capsys.readouterr().out
    assert "mahalanobis" in printed and "AUROC" in printed
    summary = check_written(out)
    _, held = stratified_holdout(load_digits().target, 0.1, 0)  # the recipe's test share (digits: no test split)
    assert summary["in"]["examples"] == len(held) and summary["out"]["examples"] == 30
    assert summary["fit"]["examples"] == 1797 - len(held) and summary["fit"]["labels"] == "the data's"
    assert set(summary["metrics"]) == {"msp", "energy", "mahalanobis", "knn"} and summary["k"] == 5
    # the same folder again (tformer's own), with a limit
    assert main(["ood", str(trained["vit-mnist"]), "--in-data", "digits", "--out-data", str(noise),
                 "--out", str(out), "--limit", "12", "--fit-limit", "100"]) == 0
    summary = check_written(out)
    assert (summary["in"]["examples"], summary["out"]["examples"], summary["fit"]["examples"]) == (12, 12, 100)


def test_text_run_scores_its_validation_split_against_sentences(trained, local_data, tmp_path, capsys):
    lines = tmp_path / "other.txt"
    lines.write_text("ein ganz anderer Satz\n\nnoch ein Satz hier\nund ein dritter\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["ood", str(trained["bert-sentiment"]), "--in-data", str(local_data["labelled"]),
                 "--out-data", str(lines), "--out", str(out), "--k", "3"]) == 0
    summary = check_written(out)
    labels = load_labelled(local_data["labelled"]).labels
    _, val = train_val_split(labels, val_fraction=0.25, seed=0)  # the tiny recipe's split
    assert summary["in"]["examples"] == len(val) and summary["out"]["examples"] == 3  # blank line skipped
    assert "validation split" in summary["in"]["data"]


def test_a_users_folder_is_never_written(trained, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    noise = image_folder(tmp_path / "noise", 4, (8, 8))
    assert main(["ood", str(trained["vit-mnist"]), "--in-data", "digits", "--out-data", str(noise),
                 "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "holds files tformer ood did not write" in err and err.count("\n") == 1
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("which, extra, message", [
    ("vit-mnist", ["--out-data", "{rgb}"], r"\(H, W, C\) = \(32, 32, 3\) but the model takes \(8, 8, 1\)"),
    ("vit-mnist", ["--out-data", "{text}"], "not an .npz file"),
    ("gpt-shakespeare-char", ["--out-data", "{text}"], "needs a classifier"),
    ("bert-sentiment", ["--out-data", "{empty}"], "is empty"),
    ("vit-mnist", ["--out-data", "digits", "--temperature", "0"], "--temperature must be > 0"),
    ("vit-mnist", ["--out-data", "nowhere-data"], "neither a known dataset"),
])
def test_bad_input_is_one_line_and_writes_nothing(which, extra, message, trained, local_data, tmp_path, capsys):
    files = {"rgb": image_folder(tmp_path / "rgb", 3, (32, 32, 3)), "text": local_data["text"],
             "empty": tmp_path / "empty.txt"}
    files["empty"].write_text("\n\n")
    in_data = str(local_data["labelled"]) if which == "bert-sentiment" else "digits"
    out = tmp_path / "out"
    argv = ["ood", str(trained[which]), "--in-data", in_data, "--out", str(out),
            *[a.format(**files) for a in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert __import__("re").search(message, err), err
    assert not out.exists()
