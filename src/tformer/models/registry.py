"""The registry of model families and presets: family name -> (Config, Model); preset name ->
(family, values). A family is a file in this package; adding one here is all it takes."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from tformer.config import ConfigError, did_you_mean, from_dict
from tformer.models import bert, gpt, image_gen, seq2seq, transformer_xl, vit

FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {
    "gpt": (gpt.GPTConfig, gpt.GPT),
    "transformer_xl": (transformer_xl.TransformerXLConfig, transformer_xl.TransformerXL),
    "seq2seq": (seq2seq.Seq2SeqConfig, seq2seq.Seq2Seq),
    "bert": (bert.BertConfig, bert.Bert),
    "vit": (vit.ViTConfig, vit.ViT),
    "image_gen": (image_gen.ImageGenConfig, image_gen.ImageGenerator),
}

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    name: ("gpt", values) for name, values in gpt.PRESETS.items()
}
PRESETS.update({name: ("seq2seq", values) for name, values in seq2seq.PRESETS.items()})
PRESETS.update({name: ("bert", values) for name, values in bert.PRESETS.items()})
PRESETS.update({name: ("transformer_xl", values) for name, values in transformer_xl.PRESETS.items()})
PRESETS.update({name: ("vit", values) for name, values in vit.PRESETS.items()})
PRESETS.update({name: ("image_gen", values) for name, values in image_gen.PRESETS.items()})


def family_of(config: Any) -> str:
    for name, (config_cls, _) in FAMILIES.items():
        if isinstance(config, config_cls):
            return name
    raise ConfigError(f"{type(config).__name__} is not the config of a registered model family")


def preset_family(name: str) -> str:
    """The family a preset (or a family's own name) builds; unknown names raise ConfigError."""
    if name in PRESETS:
        return PRESETS[name][0]
    if name in FAMILIES:
        return name
    options = [*PRESETS, *FAMILIES]
    raise ConfigError(f"unknown model or preset {name!r}{did_you_mean(name, options)}; available: {', '.join(options)}")


def get_config(name: str, **overrides: Any) -> Any:
    """The config of a preset (e.g. 'gpt2-small') or a family's defaults (e.g. 'gpt'), with
    `overrides` applied; unknown names and keys raise ConfigError."""
    family = preset_family(name)
    values = PRESETS[name][1] if name in PRESETS else {}
    config_cls = FAMILIES[family][0]
    return from_dict(config_cls, {**values, **overrides}, where=f"the {family} config")


def build_model(name_or_config: Any, **overrides: Any) -> nn.Module:
    """A freshly initialised model from a preset/family name or a config object."""
    if isinstance(name_or_config, str):
        config = get_config(name_or_config, **overrides)
    else:
        config = dataclasses.replace(name_or_config, **overrides) if overrides else name_or_config
    return FAMILIES[family_of(config)][1](config)

