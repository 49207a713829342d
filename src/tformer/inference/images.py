"""Sampling images from an `ImageGenerator`: conditions (class names or prompts) -> condition
ids, the shared KV-cache decoding with temperature / top-k and classifier-free guidance, pixel
tokens -> pixels, and a labelled PNG grid (one row per condition)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from tformer.files import atomic_path
from tformer.inference.generate import MAX_ROWS, Sampling, check_count, generate
from tformer.models.image_gen import NULL, ImageGenConfig, ImageGenerator

MAX_IMAGES = 65_536  # images per call: all are held in memory (and in a grid) at once


def label_id(config: ImageGenConfig, condition: str | int) -> int:
    """A class given by name ('seven') or index (7 or '7' when names are not numbers)."""
    labels = config.labels
    if isinstance(condition, str) and condition in labels:
        return labels.index(condition)
    if isinstance(condition, int) or (isinstance(condition, str) and condition.strip().isdigit()):
        index = int(condition)
        if 0 <= index < config.condition_vocab:
            return index
    known = ", ".join(repr(name) for name in labels) or f"0..{config.condition_vocab - 1}"
    raise ValueError(f"unknown class {condition!r}: this model generates {known} (a name or its index)")


def condition_ids(config: ImageGenConfig, conditions: Sequence[str | int], tokenizer: Any = None
                  ) -> tuple[Tensor, Tensor]:
    """Conditions -> ids (B, L) and mask (B, L) bool, right-padded. Label models take class names
    or indices; text models take prompts, encoded with the run's character tokenizer (ids shifted
    by one: 0 is the null condition)."""
    if not conditions:
        raise ValueError("give at least one condition (a class name or a prompt)")
    if config.condition == "label":
        rows = [[label_id(config, c) + 1] for c in conditions]
    else:
        if tokenizer is None:
            raise ValueError("a text-conditioned model needs its tokenizer (the run's tokenizer.json)")
        rows = [_encode_prompt(config, tokenizer, str(c)) for c in conditions]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), NULL, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), True
    return ids, mask


def _encode_prompt(config: ImageGenConfig, tokenizer: Any, prompt: str) -> list[int]:
    if not prompt.strip():
        raise ValueError("the prompt is empty: describe the image, e.g. 'a handwritten seven'")
    unknown = sorted(set(prompt) - set(getattr(tokenizer, "chars", prompt)))
    if unknown:
        raise ValueError(f"the prompt {prompt!r} has characters this model never saw: {unknown}")
    ids = [i + 1 for i in tokenizer.encode(prompt)]
    if len(ids) > config.condition_length:
        raise ValueError(f"the prompt {prompt!r} has {len(ids)} characters; this model reads at most "
                         f"{config.condition_length}")
    return ids


def sample_tokens(model: ImageGenerator, cond_ids: Tensor, cond_mask: Tensor | None = None,
                  sampling: Sampling | None = None, *, guidance_scale: float = 1.0,
                  seed: int | None = None) -> Tensor:
    """One image per condition row: pixel tokens (B, H*W), sampled in raster order."""
    config = model.config
    device = model.head.weight.device
    cond_ids = cond_ids.to(device)
    cond_mask = None if cond_mask is None else cond_mask.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            decoder = model.bind(cond_ids, cond_mask, guidance_scale)
        bos = torch.full((cond_ids.shape[0], 1), config.bos_id, dtype=torch.long, device=device)
        out = generate(decoder, bos, config.n_pixels, sampling or Sampling(), seed=seed)
    finally:
        model.train(was_training)
    return out[:, 1:]


def sample_images(model: ImageGenerator, conditions: Sequence[str | int], per_condition: int = 1,
                  sampling: Sampling | None = None, *, guidance_scale: float = 1.0, seed: int | None = None,
                  tokenizer: Any = None, batch_size: int = 256) -> np.ndarray:
    """`per_condition` images for each condition, grouped by condition: (N, H, W, C) uint8.
    Sizes are bounded before any work: at most MAX_IMAGES images, `batch_size` <= MAX_ROWS."""
    check_count("per_condition", per_condition, 1, MAX_IMAGES, "images per condition; all are held in memory")
    check_count("batch_size", batch_size, 1, MAX_ROWS, "images decoded together; each keeps a KV cache")
    config = model.config
    ids, mask = condition_ids(config, conditions, tokenizer)
    check_count("conditions x per_condition", len(ids) * per_condition, 1, MAX_IMAGES,
                "images in one call; all are held in memory, draw them in several calls")
    ids, mask = ids.repeat_interleave(per_condition, 0), mask.repeat_interleave(per_condition, 0)
    tokens = [sample_tokens(model, ids[i:i + batch_size], mask[i:i + batch_size], sampling,
                           guidance_scale=guidance_scale, seed=None if seed is None else seed + i)
              for i in range(0, len(ids), batch_size)]
    return model.to_images(torch.cat(tokens))


def save_image_grid(images: np.ndarray, row_titles: Sequence[str], path: str | Path, *,
                    scale: int | None = None) -> Path:
    """A PNG with one row per title (images grouped by row, as `sample_images` returns them),
    each image enlarged `scale` times (nearest neighbour), titles on the left. Written atomically."""
    from PIL import Image, ImageDraw

    if len(images) == 0 or len(images) % len(row_titles):
        raise ValueError(f"{len(images)} images cannot be split into {len(row_titles)} equal rows")
    n, h, w, c = images.shape
    per_row = n // len(row_titles)
    scale = scale or max(1, 56 // max(h, w))
    pad, label_width = 2, 8 + 7 * max(len(t) for t in row_titles)
    cell_h, cell_w = h * scale + pad, w * scale + pad
    canvas = Image.new("RGB", (label_width + per_row * cell_w, len(row_titles) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for index, image in enumerate(images):
        row, col = divmod(index, per_row)
        tile = Image.fromarray(image[..., 0] if c == 1 else image).convert("RGB")
        tile = tile.resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, (label_width + col * cell_w, row * cell_h))
    for row, title in enumerate(row_titles):
        draw.text((4, row * cell_h + cell_h // 2 - 6), title, fill="black")
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
