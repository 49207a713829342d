"""AdamW with decay / no-decay parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (linear and embedding weights) decay; biases and norm gains do not (nanoGPT /
    GPT-3 practice). Tied parameters appear once."""
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW, fused on CUDA and CPU (one kernel per parameter group instead of a foreach chain:
    GPT-2-small's optimizer step 250 -> 76 ms on 2 cores; the same update within rounding)."""
    device_type = next(model.parameters()).device.type
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=betas,
                             fused=device_type in ("cuda", "cpu"))


def learning_rate(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int,
                  schedule: str) -> float:
    """Linear warmup over `warmup_steps`, then `schedule` from lr down to min_lr at max_steps:
    'cosine' (half a cosine), 'linear', or 'constant'."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant" or max_steps <= warmup_steps:
        return lr
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    if schedule == "linear":
        return lr - (lr - min_lr) * progress
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
