"""Recipes: one YAML file names a task, a model preset, a tokenizer, data and training settings.

    task: causal_lm
    model: {preset: gpt-micro, context_length: 64}
    tokenizer: {kind: char}
    data: {source: shakespeare, val_fraction: 0.1}
    training: {max_steps: 2000, batch_size: 12, lr: 1.0e-3}
    run_dir: runs/shakespeare-char

`prepare(recipe)` builds the tokenizer (trained once, then kept in the run directory), the
tokenized corpus (cached), the model and the Task; `load_run(run_dir)` brings a trained model
and its tokenizer back for generation and evaluation.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tformer.config import (ConfigError, apply_overrides, check_choice, check_fraction, did_you_mean,
                            from_dict, load_mapping)
from tformer.data.text import TokenizedCorpus, load_text
from tformer.models import FAMILIES, family_of, get_config
from tformer.tokenizers import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer
from tformer.training import checkpoint, distributed
from tformer.training.tasks import CausalLMTask, Task
from tformer.training.trainer import TrainConfig, Trainer, TrainResult

TASKS = ("causal_lm",)
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class TokenizerSpec:
    kind: str = "char"  # char | bpe | file
    vocab_size: int = 4096  # bpe only
    path: str | None = None  # kind=file: a tokenizer JSON (tformer or Hugging Face)
    special_tokens: tuple[str, ...] = ("<|endoftext|>",)  # bpe only

    def __post_init__(self) -> None:
        check_choice("tokenizer.kind", self.kind, ("char", "bpe", "file"))
        if self.kind == "file" and not self.path:
            raise ConfigError("tokenizer.kind=file needs tokenizer.path (a tokenizer JSON file)")
        object.__setattr__(self, "special_tokens", tuple(self.special_tokens))


@dataclass(frozen=True)
class DataSpec:
    source: str = "shakespeare"  # a named dataset, a text file or a folder of .txt files
    val_fraction: float = 0.1
    cache_dir: str | None = None  # None: $TFORMER_CACHE_DIR or ~/.cache/tformer/tokens

    def __post_init__(self) -> None:
        check_fraction("data.val_fraction", self.val_fraction)


@dataclass(frozen=True)
class SampleSpec:
    prompt: str = "\n"
    tokens: int = 200


@dataclass(frozen=True)
class Recipe:
    task: str
    model: dict[str, Any]
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    data: DataSpec = field(default_factory=DataSpec)
    training: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleSpec = field(default_factory=SampleSpec)
    run_dir: str = "runs/default"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type | None] = {"task": None, "model": None, "tokenizer": TokenizerSpec,
                                    "data": DataSpec, "training": TrainConfig, "sample": SampleSpec,
                                    "run_dir": None}


def recipe_from_dict(data: dict[str, Any], where: str = "recipe") -> Recipe:
    """Validate sections and keys; unknown ones are named with a suggestion."""
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r} in {where}{did_you_mean(unknown[0], SECTIONS)}; "
                          f"sections: {', '.join(SECTIONS)}")
    if "task" not in data or "model" not in data:
        raise ConfigError(f"{where} needs a 'task' ({', '.join(TASKS)}) and a 'model' section")
    check_choice("task", data["task"], TASKS)
    model = data["model"]
    if not isinstance(model, dict) or "preset" not in model:
        raise ConfigError(f"the model section of {where} needs a preset, e.g. model: {{preset: gpt-mini}}")
    values = {"task": data["task"], "model": dict(model), "run_dir": str(data.get("run_dir", "runs/default"))}
    for name in ("tokenizer", "data", "training", "sample"):
        section = data.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"section {name!r} of {where} must be a mapping of keys to values")
        values[name] = from_dict(SECTIONS[name], section, where=f"the {name} section of {where}")
    get_config(model["preset"], **{k: v for k, v in model.items() if k != "preset"})  # validate now
    return Recipe(**values)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file and apply `key.sub=value` overrides (unknown keys are refused)."""
    allowed = {name: ([f.name for f in dataclasses.fields(cls)] if cls else [])
               for name, cls in SECTIONS.items()}
    data = apply_overrides(load_mapping(path), overrides, allowed)
    return recipe_from_dict(data, where=str(path))


def _token_cache_dir(spec: DataSpec) -> Path:
    if spec.cache_dir:
        return Path(spec.cache_dir)
    root = os.environ.get("TFORMER_CACHE_DIR") or Path.home() / ".cache" / "tformer"
    return Path(root) / "tokens"


def build_tokenizer(spec: TokenizerSpec, source: str, run_dir: Path) -> Tokenizer:
    """The run's tokenizer: reused from the run directory when resuming, else built and saved."""
    saved = run_dir / TOKENIZER_FILE
    if saved.is_file():
        return load_tokenizer(saved)
    if spec.kind == "file":
        tokenizer = load_tokenizer(spec.path)
    elif spec.kind == "char":
        tokenizer = CharTokenizer.train(load_text(source))
    else:
        tokenizer = BPETokenizer.train(iter([load_text(source)]), vocab_size=spec.vocab_size,
                                       special_tokens=spec.special_tokens)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(saved)
    return tokenizer


def prepare(recipe: Recipe) -> tuple[nn.Module, Task, Tokenizer, dict[str, Any]]:
    """Model, task, tokenizer and the run configuration stored with every checkpoint."""
    run_dir = Path(recipe.run_dir)
    tokenizer = build_tokenizer(recipe.tokenizer, recipe.data.source, run_dir)
    overrides = {k: v for k, v in recipe.model.items() if k != "preset"}
    config = get_config(recipe.model["preset"], **{**overrides, "vocab_size": tokenizer.vocab_size})
    torch.manual_seed(recipe.training.seed)  # the same initial weights in every process and run
    model = FAMILIES[family_of(config)][1](config)
    corpus = TokenizedCorpus.build(recipe.data.source, tokenizer, _token_cache_dir(recipe.data),
                                   val_fraction=recipe.data.val_fraction)
    t = recipe.training
    task = CausalLMTask(corpus.train, corpus.val, context=config.context_length,
                        batch_size=t.batch_size, seed=t.seed,
                        n_eval_batches=t.eval_batches, tokenizer=tokenizer,
                        sample_prompt=recipe.sample.prompt, sample_tokens=recipe.sample.tokens)
    run_config = {"recipe": recipe.to_dict(), "model_family": family_of(config),
                  "model_config": dataclasses.asdict(config)}
    return model, task, tokenizer, run_config


def load_run(run_dir: str | Path, which: str = "best") -> tuple[nn.Module, Tokenizer, dict[str, Any]]:
    """A trained model (weights from checkpoints/`which`) with its tokenizer and run config."""
    run_dir = Path(run_dir)
    check_choice("checkpoint", which, ("best", "last"))
    path = checkpoint.resolve(run_dir / "checkpoints" / which)
    if path is None:
        raise checkpoint.CheckpointError(f"{run_dir} has no checkpoints/{which}; train it first "
                                         f"(tformer train RECIPE) or pick --checkpoint last/best")
    run_config = checkpoint.load_config(path)
    config_cls, model_cls = FAMILIES[run_config["model_family"]]
    model = model_cls(from_dict(config_cls, run_config["model_config"]))
    checkpoint.load(path, model, with_train_state=False)
    tokenizer_path = run_dir / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise checkpoint.CheckpointError(f"{run_dir} has no {TOKENIZER_FILE}; the run directory "
                                         "is incomplete (copy the tokenizer the model was trained with)")
    return model.eval(), load_tokenizer(tokenizer_path), run_config


def _clear_run(run_dir: Path) -> None:
    """--fresh: forget earlier checkpoints, metrics, samples and the tokenizer of this run."""
    import shutil

    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    for name in ("metrics.jsonl", "samples.txt", "loss.png", TOKENIZER_FILE):
        (run_dir / name).unlink(missing_ok=True)


def train_recipe(recipe: Recipe, *, fresh: bool = False) -> TrainResult:
    """Train what a recipe describes, resuming `run_dir/checkpoints/last` unless `fresh`. Under
    torchrun, rank 0 builds the tokenizer and token cache first; the others then reuse them."""
    world = distributed.setup(recipe.training.device)
    run_dir = Path(recipe.run_dir)
    try:
        if world.is_main and fresh:
            _clear_run(run_dir)
        if not world.is_main:
            distributed.barrier(world)
        model, task, _, run_config = prepare(recipe)
        if world.is_main:
            distributed.barrier(world)
        trainer = Trainer(model, task, recipe.training, run_dir, run_config=run_config, world=world)
        return trainer.fit(resume=not fresh)
    finally:
        distributed.teardown(world)


def evaluate_run(run_dir: str | Path, which: str = "best") -> dict[str, Any]:
    """Validation loss and perplexity of a trained run on its own validation split."""
    model, tokenizer, run_config = load_run(run_dir, which)
    recipe = recipe_from_dict(run_config["recipe"], where=f"{run_dir} (saved recipe)")
    corpus = TokenizedCorpus.build(recipe.data.source, tokenizer, _token_cache_dir(recipe.data),
                                   val_fraction=recipe.data.val_fraction)
    t = recipe.training
    task = CausalLMTask(corpus.train, corpus.val, context=model.config.context_length,
                        batch_size=t.batch_size, seed=t.seed,
                        n_eval_batches=t.eval_batches)
    with torch.no_grad():
        losses = [float(task.loss(model, batch)) for batch in task.eval_batches(0, 1)]
    val_loss = sum(losses) / len(losses)
    progress = checkpoint.load_progress(Path(run_dir) / "checkpoints" / which)
    return {"checkpoint": which, "step": progress["step"], "val_loss": val_loss,
            "perplexity": math.exp(val_loss), "val_tokens": int(len(corpus.val))}
