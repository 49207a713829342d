"""A Task binds data, model and loss. The Trainer asks it for batches, for the loss of a batch,
and for samples a person can read.

A step's global batch is a pure function of the step number; gradient accumulation and
processes only split it into shards. So a resumed run, a run with accumulation and a run on
several processes all see exactly the batches of one plain run."""

from __future__ import annotations

from typing import Iterable, Protocol

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.data.text import causal_lm_batch, eval_batches
from tformer.inference.generate import Sampling, generate
from tformer.tokenizers.base import Tokenizer

Batch = dict[str, Tensor]


class Task(Protocol):
    name: str

    def train_batch(self, step: int, shard: int, n_shards: int) -> Batch:
        """Shard `shard` of `n_shards` equal parts of step `step`'s global batch."""
        ...

    def eval_batches(self, rank: int, world_size: int) -> Iterable[Batch]: ...

    def loss(self, model: nn.Module, batch: Batch) -> Tensor: ...

    def samples(self, model: nn.Module) -> list[str]: ...


def causal_lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy. logits: (B, T, V); targets: (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)


class CausalLMTask:
    """Next-token prediction on random windows of a token array (GPT pre-training)."""

    name = "causal_lm"

    def __init__(self, train_tokens: np.ndarray, val_tokens: np.ndarray, *, context: int,
                 batch_size: int, seed: int, n_eval_batches: int = 20,
                 tokenizer: Tokenizer | None = None, sample_prompt: str = "\n",
                 sample_tokens: int = 200) -> None:
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self.context, self.batch_size, self.seed = context, batch_size, seed
        self.n_eval_batches = n_eval_batches
        self.tokenizer, self.sample_prompt, self.sample_tokens = tokenizer, sample_prompt, sample_tokens

    def train_batch(self, step: int, shard: int, n_shards: int) -> Batch:
        x, y = causal_lm_batch(self.train_tokens, self.batch_size, self.context, step, self.seed,
                               rank=shard, world_size=n_shards)
        return {"ids": x, "targets": y}

    def eval_batches(self, rank: int, world_size: int) -> Iterable[Batch]:
        for x, y in eval_batches(self.val_tokens, self.batch_size, self.context,
                                 self.n_eval_batches, self.seed):
            rows = x.shape[0] // world_size  # each rank scores its share
            yield {"ids": x[rank * rows:(rank + 1) * rows], "targets": y[rank * rows:(rank + 1) * rows]}

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return causal_lm_loss(model(batch["ids"]), batch["targets"])

    def samples(self, model: nn.Module) -> list[str]:
        if self.tokenizer is None:
            return []
        prompt = self.tokenizer.encode(self.sample_prompt) or [0]
        context = model.config.context_length  # type: ignore[union-attr]
        prompt = prompt[-(context - 1):]
        n = min(self.sample_tokens, context - len(prompt))
        out = generate(model, [prompt], n, Sampling(temperature=0.8, top_k=200), seed=self.seed)
        return [self.tokenizer.decode(out[0].tolist())]
