"""Every shipped recipe loads; each trains 2 steps at a tiny size on local data (the recipe's own
task, preset, tokenizer and settings, only sizes and sources shrunk), comes back through
`open_run` with the capabilities its task promises, and predicts through the pipeline and
`tformer predict`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tformer.cli import main
from tformer.config import load_mapping
from tformer.inference.pipeline import pipeline
from tformer.models import build_model, model_record
from tformer.models.registry import preset_family
from tformer.runs import checkpoint, open_run
from tformer.training.recipe import load_recipe, recipe_from_dict, train_recipe
from tformer.training.tasks import TASK_MODULES

RECIPES = sorted((Path(__file__).resolve().parents[2] / "src" / "tformer" / "recipes").glob("*.yaml"))
WORDS = "the king queen good bad love war lord my speaks of and fine dull great poor film".split()

TINY_MODEL = {  # by family: one layer, 16 dimensions
    "gpt": dict(n_layers=1, d_model=16, n_heads=2, context_length=16),
    "bert": dict(n_layers=1, d_model=16, n_heads=2, context_length=32),
    "seq2seq": dict(n_encoder_layers=1, n_decoder_layers=1, d_model=16, n_heads=2, context_length=32),
    "transformer_xl": dict(n_layers=1, d_model=16, n_heads=2, d_ff=32, seg_len=8, mem_len=8, eval_mem_len=16),
    "vit": dict(n_layers=1, d_model=16, n_heads=2, patch_size=4, d_ff=32),
    "image_gen": dict(n_encoder_layers=1, n_decoder_layers=1, d_model=16, n_heads=2),
}
CAPABILITIES = {  # what each task's trained model can do
    "causal_lm": ["causal_lm"], "segment_lm": ["memory_lm"], "masked_lm": [],
    "classification": ["text_classifier"], "seq2seq": ["conditional_decoder"],
    "image_classification": ["image_classifier"], "image_generation": ["conditional_decoder", "image_sampler"],
}


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> dict[str, Path]:
    root, rng = tmp_path_factory.mktemp("recipe-data"), random.Random(0)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))  # noqa: E731
    (root / "corpus.txt").write_text("\n".join(sentence() for _ in range(400)) + "\n", encoding="utf-8")
    rows = [f"{'pos' if i % 2 else 'neg'}\t{sentence()}" for i in range(60)]
    (root / "labelled.tsv").write_text("label\ttext\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return {"text": root / "corpus.txt", "labelled": root / "labelled.tsv", "root": root}


def pairs_file(root: Path, src: str, tgt: str) -> Path:
    rng = random.Random(1)
    lines = [f"{' '.join(rng.choice(WORDS) for _ in range(4))}\t{' '.join(rng.choice(WORDS) for _ in range(5))}"
             for _ in range(40)]
    path = root / f"pairs-{src}-{tgt}.tsv"
    path.write_text(f"{src}\t{tgt}\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny(path: Path, data: dict[str, Path], run_dir: Path, init_from: Path | None = None) -> dict:
    """The shipped recipe with sizes and sources shrunk (and init_from pointed at a tiny run)."""
    recipe = load_mapping(path)
    task, model = recipe["task"], dict(recipe["model"])
    if model.get("init_from"):
        model["init_from"] = str(init_from)  # sizes come from that run
        recipe["tokenizer"] = {"kind": "file", "path": str(init_from / "tokenizer.json")}
    else:
        model.update(TINY_MODEL[preset_family(model["preset"])])
    source = {
        "causal_lm": {"source": str(data["text"])}, "segment_lm": {"source": str(data["text"])},
        "masked_lm": {"sources": [str(data["text"]), str(data["labelled"])], "max_length": 16},
        "classification": {"source": str(data["labelled"]), "fold": None, "val_fraction": 0.25},
        "image_classification": {"source": "digits"}, "image_generation": {"source": "digits",
                                                                           "judge_samples_per_class": 2,
                                                                           "samples_per_class": 1},
    }.get(task, {})
    if task == "seq2seq":
        d = recipe["data"]
        source = {"source": str(pairs_file(data["root"], d["src_column"], d["tgt_column"])), "valid_pairs": 4,
                  "test_pairs": 4, "tokens_per_batch": 256, "n_samples": 1}
    if recipe.get("tokenizer", {}).get("kind") == "bpe":
        recipe["tokenizer"] = {**recipe["tokenizer"], "vocab_size": 300}
    recipe.update(model=model, data={**recipe.get("data", {}), **source}, run_dir=str(run_dir),
                  training={**recipe.get("training", {}), "max_steps": 2, "batch_size": 4, "eval_every": 2,
                            "eval_batches": 1, "log_every": 1, "device": "cpu", "grad_accum": 1,
                            "warmup_steps": 1},
                  sample={"tokens": 4, "prompt": "the"} if task in ("causal_lm", "segment_lm") else {})
    return recipe


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_loads(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.task in TASK_MODULES
    preset_family(recipe.model["preset"])


@pytest.fixture(scope="module")
def trained(local_data, tmp_path_factory) -> dict[str, Path]:
    """Every shipped recipe trained 2 steps (masked-LM first: the classifiers start from it)."""
    root, runs = tmp_path_factory.mktemp("runs"), {}
    for path in sorted(RECIPES, key=lambda p: "init_from" in p.read_text()):
        recipe = tiny(path, local_data, root / path.stem, init_from=runs.get("bert-mlm-shakespeare"))
        result = train_recipe(recipe_from_dict(recipe, where=path.name))
        assert result.step == 2 and result.best_val_loss is not None and np.isfinite(result.best_val_loss)
        runs[path.stem] = root / path.stem
    return runs


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_each_recipe_trains_and_opens_with_its_capabilities(path: Path, trained: dict) -> None:
    run = open_run(trained[path.stem])
    assert run.capabilities == CAPABILITIES[load_mapping(path)["task"]]
    assert run.recipe["task"] == load_mapping(path)["task"]
    metrics = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["tokens_per_s"] > 0 and metrics[0]["examples_per_s"] > 0


def digit_png(tmp_path: Path) -> Path:
    from sklearn.datasets import load_digits

    image = (load_digits().images[7] * 16).clip(0, 255).astype(np.uint8)  # a 7, 8 x 8
    Image.fromarray(image).resize((32, 32)).save(tmp_path / "seven.png")  # another size: resized
    return tmp_path / "seven.png"


def test_pipeline_does_what_each_model_can(trained: dict, tmp_path: Path) -> None:
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
    prediction = vit.classify([str(digit_png(tmp_path))])[0]
    assert prediction.label in vit.model.labels and prediction.input.endswith("seven.png")
    images = pipeline(trained["image-gen-digits"]).draw(["seven", "one"], 2, seed=0)
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
    with pytest.raises(ValueError, match="nothing to predict"):
        pipeline(trained["bert-mlm-shakespeare"]).predict(["the king"])
    with pytest.raises(ValueError, match="cannot translate; it can generate"):
        gpt.translate(["the king"])


def test_tformer_predict_on_every_kind_of_run(trained: dict, tmp_path: Path, capsys) -> None:
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("the film was fine\n\ndull war\n", encoding="utf-8")
    assert main(["predict", str(trained["bert-sentiment"]), "good film", "--file", str(sentences), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["input"] for r in rows] == ["good film", "the film was fine", "dull war"]
    assert all(set(r["probabilities"]) == {"neg", "pos"} for r in rows)
    assert main(["predict", str(trained["vit-fashion-mnist"]), str(digit_png(tmp_path))]) == 0
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
def test_bad_input_is_one_clear_line(args: list, message: str, trained: dict, tmp_path: Path, capsys) -> None:
    import re

    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    unknown = tmp_path / "unknown"  # a well-formed checkpoint of a family this version lacks
    model = build_model("gpt-nano", vocab_size=8)
    checkpoint.save(unknown / "checkpoints" / "best", model, progress={"step": 0},
                    config={**model_record(model.config), "model_family": "alien"})
    names = {"bert": trained["bert-sentiment"], "vit": trained["vit-mnist"], "mlm": trained["bert-mlm-shakespeare"],
             "png": digit_png(tmp_path), "empty": tmp_path / "empty.txt", "unknown": unknown,
             "missing": tmp_path / "nowhere"}
    assert main(["predict", *[a.format(**names) for a in args]]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
