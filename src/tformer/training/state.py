"""The part of a run that is not weights: optimizer, grad scaler, every process's RNG streams and
every process's task state (e.g. Transformer-XL memory), gathered into one dict that
`torch.load(weights_only=True)` can read back. The optimizer state is always whole and in the
one-process layout (`optimizer.state_dict()`); under FSDP2 it is gathered from the shards on
save and scattered on resume, so a run continues with any number of processes."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tformer.training import distributed
from tformer.training.distributed import World

log = logging.getLogger(__name__)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gather_rng_states(world: World) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective: call it on every rank)."""
    mine = _rng_state()
    if not world.distributed:
        return [mine]
    states: list[Any] = [None] * world.size
    dist.all_gather_object(states, mine)
    return states


def gather_task_states(task: Any, world: World) -> list[dict[str, Any]] | None:
    """Every rank's task state in rank order, for a task with `state_dict()` (else None). A
    collective: call it on every rank."""
    if not callable(getattr(task, "state_dict", None)):
        return None
    mine = task.state_dict()
    if not world.distributed:
        return [mine]
    states: list[Any] = [None] * world.size
    dist.all_gather_object(states, {k: _to_cpu(v) for k, v in mine.items()})
    return states


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state in the one-process layout (FSDP2: gathered from the shards to
    rank 0, {} elsewhere; a collective, call it on every rank)."""
    if distributed.is_sharded(model):
        return distributed.full_optimizer_state(model, optimizer)
    return optimizer.state_dict()


def train_state(optimizer: dict[str, Any], scaler: torch.amp.GradScaler,
                rng_states: list[dict[str, Any]],
                task_states: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """`optimizer`: its whole state dict (`optimizer_state`)."""
    state = {"optimizer": optimizer, "scaler": scaler.state_dict(), "rng": rng_states}
    if task_states is not None:
        state["task"] = task_states
    return state


def restore_task(state: dict[str, Any], task: Any, world: World) -> None:
    """Give the task this rank's saved state; without one (or from another process count) the
    task starts without it and says so itself where that matters."""
    streams = state.get("task")
    if streams is None or not callable(getattr(task, "load_state_dict", None)):
        return
    if len(streams) != world.size:
        log.warning("the checkpoint's task state was written by %d process(es), this run has %d: "
                    "the task starts without it", len(streams), world.size)
        return
    task.load_state_dict(streams[world.rank])


def restore_optimizer(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                      world: World) -> None:
    """Load the saved optimizer state (FSDP2: rank 0's copy scattered into every rank's shards;
    a collective)."""
    if distributed.is_sharded(model):
        distributed.load_full_optimizer_state(model, optimizer, state["optimizer"] if world.is_main else None)
    else:
        optimizer.load_state_dict(state["optimizer"])


def restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, world: World) -> None:
    """Load optimizer and scaler, and this rank's own RNG stream (dropout continues exactly)."""
    restore_optimizer(state, model, optimizer, world)
    scaler.load_state_dict(state["scaler"])
    streams = state.get("rng", [])
    if len(streams) != world.size:
        log.warning("the checkpoint was written by %d process(es), this run has %d: random streams "
                    "(dropout) are re-seeded, so the run continues but not bit-for-bit",
                    len(streams), world.size)
        return
    mine = streams[world.rank]
    torch.set_rng_state(mine["cpu"].cpu())
    if "cuda" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["cuda"])
