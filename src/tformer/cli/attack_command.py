"""`tformer attack RUN [INPUT...] [--data X]`: adversarial attacks on a trained classifier, by what
it can do. Image classifiers: FGSM or PGD (L-inf / L2) on [0, 1] pixels; text classifiers: word
substitution from the model's own embedding neighbours, character typos, or HotFlip.

    tformer attack runs/vit-mnist seven.png --epsilons 0.1        # your inputs: each attacked, saved
    tformer attack runs/vit-mnist --data mnist-10k --limit 500     # held-out data: robust accuracy
    tformer attack runs/bert-sentiment-minilm "a wonderful film"  # the changed words marked

Writes summary.json, curves.png (accuracy against epsilon, noise, blur, occlusion; or typo rate),
examples (examples.png: originals over adversarial images; attacked.md: sentences with the
changed words marked; adversarial PNGs for your image inputs) to a folder of its own.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from tformer.cli.arguments import whole_number

MARKER = ".tformer-attacks"
IMAGE_METHODS = ("pgd", "fgsm")
TEXT_METHODS = ("substitution", "typo", "hotflip")
DATA_LIMIT = 200


def number_list(text: str) -> list[float]:
    """An argparse type: comma-separated finite numbers >= 0, e.g. 0.05,0.1,0.3."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.05,0.1, got {text!r}") from None
    if not values or any(not np.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers >= 0, got {text!r}")
    return values


def add_attack_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attack", help="adversarial attacks on a trained classifier: your inputs, or a "
                       "dataset's held-out share (robust accuracy, curves, examples)")
    p.add_argument("run_dir", help="a trained text or image classifier")
    p.add_argument("inputs", nargs="*", default=[], help="sentences or image files to attack (default: --file, "
                   "else --data)")
    p.add_argument("-f", "--file", action="append", help="a text file with one input per line (repeatable)")
    p.add_argument("--data", default=None, help="attack held-out data instead: a dataset name (tformer data list), "
                   "an image folder or a text file; the run's own test split when it is the run's source")
    p.add_argument("--limit", type=whole_number(1), default=DATA_LIMIT, help=f"--data: attack at most N examples "
                   f"(a seeded sample; default {DATA_LIMIT})")
    p.add_argument("--label", default=None, help="your inputs' true class (name or index; default: the model's "
                   "prediction on the clean input)")
    p.add_argument("--method", default=None, help=f"images: {', '.join(IMAGE_METHODS)} (default pgd); text: "
                   f"{', '.join(TEXT_METHODS)} (default substitution)")
    images = p.add_argument_group("image classifiers")
    images.add_argument("--epsilons", type=number_list, default=None, help="perturbation budgets in [0, 1] pixel "
                        "units (default: 0.1 for inputs; 0,0.05,0.1,0.2,0.3 for --data)")
    images.add_argument("--norm", default="linf", choices=["linf", "l2"])
    images.add_argument("--steps", type=whole_number(1, 10_000), default=20, help="PGD steps (step 2.5 eps / steps)")
    images.add_argument("--restarts", type=whole_number(1, 100), default=1, help="PGD random restarts")
    text = p.add_argument_group("text classifiers")
    text.add_argument("--max-queries", type=whole_number(1, 1_000_000), default=300, help="model calls per example")
    text.add_argument("--max-share", type=float, default=0.15, help="most words changed, as a share (0, 1]")
    text.add_argument("--meaning-guard", type=float, default=0.5, help="substitution, hotflip: refuse a new word "
                      "whose class distribution read alone differs from the old word's by more than this total-"
                      "variation distance (keeps antonyms out: good -> bad); 1 turns it off")
    text.add_argument("--typo-rates", type=number_list, default=[0.0, 0.05, 0.1, 0.2, 0.3, 0.5],
                      help="--data: typo-rate sweep (shares of words)")
    p.add_argument("--out", default=None, help="folder for the results (default: RUN_DIR/attacks); new, empty, or "
                   "one tformer attack made")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.set_defaults(func=cmd_attack, spill="inputs")


def check_out(folder: Path) -> None:
    from tformer.files import check_output_folder

    check_output_folder(folder, MARKER, "tformer attack")


def make_out(folder: Path) -> Path:
    from tformer.files import claim_output_folder

    return claim_output_folder(folder, MARKER, "tformer attack")


def pick_method(args: argparse.Namespace, choices: tuple[str, ...], kind: str) -> str:
    method = args.method or choices[0]
    if method not in choices:
        raise ValueError(f"--method {method} does not apply to this run's {kind} classifier; choose one of "
                         f"{', '.join(choices)}")
    return method


def class_index(model: Any, label: str) -> int:
    labels = list(model.labels)
    if label in labels:
        return labels.index(label)
    if label.strip().isdigit() and int(label) < len(labels):
        return int(label)
    raise ValueError(f"--label {label!r} is not one of the model's classes ({', '.join(labels)}); give a name or an index")


def cmd_attack(args: argparse.Namespace) -> None:
    from tformer.cli.run_commands import read_inputs
    from tformer.models.protocols import ImageClassifier, TextClassifier
    from tformer.runs import open_run

    if args.inputs or args.file:
        if args.data is not None:
            raise ValueError("give inputs or --data, not both")
        inputs = read_inputs(args)
    elif args.data is None:
        raise ValueError("nothing to attack: give inputs (sentences or image files), --file, or --data")
    else:
        inputs = None
    if not 0 < args.max_share <= 1:
        raise ValueError(f"--max-share must be in (0, 1], got {args.max_share}")
    if not 0 <= args.meaning_guard <= 1:
        raise ValueError(f"--meaning-guard is a total-variation distance in [0, 1], got {args.meaning_guard}")
    run = open_run(args.run_dir, args.checkpoint)
    folder = Path(args.out).expanduser() if args.out else run.path / "attacks"
    check_out(folder)
    if run.can(ImageClassifier):
        attack_images(run, args, inputs, folder, pick_method(args, IMAGE_METHODS, "image"))
    elif run.can(TextClassifier):
        attack_texts(run, args, inputs, folder, pick_method(args, TEXT_METHODS, "text"))
    else:
        raise ValueError(f"{run.path} holds a model that is not a classifier (it can: "
                         f"{', '.join(run.capabilities) or 'nothing listed'}); attacks need a text or image classifier")


# -- images ---------------------------------------------------------------------------------------
def _pixels(images: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 255.0  # (N, C, H, W)


def _image_attack(model: Any, x: Any, y: Any, epsilon: float, args: argparse.Namespace, method: str) -> Any:
    from tformer.attacks.image import fgsm, pgd

    if method == "fgsm":
        return fgsm(model, x, y, epsilon, norm=args.norm)
    return pgd(model, x, y, epsilon, steps=args.steps, step_size=2.5 * epsilon / args.steps, norm=args.norm,
               restarts=args.restarts, seed=args.seed)


def attack_images(run: Any, args: argparse.Namespace, inputs: list[str] | None, folder: Path, method: str) -> None:
    import torch

    from tformer.analysis.image_robustness import write_adversarial_grid
    from tformer.attacks.image import predictions
    from tformer.files import write_json_atomic
    from tformer.inference.pipeline import Pipeline

    model = run.model
    if inputs is None:
        return attack_image_data(run, args, folder, method)
    epsilons = args.epsilons or [0.1]
    if len(epsilons) != 1 or epsilons[0] > 1:
        raise ValueError(f"attack your inputs at one --epsilons value in [0, 1], got {epsilons}")
    as_image = Pipeline(run).as_image
    x = _pixels(np.stack([as_image(item) for item in inputs]))
    labels = (torch.full((len(x),), class_index(model, args.label)) if args.label is not None
              else predictions(model, x))
    result = _image_attack(model, x, labels, epsilons[0], args, method)
    make_out(folder)
    rows = []
    with torch.no_grad():
        probs = (torch.softmax(model.classify(x), -1), torch.softmax(model.classify(result.images), -1))
    for i, item in enumerate(inputs):
        saved = _save_image(result.images[i], folder / f"{i + 1:03d}-{Path(item).stem}-adversarial.png")
        rows.append(_image_row(model, item, x[i], labels[i], result, probs, i, saved))
        print(f"{item}: {rows[-1]['clean']} -> {rows[-1]['adversarial']}  "
              f"({'fooled' if rows[-1]['success'] else 'held'}; saved as PNG: {rows[-1]['png_prediction']})")
    write_adversarial_grid(model, x, labels, result, folder / "examples.png",
                           title=f"{method.upper()} {args.norm} eps {epsilons[0]:g}")
    write_json_atomic(folder / "summary.json", {"run": str(run.path), "method": method, "norm": args.norm,
                                                "epsilon": epsilons[0], "steps": args.steps, "inputs": rows}, indent=2)
    print(f"wrote {folder / 'summary.json'}, examples.png and the adversarial PNGs")


def _save_image(image: Any, path: Path) -> Path:
    """An adversarial image as an 8-bit PNG (rounded: the saved file is what a user can use)."""
    from PIL import Image

    from tformer.files import atomic_path

    array = (image.detach().permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(tmp, format="PNG")
    return path


def _image_row(model: Any, item: str, original: Any, label: Any, result: Any, probs: tuple, i: int,
               saved: Path) -> dict:
    """One input's outcome; the saved 8-bit PNG is classified again (rounding may undo a weak attack)."""
    from tformer.attacks.image import predictions
    from tformer.data.images import read_image

    names = model.labels
    clean, adv = int(result.clean_predictions[i]), int(result.adversarial_predictions[i])
    reread = predictions(model, _pixels(read_image(saved).reshape(1, *model.image_shape)))
    delta = (result.images[i] - original).flatten()
    return {"input": item, "label": names[int(label)], "clean": f"{names[clean]} ({float(probs[0][i, clean]):.3f})",
            "adversarial": f"{names[adv]} ({float(probs[1][i, adv]):.3f})", "success": bool(result.success[i]),
            "linf": float(delta.abs().max()), "l2": float(delta.norm()), "png": str(saved),
            "png_prediction": names[int(reread[0])]}


def attack_image_data(run: Any, args: argparse.Namespace, folder: Path, method: str) -> None:
    import torch

    from tformer.analysis.image_robustness import (blur_sweep, noise_sweep, occlusion_sweep, pgd_sweep,
                                                   plot_sweeps, write_adversarial_grid)
    from tformer.analysis.heldout import image_splits
    from tformer.files import write_json_atomic

    _, held = image_splits(run, args.data, args.seed)
    held = held.limited(args.limit, args.seed)
    if held.labels is None:
        raise ValueError(f"{args.data} has other classes than the model ({', '.join(run.model.labels)}); attack data "
                         "labelled with the model's classes")
    x, y = _pixels(held.inputs), torch.from_numpy(np.asarray(held.labels))
    epsilons = args.epsilons or [0.0, 0.05, 0.1, 0.2, 0.3]
    start = time.perf_counter()
    if method == "fgsm":
        rows = [{"perturbation": "fgsm", "level": e, "accuracy": _image_attack(run.model, x, y, e, args, method)
                 .robust_accuracy if e else float((run.model.classify(x).argmax(-1) == y).float().mean()),
                 "examples": len(x)} for e in epsilons]
        results = {}
    else:
        rows, results = pgd_sweep(run.model, x, y, epsilons, steps=args.steps, norm=args.norm,
                                  restarts=args.restarts, seed=args.seed)
    curves = {method: rows, "gaussian noise": noise_sweep(run.model, x, y, [0.0, 0.1, 0.2, 0.3, 0.5], args.seed),
              "blur": blur_sweep(run.model, x, y, [0.0, 0.5, 1.0, 1.5, 2.0]),
              "occlusion": occlusion_sweep(run.model, x, y, occlusion_sizes(x.shape[-1]), args.seed)}
    make_out(folder)
    plot_sweeps(curves, folder / "curves.png", title=f"{run.path.name} on {held.name}")
    strongest = max(results, default=None)
    if strongest is not None:
        write_adversarial_grid(run.model, x, y, results[strongest], folder / "examples.png",
                               title=f"PGD-{args.steps} {args.norm} eps {strongest:g}")
    write_json_atomic(folder / "summary.json", {"run": str(run.path), "data": held.name, "examples": len(x),
                                                "method": method, "norm": args.norm, "steps": args.steps,
                                                "seconds": time.perf_counter() - start, "curves": curves}, indent=2)
    for row in rows:
        print(f"{method} eps {row['level']:g}: accuracy {row['accuracy']:.4f}")
    print(f"wrote {folder / 'summary.json'}, curves.png" + (", examples.png" if strongest is not None else ""))


def occlusion_sizes(side: int) -> list[int]:
    """Squares of 0, 1/7, 2/7 and 3/7 of the image's side (0, 4, 8, 12 pixels at 28 x 28)."""
    return sorted({0, *(max(1, round(side * k / 7)) for k in (1, 2, 3))})


# -- text -----------------------------------------------------------------------------------------
def _text_attack(run: Any, args: argparse.Namespace, method: str, texts: list[str], labels: list[int] | None) -> list:
    from tformer.attacks.text import hotflip_attack, typo_attack, word_substitution_attack

    common = dict(max_queries=args.max_queries, max_share=args.max_share)
    if method == "typo":
        return typo_attack(run.model, run.tokenizer, texts, labels, seed=args.seed, **common)
    attack = word_substitution_attack if method == "substitution" else hotflip_attack
    guard = None if args.meaning_guard >= 1 else args.meaning_guard
    return attack(run.model, run.tokenizer, texts, labels, meaning_guard=guard, **common)


def _text_row(result: Any) -> dict:
    from tformer.analysis.text_robustness import mark_changes

    return {"text": result.text, "attacked": result.attacked, "marked": mark_changes(result), "status": result.status,
            "label": result.true_label, "clean": f"{result.clean_label} ({result.clean_probability:.3f})",
            "adversarial": f"{result.adversarial_label} ({result.adversarial_probability:.3f})",
            "words_changed": len(result.changed), "share_changed": result.share_changed,
            "queries": result.queries, "seconds": result.seconds}


def attack_texts(run: Any, args: argparse.Namespace, inputs: list[str] | None, folder: Path, method: str) -> None:
    from tformer.files import write_json_atomic, write_text_atomic

    if inputs is None:
        return attack_text_data(run, args, folder, method)
    labels = None if args.label is None else [class_index(run.model, args.label)] * len(inputs)
    rows = [_text_row(r) for r in _text_attack(run, args, method, inputs, labels)]
    make_out(folder)
    for row in rows:
        print(f"{row['status']}: {row['clean']} -> {row['adversarial']}, {row['words_changed']} word(s), "
              f"{row['queries']} queries\n  {row['marked']}")
    write_text_atomic(folder / "attacked.md", "\n".join(f"- {r['status']}, {r['clean']} -> {r['adversarial']}: "
                                                          f"{r['marked']}" for r in rows) + "\n")
    write_json_atomic(folder / "summary.json", {"run": str(run.path), "method": method, "max_queries":
                                                args.max_queries, "max_share": args.max_share, "inputs": rows}, indent=2)
    print(f"wrote {folder / 'summary.json'} and attacked.md")


def attack_text_data(run: Any, args: argparse.Namespace, folder: Path, method: str) -> None:
    from tformer.analysis.text_robustness import plot_typo_sweeps, typo_sweep
    from tformer.analysis.heldout import text_splits
    from tformer.files import write_json_atomic, write_text_atomic

    _, held = text_splits(run, args.data, None, args.seed)
    held = held.limited(args.limit, args.seed)
    if held.labels is None:
        raise ValueError(f"{args.data} is not labelled with the model's classes ({', '.join(run.model.labels)}); "
                         "attack labelled sentences (a TSV with text and label columns)")
    labels = [int(y) for y in held.labels]
    start = time.perf_counter()
    rows = [_text_row(r) for r in _text_attack(run, args, method, list(held.inputs), labels)]
    sweep = typo_sweep(run.model, run.tokenizer, list(held.inputs), labels, args.typo_rates, seed=args.seed)
    make_out(folder)
    plot_typo_sweeps({run.path.name: sweep}, folder / "curves.png")
    attacked = [r for r in rows if r["status"] != "skipped"]
    won = [r for r in attacked if r["status"] == "succeeded"]
    summary = {"run": str(run.path), "data": held.name, "examples": len(rows), "method": method,
               "clean_accuracy": len(attacked) / len(rows), "attacked": len(attacked),
               "success_rate": len(won) / len(attacked) if attacked else None,
               "accuracy_under_attack": (len(attacked) - len(won)) / len(rows),
               "mean_share_changed": float(np.mean([r["share_changed"] for r in won])) if won else None,
               "mean_queries": float(np.mean([r["queries"] for r in attacked])) if attacked else None,
               "seconds": time.perf_counter() - start,
               "typo_sweep": {"rates": sweep.rates, "accuracy": sweep.accuracy}, "examples_attacked": rows}
    write_json_atomic(folder / "summary.json", summary, indent=2)
    write_text_atomic(folder / "attacked.md", "\n".join(f"- {r['status']}: {r['marked']}" for r in won[:50]) + "\n")
    rate = "-" if summary["success_rate"] is None else f"{summary['success_rate']:.3f}"
    print(f"{held.name}: clean accuracy {summary['clean_accuracy']:.3f}, {method} success {rate} of "
          f"{len(attacked)}, accuracy under attack {summary['accuracy_under_attack']:.3f}")
    print(f"wrote {folder / 'summary.json'}, attacked.md, curves.png")
