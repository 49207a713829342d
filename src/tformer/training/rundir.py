"""A run directory must be recognisably tformer's before anything in it is removed or replaced:
a marker file (`.tformer-run`) says so, an exclusive lock keeps a second process out while one
trains there, and the temporary files a killed process left are removed when the next run starts.

The lock is `fcntl.flock` on `.tformer-run.lock`. The kernel releases it when the holding process
ends in any way (kill -9 included), so a lock left by a dead process never blocks anyone; the lock
file itself stays (removing it would let two processes lock two different files).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tformer import __version__
from tformer.config import ConfigError
from tformer.files import TEMPORARY_FOLDER, remove_stale_temporaries, write_json_atomic
from tformer.runs import checkpoint

log = logging.getLogger(__name__)

MARKER, LOCK = ".tformer-run", ".tformer-run.lock"
MARKER_FORMAT = 1
OUTPUTS = ("metrics.jsonl", "samples.txt", "samples.png", "loss.png", "energy.png", "tokenizer.json",
           "memory_plan.json")
CHECKPOINT_NAMES = ("last", "best")


class RunDirectoryError(ValueError):
    """A run directory cannot be used as asked; the message says why and what to do instead."""


def check_run_dir(value: Any, where: str = "recipe") -> str:
    """The run_dir a recipe names, with `~` expanded; empty, null or non-text values are refused
    (they would write into `./None` or into the current directory)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError(f"run_dir of {where} is {'null' if value is None else 'empty'}; name a folder "
                          "for the run's outputs, e.g. run_dir=runs/mine")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # `run_dir: 2024` names the folder 2024
    if not isinstance(value, str):
        raise ConfigError(f"run_dir of {where} must be a folder path, got {type(value).__name__} "
                          f"{value!r}; e.g. run_dir=runs/mine")
    return os.path.expanduser(value)


@dataclass(frozen=True)
class Survey:
    """What a run directory holds. kind: `new` (absent, or empty but for the lock file), `run`
    (tformer's: a marker, or a checkpoint of a run trained before markers) or `foreign`."""

    path: Path
    kind: str
    finished: bool = False  # the marker says the run ended (a later start must not replace it)
    marked: bool = False
    foreign: tuple[str, ...] = ()


def _is_legacy_run(path: Path) -> bool:
    """A run trained before markers existed: a complete checkpoint with a model record."""
    for name in CHECKPOINT_NAMES:
        folder = path / "checkpoints" / name
        try:
            record = json.loads((folder / checkpoint.CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (folder / checkpoint.MANIFEST).is_file() and isinstance(record, dict) and "model_family" in record:
            return True
    return False


def read_marker(path: Path) -> dict[str, Any]:
    """The marker's content; an unreadable marker counts as a finished run (never replaced)."""
    try:
        data = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    return data if isinstance(data, dict) else {"finished": True}


def survey(path: str | Path) -> Survey:
    """Look at a run directory without changing it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirectoryError(f"run_dir {path} is a file, not a folder; choose another run_dir")
    if not path.exists():
        return Survey(path, "new")
    if (path / MARKER).is_file():
        return Survey(path, "run", bool(read_marker(path).get("finished")), marked=True)
    entries = sorted(p.name for p in path.iterdir() if p.name != LOCK)
    if not entries:
        return Survey(path, "new")
    if _is_legacy_run(path):
        return Survey(path, "run", finished=True)
    return Survey(path, "foreign", foreign=tuple(entries))


def refuse_foreign(found: Survey, fresh: bool = False) -> None:
    """A folder that is not tformer's is never written into: nothing of the user's is replaced."""
    if found.kind != "foreign":
        return
    shown = ", ".join(found.foreign[:3]) + (f" and {len(found.foreign) - 3} more" if len(found.foreign) > 3 else "")
    why = " (--fresh clears only tformer's own run directories)" if fresh else ""
    raise RunDirectoryError(f"run_dir {found.path} is not a tformer run directory (it holds {shown}) "
                            f"and training would replace files in it{why}; choose a new or empty run_dir")


def write_marker(path: Path, *, finished: bool) -> None:
    """Mark `path` as tformer's run directory (and whether the run has ended)."""
    write_json_atomic(path / MARKER, {"tformer_run": MARKER_FORMAT, "version": __version__,
                                      "finished": finished})


def tidy(path: Path) -> None:
    """Undo what a killed process left: a checkpoint swap cut between its renames (last and best),
    unfinished checkpoint folders, and temporary files of dead processes (their pid is in the
    name; a live process's are kept)."""
    for name in CHECKPOINT_NAMES:
        checkpoint.resolve(path / "checkpoints" / name)
    for folder in (path, path / "checkpoints"):
        remove_stale_temporaries(folder)


def clear(path: Path) -> None:
    """Forget a tformer run's checkpoints, metrics, samples, plot and tokenizer (--fresh, or a new
    start of a run that never reached a checkpoint to resume). Files of other names stay."""
    folder = path / "checkpoints"
    if folder.is_dir():
        for entry in folder.iterdir():
            match = TEMPORARY_FOLDER.match(entry.name)
            if entry.is_dir() and (entry.name in CHECKPOINT_NAMES or (match and match["name"] in CHECKPOINT_NAMES)):
                shutil.rmtree(entry)
        if not any(folder.iterdir()):
            folder.rmdir()
    for name in OUTPUTS:
        (path / name).unlink(missing_ok=True)


_HELD: dict[Path, list[int]] = {}  # resolved run directory -> [lock file descriptor, depth]


def _flock(fd: int, path: Path) -> bool:
    """Take the exclusive lock without waiting; False where flock does not exist (not POSIX)."""
    try:
        import fcntl
    except ImportError:
        log.debug("no fcntl here: %s is not locked against a second process", path)
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunDirectoryError(f"another process is training in {path} (it holds {path / LOCK}); "
                                "wait for it to end, or use another run_dir") from None
    return True


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold the run directory's exclusive lock (creating the folder); re-entrant in one process,
    so the recipe and the Trainer can both hold it. Released when the block ends or the process
    dies."""
    path = Path(path)
    survey(path)  # a file in the way is named, not a mkdir traceback
    path.mkdir(parents=True, exist_ok=True)
    key = path.resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _flock(fd, path)
    except BaseException:
        os.close(fd)
        raise
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        if _HELD[key][1] == 1:
            del _HELD[key]
            os.close(fd)  # releases the lock
        else:
            _HELD[key][1] -= 1


@contextmanager
def claim(path: str | Path, *, main: bool = True) -> Iterator[None]:
    """For the Trainer: lock `path`, refuse a foreign folder, tidy a crashed run's debris and mark
    the folder as a run. Other processes of a distributed run (main=False) only wait on rank 0."""
    if not main:
        yield
        return
    path = Path(path)
    refuse_foreign(survey(path))  # before the lock file is made there
    with locked(path):
        found = survey(path)
        refuse_foreign(found)
        if found.kind == "run":
            tidy(path)
        if not found.marked:
            write_marker(path, finished=False)
        yield
