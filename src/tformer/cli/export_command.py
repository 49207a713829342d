"""`tformer export RUN --format hf|onnx --out DIR`: a trained run in the formats other tools run.
hf writes the transformers twin the model has (GPT-2, Llama, BERT, ViT); onnx the inference
graphs onnxruntime runs. Either writes a new folder whole, or refuses in one line and writes nothing."""

from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("hf", "onnx")


def cmd_export(args: argparse.Namespace) -> None:
    out = Path(args.out).expanduser()
    if args.format == "hf":
        from tformer.interop.hf_export import export_run

        folder, twin = export_run(args.run_dir, out, checkpoint=args.checkpoint)
        print(f"{args.run_dir} exported as Hugging Face {twin} to {folder}; load it with transformers' "
              f"from_pretrained({str(folder)!r})")
        return
    from tformer.interop.onnx_export import export_onnx  # onnx and onnxscript load only for this

    folder = export_onnx(args.run_dir, out, checkpoint=args.checkpoint)
    print(f"{args.run_dir} exported to ONNX in {folder}")


def add_export_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a trained run as a Hugging Face checkpoint (hf) or ONNX graphs")
    p.add_argument("run_dir")
    p.add_argument("--format", required=True, choices=FORMATS, help="hf: config.json + model.safetensors "
                   "(+ tokenizer.json or preprocessor_config.json) that transformers loads; onnx: graphs for "
                   "onnxruntime")
    p.add_argument("--out", required=True, help="a new or empty folder; it is written whole or not at all")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.set_defaults(func=cmd_export)
