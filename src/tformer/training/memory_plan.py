"""What a training run needs in memory, said before its first step and checked after a few.

    plan = before_training(trainer)   # memory_plan.json + log lines; ConfigError if it cannot fit
    ...                               # training steps
    plan.record_measured(step)        # the real peak, appended to memory_plan.json

Parameters, gradients (trainable parameters only) and optimizer state (AdamW: two fp32 moments
per trainable parameter) are exact counts. Activations are *measured*: one forward + backward of the run's
own first micro-batch, with its precision, activation checkpointing and loss, and no
optimizer step; the gradients it made are dropped and the RNG streams and task state restored, so
training is the same with or without the plan.

Several processes (torchrun) each make the plan for themselves, rank 0 writes it, with every
rank's measured peak. Under `training.strategy=fsdp2` the counts are this process's shards
(measured from the DTensors' local pieces, about 1/N of the whole with N processes); under DDP
each process holds everything. On CPU the processes of one machine share its available memory.

Memory is read the same way for the prediction and for the real peak: on CPU the process's
resident high-water mark (VmHWM, reset by writing "5" to /proc/self/clear_refs after glibc has
given its free pages back), on CUDA `torch.cuda.max_memory_allocated` after
`reset_peak_memory_stats`. The predicted peak is what is resident before the step (weights, data,
libraries) plus the step's peak growth (activations and gradients) plus the optimizer state.
"""

from __future__ import annotations

import copy
import ctypes
import json
import logging
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tformer.config import ConfigError
from tformer.files import write_text_atomic
from tformer.runs.memory import available_memory, human_bytes
from tformer.training import distributed

log = logging.getLogger(__name__)

PLAN_FILE = "memory_plan.json"
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
ADAM_MOMENTS = 2  # exp_avg and exp_avg_sq per trainable parameter
MEASURED_REPEATS = 1  # forward + backward passes measured (a second one measured no more, GPT, CPU)
MEASURE_AFTER_STEPS = 2  # the real peak is read at the first log line at least this many steps in


# -- reading memory --------------------------------------------------------------------------
def status_bytes(name: str) -> int | None:
    """A size from this process's /proc/self/status (VmRSS, VmHWM, ...) in bytes; None off Linux."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _trim_heap() -> None:
    """Give glibc's free pages back to the kernel, so resident memory is what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class Meter:
    """Current and peak memory of this process (CPU) or of its CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.source = "torch.cuda.max_memory_allocated" if self.cuda else "VmHWM (resident high-water mark)"

    def usable(self) -> bool:
        if self.cuda:
            return True
        return status_bytes("VmHWM") is not None and CLEAR_REFS.exists()

    def reset(self) -> int:
        """Start a new peak here; returns the memory in use now."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        _trim_heap()
        try:
            CLEAR_REFS.write_text("5")  # VmHWM := VmRSS
        except OSError:
            pass
        return status_bytes("VmRSS") or 0

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return status_bytes("VmHWM") or 0

    def available(self) -> int | None:
        if self.cuda:
            return int(torch.cuda.mem_get_info(self.device)[0])
        return available_memory()


# -- the plan ----------------------------------------------------------------------------------
def _unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.parameters())  # tied weights once


def _local(tensor: Tensor) -> Tensor:
    """This process's piece of a tensor (an FSDP2 DTensor shard), else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def static_bytes(model: nn.Module) -> dict[str, int]:
    """Exact bytes this process holds of parameters, gradients (trainable parameters) and AdamW
    state (two fp32 moments per trainable parameter): FSDP2's shards, counted from their local
    pieces. `n_parameters` / `n_trainable` count the whole model."""
    params = _unique_parameters(model)
    trainable = [p for p in params if p.requires_grad]
    return {"parameters": sum(_local(p).numel() * p.element_size() for p in params),
            "gradients": sum(_local(p).numel() * p.element_size() for p in trainable),
            "optimizer_state": sum(ADAM_MOMENTS * _local(p).numel() * 4 for p in trainable),
            "n_parameters": sum(p.numel() for p in params),
            "n_trainable": sum(p.numel() for p in trainable)}


@dataclass
class MemoryPlan:
    path: Path | None
    meter: Meter
    settings: dict[str, Any]
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    baseline: int  # in use before the measured step (weights, data, libraries)
    measured_step_peak: int  # the measured step's peak growth: activations + its gradients
    available: int | None
    n_parameters: int = 0
    n_trainable: int = 0
    measured: list[dict[str, Any]] = field(default_factory=list)
    _start_step: int = 0

    @property
    def need(self) -> int:
        """Bytes the run adds to what is already in use: gradients, optimizer state, activations."""
        return self.gradients + self.optimizer_state + self.activations

    @property
    def predicted_peak(self) -> int:
        return self.baseline + self.need

    def as_json(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items()
                if k not in ("path", "meter", "measured", "_start_step")}
        data.update(need=self.need, predicted_peak=self.predicted_peak, source=self.meter.source,
                    measured=self.measured)
        return data

    def write(self) -> None:
        if self.path is not None:
            write_text_atomic(self.path, json.dumps(self.as_json(), indent=2) + "\n")

    def log_lines(self) -> list[str]:
        s = self.settings
        free = "unknown" if self.available is None else human_bytes(self.available)
        each = "" if s["processes"] == 1 else f" per process ({s['strategy']}, {s['processes']} processes)"
        return [f"memory plan: parameters {human_bytes(self.parameters)}{each} ({self.n_parameters:,} in all)",
                f"memory plan: gradients {human_bytes(self.gradients)} ({self.n_trainable:,} trainable)",
                f"memory plan: optimizer state {human_bytes(self.optimizer_state)} (AdamW, 2 x fp32)",
                (f"memory plan: activations {human_bytes(self.activations)} (measured: micro-batch of "
                 f"{s['micro_batch_rows']} rows, precision {s['precision']}, activation checkpointing "
                 f"{s['activation_checkpointing']})"),
                (f"memory plan: predicted peak {human_bytes(self.predicted_peak)} ({human_bytes(self.baseline)} "
                 f"in use now + {human_bytes(self.need)}); {free} available")]

    def start(self, step: int) -> None:
        """Training starts: the real peak is counted from here."""
        self._start_step = step
        self.meter.reset()

    def due(self, step: int, last: bool) -> bool:
        return not self.measured and (step - self._start_step >= MEASURE_AFTER_STEPS or last)

    def record_measured(self, step: int) -> dict[str, Any]:
        """The real peak (a collective under torchrun: every rank's peak is gathered)."""
        peak = self.meter.peak()
        row = {"step": step, "measured_peak": peak, "predicted_peak": self.predicted_peak,
               "ratio": peak / self.predicted_peak if self.predicted_peak else None,
               "measured_growth": peak - self.baseline, "predicted_growth": self.need,
               "growth_ratio": (peak - self.baseline) / self.need if self.need else None}
        if self.settings["processes"] > 1:
            row["measured_peak_by_rank"] = _gather_ints(peak)
        self.measured.append(row)
        self.write()
        log.info("memory plan: measured peak %s at step %d, predicted %s (ratio %.2f)",
                 human_bytes(peak), step, human_bytes(self.predicted_peak), row["ratio"] or 0.0)
        return row


def _gather_ints(value: int) -> list[int]:
    import torch.distributed as dist

    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _fsdp2_advice(plan: MemoryPlan, free: int) -> str | None:
    """FSDP2 over N GPUs (each its own memory) divides gradients and optimizer state by N and
    the micro-batch too, but each rank holds the whole parameters while it evaluates (the
    Trainer gathers them); on one CPU machine its processes share the memory, so it is not named."""
    s = plan.settings
    if s["strategy"] == "fsdp2" or not s["device"].startswith("cuda"):
        return None
    rows, static = s["micro_batch_rows"], plan.gradients + plan.optimizer_state + plan.parameters
    for n in (2, 4, 8, 16, 32, 64):  # N must divide the micro-batch; evaluation gathers the whole model
        if rows % n == 0 and static / n + max(plan.activations / n, plan.parameters) <= free:
            return (f"training.strategy=fsdp2 under `torchrun --nproc_per_node {n}` ({n} GPUs: about "
                    f"{human_bytes(static / n)} of parameters, gradients and optimizer state each)")
    return None


def _fit_advice(plan: MemoryPlan, free: int) -> str:
    """The settings that would make the run fit, for a one-line refusal."""
    s = plan.settings
    rows, accum = s["micro_batch_rows"], s["grad_accum"]
    room = free - plan.gradients - plan.optimizer_state
    ways = []
    if room > 0 and plan.activations > 0:
        for k in range(2, rows + 1):  # micro-batches k times smaller, activations with them
            if rows % k == 0 and plan.activations / k <= room:
                ways.append(f"training.grad_accum={accum * k} (micro-batch of {rows // k} rows, "
                            f"about {human_bytes(plan.activations / k)} of activations)")
                break
        else:
            ways.append("a smaller training.batch_size with a larger training.grad_accum")
    if not s["activation_checkpointing"]:
        ways.append("training.activation_checkpointing=true")
    sharded = _fsdp2_advice(plan, free)
    if sharded:
        ways.append(sharded)
    if room <= 0 and not sharded or not ways:
        ways.append("a smaller model (gradients and optimizer state alone need "
                    f"{human_bytes(plan.gradients + plan.optimizer_state)})")
    return "set " + ", or ".join(ways)


def _rng_states() -> tuple[Any, ...]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def _restore_rng(states: tuple[Any, ...]) -> None:
    cpu_state, cuda, py, npy = states
    torch.set_rng_state(cpu_state)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(py)
    np.random.set_state(npy)


def measure_step(trainer: Any, meter: Meter) -> tuple[int, int, int]:
    """Forward + backward of the trainer's first micro-batch of its current step, with its
    precision and loss, no optimizer step. Returns (in use before, peak growth, gradient bytes
    it made). Gradients, RNG streams and task state are as they were afterwards."""
    cfg, world, model, task = trainer.config, trainer.world, trainer.model, trainer.task
    params = _unique_parameters(model)
    grads = [p.grad for p in params]
    rng = _rng_states()
    task_state = copy.deepcopy(task.state_dict()) if hasattr(task, "state_dict") else None
    for p in params:
        p.grad = None
    try:
        baseline = meter.reset()
        for _ in range(MEASURED_REPEATS):
            for p in params:
                p.grad = None
            if task_state is not None:
                task.load_state_dict(copy.deepcopy(task_state))
            _restore_rng(rng)
            batch = trainer._to_device(task.train_batch(trainer.step, world.rank, cfg.grad_accum * world.size))
            with trainer._autocast():
                loss = task.loss(model, batch) / cfg.grad_accum
            loss.backward()
            del loss, batch
        peak = meter.peak()
        made = sum(_local(p.grad).numel() * p.grad.element_size() for p in params if p.grad is not None)
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        _restore_rng(rng)
        if task_state is not None:
            task.load_state_dict(task_state)
    return baseline, max(peak - baseline, 0), made


def _share_of_available(meter: Meter, world: Any) -> int | None:
    """The memory this process may use: a CUDA device's own free memory, or on CPU the
    machine's available memory shared by the processes torchrun started on it."""
    free = meter.available()
    if free is None or meter.cuda:
        return free
    return free // int(os.environ.get("LOCAL_WORLD_SIZE", world.size))


def _any_rank(flag: bool, world: Any) -> bool:
    """Whether any process says so (every rank then refuses alike, none waits in a collective)."""
    return bool(distributed.mean_across(torch.tensor(float(flag), device=world.device), world) > 0)


def _settings(trainer: Any) -> dict[str, Any]:
    cfg, world = trainer.config, trainer.world
    strategy = ("fsdp2" if distributed.is_sharded(trainer.model) else "ddp") if world.distributed else "one process"
    return {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
            "micro_batch_rows": cfg.batch_size // (cfg.grad_accum * world.size),
            "precision": cfg.precision if trainer.amp_dtype is None
            else f"{cfg.precision} ({str(trainer.amp_dtype).removeprefix('torch.')} autocast)",
            "activation_checkpointing": cfg.activation_checkpointing, "compile": cfg.compile,
            "device": str(world.device), "processes": world.size, "strategy": strategy}


def before_training(trainer: Any, available: int | None = None) -> MemoryPlan | None:
    """Measure, log and write the plan (rank 0 writes); refuse a run that will not fit (one line,
    ConfigError). Under torchrun every rank measures itself (a collective: FSDP2's measured step
    gathers parameters). None where this system does not report peak memory."""
    world = trainer.world
    meter = Meter(world.device)
    if _any_rank(not meter.usable(), world):
        log.info("memory plan: not made (this system does not report peak memory)")
        return None
    counts = static_bytes(trainer.model)
    settings = _settings(trainer)
    rows = settings["micro_batch_rows"]
    free = _share_of_available(meter, world) if available is None else available
    static_need = counts["gradients"] + counts["optimizer_state"]
    if _any_rank(free is not None and static_need > free, world):  # before a step could run out of memory
        raise ConfigError(f"this run needs more than {human_bytes(static_need)} for gradients and "
                          f"optimizer state alone, but {human_bytes(free)} is available; use a smaller model")
    was_training = trainer.model.training
    trainer.model.train()
    baseline, growth, made = measure_step(trainer, meter)
    trainer.model.train(was_training)
    plan = MemoryPlan(path=trainer.run_dir / PLAN_FILE if world.is_main else None, meter=meter,
                      settings=settings, parameters=counts["parameters"], gradients=counts["gradients"],
                      optimizer_state=counts["optimizer_state"], activations=max(growth - made, 0),
                      baseline=baseline, measured_step_peak=growth, available=free,
                      n_parameters=counts["n_parameters"], n_trainable=counts["n_trainable"])
    for line in plan.log_lines():
        log.info(line)
    if _any_rank(free is not None and plan.need > free, world):
        raise ConfigError(f"this run needs about {human_bytes(plan.need)} more memory (gradients "
                          f"{human_bytes(plan.gradients)}, optimizer state {human_bytes(plan.optimizer_state)}, "
                          f"activations {human_bytes(plan.activations)} for a micro-batch of {rows} rows), "
                          f"but {human_bytes(free)} is available; {_fit_advice(plan, free)}")
    plan.write()
    return plan


__all__ = ["PLAN_FILE", "MemoryPlan", "Meter", "before_training", "measure_step", "static_bytes"]
