"""Encoding speed of tformer's BPE against tiktoken loaded with the same merges (MB/s, best of 3).

    python benchmarks/bench_tokenizer.py [TEXT]   # default TEXT: $TFORMER_DATA_DIR/text/shakespeare.txt

Trains a 4096-token byte-level BPE on the text, then encodes the whole text (a) as one string and
(b) as a batch of paragraphs, with 1 and 2 threads, and checks that every engine gives the same ids.
HF tokenizers sizes its thread pool once per process from RAYON_NUM_THREADS, so the HF-engine rows
run in a child process per thread count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from tformer.tokenizers import BPETokenizer
from tformer.tokenizers.bpe import BYTE_OF_CHAR, GPT2_PATTERN

REPEATS = 3


def best_of(fn: Callable[[], list], repeats: int = REPEATS) -> tuple[float, list]:
    """Fastest wall time of `repeats` calls, and the last result."""
    best, out = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def ids_digest(ids: list) -> str:
    """Short hash of ids (a flat list or a list of lists), to compare results across processes."""
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:12]


def paragraphs(text: str) -> list[str]:
    """The text cut after each blank line; joined back they give the text exactly."""
    parts = text.split("\n\n")
    return [p + "\n\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def tiktoken_from(tok: BPETokenizer):
    """A plain tiktoken.Encoding built from the tokenizer's saved merges, independent of our engine."""
    import tiktoken

    inner = tok.to_dict()["tokenizer"]
    special = {t["content"]: t["id"] for t in inner["added_tokens"]}
    vocab = inner["model"]["vocab"]
    ranks = {bytes(BYTE_OF_CHAR[c] for c in t): i for t, i in vocab.items() if t not in special}
    return tiktoken.Encoding("bench", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)


def hf_worker(tokenizer_path: str, text_path: str, threads: int) -> None:
    """Child process: time the HF engine under RAYON_NUM_THREADS=threads; print one JSON line."""
    tok = BPETokenizer.load(tokenizer_path, engine="hf")
    text = Path(text_path).read_text(encoding="utf-8")
    batch = paragraphs(text)
    seconds, ids = best_of(lambda: tok.encode_batch(batch, num_threads=threads))
    row = {"batch_s": seconds, "batch_digest": ids_digest(ids)}
    if threads == 1:  # a single string runs on one thread whatever the pool size
        seconds, ids = best_of(lambda: tok.encode(text))
        row |= {"whole_s": seconds, "whole_digest": ids_digest(ids)}
    print(json.dumps(row))


def run_hf_worker(tokenizer_path: str, text_path: str, threads: int) -> dict:
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true"}
    cmd = [sys.executable, __file__, "--hf-worker", tokenizer_path, text_path, str(threads)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(tok: BPETokenizer, text: str, tokenizer_path: str, text_path: str) -> list[tuple]:
    """Rows of (what, threads, seconds, ids digest)."""
    enc, batch, rows = tiktoken_from(tok), paragraphs(text), []
    for threads in (1, 2):
        if threads == 1:
            rows.append(("whole text: tformer BPE (tiktoken engine)", 1, *timed(lambda: tok.encode(text))))
            rows.append(("whole text: tiktoken encode_ordinary", 1,
                         *timed(lambda: enc.encode_ordinary(text))))
        rows.append(("paragraphs: tformer BPE encode_batch (tiktoken engine)", threads,
                     *timed(lambda: tok.encode_batch(batch, num_threads=threads))))
        rows.append(("paragraphs: tiktoken encode_ordinary_batch", threads,
                     *timed(lambda: enc.encode_ordinary_batch(batch, num_threads=threads))))
        hf = run_hf_worker(tokenizer_path, text_path, threads)
        if threads == 1:
            rows.append(("whole text: tformer BPE (HF engine)", 1, hf["whole_s"], hf["whole_digest"]))
        rows.append(("paragraphs: tformer BPE encode_batch (HF engine)", threads, hf["batch_s"],
                     hf["batch_digest"]))
    return rows


def timed(fn: Callable[[], list]) -> tuple[float, str]:
    seconds, ids = best_of(fn)
    return seconds, ids_digest(ids)


def report(rows: list[tuple], megabytes: float, paragraph_count: int) -> bool:
    """Print the table; True when every row of the same input gave the same ids."""
    print(f"\n{'input / encoder':58s} {'threads':>7s} {'MB/s':>8s}  ids")
    digests: dict[str, set[str]] = {}
    for what, threads, seconds, digest in sorted(rows, key=lambda r: (r[0].split(":")[0], r[1], r[0])):
        digests.setdefault(what.split(":")[0], set()).add(digest)
        print(f"{what:58s} {threads:7d} {megabytes / seconds:8.2f}  {digest}")
    same = all(len(d) == 1 for d in digests.values())
    print(f"\n{megabytes:.2f} MB of text, {paragraph_count} paragraphs; best of {REPEATS}; "
          f"ids identical across encoders: {'yes' if same else 'NO'}")
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", nargs="?", help="text file (default: $TFORMER_DATA_DIR/text/shakespeare.txt)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--hf-worker", nargs=3, metavar=("TOKENIZER", "TEXT", "THREADS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_worker:
        hf_worker(args.hf_worker[0], args.hf_worker[1], int(args.hf_worker[2]))
        return 0
    root = os.environ.get("TFORMER_DATA_DIR")
    if not args.text and not root:
        parser.error("give a text file or set TFORMER_DATA_DIR")
    text_path = args.text or str(Path(root) / "text" / "shakespeare.txt")
    text = Path(text_path).read_text(encoding="utf-8")
    print(f"CPUs: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")
    start = time.perf_counter()
    tok = BPETokenizer.train(text_path, args.vocab_size)
    print(f"trained {tok.vocab_size}-token BPE in {time.perf_counter() - start:.1f} s; engine: {tok.engine}")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_path = str(Path(tmp) / "bpe.json")
        tok.save(tokenizer_path)
        rows = measure(tok, text, tokenizer_path, text_path)
    same = report(rows, len(text.encode("utf-8")) / 1e6, len(paragraphs(text)))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0 if same else 1


if __name__ == "__main__":
    from tformer.cli.energy_command import say_at_exit

    say_at_exit("benchmarks/bench_tokenizer.py")  # one line with its energy and CO2e at exit
    sys.exit(main())
