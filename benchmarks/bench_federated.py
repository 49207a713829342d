"""Federated against centralised training at an equal number of examples seen (issue 18).

Two tasks: the imported all-MiniLM-L6-v2 sentiment fine-tune (recipe bert-sentiment-minilm, UCI
sentences, fold 0's training folds) and a small ViT on the 10,000-image MNIST subset (recipe
vit-mnist, narrowed to fit the CPU budget). For each: one centralised run of T steps (the plain
Trainer, `train_recipe`), then federations of 10 clients on Flower's simulation runtime (the
`tformer federate` path) with IID, Dirichlet 0.5 and Dirichlet 0.1 partitions, FedAvg and FedProx,
R rounds x 10 clients x S local steps = T steps of the same batch size: the same examples seen.

Reported: validation accuracy of the centralised model after T steps and of the global model
after every round (both on the recipe's validation split, the one the federation evaluates), the
final accuracy and the first round whose global model reaches 95% of the centralised accuracy.

Sizes are chosen for a 2-core CPU shared with five other sessions (a MiniLM step took ~7 s there
at load 6): MiniLM T = 30 steps of 8 sentences (max 64 tokens; 240 examples, a tenth of an
epoch), R = 3, S = 1; ViT (d 64, 2 layers) T = 200 steps of 32 images (0.8 epoch), R = 5, S = 4.

    TFORMER_DATA_DIR=/work/shared/data flock /tmp/bench.lock \\
        python benchmarks/bench_federated.py --base /work/runs-shared/minilm-l6 --out /tmp/bench-federated
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

PARTITIONS = ("iid", "dirichlet:0.5", "dirichlet:0.1")
STRATEGIES = ("fedavg", "fedprox")
CLIENTS, MU, TARGET = 10, 0.01, 0.95


@dataclass(frozen=True)
class Setup:
    recipe: str
    overrides: tuple[str, ...]
    steps: int  # centralised T
    rounds: int  # R; local steps S = T / (R x CLIENTS)


def setups(base: Path) -> dict[str, Setup]:
    return {
        "minilm": Setup("bert-sentiment-minilm",
                        (f"model.init_from={base}", f"tokenizer.path={base / 'tokenizer.json'}", "data.max_length=64",
                         "training.batch_size=8", "training.warmup_steps=3", "training.threads=2"), 30, 3),
        "vit": Setup("vit-mnist", ("model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.d_ff=128",
                                   "training.batch_size=32", "training.warmup_steps=20", "training.threads=2"), 200, 5),
    }


def recipe_for(setup: Setup, run_dir: Path, steps: int) -> Any:
    from tformer.training.recipe import load_recipe

    path = Path(str(resources.files("tformer") / "recipes" / f"{setup.recipe}.yaml"))
    return load_recipe(path, [*setup.overrides, f"training.max_steps={steps}", f"training.eval_every={steps}",
                              f"run_dir={run_dir}"])


def centralised(setup: Setup, out: Path) -> dict[str, Any]:
    """T plain Trainer steps on all the training data; the last model's validation accuracy."""
    from tformer.runs import open_run
    from tformer.training.recipe import prepare, train_recipe

    recipe = recipe_for(setup, out / "central", setup.steps)
    start = time.perf_counter()
    train_recipe(recipe, fresh=True)
    seconds = time.perf_counter() - start
    task = prepare(recipe).task
    accuracy = task.accuracy(open_run(recipe.run_dir, "last").model)  # type: ignore[attr-defined]
    return {"accuracy": accuracy, "steps": setup.steps, "seconds": seconds}


def federated(setup: Setup, out: Path, partition: str, strategy: str, central: float) -> dict[str, Any]:
    from tformer.federated.simulate import simulate
    from tformer.federated.spec import FederationSpec, absolute_paths

    recipe = recipe_for(setup, out / "unused", setup.steps)
    local = setup.steps // (setup.rounds * CLIENTS)
    name = f"{partition.replace(':', '')}-{strategy}"
    spec = FederationSpec(recipe=absolute_paths(recipe), clients=CLIENTS, rounds=setup.rounds, partition=partition,
                          strategy=strategy, mu=MU, local_steps=local, out=str(out / name))
    start = time.perf_counter()
    simulate(spec, fresh=True)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    reached = [r["round"] for r in rows if r["round"] > 0 and r["accuracy"] >= TARGET * central]
    return {"partition": partition, "strategy": strategy, "local_steps": local, "seconds": seconds,
            "final_accuracy": rows[-1]["accuracy"], "rounds_to_95": reached[0] if reached else None,
            "curve": [round(r["accuracy"], 4) for r in rows]}


def table(task: str, result: dict[str, Any]) -> str:
    central = result["central"]["accuracy"]
    lines = [f"| {task} | centralised ({result['central']['steps']} steps) | - | {central:.3f} | - |"]
    for row in result["federated"]:
        reached = row["rounds_to_95"] if row["rounds_to_95"] is not None else f"> {len(row['curve']) - 1}"
        lines.append(f"| {task} | {row['partition']} | {row['strategy']} | {row['final_accuracy']:.3f} | {reached} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="all-MiniLM-L6-v2 converted to a tformer run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tasks", default="minilm,vit")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "federated.json")
    parser.add_argument("--size", action="append", default=[], metavar="TASK:STEPS:ROUNDS",
                        help="another size for a task, e.g. minilm:100:10 (local steps = STEPS / (ROUNDS x 10))")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results: dict[str, Any] = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "load_before": Path("/proc/loadavg").read_text().split()[:3], "tasks": {}}
    for task in args.tasks.split(","):
        setup = setups(args.base)[task]
        for size in args.size:
            name, steps, rounds = size.split(":")
            if name == task:
                setup = dataclasses.replace(setup, steps=int(steps), rounds=int(rounds))
        out = args.out / task
        central = centralised(setup, out)
        print(f"{task}: centralised accuracy {central['accuracy']:.4f} ({central['seconds']:.0f} s)", flush=True)
        rows = []
        for partition in PARTITIONS:
            for strategy in STRATEGIES:
                rows.append(federated(setup, out, partition, strategy, central["accuracy"]))
                print(f"{task} {partition} {strategy}: {rows[-1]}", flush=True)
        results["tasks"][task] = {"setup": setup.__dict__, "central": central, "federated": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    results["load_after"] = Path("/proc/loadavg").read_text().split()[:3]
    args.json.write_text(json.dumps(results, indent=1))
    print("| task | partition | strategy | final accuracy | rounds to 95% of centralised |")
    print("|---|---|---|---|---|")
    for task, result in results["tasks"].items():
        print(table(task, result))


if __name__ == "__main__":
    from tformer.cli.energy_command import say_at_exit

    say_at_exit("benchmarks/bench_federated.py")  # one line with its energy and CO2e at exit
    main()
