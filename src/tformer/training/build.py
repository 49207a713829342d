"""The one place a model is built for training: the recipe's model section (a preset, overrides,
optionally `init_from` a trained run and `freeze` prefixes) plus the fields the task derived from
its data (vocabulary size, special ids, labels, image size ...).

    model: {preset: bert-mini, init_from: runs/minilm-l6, freeze: [tok_emb], dropout: 0.1}

`init_from` works for every family: the run's config is the starting point, the task's fields
replace its own (a new label set gets a fresh head), every weight whose name and shape match is
copied, and the rest is reported.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tformer.config import ConfigError, from_dict
from tformer.models.protocols import can, capabilities
from tformer.models.edits import edits_of, replay_edits
from tformer.models.record import record_of
from tformer.models.registry import FAMILIES, PRESETS, family_of, get_config, preset_family
from tformer.runs.memory import check_fits
from tformer.runs.run import TOKENIZER_FILE, find_checkpoint, load_model, run_dir_of
from tformer.tokenizers import load_tokenizer

log = logging.getLogger(__name__)

INIT_KEY, FREEZE_KEY = "init_from", "freeze"
OWN_KEYS = ("preset", INIT_KEY, FREEZE_KEY)  # model-section keys that are not config fields
HEAD_PREFIX = "head."  # a family's task head; left fresh by init_from when the task fields change
SIZE_FIELDS = ("vocab_size",)  # with init_from, data may use fewer of these than the run has
TRAINING_COPIES = 4  # AdamW holds weights, gradients and two moments


@dataclass(frozen=True)
class ModelSpec:
    """A recipe's model section, split into what it says about building and the config overrides."""

    preset: str
    init_from: str | None = None
    freeze: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_section(cls, section: Any, where: str = "recipe") -> ModelSpec:
        """The spec of a model section; a preset, init_from or freeze of the wrong type is one
        line naming the key (str() of a list would be looked up as a preset name)."""
        if not isinstance(section, dict) or "preset" not in section:
            raise ConfigError(f"the model section of {where} needs a preset, e.g. model: {{preset: gpt-mini}}")
        preset, init_from = section["preset"], section.get(INIT_KEY)
        if not isinstance(preset, str) or not preset.strip():
            raise ConfigError(f"model.preset in {where} must be a preset or family name (a string, e.g. "
                              f"gpt-mini), got {preset!r}")
        if init_from is not None and not isinstance(init_from, str):
            raise ConfigError(f"model.init_from in {where} must be a run directory or checkpoint path "
                              f"(a string), got {init_from!r}")
        freeze = section.get(FREEZE_KEY) or ()
        freeze = (freeze,) if isinstance(freeze, str) else freeze
        if not isinstance(freeze, (list, tuple)) or not all(isinstance(p, str) and p for p in freeze):
            raise ConfigError(f"model.freeze in {where} must be a parameter prefix or a list of them "
                              f"(e.g. [tok_emb, blocks.0]), got {freeze!r}")
        overrides = {k: v for k, v in section.items() if k not in OWN_KEYS}
        return cls(preset, init_from or None, tuple(freeze), overrides)

    def check(self) -> None:
        """Validate the preset and overrides now (data-derived fields come later)."""
        if not self.init_from:
            get_config(self.preset, **self.overrides)


def _config(spec: ModelSpec, fields: dict[str, Any], task: str) -> Any:
    """The preset's config with the overrides, then the task's fields."""
    family = preset_family(spec.preset)
    known = {f.name for f in dataclasses.fields(FAMILIES[family][0])}
    foreign = [k for k in fields if k not in known]
    if foreign:
        fitting = sorted(name for name, (fam, _) in PRESETS.items()
                         if set(fields) <= {f.name for f in dataclasses.fields(FAMILIES[fam][0])})
        raise ConfigError(f"task {task} sets the model's {', '.join(foreign)}, which a {family} "
                          f"(preset {spec.preset!r}) does not have; presets that fit: {', '.join(fitting)}")
    for key, value in fields.items():
        if key in spec.overrides and spec.overrides[key] != value:
            log.warning("model.%s=%r is replaced by %r, which the data decides", key, spec.overrides[key], value)
    return get_config(spec.preset, **{**spec.overrides, **fields})


def build(spec: ModelSpec, fields: dict[str, Any], *, seed: int, needs: type | None = None,
          task: str = "this task", tokenizer: Any = None) -> tuple[nn.Module, dict[str, Any]]:
    """The task's model and its record (model record + init_from). Seeded, so every process and
    every run of the recipe starts from the same weights."""
    torch.manual_seed(seed)
    if spec.init_from:
        model, notes = _from_run(spec, fields, tokenizer)
    else:
        config = _config(spec, fields, task)
        _check_fits(config, spec.preset)
        model, notes = FAMILIES[family_of(config)][1](config), {}
    if needs is not None and not can(model, needs):
        raise ConfigError(f"task {task} needs a model that is a {needs.__name__}; preset {spec.preset!r} "
                          f"builds a {family_of(model.config)} that can: {', '.join(capabilities(model)) or 'none'}")
    freeze(model, spec.freeze)
    n = sum(p.numel() for p in model.parameters())
    log.info("model: %s (%s), %s parameters", spec.preset, family_of(model.config), f"{n:,}")
    return model, {**record_of(model), **notes}


def _check_fits(config: Any, preset: str) -> None:
    """Refuse, before a weight is allocated, a model that cannot be trained in this machine's
    memory: one line with what it would need (not an allocator traceback or the OOM killer)."""
    check_fits(config, copies=TRAINING_COPIES, what=f"the model of preset {preset!r} with the recipe's sizes",
               advice="lower model.n_layers, model.d_model or the vocabulary, or train on a larger machine")


def check_init_tokenizer(spec: ModelSpec, tokenizer_kind: str) -> None:
    """With init_from a run that reads text, the tokenizer must be that run's file: refuse before
    another one is trained (it would be saved in the run directory and reused)."""
    if not spec.init_from:
        return
    run_dir = run_dir_of(find_checkpoint(spec.init_from))
    if (run_dir / TOKENIZER_FILE).is_file() and tokenizer_kind != "file":
        raise ConfigError(f"model.init_from needs the run's own tokenizer: set tokenizer.kind=file and "
                          f"tokenizer.path={run_dir / TOKENIZER_FILE} (got tokenizer.kind={tokenizer_kind!r})")


def _from_run(spec: ModelSpec, fields: dict[str, Any], tokenizer: Any) -> tuple[nn.Module, dict[str, Any]]:
    """A model whose config is the run's with the overrides and fields; matching weights copied."""
    folder = find_checkpoint(spec.init_from)  # type: ignore[arg-type]
    source, _ = load_model(folder)
    tokenizer_path = run_dir_of(folder) / TOKENIZER_FILE
    if tokenizer is not None and tokenizer_path.is_file() and (
            load_tokenizer(tokenizer_path).fingerprint() != tokenizer.fingerprint()):
        raise ConfigError(f"the recipe's tokenizer is not the one {spec.init_from} was trained with "
                          f"({tokenizer_path}); use that one")
    if preset_family(spec.preset) != family_of(source.config):
        raise ConfigError(f"model.init_from={spec.init_from!r} holds a {family_of(source.config)} model, but "
                          f"model.preset={spec.preset!r} is a {preset_family(spec.preset)}")
    fields = dict(fields)
    for key in SIZE_FIELDS:  # the data may use fewer tokens than the run's vocabulary
        if key in fields and fields[key] <= getattr(source.config, key):
            fields.pop(key)
        elif key in fields:
            raise ConfigError(f"the data needs {key}={fields[key]}, the model of {spec.init_from} has "
                              f"{getattr(source.config, key)}; use the run's own tokenizer")
    changed = any(getattr(source.config, k) != v for k, v in fields.items())
    config = from_dict(type(source.config), {**dataclasses.asdict(source.config), **spec.overrides, **fields},
                       where=f"the model of {spec.init_from} with the recipe's overrides")
    _check_fits(config, spec.preset)
    model = replay_edits(type(source)(config), edits_of(source), where=f"the model of {spec.init_from}")
    fresh = transfer(source, model, keep_head=not changed, where=spec.init_from)  # type: ignore[arg-type]
    log.info("initialised from %s; new: %s", spec.init_from, ", ".join(fresh) or "nothing")
    return model, {INIT_KEY: str(spec.init_from)}


def transfer(source: nn.Module, target: nn.Module, *, keep_head: bool, where: str) -> list[str]:
    """Copy source's weights into target by name; the names left fresh (the task head when
    `keep_head` is False, and parameters the source lacks under it). Shape mismatches elsewhere
    are errors: a size key was overridden."""
    theirs, state, fresh = source.state_dict(), target.state_dict(), []
    for name, tensor in state.items():
        in_head = name.startswith(HEAD_PREFIX)
        if name in theirs and (keep_head or not in_head):
            if theirs[name].shape != tensor.shape:
                raise ConfigError(f"model.init_from: {name} has shape {tuple(theirs[name].shape)} in {where} "
                                  f"but {tuple(tensor.shape)} here; do not override size keys when fine-tuning")
            state[name] = theirs[name]
        elif in_head:
            fresh.append(name)
        else:
            raise ConfigError(f"model.init_from: {where} has no {name}")
    target.load_state_dict(state)
    return fresh


def freeze(model: nn.Module, prefixes: tuple[str, ...]) -> None:
    """Keep the parameters under `prefixes` (e.g. ["tok_emb"] or ["blocks.0"]) fixed in training:
    fewer gradients and optimizer updates, e.g. the 30k x 384 word embeddings of MiniLM."""
    for prefix in prefixes:
        chosen = [p for name, p in model.named_parameters() if name == prefix or name.startswith(prefix + ".")]
        if not chosen:
            top = sorted({name.split(".")[0] for name, _ in model.named_parameters()})
            raise ConfigError(f"model.freeze: {prefix!r} names no parameters; e.g. {top} or blocks.0")
        for param in chosen:
            param.requires_grad_(False)
    if prefixes:
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        log.info("frozen: %s (%d parameters)", ", ".join(prefixes), frozen)
