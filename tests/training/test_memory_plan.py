"""The memory plan: exact counts of parameters, gradients and AdamW state; activations measured
from one step; memory_plan.json holds the predicted and the measured peak, within 20% of each
other for GPT, a BERT classifier and ViT; a run that cannot fit is refused in one line; the
measured step changes nothing in training."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tformer.config import ConfigError
from tformer.models.gpt import GPT, GPTConfig
from tformer.training import CausalLMTask, TrainConfig, Trainer, memory_plan
from tformer.training.recipe import recipe_from_dict, train_recipe

pytestmark = pytest.mark.skipif(not memory_plan.Meter(torch.device("cpu")).usable(),
                                reason="needs /proc/self/status VmHWM and clear_refs")

VOCAB = 512
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def gpt(d_model=128, n_layers=2, dropout=0.1, context=128) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, context_length=context, n_layers=n_layers, n_heads=4,
                         d_model=d_model, dropout=dropout))


def lm_task(context=128, batch_size=16) -> CausalLMTask:
    tokens = np.random.default_rng(0).integers(0, VOCAB, 40000).astype(np.uint16)
    return CausalLMTask(tokens[:36000], tokens[36000:], context=context, batch_size=batch_size, seed=1,
                        n_eval_batches=1)


def config(**overrides) -> TrainConfig:
    values = dict(max_steps=2, batch_size=16, lr=1e-3, warmup_steps=1, eval_every=2, log_every=2,
                  eval_batches=1, device="cpu", precision="fp32")
    return TrainConfig(**{**values, **overrides})


def read_plan(run_dir: Path) -> dict:
    return json.loads((run_dir / memory_plan.PLAN_FILE).read_text())


def test_parameters_gradients_and_optimizer_state_are_exact_counts(tmp_path):
    model = gpt(d_model=32, n_layers=1, context=16)
    for p in list(model.parameters())[-3:]:
        p.requires_grad_(False)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    assert len(trainable) < len(params)  # some frozen: gradients count only the trainable ones
    counts = memory_plan.static_bytes(model)
    assert counts["n_parameters"] == sum(p.numel() for p in params)  # the tied head once
    assert counts["parameters"] == 4 * sum(p.numel() for p in params)
    assert counts["gradients"] == 4 * sum(p.numel() for p in trainable)
    assert counts["optimizer_state"] == 2 * 4 * sum(p.numel() for p in trainable)

    run_dir = tmp_path / "run"
    Trainer(model, lm_task(context=16, batch_size=8), config(batch_size=8), run_dir).fit()
    plan = read_plan(run_dir)
    assert {k: plan[k] for k in ("parameters", "gradients", "optimizer_state")} == \
        {k: counts[k] for k in ("parameters", "gradients", "optimizer_state")}
    assert plan["need"] == plan["gradients"] + plan["optimizer_state"] + plan["activations"]
    assert plan["predicted_peak"] == plan["baseline"] + plan["need"]


def test_the_plan_is_written_and_logged_with_predicted_and_measured_peaks(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="tformer.training.memory_plan"):
        Trainer(gpt(), lm_task(), config(grad_accum=2, activation_checkpointing=True), tmp_path).fit()
    plan = read_plan(tmp_path)
    assert plan["settings"]["micro_batch_rows"] == 8 and plan["settings"]["activation_checkpointing"] is True
    assert plan["settings"]["precision"] == "fp32"
    [row] = plan["measured"]
    assert row["step"] == 2 and row["measured_peak"] > 0 and row["predicted_peak"] == plan["predicted_peak"]
    assert row["ratio"] == pytest.approx(row["measured_peak"] / row["predicted_peak"])
    for item in ("parameters", "gradients", "optimizer state", "activations", "predicted peak", "measured peak"):
        assert f"memory plan: {item}" in caplog.text


def check_prediction(run_dir: Path, family: str) -> dict:
    plan = read_plan(run_dir)
    [row] = plan["measured"]
    assert plan["activations"] > 20 * 2**20, plan  # large enough that resident-memory noise is small
    print(f"\nmemory plan {family}: activations {plan['activations'] / 2**20:.1f} MiB, predicted "
          f"{row['predicted_peak'] / 2**20:.1f} MiB, measured {row['measured_peak'] / 2**20:.1f} MiB, "
          f"ratio {row['ratio']:.3f}; growth predicted {row['predicted_growth'] / 2**20:.1f} MiB, "
          f"measured {row['measured_growth'] / 2**20:.1f} MiB, ratio {row['growth_ratio']:.3f}")
    assert 0.8 <= row["ratio"] <= 1.2, row
    assert 0.7 <= row["growth_ratio"] <= 1.3, row  # what the run adds to what was resident (0.87-1.18 seen)
    return row


def in_a_fresh_process(case: str, tmp_path: Path) -> None:
    """Run `case(tmp_path)` of this module in a new interpreter: resident memory there owes nothing
    to what earlier tests allocated and freed (or how they set the allocator), so the measured
    peak is the run's own."""
    code = (f"import importlib.util, pathlib\n"
            f"spec = importlib.util.spec_from_file_location('memory_plan_cases', {str(Path(__file__))!r})\n"
            f"module = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(module)\n"
            f"module.{case}(pathlib.Path({str(tmp_path)!r}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def train_gpt(tmp_path: Path) -> Path:
    Trainer(gpt(), lm_task(), config(), tmp_path).fit()
    return tmp_path


def test_prediction_within_20_percent_for_gpt(tmp_path):
    in_a_fresh_process("train_gpt", tmp_path)
    check_prediction(tmp_path, "gpt")


def train_bert_classifier(tmp_path: Path) -> None:
    rng = random.Random(0)
    words = "the film food was really quite and service a good great bad awful dull nice".split()
    lines = [f"{('pos', 'neg')[i % 2]}\t" + " ".join(rng.choice(words) for _ in range(120)) for i in range(96)]
    (tmp_path / "reviews.tsv").write_text("label\ttext\n" + "\n".join(lines) + "\n")
    recipe = recipe_from_dict({
        "task": "classification",
        "model": {"preset": "bert-tiny", "n_layers": 2, "d_model": 128, "n_heads": 4, "context_length": 128},
        "tokenizer": {"kind": "bpe", "vocab_size": 300, "special_tokens": SPECIALS},
        "data": {"source": str(tmp_path / "reviews.tsv")}, "run_dir": str(tmp_path / "run"),
        "training": {"max_steps": 2, "batch_size": 32, "lr": 1e-3, "warmup_steps": 1, "eval_every": 2,
                     "eval_batches": 1, "log_every": 2, "precision": "fp32"}})
    train_recipe(recipe)


def test_prediction_within_20_percent_for_a_bert_classifier(tmp_path):
    in_a_fresh_process("train_bert_classifier", tmp_path)
    check_prediction(tmp_path / "run", "bert classifier")


def train_vit(tmp_path: Path) -> None:
    recipe = recipe_from_dict({
        "task": "image_classification", "model": {"preset": "vit-digits", "d_model": 128, "n_layers": 2},
        "data": {"source": "digits"}, "run_dir": str(tmp_path / "run"),
        "training": {"max_steps": 2, "batch_size": 256, "lr": 1e-3, "warmup_steps": 1, "eval_every": 2,
                     "eval_batches": 1, "log_every": 2, "precision": "fp32"}})
    train_recipe(recipe)


def test_prediction_within_20_percent_for_vit(tmp_path):
    in_a_fresh_process("train_vit", tmp_path)
    check_prediction(tmp_path / "run", "vit")


def test_a_run_that_cannot_fit_is_refused_in_one_line_with_the_settings_that_would(tmp_path, monkeypatch):
    monkeypatch.setattr(memory_plan.Meter, "available", lambda self: 30 * 2**20)
    with pytest.raises(ConfigError) as refused:
        Trainer(gpt(), lm_task(), config(), tmp_path).fit()
    message = str(refused.value)
    print("\n" + message)
    assert "\n" not in message and "30.0 MiB is available" in message
    assert "training.grad_accum=" in message and "training.activation_checkpointing=true" in message
    assert "fsdp2" not in message  # one CPU machine: FSDP2's processes would share the same memory
    assert not (tmp_path / "metrics.jsonl").exists() or "train_loss" not in (tmp_path / "metrics.jsonl").read_text()
    monkeypatch.setattr(memory_plan.Meter, "available", lambda self: 2**20)  # not even the optimizer state
    with pytest.raises(ConfigError, match="gradients and optimizer state alone.*smaller model"):
        Trainer(gpt(), lm_task(), config(), tmp_path / "b").fit()


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


def test_the_measured_step_changes_no_loss_and_no_weight(tmp_path, monkeypatch):
    small = dict(max_steps=6, log_every=1, eval_every=3, batch_size=8)
    with_plan = Trainer(gpt(d_model=32, context=32), lm_task(context=32, batch_size=8), config(**small),
                        tmp_path / "a")
    with_plan.fit()  # dropout on: the plan's step must leave the RNG as it was
    assert (tmp_path / "a" / memory_plan.PLAN_FILE).is_file()
    monkeypatch.setattr(Trainer, "plan_memory", False)
    without = Trainer(gpt(d_model=32, context=32), lm_task(context=32, batch_size=8), config(**small),
                      tmp_path / "b")
    without.fit()
    assert not (tmp_path / "b" / memory_plan.PLAN_FILE).exists()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    for a, b in zip(with_plan.model.parameters(), without.model.parameters()):
        assert torch.equal(a, b)


def test_on_gpus_the_refusal_names_fsdp2_with_the_processes_that_would_fit():
    """Each GPU has its own memory: N processes under fsdp2 hold 1/N of parameters, gradients and
    optimizer state and 1/N of the micro-batch; the smallest N that fits is named."""
    mib = 2**20
    settings = {"micro_batch_rows": 8, "grad_accum": 1, "activation_checkpointing": True,
                "device": "cuda:0", "strategy": "one process", "processes": 1}
    plan = memory_plan.MemoryPlan(path=None, meter=memory_plan.Meter(torch.device("cpu")), settings=settings,
                                  parameters=400 * mib, gradients=400 * mib, optimizer_state=800 * mib,
                                  activations=800 * mib, baseline=0, measured_step_peak=0, available=None)
    advice = memory_plan._fit_advice(plan, free=1000 * mib)  # (1600 + 800) / 4 = 600 MiB fits, / 2 does not
    assert "training.strategy=fsdp2 under `torchrun --nproc_per_node 4`" in advice
    assert "fsdp2" not in memory_plan._fit_advice(plan, free=100 * mib)  # not even with 64 GPUs
    odd = memory_plan.MemoryPlan(**{**plan.__dict__, "settings": {**settings, "micro_batch_rows": 6}})
    assert "nproc_per_node 4" not in memory_plan._fit_advice(odd, free=1000 * mib)  # 4 does not divide 6 rows
    wide = memory_plan.MemoryPlan(**{**plan.__dict__, "parameters": 700 * mib, "optimizer_state": 500 * mib})
    # static 1600 MiB again, but every rank evaluates with all 700 MiB of parameters: 8 GPUs, not 4
    assert "nproc_per_node 8" in memory_plan._fit_advice(wide, free=1000 * mib)
    assert "fsdp2" not in memory_plan._fit_advice(
        memory_plan.MemoryPlan(**{**plan.__dict__, "settings": {**settings, "device": "cpu"}}), free=1000 * mib)
