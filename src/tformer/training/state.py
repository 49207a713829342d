"""The part of a run that is not weights: optimizer, grad scaler, every process's RNG streams and
every process's task state (e.g. Transformer-XL memory), gathered into one dict that
`torch.load(weights_only=True)` can read back."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

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


def train_state(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                rng_states: list[dict[str, Any]],
                task_states: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    state = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng_states}
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


def restore(state: dict[str, Any], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            world: World) -> None:
    """Load optimizer and scaler, and this rank's own RNG stream (dropout continues exactly)."""
    optimizer.load_state_dict(state["optimizer"])
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
