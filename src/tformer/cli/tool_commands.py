"""The commands around runs: import a Hugging Face checkpoint (GPT-2, BERT, ViT, Llama), train a tokenizer, list and fetch
datasets, and the demos (which train only into a new folder or resume their own run)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from tformer import cpu
from tformer.cli.arguments import check_new_file, recipe_path
from tformer.cli.run_commands import INTERRUPTED, fmt

if TYPE_CHECKING:
    from tformer.training.recipe import Recipe
    from tformer.training.trainer import TrainResult

RUN_FILES = (".tformer-run", ".tformer-run.lock")  # a run directory's marker and lock: not the user's


def import_converters() -> dict[str, Callable[[Path, Path], Path]]:
    """`tformer import` family -> the converter that writes its run directory."""
    from tformer.interop.hf_bert import convert_bert
    from tformer.interop.hf_llama import convert_llama
    from tformer.interop.hf_vit import convert_vit
    from tformer.interop.huggingface import convert_gpt2

    return {"gpt2": convert_gpt2, "bert": convert_bert, "vit": convert_vit, "llama": convert_llama}


IMPORT_FAMILIES = {"gpt2": "a GPT-2 checkpoint (GPT2LMHeadModel): config.json + model.safetensors + tokenizer.json",
                   "bert": "a BERT-architecture checkpoint (BertModel, BertForMaskedLM, BertFor*Classification, "
                           "MiniLM): config.json + model.safetensors + tokenizer.json",
                   "vit": "a ViT image classifier (ViTForImageClassification): config.json + model.safetensors",
                   "llama": "a Llama checkpoint (LlamaForCausalLM): config.json + model.safetensors + "
                            "tokenizer.json"}


def cmd_import(args: argparse.Namespace) -> None:
    """Convert into a new or empty folder only: converting over a trained run would replace its
    best checkpoint and tokenizer."""
    source, out = Path(args.hf_dir).expanduser(), Path(args.out_dir).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"{args.hf_dir} does not exist; give a Hugging Face checkpoint folder")
    if not source.is_dir():
        raise ValueError(f"{args.hf_dir} is a file; give the folder holding config.json and the weights")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{args.out_dir} already exists and is not an empty folder; import into a new folder")
    import_converters()[args.family](source, out)
    print(f"{args.hf_dir} converted to {args.out_dir}; use it like a trained run (tformer predict / generate / "
          f"evaluate {args.out_dir}) or fine-tune it with model.init_from: {args.out_dir}")


