"""LoRA against full fine-tuning of all-MiniLM-L6-v2 for sentiment (UCI sentences, stratified
5-fold split, fold 0 scored), side by side in one run: the shipped recipes bert-sentiment-minilm
(every weight but the word embeddings trains, lr 1e-4) and bert-sentiment-minilm-lora (rank-4
adapters on every attention and MLP projection + the classifier head, lr 1e-3), the same steps,
batches, data and seed. Each training runs in a child process of its own, so its peak resident
memory (ru_maxrss: training and the fold's evaluation) is its own; methods alternate per repeat.

Step time is the median over the run's logged intervals (after the first) of batch_size /
examples_per_s, from metrics.jsonl. Trainable parameters are counted as the build step decides
them (LoRA: adapters + head; full: all but the frozen prefixes).

    TFORMER_DATA_DIR=/work/shared/data flock /tmp/bench.lock \
        python benchmarks/bench_lora.py --base /work/runs-shared/minilm-l6 --threads 1 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

RECIPES = {"full": "bert-sentiment-minilm", "lora": "bert-sentiment-minilm-lora"}


def child(method: str, base: Path, out: Path, fold: int, threads: int, overrides: list[str]) -> dict[str, Any]:
    """Train one method in this process and evaluate it on the fold; what the table needs."""
    import torch

    from tformer.runs import open_run
    from tformer.training.recipe import load_recipe, task_module, train_recipe

    torch.set_num_threads(threads)
    path = Path(str(resources.files("tformer") / "recipes" / f"{RECIPES[method]}.yaml"))
    recipe = load_recipe(path, [f"model.init_from={base}", f"tokenizer.path={base / 'tokenizer.json'}",
                                f"data.fold={fold}", f"run_dir={out / method}", f"training.threads={threads}",
                                *overrides])
    start = time.perf_counter()
    train_recipe(recipe, fresh=True)
    seconds = time.perf_counter() - start
    run = open_run(recipe.run_dir)
    result = task_module(recipe.task).evaluate(recipe.settings, run.model, run.tokenizer)
    frozen = tuple(recipe.model.get("freeze") or ())
    params = dict(run.model.named_parameters())
    if "lora" in recipe.model:
        trainable = [n for n in params if ".lora_" in n or n.startswith("head.")]
    else:
        trainable = [n for n in params if not any(n == f or n.startswith(f + ".") for f in frozen)]
    logs = [json.loads(line) for line in (Path(recipe.run_dir) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["examples_per_s"] for r in logs if "examples_per_s" in r][1:]
    return {"method": method, "accuracy": result.get("accuracy"), "macro_f1": result.get("macro_f1"),
            "trainable": sum(params[n].numel() for n in trainable),
            "total": sum(p.numel() for p in params.values()),
            "step_ms": 1000 * recipe.training.batch_size / statistics.median(rates),
            "train_s": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def spawn(method: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", method, "--base", str(args.base), "--out", str(out),
               "--fold", str(args.fold), "--threads", str(args.threads), *[f"--set={o}" for o in args.set]]
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=Path("/work/runs-shared/minilm-l6"))
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="run directories (default: a temporary folder)")
    parser.add_argument("--set", action="append", default=[], help="a recipe override for both methods "
                        "(a quick check: --set training.max_steps=4)")
    parser.add_argument("--child", choices=list(RECIPES), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.base, args.out, args.fold, args.threads, args.set)))
        return
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-lora-"))
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; load before: {os.getloadavg()}; threads {args.threads}; "
          f"fold {args.fold}; base {args.base}; overrides {args.set}", flush=True)
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in RECIPES}
    for repeat in range(args.repeats):
        for method in (RECIPES if repeat % 2 == 0 else reversed(list(RECIPES))):
            rows[method].append(spawn(method, args, out / f"r{repeat}"))
            print(json.dumps(rows[method][-1]), file=sys.stderr, flush=True)
    print(f"load after: {os.getloadavg()}")
    print(f"\n| method | accuracy (fold {args.fold}) | macro F1 | trainable params | share | step ms (median) | "
          "train s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for method, results in rows.items():
        def med(key: str, results: list[dict[str, Any]] = results) -> float:
            return statistics.median(r[key] for r in results)

        print(f"| {RECIPES[method]} | {med('accuracy'):.4f} | {med('macro_f1'):.4f} | {results[0]['trainable']:,} | "
              f"{100 * results[0]['trainable'] / results[0]['total']:.2f}% | {med('step_ms'):.0f} | "
              f"{med('train_s'):.0f} | {med('peak_rss_mib'):.0f} |")
    if args.repeats > 1:
        print(f"(medians of {args.repeats} repeats, methods alternating)")


if __name__ == "__main__":
    from tformer.cli.energy_command import say_at_exit

    say_at_exit("benchmarks/bench_lora.py")  # one line with its energy and CO2e at exit
    main()
