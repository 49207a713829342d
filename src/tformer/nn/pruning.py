"""PLACEHOLDER (being written): replay(model, params) restores this edit's shapes on a fresh model."""

from __future__ import annotations

from typing import Any

from torch import nn


def replay(model: nn.Module, params: dict[str, Any]) -> None:
    raise NotImplementedError("pruning edits are being written")
