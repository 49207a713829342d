"""Every shipped recipe loads; each trains 2 steps at a tiny size on local data (the recipe's own
task, preset, tokenizer and settings, only sizes and sources shrunk), comes back through
`open_run` with the capabilities its task promises, and predicts through the pipeline and
`tformer predict`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tformer.cli import main
from tformer.config import load_mapping
from tformer.inference.pipeline import pipeline
from tformer.models import build_model, model_record
from tformer.models.registry import preset_family
from tformer.runs import checkpoint, open_run
from tformer.training.recipe import load_recipe
from tformer.training.tasks import TASK_MODULES

RECIPES = sorted((Path(__file__).resolve().parents[2] / "src" / "tformer" / "recipes").glob("*.yaml"))

CAPABILITIES = {  # what each task's trained model can do
    "causal_lm": ["causal_lm"], "segment_lm": ["memory_lm"], "masked_lm": [],
    "classification": ["text_classifier"], "seq2seq": ["conditional_decoder"],
    "image_classification": ["image_classifier"], "image_generation": ["conditional_decoder", "image_sampler"],
}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_loads(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.task in TASK_MODULES
    preset_family(recipe.model["preset"])


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_each_recipe_trains_and_opens_with_its_capabilities(path: Path, trained: dict) -> None:
    run = open_run(trained[path.stem])
    assert run.capabilities == CAPABILITIES[load_mapping(path)["task"]]
    assert run.recipe["task"] == load_mapping(path)["task"]
    metrics = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["tokens_per_s"] > 0 and metrics[0]["examples_per_s"] > 0


def test_pipeline_does_what_each_model_can(trained: dict, seven_png: Path) -> None:
    gpt = pipeline(trained["gpt-shakespeare-char"])
    assert gpt.verbs == ["generate"] and isinstance(gpt.generate("the", 5, seed=0), str)
    assert gpt.generate("the", 5, seed=3) == gpt.generate("the", 5, seed=3)
    assert pipeline(trained["transformer-xl-shakespeare"]).verbs == ["generate"]
    assert len(pipeline(trained["nmt-en-es"]).translate(["the king", "my lord"])) == 2
    for name in ("bert-sentiment", "bert-sentiment-minilm"):
        predictions = pipeline(trained[name]).classify(["the film was fine", "dull war"])
        assert {p.label for p in predictions} <= {"neg", "pos"}
        assert all(sum(p.probabilities.values()) == pytest.approx(1.0) for p in predictions)
    vit = pipeline(trained["vit-mnist"])
    prediction = vit.classify([str(seven_png)])[0]
    assert prediction.label in vit.model.labels and prediction.input.endswith("seven.png")
    images = pipeline(trained["image-gen-digits"]).draw(["seven", "one"], 2, seed=0)
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
    with pytest.raises(ValueError, match="nothing to predict"):
        pipeline(trained["bert-mlm-shakespeare"]).predict(["the king"])
    with pytest.raises(ValueError, match="cannot translate; it can generate"):
        gpt.translate(["the king"])


def test_tformer_predict_on_every_kind_of_run(trained: dict, seven_png: Path, tmp_path: Path, capsys) -> None:
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("the film was fine\n\ndull war\n", encoding="utf-8")
    assert main(["predict", str(trained["bert-sentiment"]), "good film", "--file", str(sentences), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["input"] for r in rows] == ["good film", "the film was fine", "dull war"]
    assert main(["predict", str(trained["bert-sentiment"]), "good film", "--json", "--precision", "bf16"]) == 0
    fast = json.loads(capsys.readouterr().out.splitlines()[0])
    assert fast["input"] == "good film" and set(fast["probabilities"]) == set(rows[0]["probabilities"])
    assert all(set(r["probabilities"]) == {"neg", "pos"} for r in rows)
    assert main(["predict", str(trained["vit-fashion-mnist"]), str(seven_png)]) == 0
    assert capsys.readouterr().out.endswith("seven.png\n")
    assert main(["predict", str(trained["gpt-shakespeare-char"]), "the king", "--max-new-tokens", "4",
                 "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("the king")
    assert main(["predict", str(trained["nmt-de-en"]), "the king"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    grid = tmp_path / "grid.png"
    assert main(["predict", str(trained["image-gen-digits"]), "seven", "--n", "2", "--out", str(grid)]) == 0
    assert grid.is_file() and "2 images" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["{bert}", "{png}"], "is an image file, but .* classifies text"),
    (["{vit}", "a sentence"], "'a sentence' is not an image file; .* classifies images"),
    (["{bert}", "--file", "{empty}"], "holds no inputs"),
    (["{bert}", "--file", "{png}"], "is not UTF-8 text"),
    (["{mlm}", "the king"], "holds a model with nothing to predict .* model.init_from"),
    (["{unknown}", "x"], "does not describe a model tformer knows .*model_family='alien'"),
    (["{missing}", "x"], "does not exist"),
])
def test_bad_input_is_one_clear_line(args: list, message: str, trained: dict, seven_png: Path, tmp_path: Path,
                                     capsys) -> None:
    import re

    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    unknown = tmp_path / "unknown"  # a well-formed checkpoint of a family this version lacks
    model = build_model("gpt-nano", vocab_size=8)
    checkpoint.save(unknown / "checkpoints" / "best", model, progress={"step": 0},
                    config={**model_record(model.config), "model_family": "alien"})
    names = {"bert": trained["bert-sentiment"], "vit": trained["vit-mnist"], "mlm": trained["bert-mlm-shakespeare"],
             "png": seven_png, "empty": tmp_path / "empty.txt", "unknown": unknown,
             "missing": tmp_path / "nowhere"}
    assert main(["predict", *[a.format(**names) for a in args]]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_pipeline_in_bf16_does_the_same_on_every_kind_of_run(trained: dict, seven_png: Path) -> None:
    """--precision bf16: weights cast once; every verb runs and answers like fp32 (labels, tokens
    drawn from the same vocabulary, images of the same shape)."""
    for name in ("bert-sentiment", "vit-mnist"):
        inputs = [str(seven_png)] if name == "vit-mnist" else ["the film was fine", "dull war"]
        fp32, bf16 = pipeline(trained[name]).classify(inputs), pipeline(trained[name], precision="bf16").classify(inputs)
        for a, b in zip(fp32, bf16):
            assert set(a.probabilities) == set(b.probabilities)
            for label, p in a.probabilities.items():
                assert abs(p - b.probabilities[label]) < 0.05
    fast = pipeline(trained["gpt-shakespeare-char"], precision="bf16")
    assert next(fast.model.parameters()).dtype == torch.bfloat16
    assert isinstance(fast.generate("the king", 8, seed=0), str)
    assert len(pipeline(trained["nmt-en-es"], precision="bf16").translate(["the king"])) == 1
    images = pipeline(trained["image-gen-digits"], precision="bf16").draw(["seven"], 2, seed=0)
    assert images.shape[0] == 2 and images.dtype == np.uint8
    with pytest.raises(ValueError, match="precision 'fp8' is not one of fp32, bf16"):
        pipeline(trained["vit-mnist"], precision="fp8")
