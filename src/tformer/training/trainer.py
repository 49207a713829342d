"""One training loop for every model family: a Task supplies batches and the loss.

AdamW with decay groups, warmup + cosine schedule, gradient accumulation, clipping, mixed
precision, periodic evaluation, best/last checkpoints, early stopping, a guard against
non-finite losses, exact resume, and DDP or FSDP2 under torchrun.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from tformer import cpu
from tformer.config import ConfigError
from tformer.energy import EnergyMeter, EnergyReading
from tformer.runs import checkpoint
from tformer.training import distributed, memory_plan, rundir
from tformer.training import state as run_state
from tformer.training.checkpointing import apply_activation_checkpointing
from tformer.training.optim import build_optimizer, learning_rate
from tformer.training.report import Reporter
from tformer.training.settings import TrainConfig
from tformer.training.tasks.base import Batch, Task

log = logging.getLogger(__name__)

@dataclass
class TrainResult:
    step: int
    best_val_loss: float | None
    last_val_loss: float | None
    stopped_early: bool = False
    interrupted: bool = False
    energy: EnergyReading | None = None  # the run's total (all sessions), work per J of this session


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite); the message says what to try."""


AMX_MIN_WIDTH = 128  # CPU bf16 autocast pays from this layer width (see autocast_dtype)


def autocast_dtype(precision: str, device: torch.device, model: nn.Module | None = None) -> torch.dtype | None:
    """The autocast dtype of a precision setting; None for fp32.

    auto: bf16 on GPUs that have it; on a CPU with AMX bf16 units, bf16 when every linear layer
    reads >= 128 features (measured, 2 cores: a 128-wide baby GPT step 1.4x faster than fp32 and
    the same validation loss; a 64-wide model gains nothing); fp32 otherwise."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        if device.type == "cpu" and model is not None and cpu.has_amx_bf16():
            widths = [m.in_features for m in model.modules()  # nn.Linear, LoRA and int8 linears alike
                      if isinstance(getattr(m, "in_features", None), int)]
            return torch.bfloat16 if widths and min(widths) >= AMX_MIN_WIDTH else None
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Trainer:
    """`Trainer(model, task, config, run_dir).fit()` trains, evaluates and checkpoints into run_dir."""

    plan_memory = True  # measure and write memory_plan.json before the first step (memory_plan)
    meter: EnergyMeter | None = None  # opened when fit starts; read at log intervals and evaluations
    country: str | None = None  # carbon intensity of this country (None: $TFORMER_COUNTRY, else world)

    def __init__(self, model: nn.Module, task: Task, config: TrainConfig, run_dir: str | Path, *,
                 run_config: dict[str, Any] | None = None, world: distributed.World | None = None,
                 reporter: Reporter | None = None) -> None:
        self.config, self.task = config, task
        self.world = world or distributed.World(device=distributed.pick_device(config.device))
        distributed.check_strategy(config.strategy, self.world.device, self.world.size)
        if config.batch_size % (config.grad_accum * self.world.size):
            raise ConfigError(f"batch_size ({config.batch_size}) must be divisible by grad_accum x "
                              f"processes ({config.grad_accum} x {self.world.size})")
        self.run_dir = Path(run_dir).expanduser()
        self.run_config = run_config or {}
        self.model = model.to(self.world.device)
        if config.activation_checkpointing:  # before DDP / FSDP2 and compile wrap the blocks
            apply_activation_checkpointing(self.model, config.activation_checkpointing)
        self.amp_dtype = autocast_dtype(config.precision, self.world.device, self.model)
        self.scaler = torch.amp.GradScaler(self.world.device.type,
                                           enabled=self.amp_dtype == torch.float16)
        # fsdp2 shards self.model in place; the optimizer then holds this process's shards
        self.train_model = distributed.wrap(self.model, self.world, config.strategy, self.amp_dtype)
        self.optimizer = build_optimizer(self.model, config.lr, config.weight_decay,
                                         (config.beta1, config.beta2))
        if config.compile:
            self.train_model = torch.compile(self.train_model)
        self.reporter = reporter or Reporter(self.run_dir, config.max_steps, enabled=self.world.is_main)
        self.step, self.best_val_loss, self.last_val_loss, self.evals_without_gain = 0, None, None, 0
        self.stopped_early, self._stop_requested = False, False
        self._eval_batches: list[Batch] = []
        self.seen = (0.0, 0.0)  # tokens and examples trained on since the last progress line
        self.threads: cpu.ThreadPolicy | None = None  # set when fit starts
        self.memory_plan: memory_plan.MemoryPlan | None = None  # made when fit starts

    # -- checkpoints ------------------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "checkpoints" / "best"

    def _progress(self) -> dict[str, Any]:
        return {"step": self.step, "best_val_loss": self.best_val_loss,
                "last_val_loss": self.last_val_loss, "evals_without_gain": self.evals_without_gain,
                "stopped_early": self.stopped_early}

    def save(self, path: Path, with_train_state: bool = True) -> None:
        """Write a checkpoint (rank 0 writes; every rank contributes its RNG stream; FSDP2: the
        weights and optimizer state are gathered whole to rank 0, the same files as one process)."""
        gathered = distributed.reshard(self.model)  # state dicts are read from the shards
        sharded = distributed.is_sharded(self.model)
        weights = distributed.full_model_state(self.model) if sharded else self.model
        optimizer = run_state.optimizer_state(self.model, self.optimizer) if with_train_state else None
        rng = run_state.gather_rng_states(self.world) if with_train_state else []
        tasks = run_state.gather_task_states(self.task, self.world) if with_train_state else None
        if self.world.is_main:
            state = run_state.train_state(optimizer, self.scaler, rng, tasks) if with_train_state else None
            run_config = {**self.run_config, "training": asdict(self.config)}
            checkpoint.save(path, weights, progress=self._progress(), config=run_config,
                            train_state=state)
        del weights, optimizer
        if gathered:  # e.g. saved between evaluation and rank 0's samples
            distributed.gather(self.model)
        distributed.barrier(self.world)

    def _load(self, path: Path, with_train_state: bool = True) -> checkpoint.Checkpoint:
        """Load a checkpoint's weights (FSDP2: rank 0 reads them, every rank gets its shards) and
        return the rest."""
        distributed.reshard(self.model)
        if not distributed.is_sharded(self.model):
            return checkpoint.load(path, self.model, with_train_state=with_train_state, device=self.world.device)
        ckpt = checkpoint.load(path, None, with_train_state=with_train_state, device="cpu")
        weights = checkpoint.read_weights(path, self.model) if self.world.is_main else None
        distributed.load_full_model_state(self.model, weights)
        return ckpt

    def resume(self) -> bool:
        """Load `checkpoints/last` if present: weights, optimizer, RNG streams and progress."""
        if self.world.is_main:
            checkpoint.resolve(self.last_path)  # recover from a crash between renames
        distributed.barrier(self.world)
        if not (self.last_path / checkpoint.MANIFEST).is_file():
            return False
        ckpt = self._load(self.last_path)
        if ckpt.train_state is not None:
            run_state.restore(ckpt.train_state, self.model, self.optimizer, self.scaler, self.world)
            run_state.restore_task(ckpt.train_state, self.task, self.world)
        p = ckpt.progress
        self.step, self.best_val_loss = p["step"], p["best_val_loss"]
        self.last_val_loss, self.evals_without_gain = p["last_val_loss"], p["evals_without_gain"]
        self.stopped_early = p.get("stopped_early", False)
        self.reporter.truncate_after(self.step)
        log.info("resumed from %s at step %d", self.last_path, self.step)
        return True

    def _restore_after_bad_steps(self, bad_steps: int) -> None:
        if not (self.last_path / checkpoint.MANIFEST).is_file():
            raise TrainingError(f"the loss or gradients were not finite for {bad_steps} steps in a "
                                "row and there is no checkpoint to go back to; lower training.lr, "
                                "set training.grad_clip, or check the data")
        ckpt = self._load(self.last_path)
        run_state.restore_optimizer(ckpt.train_state, self.model, self.optimizer, self.world)
        log.warning("loss was not finite for %d steps in a row: restored the weights and optimizer "
                    "of %s (step %d) and continue with fresh data from step %d", bad_steps,
                    self.last_path, ckpt.progress["step"], self.step)

    # -- steps ------------------------------------------------------------------------------
    def _to_device(self, batch: Batch) -> Batch:
        return batch.to(self.world.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.world.device.type, dtype=self.amp_dtype)

    def train_step(self) -> tuple[float, bool]:
        """One optimizer step over grad_accum micro-batches. Returns (mean loss, was finite);
        the step's tokens and examples (all processes) are added to self.seen."""
        cfg, world = self.config, self.world
        lr = learning_rate(self.step, lr=cfg.lr, min_lr=cfg.final_lr, warmup_steps=cfg.warmup_steps,
                           max_steps=cfg.max_steps, schedule=cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        distributed.reshard(self.model)  # FSDP2 after evaluation: back to shards
        total = torch.zeros((), device=world.device)
        tokens, examples = 0, 0
        for micro in range(cfg.grad_accum):
            shard = micro * world.size + world.rank  # of grad_accum x processes equal shards
            batch = self._to_device(self.task.train_batch(self.step, shard, cfg.grad_accum * world.size))
            tokens, examples = tokens + batch.n_tokens, examples + batch.n_examples
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last else distributed.no_sync(self.train_model, world)
            with sync:
                with self._autocast():
                    loss = self.task.loss(self.train_model, batch) / cfg.grad_accum
                self.scaler.scale(loss).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = distributed.clip_grad_norm(self.model.parameters(), max_norm)
        stop = torch.tensor(float(self._stop_requested), device=world.device)
        counts = torch.tensor([tokens, examples], dtype=torch.float32, device=world.device)
        health = distributed.mean_across(torch.cat([torch.stack([total, grad_norm.float(), stop]), counts]), world)
        self._stop_requested = bool(health[2] > 0)  # every process stops at the same step
        self.seen = (self.seen[0] + float(health[3]) * world.size, self.seen[1] + float(health[4]) * world.size)
        if self.scaler.is_enabled():  # fp16: the scaler skips overflowing steps and backs off
            self.scaler.step(self.optimizer)
            self.scaler.update()
            finite = bool(torch.isfinite(health[0]))
        else:
            finite = bool(torch.isfinite(health[:2]).all())
            if finite:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(health[0]), finite

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the task's evaluation batches (all processes)."""
        distributed.gather(self.model)  # FSDP2: whole parameters, no collectives in the forwards below
        self.model.eval()
        losses = []
        for batch in self._eval_batches:
            with self._autocast():
                losses.append(self.task.loss(self.model, self._to_device(batch)).float())
        self.model.train()
        return float(distributed.mean_across(torch.stack(losses).mean(), self.world))

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, resume: bool = True) -> TrainResult:
        """Train to max_steps (or an early stop), resuming checkpoints/last when `resume`.
        Ctrl-C stops at the end of the current step and saves; a second Ctrl-C stops at once.
        Only a new, empty or tformer run directory is used, by one process at a time (`rundir`)."""
        with rundir.claim(self.run_dir, main=self.world.is_main), cpu.restored_threads():
            result = self._fit(resume)
            if self.world.is_main and not result.interrupted:
                rundir.write_marker(self.run_dir, finished=True)
            return result

    def _fit(self, resume: bool) -> TrainResult:
        torch.manual_seed(self.config.seed + self.world.rank)
        self._open_meter()
        if not (resume and self.resume()):
            self.reporter.truncate_after(0)  # a new run: no rows of an earlier attempt
        self.energy_before = self.energy_logged = self.reporter.last("energy_j") or 0.0  # earlier sessions
        self.earlier_estimated = self.reporter.last("energy_method") == "estimated"  # the total stays an estimate
        if self.stopped_early:
            log.warning("this run already stopped early at step %d; train with --fresh or another "
                        "run_dir to start again", self.step)
            return self._result()
        self.check_data()
        self.model.train()
        if self.world.device.type == "cpu":  # one process adapts to contention; torchrun's ranks do not
            self.threads = cpu.thread_policy(self.config.threads, adapt=not self.world.distributed)
        self.memory_plan = (memory_plan.before_training(self)
                            if self.plan_memory and self.step < self.config.max_steps else None)
        with self._graceful_interrupt():
            try:
                self._loop()
            finally:
                self.reporter.end_line()
        if self._stop_requested:
            self.save(self.last_path)
            log.warning("interrupted at step %d; checkpoint saved to %s, run the same command "
                        "again to resume", self.step, self.last_path)
            return self._result(interrupted=True, energy=self._log_energy_total())
        energy = self._log_energy_total()
        self.reporter.plot()
        return self._result(energy=energy)

    def check_data(self) -> None:
        """Build the validation batches now, so unusable data fails before training, not at
        the first evaluation."""
        if not self._eval_batches:
            self._eval_batches = list(self.task.eval_batches(self.world.rank, self.world.size))

    def _result(self, interrupted: bool = False, energy: EnergyReading | None = None) -> TrainResult:
        return TrainResult(self.step, self.best_val_loss, self.last_val_loss, self.stopped_early,
                           interrupted, energy or self._session_energy())

    # -- energy -----------------------------------------------------------------------------
    def _open_meter(self) -> None:
        self.meter = EnergyMeter.for_device(self.world.device, country=self.country,
                                            local_rank=self.world.local_rank)
        self.energy_before, self.energy_logged, self.session_work = 0.0, 0.0, (0.0, 0.0)  # tokens, examples
        self.earlier_estimated = False

    def _energy(self) -> EnergyReading:
        """The run's energy so far: every process's (a collective under torchrun: call it on every
        rank) plus a resumed run's earlier sessions (rank 0 holds those, from metrics.jsonl)."""
        mine = torch.tensor(self.meter.joules(), dtype=torch.float64, device=self.world.device)
        total = float(distributed.mean_across(mine, self.world)) * self.world.size
        reading = self.meter.reading(self.energy_before + total)
        if self.earlier_estimated and reading.method == "measured":
            reading = dataclasses.replace(reading, method="estimated", source=f"{reading.source}+earlier-estimated")
        return reading

    def _energy_fields(self) -> dict[str, Any]:
        """A log row's energy: cumulative J, kWh, CO2e, and the interval's tokens and examples per J."""
        reading = self._energy()
        window = reading.doing(reading.joules - self.energy_logged, tokens=self.seen[0], examples=self.seen[1])
        self.energy_logged = reading.joules
        self.session_work = (self.session_work[0] + self.seen[0], self.session_work[1] + self.seen[1])
        return window.fields()

    def _log_energy_total(self) -> EnergyReading:
        """The total so far as the session's last metrics row (`energy_total: true`: everything up to
        the last checkpoint, so a resumed run counts on from all of it)."""
        energy = self._session_energy()
        self.reporter.log({"step": self.step, "energy_total": True, **energy.fields()})
        return energy

    def _session_energy(self) -> EnergyReading | None:
        """The total so far, with the tokens and examples per J of this session's training."""
        if self.meter is None:
            return None
        reading = self._energy()
        tokens, examples = self.session_work
        return reading.doing(reading.joules - self.energy_before, tokens=tokens, examples=examples)

    @contextlib.contextmanager
    def _graceful_interrupt(self) -> Iterator[None]:
        """SIGINT sets a flag read at the next step boundary (so the saved state is exact)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt  # a second Ctrl-C: stop at once, keep the last checkpoint
            self._stop_requested = True
            log.warning("stopping after this step (Ctrl-C again to stop at once)")

        previous = signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _loop(self) -> None:
        cfg = self.config
        checkpoint_every = cfg.checkpoint_every or cfg.eval_every
        bad_steps, window_start = 0, time.perf_counter()
        if self.memory_plan is not None:
            self.memory_plan.start(self.step)
        while self.step < cfg.max_steps:
            loss, finite = self.train_step()
            self.step += 1
            bad_steps = 0 if finite else bad_steps + 1
            if not finite:
                log.warning("step %d: non-finite loss or gradient; the update was skipped", self.step)
                if bad_steps >= cfg.max_bad_steps:
                    self._restore_after_bad_steps(bad_steps)
                    bad_steps = 0
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                tokens_per_s, examples_per_s = self.seen[0] / elapsed, self.seen[1] / elapsed
                lr = self.optimizer.param_groups[0]["lr"]
                threads = torch.get_num_threads() if self.world.device.type == "cpu" else None
                self.reporter.log({"step": self.step, "train_loss": loss, "lr": lr, "tokens_per_s": tokens_per_s,
                                   "examples_per_s": examples_per_s, "threads": threads, **self._energy_fields()})
                self.reporter.progress(self.step, loss, lr, tokens_per_s, threads)
                if self.threads is not None:
                    self.threads.update()
                window_start, self.seen = time.perf_counter(), (0.0, 0.0)
                if self.memory_plan is not None and self.memory_plan.due(self.step, self.step == cfg.max_steps):
                    self.memory_plan.record_measured(self.step)
            at_end = self.step == cfg.max_steps
            if self.step % cfg.eval_every == 0 or at_end:
                if self._evaluate_and_maybe_stop():
                    self.stopped_early = True
                    self.save(self.last_path)
                    return
            if self.step % checkpoint_every == 0 or at_end:
                self.save(self.last_path)
            if self._stop_requested:
                return

    def _evaluate_and_maybe_stop(self) -> bool:
        val_loss = self.evaluate()
        self.last_val_loss = val_loss
        improved = self.best_val_loss is None or val_loss < self.best_val_loss
        if improved:
            self.best_val_loss, self.evals_without_gain = val_loss, 0
            self.save(self.best_path, with_train_state=False)
        else:
            self.evals_without_gain += 1
        self.reporter.log({"step": self.step, "val_loss": val_loss, "best_val_loss": self.best_val_loss,
                           **self._energy().fields()})
        if self.world.is_main:
            self.reporter.samples(self.step, self.task.samples(self.model))
            self.reporter.plot()
        log.info("step %d: validation loss %.4f (best %.4f)", self.step, val_loss, self.best_val_loss)
        patience = self.config.early_stop_patience
        if patience is not None and self.evals_without_gain >= patience:
            log.info("early stop at step %d: no improvement in %d evaluations", self.step, patience)
            return True
        return False
