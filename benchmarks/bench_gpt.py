"""tformer GPT vs Hugging Face GPT2LMHeadModel of the same config, side by side in one run.

Measures, per implementation: training tokens/s (forward + backward + AdamW step) and peak
memory, and greedy decode ms/token at batch 1 (HF with its dynamic and static caches).
Each measurement runs in a fresh subprocess so peak memory is its own.

    python benchmarks/bench_gpt.py --preset gpt2-small --batch 4 --seq 256        # CPU
    python benchmarks/bench_gpt.py --preset gpt2-small --batch 16 --seq 1024 \\
        --dtype bfloat16 --compile                                                  # GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch

from tformer.inference import generate
from tformer.models import get_config
from tformer.models.gpt import GPT

CASES = ["tformer-train", "hf-train", "tformer-decode", "hf-decode-dynamic", "hf-decode-static"]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(impl: str, args: argparse.Namespace) -> torch.nn.Module:
    config = get_config(args.preset, context_length=max(args.seq, args.prompt + args.new_tokens + 1))
    torch.manual_seed(0)
    if impl == "tformer":
        model = GPT(config)
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_config = GPT2Config(vocab_size=config.vocab_size, n_positions=config.context_length,
                               n_embd=config.d_model, n_layer=config.n_layers, n_head=config.n_heads,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel._from_config(hf_config, attn_implementation="sdpa")
    return model.to(args.device, dtype=getattr(torch, args.dtype))


def train_case(impl: str, args: argparse.Namespace) -> dict:
    model = build(impl, args).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.fused or args.device == "cuda")
    step_model = torch.compile(model) if args.compile else model
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq + 1), device=args.device)

    def step() -> None:
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.autocast):
            logits = step_model(ids[:, :-1])
            logits = logits if isinstance(logits, torch.Tensor) else logits.logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(args.device)
    seconds = time.perf_counter() - start
    tokens_per_s = args.batch * args.seq * args.steps / seconds
    params = sum(p.numel() for p in model.parameters())
    cfg = model.config  # nanoGPT/PaLM accounting: 6N per token, plus attention's 12 * layers * d * T
    d, layers = getattr(cfg, "d_model", getattr(cfg, "n_embd", 0)), getattr(cfg, "n_layers", getattr(cfg, "n_layer", 0))
    flops_per_token = 6 * params + 12 * layers * d * args.seq
    return {"tokens_per_s": tokens_per_s, "tflops": flops_per_token * tokens_per_s / 1e12}


def decode_case(impl: str, cache: str | None, args: argparse.Namespace) -> dict:
    model = build(impl, args).eval()
    prompt = torch.randint(0, 1000, (1, args.prompt), device=args.device)

    def run(n: int) -> float:
        sync(args.device)
        start = time.perf_counter()
        with torch.inference_mode():
            if impl == "tformer":
                generate(model, prompt, n)
            else:
                model.generation_config.eos_token_id = None
                model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                               cache_implementation=cache)
        sync(args.device)
        return time.perf_counter() - start

    if impl == "tformer" and args.compile:
        model.forward = torch.compile(model.forward, fullgraph=True)
    for _ in range(2):  # warm-up (and compilation)
        run(args.new_tokens + 1)
    n = args.new_tokens
    long = min(run(n + 1) for _ in range(args.repeats))
    short = min(run(1) for _ in range(args.repeats))
    return {"ms_per_token": 1000 * (long - short) / n}  # prefill cost cancels out


def run_case(case: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    baseline = rss_mib()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    impl = case.split("-")[0]
    if case.endswith("train"):
        result = train_case(impl, args)
    else:
        cache = {"dynamic": None, "static": "static"}.get(case.split("-")[-1])
        result = decode_case(impl, cache, args)
    if args.device == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is KiB on Linux: peak resident memory above what the imports took
        result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--autocast", action="store_true", help="train under bf16 autocast (fp32 weights)")
    parser.add_argument("--fused", action="store_true", help="fused AdamW on CPU too (both implementations)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak "
                        "(H100/H200 SXM: 989) to print model FLOPs utilisation")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.only:
        print(json.dumps(run_case(args.only, args)))
        return
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"# {args.preset} batch={args.batch} seq={args.seq} dtype={args.dtype} autocast={args.autocast} "
          f"fused={args.fused} compile={args.compile} "
          f"device={device} threads={args.threads} torch={torch.__version__}")
    print(f"{'case':<20} {'tokens/s':>10} {'ms/token':>9} {'peak MiB':>9} {'TFLOP/s':>8} {'MFU':>6}")
    for case in args.cases.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--only", case]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{case:<20} failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        tps = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else "-"
        ms = f"{r['ms_per_token']:.2f}" if "ms_per_token" in r else "-"
        tflops = f"{r['tflops']:.1f}" if "tflops" in r else "-"
        mfu = f"{r['tflops'] / args.peak_tflops:.0%}" if "tflops" in r and args.peak_tflops else "-"
        print(f"{case:<20} {tps:>10} {ms:>9} {r['peak_mib']:>9.0f} {tflops:>8} {mfu:>6}", flush=True)


if __name__ == "__main__":
    from tformer.cli.energy_command import say_at_exit

    say_at_exit("benchmarks/bench_gpt.py")  # one line with its energy and CO2e at exit
    main()
