"""Activation checkpointing (`training.activation_checkpointing`): every family's blocks are found
by type and give the same gradients with dropout on; every N-th block; eval, inference and KV-cache
generation are untouched; a bad setting is one line; a training run with it equals one without,
saves the setting and resumes exactly."""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

from tformer.inference import generate
from tformer.models import build_model
from tformer.training import CausalLMTask, TrainConfig, Trainer
from tformer.training.checkpointing import apply_activation_checkpointing, blocks_of
from tformer.training.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {  # one model per family: two blocks per stack of 16 dimensions, dropout on
    "gpt-nano": dict(vocab_size=20, n_layers=2, d_model=16, n_heads=2, dropout=0.2),
    "bert-tiny": dict(vocab_size=20, n_layers=2, d_model=16, n_heads=2, head="sequence", labels=("a", "b"),
                      dropout=0.2, attn_dropout=0.2),
    "transformer-base": dict(n_encoder_layers=2, n_decoder_layers=2, d_model=16, n_heads=2, d_ff=32,
                             vocab_size=20, tgt_vocab_size=20, dropout=0.2),
    "txl-micro": dict(vocab_size=20, n_layers=2, d_model=16, n_heads=2, d_ff=32, seg_len=6, mem_len=6,
                      dropout=0.2, attn_dropout=0.2),
    "vit-tiny-mnist": dict(n_layers=2, d_model=16, n_heads=2, patch_size=7, d_ff=32, dropout=0.2),
    "seed-sketch": dict(n_encoder_layers=2, n_decoder_layers=2, d_model=16, n_heads=2, height=4, width=4,
                        dropout=0.2),
}


def loss_of(preset: str) -> Callable[[nn.Module], torch.Tensor]:
    """A scalar of the model's training forward on fixed random inputs (dropout active)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (2, 6), generator=g)
    if preset == "bert-tiny":
        mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
        return lambda m: m(ids, attention_mask=mask).square().sum()
    if preset == "transformer-base":
        src_mask = torch.tensor([[1] * 6, [1] * 5 + [0]])
        return lambda m: m(ids, ids.flip(1), src_mask=src_mask).square().mean()
    if preset == "txl-micro":
        def segments(m: nn.Module) -> torch.Tensor:  # the second segment reads the first's memory
            first = m(ids)
            return first.logits.square().mean() + m(ids.flip(1), first.memory).logits.square().mean()
        return segments
    if preset == "vit-tiny-mnist":
        images = torch.randn(2, 1, 28, 28, generator=g)
        return lambda m: m(images).square().sum()
    if preset == "seed-sketch":
        tokens = torch.randint(0, 16, (2, 16), generator=g)
        return lambda m: m(torch.tensor([[3], [5]]), tokens).square().mean()
    return lambda m: m(ids).square().mean()


def gradients(model: nn.Module, loss: Callable[[nn.Module], torch.Tensor]) -> tuple[float, dict]:
    torch.manual_seed(7)
    value = loss(model)
    value.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(value.detach()), grads


def recomputed(model: nn.Module) -> list[int]:
    """Per block, how many times its attention runs (1: forward only; 2: also recomputed)."""
    counts = [0] * len(blocks_of(model))
    for i, block in enumerate(blocks_of(model)):
        block.attn.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("every", [True, 2])
@pytest.mark.parametrize("preset", TINY)
def test_checkpointed_gradients_equal_plain_ones_with_dropout(preset: str, every: bool | int) -> None:
    torch.manual_seed(0)
    plain = build_model(preset, **TINY[preset]).train()
    checkpointed = copy.deepcopy(plain)
    chosen = apply_activation_checkpointing(checkpointed, every)
    n_blocks = len(blocks_of(plain))
    assert n_blocks >= 2 and len(chosen) == (n_blocks if every is True else n_blocks // 2)
    counts = recomputed(checkpointed)
    loss = loss_of(preset)
    value, grads = gradients(plain, loss)
    value_c, grads_c = gradients(checkpointed, loss)
    calls = 2 if preset == "txl-micro" else 1  # two segments
    assert counts == [calls * (2 if b.checkpointed else 1) for b in blocks_of(checkpointed)]
    assert value_c == value and grads_c.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], atol=1e-6, rtol=1e-6, msg=name)
    torch.manual_seed(8)  # dropout is really on: other masks, another loss
    assert float(loss(plain).detach()) != value


def test_every_nth_block_counts_from_one_across_both_stacks() -> None:
    model = build_model("transformer-base", **{**TINY["transformer-base"], "n_encoder_layers": 3})
    apply_activation_checkpointing(model, 2)
    assert [b.checkpointed for b in blocks_of(model)] == [False, True, False, True, False]
    apply_activation_checkpointing(model, False)
    assert not any(b.checkpointed for b in blocks_of(model))


def test_eval_inference_and_generation_are_untouched() -> None:
    torch.manual_seed(0)
    plain = build_model("gpt-nano", **TINY["gpt-nano"])
    checkpointed = copy.deepcopy(plain)
    apply_activation_checkpointing(checkpointed, True)
    counts = recomputed(checkpointed)
    ids = torch.randint(0, 20, (2, 5))
    checkpointed.eval()(ids).sum().backward()  # eval with gradients (attribution): plain forward
    torch.testing.assert_close(checkpointed(ids), plain.eval()(ids), atol=0, rtol=0)
    with torch.no_grad():  # training mode without gradients: no checkpoint either
        torch.manual_seed(1)
        dropped = checkpointed.train()(ids)
        torch.manual_seed(1)
        torch.testing.assert_close(dropped, plain.train()(ids), atol=0, rtol=0)
    prompt = torch.randint(0, 20, (1, 3))
    assert torch.equal(generate(checkpointed.eval(), prompt, 4), generate(plain.eval(), prompt, 4))
    assert counts == [3 + 4] * 2  # three forwards and four decoding steps, none recomputed


RECIPE = Path(__file__).resolve().parents[2] / "src" / "tformer" / "recipes" / "gpt-shakespeare-char.yaml"


@pytest.mark.parametrize("text, value", [("true", True), ("false", False), ("3", 3)])
def test_the_setting_comes_from_the_command_line(text: str, value: bool | int) -> None:
    recipe = load_recipe(RECIPE, [f"training.activation_checkpointing={text}"])
    assert recipe.training.activation_checkpointing == value
    assert type(recipe.training.activation_checkpointing) is type(value)


@pytest.mark.parametrize("text", ["0", "-1", "2.5", "always"])
def test_a_bad_setting_is_one_line_naming_the_key(text: str, one_line_error) -> None:
    message = one_line_error(lambda: load_recipe(RECIPE, [f"training.activation_checkpointing={text}"]))
    assert "activation_checkpointing" in message


def test_more_blocks_than_the_model_has_is_one_line(one_line_error) -> None:
    model = build_model("gpt-nano", **TINY["gpt-nano"])
    message = one_line_error(lambda: apply_activation_checkpointing(model, 3))
    assert "activation_checkpointing <= 2" in message


# -- the Trainer --------------------------------------------------------------------------------
VOCAB = 23


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("gpt-nano", vocab_size=VOCAB, context_length=16, n_layers=2, n_heads=2, d_model=16,
                       dropout=0.2)


def task(interrupt_at: int | None = None, fused: bool = False) -> CausalLMTask:
    class Interrupting(CausalLMTask):
        def train_batch(self, step, shard, n_shards):
            if step == interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the step
            return super().train_batch(step, shard, n_shards)

    tokens = np.random.default_rng(0).integers(0, VOCAB, 3000).astype(np.uint16)
    return Interrupting(tokens[:2000], tokens[2000:], context=16, batch_size=4, seed=1, n_eval_batches=1,
                        fused_loss=fused)


def config(**overrides) -> TrainConfig:
    values = dict(max_steps=4, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=2, log_every=1,
                  eval_batches=1, device="cpu")
    return TrainConfig(**{**values, **overrides})


def losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


@pytest.mark.parametrize("fused", [False, True])  # True: the loss chunked through the head, inside the model
def test_training_with_checkpointing_equals_training_without_and_resumes(tmp_path, fused: bool) -> None:
    on = config(activation_checkpointing=True)
    Trainer(tiny_model(), task(), config(), tmp_path / "off").fit()
    result = Trainer(tiny_model(), task(interrupt_at=1, fused=fused), on, tmp_path / "on").fit()
    assert result.interrupted and result.step == 2
    saved = json.loads((tmp_path / "on" / "checkpoints" / "last" / "config.json").read_text())
    assert saved["training"]["activation_checkpointing"] is True
    assert Trainer(tiny_model(), task(fused=fused), on, tmp_path / "on").fit().step == 4
    np.testing.assert_allclose(losses(tmp_path / "on"), losses(tmp_path / "off"), atol=1e-6)
    assert len(losses(tmp_path / "off")) == 4


def test_the_causal_lm_task_takes_the_chunked_loss_only_with_checkpointing_on(tmp_path) -> None:
    from tformer.training.recipe import prepare, recipe_from_dict

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 50, encoding="utf-8")

    def recipe(setting):
        return recipe_from_dict({
            "task": "causal_lm", "model": {"preset": "gpt-nano", "n_layers": 1, "d_model": 16, "n_heads": 2,
                                           "context_length": 16},
            "data": {"source": str(corpus), "cache_dir": str(tmp_path / "cache")}, "run_dir": str(tmp_path / "r"),
            "training": {"max_steps": 2, "batch_size": 4, "device": "cpu", "activation_checkpointing": setting}})

    for setting, fused in ((False, False), (True, True), (1, True)):
        prepared = prepare(recipe(setting))
        assert prepared.task.fused_loss is fused
