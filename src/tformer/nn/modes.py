"""Switching a model to evaluation for a while: dropout off inside the block, and afterwards every
submodule back in its own mode (a frozen part kept in eval stays in eval; `model.train(was)`
would set them all alike)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """`model`: an nn.Module, or a wrapper with `training`, `eval()` and `train(mode)` (a bound
    decoder), whose own `train` restores what it wraps."""
    if not isinstance(model, nn.Module):
        was_training = model.training
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)
        return
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


__all__ = ["evaluating"]
