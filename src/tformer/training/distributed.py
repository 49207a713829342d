"""Several processes under `torchrun`: DDP over gloo (CPU) or NCCL (GPU), rank-aware logging.

`torchrun --nproc_per_node N -m tformer.cli train RECIPE` sets RANK / WORLD_SIZE / LOCAL_RANK;
a plain `python` run is world size 1 and never touches torch.distributed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from tformer.config import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def pick_device(preference: str = "auto") -> torch.device:
    if preference != "auto":
        try:
            device = torch.device(preference)
        except RuntimeError:
            raise ConfigError(f"training.device={preference!r} is not a device; use auto, cpu, "
                              "cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"training.device={preference!r} but no CUDA GPU is visible; use "
                              "training.device=auto or cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def setup(device_preference: str = "auto") -> World:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(device=pick_device(device_preference))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _tag_log_records(rank)
    return World(rank=rank, size=size, local_rank=local_rank, device=device)


def _tag_log_records(rank: int) -> None:
    """Prefix every log message with the rank, so interleaved output can be told apart."""
    old_factory = logging.getLogRecordFactory()

    def factory(*args, **kwargs):  # noqa: ANN002, ANN003 - the logging factory signature
        record = old_factory(*args, **kwargs)
        record.msg = f"[rank {rank}] {record.msg}"
        return record

    logging.setLogRecordFactory(factory)


def wrap(model: nn.Module, world: World) -> nn.Module:
    """DistributedDataParallel when there are several processes; the model itself otherwise."""
    if not world.distributed:
        return model
    ids = [world.device.index] if world.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def mean_across(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world.size
    return value


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
