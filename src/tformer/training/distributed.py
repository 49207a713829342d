"""Several processes under `torchrun` over gloo (CPU) or NCCL (GPU), rank-aware logging, and the
two strategies (`training.strategy`): DDP (a full copy per process, gradients all-reduced) and
FSDP2 (`fully_shard` per `Block`, then the root: each process keeps 1/N of the parameters,
gradients and optimizer state and all-gathers a block's parameters for its forward and backward).

`torchrun --nproc_per_node N -m tformer.cli train RECIPE` sets RANK / WORLD_SIZE / LOCAL_RANK;
a plain `python` run is world size 1 and never touches torch.distributed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tformer import cpu
from tformer.config import ConfigError
from tformer.runs.checkpoint import CheckpointError
from tformer.training.checkpointing import blocks_of


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


def check_strategy(strategy: str, device: torch.device, size: int | None = None) -> None:
    """Refuse, in one line and before any work, a strategy this launch cannot run: fsdp2 needs
    processes started by torchrun (WORLD_SIZE set) and a backend for the device (gloo on CPU,
    NCCL on CUDA). `size`: the world size when known (a World made by hand)."""
    if strategy != "fsdp2":
        return
    if (size or 1) == 1 and "WORLD_SIZE" not in os.environ:
        raise ConfigError("training.strategy=fsdp2 shards the model over processes that torchrun starts; "
                          "run it as `torchrun --nproc_per_node N -m tformer.cli train RECIPE` (N >= 2), "
                          "or set training.strategy=ddp for one process")
    backend = {"cpu": "gloo", "cuda": "nccl"}.get(device.type)
    available = backend is not None and dist.is_available() and (
        dist.is_gloo_available() if backend == "gloo" else dist.is_nccl_available())
    if not available:
        raise ConfigError(f"training.strategy=fsdp2 cannot run on {device}: it needs "
                          f"{backend or 'gloo (CPU) or NCCL (CUDA)'} in this torch build; use "
                          "training.device=cpu or cuda, or training.strategy=ddp")


def setup(device_preference: str = "auto", strategy: str = "ddp") -> World:
    """Join the process group torchrun describes (if any) and pick this process's device. A
    strategy this launch cannot run is refused first (`check_strategy`)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    check_strategy(strategy, pick_device(device_preference))
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


def wrap(model: nn.Module, world: World, strategy: str = "ddp",
         amp_dtype: torch.dtype | None = None) -> nn.Module:
    """The model the training step calls: the model itself for one process; DDP around it; or,
    for fsdp2, the model itself sharded in place (build the optimizer afterwards: its parameters
    become DTensor shards)."""
    if not world.distributed:
        return model
    if strategy == "fsdp2":
        if world.device.type == "cpu":  # else the allocator keeps every freed gathered block resident
            cpu.return_freed_memory()
        return shard(model, world, amp_dtype)
    ids = [world.device.index] if world.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def shard(model: nn.Module, world: World, amp_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 in place: `fully_shard` on every `Block` (found by type, after activation
    checkpointing marked them), then on the root (embeddings, final norm, head). Blocks free
    their gathered parameters after forward; the root keeps its own until backward, which needs
    them at once. On CUDA with bf16/fp16 a MixedPrecisionPolicy gathers parameters in that dtype
    and reduces gradients in fp32; on CPU the Trainer's autocast does the mixed precision."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))
    policy = MixedPrecisionPolicy()
    if world.device.type == "cuda" and amp_dtype is not None:
        policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
    for block in blocks_of(model):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule)


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP (an FSDP2 model is its own module)


def no_sync(model: nn.Module, world: World) -> contextlib.AbstractContextManager:
    """A micro-step whose gradients stay local (all but the last of gradient accumulation): DDP's
    no_sync, FSDP2's set_requires_gradient_sync(False); nothing for one process."""
    if not world.distributed:
        return contextlib.nullcontext()
    if is_sharded(model):
        return _without_gradient_sync(unwrap(model))
    return model.no_sync()


@contextlib.contextmanager
def _without_gradient_sync(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """Clip the global gradient norm to `max_norm` (inf: measure only); returns the norm before
    clipping as a plain tensor. FSDP2's gradients are DTensor shards: their norm is reduced over
    the processes first (`full_tensor`), so every process clips by the same global norm."""
    from torch.distributed.tensor import DTensor

    with_grads = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in with_grads], 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(with_grads, max_norm, norm)
    return norm


# -- FSDP2 outside the training step ---------------------------------------------------------
_GATHERED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # sharded models whose parameters are whole


def gather(model: nn.Module) -> None:
    """FSDP2: all-gather every parameter and keep it whole until `reshard`, so evaluation and
    rank 0's samples run without collectives (ranks may run different numbers of forwards).
    A collective: call it on every rank. Nothing for an unsharded model."""
    from torch.distributed.fsdp import FSDPModule

    model = unwrap(model)
    if not is_sharded(model) or model in _GATHERED:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.unshard()
            if module is not model:
                module.set_reshard_after_forward(False, recurse=False)
    _GATHERED.add(model)


def reshard(model: nn.Module) -> bool:
    """Undo `gather` (blocks free their parameters after forward again). Returns whether the
    model was gathered."""
    from torch.distributed.fsdp import FSDPModule

    model = unwrap(model)
    if model not in _GATHERED:
        return False
    for module in model.modules():
        if isinstance(module, FSDPModule):
            if module is not model:
                module.set_reshard_after_forward(True, recurse=False)
            module.reshard()
    _GATHERED.discard(model)
    return True


def _tied_names(model: nn.Module) -> list[list[str]]:
    """Groups of names that hold one parameter (a tied embedding and head)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """FSDP2: the whole state dict, gathered to CPU on rank 0 ({} elsewhere; a collective). Tied
    names share one tensor again, so the safetensors file stores it once, as for one process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = unwrap(model)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for group in _tied_names(model):
        present = [name for name in group if name in state]
        for name in group if present else []:
            state[name] = state[present[0]]
    return state


def load_full_model_state(model: nn.Module, weights: dict[str, Tensor] | None) -> None:
    """FSDP2: rank 0's whole state dict (`weights`; None on the other ranks) scattered into the
    shards of every rank (a collective). Names of a tied parameter stored once are filled in."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model = unwrap(model)
    weights = dict(weights or {})
    for group in _tied_names(model) if weights else []:
        present = [name for name in group if name in weights]
        for name in group if present else []:
            weights[name] = weights[present[0]]
    try:
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True,
                                                                       broadcast_from_rank0=True))
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's weights do not fit this model ({str(e).splitlines()[0]}); "
                              "was it saved from another config?") from None


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """FSDP2: the whole optimizer state on rank 0 ({} elsewhere; a collective), in the layout
    `optimizer.state_dict()` has for one process (parameters numbered in param-group order), so
    a run saved with N processes resumes with any number."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(unwrap(model), optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not state:
        return {}
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:  # FQNs in the optimizer's own order
        groups.append({**group, "params": [index.setdefault(name, len(index)) for name in group["params"]]})
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict[str, Any] | None) -> None:
    """FSDP2: rank 0's whole optimizer state (the one-process layout; None on the other ranks)
    scattered into every rank's shards (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    model = unwrap(model)
    by_state = {}
    if state:
        names = {id(param): name for name, param in reversed(list(model.named_parameters()))}
        fqns = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        groups = [{**saved, "params": [fqns[i] for i in saved["params"]]} for saved in state["param_groups"]]
        by_state = {"state": {fqns[i]: value for i, value in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, by_state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


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
