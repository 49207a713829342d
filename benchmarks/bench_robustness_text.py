"""Adversarial robustness of the fine-tuned sentiment classifier (issue 14, text half).

On fold 0's held-out test sentences (uci-sentiment, the split the recipe scores) that the model
classifies correctly, run each attack of `tformer.attacks.text` with a query budget and a limit
on the share of words changed, and report success rate, words changed, queries and seconds per
example; how often a "successful" word substitution swapped a word for one of opposite sentiment
(hand-written lexicon below); accuracy against typo rate on the whole test fold; optionally the
same for a model adversarially trained in embedding space. Everything runs offline on the CPU.

    TFORMER_DATA_DIR=/work/shared/data python benchmarks/bench_robustness_text.py \
        --run runs/explain/bert-sentiment-minilm-fold0 \
        --adversarial-run runs/robustness-text/bert-sentiment-minilm-adv-fold0

Writes benchmarks/results/robustness_text.md, .json and robustness_text_typos.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tformer.analysis.text_robustness import TypoSweep, mark_changes, plot_typo_sweeps, sweep_table, typo_sweep
from tformer.attacks.text import (TextAttackResult, Victim, WordVocabulary, hotflip_attack, typo_attack,
                                  word_substitution_attack)
from tformer.data.labelled import fold_split, load_labelled
from tformer.runs import open_run

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_SUCCESS, GOAL_SHARE = 0.80, 0.15
# a hand-written sentiment lexicon, to count substitutions that reverse a word's polarity
POSITIVE = set("""good great excellent amazing awesome best love loved loves lovely like liked likes nice wonderful
fantastic perfect happy recommend recommended impressed enjoy enjoyed fine beautiful brilliant delicious fresh
friendly helpful pleasant superb terrific outstanding favorite favourite fun funny solid comfortable easy glad
satisfied better incredible tasty cool positive pleased well right clean quality fast""".split())
NEGATIVE = set("""bad worst terrible awful horrible poor hate hated disappointed disappointing disappointment boring
waste wasted broken useless dull rude slow cheap sad annoying mediocre bland cold fail failed failure problem
problems unhappy ugly wrong stupid crap junk garbage difficult worse negative dirty nasty sucks sucked lousy
unfortunately lame pathetic dreadful shitty""".split())


def polarity(word: str) -> int:
    w = word.lower()
    return 1 if w in POSITIVE else -1 if w in NEGATIVE else 0


def reverses_polarity(result: TextAttackResult) -> bool:
    return any(polarity(old) * polarity(new) == -1 for old, new in result.replacements)


def test_fold(data: str = "uci-sentiment") -> tuple[list[str], list[str]]:
    """Fold 0 of 5 (stratified, split seed 0): the recipe's held-out test sentences."""
    sentences = load_labelled(data)
    _, _, test = fold_split(sentences.labels, fold=0, n_folds=5, val_fraction=0.1, seed=0)
    return [sentences.texts[i] for i in test], [sentences.labels[i] for i in test]


def predictions(run, texts: list[str]) -> np.ndarray:
    victim = Victim(run.model, run.tokenizer, 0)
    return np.concatenate([victim.probabilities(texts[k:k + 64]) for k in range(0, len(texts), 64)]).argmax(1)


def summarise(results: list[TextAttackResult], share: float) -> dict:
    done = [r for r in results if r.status != "skipped"]
    wins = [r for r in done if r.success]
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return {"examples": len(done), "success_rate": len(wins) / len(done) if done else float("nan"),
            "mean_share_changed": mean([r.share_changed for r in wins]),
            "mean_words_changed": mean([len(r.changed) for r in wins]),
            "max_share_changed": max([r.share_changed for r in done], default=0.0),
            "queries_per_example": mean([r.queries for r in done]), "max_queries": max([r.queries for r in done], default=0),
            "seconds_per_example": mean([r.seconds for r in done]),
            "polarity_reversed": sum(reverses_polarity(r) for r in wins),
            "allowed_a_word": sum(int(share * r.n_words + 1e-9) >= 1 for r in done),
            "success_among_allowed": len(wins) / max(sum(int(share * r.n_words + 1e-9) >= 1 for r in done), 1)}


def attack_all(run, vocab, texts, labels, max_queries, max_share, seed, log) -> dict[str, list[TextAttackResult]]:
    attacks = {
        "typo": lambda: typo_attack(run.model, run.tokenizer, texts, labels, max_queries=max_queries,
                                    max_share=max_share, seed=seed),
        "substitution": lambda: word_substitution_attack(run.model, run.tokenizer, texts, labels,
                                                         max_queries=max_queries, max_share=max_share, vocabulary=vocab),
        "substitution+guard": lambda: word_substitution_attack(run.model, run.tokenizer, texts, labels,
                                                               max_queries=max_queries, max_share=max_share,
                                                               vocabulary=vocab, meaning_guard=0.5),
        "hotflip": lambda: hotflip_attack(run.model, run.tokenizer, texts, labels, max_queries=max_queries,
                                          max_share=max_share, vocabulary=vocab),
    }
    out = {}
    for name, attack in attacks.items():
        started = time.perf_counter()
        out[name] = attack()
        s = summarise(out[name], max_share)
        log(f"  {name:20s} share<={max_share:.2f}: success {s['success_rate']:.3f}, {s['mean_words_changed']:.2f} "
            f"words, {s['queries_per_example']:.0f} queries, {s['seconds_per_example']:.2f} s/example "
            f"({time.perf_counter() - started:.0f} s)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/explain/bert-sentiment-minilm-fold0", help="the standard classifier")
    parser.add_argument("--adversarial-run", default=None, help="the same recipe trained with training.adversarial=embedding")
    parser.add_argument("--n", type=int, default=200, help="correctly classified test sentences to attack")
    parser.add_argument("--max-queries", type=int, default=300, help="model calls per example")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.15, 0.3], help="limits on the share of words changed")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3, 0.5], help="typo rates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="standard", help="what to call the --run model ('none' as --run: skip it)")
    parser.add_argument("--merge", nargs="*", default=[], help=".json files of earlier runs whose models to include")
    parser.add_argument("--out", default=str(RESULTS / "robustness_text"), help="results path without suffix")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    load_before, started = os.getloadavg(), time.perf_counter()

    texts, labels = test_fold()
    out = Path(args.out)
    report: dict = {"command": "python benchmarks/bench_robustness_text.py " + " ".join(argv or sys.argv[1:]),
                    "machine": "CPU-2 shared", "threads": args.threads,
                    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "load_before": load_before, "test_sentences": len(texts), "max_queries": args.max_queries,
                    "models": {}, "examples": []}
    for earlier_path in args.merge:  # models measured by earlier runs of this script, kept as they were
        earlier = json.loads(Path(earlier_path).read_text(encoding="utf-8"))
        report["models"].update(earlier["models"])
        report["examples"] += earlier["examples"]
        report.setdefault("merged", []).append({"command": earlier["command"], "date": earlier["date"],
                                                "load_before": earlier["load_before"], "load_after": earlier["load_after"],
                                                "seconds": earlier["seconds"]})
    paths = {"embedding-adversarial": args.adversarial_run} if args.adversarial_run else {}
    paths = {args.name: args.run, **paths} if args.run != "none" else paths
    for name, path in paths.items():
        if path and path != "none":
            report["models"][name] = evaluate_model(name, path, texts, labels, args, report["examples"], log)
    sweeps = {name: TypoSweep(tuple(e["typo_sweep"]["rates"]), tuple(e["typo_sweep"]["accuracy"]),
                              tuple(e["typo_sweep"]["share_changed"]), len(texts))
              for name, e in report["models"].items()}
    png = plot_typo_sweeps(sweeps, out.parent / f"{out.name}_typos.png",
                           title=f"uci-sentiment fold 0 ({len(texts)} sentences)")
    report["load_after"], report["seconds"] = os.getloadavg(), time.perf_counter() - started
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(report, sweeps, png.name, args) + "\n", encoding="utf-8")
    log(f"wrote {out}.md, .json, {png.name} in {report['seconds']:.0f} s")
    return 0


def evaluate_model(name: str, path: str, texts: list[str], labels: list[str], args: argparse.Namespace,
                   examples: list, log) -> dict:
    """Clean accuracy, every attack at every share limit on the first n test sentences this model
    classifies correctly, and the typo sweep on all test sentences."""
    run = open_run(path)
    correct = predictions(run, texts) == np.array([run.model.labels.index(y) for y in labels])
    chosen = np.flatnonzero(correct)[:args.n]
    log(f"{name}: {path}: fold-0 accuracy {correct.mean():.3f}; attacking the first {len(chosen)} it classifies correctly")
    attack_texts, attack_labels = [texts[i] for i in chosen], [labels[i] for i in chosen]
    t = time.perf_counter()
    vocab = WordVocabulary.build(run.model, run.tokenizer)
    vocab.lone_word_probabilities()
    entry = {"path": path, "clean_accuracy": float(correct.mean()), "attacked": len(chosen),
             "whole_words": len(vocab.words), "vocabulary_seconds": time.perf_counter() - t, "attacks": {},
             "substitutions": {}}
    for share in args.shares:
        results = attack_all(run, vocab, attack_texts, attack_labels, args.max_queries, share, args.seed, log)
        for attack, rs in results.items():
            entry["attacks"].setdefault(attack, {})[f"{share:g}"] = summarise(rs, share)
            if share == args.shares[0]:
                entry["substitutions"][attack] = [[r.replacements, r.clean_label, r.adversarial_label]
                                                  for r in rs if r.success]
                if name == args.name and args.name == "standard":
                    examples += [{"attack": attack, "attacked": mark_changes(r), "clean": [r.clean_label, r.clean_probability],
                                  "adversarial": [r.adversarial_label, r.adversarial_probability]}
                                 for r in [r for r in rs if r.success][:3]]
    sweep = typo_sweep(run.model, run.tokenizer, texts, labels, rates=args.rates, seed=args.seed)
    entry["typo_sweep"] = {"rates": sweep.rates, "accuracy": sweep.accuracy, "share_changed": sweep.share_changed}
    log("  typo sweep: " + ", ".join(f"{r:g}: {a:.3f}" for r, a in zip(sweep.rates, sweep.accuracy)))
    return entry


def markdown(report: dict, sweeps: dict, png: str, args: argparse.Namespace) -> str:
    lines = ["# Text classifier robustness: typos, embedding-neighbour substitutions, HotFlip (issue 14)", "",
             f"`{report['command']}`", "",
             f"Machine: {report['machine']}, torch threads {report['threads']}, {report['date']}, load average "
             f"{report['load_before'][0]:.2f} before / {report['load_after'][0]:.2f} after; {report['seconds']:.0f} s in all.",
             *[f"Merged from `{m['command']}` ({m['date']}, load {m['load_before'][0]:.2f} / {m['load_after'][0]:.2f}, "
               f"{m['seconds']:.0f} s)." for m in report.get("merged", [])],
             "",
             f"Data: uci-sentiment fold 0 of 5 (the recipe's held-out test split, {report['test_sentences']} sentences); "
             f"attacked: per model, the first {args.n} it classifies correctly. Budget "
             f"{report['max_queries']} model calls per example; a limit of 0.15 lets 1 word change in a 7-13 word "
             f"sentence and none in a shorter one (those count as failures). Goal: >= {GOAL_SUCCESS:.0%} success "
             f"with <= {GOAL_SHARE:.0%} of words changed.", ""]
    for name, entry in report["models"].items():
        lines += [f"## {name} (`{entry['path']}`; clean accuracy on fold 0: {entry['clean_accuracy']:.3f}; "
                  f"{entry['attacked']} sentences attacked)", "",
                  "| attack | share limit | success | goal | success where >= 1 word may change | words changed | "
                  "share changed | queries / example | s / example | polarity reversed |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
        for attack, by_share in entry["attacks"].items():
            for share, s in by_share.items():
                goal = ("met" if s["success_rate"] >= GOAL_SUCCESS else "missed") if float(share) <= GOAL_SHARE else "-"
                lines.append(f"| {attack} | {share} | {s['success_rate']:.3f} | {goal} | {s['success_among_allowed']:.3f} "
                             f"({s['allowed_a_word']}) | {s['mean_words_changed']:.2f} | "
                             f"{s['mean_share_changed']:.3f} | {s['queries_per_example']:.0f} (max {s['max_queries']}) | "
                             f"{s['seconds_per_example']:.2f} | {s['polarity_reversed']} |")
        lines += ["", f"Whole-word tokens searched: {entry['whole_words']} (vocabulary and lone-word probabilities "
                      f"built once in {entry['vocabulary_seconds']:.0f} s, not counted per example).", ""]
    lines += ["## Accuracy against typos (all fold-0 test sentences)", "", sweep_table(sweeps), "",
              f"![accuracy against typo rate]({png})", "", "## Attacked sentences (standard model, share <= 0.15)", ""]
    lines += [f"- {e['attack']}: {e['attacked']}  ({e['clean'][0]} {e['clean'][1]:.2f} -> {e['adversarial'][0]} "
              f"{e['adversarial'][1]:.2f})" for e in report["examples"]]
    return "\n".join(lines)


if __name__ == "__main__":
    from tformer.cli.energy_command import say_at_exit

    say_at_exit("benchmarks/bench_robustness_text.py")  # one line with its energy and CO2e at exit
    raise SystemExit(main())
