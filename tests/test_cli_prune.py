"""`tformer prune` on the session's tiny runs: the table and summary.json, the pruned run opens,
predicts and evaluates through the CLI, and bad input is one line (exit 2) with nothing written."""

from __future__ import annotations

import json

import pytest

from tformer.cli import main
from tformer.runs import open_run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prune_prints_the_table_and_writes_a_run_that_predicts_and_evaluates(trained, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(trained["bert-sentiment"]), "--heads", "0.5", "--neurons", "0.5", "--out", str(out),
                 "--batches", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| blocks.0.attn | heads | 2 | 1 |" in printed and "parameters" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["importance"] == "gradient" and summary["batches"] >= 1
    assert {m["name"]: m["after"] for m in summary["modules"]}["blocks.0.attn"] == 1
    assert open_run(out).model.blocks[0].attn.n_heads == 1
    assert main(["predict", str(out), "a good film"]) == 0
    assert main(["evaluate", str(out)]) == 0


def test_prune_by_magnitude_globally(trained, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(trained["vit-mnist"]), "--neurons", "0.3", "--importance", "magnitude",
                 "--scope", "global", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scope"] == "global" and summary["batches"] == 0
    assert summary["parameters_after"] < summary["parameters_before"]


@pytest.mark.parametrize("args, message", [
    (["--heads", "1"], "[0, 1)"),
    (["--neurons", "-0.2"], "[0, 1)"),
])
def test_bad_input_is_one_line(trained, tmp_path, capsys, args, message):
    out = tmp_path / "pruned"
    assert main(["prune", str(trained["bert-sentiment"]), *args, "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and message in error and "\n" not in error
    assert not out.exists()


def test_a_folder_with_other_files_is_refused(trained, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    assert main(["prune", str(trained["bert-sentiment"]), "--heads", "0.5", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "notes.txt").read_text() == "keep"


def test_a_lora_run_is_refused(trained, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", str(trained["bert-sentiment-minilm-lora"]), "--heads", "0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "LoRA adapters" in err and "--merge" in err
    assert not out.exists()
