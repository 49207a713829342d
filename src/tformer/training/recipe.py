"""Recipes: one YAML file names a task, a model preset, a tokenizer, data and training settings.

    task: causal_lm
    model: {preset: gpt-micro, context_length: 64}
    tokenizer: {kind: char}
    data: {source: shakespeare, val_fraction: 0.1}
    training: {max_steps: 2000, batch_size: 12, lr: 1.0e-3}
    run_dir: runs/shakespeare-char

The task's module (`tasks.TASK_MODULES`) defines what its data section holds and builds the
model and Task; this file validates the recipe, keeps the tokenizer in the run directory, and
brings trained runs back (`load_run`) for generation and evaluation.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable

from torch import nn

from tformer.config import (ConfigError, apply_overrides, check_choice, did_you_mean, from_dict,
                            load_mapping)
from tformer.models import FAMILIES, get_config
from tformer.tokenizers import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer
from tformer.training import checkpoint, distributed
from tformer.training.tasks import TASK_MODULES, Prepared
from tformer.training.trainer import TrainConfig, Trainer, TrainResult

TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class TokenizerSpec:
    kind: str = "char"  # char | bpe | file
    vocab_size: int = 4096  # bpe only
    path: str | None = None  # kind=file: a tokenizer JSON (tformer or Hugging Face tokenizer.json)
    special_tokens: tuple[str, ...] = ("<|endoftext|>",)  # bpe only

    def __post_init__(self) -> None:
        check_choice("tokenizer.kind", self.kind, ("char", "bpe", "file"))
        if self.kind == "file" and not self.path:
            raise ConfigError("tokenizer.kind=file needs tokenizer.path (a tokenizer JSON file)")
        object.__setattr__(self, "special_tokens", tuple(self.special_tokens))


@dataclass(frozen=True)
class SampleSpec:
    prompt: str = "\n"
    tokens: int = 200

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ConfigError(f"sample.tokens must be >= 1, got {self.tokens}")


@dataclass(frozen=True)
class Recipe:
    task: str
    model: dict[str, Any]
    data: Any  # the task module's DataSpec
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    training: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleSpec = field(default_factory=SampleSpec)
    run_dir: str = "runs/default"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type | None] = {"task": None, "model": None, "tokenizer": TokenizerSpec,
                                    "data": None, "training": TrainConfig, "sample": SampleSpec,
                                    "run_dir": None}


def task_module(name: str) -> ModuleType:
    check_choice("task", name, TASK_MODULES)
    return importlib.import_module(TASK_MODULES[name])


def _section(data: dict[str, Any], name: str, cls: type, where: str) -> Any:
    section = data.get(name)
    section = {} if section is None else section
    if not isinstance(section, dict):
        raise ConfigError(f"section {name!r} of {where} must be a mapping of keys to values")
    return from_dict(cls, section, where=f"the {name} section of {where}")


def recipe_from_dict(data: dict[str, Any], where: str = "recipe") -> Recipe:
    """Validate sections and keys; unknown ones are named with a suggestion."""
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r} in {where}"
                          f"{did_you_mean(unknown[0], SECTIONS)}; sections: {', '.join(SECTIONS)}")
    if "task" not in data or "model" not in data:
        raise ConfigError(f"{where} needs a 'task' ({', '.join(TASK_MODULES)}) and a 'model' section")
    module = task_module(data["task"])
    model = data["model"]
    if not isinstance(model, dict) or "preset" not in model:
        raise ConfigError(f"the model section of {where} needs a preset, e.g. model: {{preset: gpt-mini}}")
    own = ("preset", *getattr(module, "MODEL_KEYS", ()))  # keys the task reads itself (init_from, ...)
    get_config(model["preset"], **{k: v for k, v in model.items() if k not in own})  # validate now
    return Recipe(task=data["task"], model=dict(model), run_dir=str(data.get("run_dir", "runs/default")),
                  data=_section(data, "data", module.DataSpec, where),
                  tokenizer=_section(data, "tokenizer", TokenizerSpec, where),
                  training=_section(data, "training", TrainConfig, where),
                  sample=_section(data, "sample", SampleSpec, where))


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file and apply `key.sub=value` overrides (unknown keys are refused)."""
    allowed = {name: ([f.name for f in dataclasses.fields(cls)] if cls else [])
               for name, cls in SECTIONS.items()}
    data = apply_overrides(load_mapping(path), overrides, allowed)
    return recipe_from_dict(data, where=str(path))


TextSource = Callable[[], Iterable[str]]


def tokenizer_maker(spec: TokenizerSpec, saved: Path | None) -> Callable[[TextSource], Tokenizer]:
    """`make(texts)`: the tokenizer saved with the run being resumed (`saved`), else one built
    from `texts()` (called only when a tokenizer is trained). Nothing is written here."""
    def make(texts: TextSource) -> Tokenizer:
        if saved is not None:
            return load_tokenizer(saved)
        if spec.kind == "file":
            return load_tokenizer(spec.path)
        if spec.kind == "char":
            return CharTokenizer.train(texts())
        return BPETokenizer.train(iter(texts()), vocab_size=spec.vocab_size,
                                  special_tokens=spec.special_tokens)

    return make


def prepare(recipe: Recipe, *, resuming: bool = False) -> Prepared:
    """Model, task and tokenizer of a recipe, and the run configuration stored with checkpoints.
    When `resuming`, the tokenizer is the one saved in the run directory."""
    saved = Path(recipe.run_dir) / TOKENIZER_FILE if resuming else None
    prepared = task_module(recipe.task).prepare(recipe, tokenizer_maker(recipe.tokenizer, saved))
    prepared.model_record = {"recipe": recipe.to_dict(), **prepared.model_record}
    return prepared


def load_run(run_dir: str | Path, which: str = "best") -> tuple[nn.Module, Tokenizer | None, dict[str, Any]]:
    """A trained model (weights from checkpoints/`which`) with its tokenizer (None for models
    that read no text, e.g. image models) and run config."""
    run_dir = Path(run_dir)
    check_choice("checkpoint", which, ("best", "last"))
    path = checkpoint.resolve(run_dir / "checkpoints" / which)
    if path is None:
        raise checkpoint.CheckpointError(f"{run_dir} has no checkpoints/{which}; train it first "
                                         f"(tformer train RECIPE) or pick --checkpoint last/best")
    checkpoint.verify(path)
    run_config = checkpoint.load_config(path)
    if run_config.get("model_family") not in FAMILIES or "model_config" not in run_config:
        raise checkpoint.CheckpointError(f"{path / checkpoint.CONFIG} does not name a model family "
                                         f"and config; was it written by tformer?")
    config_cls, model_cls = FAMILIES[run_config["model_family"]]
    model = model_cls(from_dict(config_cls, run_config["model_config"]))
    checkpoint.load(path, model, with_train_state=False)
    tokenizer_path = run_dir / TOKENIZER_FILE
    if not run_config.get("has_tokenizer", True):  # e.g. images conditioned on class labels
        return model.eval(), None, run_config
    if not tokenizer_path.is_file():
        raise checkpoint.CheckpointError(f"{run_dir} has no {TOKENIZER_FILE}; the run directory "
                                         "is incomplete (copy the tokenizer the model was trained with)")
    return model.eval(), load_tokenizer(tokenizer_path), run_config


def _clear_run(run_dir: Path) -> None:
    """--fresh: forget earlier checkpoints, metrics, samples and the tokenizer of this run."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    for name in ("metrics.jsonl", "samples.txt", "samples.png", "loss.png", TOKENIZER_FILE):
        (run_dir / name).unlink(missing_ok=True)


def _check_same_run(recipe: Recipe, last: Path) -> None:
    """Resuming needs the recipe the checkpoints were trained with (training settings may change)."""
    saved = checkpoint.load_config(last).get("recipe", {})
    current = json.loads(json.dumps(recipe.to_dict()))  # as stored: tuples become lists
    for section in ("task", "model", "tokenizer", "data"):
        if saved.get(section) != current[section]:
            raise ConfigError(f"the recipe's {section} section differs from the one {recipe.run_dir} "
                              f"was trained with ({saved.get(section)} -> {current[section]}); "
                              "to start over use --fresh, or set another run_dir")


def train_recipe(recipe: Recipe, *, fresh: bool = False) -> TrainResult:
    """Train what a recipe describes, resuming `run_dir/checkpoints/last` unless `fresh`.

    Everything is built and checked before the run directory is touched, so a bad recipe never
    costs an earlier run its checkpoints. Under torchrun, rank 0 builds the tokenizer and token
    cache first; the others then reuse them."""
    world = distributed.setup(recipe.training.device)
    run_dir = Path(recipe.run_dir)
    last = run_dir / "checkpoints" / "last"
    try:
        if world.is_main and not fresh:
            checkpoint.resolve(last)
        distributed.barrier(world)
        resuming = not fresh and (last / checkpoint.MANIFEST).is_file()
        if resuming:
            _check_same_run(recipe, last)
        if not world.is_main:
            distributed.barrier(world)
        prepared = prepare(recipe, resuming=resuming)
        if world.is_main:
            list(prepared.task.eval_batches(0, 1))  # unusable validation data fails here, not later
            if not resuming:
                _clear_run(run_dir)
                run_dir.mkdir(parents=True, exist_ok=True)
                if prepared.tokenizer is not None:
                    prepared.tokenizer.save(run_dir / TOKENIZER_FILE)
            distributed.barrier(world)
        trainer = Trainer(prepared.model, prepared.task, recipe.training, run_dir,  # DDP: all ranks
                          run_config=prepared.model_record, world=world)
        return trainer.fit(resume=resuming)
    finally:
        distributed.teardown(world)


def evaluate_run(run_dir: str | Path, which: str = "best") -> dict[str, Any]:
    """The task's evaluation (e.g. validation loss and perplexity) of a trained run."""
    model, tokenizer, run_config = load_run(run_dir, which)
    if "recipe" not in run_config:
        raise checkpoint.CheckpointError(f"{run_dir} holds an imported model, not a training run: "
                                         "there is no recipe to evaluate it with; fine-tune it with "
                                         "a recipe whose model.init_from names it")
    recipe = recipe_from_dict(run_config["recipe"], where=f"{run_dir} (saved recipe)")
    recipe = dataclasses.replace(recipe, run_dir=str(run_dir))  # outputs go where it was evaluated
    progress = checkpoint.load_progress(Path(run_dir) / "checkpoints" / which)
    results = task_module(recipe.task).evaluate(recipe, model, tokenizer)
    return {"checkpoint": which, "step": progress["step"], **results}
