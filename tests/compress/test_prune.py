"""compress.prune on every shipped recipe's tiny run: the pruned run opens with the kept shapes,
evaluates, decodes with its KV cache as its full forward, fine-tunes from init_from; pruning
nothing writes the same weights; the plan follows the scores (layer and global scope); bad input
is one line."""

from __future__ import annotations

import json

import pytest
import torch

from tformer.compress import prune as prune_module
from tformer.compress.output import write_run
from tformer.compress.prune import plan, prune, prune_run
from tformer.compress.quantize import quantize_run
from tformer.models.protocols import CausalLM, can
from tformer.nn.pruning import head_modules, unit_modules
from tformer.runs import open_run
from tformer.training.recipe import evaluate_run, recipe_from_dict, train_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = ["bert-sentiment", "bert-sentiment-minilm", "gpt-shakespeare-char", "gpt-shakespeare-bpe",
           "transformer-xl-shakespeare", "vit-mnist", "nmt-de-en", "image-gen-digits", "bert-mlm-shakespeare"]


def counts(model: torch.nn.Module) -> dict[str, int]:
    return {**{n: m.n_heads for n, m in head_modules(model).items()},
            **{n: m.n_units for n, m in unit_modules(model).items()}}


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_pruned_run_opens_with_its_shapes_and_evaluates(trained, tmp_path, recipe):
    out, report = prune_run(trained[recipe], tmp_path / "pruned", heads=0.5, neurons=0.5, max_batches=2)
    assert report.importance == "gradient" and report.batches >= 1
    assert report.parameters_after < report.parameters_before
    run = open_run(out)
    assert counts(run.model) == {m.name: m.after for m in report.modules}
    assert all(m.after == max(1, m.before - m.before // 2) or m.kind == "units" for m in report.modules)
    assert sum(p.numel() for p in run.model.parameters()) == report.parameters_after
    assert run.record["compressed_from"] and run.recipe == open_run(trained[recipe]).recipe
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parameters_after"] == report.parameters_after and summary["heads"] == 0.5
    if recipe == "image-gen-digits":
        return  # its evaluation judges more images than a tiny run draws (the unpruned run's fails alike)
    results = evaluate_run(out)
    assert all(torch.isfinite(torch.tensor(float(v))) for v in results.values() if isinstance(v, (int, float)))


@pytest.mark.parametrize("recipe", ["gpt-shakespeare-char", "bert-sentiment"])
def test_a_reopened_pruned_run_gives_the_in_memory_logits(trained, tmp_path, recipe):
    source = open_run(trained[recipe])
    prune(source.model, heads=0.5, neurons=0.5, importance="magnitude")
    out = write_run(source.model, source, tmp_path / "pruned")
    model, reopened = source.model.eval(), open_run(out).model
    ids = torch.randint(5, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(reopened(ids), model(ids))
    # prune_run writes the same model (magnitude importance is deterministic)
    again, _ = prune_run(trained[recipe], tmp_path / "again", heads=0.5, neurons=0.5, importance="magnitude")
    with torch.no_grad():
        assert torch.equal(open_run(again).model(ids), model(ids))


def test_pruned_run_keeps_the_source_keys_and_step(trained, tmp_path):
    source = open_run(trained["bert-sentiment"])  # fine-tuned from the masked-LM run: it has init_from
    out, _ = prune_run(trained["bert-sentiment"], tmp_path / "pruned", heads=0.5, importance="magnitude")
    run = open_run(out)
    for key in ("recipe", "training", "has_tokenizer", "data_sha256", "init_from"):
        assert run.record.get(key) == source.record.get(key), key
    assert "init_from" in source.record and run.record["compressed_from"] == str(source.checkpoint.resolve())
    assert (json.loads((run.checkpoint / "progress.json").read_text())["step"]
            == json.loads((source.checkpoint / "progress.json").read_text())["step"])


def test_quantized_and_lora_runs_are_refused_before_any_work(trained, tmp_path, monkeypatch, one_line_error):
    def no_work(*args, **kwargs):
        raise AssertionError("the check came after the work")

    monkeypatch.setattr(prune_module, "task_of", no_work)
    monkeypatch.setattr(prune_module, "gradient_importance", no_work)
    quantize_run(trained["gpt-shakespeare-char"], tmp_path / "q", "int8")
    assert "quantized" in one_line_error(lambda: prune_run(tmp_path / "q", tmp_path / "x", heads=0.5))
    lora = trained["bert-sentiment-minilm-lora"]
    assert "merge them first" in one_line_error(lambda: prune_run(lora, tmp_path / "x", heads=0.5))
    assert "merge them first" in one_line_error(
        lambda: prune(open_run(lora).model, heads=0.5, batches=[1], loss=lambda m, b: 0))
    assert not (tmp_path / "x").exists()


def test_pruning_nothing_writes_the_same_model(trained, tmp_path):
    source = open_run(trained["gpt-shakespeare-char"])
    out, report = prune_run(trained["gpt-shakespeare-char"], tmp_path / "same", heads=0.0, neurons=0.0)
    pruned = open_run(out).model.state_dict()
    assert report.parameters_after == report.parameters_before
    assert pruned.keys() == source.model.state_dict().keys()
    assert all(torch.equal(pruned[k], v) for k, v in source.model.state_dict().items())


@pytest.mark.parametrize("recipe", ["gpt-shakespeare-char", "nmt-de-en", "image-gen-digits"])
def test_a_pruned_run_decodes_with_its_cache_as_its_full_forward(trained, tmp_path, recipe):
    out, _ = prune_run(trained[recipe], tmp_path / "pruned", heads=0.5, neurons=0.5, importance="magnitude")
    model = open_run(out).model
    vocab = 20
    if recipe == "image-gen-digits":  # a decoder bound to two class conditions
        model, vocab = model.bind(torch.tensor([[1], [2]])), model.config.n_image_tokens
    elif not can(model, CausalLM):  # an encoder-decoder: its decoder bound to two sources
        model = model.bind(torch.randint(3, 20, (2, 5)))
    ids = torch.randint(0, vocab, (2, 6))
    cache = model.new_cache(2, 8)
    with torch.no_grad():
        steps = [model(ids[:, :3], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(3, 6)]
        torch.testing.assert_close(torch.cat(steps, 1), model(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("recipe", ["bert-sentiment", "gpt-shakespeare-char"])
def test_a_pruned_run_fine_tunes_from_init_from(trained, tmp_path, recipe):
    out, report = prune_run(trained[recipe], tmp_path / "pruned", heads=0.5, neurons=0.5, max_batches=1)
    saved = dict(open_run(out).recipe)
    saved.update(model={**saved["model"], "init_from": str(out)}, run_dir=str(tmp_path / "tuned"),
                 tokenizer={**saved["tokenizer"], "kind": "file", "path": str(out / "tokenizer.json")},
                 training={**saved["training"], "max_steps": 2})
    result = train_recipe(recipe_from_dict(saved, where="fine-tune"))
    assert result.step == 2
    tuned = open_run(tmp_path / "tuned")
    assert counts(tuned.model) == {m.name: m.after for m in report.modules}
    assert tuned.record["init_from"] == str(out)


def test_the_plan_removes_the_lowest_scores_per_layer_or_globally():
    modules = {"a": torch.nn.Module(), "b": torch.nn.Module()}
    for m in modules.values():
        m.n_heads = 4
    scores = {"a": torch.tensor([4.0, 1.0, 3.0, 2.0]), "b": torch.tensor([40.0, 30.0, 10.0, 20.0])}
    assert plan(modules, scores, 0.5, "layer", "heads") == {"a": [0, 2], "b": [0, 1]}
    # globally after dividing by each layer's L2 norm the two layers rank alike
    assert plan(modules, scores, 0.5, "global", "heads") == {"a": [0, 2], "b": [0, 1]}
    scores["b"] = torch.tensor([1.0, 1.0, 1.0, 100.0])
    assert plan(modules, scores, 0.5, "global", "heads") == {"a": [0, 2, 3], "b": [3]}
    with pytest.raises(ValueError, match="every one of a"):
        plan(modules, {"a": torch.ones(4), "b": torch.tensor([0.1, 0.1, 0.1, 100.0])}, 0.875, "global", "heads")


def test_grouped_query_attention_is_pruned_in_whole_groups():
    modules = {"attn": torch.nn.Module()}
    modules["attn"].n_heads, modules["attn"].n_kv_heads = 8, 4
    scores = {"attn": torch.tensor([1.0, 1.0, 9.0, 0.0, 5.0, 5.0, 0.0, 0.0])}
    assert plan(modules, scores, 0.5, "layer", "heads") == {"attn": [2, 3, 4, 5]}


def test_bad_input_is_one_line(trained, tmp_path, one_line_error):
    run = trained["bert-sentiment"]
    for share in (1.0, -0.1, float("nan")):
        assert "[0, 1)" in one_line_error(lambda share=share: prune_run(run, tmp_path / "x", heads=share))
    assert "scope" in one_line_error(lambda: prune_run(run, tmp_path / "x", heads=0.5, scope="model"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    assert "not empty" in one_line_error(lambda: prune_run(run, tmp_path / "full", heads=0.5))
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep" and not (tmp_path / "x").exists()
    model = open_run(run).model
    assert "validation batches" in one_line_error(lambda: prune(model, heads=0.5))
