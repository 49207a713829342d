"""What the command line accepts: a parser whose usage errors are one line like every other error,
argument types that bound every size a user can type, and the recipe a name or path points to."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`error: tformer generate: ...`), not usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def whole_number(low: int = 1, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int in [low, high]. Sizes are bounded so that a typo cannot ask for a
    search or an output that never ends (a beam of 100000 hangs)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not a whole number >= {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{value} is more than {high}, the most this option takes")
        return value

    return parse


def finite_number(text: str) -> float:
    """An argparse type: a float that is neither NaN nor infinite (they pass float() and then break
    sampling with a traceback)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def recipe_path(name_or_path: str) -> Path:
    """A recipe file path, or the name of a recipe shipped with tformer (e.g. gpt-shakespeare-char)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = resources.files("tformer") / "recipes" / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    names = sorted(p.name.removesuffix(".yaml") for p in (resources.files("tformer") / "recipes").iterdir()
                   if p.name.endswith(".yaml"))
    what = "a folder, not a recipe file" if path.is_dir() else "neither a file nor a shipped recipe"
    raise FileNotFoundError(f"recipe not found: {name_or_path} ({what}; shipped: {', '.join(names)})")


def check_new_file(path: Path, option: str, *, force: bool, inputs: tuple[Path, ...] = (),
                   inputs_are: str = "the input") -> None:
    """An output file may be written at `path`: not one of the inputs, not a folder, under a folder
    (not a file), and not an existing file unless --force."""
    for source in inputs:
        if path.exists() and source.exists() and path.samefile(source):
            raise ValueError(f"{option} {path} is {inputs_are} ({source}); write the output to another file")
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name inside it")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option} {path}: {parent} is a file, not a folder")
            break
    if path.exists() and not force:
        raise ValueError(f"{option} {path} already exists; pass --force to replace it, or choose another file")


def energy_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--country", default=None, metavar="CODE", help="price the run's energy at this country's "
                   "grid carbon intensity (ISO alpha-2/alpha-3, e.g. FR; default: $TFORMER_COUNTRY, else the "
                   "world average)")
