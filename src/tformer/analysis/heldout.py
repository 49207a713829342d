"""Held-out data for judging a trained classifier: a run's own held-out share (the split its
training used) and other data tformer can read (named datasets, image folders, .npz / IDX folders,
text files), as `DataSet`s of inputs and, when the classes match the model's, labels. `tformer ood`
scores them; `tformer attack` attacks them."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HELD_OUT = 0.2  # share of X scored when X is not the run's own source and has no test split
SENTENCE_WORDS = 4  # a named text corpus's lines with fewer words (speaker names, headings) are skipped


@dataclass(frozen=True)
class DataSet:
    """Inputs (sentences or (N, H, W, C) uint8 images), their class indices into the model's labels
    when the data has the same classes, and where they came from."""

    inputs: Any
    labels: np.ndarray | None
    name: str

    def __len__(self) -> int:
        return len(self.inputs)

    def subset(self, index: np.ndarray, name: str | None = None) -> DataSet:
        inputs = self.inputs[index] if isinstance(self.inputs, np.ndarray) else [self.inputs[i] for i in index]
        return DataSet(inputs, None if self.labels is None else self.labels[index], name or self.name)

    def limited(self, limit: int | None, seed: int) -> DataSet:
        """At most `limit` examples, a seeded random sample kept in order (files are often sorted
        by class or by work)."""
        if limit is None or len(self) <= limit:
            return self
        index = np.sort(np.random.default_rng(seed).permutation(len(self))[:limit])
        return self.subset(index, f"{self.name}, {limit} sampled")


# -- images ----------------------------------------------------------------------------------------
def _labels_for(names: tuple[str, ...], labels: np.ndarray, model: Any) -> np.ndarray | None:
    return labels if tuple(names) == tuple(model.labels) else None


def _flat_image_folder(path: Path) -> DataSet | None:
    """A folder holding images directly (no class sub-folders): every image, unlabelled."""
    from tformer.data.images import IMAGE_SUFFIXES, read_image

    entries = list(path.iterdir())
    files = sorted(p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files or any(p.is_dir() and not p.name.startswith(".") for p in entries):
        return None
    arrays = [read_image(p) for p in files]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{path} holds images of several sizes ({sorted(shapes)[:3]}); give images of one size")
    images = np.stack(arrays)
    return DataSet(images if images.ndim == 4 else images[..., None], None, str(path))


def image_splits(run: Any, source: str, seed: int) -> tuple[DataSet, DataSet]:
    """(fit, held out) of image data X: the run's own split when X is its training source."""
    from tformer.data.images import has_test_split, load_images, stratified_holdout

    data = (run.recipe or {}).get("data", {})
    images = load_images(source, "train")
    labels = _labels_for(images.label_names, images.labels, run.model)
    whole = DataSet(images.images, labels, source)
    if has_test_split(source):
        test = load_images(source, "test")
        return whole, DataSet(test.images, _labels_for(test.label_names, test.labels, run.model), f"{source} test split")
    own = data.get("source") == source and "test_fraction" in data
    fraction, split_seed = (data["test_fraction"], data.get("split_seed", 0)) if own else (HELD_OUT, seed)
    rest, held = stratified_holdout(images.labels, fraction, split_seed)
    what = "the run's held-out" if own else "held-out"
    return whole.subset(rest), whole.subset(held, f"{source} ({what} {fraction:.0%})")


def image_set(run: Any, source: str) -> DataSet:
    """Image data Y: its test split when it has one, else all of it."""
    from tformer.data.images import has_test_split, load_images

    path = Path(source).expanduser()
    flat = _flat_image_folder(path) if path.is_dir() else None
    if flat is not None:
        return flat
    split = "test" if has_test_split(source) else "all"
    images = load_images(source, split)
    return DataSet(images.images, _labels_for(images.label_names, images.labels, run.model),
                   f"{source} {split} split" if split == "test" else source)


# -- text --------------------------------------------------------------------------------------------
def _dataset_kind(source: str) -> str | None:
    from tformer.data.datasets import DATASETS

    return DATASETS[source].kind if source in DATASETS else None


def _column_lines(path: Path, column: str | None) -> list[str]:
    """One column of a TSV / CSV file with a header: `column`, else "text", else the first."""
    from tformer.data.labelled import split_tsv_line

    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f)) if path.suffix.lower() == ".csv" else [split_tsv_line(line.rstrip("\r\n"))
                                                                         for line in f if line.strip()]
    if not rows:
        raise ValueError(f"{path} is empty; give a file with a header and one sentence a row")
    header = rows[0]
    if column is not None and column not in header:
        raise ValueError(f"{path} has no column {column!r} (its header: {header}); pick one of those")
    index = header.index(column or ("text" if "text" in header else header[0]))
    return [row[index] for row in rows[1:] if len(row) > index and row[index].strip()]


def text_lines(source: str, column: str | None) -> DataSet:
    """Sentences of text data: a column of a table, a named corpus's lines of >= SENTENCE_WORDS
    words, or a plain file's non-blank lines."""
    from tformer.data.datasets import resolve_dataset

    kind = _dataset_kind(source)
    if kind == "images":
        raise ValueError(f"{source} holds images, but this run classifies text; give sentences")
    path = resolve_dataset(source) if kind else Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"{source} is neither a dataset tformer knows (tformer data list) nor a text file")
    if path.suffix.lower() in (".tsv", ".csv"):
        return DataSet(_column_lines(path, column), None, source)
    if path.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return DataSet([str(r[column or "text"]) for r in rows if str(r.get(column or "text", "")).strip()], None, source)
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if kind == "text":
        lines = [line for line in lines if len(line.split()) >= SENTENCE_WORDS]
    return DataSet(lines, None, source)


def _labelled_set(run: Any, source: str, column: str | None) -> tuple[DataSet, Any] | None:
    """Labelled sentences (texts and labels) when `source` is labelled data the model knows."""
    from tformer.data.labelled import load_labelled

    data = (run.recipe or {}).get("data", {})
    own = data.get("source") == source
    text_column = column or (data.get("text_column", "text") if own else "text")
    try:
        sentences = load_labelled(source, text_column=text_column,
                                  label_column=data.get("label_column", "label") if own else "label")
    except (ValueError, OSError):
        return None
    index = {name: i for i, name in enumerate(run.model.labels)}
    labels = np.array([index[x] for x in sentences.labels]) if set(sentences.labels) <= set(index) else None
    return DataSet(list(sentences.texts), labels, source), sentences


def text_splits(run: Any, source: str, column: str | None, seed: int) -> tuple[DataSet, DataSet]:
    """(fit, held out) of text data X: the run's own split (its test fold, or validation) when X is
    its training source, else a seeded HELD_OUT share."""
    from tformer.data.labelled import fold_split, stratified_holdout, train_val_split

    data = (run.recipe or {}).get("data", {})
    labelled = _labelled_set(run, source, column) if _dataset_kind(source) in (None, "labelled-sentences") else None
    if labelled is None:
        whole = text_lines(source, column)
        order = np.random.default_rng(seed).permutation(len(whole))
        n_held = max(1, round(HELD_OUT * len(whole)))
        return whole.subset(np.sort(order[n_held:])), whole.subset(np.sort(order[:n_held]), f"{source} (held-out {HELD_OUT:.0%})")
    whole, sentences = labelled
    if data.get("source") == source and data.get("fold") is not None:
        train, val, test = fold_split(sentences.labels, fold=data["fold"], n_folds=data.get("n_folds", 5),
                                      val_fraction=data.get("val_fraction", 0.1), seed=data.get("split_seed", 0))
        return whole.subset(np.sort(np.r_[train, val])), whole.subset(test, f"{source} (the run's test fold {data['fold']})")
    if data.get("source") == source:
        train, val = train_val_split(sentences.labels, val_fraction=data.get("val_fraction", 0.1),
                                     seed=data.get("split_seed", 0))
        return whole.subset(train), whole.subset(val, f"{source} (the run's validation split)")
    rest, held = stratified_holdout(sentences.labels, np.arange(len(whole)), HELD_OUT, seed)
    return whole.subset(rest), whole.subset(held, f"{source} (held-out {HELD_OUT:.0%})")


def text_set(run: Any, source: str, column: str | None) -> DataSet:
    if _dataset_kind(source) in (None, "labelled-sentences"):
        labelled = _labelled_set(run, source, column)
        if labelled is not None:
            return labelled[0]
    return text_lines(source, column)
