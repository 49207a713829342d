"""Pixel tokens for image generators: a palette of K colours (evenly spaced grey levels, or
k-means colours for colour images) maps every pixel to its nearest colour's id and back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tformer.config import ConfigError


def _nearest(pixels: np.ndarray, colours: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Index of the nearest colour (squared distance; ties go to the lower index) per pixel row."""
    colours = colours.astype(np.float64)
    bias = (colours ** 2).sum(1)  # |p - c|^2 = |p|^2 - 2 p.c + |c|^2, and |p|^2 does not change argmin
    out = np.empty(len(pixels), dtype=np.int64)
    for start in range(0, len(pixels), chunk):
        block = pixels[start:start + chunk].astype(np.float64)
        out[start:start + chunk] = np.argmin(bias[None, :] - 2 * block @ colours.T, axis=1)
    return out


@dataclass(frozen=True)
class Palette:
    """K colours; pixel tokens are colour indices. colours: (K, C) float32 values in [0, 255]."""

    colours: np.ndarray

    def __post_init__(self) -> None:
        colours = np.asarray(self.colours, dtype=np.float32)
        if colours.ndim != 2 or len(colours) < 2 or colours.shape[1] not in (1, 3):
            raise ValueError(f"a palette is (K, C) colours, K >= 2 and C = 1 or 3; got shape {colours.shape}")
        if not (np.isfinite(colours).all() and (colours >= 0).all() and (colours <= 255).all()):
            raise ValueError("palette values must be in [0, 255]")
        object.__setattr__(self, "colours", colours)

    @property
    def size(self) -> int:
        return len(self.colours)

    @property
    def channels(self) -> int:
        return self.colours.shape[1]

    def quantise(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, C) uint8 -> (N, H * W) int64 ids of the nearest colours, row by row."""
        if images.ndim != 4 or images.shape[3] != self.channels:
            raise ValueError(f"images of shape {images.shape} do not fit a palette of {self.channels}-channel"
                             f" colours; expected (N, H, W, {self.channels})")
        n, h, w, c = images.shape
        if c == 1 and images.dtype == np.uint8:  # 256 grey levels: look each one up
            return _nearest(np.arange(256)[:, None], self.colours)[images.reshape(n, h * w)]
        return _nearest(images.reshape(-1, c), self.colours).reshape(n, h * w)

    def dequantise(self, tokens: np.ndarray, height: int, width: int) -> np.ndarray:
        """(N, H * W) token ids -> (N, H, W, C) uint8 (colours rounded)."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] != height * width or tokens.dtype.kind not in "iu":
            raise ValueError(f"expected (N, {height * width}) integer tokens for {height}x{width} images, "
                             f"got {tokens.shape} {tokens.dtype}")
        bad = (tokens < 0) | (tokens >= self.size)
        if bad.any():
            raise ValueError(f"token id {tokens[bad][0]} is not a colour of this {self.size}-colour palette "
                             f"(ids 0..{self.size - 1}); {int(bad.sum())} such tokens")
        table = np.rint(self.colours).clip(0, 255).astype(np.uint8)
        return table[tokens].reshape(len(tokens), height, width, self.channels)

    def to_list(self) -> list[list[float]]:
        """[[v, ...], ...] (K lists of C floats) for a JSON config; `from_list` reads it back exactly."""
        return [[float(v) for v in row] for row in self.colours]

    @classmethod
    def from_list(cls, values: Sequence[Sequence[float]]) -> Palette:
        """A palette from `to_list`'s output; shape and range are checked."""
        try:
            colours = np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"a palette is a list of K colours, each of C = 1 or 3 numbers ({e})") from None
        return cls(colours)


def grey_palette(levels: int) -> Palette:
    """`levels` greys evenly spaced over [0, 255] (i * 255 / (levels - 1)); 17 are sklearn digits'."""
    if not 2 <= levels <= 256:
        raise ConfigError(f"a grey palette needs 2 to 256 levels, got {levels}")
    return Palette((np.arange(levels, dtype=np.float64) * 255 / (levels - 1))[:, None].astype(np.float32))


def _kmeans_plus_plus(pixels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Initial centres: each next one drawn with probability ~ squared distance to the nearest
    chosen so far (Arthur & Vassilvitskii 2007)."""
    centres = [pixels[rng.integers(len(pixels))]]
    closest = ((pixels - centres[0]) ** 2).sum(1)
    for _ in range(size - 1):
        total = closest.sum()
        pick = rng.choice(len(pixels), p=closest / total) if total > 0 else rng.integers(len(pixels))
        centres.append(pixels[pick])
        closest = np.minimum(closest, ((pixels - centres[-1]) ** 2).sum(1))
    return np.stack(centres)


def kmeans_palette(images: np.ndarray, size: int, *, seed: int = 0, max_pixels: int = 200_000,
                   iterations: int = 25) -> Palette:
    """`size` colours by Lloyd's k-means (k-means++ start) on up to `max_pixels` pixels sampled
    with `seed`; deterministic given the seed. Colours are sorted (by R, then G, then B)."""
    if size < 2:
        raise ConfigError(f"a palette needs at least 2 colours, got {size}")
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64)
    rng = np.random.default_rng(seed)
    if len(pixels) > max_pixels:
        pixels = pixels[np.sort(rng.choice(len(pixels), max_pixels, replace=False))]
    centres, assigned = _kmeans_plus_plus(pixels, size, rng), None
    for _ in range(iterations):
        nearest = _nearest(pixels, centres)
        if assigned is not None and (nearest == assigned).all():
            break
        assigned = nearest
        counts, sums = np.bincount(assigned, minlength=size), np.zeros_like(centres)
        np.add.at(sums, assigned, pixels)
        filled = counts > 0  # an empty cluster keeps its centre
        centres[filled] = sums[filled] / counts[filled, None]
    centres = centres[np.lexsort(centres.T[::-1])]
    return Palette(np.clip(centres, 0, 255).astype(np.float32))


def fit_palette(images: np.ndarray, size: int, seed: int = 0) -> Palette:
    """A palette of `size` colours for (N, H, W, C) images: evenly spaced greys for C = 1,
    k-means colours for C = 3."""
    if images.ndim != 4 or images.shape[3] not in (1, 3):
        raise ValueError(f"expected (N, H, W, 1 or 3) images, got shape {images.shape}")
    return grey_palette(size) if images.shape[3] == 1 else kmeans_palette(images, size, seed=seed)
