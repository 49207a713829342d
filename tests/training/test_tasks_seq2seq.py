"""The seq2seq task: label smoothing, shards that add up to the global batch, validation loss as
a per-token mean, special tokens, and a recipe trained and evaluated end to end (BLEU, chrF,
translations in the run directory)."""

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tformer.config import ConfigError
from tformer.models.seq2seq import Seq2Seq, Seq2SeqConfig
from tformer.tokenizers import BPETokenizer
from tformer.training.recipe import evaluate_run, recipe_from_dict, train_recipe
from tformer.training.tasks.seq2seq import EncodedSplit, Seq2SeqTask, label_smoothed_loss, special_ids

SPECIAL = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
WORDS = {"eins": "one", "zwei": "two", "drei": "three", "vier": "four", "fünf": "five",
         "sechs": "six", "sieben": "seven", "acht": "eight"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def random_split(n: int, seed: int) -> EncodedSplit:
    rng = random.Random(seed)
    sources = [[rng.randrange(3, 30) for _ in range(rng.randint(1, 9))] for _ in range(n)]
    return EncodedSplit(sources, [s[::-1] + [3] for s in sources])


def tiny_model() -> Seq2Seq:
    torch.manual_seed(0)
    return Seq2Seq(Seq2SeqConfig(vocab_size=30, context_length=16, n_encoder_layers=1,
                                 n_decoder_layers=1, n_heads=2, d_model=16, d_ff=32, dropout=0.0))


def test_label_smoothing_matches_its_definition():
    logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    labels[1, 3:] = -100
    log_p = logits.log_softmax(-1)[labels != -100]  # (N, V)
    real = labels[labels != -100]
    nll = -log_p.gather(1, real[:, None]).squeeze(1)
    expected = (0.9 * nll - 0.1 * log_p.mean(-1)).mean()  # (1 - e) one-hot + e uniform
    torch.testing.assert_close(label_smoothed_loss(logits, labels, 0.1), expected)
    plain = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(label_smoothed_loss(logits, labels, 0.0), plain)


def test_shards_add_up_to_the_global_batch():
    task = Seq2SeqTask(random_split(60, 0), random_split(20, 1), special=SPECIAL, tokens_per_batch=60,
                       seed=5, label_smoothing=0.1)
    model = tiny_model().train()
    whole = task.train_batch(4, 0, 1)
    shards = [task.train_batch(4, s, 3) for s in range(3)]
    assert sum(len(s["src_ids"]) for s in shards) == len(whole["src_ids"])
    assert torch.equal(task.train_batch(4, 1, 3)["src_ids"], shards[1]["src_ids"])  # a pure function
    mean_of_shards = sum(task.loss(model, s) for s in shards) / 3  # what accumulation computes
    torch.testing.assert_close(mean_of_shards, task.loss(model, whole))
    with pytest.raises(ConfigError, match="fewer than the 99 shards"):
        task.train_batch(0, 0, 99)


def test_validation_loss_is_the_per_token_mean():
    valid = random_split(40, 2)
    task = Seq2SeqTask(random_split(10, 0), valid, special=SPECIAL, tokens_per_batch=50, seed=0,
                       label_smoothing=0.1)
    model = tiny_model().eval()
    with torch.no_grad():
        for world in (1, 2, 3):  # the Trainer: mean over batches on each rank, then over ranks
            per_rank = [np.mean([float(task.loss(model, b)) for b in task.eval_batches(r, world)])
                        for r in range(world)]
            logits_all = [task.loss(model, b) * b.context for b in task.eval_batches(0, 1)]
            total = sum(len(t) + 1 for t in valid.targets)
            assert np.mean(per_rank) == pytest.approx(float(sum(logits_all)) / total, rel=1e-5)


def test_tokenizer_without_special_tokens_is_refused():
    tokenizer = BPETokenizer.train(iter(["ein Haus"] * 3), vocab_size=260)
    with pytest.raises(ConfigError, match=r"set tokenizer.special_tokens: \['<pad>', '<bos>', '<eos>'\]"):
        special_ids(tokenizer)


def number_pairs(path, n: int = 400):
    rng = random.Random(0)
    lines = ["de\ten"]
    for _ in range(n):
        words = [rng.choice(list(WORDS)) for _ in range(rng.randint(1, 4))]
        lines.append(" ".join(words) + ".\t" + " ".join(WORDS[w] for w in words) + ".")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_recipe_trains_and_evaluates_end_to_end(tmp_path):
    number_pairs(tmp_path / "numbers.tsv")
    recipe = recipe_from_dict({
        "task": "seq2seq",
        "model": {"preset": "nmt-tiny", "n_encoder_layers": 1, "n_decoder_layers": 1, "d_model": 32,
                  "d_ff": 64, "context_length": 24, "dropout": 0.0},
        "tokenizer": {"kind": "bpe", "vocab_size": 300, "special_tokens": ["<pad>", "<bos>", "<eos>"]},
        "data": {"source": str(tmp_path / "numbers.tsv"), "src_column": "de", "tgt_column": "en",
                 "valid_pairs": 20, "test_pairs": 20, "tokens_per_batch": 200, "beam_width": 2,
                 "n_samples": 2},
        "training": {"max_steps": 100, "lr": 5.0e-3, "warmup_steps": 5, "eval_every": 50,
                     "log_every": 10, "device": "cpu", "seed": 1},
        "run_dir": str(tmp_path / "run"),
    })
    result = train_recipe(recipe)
    assert result.step == 100 and result.best_val_loss < 2.0
    scores = evaluate_run(tmp_path / "run")
    assert scores["chrf"] > 30 and 0 <= scores["bleu"] <= 100 and scores["test_pairs"] == 20
    rows = (tmp_path / "run" / "translations.tsv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "source\treference\thypothesis" and len(rows) == 21
    assert "=> " in (tmp_path / "run" / "samples.txt").read_text(encoding="utf-8")
    config = json.loads((tmp_path / "run" / "checkpoints" / "best" / "config.json").read_text())
    assert config["model_family"] == "seq2seq" and config["model_config"]["eos_id"] == 2
    from tformer.cli import main

    source = rows[1].split("\t")[0]
    assert main(["translate", str(tmp_path / "run"), source, "--beam", "2"]) == 0
    assert main(["generate", str(tmp_path / "run")]) == 2  # a translation model: says to use translate


def test_bad_pairs_stop_before_anything_is_written(tmp_path):
    (tmp_path / "bad.tsv").write_text("de\ten\neins.\tone.\nzwei.\n", encoding="utf-8")
    recipe = recipe_from_dict({"task": "seq2seq", "model": {"preset": "nmt-tiny"},
                               "data": {"source": str(tmp_path / "bad.tsv")},
                               "run_dir": str(tmp_path / "run")})
    with pytest.raises(ValueError, match=r"bad\.tsv:3: expected 2 TSV fields"):
        train_recipe(recipe)
    assert not (tmp_path / "run").exists()
