"""`tformer attack` on the session's tiny recipe runs: your inputs (images saved, sentences marked)
and held-out data (robust accuracy, curves, examples) for image and text classifiers; bad input
is one line before anything is written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from tformer.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text(encoding="utf-8"))


def test_attacking_image_inputs_saves_each_adversarial_image(trained, seven_png, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["attack", str(trained["vit-mnist"]), str(seven_png), str(seven_png), "--epsilons", "0.3",
                 "--steps", "3", "--out", str(out)]) == 0
    rows = summary(out)["inputs"]
    assert len(rows) == 2 and "seven.png" in capsys.readouterr().out
    for row in rows:
        assert row["linf"] <= 0.3 + 1e-6 and Path(row["png"]).is_file()
        with Image.open(row["png"]) as image:
            assert image.size == (8, 8)  # the model's size, what it was attacked at
    assert (out / "examples.png").is_file() and (out / ".tformer-attacks").is_file()


def test_attacking_held_out_images_gives_curves(trained, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["attack", str(trained["vit-mnist"]), "--data", "digits", "--limit", "12", "--epsilons", "0,0.2",
                 "--steps", "2", "--out", str(out)]) == 0
    result = summary(out)
    assert result["examples"] == 12 and set(result["curves"]) == {"pgd", "gaussian noise", "blur", "occlusion"}
    pgd = result["curves"]["pgd"]
    assert [row["level"] for row in pgd] == [0.0, 0.2] and pgd[1]["accuracy"] <= pgd[0]["accuracy"]
    assert (out / "curves.png").is_file() and (out / "examples.png").is_file()
    capsys.readouterr()


def test_attacking_sentences_marks_the_changed_words(trained, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["attack", str(trained["bert-sentiment"]), "the film was good", "dull war", "--max-share", "1",
                 "--method", "typo", "--out", str(out)]) == 0
    rows = summary(out)["inputs"]
    assert [r["text"] for r in rows] == ["the film was good", "dull war"]
    for row in rows:
        assert row["status"] in ("succeeded", "failed", "skipped") and row["queries"] <= 300
        assert (row["words_changed"] > 0) == ("~~" in row["marked"])
    assert (out / "attacked.md").read_text(encoding="utf-8").count("\n") == 2
    capsys.readouterr()


def test_attacking_held_out_sentences(trained, local_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["attack", str(trained["bert-sentiment"]), "--data", str(local_data["labelled"]), "--limit", "6",
                 "--max-queries", "20", "--typo-rates", "0,0.5", "--out", str(out)]) == 0
    result = summary(out)
    assert result["examples"] == 6 and result["typo_sweep"]["rates"] == [0.0, 0.5]
    assert 0 <= result["accuracy_under_attack"] <= result["clean_accuracy"] <= 1
    assert all(r["queries"] <= 20 for r in result["examples_attacked"])
    assert (out / "curves.png").is_file()
    capsys.readouterr()


@pytest.mark.parametrize("args, message", [
    (["{vit}", "{png}", "--data", "digits"], "give inputs or --data, not both"),
    (["{vit}"], "nothing to attack"),
    (["{vit}", "{png}", "--method", "typo"], "--method typo does not apply to this run's image classifier"),
    (["{bert}", "good", "--method", "pgd"], "--method pgd does not apply to this run's text classifier"),
    (["{vit}", "{png}", "--epsilons", "-0.1"], "expected finite numbers >= 0"),
    (["{vit}", "{png}", "--epsilons", "nan"], "expected finite numbers >= 0"),
    (["{vit}", "{png}", "--epsilons", "0.1,0.2"], "one --epsilons value"),
    (["{vit}", "{png}", "--steps", "0"], "0 is not a whole number >= 1"),
    (["{bert}", "good", "--max-share", "0"], "--max-share must be in \\(0, 1\\]"),
    (["{bert}", "good", "--meaning-guard", "nan"], "--meaning-guard is a total-variation distance in \\[0, 1\\]"),
    (["{bert}", "good", "--label", "neutral"], "--label 'neutral' is not one of the model's classes"),
    (["{gpt}", "the king"], "is not a classifier"),
    (["{vit}", "{png}", "--out", "{foreign}"], "holds files tformer attack did not write"),
    (["{bert}", "--data", "{corpus}"], "not labelled with the model's classes"),
])
def test_bad_input_is_one_line(args, message, trained, local_data, seven_png, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine", encoding="utf-8")
    names = {"vit": trained["vit-mnist"], "bert": trained["bert-sentiment"], "gpt": trained["gpt-shakespeare-char"],
             "png": seven_png, "foreign": foreign, "corpus": local_data["text"]}
    before = sorted(foreign.rglob("*")) + sorted(Path(names["vit"]).rglob("*"))
    assert main(["attack", *[a.format(**names) for a in args]]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert sorted(foreign.rglob("*")) + sorted(Path(names["vit"]).rglob("*")) == before
    assert (foreign / "notes.txt").read_text(encoding="utf-8") == "mine"
