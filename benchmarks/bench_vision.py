"""Vision benchmarks: a shipped recipe trained and evaluated exactly as `tformer train` and
`tformer evaluate` run it, with wall-clock and throughput; and ViT inference images/s side by side
with Hugging Face's ViT of the same config.

    TFORMER_DATA_DIR=../shared/data python benchmarks/bench_vision.py train vit-fashion-mnist
    ... train vit-mnist | image-gen-digits | image-gen-mnist   [--set key=value ...]
    python benchmarks/bench_vision.py infer --preset vit-s/16 --batch 16 [--device cuda]

`train` prints one JSON line: recipe, overrides, steps, training minutes, training images/s,
and every metric `tformer evaluate` reports (accuracy / judge scores ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from tformer.cli import recipe_path
from tformer.models import build_model
from tformer.training.recipe import evaluate_run, load_recipe, train_recipe


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"
    return f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}"


def bench_train(name: str, overrides: list[str], fresh: bool) -> dict:
    recipe = load_recipe(recipe_path(name), [f"run_dir=runs/bench-{name}", *overrides])
    start = time.perf_counter()
    result = train_recipe(recipe, fresh=fresh)
    minutes = (time.perf_counter() - start) / 60
    images = result.step * recipe.training.batch_size
    scores = evaluate_run(recipe.run_dir)
    return {"recipe": name, "overrides": overrides, "machine": machine(), "steps": result.step,
            "train_minutes": round(minutes, 2), "train_images_per_s": round(images / (minutes * 60), 1),
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items()
               if not isinstance(v, (list, dict))}}


def hf_vit(config) -> torch.nn.Module:
    import transformers

    hf_config = transformers.ViTConfig(
        hidden_size=config.d_model, num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        intermediate_size=config.ffn_dim, image_size=config.image_size, patch_size=config.patch_size,
        num_channels=config.channels, num_labels=config.n_classes, attn_implementation="sdpa")
    return transformers.ViTForImageClassification(hf_config)


def images_per_s(model: torch.nn.Module, images: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        model(images)  # warm-up
        if images.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model(images)
        if images.is_cuda:
            torch.cuda.synchronize()
    return repeats * len(images) / (time.perf_counter() - start)


def bench_infer(preset: str, batch: int, repeats: int, device: str, dtype: str) -> dict:
    torch.manual_seed(0)
    ours = build_model(preset).eval()
    theirs = hf_vit(ours.config).eval()
    kind = getattr(torch, dtype)
    ours, theirs = ours.to(device, kind), theirs.to(device, kind)
    c = ours.config
    images = torch.randn(batch, c.channels, c.image_size, c.image_size, device=device, dtype=kind)
    return {"preset": preset, "batch": batch, "dtype": dtype, "machine": machine(),
            "tformer_images_per_s": round(images_per_s(ours, images, repeats), 1),
            "hf_images_per_s": round(images_per_s(theirs, images, repeats), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--resume", action="store_true", help="continue runs/bench-RECIPE instead of starting over")
    p = sub.add_parser("infer")
    p.add_argument("--preset", default="vit-s/16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "train":
        result = bench_train(args.recipe, args.set, fresh=not args.resume)
    else:
        result = bench_infer(args.preset, args.batch, args.repeats, args.device, args.dtype)
    print(json.dumps(result))
    out = Path("benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "vision.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), **result}) + "\n")


if __name__ == "__main__":
    from tformer.cli.energy_command import say_at_exit

    say_at_exit("benchmarks/bench_vision.py")  # one line with its energy and CO2e at exit
    main()
