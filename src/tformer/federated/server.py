"""The server's side: the global model, its evaluation after every round on the task's validation
data, and the run directory the federation writes.

    OUT/metrics.jsonl          one row per round: round, step, val_loss, accuracy (a classifier), and
                               epsilon / delta spent so far under differential privacy
    OUT/clients.jsonl          one row per client per round: partition, examples, train_loss
    OUT/federation.png         validation loss and accuracy against the round
    OUT/checkpoints/last       the global model after the last round (tformer's checkpoint format:
    OUT/checkpoints/best       `tformer evaluate` / `predict` open it); best: the lowest val_loss
    OUT/federation.json        the federation (recipe, clients, partition, strategy)

OUT is a tformer run directory (marker, lock; a foreign folder is refused). Run again with more
--rounds and the federation resumes from checkpoints/last; rows after its round are dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, MetricRecord, RecordDict

from tformer.config import ConfigError
from tformer.energy import EnergyMeter, EnergyReading
from tformer.federated.local import federated_training
from tformer.federated.partition import partition
from tformer.federated.privacy import gaussian_epsilon
from tformer.federated.spec import FederationSpec
from tformer.federated.weights import load_arrays, to_arrays
from tformer.files import read_json, write_json_atomic, write_text_atomic
from tformer.runs import checkpoint
from tformer.runs.run import TOKENIZER_FILE
from tformer.training import rundir
from tformer.training.recipe import prepare
from tformer.training.report import Reporter, last_value, read_metrics
from tformer.training.trainer import Trainer

log = logging.getLogger(__name__)

SPEC_FILE, CLIENTS_FILE, METRICS_FILE, PLOT_FILE = "federation.json", "clients.jsonl", "metrics.jsonl", "federation.png"
OWN_FILES = (SPEC_FILE, CLIENTS_FILE, PLOT_FILE)  # beside rundir.OUTPUTS: what --fresh clears


class GlobalModel:
    """The global model, its task on the whole data (for validation) and the run directory."""

    def __init__(self, spec: FederationSpec) -> None:
        self.spec, self.out = spec, Path(spec.out)
        recipe = spec.recipe_obj
        self.prepared = prepare(recipe)
        partition(self.prepared.task, spec.partition_spec, spec.clients, spec.seed)  # bad input: one line, now
        self.config = federated_training(recipe.training, spec)
        self.trainer = Trainer(self.prepared.model, self.prepared.task, self.config, self.out,
                               reporter=Reporter(self.out, self.config.max_steps, enabled=False))
        self.done, self.best = 0, math.inf
        self.meter = EnergyMeter.for_device(self.trainer.world.device)  # its own work; clients report theirs
        self.energy_before, self.client_joules, self.clients_measured = 0.0, 0.0, True

    # -- the run directory ----------------------------------------------------------------------
    def open(self, fresh: bool) -> None:
        """Refuse a foreign folder; start fresh, or resume from checkpoints/last."""
        found = rundir.survey(self.out)
        rundir.refuse_foreign(found, fresh)
        if found.kind == "run":
            rundir.tidy(self.out)
        last = self.out / "checkpoints" / "last"
        if found.kind == "run" and not fresh and (last / checkpoint.MANIFEST).is_file():
            self.spec.same_federation(read_json(self.out / SPEC_FILE, "the federation"))
            saved = checkpoint.load(last, self.prepared.model, with_train_state=False)
            self.done, self.best = saved.progress["round"], saved.progress["best_val_loss"] or math.inf
            log.info("resuming the federation in %s after round %d", self.out, self.done)
        elif found.kind == "run":
            rundir.clear(self.out)
            for name in OWN_FILES:
                (self.out / name).unlink(missing_ok=True)
        self._truncate(self.done)
        self.energy_before = last_value(self.out / METRICS_FILE, "energy_j") or 0.0  # earlier sessions
        rundir.write_marker(self.out, finished=False)
        saved = {**json.loads(self.spec.to_json()), "steps_per_round": self.spec.steps_per_round}
        write_json_atomic(self.out / SPEC_FILE, saved, indent=1)
        if self.prepared.tokenizer is not None:
            self.prepared.tokenizer.save(self.out / TOKENIZER_FILE)
        self.trainer.check_data()

    def _truncate(self, rounds: int) -> None:
        for name in (METRICS_FILE, CLIENTS_FILE):
            path = self.out / name
            if path.is_file():
                kept = [line for line, row in read_metrics(path) if row.get("round", 0) <= rounds]
                write_text_atomic(path, "".join(line + "\n" for line in kept))

    def arrays(self) -> ArrayRecord:
        return to_arrays(self.prepared.model)

    # -- each round -----------------------------------------------------------------------------
    def evaluate(self, round_: int, arrays: ArrayRecord) -> MetricRecord:
        """Validation loss (and accuracy) of the global model after `round_`; checkpoint it."""
        load_arrays(self.prepared.model, arrays)
        row: dict[str, Any] = {"round": round_, "step": round_ * self.spec.steps_per_round,
                               "val_loss": self.trainer.evaluate()}
        accuracy = getattr(self.prepared.task, "accuracy", None)
        if callable(accuracy):
            row["accuracy"] = accuracy(self.prepared.model)
        row.update(self.energy().fields())
        if self.spec.private:  # the privacy spent by the rounds so far
            row["epsilon"] = gaussian_epsilon(self.spec.dp_noise, round_, self.spec.dp_delta)[0]
            row["delta"] = self.spec.dp_delta
        self._append(METRICS_FILE, row)
        if round_ > 0:
            self._checkpoint(round_, row["val_loss"])
        plot_rounds(self.out / METRICS_FILE, self.out / PLOT_FILE)
        log.info("round %d: %s", round_, " ".join(f"{k}={v:.4g}" for k, v in row.items()
                                                 if k != "round" and isinstance(v, (int, float))))
        return MetricRecord({k: float(v) for k, v in row.items() if isinstance(v, (int, float))})

    def energy(self) -> EnergyReading:
        """The federation's energy so far: this server's and every client's training (each client
        meters its own rounds), plus a resumed federation's earlier sessions; an estimate when any
        part is."""
        reading = self.meter.reading(self.energy_before + self.meter.joules() + self.client_joules)
        if not self.clients_measured:
            reading = dataclasses.replace(reading, method="estimated", source=reading.source + "+clients-estimated")
        return reading

    def _checkpoint(self, round_: int, val_loss: float) -> None:
        improved = val_loss < self.best
        self.best = min(self.best, val_loss)
        progress = {"step": round_ * self.spec.steps_per_round, "round": round_, "best_val_loss": self.best,
                    "last_val_loss": val_loss, "evals_without_gain": 0, "stopped_early": False}
        config = {**self.prepared.record, "training": dataclasses.asdict(self.config),
                  "federation": json.loads(self.spec.to_json())}
        model = self.prepared.model
        checkpoint.save(self.out / "checkpoints" / "last", model, progress=progress, config=config)
        if improved:
            checkpoint.save(self.out / "checkpoints" / "best", model, progress=progress, config=config)

    def record_clients(self, replies: list[RecordDict]) -> None:
        """One clients.jsonl row per reply (its MetricRecord: round, partition, examples, loss)."""
        for reply in replies:
            metrics = next(iter(reply.metric_records.values()))
            self.client_joules += float(metrics.get("energy_j", 0.0))
            self.clients_measured &= bool(metrics.get("energy_measured", 0.0))
            row = {k: (int(v) if k in ("round", "partition", "num-examples", "examples") else v)
                   for k, v in metrics.items()}
            self._append(CLIENTS_FILE, {"step": row["round"] * self.spec.steps_per_round, **row})

    def _append(self, name: str, row: dict[str, Any]) -> None:
        with open(self.out / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def finish(self) -> None:
        rundir.write_marker(self.out, finished=self.done_rounds() >= self.spec.rounds)

    def done_rounds(self) -> int:
        last = self.out / "checkpoints" / "last"
        return checkpoint.load_progress(last)["round"] if (last / checkpoint.MANIFEST).is_file() else 0


@contextlib.contextmanager
def global_model(spec: FederationSpec, fresh: bool) -> Iterator[GlobalModel]:
    """The global model with its run directory locked (one federation per folder at a time)."""
    if not spec.out:
        raise ConfigError("the federation has no output folder (--out)")
    rundir.refuse_foreign(rundir.survey(spec.out), fresh)  # before the lock file is made there
    resuming = not fresh and (Path(spec.out) / "checkpoints" / "last" / checkpoint.MANIFEST).is_file()
    server = GlobalModel(spec.keeping_schedule(Path(spec.out) / SPEC_FILE) if resuming else spec)  # the data is read and the model built before anything is written
    with rundir.locked(spec.out):
        server.open(fresh)
        yield server
        server.finish()


def plot_rounds(metrics: Path, png: Path) -> None:
    """Validation loss (and accuracy, on a second axis) of the global model against the round."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tformer.files import write_figure_atomic

    rows = [row for _, row in read_metrics(metrics)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["round"] for r in rows], [r["val_loss"] for r in rows], "o-", color="tab:blue", label="val loss")
    ax.set_xlabel("round")
    ax.set_ylabel("validation loss", color="tab:blue")
    if all("accuracy" in r for r in rows):
        twin = ax.twinx()
        twin.plot([r["round"] for r in rows], [r["accuracy"] for r in rows], "s--", color="tab:orange")
        twin.set_ylabel("accuracy", color="tab:orange")
    ax.set_title("global model after each round")
    fig.tight_layout()
    write_figure_atomic(fig, png)
    plt.close(fig)
