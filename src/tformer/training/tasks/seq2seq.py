"""Translation (sequence-to-sequence) training: sentence pairs, a joint BPE vocabulary over both
sides, batches of similar-length pairs by tokens, a label-smoothed loss, and BLEU / chrF
(sacrebleu) on a held-out test split with the translations written to the run directory.

The recipe's tokenizer needs the special tokens <pad>, <bos> and <eos>; training.batch_size is
not used (data.tokens_per_batch sizes each step's batch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.config import ConfigError, check_choice, check_fraction, check_positive
from tformer.files import write_text_atomic
from tformer.data.pairs import (IGNORE, TOO_LONG, Pair, PairsError, TokenBatches, collate_pairs,
                                encode_pairs, read_pairs, split_indices)
from tformer.inference.translate import translate
from tformer.models.protocols import ConditionalDecoder
from tformer.tokenizers.base import Tokenizer
from tformer.training.settings import TaskSettings
from tformer.training.tasks.base import Batch, TaskData, data_fingerprint

log = logging.getLogger(__name__)

NEEDS = ConditionalDecoder

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
TRANSLATIONS_FILE = "translations.tsv"


@dataclass(frozen=True)
class DataSpec:
    source: str = "de-en-sentences"  # a named sentence-pair dataset or a TSV/CSV/JSONL file
    src_column: str | int = 0  # header name (JSONL: key) or 0-based index
    tgt_column: str | int = 1
    header: bool = True  # TSV/CSV: the first line names the columns
    variant_separator: str | None = None  # keep the first of "a; b" alternatives (Ding: "; ")
    on_bad: str = "error"  # empty or misaligned pairs: "error" (names file:line) or "skip"
    valid_pairs: int = 500  # held out for the validation loss (every evaluation)
    test_pairs: int = 1000  # held out for BLEU / chrF (`tformer evaluate`)
    split_seed: int = 0
    tokens_per_batch: int = 4096  # rows x longest pair, per optimizer step
    too_long: str = "skip"  # training pairs over the context: skip | truncate | error
    label_smoothing: float = 0.1
    beam_width: int = 4  # for evaluation; 1 = greedy
    length_penalty: float = 1.0
    n_samples: int = 4  # validation translations written to samples.txt at each evaluation

    def __post_init__(self) -> None:
        check_positive("data.tokens_per_batch", self.tokens_per_batch)
        check_positive("data.beam_width", self.beam_width)
        check_positive("data.valid_pairs", self.valid_pairs)
        check_positive("data.test_pairs", self.test_pairs, allow_zero=True)
        check_fraction("data.label_smoothing", self.label_smoothing)
        check_choice("data.too_long", self.too_long, TOO_LONG)
        check_choice("data.on_bad", self.on_bad, ("error", "skip"))


def label_smoothed_loss(logits: Tensor, labels: Tensor, smoothing: float = 0.1, *,
                        reduction: str = "mean") -> Tensor:
    """Cross-entropy against (1 - smoothing) x one-hot + smoothing / V uniform (Szegedy et al.
    2016; Vaswani et al. 2017 use 0.1). logits: (B, T, V); labels: (B, T), IGNORE on padding.
    reduction: "mean" over real tokens or "sum"."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                           label_smoothing=smoothing, reduction=reduction)


@dataclass
class EncodedSplit:
    """Token ids of one split's pairs (sources, targets without <bos>/<eos>)."""

    sources: list[list[int]]
    targets: list[list[int]]

    def lengths(self) -> list[int]:  # padded cost of a pair: its longer side (+1 for <bos>/<eos>)
        return [max(len(s), len(t) + 1) for s, t in zip(self.sources, self.targets)]


class Seq2SeqTask:
    """Teacher-forced translation loss on token-budget batches (label-smoothed while training,
    plain NLL in eval mode, so the validation loss is a true per-token cross-entropy)."""

    name = "seq2seq"

    def __init__(self, train: EncodedSplit, valid: EncodedSplit, *, special: dict[str, int],
                 tokens_per_batch: int, seed: int, label_smoothing: float,
                 tokenizer: Tokenizer | None = None, sample_sources: Sequence[Pair] = ()) -> None:
        self.train, self.valid, self.special = train, valid, special
        self.label_smoothing = label_smoothing
        self.batches = TokenBatches(train.lengths(), tokens_per_batch, seed)
        self.valid_batches = TokenBatches(valid.lengths(), tokens_per_batch, seed).in_order()
        self.tokenizer, self.sample_sources = tokenizer, list(sample_sources)

    def _collate(self, split: EncodedSplit, rows: np.ndarray, loss_tokens: float) -> Batch:
        """A padded batch; the loss is its summed cross-entropy / loss_tokens (Batch.context)."""
        tensors = collate_pairs([split.sources[i] for i in rows], [split.targets[i] for i in rows],
                                pad=self.special["<pad>"], bos=self.special["<bos>"], eos=self.special["<eos>"])
        n_tokens = int(tensors["src_mask"].sum()) + int(tensors["tgt_mask"].sum())
        return Batch(tensors, len(rows), n_tokens, context=loss_tokens)

    def train_batch(self, step: int, shard: int, n_shards: int) -> Batch:
        """Shard `shard` of step `step`'s batch. The loss divides by the global batch's target
        token count / n_shards, so the shards' mean loss equals the global batch's per-token mean."""
        rows = self.batches.batch(step)
        if len(rows) < n_shards:
            raise ConfigError(f"step {step}'s batch has {len(rows)} pair(s), fewer than the {n_shards} "
                              "shards (grad_accum x processes); raise data.tokens_per_batch")
        n_global = sum(len(self.train.targets[i]) + 1 for i in rows)
        return self._collate(self.train, np.array_split(rows, n_shards)[shard], n_global / n_shards)

    def eval_batches(self, rank: int, world_size: int) -> Iterable[Batch]:
        """Every validation pair once; each rank scores its share of every batch. Losses divide
        by the split's token count / (ranks x this rank's batches), so the mean of the batch losses
        over batches, then ranks (what the Trainer takes) is the per-token mean of the split."""
        shares = [np.array_split(rows, world_size)[rank] for rows in self.valid_batches]
        shares = [rows for rows in shares if len(rows)]
        if not shares:
            raise ConfigError(f"{len(self.valid.sources)} validation pair(s) cannot be shared by "
                              f"{world_size} processes; raise data.valid_pairs")
        total = sum(len(t) + 1 for t in self.valid.targets)
        for rows in shares:
            yield self._collate(self.valid, rows, total / (world_size * len(shares)))

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Summed (label-smoothed while training) cross-entropy / batch.context (target tokens)."""
        logits = model(batch["src_ids"], batch["tgt_ids"], src_mask=batch["src_mask"],
                       tgt_mask=batch["tgt_mask"])  # (B, T, V)
        smoothing = self.label_smoothing if model.training else 0.0
        return label_smoothed_loss(logits, batch["labels"], smoothing, reduction="sum") / batch.context

    def samples(self, model: nn.Module) -> list[str]:
        """Greedy translations of a few validation sources, with their references."""
        if self.tokenizer is None or not self.sample_sources:
            return []
        hyps = translate(model, self.tokenizer, [s for s, _ in self.sample_sources], too_long="truncate")
        return [f"{s}\n  => {h}\n  reference: {t}" for (s, t), h in zip(self.sample_sources, hyps)]


def load_splits(data: DataSpec) -> tuple[list[Pair], np.ndarray, np.ndarray, np.ndarray]:
    """The pairs and their train / validation / test indices (fixed by data.split_seed)."""
    pairs = read_pairs(data.source, (data.src_column, data.tgt_column), header=data.header,
                       variant_separator=data.variant_separator, on_bad=data.on_bad)
    return (pairs, *split_indices(len(pairs), data.valid_pairs, data.test_pairs, data.split_seed))


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Ids of <pad>, <bos>, <eos>; a tokenizer without them is refused with the fix."""
    found = tokenizer.special_tokens
    missing = [t for t in SPECIAL_TOKENS if t not in found]
    if missing:
        raise ConfigError(f"the tokenizer lacks the special token(s) {missing} that translation needs; "
                          f"set tokenizer.special_tokens: {list(SPECIAL_TOKENS)} (and a fresh run)")
    return {t: found[t] for t in SPECIAL_TOKENS}


def _encode(pairs: list[Pair], rows: np.ndarray, tokenizer: Tokenizer, max_len: int,
            too_long: str) -> EncodedSplit:
    return EncodedSplit(*encode_pairs([pairs[i] for i in rows], tokenizer, max_len, too_long))


def prepare(settings: TaskSettings, tokenizer_for: Any) -> TaskData:
    """Pairs and splits, a joint tokenizer trained on both sides of the training split; the model
    takes its vocabulary and special token ids."""
    data: DataSpec = settings.data
    pairs, train, valid, _ = load_splits(data)
    tokenizer = tokenizer_for(lambda: (text for i in train for text in pairs[i]))
    special = special_ids(tokenizer)

    def make_task(model: nn.Module) -> Seq2SeqTask:
        max_len = model.config.context_length  # type: ignore[union-attr]
        task = Seq2SeqTask(_encode(pairs, train, tokenizer, max_len, data.too_long),
                           _encode(pairs, valid, tokenizer, max_len, "truncate"), special=special,
                           tokens_per_batch=data.tokens_per_batch, seed=settings.training.seed,
                           label_smoothing=data.label_smoothing, tokenizer=tokenizer,
                           sample_sources=[pairs[i] for i in valid[:data.n_samples]])
        log.info("seq2seq: %d training pairs in %d batches per epoch, %d validation, vocabulary %d",
                 len(task.train.sources), len(task.batches), len(valid), tokenizer.vocab_size)
        return task

    fields = {"vocab_size": tokenizer.vocab_size, "pad_id": special["<pad>"], "bos_id": special["<bos>"],
              "eos_id": special["<eos>"]}
    fingerprint = data_fingerprint(text for i in (*train, *valid) for text in pairs[i])
    return TaskData(tokenizer, fields, make_task, notes=fingerprint)


def corpus_scores(hypotheses: list[str], references: list[str]) -> dict[str, Any]:
    """Corpus BLEU and chrF (sacrebleu defaults: 13a tokenization, chrF char order 6, beta 2)."""
    try:
        import sacrebleu
    except ImportError:
        raise ImportError("BLEU and chrF need sacrebleu: pip install sacrebleu") from None
    bleu, chrf = sacrebleu.BLEU(), sacrebleu.CHRF()
    return {"bleu": bleu.corpus_score(hypotheses, [references]).score,
            "chrf": chrf.corpus_score(hypotheses, [references]).score,
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}


def write_translations(path: Path, rows: list[tuple[str, str, str]]) -> None:
    """source / reference / hypothesis TSV, written atomically."""
    clean = lambda text: text.replace("\t", " ").replace("\n", " ")  # noqa: E731
    write_text_atomic(path, "source\treference\thypothesis\n" + "".join(
        "\t".join(map(clean, row)) + "\n" for row in rows))


def evaluate(settings: TaskSettings, model: nn.Module, tokenizer: Tokenizer) -> dict[str, Any]:
    """Validation loss, then BLEU / chrF of beam-search translations of the test split; the
    translations go to <run_dir>/translations.tsv."""
    data: DataSpec = settings.data
    pairs, _, valid, test = load_splits(data)
    if len(test) == 0:
        raise PairsError("data.test_pairs is 0: there is no test split to score")
    special = special_ids(tokenizer)
    max_len = model.config.context_length  # type: ignore[union-attr]
    encoded = _encode(pairs, valid, tokenizer, max_len, "truncate")
    task = Seq2SeqTask(encoded, encoded, special=special, tokens_per_batch=data.tokens_per_batch,
                       seed=0, label_smoothing=0.0)
    model.eval()
    batches = list(task.eval_batches(0, 1))
    with torch.no_grad():
        losses = [float(task.loss(model, b)) for b in batches]
    sources, references = [pairs[i][0] for i in test], [pairs[i][1] for i in test]
    hypotheses = translate(model, tokenizer, sources, beam_width=data.beam_width,  # type: ignore[arg-type]
                           length_penalty=data.length_penalty, too_long="truncate")
    path = Path(settings.run_dir) / TRANSLATIONS_FILE
    write_translations(path, list(zip(sources, references, hypotheses)))
    return {"val_loss": float(np.mean(losses)), **corpus_scores(hypotheses, references),
            "test_pairs": len(test), "beam_width": data.beam_width, "translations": str(path)}
