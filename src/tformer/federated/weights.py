"""What travels between server and clients: the model's trainable parameters, by name, as
Flower `ArrayRecord`s. Frozen parameters (MiniLM's word embeddings) never change, so they are
never sent; every node builds them from the same recipe."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that train, by name (tied ones once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def to_arrays(model: nn.Module) -> ArrayRecord:
    return ArrayRecord({name: Array(p.detach().cpu().numpy()) for name, p in trainable(model).items()})


def load_arrays(model: nn.Module, record: ArrayRecord) -> None:
    """Copy `record` into the model's trainable parameters; names and shapes must match exactly."""
    params = trainable(model)
    if set(record.keys()) != set(params):
        missing, extra = sorted(set(params) - set(record.keys())), sorted(set(record.keys()) - set(params))
        raise ValueError(f"the weights sent do not fit this model: missing {missing[:3]}, unexpected {extra[:3]}; "
                         "every node must build the model from the same recipe")
    with torch.no_grad():
        for name, array in record.items():
            value = torch.from_numpy(np.asarray(array.numpy()))
            if value.shape != params[name].shape:
                raise ValueError(f"{name}: sent {tuple(value.shape)}, the model has {tuple(params[name].shape)}")
            params[name].copy_(value)
