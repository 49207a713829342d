"""`tformer quantize RUN --out DIR [--scheme auto|int8|int8-weight]`: int8 linear layers for CPU
inference (`tformer.compress.quantize`). Writes a run that opens, classifies, generates and
evaluates like any other, plus summary.json (what was quantized, size before and after)."""

from __future__ import annotations

import argparse
import sys


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
                   "(default: the classifier's logits layer, if the model is a classifier; --skip alone: none)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> None:
    from tformer.compress.output import check_new_folder
    from tformer.compress.quantize import quantize_run
    from tformer.runs.memory import human_bytes

    out = check_new_folder(args.out)  # before the run is opened
    print(f"quantizing {args.run_dir} ...", file=sys.stderr)
    report = quantize_run(args.run_dir, out, args.scheme, args.skip, which=args.checkpoint)
    print(f"quantized {len(report.modules)} linear layers to {report.scheme}; kept in float: "
          f"{', '.join(report.skipped) or 'none'}")
    print(f"size {human_bytes(report.bytes_before)} -> {human_bytes(report.bytes_after)} "
          f"({report.bytes_after / report.bytes_before:.0%})")
    print(f"wrote {out} (open it like any run: tformer predict/generate/evaluate {out}) and summary.json")
