"""Switching a model to evaluation for a while: dropout off inside the block, and afterwards every
submodule back in its own mode (a frozen part kept in eval stays in eval; `model.train(was)`
would set them all alike)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


__all__ = ["evaluating"]
