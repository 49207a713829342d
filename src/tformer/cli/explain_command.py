"""`tformer explain RUN INPUT...`: why the model did what it did, per input: PNG figures and one
self-contained HTML page in a folder of their own (RUN_DIR/explanations/<input> by default)."""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

from tformer.cli.arguments import whole_number
from tformer.cli.run_commands import read_inputs

MARKER = ".tformer-explanations"  # a folder tformer made for explanations: its subfolders may be replaced
MAX_STEPS = 1024  # integrated-gradients points; more buys nothing visible and costs forward passes


def index_list(text: str) -> list[int]:
    """An argparse type: comma-separated indices, e.g. 0,3,5."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers like 0,2,5, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 0, got {text!r}")
    return values


def add_explain_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="why a trained run's model decided: attributions, attention maps; "
                       "PNG figures and an HTML page per input")
    p.add_argument("run_dir")
    p.add_argument("inputs", nargs="*", default=[], help="sentences, image files, prompts or conditions "
                   "(default: --file, else standard input, one per line)")
    p.add_argument("-f", "--file", action="append", help="a text file with one input per line (repeatable)")
    p.add_argument("--out", default=None, help="folder for the explanations (default: RUN_DIR/explanations); "
                   "new, empty, or one tformer explain made")
    p.add_argument("--target", default=None, help="classifiers: the class to explain (name or index; "
                   "default: the predicted one)")
    p.add_argument("--layers", type=index_list, default=None, help="attention layers to keep, e.g. 0,5 "
                   "(default: all)")
    p.add_argument("--heads", type=index_list, default=None, help="attention heads to keep (default: all)")
    p.add_argument("--steps", type=whole_number(1, MAX_STEPS), default=32, help="integrated-gradients steps")
    p.add_argument("--seed", type=int, default=0, help="image generators: which drawing to explain")
    p.add_argument("--pixel", type=whole_number(0), default=None, help="image generators: the pixel to "
                   "explain, row-major (default: the centre)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.set_defaults(func=cmd_explain, spill="inputs")


def folder_name(index: int, item: str) -> str:
    """`003-a-wonderful-film-1a2b3c`: readable, and distinct for distinct inputs."""
    slug = re.sub(r"[^a-z0-9]+", "-", Path(item).stem.lower() if Path(item).suffix else item.lower())
    digest = hashlib.sha256(item.encode("utf-8", "surrogatepass")).hexdigest()[:6]
    return f"{index:03d}-{slug.strip('-')[:40] or 'input'}-{digest}"


def prepare_out(out: Path) -> Path:
    """`out` may hold explanations: it is new, empty, or marked as made by tformer explain."""
    from tformer.files import claim_output_folder

    return claim_output_folder(out, MARKER, "tformer explain")


def cmd_explain(args: argparse.Namespace) -> None:
    from tformer.analysis.explain import Options, explain
    from tformer.analysis.figures import draw_figures
    from tformer.analysis.page import write_page
    from tformer.runs import open_run

    inputs = read_inputs(args)
    run = open_run(args.run_dir, args.checkpoint)
    options = Options(args.target, args.layers, args.heads, args.steps, args.seed, args.pixel)
    explanations = [(item, explain(run, item, options)) for item in inputs]  # bad input: before any file
    out = prepare_out(Path(args.out).expanduser() if args.out else run.path / "explanations")
    for i, (item, e) in enumerate(explanations, 1):
        folder = out / folder_name(i, item)
        page = write_page(e, draw_figures(e, folder), folder / "index.html", title=str(run.path))
        print(f"{item!r}: {e.prediction}\n  {page}")
