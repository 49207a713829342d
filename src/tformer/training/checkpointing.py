"""Activation checkpointing for any family: the model's `Block`s are found by type (GPT, BERT,
ViT, Transformer-XL's relative-attention blocks, both stacks of the encoder-decoders) and every
N-th one recomputes its activations in the backward pass (`Block.checkpointed`).

    apply_activation_checkpointing(model, True)   # every block
    apply_activation_checkpointing(model, 2)      # blocks 2, 4, 6, ... (counted from 1, in module order)
"""

from __future__ import annotations

import logging

from torch import nn

from tformer.config import ConfigError
from tformer.nn.block import Block

log = logging.getLogger(__name__)


def blocks_of(model: nn.Module) -> list[Block]:
    """The model's residual blocks in module order (an encoder-decoder: encoder, then decoder)."""
    return [module for module in model.modules() if isinstance(module, Block)]


def apply_activation_checkpointing(model: nn.Module, setting: bool | int) -> list[Block]:
    """Mark every N-th block of `model` as checkpointed (True: N = 1; False: none, and unmark
    all). Returns the checkpointed blocks. A setting that would checkpoint nothing on a model that
    asked for it (no blocks, or N larger than the block count) is a ConfigError."""
    every = int(setting)  # True -> 1, False -> 0
    blocks = blocks_of(model)
    chosen = [block for i, block in enumerate(blocks, start=1) if every and i % every == 0]
    if every and not chosen:
        reason = ("it has no transformer blocks" if not blocks
                  else f"it has {len(blocks)} blocks; set training.activation_checkpointing <= {len(blocks)}")
        raise ConfigError(f"training.activation_checkpointing={setting!r} checkpoints no block of "
                          f"{type(model).__name__}: {reason}")
    for block in blocks:
        block.checkpointed = block in chosen
    if chosen:
        log.info("activation checkpointing: %d of %d blocks recompute their activations in backward",
                 len(chosen), len(blocks))
    return chosen
