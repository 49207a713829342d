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
from tformer.models.edits import EDITS_KEY, replay_edits
from tformer.models.record import CONFIG_KEY, FAMILY_KEY, config_from_record
from tformer.models.registry import build_model
from tformer.runs import checkpoint
from tformer.runs.checkpoint import CheckpointError
from tformer.runs.memory import check_fits
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


def config_of(folder: Path, record: dict[str, Any]) -> Any:
    """The model config a checkpoint's record describes; anything else is one CheckpointError line
    (config.json is data from disk: a wrong type in it is a bad file, not a bug)."""
    where = str(folder / checkpoint.CONFIG)
    if not isinstance(record.get(FAMILY_KEY), str) or not isinstance(record.get(CONFIG_KEY), dict):
        raise CheckpointError(f"{where} does not describe a model: it needs \"{FAMILY_KEY}\" (a name) and "
                              f"\"{CONFIG_KEY}\" (an object); was it written by tformer?")
    try:
        return config_from_record(record, where=where)
    except (ConfigError, TypeError, ValueError, ArithmeticError) as e:  # a value of the wrong type
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(reason if isinstance(e, ConfigError) else f"{where}: {reason}") from None


def load_model(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The model a checkpoint folder holds (verified, weights loaded, eval mode) and its record. A
    model too large for this machine's memory is refused before anything is allocated."""
    checkpoint.verify(folder)
    record = checkpoint.load_config(folder)
    config = config_of(folder, record)
    try:
        check_fits(config, what=f"the model in {folder}", advice="it cannot be opened on this machine")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    try:
        model = replay_edits(build_model(config), record.get(EDITS_KEY), where=str(folder / checkpoint.CONFIG))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    checkpoint.load(folder, model, with_train_state=False)
    return model.eval(), record


def token_vocabularies(config: Any) -> dict[str, int]:
    """The embedding tables a run's tokenizer ids index, by config field: a language model's
    vocab_size, a translation model's source and target vocabularies, a text-conditioned image
    model's condition_vocab. Families that read no tokens (ViT, label-conditioned images): none."""
    sizes = {name: getattr(config, name) for name in ("vocab_size", "target_vocab_size")
             if isinstance(getattr(config, name, None), int)}
    condition_vocab = getattr(config, "condition_vocab", None)
    if getattr(config, "condition", None) == "text" and isinstance(condition_vocab, int):
        sizes["condition_vocab"] = condition_vocab
    return sizes


def check_vocabulary(tokenizer: Tokenizer | None, config: Any, where: Path) -> None:
    """A tokenizer whose ids reach past the model's embeddings would fail mid-generation (after
    printing); refuse it when the run is opened."""
    if tokenizer is None:
        return
    too_small = {name: size for name, size in token_vocabularies(config).items()
                 if tokenizer.vocab_size > size}
    if too_small:
        fields = ", ".join(f"{name}={size}" for name, size in too_small.items())
        raise CheckpointError(f"{where} has {tokenizer.vocab_size} tokens but the model's vocabulary has "
                              f"{fields}: ids past it would fail; it is not the tokenizer this model was "
                              "trained with (copy that one into the run directory)")


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
    tokenizer = tokenizer_of(run_dir, record)
    check_vocabulary(tokenizer, getattr(model, "config", None), run_dir / TOKENIZER_FILE)
    return Run(run_dir, folder, model, tokenizer, record)


__all__ = ["HAS_TOKENIZER", "TOKENIZER_FILE", "Run", "check_vocabulary", "config_of", "find_checkpoint",
           "load_model", "open_run", "run_dir_of", "token_vocabularies", "tokenizer_of"]
