"""Structural edits of a built model, kept in its record so that a checkpoint of an edited model
opens as it was saved: pruned heads and neurons (`prune`), LoRA adapters (`lora`), quantized
linears (`quantize`).

An edit is a dict `{"kind": ..., **params}`. Whoever edits a model (compress, a recipe's
`model.lora`) changes the modules and calls `note_edit`; `model_record` writes `edits_of(model)`
under "model_edits", and opening a checkpoint replays each edit on a freshly built model *by shape
only* (`replay_edits`) before its weights are loaded into it:

    prune     {"modules": {"blocks.0.attn": {"heads": 6}, "blocks.0.ffn": {"units": 1024}}}
    lora      {"targets": [...], "r": 8, "alpha": 16, ...}
    quantize  {"scheme": "int8-dynamic" | "int8-weight" | ..., "modules": [...]}
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from torch import nn

from tformer.config import ConfigError
from tformer.nn import lora, pruning, quantized

EDITS_KEY = "model_edits"
ATTRIBUTE = "tformer_edits"  # where a live model keeps its edits, oldest first

# kind -> replay(model, params): rebuild the edit's shapes (and dtypes) on a fresh model; the
# weights are loaded afterwards, so a replay never needs the values the edit chose
REPLAYS: dict[str, Callable[[nn.Module, dict[str, Any]], None]] = {
    "prune": pruning.replay,
    "lora": lora.replay,
    "quantize": quantized.replay,
}


def edits_of(model: nn.Module) -> list[dict[str, Any]]:
    """The edits made to `model`, oldest first (a copy; empty for a model as built)."""
    return [dict(edit) for edit in getattr(model, ATTRIBUTE, ())]


def edit_kinds(model: nn.Module) -> set[str]:
    """The kinds of edit made to `model` (empty for a model as built)."""
    return {edit["kind"] for edit in edits_of(model)}


def edit_params(model: nn.Module, kind: str) -> dict[str, Any] | None:
    """The params of `model`'s first edit of `kind` (without "kind"); None when there is none."""
    found = [edit for edit in edits_of(model) if edit["kind"] == kind]
    return {k: v for k, v in found[0].items() if k != "kind"} if found else None


def forget_edits(model: nn.Module, kind: str) -> None:
    """Drop the record of every `kind` edit, after the model was changed back (LoRA merged into
    plain linears): its record then describes what it now is."""
    object.__setattr__(model, ATTRIBUTE, [edit for edit in edits_of(model) if edit["kind"] != kind])


def note_edit(model: nn.Module, kind: str, params: Mapping[str, Any]) -> None:
    """Record that `model` was edited (after the edit was made); params must be JSON data."""
    if kind not in REPLAYS:
        raise ValueError(f"unknown model edit {kind!r}; known: {', '.join(REPLAYS)}")
    object.__setattr__(model, ATTRIBUTE, [*edits_of(model), {"kind": kind, **params}])


def replay_edits(model: nn.Module, edits: Any, where: str = "the model record") -> nn.Module:
    """Apply recorded edits to a freshly built model, by shape; a malformed edit is one
    ConfigError naming `where`. Returns the model (edited in place)."""
    if edits is None:
        return model
    if not isinstance(edits, Sequence) or isinstance(edits, (str, bytes)):
        raise ConfigError(f"{where}: {EDITS_KEY} must be a list of edits, got {type(edits).__name__}")
    for edit in edits:
        kind = edit.get("kind") if isinstance(edit, Mapping) else None
        if kind not in REPLAYS:
            raise ConfigError(f"{where}: {EDITS_KEY} holds an edit tformer does not know ({kind!r}; known: "
                              f"{', '.join(REPLAYS)}); was it written by a newer version?")
        params = {k: v for k, v in edit.items() if k != "kind"}
        try:
            REPLAYS[kind](model, params)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{where}: the {kind} edit cannot be applied to this model ({e}); "
                              "the record was changed or belongs to another model") from None
        note_edit(model, kind, params)
    return model


__all__ = ["EDITS_KEY", "REPLAYS", "edit_kinds", "edit_params", "edits_of", "forget_edits", "note_edit",
           "replay_edits"]
