"""The one place a model is built: preset + overrides + the data's fields; init_from works for any
family (matching weights copied, a changed task head left fresh); refusals name the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tformer.config import ConfigError
from tformer.runs import open_run
from tformer.training.build import ModelSpec, build
from tformer.training.recipe import prepare, recipe_from_dict, train_recipe


def gpt_recipe(tmp_path: Path, run: str, **model) -> dict:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 50, encoding="utf-8")
    return {"task": "causal_lm", "model": {"preset": "gpt-nano", "n_layers": 1, "d_model": 16, "n_heads": 2,
                                           "context_length": 16, **model},
            "data": {"source": str(corpus), "cache_dir": str(tmp_path / "cache")},
            "training": {"max_steps": 2, "batch_size": 4, "eval_every": 2, "eval_batches": 1, "device": "cpu"},
            "sample": {"tokens": 2}, "run_dir": str(tmp_path / run)}


def vit_recipe(tmp_path: Path, run: str, source: str = "digits", **model) -> dict:
    return {"task": "image_classification",
            "model": {"preset": "vit-digits", "n_layers": 1, "d_model": 16, "n_heads": 2, **model},
            "data": {"source": source}, "run_dir": str(tmp_path / run),
            "training": {"max_steps": 2, "batch_size": 8, "eval_every": 2, "device": "cpu"}}


def test_the_data_decides_its_fields_and_a_clashing_override_is_replaced(tmp_path: Path, caplog) -> None:
    prepared = prepare(recipe_from_dict(gpt_recipe(tmp_path, "a", vocab_size=999)))
    assert prepared.model.config.vocab_size == prepared.tokenizer.vocab_size != 999
    assert "model.vocab_size=999 is replaced" in caplog.text
    assert prepared.record["model_family"] == "gpt" and prepared.record["has_tokenizer"] is True


def test_init_from_a_gpt_run_starts_from_its_weights(tmp_path: Path) -> None:
    train_recipe(recipe_from_dict(gpt_recipe(tmp_path, "source")))
    tuned = gpt_recipe(tmp_path, "tuned", init_from=str(tmp_path / "source"), dropout=0.1)
    tuned["tokenizer"] = {"kind": "file", "path": str(tmp_path / "source" / "tokenizer.json")}
    prepared = prepare(recipe_from_dict(tuned))
    source = open_run(tmp_path / "source").model.state_dict()
    assert all(torch.equal(source[k], v) for k, v in prepared.model.state_dict().items())
    assert prepared.model.config.dropout == 0.1 and prepared.record["init_from"] == str(tmp_path / "source")


def test_init_from_a_quantized_run_is_refused_naming_the_float_run(tmp_path: Path) -> None:
    from tformer.cli import main

    train_recipe(recipe_from_dict(gpt_recipe(tmp_path, "source")))
    assert main(["quantize", str(tmp_path / "source"), "--out", str(tmp_path / "q")]) == 0
    tuned = gpt_recipe(tmp_path, "tuned", init_from=str(tmp_path / "q"))
    tuned["tokenizer"] = {"kind": "file", "path": str(tmp_path / "q" / "tokenizer.json")}
    with pytest.raises(ConfigError, match="is quantized: its int8 linears cannot be trained") as e:
        prepare(recipe_from_dict(tuned))
    assert "source" in str(e.value) and "\n" not in str(e.value)


def test_init_from_with_other_labels_keeps_the_encoder_and_starts_a_fresh_head(tmp_path: Path) -> None:
    train_recipe(recipe_from_dict(vit_recipe(tmp_path, "digits")))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "three.npz", images=rng.integers(0, 17, (30, 8, 8), dtype=np.uint8),
             labels=np.arange(30) % 3, label_names=np.array(["a", "b", "c"]))
    spec = vit_recipe(tmp_path, "three", source=str(tmp_path / "three.npz"), init_from=str(tmp_path / "digits"))
    model = prepare(recipe_from_dict(spec)).model
    source = open_run(tmp_path / "digits").model.state_dict()
    for name, tensor in model.state_dict().items():
        if name.startswith("head."):
            assert tensor.shape[0] == 3  # three classes: fresh
        else:
            assert torch.equal(tensor, source[name]), name
    assert model.labels == ("a", "b", "c")


@pytest.mark.parametrize("spec, fields, match", [
    (ModelSpec("gpt-nano"), {"head": "sequence", "labels": ("a", "b")},
     r"task t sets the model's head, labels, which a gpt \(preset 'gpt-nano'\) does not have; presets that "
     r"fit: .*bert-tiny"),
    (ModelSpec("gpt-nano"), {"vocab_size": 8}, None),
    (ModelSpec("gpt-nano", freeze=("embeddings",)), {"vocab_size": 8}, "'embeddings' names no parameters"),
    (ModelSpec("gpt-nano", overrides={"n_layerz": 2}), {}, "n_layerz"),
    (ModelSpec("gtp-nano"), {}, "unknown model or preset 'gtp-nano'.*gpt-nano"),
])
def test_build_refusals_name_the_fix(spec: ModelSpec, fields: dict, match: str | None) -> None:
    if match is None:
        model, record = build(spec, fields, seed=0, task="t")
        assert record == {"model_family": "gpt", "model_config": record["model_config"]}
        return
    with pytest.raises(ConfigError, match=match):
        build(spec, fields, seed=0, task="t")


def test_the_same_seed_builds_the_same_weights() -> None:
    a, _ = build(ModelSpec("gpt-nano"), {"vocab_size": 8}, seed=3)
    b, _ = build(ModelSpec("gpt-nano"), {"vocab_size": 8}, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_a_run_saved_before_a_stricter_training_check_can_still_be_evaluated(tmp_path: Path) -> None:
    from tformer.training.recipe import saved_for_evaluation

    saved = recipe_from_dict(gpt_recipe(tmp_path, "old")).to_dict()
    saved["training"].update(max_steps=2, warmup_steps=100)  # as a version without the check saved it
    with pytest.raises(ConfigError, match="longer than the run"):
        recipe_from_dict(saved)
    assert recipe_from_dict(saved_for_evaluation(saved)).training.warmup_steps == 2
