"""Sparse attention patterns: (1) attention time and peak memory, dense causal vs sliding window,
at 1k-16k tokens; (2) a GPT trained on Shakespeare with a sliding window vs dense causal.

    python benchmarks/bench_sparse.py attention                                     # CPU
    python benchmarks/bench_sparse.py attention --device cuda --dtype bfloat16 --batch 4 --heads 16
    TFORMER_DATA_DIR=../shared/data python benchmarks/bench_sparse.py train         # a few minutes

What runs where (PyTorch 2.13): on CPU FlexAttention has a forward pass only, so the CPU table
times forward + backward of the paths that train (dense causal SDPA; SDPA with the window as a
dense boolean mask, which is tformer's CPU fallback for flex with gradients) and, separately,
forward only for compiled flex with the window's BlockMask. On CUDA every case is forward +
backward. Peak memory: CPU = peak resident memory of the step above the resident memory before
it (the kernel's high-water mark is reset per step); CUDA = torch.cuda.max_memory_allocated above
the memory allocated before the step. Results are logged to stdout as Markdown tables.
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from tformer.nn import masks
from tformer.nn.attend import flex_attend, sdpa_attend

log = logging.getLogger("bench_sparse")


def rss_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(step: Callable[[], None], device: str, repeats: int) -> tuple[float, float]:
    """(best seconds of `repeats` calls, largest peak MiB of a call above the memory before it)."""
    step()  # warm-up: compilation, block-mask creation, allocator
    sync(device)
    best, peak = math.inf, 0.0
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 2**20
        else:
            before = rss_mib()
            with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS high-water mark
                f.write("5")
        start = time.perf_counter()
        step()
        sync(device)
        best = min(best, time.perf_counter() - start)
        after = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else rss_mib("VmHWM")
        peak = max(peak, after - before)
    return best, peak


def return_freed_memory_to_the_os() -> None:
    """glibc keeps freed large blocks resident once its mmap threshold has grown, which hides
    a step's allocations from the peak-RSS reading; a fixed threshold returns them at free."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB (setting it disables the dynamic threshold)
    libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD


def attention_step(backend: str, mask: masks.Mask, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   backward: bool) -> Callable[[], None]:
    attend = flex_attend if backend == "flex" else sdpa_attend

    def step() -> None:
        if backward:
            for t in (q, k, v):
                t.grad = None
            attend(q, k, v, mask).sum().backward()
        else:
            with torch.no_grad():
                attend(q, k, v, mask)

    return step


def attention_cases(device: str, windows: list[int]) -> list[tuple[str, str, str, bool]]:
    """(case name, backend, mask name, backward)."""
    cases = [("dense causal, SDPA", "sdpa", "causal", True)]
    if device == "cpu":  # the dense-mask path scores all T² pairs: its cost does not depend on w
        cases += [(f"window {windows[0]}, SDPA + dense mask", "sdpa", str(windows[0]), True)]
        cases += [("dense causal, SDPA (forward only)", "sdpa", "causal", False)]
        cases += [(f"window {w}, flex (forward only)", "flex", str(w), False) for w in windows]
    else:
        cases += [("dense causal, flex", "flex", "causal", True)]
        cases += [(f"window {w}, flex", "flex", str(w), True) for w in windows]
    return cases


def run_attention(args: argparse.Namespace) -> None:
    import torch._dynamo

    # flex compiles once per (shape, mask); past dynamo's default limit of 8 it would silently run
    # the uncompiled (dense, O(T²) memory) flex_attention instead of the kernel being measured
    torch._dynamo.config.recompile_limit = 64
    dtype = getattr(torch, args.dtype)
    if args.device == "cpu":
        return_freed_memory_to_the_os()
    log.info("| tokens | case | ms | peak MiB | block mask ms (built once) |")
    log.info("|---:|---|---:|---:|---:|")
    for length in args.lengths:
        for name, backend, mask_name, backward in attention_cases(args.device, args.windows):
            mask = masks.causal() if mask_name == "causal" else masks.sliding_window(int(mask_name))
            g = torch.Generator(device=args.device).manual_seed(0)
            q, k, v = (torch.randn(args.batch, args.heads, length, args.head_dim, generator=g,
                                   device=args.device, dtype=dtype).requires_grad_(backward)
                       for _ in range(3))
            build_ms = float("nan")
            if backend == "flex":
                start = time.perf_counter()
                mask.block_mask(args.batch, args.heads, length, length, device=args.device)
                sync(args.device)
                build_ms = (time.perf_counter() - start) * 1e3
            repeats = args.repeats if length <= 4096 else 1
            seconds, peak = measure(attention_step(backend, mask, q, k, v, backward), args.device, repeats)
            built = "" if math.isnan(build_ms) else f"{build_ms:.0f}"
            log.info("| %d | %s | %.1f | %.0f | %s |", length, name, seconds * 1e3, peak, built)
            del q, k, v


def shakespeare_tokens() -> tuple[np.ndarray, np.ndarray, int]:
    from tformer.data.text import load_text
    from tformer.tokenizers.chars import CharTokenizer

    text = load_text("shakespeare")
    tokenizer = CharTokenizer.train(text)
    tokens = np.asarray(tokenizer.encode(text), dtype=np.int64)
    cut = int(0.9 * len(tokens))
    return tokens[:cut], tokens[cut:], tokenizer.vocab_size


def train_one(pattern: str, params: dict | None, args: argparse.Namespace,
              data: tuple[np.ndarray, np.ndarray, int]) -> dict:
    """Train a small GPT for args.steps steps; return validation loss, tokens/s and wall time."""
    from tformer.data.text import causal_lm_batch, eval_batches
    from tformer.models.gpt import GPT, GPTConfig
    from tformer.training.optim import build_optimizer, learning_rate

    train, val, vocab = data
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=vocab, context_length=args.context, n_layers=4, n_heads=4, d_model=128,
                       attn_pattern=pattern, attn_pattern_params=params)
    model = GPT(config)
    optimizer = build_optimizer(model, args.lr, 0.1, (0.9, 0.99))
    start = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, lr=args.lr, min_lr=args.lr / 10, warmup_steps=20,
                                        max_steps=args.steps, schedule="cosine")
        x, y = causal_lm_batch(train, args.batch, args.context, step, seed=0)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0:
            log.info("%s step %d loss %.3f", pattern, step, loss.item())
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                  for x, y in eval_batches(val, args.batch, args.context, args.eval_batches, seed=0)]
    return {"val_loss": sum(losses) / len(losses), "train_loss": loss.item(), "seconds": seconds,
            "tokens_per_s": args.steps * args.batch * args.context / seconds}


def attention_fraction(window: int | None, context: int) -> float:
    """Query-key pairs scored by a causal window relative to dense causal attention."""
    dense = context * (context + 1) / 2
    if window is None:
        return 1.0
    return sum(min(i + 1, window) for i in range(context)) / dense


def run_train(args: argparse.Namespace) -> None:
    data = shakespeare_tokens()
    runs = [("causal", None, None)] + [("sliding_window", {"window": w}, w) for w in args.windows]
    log.info("| attention | query-key pairs vs dense | val loss | final train loss | tokens/s | wall s |")
    log.info("|---|---:|---:|---:|---:|---:|")
    for pattern, params, window in runs:
        result = train_one(pattern, params, args, data)
        label = "dense causal" if window is None else f"sliding window {window}"
        log.info("| %s | %.2f | %.3f | %.3f | %.0f | %.0f |", label, attention_fraction(window, args.context),
                 result["val_loss"], result["train_loss"], result["tokens_per_s"], result["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    attn = sub.add_parser("attention", help="attention time and memory at 1k-16k tokens")
    attn.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    attn.add_argument("--dtype", default="float32")
    attn.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    attn.add_argument("--windows", type=int, nargs="+", default=[256, 1024])
    attn.add_argument("--batch", type=int, default=1)
    attn.add_argument("--heads", type=int, default=4)
    attn.add_argument("--head-dim", type=int, default=64)
    attn.add_argument("--repeats", type=int, default=3, help="best of; 1 above 4096 tokens")
    train = sub.add_parser("train", help="GPT on Shakespeare: sliding window vs dense causal")
    train.add_argument("--context", type=int, default=512)
    train.add_argument("--windows", type=int, nargs="+", default=[64])
    train.add_argument("--steps", type=int, default=150)
    train.add_argument("--batch", type=int, default=4)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--eval-batches", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    log.info("torch %s, %s, %d threads, %s", torch.__version__, platform.processor() or platform.machine(),
             torch.get_num_threads(), args.device if args.command == "attention" else "cpu")
    run_attention(args) if args.command == "attention" else run_train(args)


if __name__ == "__main__":
    from tformer.cli.energy_command import say_at_exit

    say_at_exit("benchmarks/bench_sparse.py")  # one line with its energy and CO2e at exit
    main()
