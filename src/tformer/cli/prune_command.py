"""`tformer prune RUN --heads 0.5 --neurons 0.5 --out DIR`: structured pruning of attention heads
and feed-forward units (`tformer.compress.prune`). Writes a run that opens, predicts, generates,
evaluates and fine-tunes (`model.init_from: DIR`) like any other, with summary.json (what each
layer kept, parameters before and after), and prints the per-layer table."""

from __future__ import annotations

import argparse
import sys

from tformer.cli.arguments import finite_number, whole_number


def add_prune_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="remove the least important attention heads and feed-forward units of a run; "
                       "writes a new, smaller run")
    p.add_argument("run_dir", help="a trained run (or checkpoint folder)")
    p.add_argument("--out", required=True, help="folder for the pruned run (new or empty)")
    p.add_argument("--heads", type=finite_number, default=0.0, help="share of attention heads to remove, in [0, 1)")
    p.add_argument("--neurons", type=finite_number, default=0.0, help="share of feed-forward units to remove, "
                   "in [0, 1)")
    p.add_argument("--importance", default="gradient", choices=["gradient", "magnitude"],
                   help="gradient: |dloss/dgate| on the run's validation batches (Michel et al. 2019); "
                   "magnitude: the norm of each head's and unit's own weights (no data)")
    p.add_argument("--scope", default="layer", choices=["layer", "global"],
                   help="layer: the share from every layer; global: the least important of the whole model "
                   "(scores normalised per layer)")
    p.add_argument("--batches", type=whole_number(1, 100_000), default=8,
                   help="validation batches the gradient importance reads")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.set_defaults(func=cmd_prune)


def table(report) -> str:  # report: a compress.prune.PruneReport
    lines = ["| module | kind | before | after |", "|---|---|---:|---:|"]
    lines += [f"| {m.name} | {m.kind} | {m.before} | {m.after} |" for m in report.modules]
    return "\n".join(lines)


def cmd_prune(args: argparse.Namespace) -> None:
    from tformer.compress.output import check_new_folder
    from tformer.compress.prune import check_options, prune_run

    check_options(args.heads, args.neurons, args.importance, args.scope)
    out = check_new_folder(args.out)  # before the run is opened: nothing read in vain
    print(f"pruning {args.run_dir} ({args.importance} importance"
          f"{f', {args.batches} validation batches' if args.importance == 'gradient' else ''}) ...", file=sys.stderr)
    out, report = prune_run(args.run_dir, out, heads=args.heads, neurons=args.neurons, importance=args.importance,
                            scope=args.scope, max_batches=args.batches, which=args.checkpoint)
    print(table(report))
    before, after = report.parameters_before, report.parameters_after
    print(f"parameters {before:,} -> {after:,} ({after / before:.0%})")
    print(f"wrote {out} (open it like any run: tformer predict/generate/evaluate {out}; fine-tune it with "
          f"--set model.init_from={out}) and summary.json")
