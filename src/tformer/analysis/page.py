"""One self-contained HTML page per explanation: opens in any browser with no network, no
external script, style or font. Tokens are coloured by attribution (red: for the explained
score, blue: against; hover for the number), images carry their heatmaps, translations get a
coloured output x source table, and attention maps are drawn on a canvas with a kind / layer /
head selector (the page's own ~80 lines of JavaScript). The PNG figures are embedded too.

    write_page(explanation, figures, folder / "index.html", title="runs/bert-sentiment-minilm")
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tformer.analysis.explain import AttentionView, Explanation
from tformer.files import write_text_atomic

MAX_VALUES = 4_000_000  # attention numbers embedded per page (~30 MB of text); beyond: heads averaged

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.meta td { padding: 2px 12px 2px 0; vertical-align: top; } .meta td:first-child { color: #666; }
.tokens { line-height: 2.1; } .tok { padding: 2px 3px; margin: 1px; border-radius: 3px; border: 1px solid #eee;
  white-space: pre; font-family: ui-monospace, monospace; font-size: 14px; }
.method { margin: 10px 0 2px; font-weight: 600; font-size: 14px; }
table.matrix { border-collapse: collapse; font: 12px ui-monospace, monospace; }
table.matrix td, table.matrix th { border: 1px solid #eee; padding: 2px 5px; text-align: center; }
.note { color: #555; font-size: 13px; } img { max-width: 100%; } canvas { border: 1px solid #ddd; }
#readout { font: 13px ui-monospace, monospace; min-height: 1.4em; color: #333; }
select { font-size: 14px; margin-right: 10px; }
"""

SCRIPT = r"""
const views = JSON.parse(document.getElementById("attention-data").textContent);
const kindSel = document.getElementById("kind"), layerSel = document.getElementById("layer"),
      headSel = document.getElementById("head"), canvas = document.getElementById("map"),
      readout = document.getElementById("readout"), ctx = canvas.getContext("2d");
let shown = null;
function fill(sel, items) { sel.innerHTML = ""; items.forEach(([v, t]) => sel.add(new Option(t, v))); }
function chooseKind() {
  const v = views[kindSel.value];
  fill(layerSel, v.layers.map((l, i) => [i, "layer " + l]));
  fill(headSel, [[-1, "mean of heads"]].concat(v.heads.map((h, i) => [i, "head " + h])));
  draw();
}
function matrix(v, li, hi) {  // (T, S) for one layer: one head, or the mean over heads
  const heads = v.maps[li];
  if (hi >= 0) return heads[hi];
  return heads[0].map((row, t) => row.map((_, s) => {
    let sum = 0, n = 0; heads.forEach(h => { if (h[t][s] !== null) { sum += h[t][s]; n++; } });
    return n ? sum / n : null; }));
}
function colour(p, top) {  // 0 -> white, top -> dark purple
  if (p === null) return "#f4f4f4";
  const a = top > 0 ? p / top : 0;
  return `rgb(${Math.round(255 - 180 * a)},${Math.round(255 - 215 * a)},${Math.round(255 - 90 * a)})`;
}
function draw() {
  const v = views[kindSel.value], li = +layerSel.value, hi = +headSel.value;
  let m = matrix(v, li, hi), rows = v.queries, cols = v.keys;
  if (v.key_grid && m.length === 1) {  // one query over an image: draw its keys as the image grid
    const [gr, gc] = v.key_grid, row = m[0];
    m = []; rows = []; cols = [];
    for (let r = 0; r < gr; r++) { m.push(row.slice(r * gc, (r + 1) * gc)); rows.push("row " + r); }
    for (let c = 0; c < gc; c++) cols.push("col " + c);
  }
  const T = m.length, S = m[0].length, label = (T <= 40 && S <= 60) ? 110 : 0;
  const cell = Math.max(4, Math.min(28, Math.floor(720 / Math.max(T, S))));
  canvas.width = label + S * cell + 4; canvas.height = label + T * cell + 4;
  ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  let top = 0; m.forEach(r => r.forEach(p => { if (p !== null && p > top) top = p; }));
  for (let t = 0; t < T; t++) for (let s = 0; s < S; s++) {
    ctx.fillStyle = colour(m[t][s], top); ctx.fillRect(label + s * cell, label + t * cell, cell - 1, cell - 1);
  }
  if (label) {
    ctx.fillStyle = "#222"; ctx.font = "11px monospace"; ctx.textBaseline = "middle";
    rows.forEach((q, t) => { ctx.textAlign = "right"; ctx.fillText(q.slice(0, 14), label - 4, label + t * cell + cell / 2); });
    cols.forEach((k, s) => { ctx.save(); ctx.translate(label + s * cell + cell / 2, label - 4);
      ctx.rotate(-Math.PI / 2); ctx.textAlign = "left"; ctx.fillText(k.slice(0, 14), 0, 0); ctx.restore(); });
  }
  shown = {m, rows, cols, cell, label};
  document.body.dataset.rendered = `${v.kind} ${v.layers[li]} ${hi < 0 ? "mean" : v.heads[hi]}`;
  readout.textContent = `${v.kind} attention, layer ${v.layers[li]}, ${hi < 0 ? "mean of heads" : "head " + v.heads[hi]}: ` +
    `${T} queries x ${S} keys (largest ${top.toFixed(3)}); hover a cell`;
}
canvas.addEventListener("mousemove", ev => {
  if (!shown) return;
  const b = canvas.getBoundingClientRect(), x = ev.clientX - b.left - shown.label, y = ev.clientY - b.top - shown.label;
  const t = Math.floor(y / shown.cell), s = Math.floor(x / shown.cell);
  if (t >= 0 && s >= 0 && t < shown.m.length && s < shown.m[0].length) {
    const p = shown.m[t][s];
    readout.textContent = `${shown.rows[t]} -> ${shown.cols[s]}: ${p === null ? "(not attended)" : p.toFixed(4)}`;
  }
});
kindSel.addEventListener("change", chooseKind); layerSel.addEventListener("change", draw);
headSel.addEventListener("change", draw);
fill(kindSel, views.map((v, i) => [i, v.kind]));
const size = v => v.maps.length * v.maps[0].length * v.maps[0][0].length * v.maps[0][0][0].length;
kindSel.value = views.reduce((best, v, i) => size(v) > size(views[best]) ? i : best, 0);  // the richest kind first
chooseKind();
"""


def _e(text: object) -> str:
    return html.escape(str(text))


def _shade(value: float, scale: float) -> str:
    """Background for a signed score: red for, blue against, stronger with |value| / scale."""
    if not np.isfinite(value) or scale <= 0:
        return "transparent"
    a = min(1.0, abs(value) / scale) * 0.85
    return f"rgba(192,57,43,{a:.2f})" if value >= 0 else f"rgba(46,134,193,{a:.2f})"


def _tokens_html(tokens: Sequence[str], values: np.ndarray) -> str:
    """Signed scores coloured by |score| / max |score|; shares (all >= 0, e.g. rollout, where
    every token keeps some of itself) from the smallest to the largest, or all would look alike."""
    shown = values - np.nanmin(values) if len(values) and np.nanmin(values) >= 0 else values
    scale = float(np.nanmax(np.abs(shown))) if len(values) else 0.0
    spans = (f'<span class="tok" style="background:{_shade(c, scale)}" title="{_e(t)}: {v:+.4g}">{_e(t)}</span>'
             for t, v, c in zip(tokens, values.tolist(), shown.tolist()))
    return f'<div class="tokens">{"".join(spans)}</div>'


def _matrix_html(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str]) -> str:
    scale = float(np.nanmax(np.abs(matrix))) if matrix.size else 0.0
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join(
        f"<tr><th>{_e(r)}</th>" + "".join(f'<td style="background:{_shade(v, scale)}" title="{_e(r)} &lt;- '
                                          f'{_e(c)}: {v:+.4g}">{v:+.2f}</td>' for c, v in zip(cols, row)) + "</tr>"
        for r, row in zip(rows, matrix.tolist()))
    return f'<table class="matrix"><tr><th></th>{head}</tr>{body}</table>'


def _image_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _attention_json(views: Sequence[AttentionView]) -> tuple[str, list[str]]:
    """The views as JSON for the page's script (NaN -> null), heads averaged when too large."""
    notes, items = [], []
    for v in views:
        maps = v.maps
        heads = v.heads
        if maps.size > MAX_VALUES // max(1, len(views)):
            maps, heads = maps.mean(axis=1, keepdims=True), ["mean"]
            notes.append(f"{v.kind} attention: heads averaged on this page to keep it small (the PNG has each)")
        numbers = json.dumps(np.round(maps.astype(np.float64), 4).tolist()).replace("NaN", "null")
        meta = json.dumps({"kind": v.kind, "layers": v.layers, "heads": heads, "queries": v.queries,
                           "keys": v.keys, "key_grid": v.key_grid}, ensure_ascii=False)
        items.append(meta[:-1] + f', "maps": {numbers}}}')
    return ("[" + ",".join(items) + "]").replace("</", "<\\/"), notes


def _attributions_html(e: Explanation, figures: dict[str, Path]) -> str:
    parts = []
    for method, values in e.attributions.items():
        if e.grid is not None:
            continue  # images: one figure holds every method
        parts.append(f'<div class="method">{_e(method)}</div>')
        if e.rows is not None:
            parts.append(_matrix_html(values, e.rows, e.positions))
        elif e.grid is None:
            if len(values) and np.nanmin(values) >= 0:
                parts.append('<p class="note">shares, all &ge; 0: coloured from the smallest to the largest</p>')
            parts.append(_tokens_html(e.positions, values))
    if e.grid is not None and "attributions" in figures:
        parts.append(_image_tag(figures["attributions"], "attributions over the image"))
    return "\n".join(parts)


def render_page(e: Explanation, figures: dict[str, Path], title: str) -> str:
    """The page as one HTML string (figures embedded as data: URLs)."""
    data, size_notes = _attention_json(e.attention)
    meta = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in
                   (("input", e.input), ("prediction", e.prediction), ("explained", e.explained)))
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in [*e.notes, *size_notes])
    pictures = "\n".join(f"<h3>{_e(name)}</h3>{_image_tag(path, name)}" for name, path in figures.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}: {_e(e.input)[:80]}</title><style>{STYLE}</style></head>
<body data-rendered="">
<h1>Why {_e(e.prediction)}?</h1>
<table class="meta">{meta}<tr><td>run</td><td>{_e(title)}</td></tr></table>
<h2>Attributions</h2>
<p class="note">Red: pushes the explained score up; blue: down; stronger colour, larger share. Hover for numbers.</p>
{_attributions_html(e, figures)}
{notes}
<h2>Attention</h2>
<div><select id="kind" aria-label="attention kind"></select><select id="layer" aria-label="layer"></select>
<select id="head" aria-label="head"></select></div>
<div id="readout"></div>
<canvas id="map" width="10" height="10"></canvas>
<h2>Figures</h2>
<details open><summary>PNG files written beside this page</summary>{pictures}</details>
<script type="application/json" id="attention-data">{data}</script>
<script>{SCRIPT}</script>
</body></html>
"""


def write_page(e: Explanation, figures: dict[str, Path], path: Path, *, title: str) -> Path:
    write_text_atomic(path, render_page(e, figures, title))
    return path


__all__ = ["render_page", "write_page"]
