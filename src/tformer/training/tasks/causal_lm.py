"""Causal language modelling (GPT pre-training): next-token prediction on random windows of a
tokenized corpus."""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.config import check_fraction
from tformer.data.text import TokenizedCorpus, causal_lm_batch, eval_batches, load_text
from tformer.inference.generate import TEXT_SAMPLING, generate
from tformer.models.protocols import CausalLM
from tformer.tokenizers.base import Tokenizer
from tformer.training.settings import TaskSettings
from tformer.training.tasks.base import Batch, TaskData

log = logging.getLogger(__name__)

NEEDS = CausalLM


@dataclass(frozen=True)
class DataSpec:
    source: str = "shakespeare"  # a named dataset, a text file or a folder of .txt files
    val_fraction: float = 0.1
    cache_dir: str | None = None  # None: $TFORMER_CACHE_DIR or ~/.cache/tformer, then tokens/

    def __post_init__(self) -> None:
        check_fraction("data.val_fraction", self.val_fraction)


def causal_lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy. logits: (B, T, V); targets: (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)


class CausalLMTask:
    """Next-token prediction on random windows of a token array (GPT pre-training)."""

    name = "causal_lm"

    def __init__(self, train_tokens: np.ndarray, val_tokens: np.ndarray, *, context: int,
                 batch_size: int, seed: int, n_eval_batches: int = 20,
                 tokenizer: Tokenizer | None = None, sample_prompt: str = "\n",
                 sample_tokens: int = 200, fused_loss: bool = False) -> None:
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self.fused_loss = fused_loss  # model(ids, targets=...) returns the loss (see `takes_targets`)
        self.context, self.batch_size, self.seed = context, batch_size, seed
        self.n_eval_batches = n_eval_batches
        self.tokenizer, self.sample_prompt, self.sample_tokens = tokenizer, sample_prompt, sample_tokens

    def train_batch(self, step: int, shard: int, n_shards: int) -> Batch:
        x, y = causal_lm_batch(self.train_tokens, self.batch_size, self.context, step, self.seed,
                               rank=shard, world_size=n_shards)
        return Batch({"ids": x, "targets": y}, n_examples=x.shape[0], n_tokens=x.numel())

    def eval_batches(self, rank: int, world_size: int) -> Iterable[Batch]:
        for x, y in eval_batches(self.val_tokens, self.batch_size, self.context,
                                 self.n_eval_batches, self.seed):
            rows = x.shape[0] // world_size  # each rank scores its share
            x, y = x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]
            yield Batch({"ids": x, "targets": y}, n_examples=x.shape[0], n_tokens=x.numel())

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        if self.fused_loss:  # the model reduces its logits to the loss chunk by chunk
            return model(batch["ids"], targets=batch["targets"])
        return causal_lm_loss(model(batch["ids"]), batch["targets"])

    def samples(self, model: nn.Module) -> list[str]:
        if self.tokenizer is None:
            return []
        prompt = self.tokenizer.encode(self.sample_prompt) or [0]
        context = model.config.context_length  # type: ignore[union-attr]
        prompt = prompt[-(context - 1):]
        n = min(self.sample_tokens, context - len(prompt))
        out = generate(model, [prompt], n, TEXT_SAMPLING, seed=self.seed)
        return [self.tokenizer.decode(out[0].tolist())]


def token_cache_dir(cache_dir: str | None) -> Path:
    """The token cache folder (TokenizedCorpus removes a killed build's temporary files there)."""
    if cache_dir:
        folder = Path(cache_dir).expanduser()
    else:
        root = os.environ.get("TFORMER_CACHE_DIR") or Path.home() / ".cache" / "tformer"
        folder = Path(root) / "tokens"
    return folder


def text_fingerprint(texts: list[str]) -> dict[str, str]:
    """The run-record note that ties a run to its training text: a resume on other text is
    refused (training.recipe checks `data_sha256`)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest() if len(texts) > 1 else text.encode("utf-8"))
    return {"data_sha256": digest.hexdigest()}


def takes_targets(model: nn.Module) -> bool:
    """Whether `model(ids, targets=...)` returns the loss itself (GPT: without the whole logits)."""
    return "targets" in inspect.signature(type(model).forward).parameters


def _task(settings: TaskSettings, tokenizer: Tokenizer, context: int, text: str | None = None,
          model: nn.Module | None = None) -> CausalLMTask:
    """The task; with activation checkpointing on and a model that takes targets, the loss is
    computed inside the model, chunk by chunk (the logits were most of what checkpointing left)."""
    data: DataSpec = settings.data
    text = load_text(data.source) if text is None else text
    corpus = TokenizedCorpus.from_text(text, tokenizer, token_cache_dir(data.cache_dir),
                                       val_fraction=data.val_fraction, name=str(data.source))
    t = settings.training
    return CausalLMTask(corpus.train, corpus.val, context=context, batch_size=t.batch_size,
                        seed=t.seed, n_eval_batches=t.eval_batches, tokenizer=tokenizer,
                        sample_prompt=settings.sample.prompt, sample_tokens=settings.sample.tokens,
                        fused_loss=bool(t.activation_checkpointing) and model is not None and takes_targets(model))


def check_prompt(tokenizer: Tokenizer, prompt: str) -> None:
    try:
        tokenizer.encode(prompt)
    except ValueError as e:
        raise ValueError(f"sample.prompt {prompt!r} cannot be encoded: {e}") from None


def prepare(settings: TaskSettings, tokenizer_for: Any) -> TaskData:
    """Tokenizer (trained on the corpus once); the model takes its vocabulary size."""
    data: DataSpec = settings.data
    text = load_text(data.source)  # read once: the tokenizer, the fingerprint and the corpus
    tokenizer = tokenizer_for(lambda: [text])
    check_prompt(tokenizer, settings.sample.prompt)
    return TaskData(tokenizer, {"vocab_size": tokenizer.vocab_size},
                    lambda model: _task(settings, tokenizer, model.config.context_length, text, model),
                    notes=text_fingerprint([text]))


def evaluate(settings: TaskSettings, model: nn.Module, tokenizer: Tokenizer) -> dict[str, Any]:
    """Validation loss and perplexity on the evaluation batches of the run's own validation split
    (val_tokens: the tokens scored, not the split's size)."""
    task = _task(settings, tokenizer, model.config.context_length)  # type: ignore[union-attr]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in task.eval_batches(0, 1):
            n = int((batch["targets"] != -100).sum())
            total, tokens = total + float(task.loss(model, batch)) * n, tokens + n
    val_loss = total / tokens
    return {"val_loss": val_loss, "perplexity": math.exp(val_loss), "val_tokens": tokens,
            "val_split_tokens": len(task.val_tokens)}
