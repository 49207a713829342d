"""LoRA runs (the shipped bert-sentiment-minilm-lora recipe, trained 2 steps at a tiny size from
the tiny masked-LM run): only adapters and the head change in training; the run opens, resumes
exactly, merges into a plain run with the same logits, and its adapters saved alone give the same
model back on the base; bad input is one line."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tformer.compress.lora import ADAPTER_WEIGHTS, attach_adapters, merge_lora, save_adapters
from tformer.config import ConfigError
from tformer.models.edits import edits_of
from tformer.nn.lora import lora_layers
from tformer.runs import open_run
from tformer.training.recipe import recipe_from_dict, train_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = "bert-sentiment-minilm-lora"


def logits(run_path: Path) -> torch.Tensor:
    run = open_run(run_path)
    ids = torch.tensor([[2, 5, 7, 9, 3, 0], [2, 8, 4, 3, 0, 0]])
    with torch.no_grad():
        return run.model(ids, attention_mask=(ids != 0).long())


def test_lora_run_trains_only_adapters_and_head(trained: dict) -> None:
    run, base = open_run(trained[RUN]), open_run(trained["bert-mlm-shakespeare"])
    (edit,) = edits_of(run.model)
    assert edit["kind"] == "lora" and edit["r"] == 4 and edit["alpha"] == 8 and edit["targets"] is None
    assert len(lora_layers(run.model)) == 4 * run.model.config.n_layers
    theirs = base.model.state_dict()
    for name, tensor in run.model.state_dict().items():
        if name.startswith("head.") or "lora_" in name:
            continue
        assert torch.equal(tensor, theirs[name]), name  # the base stayed frozen
    assert any(layer.lora_B.abs().max() > 0 for layer in lora_layers(run.model).values())  # B moved from 0


def test_lora_run_resumes_exactly(trained: dict, tmp_path: Path) -> None:
    saved = open_run(trained[RUN]).recipe
    training = {**saved["training"], "schedule": "constant", "warmup_steps": 1, "eval_every": 2}

    def recipe(run_dir: Path, steps: int):
        return recipe_from_dict({**saved, "run_dir": str(run_dir), "training": {**training, "max_steps": steps}})

    train_recipe(recipe(tmp_path / "resumed", 2))
    assert train_recipe(recipe(tmp_path / "resumed", 4)).step == 4  # resumes from checkpoints/last
    train_recipe(recipe(tmp_path / "straight", 4))
    a = load_file(str(tmp_path / "resumed" / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_merge_gives_a_plain_run_with_the_same_logits(trained: dict, tmp_path: Path) -> None:
    merged = merge_lora(trained[RUN], tmp_path / "merged")
    run = open_run(merged)
    assert not lora_layers(run.model) and edits_of(run.model) == []
    assert "lora" not in run.recipe["model"]
    assert run.record["compressed_from"] == str(open_run(trained[RUN]).checkpoint.resolve())
    assert (logits(merged) - logits(trained[RUN])).abs().max() <= 1e-5
    assert run.capabilities == ["text_classifier"]


def test_adapters_saved_alone_rebuild_the_run_on_its_base(trained: dict, tmp_path: Path) -> None:
    folder = save_adapters(trained[RUN], tmp_path / "adapters")
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    assert tensors and all("lora_" in k or k.startswith("head.") for k in tensors)
    assert any(k.startswith("head.classifier") for k in tensors)
    run = open_run(trained[RUN])
    n_model = sum(t.numel() for t in run.model.state_dict().values())
    assert sum(t.numel() for t in tensors.values()) < n_model / 5
    again = attach_adapters(trained["bert-mlm-shakespeare"], folder, tmp_path / "again")
    assert torch.equal(logits(again), logits(trained[RUN]))
    record = open_run(again).record  # the LoRA run's keys (its recipe), the base as the source
    assert record["recipe"] == run.recipe and record["adapters_from"] == str(folder.resolve())
    assert record["compressed_from"] == str(open_run(trained["bert-mlm-shakespeare"]).checkpoint.resolve())
    # another BERT of the same shapes, another family: refused in one line, nothing written
    with pytest.raises(ValueError, match="not the ones the adapters .* were trained on"):
        attach_adapters(trained["bert-sentiment"], folder, tmp_path / "wrong")
    with pytest.raises(ValueError, match="were trained on a Bert, not a GPT"):
        attach_adapters(trained["gpt-shakespeare-char"], folder, tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()


def test_bad_input_is_one_line(trained: dict, tmp_path: Path, one_line_error) -> None:
    assert "has no LoRA adapters" in one_line_error(lambda: merge_lora(trained["bert-sentiment"], tmp_path / "a"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert "is not empty" in one_line_error(lambda: save_adapters(trained[RUN], tmp_path / "full"))
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
    assert "holds no tformer adapters" in one_line_error(
        lambda: attach_adapters(trained["bert-mlm-shakespeare"], tmp_path, tmp_path / "b"))
    saved = open_run(trained[RUN]).recipe
    for lora, message in [({"targets": ["qkv"]}, "model.lora: LoRA target 'qkv' matches no linear layer"),
                          ({"rank": 4}, "unknown key model.lora.rank"), ({"r": 0}, "positive integer")]:
        bad = {**saved, "model": {**saved["model"], "lora": lora}, "run_dir": str(tmp_path / "bad")}
        with pytest.raises(ConfigError) as error:
            train_recipe(recipe_from_dict(bad))
        assert "\n" not in str(error.value) and re.search(message, str(error.value)), error.value
    assert not (tmp_path / "bad").exists()


def test_recipe_section_keeps_lora_out_of_the_config_overrides() -> None:
    from tformer.training.build import ModelSpec

    spec = ModelSpec.from_section({"preset": "bert-tiny", "lora": {"r": 4, "targets": "qkv_proj"}})
    assert spec.overrides == {} and spec.lora == {"r": 4, "alpha": 16, "dropout": 0.0, "targets": ["qkv_proj"]}
    assert dataclasses.replace(spec, lora=None).lora is None
