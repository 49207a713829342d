"""int8 quantization (tformer.compress.quantize) side by side in one run, on CPU:

  decode   GPT-2-small (random init, `gpt2-small` preset), greedy, batch 1, 16-token prompt:
           ms/token from the first new token to the last of --new-tokens (timed as each arrives:
           tformer's on_token, HF's streamer; prefill and setup excluded), for tformer fp32,
           tformer int8 (dynamic; also with the LM head kept float), tformer int8-weight, and Hugging
           Face GPT2LMHeadModel fp32 holding the same weights (interop.huggingface.save_gpt2).
  quality  perplexity of /work/runs-shared/gpt-char on its held-out Shakespeare (the recipe's
           validation split, `tformer evaluate`) and accuracy of /work/runs-shared/minilm-sentiment on
           its test fold (fold 0), before and after; the runs are copied first (evaluate writes
           into the run directory).
  encoder  the MiniLM classifier (6 x 384), sentences/s at batch 32 x 64 tokens.

Rounds alternate the cases; tables give medians and ranges over rounds, the load and the date.

    TFORMER_DATA_DIR=/work/shared/data flock /tmp/bench.lock python benchmarks/bench_quantize.py
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tformer.compress.quantize import quantize, quantize_run
from tformer.inference.generate import generate
from tformer.models.registry import build_model
from tformer.training.recipe import evaluate_run

RUNS = Path("/work/runs-shared")


def spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def hf_twin(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    from transformers import GPT2LMHeadModel

    from tformer.interop.huggingface import save_gpt2

    save_gpt2(model, folder)
    return GPT2LMHeadModel.from_pretrained(str(folder), attn_implementation="sdpa").eval()


class TokenClock:
    """Times when each new token arrives (tformer's on_token, a Hugging Face streamer's put)."""

    def __init__(self, skip_first_put: bool) -> None:
        self.times: list[float] = []
        self.skip = skip_first_put  # HF's streamer gets the prompt first

    def __call__(self, _tokens: object) -> None:
        self.times.append(time.perf_counter())

    def put(self, _value: object) -> None:
        if self.skip:
            self.skip = False
        else:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def decode_timer(model: torch.nn.Module, hf: bool, prompt: torch.Tensor) -> Callable[[int], float]:
    """n -> ms per token between the first new token and the n-th (prefill and setup excluded)."""
    def run(n: int) -> float:
        clock = TokenClock(skip_first_put=hf)
        with torch.inference_mode():
            if hf:
                model.generation_config.eos_token_id = None
                model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=n, min_new_tokens=n, pad_token_id=0, streamer=clock)
            else:
                generate(model, prompt, n, on_token=clock)
        assert len(clock.times) == n, (len(clock.times), n)
        return 1000 * (clock.times[-1] - clock.times[0]) / (n - 1)

    return run


def bench_decode(args: argparse.Namespace, tmp: Path) -> dict[str, list[float]]:
    torch.manual_seed(0)
    base = build_model("gpt2-small").eval()
    cases: dict[str, tuple[torch.nn.Module, bool]] = {"hf-fp32": (hf_twin(base, tmp / "hf-gpt2"), True),
                                                       "tformer-fp32": (base, False)}
    for name, scheme, skip in (("tformer-int8", "int8", ()), ("tformer-int8 (head fp32)", "int8", ("lm_head",)),
                               ("tformer-int8-weight", "int8-weight", ())):
        model = copy.deepcopy(base)
        quantize(model, scheme, skip=skip)
        cases[name] = (model, False)
    prompt = torch.randint(0, base.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():  # the same greedy text from the two fp32 implementations
        same = torch.equal(generate(base, prompt, 8)[:, 16:],
                           cases["hf-fp32"][0].generate(prompt, attention_mask=torch.ones_like(prompt),
                                                        do_sample=False, max_new_tokens=8, pad_token_id=0)[:, 16:])
    print(f"decode: tformer fp32 and HF fp32 greedy tokens equal: {same}", flush=True)
    timers = {name: decode_timer(model, hf, prompt) for name, (model, hf) in cases.items()}
    for run in timers.values():  # warm-up
        run(4)
    results: dict[str, list[float]] = {name: [] for name in timers}
    for r in range(args.rounds):
        for name, run in timers.items():
            results[name].append(run(args.new_tokens))
        print(f"  decode round {r + 1}/{args.rounds}, load {load()}", flush=True)
    return results


def bench_encoder(args: argparse.Namespace, models: dict[str, torch.nn.Module]) -> dict[str, list[float]]:
    first = next(iter(models.values()))
    ids = torch.randint(1000, first.config.vocab_size, (32, 64), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids, dtype=torch.bool)
    results: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model.classify(ids, mask)
        for r in range(args.rounds):
            for name, model in models.items():
                start = time.perf_counter()
                for _ in range(args.batches):
                    model.classify(ids, mask)
                results[name].append(32 * args.batches / (time.perf_counter() - start))
            print(f"  encoder round {r + 1}/{args.rounds}, load {load()}", flush=True)
    return results


def quality(tmp: Path) -> tuple[dict[str, dict], dict[str, Path]]:
    """Evaluations of the copied float runs and their quantized runs; the runs' folders."""
    results, folders = {}, {}
    for source in ("gpt-char", "minilm-sentiment"):
        float_copy = tmp / source
        shutil.copytree(RUNS / source, float_copy)
        folders[f"{source} fp32"] = float_copy
        for scheme in ("int8", "int8-weight"):
            folders[f"{source} {scheme}"] = tmp / f"{source}-{scheme}"
            quantize_run(float_copy, folders[f"{source} {scheme}"], scheme)
    for name, folder in folders.items():
        start = time.perf_counter()
        results[name] = evaluate_run(folder)
        print(f"  evaluated {name} in {time.perf_counter() - start:.1f} s", flush=True)
    for name in ("bf16", "int8+bf16"):  # the rest of the model in bf16, as `--precision bf16` runs it
        folder = folders["minilm-sentiment " + ("fp32" if name == "bf16" else "int8")]
        results[f"minilm-sentiment {name}"] = evaluate_in_bf16(folder)
    return results, folders


def evaluate_in_bf16(folder: Path) -> dict:
    """`evaluate_run` with the model's float tensors in bf16 (int8 weights stay int8)."""
    from tformer.runs import open_run
    from tformer.training.recipe import recipe_from_dict, saved_for_evaluation, task_module

    run = open_run(folder)
    recipe = recipe_from_dict(saved_for_evaluation(run.recipe), where=str(folder))
    recipe = dataclasses.replace(recipe, run_dir=str(run.path))  # its confusion.png goes there
    return task_module(recipe.task).evaluate(recipe.settings, run.model.to(torch.bfloat16), run.tokenizer)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batches", type=int, default=3, help="encoder: batches of 32 x 64 per round and case")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--skip-quality", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from tformer import cpu

    cpu.keep_freed_memory()  # as every `tformer` command does: int8's large temporaries otherwise
    # fault their pages in on every call (MiniLM int8 ~300 -> ~470 sentences/s in one test)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{started}, torch {torch.__version__}, {args.threads} threads, load {load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as name:
        tmp = Path(name)
        evaluations, folders = ({}, {}) if args.skip_quality else quality(tmp)
        from tformer.runs import open_run

        encoders = {k.split(" ", 1)[1]: open_run(v).model for k, v in folders.items() if k.startswith("minilm")}
        if encoders:  # bf16 on AMX is the other way to a faster encoder: alone, and around int8 linears
            encoders["bf16"] = copy.deepcopy(encoders["fp32"]).to(torch.bfloat16)
            encoders["int8+bf16"] = copy.deepcopy(encoders["int8"]).to(torch.bfloat16)
        encoder = bench_encoder(args, encoders) if encoders else {}
        decode = bench_decode(args, tmp)
    print(f"\n## int8 quantization, CPU ({args.threads} threads), {started}; load at the end {load()}\n")
    hf = statistics.median(decode["hf-fp32"])
    print("| GPT-2-small greedy decode, batch 1 | ms/token, median (range) | vs HF fp32 |\n|---|---|---|")
    for name, values in decode.items():
        print(f"| {name} | {spread(values)} | {hf / statistics.median(values):.2f}x |")
    if encoder:
        fp32 = statistics.median(encoder["fp32"])
        print("\n| MiniLM classifier, batch 32 x 64 | sentences/s, median (range) | vs fp32 | fold-0 accuracy |")
        print("|---|---|---|---|")
        for name, values in encoder.items():
            accuracy = evaluations[f"minilm-sentiment {name}"].get("accuracy")
            print(f"| {name} | {spread(values)} | {statistics.median(values) / fp32:.2f}x | {accuracy:.4f} |")
    if evaluations:
        base = evaluations["gpt-char fp32"]["perplexity"]
        print("\n| gpt-char, held-out Shakespeare | loss (nats/token) | perplexity | vs fp32 |\n|---|---|---|---|")
        for name in ("fp32", "int8", "int8-weight"):
            e = evaluations[f"gpt-char {name}"]
            print(f"| {name} | {e['val_loss']:.4f} | {e['perplexity']:.4f} | {e['perplexity'] / base - 1:+.2%} |")


if __name__ == "__main__":
    from tformer.cli.energy_command import say_at_exit

    say_at_exit("benchmarks/bench_quantize.py")  # one line with its energy and CO2e at exit
    main()
