"""How a text classifier holds up against typos, and attacked sentences written for people.

    sweep = typo_sweep(run.model, run.tokenizer, texts, labels, rates=(0, 0.1, 0.2, 0.3), seed=0)
    sweep_table(sweep); plot_typo_sweeps({"standard": sweep}, "typos.png")
    mark_changes(attack_result, "markdown")     # "the film was ~~good~~ **fine**"

A typo rate r gives each text round(r * words) typos, on distinct words of >= 3 letters drawn
at random (fewer when the text has fewer such words; the share reached is reported), each a
random edit from `attacks.text.typo_candidates` (swap, drop, keyboard insert or substitution).
Draws are seeded per (seed, rate, text), so a sweep is reproducible and a text's typos at one
rate do not depend on the other texts.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import nn

from tformer.attacks.embedding import check_text_classifier
from tformer.attacks.text import TextAttackResult, Victim
from tformer.attacks.words import Words, typo_candidates
from tformer.files import write_figure_atomic


@dataclass(frozen=True)
class TypoSweep:
    """Accuracy of one model on the same texts at each typo rate."""

    rates: tuple[float, ...]
    accuracy: tuple[float, ...]
    share_changed: tuple[float, ...]  # mean share of words actually given a typo, per rate
    n_texts: int


def with_typos(text: str, rate: float, rng: np.random.Generator) -> tuple[str, tuple[int, ...]]:
    """`text` with round(rate * words) typos on distinct words of >= 3 letters; (text, word indices)."""
    words = Words.of(text)
    typeable = [i for i in range(len(words)) if len(words[i]) >= 3]
    count = min(int(round(rate * len(words))), len(typeable))
    chosen = sorted(rng.choice(typeable, size=count, replace=False).tolist()) if count else []
    changes = {}
    for i in chosen:
        options = typo_candidates(words[i])
        changes[i] = options[int(rng.integers(len(options)))].result
    return words.replaced(changes), tuple(chosen)


def _check_rates(rates: Sequence[float]) -> None:
    if not len(rates) or any(not (isinstance(r, (int, float)) and 0 <= r <= 1) for r in rates):
        raise ValueError(f"typo rates are shares of words in [0, 1], one or more; got {list(rates)!r}")


def typo_sweep(model: nn.Module, tokenizer: Any, texts: Sequence[str], labels: Sequence[int | str],
               rates: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5), seed: int = 0,
               batch_size: int = 64) -> TypoSweep:
    """Accuracy at each typo rate (see the module docstring); labels are class indices or names."""
    check_text_classifier(model)
    _check_rates(rates)
    if isinstance(texts, str) or not len(texts) or len(texts) != len(labels):
        raise ValueError(f"give one label per text and at least one text; got {len(texts)} texts and "
                         f"{len(labels)} labels")
    truth = np.array([model.labels.index(y) if isinstance(y, str) else int(y) for y in labels])
    victim = Victim(model, tokenizer, max_queries=0)
    accuracy, shares = [], []
    was_training = model.training
    model.eval()
    try:
        for r, rate in enumerate(rates):
            noisy = [with_typos(t, rate, np.random.default_rng([seed, r, i])) for i, t in enumerate(texts)]
            probs = np.concatenate([victim.probabilities([t for t, _ in noisy[k:k + batch_size]])
                                    for k in range(0, len(noisy), batch_size)])
            read = np.isfinite(probs).all(1)  # a text grown past the model's limit counts as wrong
            right = read & (np.argmax(np.nan_to_num(probs, nan=0.0), 1) == truth)
            accuracy.append(float(right.mean()))
            shares.append(float(np.mean([len(c) / max(len(Words.of(t)), 1) for (_, c), t in zip(noisy, texts)])))
    finally:
        model.train(was_training)
    return TypoSweep(tuple(float(r) for r in rates), tuple(accuracy), tuple(shares), len(texts))


def sweep_table(sweeps: dict[str, TypoSweep]) -> str:
    """A markdown table: one row per rate, accuracy per model (and the share of words reached)."""
    names = list(sweeps)
    first = sweeps[names[0]]
    lines = ["| typo rate | words with a typo | " + " | ".join(f"accuracy ({n})" for n in names) + " |",
             "|---:|---:|" + "---:|" * len(names)]
    for k, rate in enumerate(first.rates):
        lines.append(f"| {rate:.2f} | {first.share_changed[k]:.3f} | "
                     + " | ".join(f"{sweeps[n].accuracy[k]:.3f}" for n in names) + " |")
    return "\n".join(lines)


def plot_typo_sweeps(sweeps: dict[str, TypoSweep], path: str | Path, title: str = "accuracy against typos") -> Path:
    """Accuracy against typo rate, one curve per model, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, sweep in sweeps.items():
        ax.plot(sweep.rates, sweep.accuracy, marker="o", label=f"{name} ({sweep.n_texts} texts)")
    ax.set_xlabel("share of words with a typo")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower left")
    fig.tight_layout()
    write_figure_atomic(fig, path, dpi=120)
    return Path(path)


def mark_changes(result: TextAttackResult, style: str = "markdown") -> str:
    """The attacked sentence with each changed word shown as old and new: markdown
    `~~old~~ **new**` (markdown characters in the text escaped) or HTML `<del>old</del>
    <ins>new</ins>` (the text HTML-escaped)."""
    if style not in ("markdown", "html"):
        raise ValueError(f"style must be 'markdown' or 'html', got {style!r}")
    escape = html.escape if style == "html" else _escape_markdown
    words = Words.of(result.text)
    out, cursor = [], 0
    for i, (old, new) in zip(result.changed, result.replacements):
        start, end = words.spans[i]
        mark = (f"<del>{escape(old)}</del> <ins>{escape(new)}</ins>" if style == "html"
                else f"~~{escape(old)}~~ **{escape(new)}**")
        out += [escape(result.text[cursor:start]), mark]
        cursor = end
    return "".join(out + [escape(result.text[cursor:])])


def _escape_markdown(text: str) -> str:
    for ch in "\\`*_{}[]<>|~#":
        text = text.replace(ch, "\\" + ch)
    return text


__all__ = ["TypoSweep", "mark_changes", "plot_typo_sweeps", "sweep_table", "typo_sweep", "with_typos"]
