"""Robustness of ViT image classifiers: clean accuracy, accuracy under PGD-20 (L-inf, step
2.5 eps / 20, one random start) at several epsilons, and under Gaussian noise, blur and occlusion,
for a standard and an adversarially trained run on the same held-out test images.

    TFORMER_DATA_DIR=/work/shared/data python benchmarks/bench_robustness_images.py \\
        --run standard=runs/explain/vit-mnist-600 \\
        --run adversarial=runs/robustness/vit-mnist-adversarial-ft --n 500

Writes benchmarks/results/<name>.md, .json, <name>_curves.png and one adversarial grid per run
(<name>_grid_<run>.png, at --grid-epsilon). The goal of issue 14: the adversarially trained ViT keeps
>= 70 % accuracy under PGD-20 at epsilon 0.1 on MNIST and loses <= 3 points of clean accuracy.
torchattacks' PGD, when installed, is run on the same images at --grid-epsilon as a cross-check.
A run already measured with the same settings and the same checkpoint (its manifest's hash) in
<name>.json is reused, so runs can be measured one at a time as they finish.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from tformer.analysis.image_robustness import (
    accuracy, blur_sweep, noise_sweep, occlusion_sweep, pgd_sweep, plot_sweeps, write_adversarial_grid)
from tformer.data.images import images_to_tensor
from tformer.runs import open_run
from tformer.training.tasks.image_classification import DataSpec, load_splits

ROOT = Path(__file__).resolve().parents[1]
GOAL_ROBUST, GOAL_CLEAN_DROP = 0.70, 0.03


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="NAME=RUN_DIR",
                        help="a run to measure, named; the first is the reference for the clean-accuracy drop")
    parser.add_argument("--n", type=int, default=500, help="held-out test images attacked (seeded subset)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3])
    parser.add_argument("--steps", type=int, default=20, help="PGD steps (step size 2.5 eps / steps)")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--blur", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0])
    parser.add_argument("--occlusion", type=int, nargs="+", default=[0, 4, 8, 12, 16])
    parser.add_argument("--grid-epsilon", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="robustness_images")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--notes", type=Path, help="a markdown file appended to the report (what the numbers say)")
    return parser.parse_args()


def test_images(run) -> tuple[torch.Tensor, torch.Tensor, str, dict]:
    """The run's own held-out test split (as `tformer evaluate` scores it)."""
    data = {k: v for k, v in run.record["recipe"]["data"].items() if k in DataSpec.__dataclass_fields__}
    _, _, test, test_name = load_splits(DataSpec(**data))
    return images_to_tensor(test.images), torch.from_numpy(test.labels), test_name, data


def torchattacks_accuracy(model, images: torch.Tensor, labels: torch.Tensor, epsilon: float, steps: int,
                          seed: int) -> float | None:
    try:
        import torchattacks
    except ImportError:
        return None

    class Oracle(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model.classify(x)

    torch.manual_seed(seed)
    attack = torchattacks.PGD(Oracle().eval(), eps=epsilon, alpha=2.5 * epsilon / steps, steps=steps, random_start=True)
    adversarial = attack(images, labels)
    return accuracy(model, adversarial, labels)


def measure(name: str, path: str, args: argparse.Namespace, reference_split: dict | None) -> dict:
    run = open_run(ROOT / path if not Path(path).is_absolute() else path)
    model = run.model.eval()
    images, labels, split, data = test_images(run)
    if reference_split is not None and {k: data.get(k) for k in ("source", "split_seed", "test_fraction")} != \
            {k: reference_split.get(k) for k in ("source", "split_seed", "test_fraction")}:
        print(f"warning: {name} was trained on another split than the first run: {data} vs {reference_split}")
    clean_all = accuracy(model, images, labels)
    index = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))[:args.n]
    x, y = images[index], labels[index]
    print(f"{name}: {run.checkpoint} ({split}: {len(labels)} images, clean accuracy {clean_all:.4f}); "
          f"attacking {len(y)}", flush=True)
    pgd_rows, results = pgd_sweep(model, x, y, args.epsilons, steps=args.steps, seed=args.seed)
    for row in pgd_rows:
        print(f"  PGD-{args.steps} eps {row['level']:.2f}: {row['accuracy']:.4f}  "
              f"({row['seconds_per_image'] * 1000:.1f} ms/image)", flush=True)
    rows = pgd_rows + noise_sweep(model, x, y, args.noise, seed=args.seed) + blur_sweep(model, x, y, args.blur) + \
        occlusion_sweep(model, x, y, args.occlusion, seed=args.seed)
    for row in rows[len(pgd_rows):]:
        print(f"  {row['perturbation']} {row['level']:g}: {row['accuracy']:.4f}", flush=True)
    grid = args.out / f"{args.name}_grid_{name}.png"
    if args.grid_epsilon in results:
        write_adversarial_grid(model, x, y, results[args.grid_epsilon], grid, n=10,
                               title=f"{name}: PGD-{args.steps}, eps {args.grid_epsilon} (red: fooled)")
    start = time.perf_counter()
    oracle = torchattacks_accuracy(model, x, y, args.grid_epsilon, args.steps, args.seed)
    if oracle is not None:
        print(f"  torchattacks PGD-{args.steps} eps {args.grid_epsilon}: {oracle:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    return {"name": name, "run": str(path), "checkpoint": str(run.checkpoint), "split": split,
            "test_images": len(labels), "clean_accuracy_all": clean_all, "attacked_images": len(y), "rows": rows,
            "torchattacks_pgd_accuracy": oracle, "grid_png": grid.name if args.grid_epsilon in results else None,
            "data": data}


def settings_of(args: argparse.Namespace) -> dict:
    keys = ("n", "epsilons", "steps", "noise", "blur", "occlusion", "grid_epsilon", "seed")
    return {k: getattr(args, k) for k in keys}


def checkpoint_hash(path: str) -> str:
    from tformer.runs.run import find_checkpoint

    folder = find_checkpoint(ROOT / path if not Path(path).is_absolute() else path, "best")
    return hashlib.sha256((Path(folder) / "manifest.json").read_bytes()).hexdigest()


def measured_before(args: argparse.Namespace, name: str, path: str) -> dict | None:
    """This run's earlier result with the same settings and checkpoint, from <name>.json."""
    previous = args.out / f"{args.name}.json"
    if not previous.is_file():
        return None
    old = json.loads(previous.read_text())
    if old.get("settings") != settings_of(args):
        return None
    for result in old.get("results", []):
        if result["name"] == name and result["run"] == path and result.get("manifest_sha256") == checkpoint_hash(path):
            return result
    return None


def accuracy_at(result: dict, perturbation: str, level: float) -> float | None:
    found = [r["accuracy"] for r in result["rows"] if r["perturbation"] == perturbation and r["level"] == level]
    return found[0] if found else None


def markdown(results: list[dict], header: dict, args: argparse.Namespace) -> str:
    lines = [f"# Robustness of image classifiers ({header['date']})", "",
             f"Command: `{header['command']}`  ", f"Machine: {header['machine']}; load average at start "
             f"{header['load_start']}, at end {header['load_end']}; torch threads {args.threads}.", "",
             f"PGD-{args.steps}: L-inf, step 2.5 eps / {args.steps}, one random start, on {results[0]['attacked_images']} "
             f"held-out test images (seeded subset of the {results[0]['split']}).", "",
             "| run | clean (all test) | " + " | ".join(f"PGD eps {e:g}" if e else "clean (attacked subset)"
                                                       for e in args.epsilons) + " | ms/image PGD |",
             "|---|---|" + "---|" * len(args.epsilons) + "---|"]
    for r in results:
        pgd_rows = [row for row in r["rows"] if row["perturbation"] == "pgd"]
        timed = [row["seconds_per_image"] * 1000 for row in pgd_rows if row["level"] > 0]
        lines.append(f"| {r['name']} | {r['clean_accuracy_all']:.4f} | "
                     + " | ".join(f"{row['accuracy']:.4f}" for row in pgd_rows)
                     + f" | {np.mean(timed):.1f} |")
    for perturbation, levels in (("noise", args.noise), ("blur", args.blur), ("occlusion", args.occlusion)):
        lines += ["", f"{perturbation} (level = {'sigma' if perturbation != 'occlusion' else 'square side, px'}):", "",
                  "| run | " + " | ".join(f"{level:g}" for level in levels) + " |", "|---|" + "---|" * len(levels)]
        for r in results:
            lines.append(f"| {r['name']} | " + " | ".join(f"{accuracy_at(r, perturbation, float(level)):.4f}"
                                                           for level in levels) + " |")
    if any(r["torchattacks_pgd_accuracy"] is not None for r in results):
        lines += ["", f"Cross-check, torchattacks PGD-{args.steps} (random start, its own seed) at eps "
                      f"{args.grid_epsilon}: " + ", ".join(f"{r['name']} {r['torchattacks_pgd_accuracy']:.4f}"
                                                           for r in results if r["torchattacks_pgd_accuracy"] is not None)]
    lines += ["", f"Curves: `{args.name}_curves.png`; adversarial examples: "
              + ", ".join(f"`{r['grid_png']}`" for r in results if r["grid_png"]), ""]
    verdict = goal(results, args)
    if verdict is not None:
        lines += [f"Goal (>= {GOAL_ROBUST:.0%} under PGD-{args.steps} at eps 0.1, clean drop <= {GOAL_CLEAN_DROP * 100:.0f} "
                  f"points vs {results[0]['name']}): **{'met' if verdict['met'] else 'missed'}** ({results[-1]['name']}: "
                  f"{verdict['robust_accuracy_at_0.1']:.4f} at eps 0.1, clean drop {verdict['clean_drop'] * 100:+.1f} points).", ""]
    if args.notes is not None:
        lines += [args.notes.read_text().rstrip(), ""]
    return "\n".join(lines)


def goal(results: list[dict], args: argparse.Namespace) -> dict | None:
    if len(results) < 2 or 0.1 not in args.epsilons:
        return None
    reference, trained = results[0], results[-1]
    robust = accuracy_at(trained, "pgd", 0.1)
    drop = reference["clean_accuracy_all"] - trained["clean_accuracy_all"]
    return {"robust_accuracy_at_0.1": robust, "clean_drop": drop,
            "met": bool(robust is not None and robust >= GOAL_ROBUST and drop <= GOAL_CLEAN_DROP)}


def main() -> None:
    args = arguments()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    header = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": "python benchmarks/bench_robustness_images.py " + " ".join(os.sys.argv[1:]),
              "machine": f"CPU-2 shared ({platform.machine()}, torch {torch.__version__})",
              "load_start": [round(v, 2) for v in os.getloadavg()]}
    results, reference = [], None
    for item in args.run:
        name, _, path = item.partition("=")
        result = measured_before(args, name, path)
        if result is not None:
            print(f"{name}: reusing the measurement of {result['checkpoint']} in {args.name}.json", flush=True)
        else:
            result = {**measure(name, path, args, reference), "manifest_sha256": checkpoint_hash(path)}
        reference = reference or result["data"]
        results.append(result)
    header["load_end"] = [round(v, 2) for v in os.getloadavg()]
    plot_sweeps({r["name"]: r["rows"] for r in results}, args.out / f"{args.name}_curves.png",
                title=f"{results[0]['data']['source']}: {results[0]['attacked_images']} held-out images")
    summary = {**header, "settings": settings_of(args), "pgd_steps": args.steps, "results": results, "goal": goal(results, args)}
    (args.out / f"{args.name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(results, header, args))
    print(json.dumps({"goal": summary["goal"]}))
    print(f"wrote {args.out / args.name}.md / .json / _curves.png")


if __name__ == "__main__":
    from tformer.cli.energy_command import say_at_exit

    say_at_exit("benchmarks/bench_robustness_images.py")  # one line with its energy and CO2e at exit
    main()
