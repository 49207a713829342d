"""Transformer-XL on character-level Shakespeare: what the memory buys (Dai et al. 2019).

quality: two models of the same size trained for the same steps on the same consecutive
         segments, one with memory (mem_len) and one without (mem_len 0); validation loss over
         the held-out stream (its first --val-tokens), in order, at several evaluation memory
         lengths.
speed:   evaluation time per token against a vanilla Transformer that recomputes its whole
         context for every position (Al-Rfou et al. 2018 style, the paper's section 4.3), at
         several context lengths L: the vanilla model runs L tokens per prediction; Transformer-XL
         runs segments of seg_len tokens with a memory of L (every token sees >= L tokens).
         Vanilla baselines: the same network (relative attention; only the recurrence differs)
         and a GPT of the same size (absolute positions, SDPA's fused causal kernel).

    TFORMER_DATA_DIR=/work/shared/data python benchmarks/bench_transformer_xl.py quality
    python benchmarks/bench_transformer_xl.py speed --contexts 128,256,512,1024
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time

import torch

from tformer.data.text import TokenizedCorpus, load_text
from tformer.models import get_config
from tformer.models.gpt import GPT, GPTConfig
from tformer.models.transformer_xl import TransformerXL
from tformer.tokenizers import CharTokenizer
from tformer.training import TrainConfig, Trainer
from tformer.training.tasks.segment_lm import SegmentLMTask, TokenStreams, evaluate_streams

log = logging.getLogger("bench_transformer_xl")
CLOCK = time.perf_counter  # --clock cpu: time.process_time, this process's CPU seconds only


def shakespeare(cache_dir: str) -> tuple[TokenizedCorpus, CharTokenizer]:
    text = load_text("shakespeare")
    tokenizer = CharTokenizer.train([text])
    return TokenizedCorpus.from_text(text, tokenizer, cache_dir, val_fraction=0.1), tokenizer


def train_one(corpus: TokenizedCorpus, vocab: int, mem_len: int, args: argparse.Namespace,
              run_dir: str) -> tuple[TransformerXL, SegmentLMTask, float]:
    config = get_config("txl-mini", vocab_size=vocab, seg_len=args.seg_len, mem_len=mem_len,
                        dropout=0.0)
    torch.manual_seed(args.seed)
    model = TransformerXL(config)
    train = TokenStreams(corpus.train, args.batch, args.seg_len)
    val = TokenStreams(corpus.val[:args.val_tokens], args.eval_streams, args.seg_len)
    task = SegmentLMTask(train, val, mem_len=mem_len, eval_mem_len=mem_len, n_eval_batches=4,
                         refresh_every=args.steps)
    trainer_config = TrainConfig(max_steps=args.steps, batch_size=args.batch, lr=1e-3, min_lr=1e-4,
                                 warmup_steps=100, beta2=0.99, eval_every=args.steps, eval_batches=4,
                                 log_every=50, seed=args.seed, device="cpu")
    start = time.perf_counter()
    Trainer(model, task, trainer_config, run_dir).fit(resume=False)
    return model, task, time.perf_counter() - start


def quality(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        corpus, tokenizer = shakespeare(os.path.join(tmp, "tokens"))
        rows = []
        for mem_len in (args.mem_len, 0):
            model, task, seconds = train_one(corpus, tokenizer.vocab_size, mem_len, args,
                                             os.path.join(tmp, f"mem{mem_len}"))
            for eval_mem in args.eval_mem_lens:
                task.eval_mem_len, task.n_eval_batches = eval_mem, None  # every segment, in order
                start = time.perf_counter()
                result = evaluate_streams(model, task.eval_batches(0, 1), task)
                rows.append((mem_len, eval_mem, result["val_loss"], result["val_tokens"], seconds,
                             time.perf_counter() - start))
                log.info("train mem %d, eval mem %d: %.4f", mem_len, eval_mem, result["val_loss"])
    print(f"\nseg_len {args.seg_len}, batch {args.batch}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads, {args.eval_streams} validation streams over the "
          f"first {args.val_tokens:,} validation tokens")
    print("| trained mem_len | eval mem_len | val loss (nats/char) | val tokens | train s | eval s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for mem_len, eval_mem, loss, tokens, train_s, eval_s in rows:
        print(f"| {mem_len} | {eval_mem} | {loss:.4f} | {tokens:,} | {train_s:.0f} | {eval_s:.1f} |")


@torch.inference_mode()
def vanilla_ms_per_token(model: TransformerXL, stream: torch.Tensor, context: int, n: int) -> float:
    """Each prediction recomputes the previous `context` tokens from scratch (no memory)."""
    empty = model.new_memory(1, 0)
    model(stream[None, :context], empty)  # warm-up
    times = []
    for p in range(n):
        start = CLOCK()
        model(stream[None, p:p + context], empty).logits[:, -1]
        times.append(CLOCK() - start)
    return statistics.median(times) * 1e3  # the median resists other processes' bursts


@torch.inference_mode()
def gpt_ms_per_token(model: GPT, stream: torch.Tensor, context: int, n: int) -> float:
    """The same recomputation with a GPT of the same size: absolute positions, and SDPA's fused
    causal kernel instead of a dense relative-position bias."""
    model(stream[None, :context])  # warm-up
    times = []
    for p in range(n):
        start = CLOCK()
        model(stream[None, p:p + context])[:, -1]
        times.append(CLOCK() - start)
    return statistics.median(times) * 1e3


@torch.inference_mode()
def xl_ms_per_token(model: TransformerXL, stream: torch.Tensor, context: int, seg_len: int,
                    n_segments: int) -> float:
    """Segments of seg_len with `context` remembered positions; memory filled before timing."""
    memory = model.new_memory(1, context)
    warm = -(-context // seg_len) + 1
    for g in range(warm):
        memory = model(stream[None, g * seg_len:(g + 1) * seg_len], memory).memory
    times = []
    for g in range(warm, warm + n_segments):
        start = CLOCK()
        memory = model(stream[None, g * seg_len:(g + 1) * seg_len], memory).memory
        times.append(CLOCK() - start)
    return statistics.median(times) / seg_len * 1e3


def speed(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    model = TransformerXL(get_config("txl-mini", vocab_size=65, seg_len=args.seg_len, dropout=0.0)).eval()
    c = model.config
    gpt = GPT(GPTConfig(vocab_size=65, context_length=max(args.contexts), n_layers=c.n_layers,
                        n_heads=c.n_heads, d_model=c.d_model, d_ff=c.d_ff, dropout=0.0)).eval()
    needed = max(args.contexts) + args.seg_len * (args.xl_segments + 2) + args.vanilla_positions
    stream = torch.randint(0, 65, (needed,))
    print(f"\ntxl-mini ({model.num_parameters():,} parameters), batch 1, fp32, "
          f"{torch.get_num_threads()} threads, seg_len {args.seg_len}, {args.clock} clock, median")
    print("| context L | vanilla (same relative model) ms/token | vanilla GPT ms/token | "
          "Transformer-XL ms/token | speedup vs same model | speedup vs GPT |")
    print("|---:|---:|---:|---:|---:|---:|")
    for context in args.contexts:
        vanilla = vanilla_ms_per_token(model, stream, context, args.vanilla_positions)
        vanilla_gpt = gpt_ms_per_token(gpt, stream, context, args.vanilla_positions)
        xl = xl_ms_per_token(model, stream, context, args.seg_len, args.xl_segments)
        print(f"| {context} | {vanilla:.2f} | {vanilla_gpt:.2f} | {xl:.4f} | {vanilla / xl:.0f}x | "
              f"{vanilla_gpt / xl:.0f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["quality", "speed"])
    parser.add_argument("--seg-len", type=int, default=64)
    parser.add_argument("--mem-len", type=int, default=64, help="training memory (quality)")
    parser.add_argument("--eval-mem-lens", type=lambda s: [int(x) for x in s.split(",")],
                        default=[0, 64, 256])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-streams", type=int, default=8)
    parser.add_argument("--val-tokens", type=int, default=100_000, help="first N validation tokens")
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")],
                        default=[128, 256, 512, 1024])
    parser.add_argument("--vanilla-positions", type=int, default=16)
    parser.add_argument("--xl-segments", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":  # on a shared machine: the CPU time this process used, not the wait
        global CLOCK
        CLOCK = time.process_time
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    quality(args) if args.part == "quality" else speed(args)


if __name__ == "__main__":
    from tformer.cli.energy_command import say_at_exit

    say_at_exit("benchmarks/bench_transformer_xl.py")  # one line with its energy and CO2e at exit
    main()
