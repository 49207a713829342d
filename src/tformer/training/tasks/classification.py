"""Sentence classification with a BERT (sentiment, emotion, topic, ...): labelled sentences from
a TSV / CSV / JSONL file or a named dataset; the label set is whatever the data says.

Validation is a stratified hold-out; with `data.fold=K` fold K of a stratified k-fold split is
the test split `evaluate` scores, and validation is carved out of the other folds. `evaluate`
reports accuracy and macro F1 and writes a confusion-matrix PNG into the run directory. The label names
are part of the model's config, so they are stored with every checkpoint of the run.

Adversarial training (`training.adversarial: embedding`): each training batch's loss is
(1 - w) * clean + w * the loss with an L-inf perturbation of the content tokens' embeddings
(`attacks.embedding.pgd_embeddings`, found in eval mode against the current weights, FreeLB /
Madry-style); validation stays clean. Its random start is a pure function of (seed, step,
shard), so a resumed run makes the same perturbations. `pgd` (pixels) is for image classifiers.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.attacks.embedding import adversarial_loss, find_token_embedding, pgd_embeddings
from tformer.config import ConfigError, check_choice, check_fraction, check_positive
from tformer.data.labelled import (
    FORMATS,
    TOO_LONG,
    LabelledSentences,
    encode_sentences,
    fold_split,
    label_ids,
    load_labelled,
    pad_rows,
    sort_labels,
    special_ids,
    train_val_split,
)
from tformer.metrics.classification import classification_metrics, plot_confusion
from tformer.models.protocols import TextClassifier
from tformer.training.settings import TaskSettings, TrainConfig
from tformer.training.tasks.base import (Batch, EpochSampler, TaskData, data_fingerprint, eval_shards,
                                         model_device)

log = logging.getLogger(__name__)

NEEDS = TextClassifier

CONFUSION_PNG = "confusion.png"


@dataclass(frozen=True)
class DataSpec:
    source: str = "uci-sentiment"  # a labelled dataset or a .tsv/.csv/.jsonl file with a header
    format: str | None = None  # None: from the file's suffix
    text_column: str = "text"
    label_column: str = "label"
    labels: tuple[str, ...] = ()  # the classes in output order; (): the data's labels, sorted
    # validation (picks the best checkpoint): a stratified val_fraction of the data, or with
    # `fold` set, of the training folds; fold `fold` of `n_folds` (stratified k-fold) is then the
    # test split `evaluate` scores, never seen in training or in choosing the checkpoint
    val_fraction: float = 0.2
    fold: int | None = None
    n_folds: int = 5
    split_seed: int = 0  # the split, independent of training.seed
    max_length: int | None = None  # tokens per sentence with [CLS] and [SEP]; None: the model's limit
    too_long: str = "truncate"  # longer sentences: truncate (with a warning) or error (refuse)
    test_source: str | None = None  # evaluate() scores this labelled file instead of the val split

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))
        if len(self.labels) == 1:
            raise ConfigError(f"data.labels={list(self.labels)} names one class: a classifier needs at "
                              "least 2 (leave data.labels empty to take the data's labels)")
        if self.format is not None:
            check_choice("data.format", self.format, FORMATS)
        check_choice("data.too_long", self.too_long, TOO_LONG)
        check_fraction("data.val_fraction", self.val_fraction)
        check_positive("data.n_folds", self.n_folds)
        if self.fold is not None and not 0 <= self.fold < self.n_folds:
            raise ConfigError(f"data.fold must be in [0, {self.n_folds}), got {self.fold}")
        if self.fold is not None and self.val_fraction == 0:
            raise ConfigError("data.val_fraction must be > 0 with data.fold: validation is carved out of "
                              "the training folds, the fold itself is the test split")
        if self.max_length is not None and self.max_length < 3:
            raise ConfigError(f"data.max_length must be >= 3 ([CLS] token [SEP]), got {self.max_length}")


class ClassificationTask:
    """Padded batches of encoded sentences. Each epoch is a seeded permutation, bucketed by
    length (pools of `POOL_BATCHES` batches sorted by length, batch order shuffled within a
    pool) so little compute goes to padding; a step's batch is a pure function of (seed, step)."""

    name = "classification"
    POOL_BATCHES = 50

    def __init__(self, train_rows: list[np.ndarray], train_labels: np.ndarray, val_rows: list[np.ndarray],
                 val_labels: np.ndarray, *, pad_id: int, batch_size: int, seed: int,
                 label_names: tuple[str, ...] = (), val_texts: tuple[str, ...] = (),
                 adversary: TrainConfig | None = None,
                 groups: Callable[[str], np.ndarray] | None = None) -> None:
        if not train_rows or not val_rows:
            raise ConfigError(f"classification needs training and validation examples, got "
                              f"{len(train_rows)} and {len(val_rows)}")
        self.train_rows, self.train_labels = train_rows, torch.from_numpy(train_labels)
        self.val_rows, self.val_labels = val_rows, torch.from_numpy(val_labels)
        self.pad_id, self.batch_size, self.seed = pad_id, batch_size, seed
        self.label_names, self.val_texts = label_names, val_texts
        self.lengths = np.array([len(r) for r in train_rows])
        self.sampler = EpochSampler(len(train_rows), batch_size, seed, order=self.epoch_order)
        self.adversary = adversary if adversary is not None and adversary.adversarial == "embedding" else None
        self._groups, self.kept = groups, np.arange(len(train_rows))  # kept: rows of the full training split

    # -- partitioning (tasks.base.Partitionable): federated learning deals the examples out ------
    def example_labels(self) -> np.ndarray:
        return self.train_labels.numpy()

    def example_groups(self, column: str) -> np.ndarray:
        """(N,) the value of the data file's `column` (e.g. "source") for every training example."""
        if self._groups is None:
            raise ConfigError("this classification task was built without its data file: no groups to read")
        return self._groups(column)[self.kept]

    def keep_training(self, index: np.ndarray) -> ClassificationTask:
        """A copy that trains on the examples at `index` only (validation unchanged)."""
        index = np.asarray(index, dtype=np.int64)
        task = copy.copy(self)
        task.train_rows = [self.train_rows[i] for i in index]
        task.train_labels, task.lengths, task.kept = self.train_labels[index], self.lengths[index], self.kept[index]
        task.sampler = EpochSampler(len(index), self.batch_size, self.seed, order=task.epoch_order)
        return task

    def accuracy(self, model: nn.Module) -> float:
        """The share of validation sentences whose predicted class is the true one."""
        return float((self.predict(model) == self.val_labels.numpy()).mean())

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order of the training examples in `epoch` (a permutation, length-bucketed)."""
        rng, b = np.random.default_rng([self.seed, epoch]), self.batch_size
        order, pool, pieces = rng.permutation(len(self.train_rows)), b * self.POOL_BATCHES, []
        for start in range(0, len(order), pool):
            chunk = order[start:start + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches = [chunk[i:i + b] for i in range(0, len(chunk), b)]
            pieces.extend(batches[j] for j in rng.permutation(len(batches)))
        return np.concatenate(pieces)

    def _batch(self, rows: list[np.ndarray], labels: Tensor, attack_seed: int | None = None) -> Batch:
        ids, mask = pad_rows(rows, self.pad_id)
        return Batch({"ids": ids, "attention_mask": mask, "labels": labels}, len(rows), int(mask.sum()),
                     context=attack_seed)

    def train_batch(self, step: int, shard: int, n_shards: int) -> Batch:
        index = self.sampler.shard(step, shard, n_shards)
        attack_seed = int(np.random.default_rng([self.seed, step, shard, 1]).integers(2**62))
        return self._batch([self.train_rows[i] for i in index], self.train_labels[index], attack_seed)

    def eval_batches(self, rank: int, world_size: int) -> Iterable[Batch]:
        """Every validation example once, in batches of similar length; each rank a share."""
        order = np.argsort([len(r) for r in self.val_rows], kind="stable")
        for index in eval_shards(len(order), self.batch_size, rank, world_size, order):
            yield self._batch([self.val_rows[i] for i in index], self.val_labels[index])

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Cross-entropy; while training with an adversary, (1 - w) * clean + w * adversarial."""
        if self.adversary is None or not model.training:
            logits = model(batch["ids"], attention_mask=batch["attention_mask"])
            return F.cross_entropy(logits.float(), batch["labels"])
        target = getattr(model, "module", model)  # DDP / compile wrappers keep the model here
        ids, mask, labels = batch["ids"], batch["attention_mask"], batch["labels"]
        layer = self.embedding_layer(target, ids, mask)
        delta = self.adversarial_delta(target, batch, layer)
        weight = self.adversary.adversarial_weight
        loss = weight * adversarial_loss(target, ids, mask, labels, delta, layer)
        if weight < 1:
            logits = model(ids, attention_mask=mask)
            loss = loss + (1 - weight) * F.cross_entropy(logits.float(), labels)
        return loss

    def embedding_layer(self, model: nn.Module, ids: Tensor, mask: Tensor) -> nn.Module:
        """The model's token-embedding layer, probed once per model (one extra forward pass)."""
        if getattr(self, "_embedding", (None, None))[0] is not model:
            self._embedding = (model, find_token_embedding(model, ids, mask))
        return self._embedding[1]

    def adversarial_delta(self, model: nn.Module, batch: Batch, layer: nn.Module) -> Tensor:
        """The embedding perturbation (B, T, D) against the current weights, found in eval mode
        (dropout off, then back to train mode) from a random start seeded by the batch."""
        assert self.adversary is not None
        ids = batch["ids"]
        generator = torch.Generator().manual_seed(batch.context or 0)
        was_training = model.training
        model.eval()
        try:
            with torch.autocast(ids.device.type, enabled=False):
                return pgd_embeddings(model, ids, batch["attention_mask"], batch["labels"],
                                      self.adversary.adversarial_epsilon, steps=self.adversary.adversarial_steps,
                                      step_size=self.adversary.adversarial_step, generator=generator, layer=layer)
        finally:
            model.train(was_training)

    def predict(self, model: nn.Module) -> np.ndarray:
        """Predicted class of every validation example."""
        return predict(model, self.val_rows, self.pad_id, self.batch_size)

    def samples(self, model: nn.Module) -> list[str]:
        """A few validation sentences with predicted and true labels."""
        if not self.label_names or not self.val_texts:
            return []
        batch = self._batch(self.val_rows[:5], self.val_labels[:5])
        device = model_device(model)
        with torch.no_grad():
            guesses = model(batch["ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            guesses = guesses.argmax(-1).tolist()
        return [f"[{self.label_names[g]} / true {self.label_names[int(t)]}] {text}"
                for g, t, text in zip(guesses, batch["labels"], self.val_texts)]


def predict(model: nn.Module, rows: list[np.ndarray], pad_id: int, batch_size: int) -> np.ndarray:
    """The most likely class of each encoded sentence (eval mode; batched by length, returned in
    the order of `rows`)."""
    was_training, order = model.training, np.argsort([len(r) for r in rows], kind="stable")
    predicted, device = np.zeros(len(rows), dtype=np.int64), model_device(model)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            index = order[start:start + batch_size]
            ids, mask = pad_rows([rows[i] for i in index], pad_id)
            predicted[index] = model(ids.to(device), attention_mask=mask.to(device)).argmax(-1).cpu().numpy()
    model.train(was_training)
    return predicted


def _splits(data: DataSpec) -> tuple[LabelledSentences, LabelledSentences, LabelledSentences]:
    """(train, validation, test) of the data source, as the recipe splits it. With data.fold,
    test is that fold and validation a share of the other folds; else test is the validation
    split (what evaluate has always scored without a fold)."""
    sentences = load_labelled(data.source, text_column=data.text_column, label_column=data.label_column,
                              format=data.format)
    if data.fold is not None:
        train, val, test = fold_split(sentences.labels, fold=data.fold, n_folds=data.n_folds,
                                      val_fraction=data.val_fraction, seed=data.split_seed)
        return sentences.subset(train), sentences.subset(val), sentences.subset(test)
    train, val = train_val_split(sentences.labels, val_fraction=data.val_fraction, seed=data.split_seed)
    return sentences.subset(train), sentences.subset(val), sentences.subset(val)


def check_classes(labels: tuple[str, ...], source: str) -> None:
    """A classifier needs two classes at least: with one, every prediction is right (accuracy
    1.0) and nothing is learned."""
    if len(labels) < 2:
        raise ConfigError(f"{source} holds one label ({', '.join(map(repr, labels))}): a classifier needs "
                          "at least 2 classes; add examples of another class")


def _task(settings: TaskSettings, tokenizer: Any, labels: tuple[str, ...], max_length: int,
          train: LabelledSentences, val: LabelledSentences) -> ClassificationTask:
    data: DataSpec = settings.data
    specials = special_ids(tokenizer)

    def encode(part: LabelledSentences) -> list[np.ndarray]:
        return encode_sentences(part, tokenizer, specials, max_length=max_length, too_long=data.too_long)

    t = settings.training
    return ClassificationTask(encode(train), label_ids(train, labels), encode(val), label_ids(val, labels),
                              pad_id=specials.pad, batch_size=t.batch_size, seed=t.seed,
                              label_names=labels, val_texts=val.texts[:5], adversary=t,
                              groups=lambda column: column_values(data, train, column))


def column_values(data: DataSpec, part: LabelledSentences, column: str) -> np.ndarray:
    """(len(part),) str: another column of the data file (e.g. the source of a sentence) for each
    example of `part`, matched by line; a missing column or an empty value is named with its line."""
    table = load_labelled(data.source, text_column=data.text_column, label_column=column, format=data.format)
    by_line = dict(zip(table.lines, table.labels))
    return np.array([by_line[line] for line in part.lines], dtype=object)


def input_length(max_length: int | None, context_length: int) -> int:
    """data.max_length, or the model's context_length when it is None; longer is refused."""
    if max_length is None:
        return context_length
    if max_length > context_length:
        raise ConfigError(f"data.max_length={max_length} exceeds the model's context_length "
                          f"({context_length}); lower it or leave it unset")
    return max_length


def prepare(settings: TaskSettings, tokenizer_for: Any) -> TaskData:
    """Tokenizer (trained on the sentences, or the init_from run's); the model takes a sequence
    head over the data's labels. Nothing is written before the data is read."""
    data: DataSpec = settings.data
    if settings.training.adversarial == "pgd":
        raise ConfigError("training.adversarial: pgd perturbs pixels, for image classifiers; a text classifier "
                          "trains against token-embedding perturbations with training.adversarial=embedding")
    train, val, _ = _splits(data)
    labels = data.labels or sort_labels(set(train.labels) | set(val.labels))
    check_classes(labels, data.source)
    label_ids(train, labels), label_ids(val, labels)  # a label outside data.labels: named here
    tokenizer = tokenizer_for(lambda: list(train.texts))
    special_ids(tokenizer)
    log.info("classification: %d training / %d validation sentences, labels %s", len(train), len(val),
             list(labels))

    def make_task(model: nn.Module) -> ClassificationTask:
        max_length = input_length(data.max_length, model.config.context_length)  # type: ignore[union-attr]
        return _task(settings, tokenizer, labels, max_length, train, val)

    fingerprint = data_fingerprint([*train.texts, *train.labels, *val.texts, *val.labels])
    return TaskData(tokenizer, {"vocab_size": tokenizer.vocab_size, "head": "sequence", "labels": labels},
                    make_task, notes=fingerprint)


def evaluate(settings: TaskSettings, model: nn.Module, tokenizer: Any) -> dict[str, Any]:
    """Accuracy, macro F1 and per-class F1 on the validation split (or data.test_source), and
    run_dir/confusion.png. A label the model was not trained with is an error naming its line."""
    data: DataSpec = settings.data
    config = model.config  # type: ignore[union-attr]
    if data.test_source:
        val = load_labelled(data.test_source, text_column=data.text_column,
                            label_column=data.label_column, format=data.format)
    else:
        val = _splits(data)[2]
    truth = label_ids(val, config.labels)  # before any work: an unseen label is named with its line
    specials = special_ids(tokenizer)
    max_length = input_length(data.max_length, config.context_length)
    rows = encode_sentences(val, tokenizer, specials, max_length=max_length, too_long=data.too_long)
    metrics = classification_metrics(truth, predict(model, rows, specials.pad, settings.training.batch_size),
                                      len(config.labels))
    split = data.test_source or (f"fold {data.fold} of {data.n_folds}" if data.fold is not None
                                 else f"validation ({data.val_fraction:.0%})")
    png = Path(settings.run_dir) / CONFUSION_PNG
    plot_confusion(metrics["confusion"], config.labels, png, title=f"{Path(data.source).name}: {split}")
    result = {"split": split, "examples": len(val), "accuracy": metrics["accuracy"],
              "macro_f1": metrics["macro_f1"]}
    result.update({f"f1[{name}]": f1 for name, f1 in zip(config.labels, metrics["f1"])})
    return {**result, "labels": list(config.labels), "confusion": metrics["confusion"].tolist(),
            "confusion_png": str(png)}

