"""`tformer quantize RUN --out DIR [--scheme auto|int8|int8-weight]`: int8 linear layers for CPU
inference (`tformer.compress.quantize`). Writes a run that opens, classifies, generates and
evaluates like any other, plus summary.json (what was quantized, size before and after)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_quantize_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="int8 quantization of a run's linear layers for CPU inference; writes a "
                       "new run")
    p.add_argument("run_dir", help="a trained run (or checkpoint folder)")
    p.add_argument("--out", required=True, help="folder for the quantized run (new or empty)")
    p.add_argument("--scheme", default="auto", choices=["auto", "int8", "int8-weight"],
                   help="int8: int8 weights and activations (dynamic; fastest for batches and decoding); "
                   "int8-weight: int8 weights, float activations; auto: the fastest this machine has a kernel for")
    p.add_argument("--skip", nargs="*", default=None, metavar="PATTERN",
                   help="module names (fnmatch patterns, whole name or last part) kept in float "
                   "(default: classifier head)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> None:
    from tformer.compress.quantize import DEFAULT_SKIP, check_new_folder, quantize, write_run
    from tformer.files import write_json_atomic
    from tformer.runs import open_run
    from tformer.runs.memory import human_bytes

    out = Path(args.out).expanduser()
    check_new_folder(out)
    print(f"opening {args.run_dir} ...", file=sys.stderr)
    run = open_run(args.run_dir, args.checkpoint)
    report = quantize(run.model, args.scheme, DEFAULT_SKIP if args.skip is None else args.skip)
    print(f"writing {out} ...", file=sys.stderr)
    write_run(run.model, run, out, report)
    summary = {"run": str(run.path), "out": str(out), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               **report.to_dict()}
    write_json_atomic(out / "summary.json", summary, indent=2)
    print(f"quantized {len(report.modules)} linear layers to {report.scheme}; kept in float: "
          f"{', '.join(report.skipped) or 'none'}")
    print(f"size {human_bytes(report.bytes_before)} -> {human_bytes(report.bytes_after)} "
          f"({report.bytes_after / report.bytes_before:.0%})")
    print(f"wrote {out} (open it like any run: tformer predict/generate/evaluate {out}) and summary.json")
