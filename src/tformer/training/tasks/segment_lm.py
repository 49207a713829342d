"""Segment-level language modelling for Transformer-XL: consecutive segments of long text, with
the model's memory carried from one step to the next (Dai et al. 2019, section 3.2).

The corpus is cut into `batch_size` contiguous streams (the paper's LM iterator); step s trains
on segment s mod n_segments of every stream, so memory from step s - 1 is the text right before.
Memory lives in the Task, per shard of the global batch, and starts empty when streams wrap.

Exact resume: the carried training memory is part of the checkpoint (`state_dict` /
`load_state_dict`, tensors only, read back with weights_only=True), so a run resumed from any
step, a Ctrl-C included, carries the memory an unbroken run carried. Every `refresh_every` steps
(the checkpoint interval) the memory is also dropped and re-warmed: recomputed without gradient
from the previous `mem_len` tokens with the current weights. A checkpoint without task state (an
older run, another process count) re-warms where it resumes, which an unbroken run does not; it
logs that.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from tformer.config import ConfigError, check_fraction, check_positive
from tformer.data.text import TokenizedCorpus, load_text
from tformer.inference.generate import TEXT_SAMPLING
from tformer.inference.memory import generate_with_memory
from tformer.models.protocols import MemoryLM
from tformer.models.transformer_xl import Memory, TransformerXL, TransformerXLConfig
from tformer.nn.modes import evaluating
from tformer.tokenizers.base import Tokenizer
from tformer.training.distributed import unwrap
from tformer.training.settings import TaskSettings
from tformer.training.tasks.base import Batch, TaskData
from tformer.training.tasks.causal_lm import causal_lm_loss, check_prompt, text_fingerprint, token_cache_dir

log = logging.getLogger(__name__)

NEEDS = MemoryLM
TRAIN, EVAL = 0, 1


class SegmentAt(NamedTuple):
    """Where a batch lies: split (TRAIN/EVAL), shard of n_shards, segment index, and step."""

    split: int
    shard: int
    n_shards: int
    segment: int
    step: int


@dataclass(frozen=True)
class DataSpec:
    source: str = "shakespeare"  # a named dataset, a text file or a folder of .txt files
    val_fraction: float = 0.1
    cache_dir: str | None = None
    eval_streams: int | None = None  # validation streams scored side by side (None: batch_size)
    document_separator: str | None = None  # one token's text; a new document begins after it

    def __post_init__(self) -> None:
        check_fraction("data.val_fraction", self.val_fraction)
        if self.eval_streams is not None:
            check_positive("data.eval_streams", self.eval_streams)


class TokenStreams:
    """`tokens` cut into `n_streams` contiguous rows of equal length. Segment g of the rows holds
    columns [g L, (g + 1) L) and its targets the tokens one further (L = seg_len)."""

    def __init__(self, tokens: np.ndarray, n_streams: int, seg_len: int, *,
                 separator: int | None = None, name: str = "tokens") -> None:
        check_positive("seg_len", seg_len)
        check_positive("streams", n_streams)
        per_stream = len(tokens) // n_streams
        if per_stream < seg_len + 1:
            raise ValueError(f"a segment of {seg_len} tokens needs {seg_len + 1} tokens per stream, but "
                             f"the {len(tokens)} {name} tokens cut into {n_streams} streams give "
                             f"{per_stream}; use shorter segments, fewer streams or more text")
        self.rows = tokens[:per_stream * n_streams].reshape(n_streams, per_stream)  # a view
        self.seg_len, self.separator = seg_len, separator
        self.n_segments = (per_stream - 1) // seg_len

    def segment(self, g: int, rows: slice) -> dict[str, Tensor]:
        """ids and targets (b, L) of segment g for `rows`; resets (b, L) when a separator is set."""
        start = g * self.seg_len
        window = np.asarray(self.rows[rows, max(start - 1, 0):start + self.seg_len + 1], dtype=np.int64)
        window = torch.from_numpy(window)
        offset = 1 if start > 0 else 0  # column of the segment's first token in `window`
        batch = {"ids": window[:, offset:offset + self.seg_len],
                 "targets": window[:, offset + 1:offset + self.seg_len + 1]}
        if self.separator is not None:  # a token right after a separator starts a document
            previous = window[:, :self.seg_len] if offset else torch.cat(
                [torch.full_like(window[:, :1], -1), window[:, :self.seg_len - 1]], dim=1)
            batch["resets"] = previous == self.separator
        return batch


def shard_rows(n_rows: int, shard: int, n_shards: int) -> slice:
    if n_rows % n_shards:
        raise ConfigError(f"{n_rows} streams cannot be split into {n_shards} equal shards (processes "
                          "x grad_accum); choose a multiple")
    size = n_rows // n_shards
    return slice(shard * size, (shard + 1) * size)


class SegmentLMTask:
    """Next-token prediction over consecutive segments with Transformer-XL memory."""

    name = "segment_lm"

    def __init__(self, train: TokenStreams, val: TokenStreams, *, mem_len: int, eval_mem_len: int,
                 n_eval_batches: int | None = None, refresh_every: int | None = None,
                 tokenizer: Tokenizer | None = None, sample_prompt: str = "\n",
                 sample_tokens: int = 200, seed: int = 0) -> None:
        for name, value in (("mem_len", mem_len), ("eval_mem_len", eval_mem_len)):
            check_positive(name, value, allow_zero=True)
        self.train, self.val = train, val
        self.mem_len, self.eval_mem_len = mem_len, eval_mem_len
        self.n_eval_batches, self.refresh_every = n_eval_batches, refresh_every
        self.tokenizer, self.sample_prompt, self.sample_tokens = tokenizer, sample_prompt, sample_tokens
        self.seed = seed
        self._memories: dict[tuple[int, int, int], tuple[int, Memory]] = {}

    def train_batch(self, step: int, shard: int, n_shards: int) -> Batch:
        segment = step % self.train.n_segments  # wraps around: memory starts empty again
        tensors = self.train.segment(segment, shard_rows(self.train.rows.shape[0], shard, n_shards))
        return Batch(tensors, tensors["ids"].shape[0], tensors["ids"].numel(),
                     SegmentAt(TRAIN, shard, n_shards, segment, step))

    def eval_batches(self, rank: int, world_size: int) -> Iterator[Batch]:
        """The validation streams' segments in order (the first n_eval_batches, or all)."""
        rows = shard_rows(self.val.rows.shape[0], rank, world_size)
        n = self.val.n_segments if self.n_eval_batches is None else min(self.n_eval_batches,
                                                                        self.val.n_segments)
        for g in range(n):
            tensors = self.val.segment(g, rows)
            yield Batch(tensors, tensors["ids"].shape[0], tensors["ids"].numel(),
                        SegmentAt(EVAL, rank, world_size, g, g))

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        split, shard, n_shards, segment, step = batch.context
        key = (split, shard, n_shards)
        memory = self._memory(model, key, segment, step, batch["ids"])
        out = model(batch["ids"], memory, resets=batch.get("resets"))
        loss = causal_lm_loss(out.logits, batch["targets"])
        if torch.isfinite(loss):  # else the next step re-warms instead of carrying NaNs forward
            self._memories[key] = (step, out.memory)
        else:
            self._memories.pop(key, None)
        return loss

    def _memory(self, model: nn.Module, key: tuple[int, int, int], segment: int, step: int,
                ids: Tensor) -> Memory:
        """Carried memory when it is from step - 1; else empty (segment 0) or re-warmed."""
        split, shard, n_shards = key
        capacity = self.mem_len if split == TRAIN else self.eval_mem_len
        core: TransformerXL = unwrap(model)  # type: ignore[assignment]
        if segment == 0 or capacity == 0:
            return core.new_memory(ids.shape[0], capacity, device=ids.device)
        held = self._memories.get(key)
        refresh = split == TRAIN and self.refresh_every is not None and step % self.refresh_every == 0
        if held is not None and held[0] == step - 1 and not refresh:
            return held[1]
        if not refresh and split == TRAIN:
            log.warning("step %d: no memory carried from step %d (a checkpoint without the task's "
                        "state, or a non-finite step); re-warming it, so this run may differ "
                        "slightly from an unbroken one", step, step - 1)
        streams = self.train if split == TRAIN else self.val
        return self._rewarm(model, streams, shard_rows(streams.rows.shape[0], shard, n_shards),
                            segment, capacity, ids.device)

    @torch.no_grad()
    def _rewarm(self, model: nn.Module, streams: TokenStreams, rows: slice, segment: int,
                capacity: int, device: torch.device) -> Memory:
        """Memory after the segments that cover the last `capacity` tokens before `segment`."""
        core: TransformerXL = unwrap(model)  # type: ignore[assignment]
        memory = core.new_memory(rows.stop - rows.start, capacity, device=device)
        for g in range(max(0, segment - math.ceil(capacity / streams.seg_len)), segment):
            batch = {k: v.to(device) for k, v in streams.segment(g, rows).items()}
            memory = model(batch["ids"], memory, resets=batch.get("resets")).memory
        return memory

    def state_dict(self) -> dict[str, Any]:
        """The carried training memories, for the checkpoint: tensors, ints and lists only."""
        state: dict[str, Any] = {}
        for (split, shard, n_shards), (step, memory) in self._memories.items():
            if split != TRAIN:
                continue  # evaluation starts from empty memory every time
            docs = [] if memory.docs is None else [memory.docs.detach()]
            state[f"{shard}/{n_shards}"] = {"step": step, "capacity": memory.capacity, "docs": docs,
                                            "states": [s.detach() for s in memory.states]}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Carry on with the memories a checkpoint holds (see `state_dict`)."""
        for key, held in state.items():
            shard, n_shards = (int(part) for part in key.split("/"))
            docs = held["docs"][0] if held["docs"] else None
            memory = Memory(list(held["states"]), int(held["capacity"]), docs)
            self._memories[(TRAIN, shard, n_shards)] = (int(held["step"]), memory)

    def samples(self, model: nn.Module) -> list[str]:
        if self.tokenizer is None:
            return []
        prompt = self.tokenizer.encode(self.sample_prompt) or [0]
        out = generate_with_memory(model, prompt, self.sample_tokens, TEXT_SAMPLING,  # type: ignore[arg-type]
                                   mem_len=self.eval_mem_len, seed=self.seed)
        return [self.tokenizer.decode(out.tolist())]


def _separator_id(data: DataSpec, tokenizer: Tokenizer) -> int | None:
    if data.document_separator is None:
        return None
    ids = tokenizer.encode(data.document_separator)
    if len(ids) != 1:
        raise ConfigError(f"data.document_separator={data.document_separator!r} encodes to {len(ids)} "
                          "tokens; it must be exactly one token of the tokenizer (e.g. <|endoftext|> "
                          "for a BPE tokenizer with that special token)")
    return ids[0]


def _task(settings: TaskSettings, tokenizer: Tokenizer, config: TransformerXLConfig,
          n_eval_batches: int | None, text: str | None = None) -> SegmentLMTask:
    data: DataSpec = settings.data
    text = load_text(data.source) if text is None else text
    corpus = TokenizedCorpus.from_text(text, tokenizer, token_cache_dir(data.cache_dir),
                                       val_fraction=data.val_fraction, name=str(data.source))
    t, separator = settings.training, _separator_id(data, tokenizer)
    train = TokenStreams(corpus.train, t.batch_size, config.seg_len, separator=separator,
                         name="training")
    val = TokenStreams(corpus.val, data.eval_streams or t.batch_size, config.seg_len,
                       separator=separator, name="validation")
    return SegmentLMTask(train, val, mem_len=config.mem_len, eval_mem_len=config.eval_memory,
                         n_eval_batches=n_eval_batches, refresh_every=t.checkpoint_every or t.eval_every,
                         tokenizer=tokenizer, sample_prompt=settings.sample.prompt,
                         sample_tokens=settings.sample.tokens, seed=t.seed)


def prepare(settings: TaskSettings, tokenizer_for: Any) -> TaskData:
    """Tokenizer (trained on the corpus once); the Transformer-XL takes its vocabulary size."""
    data: DataSpec = settings.data
    text = load_text(data.source)  # read once: the tokenizer, the fingerprint and the corpus
    tokenizer = tokenizer_for(lambda: [text])
    check_prompt(tokenizer, settings.sample.prompt)
    _separator_id(data, tokenizer)  # a bad separator fails before the model is built
    return TaskData(tokenizer, {"vocab_size": tokenizer.vocab_size},
                    lambda model: _task(settings, tokenizer, model.config, settings.training.eval_batches, text),
                    notes=text_fingerprint([text]))


def evaluate(settings: TaskSettings, model: nn.Module, tokenizer: Tokenizer) -> dict[str, Any]:
    """Loss and perplexity over the whole validation split, in order, with eval_mem_len memory."""
    config: TransformerXLConfig = model.config  # type: ignore[assignment]
    task = _task(settings, tokenizer, config, None)
    return evaluate_streams(model, task.eval_batches(0, 1), task)


def evaluate_streams(model: nn.Module, batches: Iterable[Batch], task: SegmentLMTask) -> dict[str, Any]:
    """Token-weighted mean loss of `batches` (in order, memory carried) and its perplexity."""
    total, tokens = 0.0, 0
    with torch.no_grad(), evaluating(model):
        for batch in batches:
            total += float(task.loss(model, batch)) * batch["targets"].numel()
            tokens += batch["targets"].numel()
    val_loss = total / tokens
    return {"val_loss": val_loss, "perplexity": math.exp(val_loss), "val_tokens": tokens,
            "eval_mem_len": task.eval_mem_len, "seg_len": task.val.seg_len}
