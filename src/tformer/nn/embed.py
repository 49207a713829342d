"""Input embeddings: tokens (with an id-range check) and image patches (ViT)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class TokenEmbedding(nn.Embedding):
    """nn.Embedding that names the bad id instead of failing inside the kernel; optional
    sqrt(d_model) scaling (Vaswani et al. section 3.4)."""

    def __init__(self, vocab_size: int, d_model: int, *, scale: bool = False) -> None:
        super().__init__(vocab_size, d_model)
        self.scale = math.sqrt(d_model) if scale else 1.0

    def forward(self, ids: Tensor) -> Tensor:
        if not torch.compiler.is_compiling():
            check_token_ids(ids, self.num_embeddings)
        out = super().forward(ids)
        return out * self.scale if self.scale != 1.0 else out


def check_token_ids(ids: Tensor, vocab_size: int) -> None:
    """Raise a clear error for non-integer ids or ids outside [0, vocab_size)."""
    if ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
        raise ValueError(f"token ids must be an integer tensor, got {ids.dtype}")
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is out of range for a vocabulary of {vocab_size} "
                         f"(valid ids: 0..{vocab_size - 1}); was the input encoded with this "
                         "model's tokenizer?")


class PatchEmbedding(nn.Module):
    """Image (B, C, H, W) -> patch vectors (B, H/p * W/p, d_model) via a strided convolution
    (equivalent to flattening each p x p patch and applying one Linear)."""

    def __init__(self, image_size: int, patch_size: int, channels: int, d_model: int) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by patch size {patch_size}")
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        self.n_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(channels, d_model, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        expected = (self.channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (batch, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}), got {tuple(images.shape)}")
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, N, d_model)
