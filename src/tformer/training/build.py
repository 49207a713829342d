"""The one place a model is built for training: the recipe's model section (a preset, overrides,
optionally `init_from` a trained run and `freeze` prefixes) plus the fields the task derived from
its data (vocabulary size, special ids, labels, image size ...).

    model: {preset: bert-mini, init_from: runs/minilm-l6, freeze: [tok_emb], dropout: 0.1}
    model: {preset: minilm-l6, init_from: runs/minilm-l6, lora: {r: 8, alpha: 16, dropout: 0.05}}

`init_from` works for every family: the run's config is the starting point, the task's fields
replace its own (a new label set gets a fresh head), every weight whose name and shape match is
copied, and the rest is reported. `lora` adapts the built (or loaded) model with LoRA adapters
(`nn.lora`; `targets` are module name patterns, every attention and MLP projection by default)
and trains only them and the task head (`head.`); the edit is kept in the model record.
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
from tformer.models.edits import edit_kinds, edits_of, note_edit, replay_edits
from tformer.models.record import record_of
from tformer.models.registry import FAMILIES, PRESETS, family_of, get_config, preset_family
from tformer.nn import lora
from tformer.runs.memory import check_fits
from tformer.runs.run import TOKENIZER_FILE, find_checkpoint, load_model, run_dir_of
from tformer.tokenizers import load_tokenizer

log = logging.getLogger(__name__)

INIT_KEY, FREEZE_KEY, LORA_KEY = "init_from", "freeze", "lora"
OWN_KEYS = ("preset", INIT_KEY, FREEZE_KEY, LORA_KEY)  # model-section keys that are not config fields
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
    lora: dict[str, Any] | None = None  # {r, alpha, dropout, targets}, checked by `lora_settings`

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
        settings = lora_settings(section[LORA_KEY], where) if section.get(LORA_KEY) is not None else None
        return cls(preset, init_from or None, tuple(freeze), overrides, settings)

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
    n = sum(p.numel() for p in model.parameters())
    log.info("model: %s (%s), %s parameters", spec.preset, family_of(model.config), f"{n:,}")
    if spec.lora is not None:
        apply_lora(model, spec.lora)
    freeze(model, spec.freeze)  # after LoRA, which opens the task head: the user's freeze wins
    return model, {**record_of(model), **notes}


LORA_DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.0, "targets": None}


def lora_settings(section: Any, where: str = "recipe") -> dict[str, Any]:
    """model.lora with its defaults; an unknown key or a bad value is one ConfigError."""
    if section is True:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"model.lora in {where} must be a mapping, e.g. {{r: 8, alpha: 16, dropout: 0.05}}, "
                          f"got {section!r}")
    unknown = [k for k in section if k not in LORA_DEFAULTS]
    if unknown:
        raise ConfigError(f"unknown key model.lora.{unknown[0]} in {where}; keys: {', '.join(LORA_DEFAULTS)}")
    settings = {**LORA_DEFAULTS, **section}
    if isinstance(settings["targets"], str):
        settings["targets"] = [settings["targets"]]
    try:
        lora.check_params(settings["r"], settings["alpha"], settings["dropout"])
    except ValueError as e:
        raise ConfigError(f"model.lora in {where}: {e}") from None
    return settings


def apply_lora(model: nn.Module, settings: dict[str, Any]) -> None:
    """LoRA adapters on `model` (everything else frozen but the task head's own parameters),
    recorded as a model edit; logs what trains."""
    try:
        params = lora.add_lora(model, settings["targets"], r=settings["r"], alpha=settings["alpha"],
                               dropout=settings["dropout"])
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"model.lora: {e}") from None
    shared = {id(p) for name, p in model.named_parameters(remove_duplicate=False)
              if not name.startswith(HEAD_PREFIX)}
    head = [name for name, p in model.named_parameters() if name.startswith(HEAD_PREFIX) and id(p) not in shared]
    for name, param in model.named_parameters():
        if name in head:
            param.requires_grad_(True)
    note_edit(model, "lora", params)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("lora: r=%d on %d linears; trainable %s of %s parameters (%.2f%%; head: %s)", settings["r"],
             len(params["modules"]), f"{trainable:,}", f"{total:,}", 100 * trainable / total,
             "yes" if head else "none")


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
    source, record = load_model(folder)
    if "quantize" in edit_kinds(source):  # int8 buffers take no gradients
        origin = record.get("compressed_from", "the float run it was quantized from")
        raise ConfigError(f"model.init_from={spec.init_from!r} is quantized: its int8 linears cannot be "
                          f"trained; fine-tune {origin} instead and quantize the result")
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
