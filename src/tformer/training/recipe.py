"""Recipes: one YAML file names a task, a model preset, a tokenizer, data and training settings.

    task: causal_lm
    model: {preset: gpt-micro, context_length: 64}
    tokenizer: {kind: char}
    data: {source: shakespeare, val_fraction: 0.1}
    training: {max_steps: 2000, batch_size: 12, lr: 1.0e-3}
    run_dir: runs/shakespeare-char

The road of a recipe: `load_recipe` validates it (unknown keys are named); `prepare` asks the
task's module (`tasks.TASK_MODULES`) for its tokenizer and the model fields its data decides,
builds the model in one place (`build.build`) and binds the task to it; `train_recipe` hands both
to the Trainer. A trained run comes back through `tformer.runs.open_run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable

from torch import nn

from tformer import energy
from tformer.config import ConfigError, apply_overrides, check_choice, did_you_mean, from_dict, load_mapping
from tformer.runs import checkpoint
from tformer.runs.run import HAS_TOKENIZER, TOKENIZER_FILE, open_run
from tformer.tokenizers import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer
from tformer.training import build, distributed, rundir
from tformer.training.settings import SampleSpec, TaskSettings, TokenizerSpec, TrainConfig
from tformer.training.tasks import TASK_MODULES, Task
from tformer.training.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)

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

    @property
    def model_spec(self) -> build.ModelSpec:
        return build.ModelSpec.from_section(self.model)

    @property
    def settings(self) -> TaskSettings:
        """What the task module reads (never the whole recipe)."""
        return TaskSettings(self.data, self.training, self.sample, Path(self.run_dir))


@dataclass
class Prepared:
    """A recipe made concrete: the model (built in one place), its task, its tokenizer, and the
    record stored with every checkpoint."""

    model: nn.Module
    task: Task
    tokenizer: Tokenizer | None
    record: dict[str, Any]


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
    build.ModelSpec.from_section(model, where).check()
    run_dir = rundir.check_run_dir(data.get("run_dir", "runs/default"), where)
    return Recipe(task=data["task"], model=dict(model), run_dir=run_dir,
                  data=_section(data, "data", module.DataSpec, where),
                  tokenizer=_section(data, "tokenizer", TokenizerSpec, where),
                  training=_section(data, "training", TrainConfig, where),
                  sample=_section(data, "sample", SampleSpec, where))


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file and apply `key.sub=value` overrides (unknown keys are refused)."""
    allowed = {name: ([f.name for f in dataclasses.fields(cls)] if cls else [])
               for name, cls in SECTIONS.items()}
    data = _beside_recipe(load_mapping(path), Path(path).parent)
    data = apply_overrides(data, overrides, allowed)
    return recipe_from_dict(data, where=str(path))


RELATIVE_PATHS = (("model", build.INIT_KEY), ("tokenizer", "path"))  # files a recipe names


def _beside_recipe(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Relative paths written in a recipe file (init_from, tokenizer.path) that do not exist from
    the current directory but do beside the recipe are taken from there: a recipe folder can be
    moved and used from anywhere. Values typed with --set stay relative to the current directory."""
    for section, key in RELATIVE_PATHS:
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            continue
        if not Path(value).exists() and (folder / value).exists():
            data = {**data, section: {**data[section], key: str(folder / value)}}
    return data


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


def _check_init_from(spec: build.ModelSpec) -> None:
    """A missing init_from is named with where it was looked for, before anything reads it."""
    if spec.init_from and not Path(spec.init_from).expanduser().exists():
        raise ConfigError(f"model.init_from={spec.init_from!r} not found: looked in "
                          f"{Path(spec.init_from).expanduser().absolute()} (a relative path in a recipe "
                          "file is also looked for beside the recipe); train that run first or fix the path")


def prepare(recipe: Recipe, *, resuming: bool = False) -> Prepared:
    """Tokenizer, model and task of a recipe, and the record stored with checkpoints. When
    `resuming`, the tokenizer is the one saved in the run directory."""
    module, spec = task_module(recipe.task), recipe.model_spec
    _check_init_from(spec)
    build.check_init_tokenizer(spec, recipe.tokenizer.kind)
    saved = Path(recipe.run_dir) / TOKENIZER_FILE if resuming else None
    data = module.prepare(recipe.settings, tokenizer_maker(recipe.tokenizer, saved))
    model, record = build.build(spec, data.model_fields, seed=recipe.training.seed, needs=module.NEEDS,
                                task=recipe.task, tokenizer=data.tokenizer)
    record = {"recipe": recipe.to_dict(), **record, HAS_TOKENIZER: data.tokenizer is not None, **data.notes}
    return Prepared(model, data.make_task(model), data.tokenizer, record)


def _check_same_run(recipe: Recipe, folder: Path) -> None:
    """Resuming (or redoing) needs the recipe the checkpoints were trained with (training settings
    may change)."""
    saved = checkpoint.load_config(folder).get("recipe", {})
    current = json.loads(json.dumps(recipe.to_dict()))  # as stored: tuples become lists
    for section in ("task", "model", "tokenizer", "data"):
        if saved.get(section) != current[section]:
            raise ConfigError(f"the recipe's {section} section differs from the one {recipe.run_dir} "
                              f"was trained with ({saved.get(section)} -> {current[section]}); "
                              "to start over use --fresh, or set another run_dir")


DATA_FINGERPRINT = "data_sha256"  # a task's note: sha256 of the training text


def _check_same_data(record: dict[str, Any], last: Path, run_dir: Path) -> None:
    """A resume continues on the text it started with, or not at all."""
    saved, current = checkpoint.load_config(last).get(DATA_FINGERPRINT), record.get(DATA_FINGERPRINT)
    if saved is None or current is None:
        return  # a run from before fingerprints, or a task that keeps none
    if saved != current:
        raise ConfigError(f"the training data of {run_dir} changed since the run started (sha256 "
                          f"{saved[:12]}... -> {current[:12]}...): resuming would go on with other text; "
                          "to start over use --fresh, or set another run_dir")


def _check_restart(recipe: Recipe, found: rundir.Survey) -> None:
    """A run with no checkpoint to resume is started again only when nothing of value is lost:
    a finished run's best model is kept, an unfinished one is redone only with its own recipe."""
    best = Path(recipe.run_dir) / "checkpoints" / "best"
    if found.kind != "run" or not (best / checkpoint.MANIFEST).is_file():
        return
    if found.finished:
        raise rundir.RunDirectoryError(
            f"{recipe.run_dir} holds a finished run (checkpoints/best) with no checkpoints/last to resume, "
            "and training again would replace it: use --fresh to start over, or another run_dir")
    _check_same_run(recipe, best)
    log.warning("%s has no checkpoint to resume (stopped before its first one); starting it again",
                recipe.run_dir)


def _open_run_dir(recipe: Recipe, fresh: bool, held: contextlib.ExitStack) -> rundir.Survey:
    """Rank 0: lock an existing run directory, refuse a foreign one, tidy a crashed run's debris."""
    run_dir = Path(recipe.run_dir)
    rundir.refuse_foreign(rundir.survey(run_dir), fresh)  # before the lock file is made there
    if run_dir.is_dir():
        held.enter_context(rundir.locked(run_dir))
    found = rundir.survey(run_dir)
    rundir.refuse_foreign(found, fresh)
    if found.kind == "run":
        rundir.tidy(run_dir)
    return found


def _start_run(run_dir: Path, prepared: Prepared, found: rundir.Survey, held: contextlib.ExitStack) -> None:
    """Rank 0, a new start: lock (creating the folder), clear an earlier attempt, mark, save the
    tokenizer."""
    held.enter_context(rundir.locked(run_dir))
    if found.kind == "new" and rundir.survey(run_dir).kind != "new":
        raise rundir.RunDirectoryError(f"{run_dir} was filled by another process while this one "
                                       "prepared its data; run the command again")
    if found.kind == "run":
        rundir.clear(run_dir)
    rundir.write_marker(run_dir, finished=False)
    if prepared.tokenizer is not None:
        prepared.tokenizer.save(run_dir / TOKENIZER_FILE)


def train_recipe(recipe: Recipe, *, fresh: bool = False) -> TrainResult:
    """Train what a recipe describes, resuming `run_dir/checkpoints/last` unless `fresh`.

    Only a new, empty or tformer run directory is written into (see `rundir`), and only by one
    process at a time. Everything is built and checked before the run directory is changed, so a
    bad recipe never costs an earlier run its checkpoints. Under torchrun, rank 0 builds the
    tokenizer and token cache first; the others then reuse them."""
    energy.check_settings()  # a bad $TFORMER_COUNTRY / $TFORMER_WATTS_PER_CORE, before anything is cleared
    world = distributed.setup(recipe.training.device, recipe.training.strategy)  # fsdp2 without torchrun too
    run_dir = Path(recipe.run_dir)
    last = run_dir / "checkpoints" / "last"
    try:
        with contextlib.ExitStack() as held:
            found = _open_run_dir(recipe, fresh, held) if world.is_main else None
            distributed.barrier(world)
            resuming = not fresh and (last / checkpoint.MANIFEST).is_file()
            if resuming:
                _check_same_run(recipe, last)
            elif not fresh and found is not None:
                _check_restart(recipe, found)
            if not world.is_main:
                distributed.barrier(world)
            prepared = prepare(recipe, resuming=resuming)
            if resuming:
                _check_same_data(prepared.record, last, run_dir)
            if world.is_main:
                list(prepared.task.eval_batches(0, 1))  # unusable validation data fails here, not later
                if not resuming:
                    _start_run(run_dir, prepared, found, held)  # type: ignore[arg-type]
                distributed.barrier(world)
            trainer = Trainer(prepared.model, prepared.task, recipe.training, run_dir,  # DDP: all ranks
                              run_config=prepared.record, world=world)
            return trainer.fit(resume=resuming)
    finally:
        distributed.teardown(world)


def saved_for_evaluation(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved recipe as evaluation reads it: a training-only setting that a later version checks
    more strictly (a warm-up longer than the run) must not lock a trained run out of evaluation."""
    training = dict(saved.get("training") or {})
    if isinstance(training.get("warmup_steps"), int) and isinstance(training.get("max_steps"), int):
        training["warmup_steps"] = min(training["warmup_steps"], training["max_steps"])
    return {**saved, "training": training}


def evaluate_run(run_dir: str | Path, which: str = "best") -> dict[str, Any]:
    """The task's evaluation (e.g. validation loss and perplexity) of a trained run."""
    run = open_run(run_dir, which)
    if run.recipe is None:
        raise checkpoint.CheckpointError(f"{run_dir} holds an imported model, not a training run: "
                                         "there is no recipe to evaluate it with; fine-tune it with "
                                         "a recipe whose model.init_from names it")
    recipe = recipe_from_dict(saved_for_evaluation(run.recipe), where=f"{run_dir} (saved recipe)")
    recipe = dataclasses.replace(recipe, run_dir=str(run.path))  # outputs go where it was evaluated
    progress = checkpoint.load_progress(run.checkpoint)
    results = task_module(recipe.task).evaluate(recipe.settings, run.model, run.tokenizer)
    return {"checkpoint": run.checkpoint.name, "step": progress["step"], **results}
