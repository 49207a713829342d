"""The Trainer's behaviours on a tiny GPT: accumulation, schedule, guards, stopping, interrupts."""

import json
import logging
import math
import os
import signal

import numpy as np
import pytest
import torch

from tformer.config import ConfigError
from tformer.models.gpt import GPT, GPTConfig
from tformer.training import CausalLMTask, TrainConfig, Trainer, TrainingError
from tformer.training.optim import learning_rate, parameter_groups

VOCAB = 23


def tiny_model(dropout=0.0) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, context_length=16, n_layers=1, n_heads=2, d_model=16,
                         dropout=dropout))


def task() -> CausalLMTask:
    tokens = np.random.default_rng(0).integers(0, VOCAB, 5000).astype(np.uint16)
    return CausalLMTask(tokens[:4000], tokens[4000:], context=16, batch_size=8, seed=1,
                        n_eval_batches=2)


def config(**overrides) -> TrainConfig:
    values = dict(max_steps=12, batch_size=8, lr=1e-2, warmup_steps=2, eval_every=4, log_every=1,
                  eval_batches=2, device="cpu")
    return TrainConfig(**{**values, **overrides})


def losses(run_dir) -> list[float]:
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    Trainer(tiny_model(), task(), config(), tmp_path / "a").fit()
    Trainer(tiny_model(), task(), config(grad_accum=2), tmp_path / "b").fit()
    np.testing.assert_allclose(losses(tmp_path / "a"), losses(tmp_path / "b"), atol=1e-5)


def test_warmup_then_cosine_to_min_lr():
    lr = lambda step: learning_rate(step, lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110,  # noqa: E731
                                    schedule="cosine")
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55) and lr(110) == pytest.approx(0.1)


def test_biases_and_norms_are_not_decayed_and_tied_weights_appear_once():
    model = tiny_model()
    decay, no_decay = parameter_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n = len(decay["params"]) + len(no_decay["params"])
    assert n == len(list(model.parameters()))  # parameters() already yields the tied weight once


class FlakyTask(CausalLMTask):
    """Non-finite loss at the given steps (0-based)."""

    def __init__(self, bad: set[int]) -> None:
        base = task()
        super().__init__(base.train_tokens, base.val_tokens, context=16, batch_size=8, seed=1,
                         n_eval_batches=2)
        self.bad, self.index = bad, -1

    def train_batch(self, step, shard, n_shards):
        self.index = step
        return super().train_batch(step, shard, n_shards)

    def loss(self, model, batch):
        loss = super().loss(model, batch)
        return loss * math.nan if model.training and self.index in self.bad else loss


def test_a_non_finite_step_is_skipped(tmp_path):
    trainer = Trainer(tiny_model(), FlakyTask({5}), config(max_steps=6, schedule="constant"), tmp_path)
    trainer.fit()
    weights_after_5 = [p.detach().clone() for p in trainer.model.parameters()]
    assert trainer.step == 6
    rerun = Trainer(tiny_model(), FlakyTask({5}), config(max_steps=5, schedule="constant"), tmp_path / "b")
    rerun.fit()  # stops before the bad step: the weights must be the same
    for a, b in zip(weights_after_5, rerun.model.parameters()):
        torch.testing.assert_close(a, b)


def test_repeated_non_finite_steps_restore_the_last_checkpoint(tmp_path, caplog):
    trainer = Trainer(tiny_model(), FlakyTask({9, 10, 11}), config(max_steps=12), tmp_path)
    with caplog.at_level(logging.WARNING):
        trainer.fit()
    assert "restored the weights and optimizer" in caplog.text
    with pytest.raises(TrainingError, match="no checkpoint to go back to"):
        Trainer(tiny_model(), FlakyTask({0, 1, 2}), config(), tmp_path / "fresh").fit()


def test_early_stopping_after_patience_evaluations(tmp_path):
    class Stale(CausalLMTask):
        def eval_batches(self, rank, world_size):
            yield from list(super().eval_batches(rank, world_size))[:1]

        def loss(self, model, batch):
            loss = super().loss(model, batch)
            return loss if model.training else loss.detach() * 0 + 5.0  # validation never improves

    base = task()
    stale = Stale(base.train_tokens, base.val_tokens, context=16, batch_size=8, seed=1)
    result = Trainer(tiny_model(), stale, config(max_steps=100, eval_every=2, early_stop_patience=3),
                     tmp_path).fit()
    assert result.stopped_early and result.step == 8  # best at 2, then 3 evaluations without gain


def test_ctrl_c_stops_at_a_step_boundary_and_the_run_resumes_exactly(tmp_path):
    class Interrupting(CausalLMTask):
        def train_batch(self, step, shard, n_shards):
            if step == 7:
                os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of step 8
            return super().train_batch(step, shard, n_shards)

    base = task()
    interrupting = Interrupting(base.train_tokens, base.val_tokens, context=16, batch_size=8, seed=1)
    result = Trainer(tiny_model(dropout=0.2), interrupting, config(), tmp_path).fit()
    assert result.interrupted and result.step == 8
    resumed = Trainer(tiny_model(dropout=0.2), task(), config(), tmp_path)
    assert resumed.fit().step == 12
    Trainer(tiny_model(dropout=0.2), task(), config(), tmp_path / "straight").fit()
    np.testing.assert_allclose(losses(tmp_path), losses(tmp_path / "straight"), atol=1e-6)


def test_fp16_overflow_is_handled_by_the_grad_scaler(tmp_path):
    class Overflowing(CausalLMTask):
        def loss(self, model, batch):
            loss = super().loss(model, batch)
            return loss * 1e30 if model.training and self.step_now == 2 else loss

        def train_batch(self, step, shard, n_shards):
            self.step_now = step
            return super().train_batch(step, shard, n_shards)

    base = task()
    overflowing = Overflowing(base.train_tokens, base.val_tokens, context=16, batch_size=8, seed=1)
    trainer = Trainer(tiny_model(), overflowing, config(max_steps=6, precision="fp16"), tmp_path)
    scale = trainer.scaler.get_scale()
    assert trainer.fit().step == 6
    assert trainer.scaler.get_scale() < scale  # backed off after the overflow, then kept going


def test_an_early_stopped_run_does_not_train_again(tmp_path):
    class Stale(CausalLMTask):
        def loss(self, model, batch):
            loss = super().loss(model, batch)
            return loss if model.training else loss.detach() * 0 + 5.0

    base = task()
    make = lambda: Stale(base.train_tokens, base.val_tokens, context=16, batch_size=8, seed=1)  # noqa: E731
    cfg = config(max_steps=100, eval_every=2, early_stop_patience=1)
    assert Trainer(tiny_model(), make(), cfg, tmp_path).fit().step == 4
    again = Trainer(tiny_model(), make(), cfg, tmp_path).fit()
    assert again.stopped_early and again.step == 4


def test_inconsistent_batch_settings_are_refused():
    with pytest.raises(ConfigError, match="divisible by grad_accum"):
        TrainConfig(batch_size=10, grad_accum=3)
    with pytest.raises(ConfigError, match="schedule='cosin'"):
        TrainConfig(schedule="cosin")


def test_cpu_threads_follow_the_recipe_or_the_contention_policy_and_are_restored(tmp_path, monkeypatch):
    from tformer import cpu

    before = torch.get_num_threads()
    Trainer(tiny_model(), task(), config(max_steps=4, log_every=2, threads=1), tmp_path / "fixed").fit()
    rows = [json.loads(line) for line in (tmp_path / "fixed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["threads"] for r in rows if "train_loss" in r] == [1, 1]
    assert torch.get_num_threads() == before  # the caller's count again
    # no count fixed: the policy decides; others keeping every core busy means one thread
    monkeypatch.delenv("TFORMER_CPU_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu.Contention, "sample", lambda self: float(cpu.usable_cores()))
    torch.set_num_threads(2)
    Trainer(tiny_model(), task(), config(max_steps=4, log_every=2), tmp_path / "auto").fit()
    rows = [json.loads(line) for line in (tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()]
    assert [r["threads"] for r in rows if "train_loss" in r] == [1, 1]
    assert torch.get_num_threads() == 2
    torch.set_num_threads(before)


def test_auto_precision_is_bf16_on_amx_cpus_for_models_at_least_128_wide(monkeypatch):
    from tformer import cpu
    from tformer.training.trainer import autocast_dtype

    wide = torch.nn.Sequential(torch.nn.Linear(128, 512), torch.nn.Linear(512, 128))
    narrow = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))  # a 64-wide MLP
    cpu_device = torch.device("cpu")
    monkeypatch.setattr(cpu, "has_amx_bf16", lambda: True)
    assert autocast_dtype("auto", cpu_device, wide) == torch.bfloat16
    assert autocast_dtype("auto", cpu_device, narrow) is None
    assert autocast_dtype("fp32", cpu_device, wide) is None
    from tformer.nn.lora import add_lora

    narrow_lora = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64), torch.nn.Linear(256, 8))
    add_lora(narrow_lora, ["0", "1"], r=2)  # LoRA layers are not nn.Linear: their widths still count
    assert autocast_dtype("auto", cpu_device, narrow_lora) is None
    monkeypatch.setattr(cpu, "has_amx_bf16", lambda: False)
    assert autocast_dtype("auto", cpu_device, wide) is None
    assert autocast_dtype("bf16", cpu_device, narrow) == torch.bfloat16


def test_the_fused_cpu_optimizer_matches_the_foreach_one():
    from tformer.training.optim import build_optimizer

    torch.manual_seed(3)
    fused_model = tiny_model()
    plain_model = tiny_model()
    fused = build_optimizer(fused_model, 1e-2, 0.1, (0.9, 0.95))
    assert fused.defaults["fused"]
    plain = torch.optim.AdamW(parameter_groups(plain_model, 0.1), lr=1e-2, betas=(0.9, 0.95), foreach=True)
    ids = torch.randint(0, VOCAB, (4, 16))
    for _ in range(3):
        for model, opt in ((fused_model, fused), (plain_model, plain)):
            model(ids).float().logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):  # within 0.5% of one step (lr)
        torch.testing.assert_close(a, b, rtol=0, atol=0.005 * 1e-2)
