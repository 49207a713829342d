"""Translation quality within a CPU budget: the shipped recipes nmt-de-en (Ding sentences) and
nmt-en-es (Bible verses) trained for a fixed number of steps, scored with sacrebleu BLEU / chrF on
each recipe's held-out test split, next to simple baselines scored on the same split:

- copy: the source sentence as its own translation
- ding: word by word with the Ding dictionary's single-word entries (de-en only; unknown words copied)
- dice: word by word with a dictionary learned from the training split (each source word's target
  word of highest Dice co-occurrence; Och & Ney's simplest association baseline)

CPU time is the process's user + system time (all threads), so it means the same on a busy
machine; wall time is printed too.

    TFORMER_DATA_DIR=../shared/data python benchmarks/bench_translation.py   # the recipes as shipped
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import logging
import re
import resource
import time
from pathlib import Path

import numpy as np
import torch

from tformer.data.datasets import resolve_dataset
from tformer.inference.translate import translate
from tformer.runs import open_run
from tformer.training.recipe import load_recipe, train_recipe
from tformer.training.tasks.seq2seq import corpus_scores, evaluate, load_splits

log = logging.getLogger("bench_translation")
RECIPES = Path(__file__).resolve().parents[1] / "src" / "tformer" / "recipes"
WORD = re.compile(r"\w+(?:[-'’]\w+)*|[^\w\s]")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def words(text: str) -> list[str]:
    return WORD.findall(text)


def detokenize(tokens: list[str]) -> str:
    text = " ".join(tokens)
    text = re.sub(r" ([.,!?;:)»“”])", r"\1", text)
    text = re.sub(r"([(„«]) ", r"\1", text)
    return text[:1].upper() + text[1:]


def word_by_word(sentences: list[str], table: dict[str, str]) -> list[str]:
    """Each word replaced by its entry (exact, then lower-cased); unknown words and punctuation kept."""
    out = []
    for sentence in sentences:
        tokens = [table.get(w, table.get(w.lower(), w)) for w in words(sentence)]
        out.append(detokenize(tokens))
    return out


def ding_table() -> dict[str, str]:
    """German word -> English of the first single-word Ding entry ("to go" -> "go", notes in
    brackets dropped)."""
    path = resolve_dataset("de-en-all")
    table: dict[str, str] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        next(f)
        for line in f:
            de, _, en = line.rstrip("\n").partition("\t")
            de = re.sub(r"\(.*?\)|<.*?>", "", de.split("; ")[0]).strip()
            en = re.sub(r"\(.*?\)|<.*?>|\bsth\.|\bsb\.", "", en.split("; ")[0]).strip()
            en = re.sub(r"^to ", "", re.sub(r"\s+", " ", en))
            if de and en and " " not in de and de not in table:
                table[de] = en
    return table


def dice_table(sources: list[str], targets: list[str], min_count: int = 2) -> dict[str, str]:
    """Source word -> the target word of highest Dice coefficient over sentence co-occurrence."""
    from scipy import sparse

    def binary_matrix(texts: list[str]) -> tuple[sparse.csr_matrix, list[str]]:
        vocab: dict[str, int] = {}
        rows, cols = [], []
        for i, text in enumerate(texts):
            for w in {w.lower() for w in words(text)}:
                rows.append(i)
                cols.append(vocab.setdefault(w, len(vocab)))
        m = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(texts), len(vocab)))
        return m, list(vocab)

    xs, src_vocab = binary_matrix(sources)
    xt, tgt_vocab = binary_matrix(targets)
    co = (xs.T @ xt).tocsr()  # (Vs, Vt) sentences holding both
    df_s, df_t = np.asarray(xs.sum(0)).ravel(), np.asarray(xt.sum(0)).ravel()
    table = {}
    for s in range(co.shape[0]):
        start, end = co.indptr[s], co.indptr[s + 1]
        if end == start or df_s[s] < min_count:
            continue
        cols, counts = co.indices[start:end], co.data[start:end]
        dice = 2 * counts / (df_s[s] + df_t[cols])
        table[src_vocab[s]] = tgt_vocab[cols[dice.argmax()]]
    return table


def baselines(recipe) -> dict[str, dict]:
    """BLEU / chrF of the baselines on the recipe's test split."""
    pairs, train, _, test = load_splits(recipe.data)
    sources, references = [pairs[i][0] for i in test], [pairs[i][1] for i in test]
    dice = dice_table([pairs[i][0] for i in train], [pairs[i][1] for i in train])
    systems = {"copy source": sources,
               "word by word, Dice dictionary from the training split": word_by_word(sources, dice)}
    if recipe.data.source == "de-en-sentences":
        systems["word by word, Ding dictionary"] = word_by_word(sources, ding_table())
    return {name: corpus_scores(hyps, references) for name, hyps in systems.items()}


def run_pair(name: str, steps: int | None, run_root: Path) -> dict:
    """Baselines, then the recipe trained from scratch and scored (beam and greedy), with CPU times."""
    overrides = [f"run_dir={run_root / name}"] + ([f"training.max_steps={steps}"] if steps else [])
    recipe = load_recipe(RECIPES / f"nmt-{name}.yaml", overrides)
    start = cpu_seconds()
    results = {"baselines": baselines(recipe), "baseline_cpu_s": cpu_seconds() - start}
    cpu, wall = cpu_seconds(), time.perf_counter()
    trained = train_recipe(recipe, fresh=True)
    results.update(steps=trained.step, best_val_loss=trained.best_val_loss,
                   train_cpu_s=cpu_seconds() - cpu, train_wall_s=time.perf_counter() - wall)
    run = open_run(recipe.run_dir)
    model, tokenizer = run.model, run.tokenizer
    results["parameters"] = sum(p.numel() for p in model.parameters())
    cpu = cpu_seconds()
    results["beam"] = evaluate(recipe.settings, model, tokenizer)
    results["beam_cpu_s"] = cpu_seconds() - cpu
    pairs, _, _, test = load_splits(recipe.data)
    cpu = cpu_seconds()
    greedy = translate(model, tokenizer, [pairs[i][0] for i in test], too_long="truncate")
    results["greedy"] = corpus_scores(greedy, [pairs[i][1] for i in test])
    results["greedy_cpu_s"] = cpu_seconds() - cpu
    return results


def table(name: str, r: dict) -> str:
    """A Markdown table of one pair's results."""
    title = (f"**{name}** ({r['steps']} steps, {r['parameters'] / 1e6:.1f}M parameters, best "
             f"validation loss {r['best_val_loss']:.3f} nats/token)")
    lines = [title, "", "| system | BLEU | chrF | CPU s |", "|---|---:|---:|---:|"]
    for system, s in r["baselines"].items():
        lines.append(f"| {system} | {s['bleu']:.1f} | {s['chrf']:.1f} | – |")
    lines.append(f"| Transformer, greedy | {r['greedy']['bleu']:.1f} | {r['greedy']['chrf']:.1f} | "
                 f"{r['train_cpu_s']:.0f} train + {r['greedy_cpu_s']:.0f} decode |")
    lines.append(f"| Transformer, beam {r['beam']['beam_width']} | **{r['beam']['bleu']:.1f}** | "
                 f"**{r['beam']['chrf']:.1f}** | {r['train_cpu_s']:.0f} train + "
                 f"{r['beam_cpu_s']:.0f} decode |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=["de-en", "en-es"], choices=["de-en", "en-es"])
    parser.add_argument("--steps", type=int, default=None, help="de-en steps (default: the recipe's)")
    parser.add_argument("--steps-en-es", type=int, default=None, help="en-es steps (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: kind to a shared machine)")
    parser.add_argument("--runs", default="runs/bench-translation")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    start, results = cpu_seconds(), {}
    for name in args.pairs:
        steps = args.steps if name == "de-en" else args.steps_en_es
        results[name] = run_pair(name, steps, Path(args.runs))
        log.info("\n%s\n", table(name, results[name]))
    total = cpu_seconds() - start
    log.info("total CPU time %.1f min, torch threads %d, %s, torch %s", total / 60, args.threads,
             datetime.date.today(), torch.__version__)
    if args.out:
        Path(args.out).write_text(json.dumps({"total_cpu_s": total, **results}, indent=2))


if __name__ == "__main__":
    from tformer.cli.energy_command import say_at_exit

    say_at_exit("benchmarks/bench_translation.py")  # one line with its energy and CO2e at exit
    main()
