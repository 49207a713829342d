"""DDP vs FSDP2 (`training.strategy`) at 2 processes on CPU (gloo): peak resident memory of each
rank and step time, for a GPT (issue 16: DDP vs FSDP2 memory per process at 2 processes).

Each case is a fresh `torchrun --nproc_per_node 2` of this file (`--worker`), the strategies
alternating, `--rounds` times. A worker builds the model and a `Trainer` exactly as a run does
(`training.distributed.wrap`, then AdamW), and calls `Trainer.train_step` (forward, backward,
gradient sync, clipping, AdamW) on random tokens: `--warmup` steps, then VmHWM is reset through
/proc/self/clear_refs and `--steps` steps are timed. Peak = VmHWM after them (everything the
process holds: weights or shards, gradients, AdamW state, DDP's buckets, FSDP2's gathered blocks,
activations, libraries); "after set-up" = VmRSS before the first step (no optimizer state yet).
fp32, one intra-op thread per process (torchrun's OMP_NUM_THREADS=1).

Resident memory depends on glibc's allocator, and FSDP2 frees and reallocates every block's
gathered parameters (28 MiB for a GPT-2-small block) twice a step: `--malloc live`
(MALLOC_MMAP_THRESHOLD_=1 MiB: blocks of 1 MiB and more go back to the kernel when freed, RSS
follows live memory); `default` (glibc's dynamic threshold rises to 32 MiB after the first frees,
so freed blocks below it stay resident and the peak grows step by step); `keep` (what the CLI
sets, `cpu.keep_freed_memory`: freed blocks stay resident for reuse).

    flock /tmp/bench.lock python benchmarks/bench_fsdp.py                       # gpt2-small
    flock /tmp/bench.lock python benchmarks/bench_fsdp.py --malloc default
    python benchmarks/bench_fsdp.py --preset gpt-mini --batch 8 --context 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tformer import cpu
from tformer.models import build_model
from tformer.training import CausalLMTask, TrainConfig, Trainer, distributed
from tformer.training.memory_plan import status_bytes

STRATEGIES = ("ddp", "fsdp2")


def status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB (NaN where /proc cannot tell)."""
    found = status_bytes(field)
    return float("nan") if found is None else found / 2**20


def worker(args: argparse.Namespace) -> None:
    """One rank: build, train `warmup + steps` steps, gather every rank's numbers to rank 0."""
    if args.malloc == "keep":
        cpu.keep_freed_memory()
    world = distributed.setup("cpu", args.strategy)
    torch.manual_seed(0)
    model = build_model(args.preset, context_length=args.context)
    vocab = model.config.vocab_size
    tokens = np.random.default_rng(0).integers(0, vocab, 200_000).astype(np.int64)
    task = CausalLMTask(tokens[:190_000], tokens[190_000:], context=args.context, batch_size=args.batch,
                        seed=0, n_eval_batches=1, fused_loss=True)
    config = TrainConfig(max_steps=args.warmup + args.steps + 1, batch_size=args.batch, lr=1e-4,
                         warmup_steps=1, precision="fp32", device="cpu", strategy=args.strategy)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(model, task, config, run_dir, world=world)
        after_setup = status_mib("VmRSS")
        for _ in range(args.warmup):
            trainer.train_step()
            trainer.step += 1
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        times = []
        for _ in range(args.steps):
            distributed.barrier(world)
            start = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - start)
            trainer.step += 1
        mine = {"rank": world.rank, "after_setup_mib": after_setup, "peak_mib": status_mib("VmHWM"),
                "step_s": times, "threads": torch.get_num_threads(),
                "n_parameters": sum(p.numel() for p in model.parameters())}
    ranks: list = [None] * world.size
    dist.all_gather_object(ranks, mine)
    if world.is_main:
        Path(args.out).write_text(json.dumps(ranks))
    distributed.teardown(world)


def run_case(args: argparse.Namespace, strategy: str, port: int) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(port), __file__, "--worker", "--strategy", strategy, "--out", out.name,
               "--preset", args.preset, "--batch", str(args.batch), "--context", str(args.context),
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--malloc", args.malloc]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        if args.malloc == "live":
            env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise SystemExit(f"{strategy} failed:\n{proc.stderr[-3000:]}")
        return json.loads(Path(out.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step, both processes together")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--malloc", choices=("live", "default", "keep"), default="live",
                        help="glibc allocator setting (see the module docstring)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", choices=STRATEGIES, default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"{args.preset}, {args.batch} x {args.context} tokens per step over 2 processes, fp32, "
          f"malloc {args.malloc}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}; "
          f"load {os.getloadavg()[0]:.1f}")
    results: dict[str, list[list[dict]]] = {s: [] for s in STRATEGIES}
    for round_ in range(args.rounds):
        for strategy in STRATEGIES if round_ % 2 == 0 else STRATEGIES[::-1]:
            ranks = run_case(args, strategy, 29700 + 2 * round_ + STRATEGIES.index(strategy))
            results[strategy].append(ranks)
            steps = [t for r in ranks for t in r["step_s"]]
            peaks = " / ".join(f"{r['peak_mib']:.0f}" for r in ranks)
            setups = " / ".join(f"{r['after_setup_mib']:.0f}" for r in ranks)
            print(f"round {round_ + 1} {strategy:5s}: peak MiB per rank {peaks}, after set-up {setups}; "
                  f"s/step median {statistics.median(steps):.2f} ({min(steps):.2f}-{max(steps):.2f}); "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    peak = {s: max(r["peak_mib"] for rounds in results[s] for r in rounds) for s in STRATEGIES}
    step = {s: statistics.median(t for rounds in results[s] for r in rounds for t in r["step_s"]) for s in STRATEGIES}
    print(f"largest peak per process: ddp {peak['ddp']:.0f} MiB, fsdp2 {peak['fsdp2']:.0f} MiB "
          f"({peak['fsdp2'] / peak['ddp']:.2f}x); median s/step: ddp {step['ddp']:.2f}, fsdp2 "
          f"{step['fsdp2']:.2f} ({step['fsdp2'] / step['ddp']:.2f}x)")


if __name__ == "__main__":
    from tformer.cli.energy_command import say_at_exit

    say_at_exit("benchmarks/bench_fsdp.py")  # one line with its energy and CO2e at exit
    main()
