"""The model record: the one dict that says which model a checkpoint holds. Every checkpoint's
config.json carries it (next to run keys such as the recipe); `model_record` writes it and
`model_from_record` reads it back into a freshly built model (weights are loaded separately).
A model that was edited after it was built (pruned, given LoRA adapters, quantized) carries its
edits under "model_edits" (see `edits`); they are replayed, by shape, on the fresh model."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from torch import nn

from tformer.config import ConfigError, from_dict
from tformer.models.edits import EDITS_KEY, edits_of, replay_edits
from tformer.models.registry import FAMILIES, family_of

FAMILY_KEY, CONFIG_KEY = "model_family", "model_config"


def model_record(config: Any, edits: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """{"model_family": ..., "model_config": {...}} of a family's config object, with
    "model_edits" when the model was edited after it was built."""
    record = {FAMILY_KEY: family_of(config), CONFIG_KEY: dataclasses.asdict(config)}
    return {**record, EDITS_KEY: list(edits)} if edits else record


def record_of(model: nn.Module) -> dict[str, Any]:
    """The record of a live model: its config and the edits made to it."""
    return model_record(model.config, edits_of(model))


def config_from_record(record: Mapping[str, Any], where: str = "the model record") -> Any:
    """The config object a record describes; an unknown family or bad key is named."""
    family = record.get(FAMILY_KEY)
    if not isinstance(family, str) or family not in FAMILIES or not isinstance(record.get(CONFIG_KEY), Mapping):
        known = ", ".join(FAMILIES)
        raise ConfigError(f"{where} does not describe a model tformer knows (model_family="
                          f"{family!r}; known: {known}); was it written by tformer, or by a newer version?")
    return from_dict(FAMILIES[family][0], dict(record[CONFIG_KEY]), where=f"{where} ({CONFIG_KEY})")


def model_from_record(record: Mapping[str, Any], where: str = "the model record") -> nn.Module:
    """A freshly initialised model of the record's family and config, with its edits replayed."""
    config = config_from_record(record, where)
    return replay_edits(FAMILIES[family_of(config)][1](config), record.get(EDITS_KEY), where)


__all__ = ["CONFIG_KEY", "FAMILY_KEY", "config_from_record", "model_from_record", "model_record", "record_of"]
