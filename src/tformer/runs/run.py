"""Open a run directory (or a bare checkpoint folder) into what using a model needs: the model
with its weights, its tokenizer, its record and what it can do. Everything that *uses* a trained
model (prediction, generation, evaluation, explanation, export) starts here, not at the Trainer.

    run = open_run("runs/gpt-shakespeare-char")     # checkpoints/best
    run.model, run.tokenizer, run.capabilities      # nn.Module (eval mode), Tokenizer | None, [...]

A run directory holds `checkpoints/{best,last}/` (see `checkpoint`), `tokenizer.json` when the
model reads text, and what training wrote for people (metrics.jsonl, loss.png, samples.txt).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from tformer.config import ConfigError, check_choice
from tformer.models.protocols import can, capabilities
from tformer.models.record import model_from_record
from tformer.runs import checkpoint
from tformer.runs.checkpoint import CheckpointError
from tformer.tokenizers import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
HAS_TOKENIZER = "has_tokenizer"  # run-record key: False for models that read no text


@dataclass
class Run:
    """A trained model ready to use (eval mode) and what came with it."""

    path: Path  # the run directory (or the checkpoint folder's run, when it has one)
    checkpoint: Path  # the checkpoint folder the weights came from
    model: nn.Module
    tokenizer: Tokenizer | None
    record: dict[str, Any] = field(default_factory=dict)  # config.json of the checkpoint

    @property
    def capabilities(self) -> list[str]:
        return capabilities(self.model)

    def can(self, protocol: type) -> bool:
        return can(self.model, protocol)

    @property
    def recipe(self) -> dict[str, Any] | None:
        """The recipe the run was trained with (None for imported models)."""
        return self.record.get("recipe")


def find_checkpoint(path: str | Path, which: str = "best") -> Path:
    """The checkpoint folder of a run directory (checkpoints/`which`, else the other one) or the
    folder itself when it is a checkpoint; a clear error otherwise."""
    check_choice("checkpoint", which, ("best", "last"))
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give a run directory (e.g. runs/NAME) or a checkpoint")
    if path.is_dir() and path.name in ("best", "last") and path.parent.name == "checkpoints":
        checkpoint.resolve(path)
        return path
    if (path / checkpoint.MANIFEST).is_file():
        return path
    if (path / "config.json").is_file() and not (path / checkpoint.PROGRESS).is_file():
        raise ConfigError(f"{path} looks like a Hugging Face checkpoint, not a tformer run; convert it "
                          "once with `tformer import` (or tformer.interop) and use the run directory it writes")
    for name in (which, "last" if which == "best" else "best"):
        folder = checkpoint.resolve(path / "checkpoints" / name)  # recovers a crash mid-swap
        if folder is not None:
            if name != which:
                log.warning("%s has no checkpoints/%s; using checkpoints/%s", path, which, name)
            return folder
    raise CheckpointError(f"{path} holds no tformer checkpoint (no checkpoints/best or checkpoints/last "
                          "with a manifest.json); train it first (tformer train RECIPE --set run_dir=...)")


def run_dir_of(folder: Path) -> Path:
    """The run directory of a checkpoint folder (RUN/checkpoints/NAME), else the folder."""
    return folder.parent.parent if folder.parent.name == "checkpoints" else folder


def load_model(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model a checkpoint folder holds (verified, weights loaded, eval mode) and its record."""
    checkpoint.verify(folder)
    record = checkpoint.load_config(folder)
    try:
        model = model_from_record(record, where=str(folder / checkpoint.CONFIG))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    checkpoint.load(folder, model, with_train_state=False)
    return model.eval(), record


def tokenizer_of(run_dir: Path, record: dict[str, Any]) -> Tokenizer | None:
    """The run's tokenizer; None for models that read no text (e.g. class-conditioned images)."""
    path = run_dir / TOKENIZER_FILE
    if path.is_file():
        return load_tokenizer(path)
    if not record.get(HAS_TOKENIZER, True):
        return None
    raise CheckpointError(f"{run_dir} has no {TOKENIZER_FILE}; the run directory is incomplete (copy the "
                          "tokenizer the model was trained with into it)")


def open_run(path: str | Path, which: str = "best") -> Run:
    """A run directory or checkpoint folder -> Run (see the module docstring)."""
    folder = find_checkpoint(path, which)
    model, record = load_model(folder)
    run_dir = run_dir_of(folder)
    return Run(run_dir, folder, model, tokenizer_of(run_dir, record), record)


__all__ = ["HAS_TOKENIZER", "TOKENIZER_FILE", "Run", "find_checkpoint", "load_model", "open_run", "run_dir_of",
           "tokenizer_of"]
