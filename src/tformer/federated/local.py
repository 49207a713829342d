"""A client's side: build the recipe's model and task, keep this client's share of the training
examples, and train local steps with the same Trainer step as centralised training.

The client's step counter continues across rounds ((round - 1) x local steps + i): its batches
follow its own epochs over its share, and the learning-rate schedule spans the whole federation
(max_steps = rounds x local steps). The optimizer state starts fresh each round (a client keeps
nothing but its data between rounds). FedProx adds (mu / 2) ||w - w_global||^2 to the task's loss.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tformer.federated.partition import partition
from tformer.federated.spec import FederationSpec
from tformer.federated.weights import trainable
from tformer.training.recipe import prepare
from tformer.training.report import Reporter
from tformer.training.settings import TrainConfig
from tformer.training.tasks.base import Batch, Task
from tformer.training.trainer import Trainer

log = logging.getLogger(__name__)


class ProximalTask:
    """`task` whose loss adds (mu / 2) sum ||w - w0||^2 over the trainable parameters (FedProx,
    Li et al. 2020); w0 is the global model the round started from (set by `anchor`)."""

    def __init__(self, task: Task) -> None:
        self.task, self.mu, self.pairs = task, 0.0, []  # type: tuple[Task, float, list[tuple[Tensor, Tensor]]]

    def anchor(self, model: nn.Module, mu: float) -> None:
        self.mu = mu
        self.pairs = [(p, p.detach().clone()) for p in trainable(model).values()] if mu > 0 else []

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        loss = self.task.loss(model, batch)
        if self.mu > 0 and model.training:
            loss = loss + self.mu / 2 * sum(((p.float() - w0.float()) ** 2).sum() for p, w0 in self.pairs)
        return loss

    def __getattr__(self, name: str) -> Any:  # batches, evaluation, samples: the task's own
        return getattr(self.task, name)


def federated_training(training: TrainConfig, spec: FederationSpec) -> TrainConfig:
    """The recipe's training settings over a client's steps in the whole federation (rounds x
    local steps); the warm-up keeps its share of the schedule."""
    steps = spec.rounds * spec.steps_per_round
    warmup = round((training.warmup_steps or 0) * steps / training.max_steps)
    return dataclasses.replace(training, max_steps=steps, warmup_steps=min(warmup, steps))


@dataclass
class Node:
    """What one process holds for a federation: the model and its Trainer (shared by the clients
    this process plays: a simulation actor plays many), every client's share and task."""

    spec: FederationSpec
    trainer: Trainer
    task: Task
    shares: list[np.ndarray]
    tasks: dict[int, ProximalTask]

    def client(self, partition_id: int) -> ProximalTask:
        """Client `partition_id`'s task (its share of the training examples), made once."""
        if not 0 <= partition_id < self.spec.clients:
            raise ValueError(f"partition-id {partition_id} is outside the federation's {self.spec.clients} "
                             f"clients; start SuperNodes with partition-id 0..{self.spec.clients - 1}")
        if partition_id not in self.tasks:
            self.tasks[partition_id] = ProximalTask(self.task.keep_training(self.shares[partition_id]))  # type: ignore[attr-defined]
        return self.tasks[partition_id]


def build_node(spec: FederationSpec) -> Node:
    recipe = spec.recipe_obj
    prepared = prepare(recipe)
    shares = partition(prepared.task, spec.partition_spec, spec.clients, spec.seed)
    config = federated_training(recipe.training, spec)
    trainer = Trainer(prepared.model, prepared.task, config, Path(spec.out),
                      reporter=Reporter(Path(spec.out), config.max_steps, enabled=False))
    return Node(spec, trainer, prepared.task, shares, {})


_NODES: dict[str, Node] = {}  # a simulation actor keeps its node between rounds


def node_for(spec_json: str) -> Node:
    if spec_json not in _NODES:
        _NODES.clear()
        _NODES[spec_json] = build_node(FederationSpec.from_json(spec_json))
    return _NODES[spec_json]


def train_round(node: Node, partition_id: int, global_round: int, mu: float) -> dict[str, float]:
    """Client `partition_id`'s local steps from the weights already loaded; its metrics."""
    trainer, steps = node.trainer, node.spec.steps_per_round
    task = trainer.task = node.client(partition_id)
    trainer.model.train()
    task.anchor(trainer.model, mu)
    trainer.optimizer.state.clear()  # fresh AdamW moments each round
    seed = np.random.default_rng([node.spec.seed, global_round, partition_id]).integers(2**62)
    torch.manual_seed(int(seed))
    losses, skipped = [], 0
    for i in range(steps):
        trainer.step = (global_round - 1) * steps + i
        loss, finite = trainer.train_step()
        if finite:
            losses.append(loss)
        skipped += not finite
    task.anchor(trainer.model, 0.0)
    return {"train_loss": float(np.mean(losses)) if losses else float("nan"), "skipped_steps": float(skipped)}
