"""Activation checkpointing (`training.activation_checkpointing`): activation memory and step time
with and without it, for GPT-2 small and ViT-S/16 (issue 16: activation memory at least halved for
<= 35% more step time).

A step is forward + backward + the Trainer's AdamW step (`training.optim.build_optimizer`), fp32.
Each case runs in a fresh subprocess. Activation memory = the peak resident memory during the
steps (VmHWM, its high-water mark reset after set-up through /proc/self/clear_refs) minus the
resident memory after set-up, when parameters, gradients and AdamW's two moments are all
allocated; the gradients stay allocated between steps (zeroed in place), so the peak above that
is what the forward and backward passes hold. glibc's allocator is left at its defaults (large
blocks are unmapped when freed, so RSS follows live memory); `--malloc keep` measures with the
CLI's `cpu.keep_freed_memory` instead, where a freed block stays resident for reuse. Step time:
the median of --steps steps after --warmup. The block inputs kept by the checkpointed blocks, the
embeddings and the head (GPT-2's 50257-way logits and their gradient) still count.

    flock /tmp/bench.lock python benchmarks/bench_checkpointing.py              # CPU, both models
    python benchmarks/bench_checkpointing.py --cases gpt2-small --settings off,on,2 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from tformer import cpu
from tformer.models import build_model, get_config
from tformer.training.checkpointing import apply_activation_checkpointing, blocks_of
from tformer.training.memory_plan import status_bytes
from tformer.training.optim import build_optimizer
from tformer.training.tasks.causal_lm import takes_targets

CASES = {  # name -> (preset, default batch)
    "gpt2-small": ("gpt2-small", 4),
    "vit-s/16": ("vit-s/16", 16),
}


def status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB (NaN where /proc cannot tell)."""
    found = status_bytes(field)
    return float("nan") if found is None else found / 2**20


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_step(model: torch.nn.Module, preset: str, batch: int, args: argparse.Namespace, checkpointed: bool):
    """The step function and a description of its inputs."""
    g = torch.Generator().manual_seed(0)
    if get_config(preset).__class__.__name__ == "ViTConfig":
        c = model.config
        images = torch.randn(batch, c.channels, c.image_size, c.image_size, generator=g).to(args.device)
        labels = torch.randint(0, c.n_classes, (batch,), generator=g).to(args.device)
        return (lambda: F.cross_entropy(model(images), labels)), f"{batch}x{c.channels}x{c.image_size}x{c.image_size}"
    ids = torch.randint(0, model.config.vocab_size, (batch, args.seq + 1), generator=g).to(args.device)
    x, y = ids[:, :-1], ids[:, 1:]
    if checkpointed and takes_targets(model):  # as the causal_lm task does: the loss chunked in the model
        return (lambda: model(x, targets=y)), f"{batch}x{args.seq}"
    return (lambda: F.cross_entropy(model(x).flatten(0, 1), y.flatten())), f"{batch}x{args.seq}"


def run_case(case: str, setting: str, args: argparse.Namespace) -> dict:
    """One model and one setting in this (fresh) process."""
    torch.set_num_threads(args.threads)
    preset, default_batch = CASES[case]
    batch = args.batch or default_batch
    overrides = {"context_length": max(args.seq, 1024)} if case.startswith("gpt") else {}
    torch.manual_seed(0)
    model = build_model(preset, **overrides).to(args.device).train()
    every = {"off": False, "on": True}[setting] if setting in ("off", "on") else int(setting)
    apply_activation_checkpointing(model, every)
    optimizer = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95))
    loss_fn, shape = make_step(model, preset, batch, args, checkpointed=bool(every))
    # set-up: parameters, gradients and AdamW's moments all allocated (a step at lr 0 creates them)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group in optimizer.param_groups:
        group["lr"] = 1e-4
    sync(args.device)
    if args.device == "cuda":
        static = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        static = status_mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM (the peak) to the current RSS
            f.write("5")

    def step() -> float:
        sync(args.device)
        start = time.perf_counter()
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: part of the static memory
        sync(args.device)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else status_mib("VmHWM"))
    blocks = blocks_of(model)
    checkpointed = sum(block.checkpointed for block in blocks)
    return {"shape": shape, "static_mib": static, "peak_mib": peak, "activation_mib": peak - static,
            "step_s": statistics.median(times), "times": times, "blocks": f"{checkpointed}/{len(blocks)}"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    parser.add_argument("--settings", default="off,on", help="off, on, or N (every N-th block)")
    parser.add_argument("--batch", type=int, default=None, help="default: gpt2-small 4, vit-s/16 16")
    parser.add_argument("--seq", type=int, default=256, help="GPT tokens per sequence")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--malloc", choices=("default", "keep"), default="default",
                        help="glibc as is, or cpu.keep_freed_memory as the CLI sets it")
    parser.add_argument("--only", nargs=2, help=argparse.SUPPRESS)  # internal: CASE SETTING, print JSON
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.only:
        if args.malloc == "keep":
            cpu.keep_freed_memory()  # glibc keeps freed blocks < 256 MiB resident, as under the CLI
        print(json.dumps(run_case(*args.only, args)))
        return
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"# fp32 device={device} threads={args.threads} torch={torch.__version__} "
          f"steps={args.steps} warmup={args.warmup} malloc={args.malloc}")
    print(f"{'model':<11} {'input':<16} {'ckpt':>4} {'blocks':>6} {'static MiB':>10} {'act. MiB':>9} "
          f"{'s/step':>7} {'act. x':>7} {'time x':>7}")
    for case in args.cases.split(","):
        base = None
        for setting in args.settings.split(","):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--only", case, setting]
            out = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if out.returncode:
                print(f"{case:<11} {setting:>4} failed: {out.stderr.strip().splitlines()[-1]}", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            base = base or r
            print(f"{case:<11} {r['shape']:<16} {setting:>4} {r['blocks']:>6} {r['static_mib']:>10.0f} "
                  f"{r['activation_mib']:>9.0f} {r['step_s']:>7.2f} "
                  f"{r['activation_mib'] / base['activation_mib']:>7.2f} {r['step_s'] / base['step_s']:>7.2f}"
                  f"   steps: {' '.join(f'{t:.2f}' for t in r['times'])}", flush=True)


if __name__ == "__main__":
    from tformer.cli.energy_command import say_at_exit

    say_at_exit("benchmarks/bench_checkpointing.py")  # one line with its energy and CO2e at exit
    main()
