"""The segment_lm task: consecutive segments, memory carried across steps, exact resume,
evaluation in order with long memory, document resets, the shipped recipe, clear errors."""

import json
import logging
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tformer.config import ConfigError
from tformer.inference import GREEDY
from tformer.inference.memory import generate_with_memory as generate
from tformer.models.transformer_xl import TransformerXL, TransformerXLConfig
from tformer.training import TrainConfig, Trainer
from tformer.training.recipe import evaluate_run, load_recipe, recipe_from_dict, train_recipe
from tformer.training.tasks.segment_lm import SegmentLMTask, TokenStreams, evaluate_streams, shard_rows

VOCAB, SEG, MEM = 23, 8, 8
TOKENS = np.random.default_rng(0).integers(0, VOCAB, 3000).astype(np.uint16)


def tiny_model(dropout=0.1) -> TransformerXL:
    torch.manual_seed(0)
    return TransformerXL(TransformerXLConfig(vocab_size=VOCAB, n_layers=1, n_heads=2, d_model=16,
                                             d_ff=32, seg_len=SEG, mem_len=MEM, dropout=dropout))


def task(refresh_every=4, eval_mem_len=16, streams=4) -> SegmentLMTask:
    train = TokenStreams(TOKENS[:2400], streams, SEG)
    val = TokenStreams(TOKENS[2400:], 2, SEG)
    return SegmentLMTask(train, val, mem_len=MEM, eval_mem_len=eval_mem_len, n_eval_batches=3,
                         refresh_every=refresh_every)


def config(**overrides) -> TrainConfig:
    values = dict(max_steps=12, batch_size=4, lr=1e-2, warmup_steps=2, eval_every=4, log_every=1,
                  eval_batches=3, device="cpu")
    return TrainConfig(**{**values, **overrides})


def losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


def test_streams_are_contiguous_and_segments_consecutive():
    streams = TokenStreams(TOKENS[:2400], 4, SEG)
    assert streams.n_segments == (600 - 1) // SEG
    segments = [streams.segment(g, slice(0, 4)) for g in range(streams.n_segments)]
    ids = torch.cat([s["ids"] for s in segments], 1)
    targets = torch.cat([s["targets"] for s in segments], 1)
    rows = torch.from_numpy(TOKENS[:2400].astype(np.int64)).view(4, 600)  # row r: tokens [600r, 600r+600)
    assert ids.equal(rows[:, :ids.shape[1]]) and targets.equal(rows[:, 1:ids.shape[1] + 1])


def test_train_batches_follow_steps_wrap_and_split_into_shards():
    t = task()
    n = t.train.n_segments
    assert t.train_batch(1, 0, 1)["ids"].equal(t.train.segment(1, slice(0, 4))["ids"])
    assert t.train_batch(n + 1, 0, 1)["ids"].equal(t.train_batch(1, 0, 1)["ids"])  # wraps around
    halves = [t.train_batch(5, shard, 2)["ids"] for shard in range(2)]
    assert torch.cat(halves).equal(t.train_batch(5, 0, 1)["ids"])
    assert shard_rows(4, 1, 2) == slice(2, 4)


def test_loss_carries_memory_from_the_previous_step():
    model, t = tiny_model(dropout=0.0), task(refresh_every=None)
    first, second = t.train_batch(0, 0, 1), t.train_batch(1, 0, 1)
    losses = [t.loss(model, first).item(), t.loss(model, second).item()]
    with torch.no_grad():
        out = model(first["ids"], model.new_memory(4))
        expected = F.cross_entropy(model(second["ids"], out.memory).logits.flatten(0, 1),
                                   second["targets"].flatten())
        alone = F.cross_entropy(model(second["ids"]).logits.flatten(0, 1), second["targets"].flatten())
    assert losses[1] == pytest.approx(expected.item(), abs=1e-6)
    assert abs(losses[1] - alone.item()) > 1e-5  # the memory made a difference


def test_resumed_run_matches_an_unbroken_one(tmp_path, caplog):
    """Resumed at a checkpoint interval or by Ctrl-C anywhere: the memory carried across the
    resume is in the checkpoint, so the run continues bit for bit."""
    class Interrupting(SegmentLMTask):
        def train_batch(self, step, shard, n_shards):
            if step == self.stop_at - 1:  # Ctrl-C: the Trainer stops and saves after this step
                os.kill(os.getpid(), signal.SIGINT)
            return super().train_batch(step, shard, n_shards)

    Trainer(tiny_model(), task(), config(), tmp_path / "straight").fit()
    base = task()
    for stop_at, run in ((8, "resumed"), (7, "off_boundary"), (5, "off_again")):
        interrupting = Interrupting(base.train, base.val, mem_len=MEM, eval_mem_len=16,
                                    n_eval_batches=3, refresh_every=4)
        interrupting.stop_at = stop_at
        assert Trainer(tiny_model(), interrupting, config(), tmp_path / run).fit().interrupted
        with caplog.at_level(logging.WARNING):
            assert Trainer(tiny_model(), task(), config(), tmp_path / run).fit().step == 12
    straight = losses(tmp_path / "straight")
    for run in ("resumed", "off_boundary", "off_again"):
        np.testing.assert_array_equal(losses(tmp_path / run), straight)  # bit for bit
    assert "no memory carried" not in caplog.text


def test_the_checkpoint_holds_the_memory_as_plain_tensors(tmp_path):
    class Interrupting(SegmentLMTask):
        def train_batch(self, step, shard, n_shards):
            if step == 6:
                os.kill(os.getpid(), signal.SIGINT)
            return super().train_batch(step, shard, n_shards)

    base = task()
    t = Interrupting(base.train, base.val, mem_len=MEM, eval_mem_len=16, n_eval_batches=3, refresh_every=4)
    Trainer(tiny_model(), t, config(), tmp_path).fit()
    state = torch.load(tmp_path / "checkpoints" / "last" / "train_state.pt", weights_only=True)
    (held,) = state["task"]
    assert list(held) == ["0/1"] and held["0/1"]["step"] == 6
    assert [s.shape for s in held["0/1"]["states"]] == [(4, MEM, 16)]


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    Trainer(tiny_model(dropout=0.0), task(), config(), tmp_path / "a").fit()
    Trainer(tiny_model(dropout=0.0), task(), config(grad_accum=2), tmp_path / "b").fit()
    np.testing.assert_allclose(losses(tmp_path / "a"), losses(tmp_path / "b"), atol=1e-5)


def test_evaluation_in_order_with_long_memory_equals_one_pass():
    model = tiny_model(dropout=0.0).eval()
    t = task(eval_mem_len=10_000)
    t.n_eval_batches = None  # the whole validation stream
    result = evaluate_streams(model, t.eval_batches(0, 1), t)
    n = t.val.n_segments * SEG
    ids = torch.from_numpy(t.val.rows[:, :n + 1].astype(np.int64))
    with torch.no_grad():
        logits = model(ids[:, :n], model.new_memory(2, 0)).logits
    expected = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    assert result["val_tokens"] == 2 * n
    assert result["val_loss"] == pytest.approx(expected.item(), abs=1e-5)


def test_document_separator_marks_resets():
    tokens = np.array([1, 2, 0, 3, 4, 5, 0, 6, 7, 8, 9, 1, 2], dtype=np.uint16)  # 0 separates
    streams = TokenStreams(tokens, 1, 3, separator=0)
    resets = torch.cat([streams.segment(g, slice(0, 1))["resets"] for g in range(4)], 1)[0]
    assert resets.tolist() == [False, False, False, True, False, False, False, True, False,
                               False, False, False]


def test_greedy_generation_with_memory_equals_full_forward():
    model = tiny_model(dropout=0.0)
    prompt = TOKENS[:19].tolist()  # more than two segments of prompt
    out = generate(model, prompt, 6, GREEDY, mem_len=100)
    with torch.no_grad():
        logits = model(out[None, :-1], model.new_memory(1, 0)).logits[0]
    assert out[:19].tolist() == prompt
    assert out[19:].equal(logits[18:].argmax(-1))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="a segment of 64 tokens needs 65 tokens per stream, but the "
                                         "600 validation tokens cut into 10 streams give 60"):
        TokenStreams(TOKENS[:600], 10, 64, name="validation")
    with pytest.raises(ConfigError, match="4 streams cannot be split into 3 equal shards"):
        task().train_batch(0, 0, 3)
    with pytest.raises(ConfigError, match="mem_len must be >= 0"):
        SegmentLMTask(task().train, task().val, mem_len=-1, eval_mem_len=4)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(tiny_model(), [], 3, GREEDY)


def write_recipe(tmp_path, **data):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the king speaks of love and war, my lord\n" * 300, encoding="utf-8")
    recipe = load_recipe("src/tformer/recipes/transformer-xl-shakespeare.yaml", [
        f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}",
        "model.n_layers=1", "model.d_model=16", "model.n_heads=2", "model.d_ff=32",
        "model.seg_len=16", "model.mem_len=16", "model.eval_mem_len=32", "training.max_steps=3",
        "training.warmup_steps=1",
        "training.batch_size=2", "training.eval_every=3", "training.eval_batches=2",
        "training.device=cpu", "sample.tokens=8", *[f"data.{k}={v}" for k, v in data.items()]])
    return recipe


def test_shipped_recipe_trains_evaluates_and_samples(tmp_path):
    recipe = write_recipe(tmp_path)
    assert recipe.task == "segment_lm" and recipe.model["preset"] == "txl-mini"
    assert train_recipe(recipe).step == 3
    result = evaluate_run(tmp_path / "run")
    assert result["eval_mem_len"] == 32 and result["val_tokens"] > 0
    assert (tmp_path / "run" / "samples.txt").read_text().strip()


def test_recipe_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="document_separator='the' encodes to 3 tokens"):
        train_recipe(write_recipe(tmp_path, document_separator="the"))
    bad = recipe_from_dict({"task": "segment_lm", "model": {"preset": "gpt-nano"},
                            "data": {"source": str(tmp_path / "corpus.txt")},
                            "run_dir": str(tmp_path / "gpt")})
    with pytest.raises(ConfigError, match="task segment_lm needs a model that is a MemoryLM; preset 'gpt-nano' builds a gpt"):
        train_recipe(bad)
