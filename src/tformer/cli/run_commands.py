"""The commands that train a run or use one: train, generate, translate, predict, evaluate. Each
parses nothing and prints: it calls the API and shows the result. Each says the energy it used
(tformer.energy; the country's carbon intensity from $TFORMER_COUNTRY, else the world average):
train and evaluate in their report, the others in one line on standard error, so that standard
output holds only the answers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tformer.cli.arguments import check_new_file, recipe_path

if TYPE_CHECKING:  # the CLI imports lazily: `tformer --help` stays fast
    from tformer.energy import EnergyMeter
    from tformer.inference.generate import Sampling
    from tformer.inference.pipeline import Pipeline

INTERRUPTED = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)


def cmd_train(args: argparse.Namespace) -> int:
    """Train or resume; an interrupted run (Ctrl-C, checkpoint saved) exits 130 like any Ctrl-C."""
    from tformer.training.recipe import load_recipe, train_recipe

    recipe = load_recipe(recipe_path(args.recipe), args.set or [])
    result = train_recipe(recipe, fresh=args.fresh)
    state = "interrupted" if result.interrupted else "stopped early" if result.stopped_early else "done"
    energy = "" if result.energy is None else f"; {result.energy.summary()}"
    print(f"{state} at step {result.step}; best validation loss "
          f"{fmt(result.best_val_loss)}; run directory: {recipe.run_dir}{energy}")
    return INTERRUPTED if result.interrupted else 0


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def open_meter(p: Pipeline | None = None) -> EnergyMeter:
    """A meter for what follows, on the pipeline's GPU when its model is on one."""
    from tformer.energy import EnergyMeter

    device = next(p.model.parameters()).device if p is not None else None  # type: ignore[attr-defined]
    return EnergyMeter.for_device(device)


def report_energy(meter: EnergyMeter, **work: float) -> None:
    """One line on standard error: the energy since `meter` opened and the work per joule."""
    print(meter.reading().doing(**work).summary(), file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> None:
    """Stream text from a language model, or write an image grid from an image generator."""
    from tformer.inference.generate import text_sampling
    from tformer.inference.pipeline import pipeline

    p = pipeline(args.run_dir, args.checkpoint, precision=args.precision)
    if "draw" in p.verbs:
        return generate_image_grid(args, p)
    if args.conditions:
        raise ValueError("--condition is for image generators; give text with --prompt")
    if "generate" not in p.verbs:
        raise p.refuse("generate")
    prompt = "\n" if args.prompt is None else args.prompt
    sampling = text_sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    meter = open_meter(p)
    sys.stdout.write(prompt)
    for piece in p.stream(prompt, args.max_new_tokens, sampling, seed=args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    report_energy(meter, tokens=p.tokens_generated)


def image_sampling(args: argparse.Namespace, p: Pipeline) -> tuple[Sampling, float]:
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
    sampling, guidance = image_sampling(args, p)
    meter = open_meter(p)
    images = p.draw(conditions, args.n, guidance=guidance, sampling=sampling, seed=args.seed)
    out = save_image_grid(images, [str(c) for c in conditions], args.out or Path(args.run_dir) / "generated.png")
    print(f"{len(images)} images ({args.n} per condition, guidance {guidance:g}) written to {out}")
    report_energy(meter, images=len(images))


def read_text_file(name: str, option: str, hint: str = "") -> str:
    """A UTF-8 text file named on the command line, or one line saying what is wrong with it."""
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{option} {name} does not exist")
    if not path.is_file():
        raise ValueError(f"{option} {name} is not a file; give a UTF-8 text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{option} {name} is not UTF-8 text; give a UTF-8 text file{hint}") from None


def split_lines(text: str) -> list[str]:
    """Lines as a user counts them: split at \\n only (a CR before it dropped), no empty last line."""
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    return lines[:-1] if lines and lines[-1] == "" else lines


def translate_aligned(p: Pipeline, lines: list[str], beam_width: int) -> list[str]:
    """One output line per input line: blank lines stay blank, the others are translated."""
    todo = [i for i, line in enumerate(lines) if line.strip()]
    if not todo:
        raise ValueError("nothing to translate: every input line is blank")
    out = [""] * len(lines)
    for i, hypothesis in zip(todo, p.translate([lines[i] for i in todo], beam_width=beam_width)):
        out[i] = " ".join(hypothesis.splitlines())  # a new line inside would shift the alignment
    return out


def cmd_translate(args: argparse.Namespace) -> None:
    """Sentences from arguments, --input FILE or standard input; line i of the output translates
    line i of the input (blank lines stay blank). --output is written atomically, never over the
    input, and over an existing file only with --force."""
    from tformer.files import write_text_atomic
    from tformer.inference.pipeline import pipeline

    if args.input is not None and args.text:
        raise ValueError("give either sentences or --input FILE, not both")
    if args.output is not None:
        inputs = (Path(args.input).expanduser(),) if args.input is not None else ()
        check_new_file(Path(args.output).expanduser(), "--output", force=args.force, inputs=inputs)
    if args.input is not None:
        lines = split_lines(read_text_file(args.input, "--input"))
    else:
        lines = args.text or split_lines(sys.stdin.read())
    p = pipeline(args.run_dir, args.checkpoint, precision=args.precision)
    meter = open_meter(p)
    text = "".join(f"{line}\n" for line in translate_aligned(p, lines, args.beam))
    if args.output is None:
        sys.stdout.write(text)
    else:
        write_text_atomic(Path(args.output).expanduser(), text)
        print(f"{len(lines)} lines translated to {args.output}", file=sys.stderr)
    sys.stdout.flush()
    report_energy(meter, lines=len(lines))


def read_inputs(args: argparse.Namespace) -> list[str]:
    """Inputs from arguments, then --file (one per line), else standard input (one per line)."""
    inputs = list(args.inputs)
    for name in args.file or []:
        lines = [line for line in split_lines(read_text_file(name, "--file", hint=" with one input per line (image files go as arguments)")) if line.strip()]
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
    from tformer.inference.images import save_image_grid
    from tformer.inference.pipeline import pipeline

    p = pipeline(args.run_dir, args.checkpoint, precision=args.precision)
    if not p.verbs:
        raise p.refuse("predict")
    inputs = read_inputs(args)
    verb = p.verbs[0]
    meter = open_meter(p)
    if verb == "draw":
        sampling, guidance = image_sampling(args, p)
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
        print(json.dumps(row, ensure_ascii=False) if args.json else plain(row))
    sys.stdout.flush()
    report_energy(meter, inputs=len(inputs))


def plain(row: dict) -> str:
    if "probabilities" in row:
        return f"{row['label']}\t{row['probabilities'][row['label']]:.3f}\t{row['input']}"
    if "grid" in row:
        return f"{row['input']}: {row['images']} images in {row['grid']}"
    return row["output"]


def cmd_evaluate(args: argparse.Namespace) -> None:
    """The task's metrics on the run's own validation data, or (--text) a score of the user's file."""
    if args.text is not None:
        return evaluate_text(args)
    if args.stride is not None:
        raise ValueError("--stride is for --text FILE (sliding windows over a text); the run's own "
                         "evaluation uses its recipe's settings")
    from tformer.training.recipe import evaluate_run

    meter = open_meter()
    result = evaluate_run(args.run_dir, args.checkpoint)
    show({**result, "energy": meter.reading().summary()})


def evaluate_text(args: argparse.Namespace) -> None:
    """`tformer evaluate RUN --text FILE`: loss, bits per token and character, perplexity."""
    from tformer.inference.score import read_text, score_run
    from tformer.runs import checkpoint, open_run

    text = read_text(args.text)
    run = open_run(args.run_dir, args.checkpoint)
    meter = open_meter()
    score = score_run(run, text, stride=args.stride)
    step = checkpoint.load_progress(run.checkpoint).get("step")
    show({"text": args.text, "checkpoint": run.checkpoint.name, "step": step, "tokens": score.tokens,
          "characters": score.characters, "loss": score.loss, "bits_per_token": score.bits_per_token,
          "bits_per_character": score.bits_per_character, "perplexity": score.perplexity,
          "unknown_characters": f"{score.unknown_characters} ({score.note})",
          "note": "loss is in nats per token; the text's first token is context only, the others are "
                  "scored once each", "energy": meter.reading().doing(tokens=score.tokens).summary()})


def show(result: dict) -> None:
    for key, value in result.items():
        print(f"{key:>18}: {value:.4f}" if isinstance(value, float) else f"{key:>18}: {value}")
