"""What every Task offers the Trainer.

A step's global batch is a pure function of the step number; gradient accumulation and
processes only split it into shards. So a resumed run, a run with accumulation and a run on
several processes all see exactly the batches of one plain run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Protocol

from torch import Tensor, nn

Batch = dict[str, Tensor]


class Task(Protocol):
    name: str

    def train_batch(self, step: int, shard: int, n_shards: int) -> Batch:
        """Shard `shard` of `n_shards` equal parts of step `step`'s global batch."""
        ...

    def eval_batches(self, rank: int, world_size: int) -> Iterable[Batch]:
        """Fixed validation batches; each rank gets its share of every batch."""
        ...

    def loss(self, model: nn.Module, batch: Batch) -> Tensor: ...

    def samples(self, model: nn.Module) -> list[str]:
        """Human-readable outputs written to samples.txt at each evaluation (may be empty)."""
        ...


@dataclass
class Prepared:
    """What a task module's `prepare(recipe, tokenizer_for)` returns."""

    model: nn.Module
    task: Task
    tokenizer: Any
    model_record: dict[str, Any]  # model_family + model_config, stored with every checkpoint
