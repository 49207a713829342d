"""Training-step throughput of tformer vs nanoGPT at nanoGPT's CPU "baby GPT" config.

4 layers x 4 heads x 128 dims, context 64, batch 12, no dropout, no biases, character vocab,
AdamW lr 1e-3 betas (0.9, 0.99) weight decay 0.1, gradient clipping at 1.0, on Shakespeare.

- tformer: the path a user runs. The shipped recipe `gpt-shakespeare-char` is loaded and
  prepared (`load_recipe`, `prepare`) and `Trainer.train_step()` is timed, so the Trainer's
  per-step host work (batch sampling, lr schedule, clipping, finite checks) is included.
- nanoGPT: model.py from a copy outside this repository (`--nanogpt-dir`, default /tmp/nanogpt;
  e.g. `git --git-dir=<nanoGPT git dir> show HEAD:model.py > /tmp/nanogpt/model.py`), with
  its own `configure_optimizers`, and the step of its train.py on a CPU: get_batch (random
  windows), lr schedule, forward + loss, backward, clip_grad_norm_, optimizer.step,
  zero_grad(set_to_none=True). Same text, encoded with a char map of its own (same vocab size).

Each case (implementation x thread count) runs in a fresh subprocess; rounds alternate the
implementations, and the report gives the median and range of tokens/s per case and of the
per-round ratio tformer / nanoGPT.

    TFORMER_DATA_DIR=... python benchmarks/bench_baby_gpt.py                  # threads 1,2; eager
    TFORMER_DATA_DIR=... python benchmarks/bench_baby_gpt.py --compile --rounds 3
    TFORMER_DATA_DIR=... python benchmarks/bench_baby_gpt.py --extra-set training.precision=bf16
    TFORMER_DATA_DIR=... python benchmarks/bench_baby_gpt.py --profile        # top ops, one step each
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

IMPLS = ("tformer", "nanogpt")
RECIPE = "gpt-shakespeare-char"
# nanoGPT's config/train_shakespeare_char.py with the README's CPU overrides
N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = 4, 4, 128, 64, 12
LR, MIN_LR, WARMUP, MAX_ITERS, BETAS, WEIGHT_DECAY, GRAD_CLIP = 1e-3, 1e-4, 100, 2000, (0.9, 0.99), 0.1, 1.0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# -- the two steps ------------------------------------------------------------------------------
def tformer_setup(args: argparse.Namespace):
    from tformer.cli.arguments import recipe_path
    from tformer.training.recipe import load_recipe, prepare
    from tformer.training.trainer import Trainer

    overrides = ["training.compile=true"] if args.compile else []
    overrides += args.extra_set
    recipe = load_recipe(recipe_path(RECIPE), overrides)
    prepared = prepare(recipe)
    run_dir = tempfile.mkdtemp(prefix="bench_baby_gpt_")
    trainer = Trainer(prepared.model, prepared.task, recipe.training, run_dir, run_config=prepared.record)
    trainer.model.train()
    cfg = recipe.training
    assert (cfg.batch_size, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay, cfg.grad_clip) == \
        (BATCH, LR, BETAS, WEIGHT_DECAY, GRAD_CLIP), cfg
    info = {"vocab": prepared.model.config.vocab_size,
            "params": sum(p.numel() for p in prepared.model.parameters())}

    def step() -> float:
        loss, _ = trainer.train_step()
        trainer.step += 1
        return loss

    return step, cfg.batch_size * prepared.model.config.context_length, info


def nanogpt_setup(args: argparse.Namespace):
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(args.nanogpt_dir).expanduser()))
    from model import GPT, GPTConfig  # nanoGPT's model.py

    from tformer.data.text import load_text

    text = load_text("shakespeare")  # the same text the tformer recipe trains on
    chars = sorted(set(text))
    table = np.zeros(max(map(ord, chars)) + 1, dtype=np.uint16)
    table[[ord(c) for c in chars]] = np.arange(len(chars), dtype=np.uint16)
    data = table[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]
    train_data = data[:int(len(data) * 0.9)]

    torch.manual_seed(1337)
    config = GPTConfig(block_size=BLOCK, vocab_size=len(chars), n_layer=N_LAYER, n_head=N_HEAD,
                       n_embd=N_EMBD, dropout=0.0, bias=False)
    model = GPT(config)
    model.train()
    optimizer = model.configure_optimizers(WEIGHT_DECAY, LR, BETAS, "cpu")
    train_model = torch.compile(model) if args.compile else model
    ctx = nullcontext()  # train.py on a CPU: no autocast
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # train.py: enabled only for float16
    state = {"iter": 0}
    info = {"vocab": len(chars), "params": sum(p.numel() for p in model.parameters())}

    def get_batch():  # train.py's get_batch, from memory instead of a memmap
        ix = torch.randint(len(train_data) - BLOCK, (BATCH,))
        x = torch.stack([torch.from_numpy(train_data[i:i + BLOCK].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(train_data[i + 1:i + 1 + BLOCK].astype(np.int64)) for i in ix])
        return x, y

    def get_lr(it: int) -> float:  # train.py's schedule
        if it < WARMUP:
            return LR * (it + 1) / (WARMUP + 1)
        if it > MAX_ITERS:
            return MIN_LR
        ratio = (it - WARMUP) / (MAX_ITERS - WARMUP)
        return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)

    def step() -> float:
        lr = get_lr(state["iter"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        X, Y = get_batch()
        with ctx:
            _, loss = train_model(X, Y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state["iter"] += 1
        return loss.item()  # train.py reads it only every log_interval; one float sync on a CPU

    return step, BATCH * BLOCK, info


def run_case(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.case_threads)
    setup = tformer_setup if args.case == "tformer" else nanogpt_setup
    step, tokens_per_step, info = setup(args)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warm_s = time.perf_counter() - t0
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            wall = (time.perf_counter() - t0) / args.steps
        events = prof.key_averages()
        print(events.table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)
        rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
        ops = [{"op": e.key, "self_us": e.self_cpu_time_total / args.steps, "calls": e.count / args.steps}
               for e in rows]
        self_total = sum(e.self_cpu_time_total for e in events) / args.steps
        return {**info, "wall_ms": wall * 1e3, "ops_self_ms": self_total / 1e3,
                "n_ops": sum(e.count for e in events) / args.steps, "ops": ops}
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    seconds = time.perf_counter() - t0
    return {**info, "tokens_per_s": tokens_per_step * args.steps / seconds,
            "ms_per_step": seconds / args.steps * 1e3, "warmup_s": warm_s, "loss": loss,
            "threads": torch.get_num_threads()}


def spawn(impl: str, threads: int, args: argparse.Namespace, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--case", impl, "--case-threads", str(threads),
           "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--nanogpt-dir", args.nanogpt_dir, *extra]
    if args.compile:
        cmd.append("--compile")
    for item in args.extra_set:
        cmd += ["--extra-set", item]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(f"{impl} x {threads} threads failed:\n{out.stderr[-4000:]}")
    if args.profile:
        sys.stderr.write(f"--- {impl}, {threads} threads ---\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def header(args: argparse.Namespace) -> list[str]:
    import torch

    return [(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}; "
             f"python {platform.python_version()}"),
            (f"settings: steps {args.steps} timed after {args.warmup} warm-up, rounds {args.rounds}, "
             f"compile {args.compile}, tformer extra overrides {args.extra_set or 'none'}")]


def main_profile(args: argparse.Namespace) -> None:
    threads = args.threads[-1]
    print(*header(args), sep="\n")
    print(f"load average at start: {os.getloadavg()}")
    results = {impl: spawn(impl, threads, args, ["--profile"]) for impl in IMPLS}
    print(f"load average at end: {os.getloadavg()}")
    for impl, r in results.items():
        print(f"\n{impl}, {threads} threads, per step: wall {r['wall_ms']:.2f} ms, sum of op self CPU "
              f"{r['ops_self_ms']:.2f} ms, {r['n_ops']:.0f} op calls")
        print("| op | self us/step | calls/step |\n|---|---:|---:|")
        for row in r["ops"][:args.profile_rows]:
            print(f"| {row['op']} | {row['self_us']:.0f} | {row['calls']:.1f} |")
    ops = {impl: {row["op"]: row for row in r["ops"]} for impl, r in results.items()}
    none = {"self_us": 0.0, "calls": 0.0}
    names = sorted(set(ops["tformer"]) | set(ops["nanogpt"]), key=lambda k: -abs(
        ops["tformer"].get(k, none)["self_us"] - ops["nanogpt"].get(k, none)["self_us"]))
    print("\nlargest differences, self CPU us/step (calls/step):\n"
          "| op | tformer | nanoGPT | tformer - nanoGPT |\n|---|---:|---:|---:|")
    for name in names[:args.profile_rows]:
        a, b = ops["tformer"].get(name, none), ops["nanogpt"].get(name, none)
        print(f"| {name} | {a['self_us']:.0f} ({a['calls']:.0f}) | {b['self_us']:.0f} ({b['calls']:.0f}) | "
              f"{a['self_us'] - b['self_us']:+.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5, 10 compiled)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (both)")
    parser.add_argument("--extra-set", action="append", default=[],
                        help="a tformer recipe override, e.g. training.precision=bf16 (repeatable)")
    parser.add_argument("--nanogpt-dir", default="/tmp/nanogpt", help="folder with nanoGPT's model.py")
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler over --steps steps (default 1) per impl, last thread count")
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--json", help="write the raw per-case results here")
    parser.add_argument("--case", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--case-threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = 10 if args.compile else 5
    if args.case:
        print(json.dumps(run_case(args)))
        return
    if not (Path(args.nanogpt_dir).expanduser() / "model.py").is_file():
        sys.exit(f"no model.py in {args.nanogpt_dir}: copy nanoGPT's model.py there (see --help)")
    args.threads = [int(t) for t in args.threads.split(",")]
    if args.profile:
        if "--steps" not in sys.argv:
            args.steps = 1
        main_profile(args)
        return

    print(*header(args), sep="\n")
    print(f"load average at start: {os.getloadavg()}", flush=True)
    raw: dict[tuple[str, int], list[dict]] = {(i, t): [] for i in IMPLS for t in args.threads}
    started = time.perf_counter()
    for rnd in range(args.rounds):
        order = IMPLS if rnd % 2 == 0 else IMPLS[::-1]  # alternate which goes first
        for threads in args.threads:
            for impl in order:
                raw[impl, threads].append(spawn(impl, threads, args, []))
        line = ", ".join(f"{i}x{t} {raw[i, t][-1]['tokens_per_s']:.0f}" for t in args.threads for i in IMPLS)
        print(f"round {rnd + 1}: {line} tokens/s; load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"load average at end: {os.getloadavg()}; {time.perf_counter() - started:.0f} s")
    first = raw[IMPLS[0], args.threads[0]][0]
    second = raw[IMPLS[1], args.threads[0]][0]
    print(f"vocab tformer {first['vocab']} / nanoGPT {second['vocab']}; "
          f"params tformer {first['params']} / nanoGPT {second['params']}")
    print("\n| threads | impl | tokens/s median (range) | ms/step median | warm-up s median |")
    print("|---:|---|---:|---:|---:|")
    for t in args.threads:
        for i in IMPLS:
            rs = raw[i, t]
            print(f"| {t} | {i} | {spread([r['tokens_per_s'] for r in rs])} | "
                  f"{statistics.median(r['ms_per_step'] for r in rs):.2f} | "
                  f"{statistics.median(r['warmup_s'] for r in rs):.1f} |")
    print("\n| threads | tformer / nanoGPT per round, median (range) |")
    print("|---:|---:|")
    for t in args.threads:
        ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(raw["tformer", t], raw["nanogpt", t])]
        print(f"| {t} | {spread(ratios, '{:.3f}')} |")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{i}x{t}": v for (i, t), v in raw.items()}, indent=1))


if __name__ == "__main__":
    from tformer.cli.energy_command import say_at_exit

    say_at_exit("benchmarks/bench_baby_gpt.py")  # one line with its energy and CO2e at exit
    main()
