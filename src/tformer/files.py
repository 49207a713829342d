"""File helpers shared by every package: atomic writes (bytes, text, JSON, any writer that takes a
path, whole folders), fsync, checksums, JSON reads with errors that name the file. A crash or an
error never leaves half a file behind.

Every temporary name is hidden (a leading dot) and carries the process id and a random part, so
two writers never share one; it sits beside its target so the final rename stays on one filesystem.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (POSIX; elsewhere folders cannot be opened, a no-op)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unique() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


# the names `temporary_sibling` and `atomic_directory` make: the process id is the `pid` group
TEMPORARY_FILE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp(?P<suffix>\.[^.]+)?$")
TEMPORARY_FOLDER = re.compile(r"^\.(?:tmp|old)-(?P<name>.+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists (this process counts). Unsure (no permission to ask) is alive,
    so a live writer's temporary file is never taken for debris."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True
    return True


def _owner_is_dead(match: re.Match[str] | None) -> bool:
    return match is not None and not process_alive(int(match["pid"]))


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files (`temporary_sibling` names) a killed process left in `folder`,
    and nothing else: a file is removed only when its name has tformer's temporary form and the
    process named in it is gone. Not recursive. The files removed."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = TEMPORARY_FILE.match(entry.name)
        if match and (match["suffix"] or "") == Path(match["name"]).suffix and entry.is_file() \
                and not entry.is_symlink() and _owner_is_dead(match):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        log.info("removed %d temporary file(s) a stopped process left in %s", len(removed), folder)
    return removed


def temporary_sibling(path: str | Path) -> Path:
    """A hidden name beside `path`, unique to this process and call, that keeps `path`'s suffix
    (so `savefig` or PIL still pick the format): `dir/.loss.png.1234-89abcdef.tmp.png`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_unique()}.tmp{path.suffix}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for any writer that wants a file name (`fig.savefig`,
    safetensors `save_file`, `open(..., "wb")`). When the block ends normally the file is fsynced
    and renamed over `path`; when it raises, the file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"nothing was written to {tmp} for {path}")
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` in one rename: the old file or the new one, never half of one."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace a UTF-8 text file in one rename."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json_atomic(path: str | Path, data: Any, *, indent: int | None = None) -> None:
    """Replace a JSON file in one rename."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=indent)


def write_figure_atomic(fig: Any, path: str | Path, **savefig: Any) -> None:
    """Save a matplotlib figure in one rename (format from the suffix) and close it either way."""
    import matplotlib.pyplot as plt  # only callers that drew a figure get here

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, **savefig)
    finally:
        plt.close(fig)


def check_output_folder(folder: str | Path, marker: str, tool: str, option: str = "--out") -> Path:
    """A folder a tool may write its results into: new, empty, or holding its `marker` file (a
    folder the tool made before). A folder with a user's files is refused in one line, untouched."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option} {folder} is a file; give a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / marker).is_file():
        raise ValueError(f"{option} {folder} holds files {tool} did not write; give a new or empty folder")
    return folder


def claim_output_folder(folder: str | Path, marker: str, tool: str, option: str = "--out") -> Path:
    """`check_output_folder`, then create it and mark it as the tool's."""
    folder = check_output_folder(folder, marker, tool, option)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / marker).touch()
    return folder


def _fsync_tree(folder: Path) -> None:
    for sub in sorted(folder.rglob("*"), reverse=True):  # files before the folders holding them
        if sub.is_file():
            fsync_file(sub)
        elif sub.is_dir():
            fsync_dir(sub)
    fsync_dir(folder)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """A fresh hidden folder beside `path` (`.tmp-NAME-PID-RANDOM`) to fill. When the block ends
    normally every file in it is fsynced, an existing `path` is moved aside (`.old-NAME-...`), the
    new folder renamed into place, then the old one removed. When the block raises, the temporary
    folder is removed and `path` is left as it was. A crash at any moment leaves the old folder or
    the new one; `recover_directory` finds the old one after a crash between the two renames."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{_unique()}"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would stick to the renamed folder
    try:
        yield tmp
        _fsync_tree(tmp)
        old = path.parent / f".old-{path.name}-{_unique()}"
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old.exists() and not path.exists():
                os.replace(old, path)  # put the previous folder back
            raise
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_directory(path: str | Path, is_complete: Callable[[Path], bool]) -> bool:
    """After a crash inside `atomic_directory(path)`: remove unfinished temporary folders and, when
    `path` is not complete, rename the newest complete previous folder back to `path` (when it
    is, remove previous folders left over). Folders of a process still alive are left alone (a
    reader must not break a writer's swap). Whether a complete folder is now at `path`."""
    path = Path(path)
    debris = [p for p in path.parent.glob(f".tmp-{path.name}-*")  # writes that never finished
              if _owner_is_dead(TEMPORARY_FOLDER.match(p.name))]  # not a live writer's
    for folder in debris:
        shutil.rmtree(folder, ignore_errors=True)
    if is_complete(path):
        for folder in path.parent.glob(f".old-{path.name}-*"):  # a swap done but not tidied
            if _owner_is_dead(TEMPORARY_FOLDER.match(folder.name)):
                shutil.rmtree(folder, ignore_errors=True)
        return True
    survivors = sorted(path.parent.glob(f".old-{path.name}-*"), key=lambda p: p.stat().st_mtime)
    survivors = [p for p in survivors
                 if _owner_is_dead(TEMPORARY_FOLDER.match(p.name)) and is_complete(p)]
    if not survivors:
        return False
    log.warning("%s was being replaced when the run stopped; using the previous one (%s)",
                path, survivors[-1].name)
    os.replace(survivors[-1], path)
    return True


def read_json(path: str | Path, what: str) -> dict:
    """Read a JSON object, naming the file and the problem when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e}); was it truncated or edited?") from e
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, found {type(data).__name__}")
    return data
