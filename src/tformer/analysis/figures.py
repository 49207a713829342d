"""PNG figures of an `Explanation` (matplotlib, Agg): attention maps as a layer x head grid,
attributions as token bars, as a heatmap over the image (patches or pixels), or as a matrix
(a translation's output tokens x source tokens), and a translation's cross-attention alignment.

    paths = draw_figures(explanation, folder)     # {"attributions": folder / "attributions.png", ...}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tformer.analysis.explain import AttentionView, Explanation
from tformer.files import write_figure_atomic

MAX_GRID = 12  # layers and heads drawn per attention figure (the page has every one)
MAX_TICKS = 32  # label rows and columns only up to this many


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label_axes(ax: Any, rows: Sequence[str], cols: Sequence[str], size: float = 7) -> None:
    ax.set_xticks(range(len(cols)) if len(cols) <= MAX_TICKS else [])
    ax.set_yticks(range(len(rows)) if len(rows) <= MAX_TICKS else [])
    if len(cols) <= MAX_TICKS:
        ax.set_xticklabels(cols, rotation=90, fontsize=size)
    if len(rows) <= MAX_TICKS:
        ax.set_yticklabels(rows, fontsize=size)


def on_grid(values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(N,) scores of row-major cells -> (rows, cols); missing cells (fewer scores) are NaN."""
    cells = np.full(grid[0] * grid[1], np.nan, dtype=np.float32)
    cells[:len(values)] = values[:len(cells)]
    return cells.reshape(grid)


def _over_image(ax: Any, image: np.ndarray, heat: np.ndarray, title: str, focus: int | None = None) -> None:
    """The image in grey with `heat` (rows, cols) stretched over it: red for, blue against; the
    `focus` cell (row-major), if any, outlined in green."""
    ax.imshow(image.mean(-1) if image.shape[-1] == 3 else image[..., 0], cmap="gray",
              extent=(0, 1, 1, 0))
    finite = heat[np.isfinite(heat)]
    if finite.size and finite.min() >= 0:  # shares (rollout): the smallest to the largest, in reds
        colours = dict(cmap="Reds", vmin=finite.min(), vmax=finite.max())
    else:
        scale = float(np.abs(finite).max()) if finite.size else 1.0
        colours = dict(cmap="bwr", vmin=-scale or -1, vmax=scale or 1)
    ax.imshow(heat, alpha=0.55, extent=(0, 1, 1, 0), interpolation="nearest", **colours)
    if focus is not None:
        rows, cols = heat.shape
        r, c = divmod(focus, cols)
        ax.add_patch(_pyplot().Rectangle((c / cols, r / rows), 1 / cols, 1 / rows, fill=False, edgecolor="lime",
                                         linewidth=2))
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def attention_figure(view: AttentionView, path: Path) -> Path:
    """One panel per (layer, head), at most MAX_GRID of each; a single query row over an image
    grid is drawn as a heatmap of that grid."""
    plt = _pyplot()
    maps = view.maps[:MAX_GRID, :MAX_GRID]  # (L, H, T, S)
    L, H = maps.shape[:2]
    fig, axes = plt.subplots(L, H, figsize=(1.9 * H + 1, 1.9 * L + 0.8), dpi=100, squeeze=False)
    for (i, j), ax in np.ndenumerate(axes):
        panel = maps[i, j]
        if view.key_grid and panel.shape[0] == 1:
            panel = on_grid(panel[0], view.key_grid)
        ax.imshow(panel, cmap="viridis", vmin=0, vmax=np.nanmax(panel) or 1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if i == 0:
            ax.set_title(f"head {view.heads[j]}", fontsize=8)
        if j == 0:
            ax.set_ylabel(f"layer {view.layers[i]}", fontsize=8)
    fig.suptitle(f"{view.kind} attention" + (f" of {view.queries[0]}" if len(view.queries) == 1 else
                                             f" ({len(view.queries)} queries x {len(view.keys)} keys)"),
                 fontsize=10)
    fig.tight_layout()
    write_figure_atomic(fig, path)
    return path


def _token_bars(e: Explanation, path: Path) -> None:
    plt = _pyplot()
    methods = list(e.attributions)
    height = 1.0 + 0.28 * len(e.positions)
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, height), dpi=100, squeeze=False)
    y = np.arange(len(e.positions))
    for ax, method in zip(axes[0], methods):
        values = e.attributions[method]
        scale = np.abs(values).max() or 1.0
        ax.barh(y, values / scale, color=np.where(values >= 0, "#c0392b", "#2e86c1"))
        ax.set_yticks(y, e.positions if method == methods[0] else [""] * len(y), fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.5)
        ax.set_xlim(-1.05, 1.05)
        ax.set_title(f"{method}\n(max |score| {scale:.3g})", fontsize=9)
    fig.suptitle(f"{e.explained}: {e.prediction}", fontsize=9)
    fig.tight_layout()
    write_figure_atomic(fig, path)


def _image_heatmaps(e: Explanation, path: Path) -> None:
    plt = _pyplot()
    methods = list(e.attributions)
    fig, axes = plt.subplots(1, len(methods) + 1, figsize=(2.8 * (len(methods) + 1), 3.2), dpi=100)
    axes = np.atleast_1d(axes)
    axes[0].imshow(e.image if e.image.shape[-1] == 3 else e.image[..., 0], cmap="gray")
    axes[0].set_title(e.prediction, fontsize=9)
    axes[0].axis("off")
    for ax, method in zip(axes[1:], methods):
        _over_image(ax, e.image, on_grid(e.attributions[method], e.grid), method, e.focus)
    fig.suptitle(e.explained, fontsize=9)
    fig.tight_layout()
    write_figure_atomic(fig, path)


def matrix_figure(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str, path: Path,
                  *, signed: bool) -> Path:
    """A (rows x cols) heatmap: signed (attributions, red/blue) or not (attention, 0..max)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.5 + 0.32 * len(cols), 1.5 + 0.28 * len(rows)), dpi=100)
    scale = float(np.abs(matrix).max()) or 1.0
    ax.imshow(matrix, cmap="bwr" if signed else "viridis", vmin=-scale if signed else 0, vmax=scale,
              interpolation="nearest")
    _label_axes(ax, rows, cols)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    write_figure_atomic(fig, path)
    return path


def alignment(view: AttentionView) -> np.ndarray:
    """A translation's alignment: cross-attention averaged over layers and heads, (T, S)."""
    return view.maps.mean(axis=(0, 1))


def draw_figures(e: Explanation, folder: Path) -> dict[str, Path]:
    """Every figure of `e` as PNG files in `folder` (written atomically); name -> path."""
    paths: dict[str, Path] = {}
    if e.rows is not None:  # translation: (output tokens x source tokens) per method
        for method, matrix in e.attributions.items():
            name = "attributions" if len(paths) == 0 else method.replace(" ", "-")
            paths[name] = matrix_figure(matrix, e.rows, e.positions, f"{method}: {e.explained}",
                                        folder / f"{name}.png", signed=True)
    elif e.grid is not None:
        _image_heatmaps(e, folder / "attributions.png")
        paths["attributions"] = folder / "attributions.png"
    else:
        _token_bars(e, folder / "attributions.png")
        paths["attributions"] = folder / "attributions.png"
    for view in e.attention:
        paths[f"attention-{view.kind}"] = attention_figure(view, folder / f"attention-{view.kind}.png")
        if view.kind == "cross" and e.rows is not None:
            paths["alignment"] = matrix_figure(alignment(view), view.queries, view.keys,
                                               "alignment: cross-attention, mean over layers and heads",
                                               folder / "alignment.png", signed=False)
    return paths


__all__ = ["alignment", "attention_figure", "draw_figures", "matrix_figure", "on_grid"]
