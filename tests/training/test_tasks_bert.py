"""BERT tasks: masking follows 15% / 80-10-10 and keeps whole words together; batches are a
pure function of (seed, step) and shard exactly; masked-LM pre-training feeds a classifier via
model.init_from; evaluation reports accuracy / macro F1 (equal to scikit-learn's), writes a
confusion matrix and refuses unseen labels; bad recipes fail before anything is written."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tformer.config import ConfigError
from tformer.data.labelled import LabelledDataError, SpecialIds
from tformer.tokenizers import BPETokenizer, CharTokenizer, HFJsonTokenizer
from tformer.runs import CheckpointError, checkpoint, find_checkpoint, open_run
from tformer.training.recipe import evaluate_run, load_recipe, prepare, recipe_from_dict, train_recipe
from tformer.training.tasks import classification
from tformer.training.tasks.masked_lm import IGNORE, Masker, word_boundaries

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
GOOD, BAD = "good great lovely fine superb nice".split(), "bad awful poor dull grim nasty".split()
FILLER = "the film food was really quite and service a".split()
RECIPES = Path(__file__).resolve().parents[2] / "src" / "tformer" / "recipes"
EMOTIONS = Path(__file__).resolve().parents[2] / "examples" / "emotion-sample.tsv"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root, rng = tmp_path_factory.mktemp("bert-data"), random.Random(0)
    lines = []
    for i in range(120):
        label, words = ("pos", GOOD) if i % 2 else ("neg", BAD)
        text = " ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 6))) + " " + rng.choice(words)
        lines.append(f"{label}\t{text}")
    (root / "reviews.tsv").write_text("label\ttext\n" + "\n".join(lines) + "\n")
    (root / "story.txt").write_text("\n".join(" ".join(rng.choice(FILLER + GOOD + BAD) for _ in range(9))
                                              for _ in range(300)))
    return {"tsv": root / "reviews.tsv", "txt": root / "story.txt", "root": root}


def recipe(task: str, run_dir: Path, data: dict, *, steps: int = 8, **model) -> object:
    return recipe_from_dict({
        "task": task, "model": {"preset": "bert-tiny", "n_layers": 1, "d_model": 32, "n_heads": 2,
                                "context_length": 32, "dropout": 0.0, "attn_dropout": 0.0, **model},
        "tokenizer": {"kind": "bpe", "vocab_size": 300, "special_tokens": SPECIALS},
        "data": data, "run_dir": str(run_dir),
        "training": {"max_steps": steps, "batch_size": 8, "lr": 5e-3, "warmup_steps": 2,
                     "eval_every": steps, "eval_batches": 2, "log_every": steps}})


def with_init(r, init_from: Path):
    return dataclasses.replace(r, model={**r.model, "init_from": str(init_from)})


def test_masking_rates_and_specials() -> None:
    specials = SpecialIds(cls=0, sep=1, pad=2, mask=3)
    masker = Masker(100, specials, [0, 1, 2, 3])
    ids = np.random.default_rng(0).integers(4, 100, (400, 50))
    ids[:, 0], ids[:, -1] = 0, 1
    inputs, targets = masker(ids, np.random.default_rng(1))
    selected = targets != IGNORE
    assert abs(selected[:, 1:-1].mean() - 0.15) < 0.01 and not selected[:, [0, -1]].any()
    assert (targets[selected] == ids[selected]).all()
    masked, kept = (inputs[selected] == 3).mean(), (inputs[selected] == ids[selected]).mean()
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02  # the rest: random tokens (~10%)
    again = masker(ids, np.random.default_rng(1))
    assert (again[0] == inputs).all() and (again[1] == targets).all()


def test_whole_word_masking_keeps_words_together() -> None:
    starts = np.ones(60, dtype=bool)
    starts[30:] = False  # ids 30.. are "##" continuations
    masker = Masker(60, SpecialIds(0, 1, 2, 3), [0, 1, 2, 3], mask_prob=0.3,
                    boundaries=(starts, np.zeros(60, dtype=bool)))
    rng = np.random.default_rng(0)
    pieces = rng.integers(30, 60, (200, 40))  # "##" continuations
    ids = np.where(rng.random((200, 40)) < 0.5, rng.integers(4, 30, (200, 40)), pieces)
    ids[:, 0] = 0
    _, targets = masker(ids, rng)
    selected = targets != IGNORE
    opens = starts[ids]
    opens[:, :2] = True  # [CLS], then a word opens after it even at a continuation piece
    word = np.cumsum(opens, axis=1)
    for row in range(200):
        for w in np.unique(word[row]):
            members = selected[row][word[row] == w]
            assert members.all() or not members.any()
    assert 0.2 < selected.mean() < 0.4


def test_word_boundaries_of_real_tokenizers(files: dict) -> None:
    bpe = BPETokenizer.train([files["txt"]], 300, special_tokens=SPECIALS)
    starts, _ = word_boundaries(bpe)
    ids = bpe.encode("the film was great")
    assert starts[ids].sum() == 3  # " film", " was", " great": one space-prefixed piece each
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + ["play", "##ing", "##ed", "the"])}
    wordpiece = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok = HFJsonTokenizer(json.loads(wordpiece.to_str()))
    starts, _ = word_boundaries(tok)
    assert starts[tok.encode("the playing")].tolist() == [True, True, False]
    with pytest.raises(ConfigError, match="whole_word needs"):
        word_boundaries(CharTokenizer.train(["abc"]))


def test_batches_are_pure_and_shard_exactly(files: dict, tmp_path: Path) -> None:
    mlm = prepare(recipe("masked_lm", tmp_path / "m", {"sources": [str(files["txt"]), str(files["tsv"])],
                                                        "max_length": 16, "whole_word": True}))
    clf = prepare(recipe("classification", tmp_path / "c", {"source": str(files["tsv"])}))
    for task in (mlm.task, clf.task):
        whole = task.train_batch(7, 0, 1)
        again = task.train_batch(7, 0, 1)
        halves = [task.train_batch(7, shard, 2) for shard in range(2)]
        for key, value in whole.tensors.items():
            assert torch.equal(value, again[key])
            if key == "ids" and task is clf.task:  # shards pad to their own longest sentence
                continue
            assert torch.equal(value, torch.cat([h[key] for h in halves]))
    assert (mlm.task.train_batch(0, 0, 1)["ids"][:, 0] == mlm.tokenizer.special_tokens["[CLS]"]).all()
    order = clf.task.epoch_order(0)
    assert sorted(order.tolist()) == list(range(len(clf.task.train_rows)))


def test_pretrain_then_fine_tune_from_it(files: dict, tmp_path: Path) -> None:
    mlm = recipe("masked_lm", tmp_path / "mlm", {"sources": [str(files["txt"])], "max_length": 16})
    train_recipe(mlm)
    assert 0 <= evaluate_run(tmp_path / "mlm")["masked_accuracy"] <= 1
    tuned = recipe("classification", tmp_path / "clf", {"source": str(files["tsv"]), "fold": 1,
                                                        "val_fraction": 0.1}, steps=40, pooling="mean")
    with pytest.raises(ConfigError, match="tokenizer.kind=file"):  # a fresh BPE would not fit the weights
        prepare(with_init(tuned, tmp_path / "mlm"))
    assert not (tmp_path / "clf").exists()
    tuned = dataclasses.replace(with_init(tuned, tmp_path / "mlm"), tokenizer=dataclasses.replace(
        tuned.tokenizer, kind="file", path=str(tmp_path / "mlm" / "tokenizer.json")))
    start = prepare(tuned).model.state_dict()
    pretrained = checkpoint.load_config(tmp_path / "mlm" / "checkpoints" / "best")
    assert pretrained["model_config"]["head"] == "mlm"
    pretrained_weights = open_run(tmp_path / "mlm").model.state_dict()
    for name in ("tok_emb.weight", "blocks.0.attn.qkv_proj.weight", "emb_norm.bias"):
        assert torch.equal(start[name], pretrained_weights[name])
    train_recipe(tuned)
    result = evaluate_run(tmp_path / "clf")
    assert result["labels"] == ["neg", "pos"] and result["split"] == "fold 1 of 5"
    progress = checkpoint.load_progress(tmp_path / "clf" / "checkpoints" / "best")
    assert progress["best_val_loss"] < 0.6 and result["accuracy"] > 0.6  # learned; chance: ln 2, 0.5
    assert (tmp_path / "clf" / "confusion.png").stat().st_size > 1000
    stored = checkpoint.load_config(tmp_path / "clf" / "checkpoints" / "best")
    assert stored["model_config"]["labels"] == ["neg", "pos"]


def test_any_label_set_and_unseen_labels_at_evaluation(tmp_path: Path) -> None:
    r = recipe("classification", tmp_path / "emo", {"source": str(EMOTIONS), "val_fraction": 0.3}, steps=4)
    train_recipe(r)
    result = evaluate_run(tmp_path / "emo")
    assert result["labels"] == ["anger", "fear", "joy", "love", "sadness", "surprise"]
    assert np.array(result["confusion"]).sum() == result["examples"]
    before = {p: p.read_bytes() for p in (tmp_path / "emo" / "checkpoints").rglob("*") if p.is_file()}
    (tmp_path / "new.tsv").write_text("label\ttext\njoy\tHooray!\ndisgust\tThe sink smelled awful.\n")
    saved = json.loads((tmp_path / "emo" / "checkpoints" / "best" / "config.json").read_text())
    saved["recipe"]["data"]["test_source"] = str(tmp_path / "new.tsv")
    run = open_run(tmp_path / "emo")
    with pytest.raises(LabelledDataError, match=r"new.tsv line 3: label 'disgust' is not one the model"):
        classification.evaluate(recipe_from_dict(saved["recipe"]).settings, run.model, run.tokenizer)
    assert before == {p: p.read_bytes() for p in (tmp_path / "emo" / "checkpoints").rglob("*") if p.is_file()}


def test_too_long_can_be_refused(files: dict, tmp_path: Path) -> None:
    r = recipe("classification", tmp_path / "long", {"source": str(files["tsv"]), "max_length": 4,
                                                     "too_long": "error"})
    with pytest.raises(LabelledDataError, match=r"reviews.tsv line \d+: the text is \d+ tokens"):
        prepare(r)
    with pytest.raises(ConfigError, match="exceeds the model's context_length"):
        prepare(recipe("classification", tmp_path / "l2", {"source": str(files["tsv"]), "max_length": 64}))


def test_init_from_is_checked_before_anything_is_written(files: dict, tmp_path: Path) -> None:
    r = with_init(recipe("classification", tmp_path / "run", {"source": str(files["tsv"])}), tmp_path)
    with pytest.raises(CheckpointError, match="holds no tformer checkpoint"):
        prepare(r)
    assert not (tmp_path / "run").exists()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ConfigError, match="Hugging Face checkpoint, not a tformer run; convert it once"):
        find_checkpoint(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        find_checkpoint(tmp_path / "missing")


def test_freeze_keeps_named_parameters_fixed(files: dict, tmp_path: Path) -> None:
    r = recipe("classification", tmp_path / "f", {"source": str(files["tsv"])})
    model = prepare(dataclasses.replace(r, model={**r.model, "freeze": ["tok_emb", "blocks.0.attn"]})).model
    assert not model.tok_emb.weight.requires_grad and not model.blocks[0].attn.qkv_proj.weight.requires_grad
    assert model.blocks[0].ffn.up.weight.requires_grad and model.head.classifier.weight.requires_grad
    with pytest.raises(ConfigError, match="'embeddings' names no parameters"):
        prepare(dataclasses.replace(r, model={**r.model, "freeze": ["embeddings"]}))


@pytest.mark.parametrize("path", sorted(RECIPES.glob("bert-*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_are_valid(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.task in ("masked_lm", "classification")


def test_a_fold_is_the_test_split_and_never_picks_the_checkpoint(files: dict, tmp_path: Path) -> None:
    """With data.fold=K the best checkpoint was chosen on fold K, then fold K was scored."""
    data = classification.DataSpec(source=str(files["tsv"]), fold=1, val_fraction=0.25)
    train, val, test = classification._splits(data)
    assert len(test) == 24 and not set(test.lines) & (set(train.lines) | set(val.lines))
    assert not set(train.lines) & set(val.lines) and len(train) + len(val) + len(test) == 120
    assert sorted(set(val.labels)) == ["neg", "pos"] and len(val) == 24  # stratified 25% of 96
    task = prepare(recipe("classification", tmp_path / "f", {"source": str(files["tsv"]), "fold": 1,
                                                             "val_fraction": 0.25})).task
    assert len(task.val_rows) == len(val) and len(task.train_rows) == len(train)


def test_one_class_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "one.tsv"
    path.write_text("label\ttext\n" + "".join(f"pos\tgood film {i}\n" for i in range(30)))
    with pytest.raises(ConfigError, match=r"one.tsv holds one label \('pos'\): a classifier needs at least 2"):
        prepare(recipe("classification", tmp_path / "one", {"source": str(path)}))
    assert not (tmp_path / "one").exists()
    with pytest.raises(ConfigError, match=r"data.labels=\['pos'\] names one class"):
        recipe("classification", tmp_path / "one", {"source": str(path), "labels": ["pos"]})
