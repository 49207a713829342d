"""Structured pruning of a trained classifier: accuracy and CPU inference speed against the share
of heads and neurons removed, before and after a short fine-tune, side by side with the unpruned
model in one run.

For each source run and share s (the same share of heads and of feed-forward units):
  1. `compress.prune.prune_run(source, heads=s, neurons=s)` with gradient importance (Michel et al.
     2019) on the run's own validation batches; s = 0 is the unpruned model (written unchanged,
     so that nothing is written inside the source run)
  2. accuracy: `tformer evaluate` of the pruned run (the recipe's validation split)
  3. speed: the model's forward over the same validation inputs in batches of 32 (sentences padded
     to the longest in the batch, as evaluation batches them; images as they are), every model
     timed once per round, rounds alternating the models; median and range of examples/s
  4. a short fine-tune from the pruned run (`model.init_from`, the source recipe's settings,
     `--steps` steps), then its accuracy

    TFORMER_DATA_DIR=/work/shared/data flock /tmp/bench.lock python benchmarks/bench_prune.py
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SOURCES = ["/work/runs-shared/minilm-sentiment", "/work/runs-shared/vit-fashion"]


def inputs_of(run_dir: Path, batch: int, limit: int) -> list[dict[str, torch.Tensor]]:
    """Up to `limit` validation inputs of the run's task, in batches of `batch`."""
    from tformer.compress.prune import task_of
    from tformer.runs import open_run

    task, rows = task_of(open_run(run_dir)), []
    for b in task.eval_batches(0, 1):
        if "ids" in b:
            rows += [{"ids": i[m.bool()]} for i, m in zip(b["ids"], b["attention_mask"])]
        else:
            rows += [{"images": x} for x in b["images"]]
        if len(rows) >= limit:
            break
    out = []
    for start in range(0, min(limit, len(rows)), batch):
        chunk = rows[start:start + batch]
        if "images" in chunk[0]:
            out.append({"images": torch.stack([r["images"] for r in chunk])})
            continue
        longest = max(len(r["ids"]) for r in chunk)
        ids = torch.zeros(len(chunk), longest, dtype=torch.long)
        mask = torch.zeros(len(chunk), longest, dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, :len(r["ids"])], mask[i, :len(r["ids"])] = r["ids"], 1
        out.append({"ids": ids, "attention_mask": mask})
    return out


def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if "images" in batch:
        return model(batch["images"])
    return model(batch["ids"], attention_mask=batch["attention_mask"])


def examples_per_second(models: dict[str, torch.nn.Module], batches: list[dict[str, torch.Tensor]],
                        rounds: int) -> dict[str, list[float]]:
    n = sum(len(next(iter(b.values()))) for b in batches)
    rates: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            forward(model, batches[0])
        for r in range(rounds):
            order = list(models) if r % 2 == 0 else list(reversed(models))
            for name in order:
                start = time.perf_counter()
                for b in batches:
                    forward(models[name], b)
                rates[name].append(n / (time.perf_counter() - start))
    return rates


def fine_tune(pruned: Path, out: Path, steps: int, threads: int) -> Path:
    from tformer.runs import open_run
    from tformer.training.recipe import recipe_from_dict, train_recipe

    saved = dict(open_run(pruned).recipe)
    tokenizer = dict(saved["tokenizer"])
    if (pruned / "tokenizer.json").is_file():
        tokenizer.update(kind="file", path=str(pruned / "tokenizer.json"))
    training = {**saved["training"], "max_steps": steps, "eval_every": steps, "device": "cpu",
                "warmup_steps": min(saved["training"].get("warmup_steps") or 0, steps // 10),
                "threads": threads, "log_every": max(1, steps // 4)}
    saved.update(model={**saved["model"], "init_from": str(pruned)}, tokenizer=tokenizer, training=training,
                 run_dir=str(out))
    train_recipe(recipe_from_dict(saved, where=f"fine-tune of {pruned}"))
    return out


def accuracy(run_dir: Path) -> float:
    from tformer.training.recipe import evaluate_run

    return float(evaluate_run(run_dir)["accuracy"])


def bench_source(source: Path, shares: list[float], args: argparse.Namespace, work: Path) -> list[dict]:
    from tformer.compress.prune import prune_run
    from tformer.runs import open_run

    rows, models = [], {}
    for share in shares:
        out = work / f"{source.name}-{share:g}"
        t0 = time.perf_counter()
        _, report = prune_run(source, out, heads=share, neurons=share, max_batches=args.batches)
        prune_s = time.perf_counter() - t0
        models[share] = open_run(out).model
        heads = sum(m.after for m in report.modules if m.kind == "heads")
        units = sum(m.after for m in report.modules if m.kind == "units")
        rows.append({"source": source.name, "share": share, "heads": heads, "units": units,
                     "parameters": report.parameters_after, "prune_s": prune_s, "run": out,
                     "accuracy": accuracy(out)})
        print(f"  {source.name} share {share:g}: pruned in {prune_s:.1f} s, accuracy {rows[-1]['accuracy']:.4f}",
              file=sys.stderr)
    batches = inputs_of(source, 32, args.examples)
    rates = examples_per_second({s: models[s] for s in shares}, batches, args.rounds)
    for row in rows:
        row["rate"] = rates[row["share"]]
    for row in rows:
        if args.steps:
            t0 = time.perf_counter()
            tuned = fine_tune(row["run"], work / f"{row['run'].name}-tuned", args.steps, args.threads)
            row["tune_s"] = time.perf_counter() - t0
            row["tuned_accuracy"] = accuracy(tuned)
            print(f"  {source.name} share {row['share']:g}: fine-tuned {args.steps} steps in {row['tune_s']:.0f} s, "
                  f"accuracy {row['tuned_accuracy']:.4f}", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| run | share pruned | heads | units | parameters | accuracy | after fine-tune | examples/s (median, "
             "range) | speed-up |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = {r["source"]: statistics.median(r["rate"]) for r in rows if r["share"] == 0}
    for r in rows:
        median = statistics.median(r["rate"])
        tuned = f"{r['tuned_accuracy'] * 100:.2f}%" if "tuned_accuracy" in r else "-"
        ratio = f"{median / base[r['source']]:.2f}x" if r["source"] in base else "-"
        lines.append(f"| {r['source']} | {r['share']:.0%} | {r['heads']} | {r['units']} | {r['parameters']:,} | "
                     f"{r['accuracy'] * 100:.2f}% | {tuned} | {median:.1f} ({min(r['rate']):.1f}-{max(r['rate']):.1f})"
                     f" | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", nargs="+", default=SOURCES)
    p.add_argument("--shares", nargs="+", type=float, default=[0.0, 0.3, 0.5, 0.7])
    p.add_argument("--steps", type=int, default=60, help="fine-tune steps (0: no fine-tune)")
    p.add_argument("--batches", type=int, default=8, help="validation batches for gradient importance")
    p.add_argument("--examples", type=int, default=320, help="validation inputs timed per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if 0.0 not in args.shares:
        args.shares = [0.0, *args.shares]  # the unpruned model is the reference
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-prune-") as tmp:
        for source in map(Path, args.sources):
            if not (source / "checkpoints").is_dir():
                print(f"skipping {source}: not a trained run", file=sys.stderr)
                continue
            rows += bench_source(source, args.shares, args, Path(tmp))
    print(f"date {started}; torch {torch.__version__}; {platform.processor() or platform.machine()}; "
          f"{args.threads} threads; load before {load[0]:.2f} {load[1]:.2f}, after "
          f"{os.getloadavg()[0]:.2f}; batch 32, {args.examples} validation inputs x {args.rounds} rounds; "
          f"gradient importance on {args.batches} validation batches; fine-tune {args.steps} steps")
    print(table(rows))


if __name__ == "__main__":
    from tformer.cli.energy_command import say_at_exit

    say_at_exit("benchmarks/bench_prune.py")  # one line with its energy and CO2e at exit
    main()
