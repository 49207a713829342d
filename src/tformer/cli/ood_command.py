"""`tformer ood RUN --in-data X --out-data Y`: how well a classifier's scores tell its own kind of
input (X) from another (Y). Fits OOD statistics on X's training share, scores X's held-out share
against Y with every scorer, writes summary.json, scores.npz (every input's scores), scores.png
(histograms), roc.png and the fitted statistics to a folder of its own, and prints a table.

X and Y name data tformer knows (`tformer data list`: mnist-10k, fashion-mnist, uci-sentiment,
shakespeare, de-en-sentences, ...), an image folder (class sub-folders, or images directly), an
.npz / IDX folder, or a text file (.tsv / .csv / .jsonl with a header, or one sentence a line).
When X is the run's own training source, its split is the run's: statistics come from what the
model trained on, and the scored share is the one training never saw.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from tformer.analysis.heldout import DataSet, image_set, image_splits, text_set, text_splits
from tformer.cli.arguments import finite_number, whole_number

MAX_K = 100_000


# -- the command ------------------------------------------------------------------------------------
def load_sets(run: Any, args: argparse.Namespace) -> tuple[DataSet, DataSet, DataSet]:
    """(fit, in-distribution held out, out-of-distribution), limited as asked."""
    from tformer.models.protocols import TextClassifier

    if run.can(TextClassifier):
        fit_set, held = text_splits(run, args.in_data, args.in_column, args.seed)
        out = text_set(run, args.out_data, args.out_column)
    else:
        fit_set, held = image_splits(run, args.in_data, args.seed)
        out = image_set(run, args.out_data)
    for data, what in ((fit_set, "in-distribution training share"), (held, "in-distribution held-out share"),
                       (out, "out-of-distribution data")):
        if len(data) == 0:
            raise ValueError(f"the {what} ({data.name}) is empty; give data with at least one input")
    return (fit_set.limited(args.fit_limit, args.seed), held.limited(args.limit, args.seed),
            out.limited(args.limit, args.seed + 1))


def add_ood_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ood", help="out-of-distribution detection: how well a classifier's scores (MSP, energy, "
                       "Mahalanobis, kNN) tell its data from other data; AUROC, AUPR, FPR95, figures")
    p.add_argument("run_dir", help="a trained text or image classifier")
    p.add_argument("--in-data", required=True, help="in-distribution data: a dataset name (tformer data list), an "
                   "image folder, or a text file; statistics come from its training share")
    p.add_argument("--out-data", required=True, help="out-of-distribution data, the same kinds")
    p.add_argument("--out", default=None, help="folder for the results (default: RUN_DIR/ood); new, empty, or one "
                   "tformer ood made")
    p.add_argument("--limit", type=whole_number(1), default=None, help="score at most N examples of each side "
                   "(a seeded sample)")
    p.add_argument("--fit-limit", type=whole_number(1), default=None, help="fit on at most N examples")
    p.add_argument("--k", type=whole_number(1, MAX_K), default=50, help="kNN: the neighbour whose distance scores")
    p.add_argument("--temperature", type=finite_number, default=1.0, help="energy: T in -T logsumexp(logits / T)")
    p.add_argument("--batch-size", type=whole_number(1, 4096), default=64)
    p.add_argument("--in-column", default=None, help="text tables: the column of X's sentences (default: text, "
                   "else the first)")
    p.add_argument("--out-column", default=None, help="text tables: the column of Y's sentences")
    p.add_argument("--seed", type=int, default=0, help="held-out share and samples")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.set_defaults(func=cmd_ood)


def summary(run: Any, args: argparse.Namespace, sets: tuple[DataSet, DataSet, DataSet], detector: Any,
            report: Any) -> dict[str, Any]:
    fit_set, held, out = sets
    return {"run": str(run.path), "in_data": args.in_data, "out_data": args.out_data,
            "fit": {"examples": len(fit_set), "data": fit_set.name,
                    "labels": "the data's" if fit_set.labels is not None else "the model's predictions"},
            "in": {"examples": len(held), "data": held.name}, "out": {"examples": len(out), "data": out.name},
            "k": detector.k, "temperature": detector.temperature, "feature_layer": detector.layer,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), **report.to_dict(),
            "conventions": "higher score = more in-distribution; AUROC, AUPR-In, FPR95: in-distribution positive; "
                           "AUPR-Out: out-of-distribution positive"}


def table(report: Any) -> str:
    lines = [f"{'scorer':<12} {'AUROC':>7} {'AUPR-In':>8} {'AUPR-Out':>9} {'FPR95':>7} {'seconds':>8}"]
    for name, m in report.metrics.items():
        lines.append(f"{name:<12} {m.auroc:7.4f} {m.aupr_in:8.4f} {m.aupr_out:9.4f} {m.fpr95:7.4f} "
                     f"{report.seconds[name]:8.3f}")
    lines.append(f"(fit {report.seconds['fit']:.1f} s, forward pass of both sets {report.seconds['forward']:.1f} s, "
                 "shared by all scorers)")
    return "\n".join(lines)


def cmd_ood(args: argparse.Namespace) -> None:
    from tformer.analysis.ood import batches, check_classifier, draw_report, fit, ood_report, prepare_folder
    from tformer.files import atomic_path, write_json_atomic
    from tformer.runs import open_run

    if not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    run = open_run(args.run_dir, args.checkpoint)
    check_classifier(run.model)
    sets = load_sets(run, args)
    fit_set, held, out = sets
    for data, what in ((held, "--in-data"), (out, "--out-data")):  # cheap checks before the slow fit
        batches(run.model, run.tokenizer, data.inputs[:8], f"{what} {data.name}", args.batch_size)
    folder = Path(args.out).expanduser() if args.out else run.path / "ood"
    check_out_folder(folder)  # before the slow part; written only when everything worked
    detector = fit(run.model, fit_set.inputs, tokenizer=run.tokenizer, labels=fit_set.labels, k=args.k,
                   temperature=args.temperature, batch_size=args.batch_size)
    report = ood_report(detector, held.inputs, out.inputs)
    prepare_folder(folder, "--out")
    detector.save(folder)
    write_json_atomic(folder / "summary.json", summary(run, args, sets, detector, report), indent=2)
    with atomic_path(folder / "scores.npz") as tmp, open(tmp, "wb") as f:  # every input's score, per scorer
        np.savez(f, **{f"in_{k}": v for k, v in report.in_scores.items()},
                 **{f"out_{k}": v for k, v in report.out_scores.items()})
    title = f"{run.path.name}: {held.name} vs {out.name}"
    draw_report(report, folder / "scores.png", folder / "roc.png", title=title)
    print(f"in: {held.name} ({len(held)}), out: {out.name} ({len(out)}), fitted on {len(fit_set)}")
    print(table(report))
    print(f"wrote {folder / 'summary.json'}, scores.npz, scores.png, roc.png")


def check_out_folder(folder: Path) -> None:
    """--out is new, empty, or one tformer ood made; nothing is created here."""
    from tformer.analysis.ood import MARKER
    from tformer.files import check_output_folder

    check_output_folder(folder, MARKER, "tformer ood")
