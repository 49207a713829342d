"""What a run shows a person: a progress line (loss, lr, tokens/s, ETA), `metrics.jsonl`, a
loss-curve PNG, an energy PNG and `samples.txt`, all in the run directory. Only the main rank
reports."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from tformer.files import write_figure_atomic, write_text_atomic

log = logging.getLogger(__name__)

SAMPLE_HEADER = re.compile(r"--- step (\d+) ---")


def format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def read_metrics(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, row) of every readable metrics row; a line that is not a JSON object with a step
    (a crash cut it mid-write) is skipped with a warning naming the file and line."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            log.warning("%s line %d is not a metrics row (cut by a crash mid-write?): %.60r; dropped",
                        path, number, line)
            continue
        rows.append((line, row))
    return rows


def truncate_samples(path: Path, step: int) -> None:
    """Keep the `--- step N ---` blocks of samples.txt with N <= step."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for index, line in enumerate(lines):
        header = SAMPLE_HEADER.fullmatch(line.rstrip("\n"))
        if header and int(header[1]) > step:
            write_text_atomic(path, "".join(lines[:index]))
            return


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Training and validation loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for _, row in read_metrics(metrics_path):
        if "train_loss" in row:
            train.append((row["step"], row["train_loss"]))
        if "val_loss" in row:
            val.append((row["step"], row["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), label="validation", marker="o", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_figure_atomic(fig, png_path)


def plot_energy(metrics_path: Path, png_path: Path) -> bool:
    """Cumulative energy (kWh) and CO2e (g) against step, from metrics.jsonl; False (nothing
    drawn) when no row carries energy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for _, row in read_metrics(metrics_path) if "energy_kwh" in row]
    if not rows:
        return False
    steps = [row["step"] for row in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [row["energy_kwh"] for row in rows], color="tab:orange", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("energy (kWh)")
    co2 = ax.secondary_yaxis("right", functions=(lambda kwh: kwh * rows[-1]["co2_g_per_kwh"],
                                                  lambda g: g / rows[-1]["co2_g_per_kwh"]))
    co2.set_ylabel(f"CO2e (g, {rows[-1]['co2_country']})")
    ax.set_title(f"energy, {rows[-1]['energy_method']} ({rows[-1]['energy_source']})", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_figure_atomic(fig, png_path)
    return True


def last_value(metrics_path: Path, key: str) -> Any:
    """The value of `key` in the last row of metrics.jsonl that has it; None if none does."""
    if not metrics_path.is_file():
        return None
    found = [row[key] for _, row in read_metrics(metrics_path) if key in row]
    return found[-1] if found else None


class Reporter:
    """Writes metrics and plots into `run_dir`; draws a one-line progress display on `stream`."""

    def __init__(self, run_dir: Path, max_steps: int, *, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.run_dir, self.max_steps, self.enabled = run_dir, max_steps, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.metrics_path = run_dir / "metrics.jsonl"
        self.start_time = time.perf_counter()
        self.start_step: int | None = None

    def truncate_after(self, step: int) -> None:
        """Forget metrics and samples logged after `step` (resume: they will be redone; 0: a new
        run) and lines a crash cut (named in a warning)."""
        if not self.enabled:
            return
        truncate_samples(self.run_dir / "samples.txt", step)
        if not self.metrics_path.is_file():
            return
        kept = [line for line, row in read_metrics(self.metrics_path) if row["step"] <= step]
        write_text_atomic(self.metrics_path, "".join(line + "\n" for line in kept))

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def progress(self, step: int, loss: float, lr: float, tokens_per_s: float, threads: int | None = None) -> None:
        if not self.enabled:
            return
        if self.start_step is None:
            self.start_step, self.start_time = step, time.perf_counter()
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        eta = format_seconds(elapsed / done * (self.max_steps - step)) if done > 0 else "--:--"  # after 2 lines
        width = 24
        filled = int(width * step / max(1, self.max_steps))
        bar = "#" * filled + "." * (width - filled)
        line = (f"[{bar}] step {step}/{self.max_steps}  loss {loss:.4f}  lr {lr:.2e}  "
                f"{tokens_per_s:,.0f} tok/s{'' if threads is None else f' ({threads} thr)'}  ETA {eta}")
        # a terminal redraws one line; a log file or pipe gets one plain line per report
        self.stream.write(f"\r{line} " if self._terminal else f"{line}\n")
        self.stream.flush()

    @property
    def _terminal(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:  # a closed stream
            return False

    def end_line(self) -> None:
        if self.enabled and self._terminal:
            self.stream.write("\n")
            self.stream.flush()

    def plot(self) -> None:
        if not self.enabled or not self.metrics_path.is_file():
            return
        try:
            plot_losses(self.metrics_path, self.run_dir / "loss.png")
            plot_energy(self.metrics_path, self.run_dir / "energy.png")
        except ImportError:
            log.warning("matplotlib is not installed: no loss.png (pip install matplotlib)")

    def last(self, key: str) -> Any:
        """The latest logged value of `key` (e.g. a resumed run's energy so far); None if none."""
        return last_value(self.metrics_path, key) if self.enabled else None

    def samples(self, step: int, texts: list[str]) -> None:
        if not self.enabled or not texts:
            return
        with open(self.run_dir / "samples.txt", "a", encoding="utf-8") as f:
            for text in texts:
                f.write(f"--- step {step} ---\n{text}\n")
