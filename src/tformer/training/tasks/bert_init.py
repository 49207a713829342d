"""The Bert a BERT task trains: a fresh model from a preset, or one that starts from the weights
of a tformer checkpoint (`model.init_from` in a recipe: a run directory or a checkpoint folder).

Hugging Face checkpoints are converted once with `tformer.interop.hf_bert.convert_bert`; the
result is a run directory (weights + tokenizer.json) that `init_from` accepts. The encoder is
always transferred; the head only when the checkpoint has the same head and labels.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tformer.config import ConfigError, from_dict
from tformer.models import PRESETS, get_config
from tformer.models.bert import Bert, BertConfig
from tformer.tokenizers import load_tokenizer
from tformer.training import checkpoint

if TYPE_CHECKING:
    from tformer.training.recipe import Recipe

log = logging.getLogger(__name__)

INIT_KEY, FREEZE_KEY = "init_from", "freeze"
MODEL_KEYS = (INIT_KEY, FREEZE_KEY)  # model-section keys a BERT task reads itself, not BertConfig's
TOKENIZER_FILE = "tokenizer.json"


def bert_presets() -> list[str]:
    """Names of the registry's BERT presets."""
    return [name for name, (family, _) in PRESETS.items() if family == "bert"]


def model_overrides(recipe: Recipe) -> dict[str, Any]:
    """The model section's BertConfig overrides (without preset and init_from)."""
    return {k: v for k, v in recipe.model.items() if k not in ("preset", *MODEL_KEYS)}


def input_length(max_length: int | None, context_length: int) -> int:
    """data.max_length, or the model's context_length when it is None; longer is refused."""
    if max_length is None:
        return context_length
    if max_length > context_length:
        raise ConfigError(f"data.max_length={max_length} exceeds the model's context_length "
                          f"({context_length}); lower it or leave it unset")
    return max_length


def find_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """(checkpoint folder, its run's tokenizer.json or None) for a run directory or a checkpoint."""
    path = Path(path).expanduser()
    if (path / checkpoint.MANIFEST).is_file():
        run = path.parent.parent if path.parent.name == "checkpoints" else None
        tokenizer = run / TOKENIZER_FILE if run is not None else None
        return path, tokenizer if tokenizer is not None and tokenizer.is_file() else None
    for which in ("best", "last"):
        if (path / "checkpoints" / which / checkpoint.MANIFEST).is_file():
            tokenizer = path / TOKENIZER_FILE
            return path / "checkpoints" / which, tokenizer if tokenizer.is_file() else None
    if (path / "config.json").is_file() and not (path / checkpoint.PROGRESS).is_file():
        raise ConfigError(f"model.init_from={str(path)!r} looks like a Hugging Face checkpoint; convert it "
                          "once with `tformer.interop.hf_bert.convert_bert(path, out_dir)` and set "
                          "model.init_from to out_dir")
    raise FileNotFoundError(f"model.init_from={str(path)!r} is neither a tformer run directory (with "
                            "checkpoints/best) nor a checkpoint folder (with manifest.json)")


def check_init_tokenizer(recipe: Recipe) -> None:
    """With init_from, the tokenizer must be the checkpoint's file: refuse before any is trained
    (a trained one would be saved in the run directory and reused)."""
    if recipe.model.get(INIT_KEY) and recipe.tokenizer.kind != "file":
        raise ConfigError(f"model.init_from needs the checkpoint's own tokenizer: set tokenizer.kind=file "
                          f"and tokenizer.path=<run dir>/{TOKENIZER_FILE} (got tokenizer.kind="
                          f"{recipe.tokenizer.kind!r})")


def _source_model(init_from: str) -> tuple[Bert, Path | None]:
    folder, tokenizer_path = find_checkpoint(init_from)
    record = checkpoint.load_config(folder)
    if record.get("model_family") != "bert":
        raise ConfigError(f"model.init_from={init_from!r} holds a {record.get('model_family')!r} model, "
                          "not a bert")
    model = Bert(from_dict(BertConfig, record["model_config"], where=f"{folder} (model_config)"))
    checkpoint.load(folder, model, with_train_state=False)  # verified against its manifest
    return model, tokenizer_path


def _transfer(source: Bert, target: Bert) -> list[str]:
    """Copy the encoder (and a matching head) from source into target; the names left fresh."""
    same_head = (source.config.head, source.config.labels) == (target.config.head, target.config.labels)
    theirs, fresh = source.state_dict(), []
    state = target.state_dict()
    for name, tensor in state.items():
        from_head = name.startswith("head.")
        if name in theirs and (same_head or not from_head):
            if theirs[name].shape != tensor.shape:
                raise ConfigError(f"model.init_from: {name} has shape {tuple(theirs[name].shape)} in the "
                                  f"checkpoint but {tuple(tensor.shape)} here; do not override size keys "
                                  "when fine-tuning")
            state[name] = theirs[name]
        elif from_head:
            fresh.append(name)
        else:
            raise ConfigError(f"model.init_from: the checkpoint has no {name}")
    target.load_state_dict(state)
    return fresh


def freeze(model: Bert, prefixes: Any) -> None:
    """Keep the parameters under `prefixes` (e.g. ["tok_emb"] or ["blocks.0"]) fixed in training:
    fewer gradients and optimizer updates, e.g. the 30k x 384 word embeddings of MiniLM."""
    prefixes = [prefixes] if isinstance(prefixes, str) else list(prefixes or [])
    for prefix in prefixes:
        chosen = [p for name, p in model.named_parameters()
                  if name == prefix or name.startswith(prefix + ".")]
        if not chosen:
            top = sorted({name.split(".")[0] for name, _ in model.named_parameters()})
            raise ConfigError(f"model.freeze: {prefix!r} names no parameters; e.g. {top} or blocks.0")
        for param in chosen:
            param.requires_grad_(False)
    if prefixes:
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        log.info("frozen: %s (%d parameters)", ", ".join(prefixes), frozen)


def build_bert(recipe: Recipe, tokenizer: Any, **task_fields: Any) -> tuple[Bert, dict[str, Any]]:
    """The task's Bert (`task_fields`: head, labels) and the model record kept with checkpoints;
    `model.freeze` is applied to it."""
    model, record = _build(recipe, tokenizer, task_fields)
    freeze(model, recipe.model.get(FREEZE_KEY))
    return model, record


def _build(recipe: Recipe, tokenizer: Any, task_fields: dict[str, Any]) -> tuple[Bert, dict[str, Any]]:
    """A fresh Bert from the preset, or one initialised from model.init_from."""
    preset = recipe.model["preset"]
    if preset not in bert_presets() and preset != "bert":
        raise ConfigError(f"task {recipe.task} trains a BERT; model.preset={preset!r} is not one of "
                          f"{bert_presets()}")
    init_from = recipe.model.get(INIT_KEY)
    torch.manual_seed(recipe.training.seed)  # the same fresh weights in every process and run
    if not init_from:
        config = get_config(preset, **{**model_overrides(recipe), "vocab_size": tokenizer.vocab_size,
                                       **task_fields})
        return Bert(config), {"model_family": "bert", "model_config": dataclasses.asdict(config)}
    source, tokenizer_path = _source_model(init_from)
    if tokenizer_path is not None and load_tokenizer(tokenizer_path).fingerprint() != tokenizer.fingerprint():
        raise ConfigError(f"the recipe's tokenizer ({recipe.tokenizer.path}) is not the one "
                          f"{init_from} was trained with ({tokenizer_path}); use that one")
    if tokenizer.vocab_size > source.config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens, the checkpoint's model "
                          f"{source.config.vocab_size}; use the checkpoint's own tokenizer")
    config = dataclasses.replace(source.config, **{**model_overrides(recipe), **task_fields})
    model = Bert(config)
    fresh = _transfer(source, model)
    log.info("initialised from %s (%d layers, d_model=%d); new: %s", init_from, config.n_layers,
             config.d_model, ", ".join(fresh) or "nothing")
    return model, {"model_family": "bert", "model_config": dataclasses.asdict(config),
                   "init_from": str(init_from)}


__all__ = ["INIT_KEY", "MODEL_KEYS", "build_bert", "check_init_tokenizer", "find_checkpoint", "freeze",
           "input_length"]
