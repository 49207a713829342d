"""What every task offers: the `Task` the Trainer drives, the `Batch` it hands over, and
`TaskData`, what a task module's `prepare` returns so that the model is built in one place.

A step's global batch is a pure function of the step number; gradient accumulation and
processes only split it into shards. So a resumed run, a run with accumulation and a run on
several processes all see exactly the batches of one plain run.

A task module (one per task: causal_lm, seq2seq, ...) defines
    DataSpec                            its recipe's data section (a frozen dataclass)
    NEEDS                               the capability its model must have (models.protocols)
    prepare(settings, tokenizer_for)    -> TaskData: tokenizer, model fields, make_task(model)
    evaluate(settings, model, tokenizer) -> metrics of a trained model
"""

from __future__ import annotations

import hashlib

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor, nn


@dataclass
class Batch:
    """One shard of a step's batch: the tensors the loss reads, and what the progress line counts.

    n_tokens: positions the model reads (tokens, pixels, patches), for tokens/s;
    context:  task-private facts the loss needs besides tensors (e.g. which Transformer-XL stream
              segment this is, or the token count a summed loss is divided by); never moved.
    """

    tensors: dict[str, Tensor]
    n_examples: int
    n_tokens: int
    context: Any = None

    def __getitem__(self, key: str) -> Tensor:
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def get(self, key: str, default: Tensor | None = None) -> Tensor | None:
        return self.tensors.get(key, default)

    def to(self, device: torch.device | str) -> Batch:
        tensors = {k: v.to(device, non_blocking=True) for k, v in self.tensors.items()}
        return Batch(tensors, self.n_examples, self.n_tokens, self.context)


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

    # Optional: a task that carries state from step to step (Transformer-XL memory) defines
    # `state_dict() -> dict` (tensors, ints, lists, str keys) and `load_state_dict(dict)`; the
    # Trainer stores it with train_state.pt (read with weights_only=True) and gives it back on
    # resume, so a resume from any step is exact.


class Partitionable(Protocol):
    """A task whose training examples can be dealt out among data holders (federated learning):
    each example's class, and a copy of the task that trains on some examples only (validation
    stays whole). Optionally `example_groups(column) -> (N,) str` names each example's natural
    group (the source of a sentence), and `accuracy(model) -> float` scores the validation split."""

    def example_labels(self) -> np.ndarray:
        """(N,) int class index of every training example, in the task's own order."""
        ...

    def keep_training(self, index: np.ndarray) -> Task:
        """The same task training on the examples at `index` (of the N) only."""
        ...


def can_partition(task: object) -> bool:
    """Whether `task` offers `Partitionable`'s methods (federated learning refuses it otherwise)."""
    return all(callable(getattr(task, name, None)) for name in ("example_labels", "keep_training"))


@dataclass
class TaskData:
    """What a task module's `prepare` returns. `model_fields` are the model config values the
    data decides (vocabulary size, special ids, labels, image size ...); `make_task(model)` binds
    the data to the model built from the recipe's model section plus those fields."""

    tokenizer: Any
    model_fields: dict[str, Any]
    make_task: Callable[[nn.Module], Task]
    notes: dict[str, Any] = field(default_factory=dict)  # extra run-record entries


# -- plumbing shared by tasks ----------------------------------------------------------------

class EpochSampler:
    """Step -> example indices: each epoch is a seeded permutation of `n` examples, and step s
    takes positions [s B, (s + 1) B) of the concatenated epochs, so a batch is a pure function
    of (seed, step). `order(epoch)` may be overridden (e.g. length bucketing)."""

    def __init__(self, n: int, batch_size: int, seed: int,
                 order: Callable[[int], np.ndarray] | None = None) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._order_fn = order or (lambda epoch: np.random.default_rng([seed, epoch]).permutation(n))
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:  # keep the previous epoch too: a batch may straddle two
            self._orders = {epoch: self._order_fn(epoch),
                            **{e: o for e, o in self._orders.items() if e == epoch - 1}}
        return self._orders[epoch]

    def indices(self, step: int) -> np.ndarray:
        """The global batch of `step`: batch_size example indices."""
        positions = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        return np.array([self.order(int(p // self.n))[p % self.n] for p in positions])

    def shard(self, step: int, shard: int, n_shards: int) -> np.ndarray:
        rows = self.batch_size // n_shards
        return self.indices(step)[shard * rows:(shard + 1) * rows]


def eval_shards(n: int, batch_size: int, rank: int, world_size: int,
                order: Sequence[int] | np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Every one of `n` evaluation examples once (in `order`, default 0..n-1), in batches of
    `batch_size`; each rank gets its share of every batch (empty shares are skipped)."""
    order = np.arange(n) if order is None else np.asarray(order)
    for start in range(0, len(order), batch_size):
        index = np.array_split(order[start:start + batch_size], world_size)[rank]
        if len(index):
            yield index


def shard_rows(tensors: dict[str, Tensor], shard: int, n_shards: int) -> dict[str, Tensor]:
    """Rows [shard R, (shard + 1) R) of every tensor, R = rows / n_shards."""
    rows = next(iter(tensors.values())).shape[0] // n_shards
    return {k: v[shard * rows:(shard + 1) * rows] for k, v in tensors.items()}


def data_fingerprint(parts: Iterable[str | bytes | np.ndarray]) -> dict[str, str]:
    """The run-record note that ties a run to its training data (texts, labels, pixel arrays): a
    resume on other data is refused (training.recipe checks `data_sha256`)."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part.tobytes() if isinstance(
            part, np.ndarray) else bytes(part)
        digest.update(hashlib.sha256(data).digest())
    return {"data_sha256": digest.hexdigest()}


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights are: a task judging a model moves its CPU batches there."""
    return next(model.parameters(), torch.empty(0)).device
