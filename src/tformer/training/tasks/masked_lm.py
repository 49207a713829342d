"""Masked language modelling (BERT pre-training, Devlin et al. 2019 section 3.1): 15% of the
tokens of random [CLS] window [SEP] examples are selected; of those 80% become [MASK], 10% a
random token and 10% stay; the loss is cross-entropy at the selected tokens only.

Whole-word masking selects words, not pieces: a word starts at a WordPiece token without "##",
or at a byte-level BPE token that begins with (or follows one that ends with) whitespace. A
step's batch and its masks are a pure function of (seed, step), as in causal_lm.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.config import ConfigError, check_fraction, check_positive
from tformer.data.datasets import DATASETS
from tformer.data.labelled import FORMATS, SpecialIds, load_labelled, special_ids
from tformer.data.text import TokenizedCorpus, causal_lm_batch, eval_batches, load_text
from tformer.training.settings import TaskSettings
from tformer.training.tasks.base import Batch, TaskData, shard_rows
from tformer.training.tasks.causal_lm import text_fingerprint, token_cache_dir
from tformer.training.tasks.classification import input_length

log = logging.getLogger(__name__)

NEEDS = None  # any model with the fields below (a BERT: head="mlm")

IGNORE = -100
SPACE_CHARS = "\u0120\u010a\u0109\u010d"  # byte-level BPE's space, \n, \t, \r


@dataclass(frozen=True)
class DataSpec:
    # text datasets, .txt files or folders; labelled data (.tsv/.csv/.jsonl or a labelled dataset)
    # gives its text column. Each source is split into train/val on its own.
    sources: tuple[str, ...] = ("shakespeare",)
    text_column: str = "text"
    val_fraction: float = 0.05
    max_length: int | None = None  # tokens per example with [CLS] and [SEP]; None: the model's limit
    mask_prob: float = 0.15
    whole_word: bool = False
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", (self.sources,) if isinstance(self.sources, str)
                           else tuple(self.sources))
        if not self.sources:
            raise ConfigError("data.sources needs at least one text source")
        check_fraction("data.val_fraction", self.val_fraction)
        check_fraction("data.mask_prob", self.mask_prob)
        check_positive("data.mask_prob", self.mask_prob)
        if self.max_length is not None and self.max_length < 3:
            raise ConfigError(f"data.max_length must be >= 3 ([CLS] token [SEP]), got {self.max_length}")


def source_text(source: str, text_column: str = "text") -> str:
    """The text of a text source, or the texts of labelled data one per line."""
    labelled = (source in DATASETS and DATASETS[source].kind == "labelled-sentences") or (
        source not in DATASETS and source.rsplit(".", 1)[-1].lower() in FORMATS)
    if labelled:
        return "\n".join(load_labelled(source, text_column=text_column, label_column=text_column).texts)
    return load_text(source)


def word_boundaries(tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) bool tables over the vocabulary: a token opens a word / ends in whitespace."""
    data = tokenizer.to_dict() if hasattr(tokenizer, "to_dict") else {}
    inner = data.get("tokenizer", data)
    model = inner.get("model") or {}
    vocab: dict[str, int] = model.get("vocab") if isinstance(model.get("vocab"), dict) else {}
    starts = np.ones(tokenizer.vocab_size, dtype=bool)
    ends = np.zeros(tokenizer.vocab_size, dtype=bool)
    if model.get("type") == "WordPiece":
        prefix = model.get("continuing_subword_prefix") or "##"
        for token, i in vocab.items():
            starts[i] = not token.startswith(prefix)
    elif model.get("type") == "BPE" and (inner.get("pre_tokenizer") or {}).get("type") == "ByteLevel":
        for token, i in vocab.items():
            starts[i], ends[i] = token[:1] in SPACE_CHARS, token[-1:] in SPACE_CHARS
    else:
        raise ConfigError("data.whole_word needs a WordPiece or byte-level BPE tokenizer (tokenizer.kind="
                          "bpe or a BERT tokenizer.json)")
    return starts, ends


class Masker:
    """BERT's 80/10/10 masking of int64 id arrays (B, T); specials are never selected."""

    def __init__(self, vocab_size: int, specials: SpecialIds, special_ids: Iterable[int], *,
                 mask_prob: float = 0.15, boundaries: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.specials, self.mask_prob, self.boundaries = specials, mask_prob, boundaries
        self.special_ids = np.array(sorted(set(special_ids)), dtype=np.int64)
        self.normal_ids = np.setdiff1d(np.arange(vocab_size), self.special_ids)

    def _select(self, ids: np.ndarray, maskable: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        draws = rng.random(ids.shape)
        if self.boundaries is None:
            selected = (draws < self.mask_prob) & maskable
        else:  # one draw per word: tokens of a word share their word's draw
            starts, ends = self.boundaries
            opens = starts[ids] | ~maskable
            opens[:, 1:] |= ends[ids[:, :-1]] | ~maskable[:, :-1]
            opens[:, 0] = True
            word = np.cumsum(opens, axis=1) - 1  # (B, T) word index within its row
            selected = (np.take_along_axis(draws, word, axis=1) < self.mask_prob) & maskable
        empty = np.flatnonzero(~selected.any(axis=1) & maskable.any(axis=1))
        if len(empty):  # every example teaches something: one random maskable token
            pick = np.argmax(rng.random((len(empty), ids.shape[1])) * maskable[empty], axis=1)
            selected[empty, pick] = True
        return selected

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets): targets are the original ids at selected positions, -100 elsewhere."""
        maskable = ~np.isin(ids, self.special_ids)
        selected = self._select(ids, maskable, rng)
        targets = np.where(selected, ids, IGNORE)
        roll = rng.random(ids.shape)
        inputs = ids.copy()
        inputs[selected & (roll < 0.8)] = self.specials.mask
        swap = selected & (roll >= 0.8) & (roll < 0.9)
        inputs[swap] = rng.choice(self.normal_ids, size=int(swap.sum()))
        return inputs, targets


def masked_lm_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Cross-entropy at the selected tokens; the head runs only there (predict_at)."""
    selected = batch["targets"] != IGNORE
    logits = model(batch["ids"], predict_at=selected)  # (N, V)
    return F.cross_entropy(logits.float(), batch["targets"][selected])


class MaskedLMTask:
    """[CLS] window [SEP] examples from a token stream, masked per (seed, step)."""

    name = "masked_lm"

    def __init__(self, train_tokens: np.ndarray, val_tokens: np.ndarray, masker: Masker, *,
                 max_length: int, batch_size: int, seed: int, n_eval_batches: int = 20,
                 tokenizer: Any = None) -> None:
        self.train_tokens, self.val_tokens, self.masker = train_tokens, val_tokens, masker
        self.window, self.batch_size, self.seed = max_length - 2, batch_size, seed
        self.n_eval_batches, self.tokenizer = n_eval_batches, tokenizer
        self._eval: list[dict[str, Tensor]] | None = None

    def _example(self, windows: Tensor, rng: np.random.Generator) -> dict[str, Tensor]:
        s, rows = self.masker.specials, windows.shape[0]
        ids = np.concatenate([np.full((rows, 1), s.cls), windows.numpy(), np.full((rows, 1), s.sep)], axis=1)
        inputs, targets = self.masker(ids, rng)
        return {"ids": torch.from_numpy(inputs), "targets": torch.from_numpy(targets)}

    @staticmethod
    def _batch(tensors: dict[str, Tensor]) -> Batch:
        return Batch(tensors, tensors["ids"].shape[0], tensors["ids"].numel())

    def train_batch(self, step: int, shard: int, n_shards: int) -> Batch:
        windows, _ = causal_lm_batch(self.train_tokens, self.batch_size, self.window, step, self.seed)
        tensors = self._example(windows, np.random.default_rng([self.seed, step, 7]))
        return self._batch(shard_rows(tensors, shard, n_shards))

    def eval_batches(self, rank: int, world_size: int) -> Iterable[Batch]:
        if self._eval is None:  # tensors of the whole batches, built once
            batches = eval_batches(self.val_tokens, self.batch_size, self.window, self.n_eval_batches,
                                   self.seed)
            self._eval = [self._example(x, np.random.default_rng([self.seed, i, 8]))
                          for i, (x, _) in enumerate(batches)]
        for tensors in self._eval:
            yield self._batch(shard_rows(tensors, rank, world_size))

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return masked_lm_loss(model, batch)

    def samples(self, model: nn.Module) -> list[str]:
        """The first validation example's masked tokens: what the model fills in vs the truth."""
        if self.tokenizer is None:
            return []
        batch = next(iter(self.eval_batches(0, 1)))
        ids, targets = batch["ids"][:1], batch["targets"][:1]
        with torch.no_grad():
            guesses = model(ids, predict_at=targets != IGNORE).argmax(-1).tolist()
        truth = targets[targets != IGNORE].tolist()
        pairs = [f"{self.tokenizer.decode([g]).strip()}/{self.tokenizer.decode([t]).strip()}"
                 for g, t in zip(guesses, truth)]
        return ["predicted/true at masked tokens: " + "  ".join(pairs[:30])]


def _corpus(data: DataSpec, tokenizer: Any, texts: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation tokens: each source split on its own, then concatenated."""
    trains, vals = [], []
    texts = [source_text(s, data.text_column) for s in data.sources] if texts is None else texts
    for source, text in zip(data.sources, texts):
        corpus = TokenizedCorpus.from_text(text, tokenizer, token_cache_dir(data.cache_dir),
                                           data.val_fraction, name=source)
        trains.append(np.asarray(corpus.train))
        vals.append(np.asarray(corpus.val))
    return np.concatenate(trains), np.concatenate(vals)


def _task(settings: TaskSettings, tokenizer: Any, max_length: int,
          texts: list[str] | None = None) -> MaskedLMTask:
    data: DataSpec = settings.data
    specials = special_ids(tokenizer, need_mask=True)
    boundaries = word_boundaries(tokenizer) if data.whole_word else None
    masker = Masker(tokenizer.vocab_size, specials, tokenizer.special_tokens.values(),
                    mask_prob=data.mask_prob, boundaries=boundaries)
    train, val = _corpus(data, tokenizer, texts)
    t = settings.training
    return MaskedLMTask(train, val, masker, max_length=max_length, batch_size=t.batch_size, seed=t.seed,
                        n_eval_batches=t.eval_batches, tokenizer=tokenizer)


def _max_length(settings: TaskSettings, model: nn.Module) -> int:
    return input_length(settings.data.max_length, model.config.context_length)  # type: ignore[union-attr]


def prepare(settings: TaskSettings, tokenizer_for: Any) -> TaskData:
    """Tokenizer (trained on the sources once, or the init_from run's); the model takes a
    masked-LM head over its vocabulary."""
    data: DataSpec = settings.data
    texts = [source_text(s, data.text_column) for s in data.sources]  # read once
    tokenizer = tokenizer_for(lambda: texts)
    special_ids(tokenizer, need_mask=True)  # before building anything
    if data.whole_word:
        word_boundaries(tokenizer)
    return TaskData(tokenizer, {"vocab_size": tokenizer.vocab_size, "head": "mlm", "labels": ()},
                    lambda model: _task(settings, tokenizer, _max_length(settings, model), texts),
                    notes=text_fingerprint(texts))


def evaluate(settings: TaskSettings, model: nn.Module, tokenizer: Any) -> dict[str, Any]:
    """Masked-LM loss, perplexity and accuracy at the masked tokens of the validation batches."""
    task = _task(settings, tokenizer, _max_length(settings, model))
    losses, correct, total = [], 0, 0
    with torch.no_grad():
        for batch in task.eval_batches(0, 1):
            selected = batch["targets"] != IGNORE
            logits = model(batch["ids"], predict_at=selected)
            losses.append(float(F.cross_entropy(logits.float(), batch["targets"][selected])))
            correct += int((logits.argmax(-1) == batch["targets"][selected]).sum())
            total += int(selected.sum())
    val_loss = sum(losses) / len(losses)
    return {"val_loss": val_loss, "perplexity": float(np.exp(val_loss)), "masked_accuracy": correct / total,
            "masked_tokens": total}
