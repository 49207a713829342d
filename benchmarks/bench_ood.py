"""Out-of-distribution detection with tformer's scorers (MSP, energy, Mahalanobis, kNN) on trained
runs, offline on the CPU:

    images, far OOD   a ViT trained on MNIST: MNIST's held-out share vs Fashion-MNIST's test split
    images, near OOD  a ViT trained on digits 0-4 only: its held-out 0-4 vs MNIST digits 5-9
    text              the fine-tuned MiniLM sentiment classifier: its test fold vs German sentences
                      (Ding, German side) and vs Shakespeare lines (>= 4 words)

AUROC, AUPR-In, AUPR-Out, FPR95 per scorer and seconds; writes benchmarks/results/ood.md, ood.json
and ood_<case>_{scores,roc}.png.

    TFORMER_DATA_DIR=/work/shared/data python benchmarks/bench_ood.py
    python benchmarks/bench_ood.py --cases mnist-fashion --limit 500     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tformer.analysis.ood import SCORERS, OODReport, draw_report, fit
from tformer.cli.ood_command import DataSet, image_set, image_splits, table, text_set, text_splits
from tformer.data.images import load_images
from tformer.metrics.ood import ood_metrics
from tformer.runs import open_run

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = {"mnist": "/work/main/runs/explain/vit-mnist-600", "digits-0-4": "/work/main/runs/ood/vit-digits-0-4",
        "sentiment": "/work/main/runs/explain/bert-sentiment-minilm-fold0"}
CASES = ("mnist-fashion", "digits-0-4-vs-5-9", "sentiment-german", "sentiment-shakespeare")


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {message}", file=sys.stderr, flush=True)


def digits_5_to_9(limit: int | None, seed: int) -> DataSet:
    """MNIST (mnist-10k) digits 5-9: classes a ViT trained on 0-4 never saw."""
    mnist = load_images("mnist-10k", "all")
    index = np.flatnonzero(mnist.labels >= 5)
    return DataSet(mnist.images[index], None, "mnist-10k digits 5-9").limited(limit, seed)


def measure(run_dir: str, fit_set: DataSet, held: DataSet, outs: dict[str, DataSet], k: int,
            batch_size: int) -> dict[str, dict[str, Any]]:
    """One fit, the in-distribution forward pass once, then each out-of-distribution set."""
    run = open_run(run_dir)
    progress(f"fit on {len(fit_set)} ({fit_set.name}) of {run_dir}")
    detector = fit(run.model, fit_set.inputs, tokenizer=run.tokenizer, labels=fit_set.labels, k=k,
                   batch_size=batch_size)
    start = time.perf_counter()
    in_outputs = detector.outputs(held.inputs, "in-distribution")
    in_forward = time.perf_counter() - start
    in_scores = detector.score_outputs(in_outputs)
    in_seconds = {name: detector.seconds[name] for name in SCORERS}
    results = {}
    for case, out in outs.items():
        progress(f"{case}: {len(held)} in ({held.name}) vs {len(out)} out ({out.name})")
        start = time.perf_counter()
        out_outputs = detector.outputs(out.inputs, "out-of-distribution")
        forward = in_forward + time.perf_counter() - start
        out_scores = detector.score_outputs(out_outputs)
        seconds = {"fit": detector.seconds["fit"], "forward": forward,
                   **{name: in_seconds[name] + detector.seconds[name] for name in SCORERS}}
        report = OODReport({name: ood_metrics(in_scores[name], out_scores[name]) for name in SCORERS},
                           in_scores, out_scores, seconds)
        print(f"\n{case}\n{table(report)}", flush=True)
        draw_report(report, RESULTS / f"ood_{case}_scores.png", RESULTS / f"ood_{case}_roc.png",
                    title=f"{Path(run_dir).name}: {held.name} vs {out.name}")
        accuracy = None
        if held.labels is not None:
            accuracy = float((in_outputs.logits.argmax(axis=1) == held.labels).mean())
        results[case] = {"run": run_dir, "fit": {"examples": len(fit_set), "data": fit_set.name},
                         "in": {"examples": len(held), "data": held.name, "accuracy": accuracy},
                         "out": {"examples": len(out), "data": out.name}, "k": detector.k,
                         "feature_layer": detector.layer, **report.to_dict()}
    return results


def run_cases(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    cases = set(args.cases)
    if "mnist-fashion" in cases:
        run = open_run(args.mnist_run)
        fit_set, held = image_splits(run, "mnist-10k", args.seed)
        out = image_set(run, "fashion-mnist").limited(args.limit, args.seed + 1)
        results |= measure(args.mnist_run, fit_set.limited(args.fit_limit, args.seed), held.limited(args.limit, args.seed),
                           {"mnist-fashion": out}, args.k, args.batch_size)
    if "digits-0-4-vs-5-9" in cases:
        run = open_run(args.digits_run)
        source = (run.recipe or {})["data"]["source"]
        fit_set, held = image_splits(run, source, args.seed)
        results |= measure(args.digits_run, fit_set.limited(args.fit_limit, args.seed), held.limited(args.limit, args.seed),
                           {"digits-0-4-vs-5-9": digits_5_to_9(args.limit, args.seed + 1)}, args.k, args.batch_size)
    text_cases = {"sentiment-german": ("de-en-sentences", "de"), "sentiment-shakespeare": ("shakespeare", None)}
    wanted = {case: spec for case, spec in text_cases.items() if case in cases}
    if wanted:
        run = open_run(args.sentiment_run)
        fit_set, held = text_splits(run, "uci-sentiment", None, args.seed)
        outs = {case: text_set(run, source, column).limited(args.limit, args.seed + 1)
                for case, (source, column) in wanted.items()}
        results |= measure(args.sentiment_run, fit_set.limited(args.fit_limit, args.seed), held.limited(args.limit, args.seed),
                           outs, args.k, args.batch_size)
    return results


def markdown(results: dict[str, Any]) -> str:
    results = dict(sorted(results.items(), key=lambda item: [item[0].startswith(c) for c in CASES].index(True)
                          if any(item[0].startswith(c) for c in CASES) else len(CASES)))
    lines = ["# Out-of-distribution detection (`tformer ood`, `tformer.analysis.ood`)", "",
             f"Machine: CPU-2 shared ({platform.machine()}), torch {torch.__version__}; each case names its command, "
             "date, threads and load average (1 min, at its start and at the end of its run)  ",
             "Scores: higher = more in-distribution. AUROC, AUPR-In and FPR95 take in-distribution as positive; "
             "AUPR-Out takes out-of-distribution as positive (scores negated). FPR95 = share of OOD inputs accepted "
             "at the threshold that accepts 95 % of in-distribution inputs. Seconds per scorer: the scoring of "
             "both sets given the features; the forward pass (both sets) is shared by all scorers and listed once.",
             ""]
    lines += ["| case | best scorer | AUROC | FPR95 |", "|---|---|---|---|"]
    for case, r in results.items():
        best = max(r["metrics"], key=lambda name: r["metrics"][name]["auroc"])
        lines.append(f"| {case} | {best} | {r['metrics'][best]['auroc']:.4f} | {r['metrics'][best]['fpr95']:.4f} |")
    for case, far in results.items():
        if case.startswith("mnist-fashion"):
            best_auroc = max(m["auroc"] for m in far["metrics"].values())
            lines += ["", f"Goal (issue 14): best AUROC >= 0.98 on MNIST vs Fashion-MNIST ({case}): {best_auroc:.4f}, "
                      f"{'met' if best_auroc >= 0.98 else 'missed'}."]
    lines.append("")
    for case, r in results.items():
        acc = f", accuracy {r['in']['accuracy']:.3f}" if r["in"]["accuracy"] is not None else ""
        lines += [f"## {case}", "", f"`{r['command']}`; {r['date']}; {r['threads']} thread(s); load "
                  f"{r['load_average'][0]:.1f} / {r['load_average'][1]:.1f}", "",
                  f"Run `{r['run']}`; fitted on {r['fit']['examples']} ({r['fit']['data']}); in: {r['in']['examples']} "
                  f"({r['in']['data']}{acc}); out: {r['out']['examples']} ({r['out']['data']}); k = {r['k']}; "
                  f"features: input of `{r['feature_layer']}`.", "",
                  "| scorer | AUROC | AUPR-In | AUPR-Out | FPR95 | seconds |", "|---|---|---|---|---|---|"]
        for name, m in r["metrics"].items():
            lines.append(f"| {name} | {m['auroc']:.4f} | {m['aupr_in']:.4f} | {m['aupr_out']:.4f} | {m['fpr95']:.4f} "
                         f"| {r['seconds'][name]:.4f} |")
        lines += ["", f"Fit {r['seconds']['fit']:.1f} s; forward pass of both sets {r['seconds']['forward']:.1f} s. "
                  f"Figures: `ood_{case}_scores.png`, `ood_{case}_roc.png`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--mnist-run", default=RUNS["mnist"])
    parser.add_argument("--digits-run", default=RUNS["digits-0-4"])
    parser.add_argument("--sentiment-run", default=RUNS["sentiment"])
    parser.add_argument("--limit", type=int, default=1000, help="examples per scored side (seeded sample)")
    parser.add_argument("--fit-limit", type=int, default=None, help="examples to fit on (default: all)")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--name", default="ood", help="results file stem in benchmarks/results")
    parser.add_argument("--merge", action="store_true", help="keep the other cases already in NAME.json")
    parser.add_argument("--tag", default=None, help="suffix for the case names (another run on the same case)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(exist_ok=True)
    when, load_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), os.getloadavg()[0]
    results = run_cases(args)
    if args.tag:  # another run on the same case, kept beside the first
        results = {f"{case} ({args.tag})": r for case, r in results.items()}
    command = "TFORMER_DATA_DIR=/work/shared/data python benchmarks/bench_ood.py " + " ".join(sys.argv[1:])
    for r in results.values():
        r.update(command=command, date=when, load_average=[load_start, os.getloadavg()[0]], threads=args.threads)
    path = RESULTS / f"{args.name}.json"
    if args.merge and path.is_file():  # cases measured earlier (each keeps its own command, date and load)
        results = {**json.loads(path.read_text())["results"], **results}
    path.write_text(json.dumps({"machine": "CPU-2 shared", "results": results}, indent=2))
    (RESULTS / f"{args.name}.md").write_text(markdown(results))
    progress(f"wrote {RESULTS / (args.name + '.md')}")


if __name__ == "__main__":
    from tformer.cli.energy_command import say_at_exit

    say_at_exit("benchmarks/bench_ood.py")  # one line with its energy and CO2e at exit
    main()
