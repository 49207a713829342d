"""Labelled sentences for classification: read TSV / CSV / JSONL files or named datasets (label
sets are whatever the data says), split them (hold-out or stratified k-fold), and encode them as
[CLS] tokens [SEP] rows with a documented policy for sentences longer than the model allows.

Every problem names the file and line: a malformed row, an empty text or label, a label the
model does not know, a sentence that is too long (with `too_long="error"`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from tformer.config import check_choice, check_fraction
from tformer.data.datasets import DATASETS, get_dataset, resolve_dataset
from tformer.data.text import read_text_file

log = logging.getLogger(__name__)

FORMATS = ("tsv", "csv", "jsonl")
TOO_LONG = ("truncate", "error")  # truncate: keep the first tokens and log a warning; error: refuse
SPECIAL_NAMES = {"cls": ("[CLS]", "<s>", "<cls>"), "sep": ("[SEP]", "</s>", "<sep>"),
                 "pad": ("[PAD]", "<pad>"), "mask": ("[MASK]", "<mask>")}
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class LabelledDataError(ValueError):
    """Labelled data that cannot be used as it is; the message names the file and line."""


@dataclass(frozen=True)
class LabelledSentences:
    """Texts with their labels (as strings) and the line each came from in `source`."""

    texts: tuple[str, ...]
    labels: tuple[str, ...]
    lines: tuple[int, ...]
    source: str

    def __len__(self) -> int:
        return len(self.texts)

    def label_names(self) -> tuple[str, ...]:
        """The distinct labels in natural order ("2" before "10", then text labels)."""
        return sort_labels(set(self.labels))

    def subset(self, indices: Iterable[int]) -> LabelledSentences:
        """The examples at `indices`, in that order."""
        idx = [int(i) for i in indices]
        return LabelledSentences(tuple(self.texts[i] for i in idx), tuple(self.labels[i] for i in idx),
                                 tuple(self.lines[i] for i in idx), self.source)

    def where(self, i: int) -> str:
        """"file line N" of example i, for error messages."""
        return f"{self.source} line {self.lines[i]}"


def sort_labels(labels: Iterable[str]) -> tuple[str, ...]:
    """Natural order: integer labels by value, then the others alphabetically."""
    return tuple(sorted(labels, key=lambda s: (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s)))


def _check_row(path: Path, line: int, text: Any, label: Any) -> tuple[str, str]:
    text, label = "" if text is None else str(text), "" if label is None else str(label).strip()
    if not text.strip():
        raise LabelledDataError(f"{path} line {line}: the text is empty")
    if not label:
        raise LabelledDataError(f"{path} line {line}: the label is empty")
    return text.strip(), label


def _columns(path: Path, header: list[str], text_column: str, label_column: str) -> tuple[int, int]:
    for option, name in (("text_column", text_column), ("label_column", label_column)):
        if name not in header:
            raise LabelledDataError(f"{path} line 1: the header {header} has no column {name!r}; the "
                                    f"first line must name the columns, or set data.{option}")
    return header.index(text_column), header.index(label_column)


def unquote_tsv_field(field: str) -> str:
    """A TSV field written with CSV-style quoting ('"a ""b"" c"', as spreadsheets and Python's
    csv excel-tab dialect write it) as its text ('a "b" c'). Only a field wholly enclosed in
    double quotes whose inner quotes are all doubled is unquoted; a lone quote inside a text
    ('5" tall', '"Hi," she said') is kept as written."""
    if len(field) < 2 or field[0] != '"' or field[-1] != '"':
        return field
    inner = field[1:-1]
    if inner.replace('""', "").count('"'):
        return field  # an undoubled quote inside: not CSV quoting, keep the text as it is
    return inner.replace('""', '"')


def split_tsv_line(line: str) -> list[str]:
    """The fields of one TSV line (tabs separate; no field holds a tab or newline), unquoted."""
    return [unquote_tsv_field(field) for field in line.split("\t")]


def _read_tsv(path: Path, text_column: str, label_column: str) -> list[tuple[str, str, int]]:
    """Tab-separated (a field cannot hold a tab or a newline); fields wholly in CSV-style quotes
    are unquoted (`unquote_tsv_field`)."""
    lines = read_text_file(path).split("\n")
    header = split_tsv_line(lines[0].rstrip("\r"))
    t, y = _columns(path, header, text_column, label_column)
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = split_tsv_line(line)
        if len(fields) != len(header):
            raise LabelledDataError(f"{path} line {n}: expected {len(header)} tab-separated fields "
                                    f"({', '.join(header)}), found {len(fields)}; a TSV field cannot hold "
                                    "a tab (use CSV with quotes or JSONL for such texts)")
        rows.append((*_check_row(path, n, fields[t], fields[y]), n))
    return rows


def _read_csv(path: Path, text_column: str, label_column: str) -> list[tuple[str, str, int]]:
    reader = csv.reader(io.StringIO(read_text_file(path), newline=""), strict=True)
    try:
        header = next(reader)
        t, y = _columns(path, header, text_column, label_column)
        rows, start = [], reader.line_num + 1
        for fields in reader:
            if fields and any(f.strip() for f in fields):
                if len(fields) != len(header):
                    raise LabelledDataError(f"{path} line {start}: expected {len(header)} comma-separated "
                                            f"fields ({', '.join(header)}), found {len(fields)}; quote "
                                            'texts that hold commas ("like, this")')
                rows.append((*_check_row(path, start, fields[t], fields[y]), start))
            start = reader.line_num + 1
    except csv.Error as e:
        raise LabelledDataError(f"{path} line {reader.line_num}: malformed CSV ({e})") from None
    return rows


def _read_jsonl(path: Path, text_column: str, label_column: str) -> list[tuple[str, str, int]]:
    rows = []
    for n, line in enumerate(read_text_file(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LabelledDataError(f"{path} line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or text_column not in record or label_column not in record:
            raise LabelledDataError(f"{path} line {n}: expected an object with keys {text_column!r} and "
                                    f"{label_column!r} (set data.text_column / data.label_column)")
        rows.append((*_check_row(path, n, record[text_column], record[label_column]), n))
    return rows


READERS = {"tsv": _read_tsv, "csv": _read_csv, "jsonl": _read_jsonl}


def resolve_labelled_path(source: str | Path) -> Path:
    """A named labelled-sentences dataset's path (e.g. "uci-sentiment"), else `source` as a path."""
    if isinstance(source, str) and source in DATASETS:
        spec = get_dataset(source)
        if spec.kind != "labelled-sentences":
            names = [s.name for s in DATASETS.values() if s.kind == "labelled-sentences"]
            raise LabelledDataError(f"dataset {source!r} holds {spec.kind}, not labelled sentences; "
                                    f"labelled datasets: {names}")
        return resolve_dataset(source)
    path = Path(source).expanduser()
    if not path.is_file():
        names = [n for n, s in DATASETS.items() if s.kind == "labelled-sentences"]
        raise FileNotFoundError(f"labelled data {str(source)!r} is neither a file nor a named dataset "
                                f"({', '.join(names)})")
    return path


def load_labelled(source: str | Path, *, text_column: str = "text", label_column: str = "label",
                  format: str | None = None) -> LabelledSentences:
    """Labelled sentences from a named dataset or a .tsv / .csv / .jsonl file (format from the
    suffix unless given). TSV and CSV files start with a header naming their columns."""
    path = resolve_labelled_path(source)
    fmt = format or path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise LabelledDataError(f"cannot tell the format of {path} from its suffix; set data.format to "
                                f"one of {list(FORMATS)}")
    rows = READERS[fmt](path, text_column, label_column)
    if not rows:
        raise LabelledDataError(f"{path} holds no labelled sentences")
    texts, labels, lines = zip(*rows)
    return LabelledSentences(texts, labels, lines, str(path))


def label_ids(data: LabelledSentences, label_names: Sequence[str]) -> np.ndarray:
    """Each example's class index in `label_names`; a label outside them is named with its line."""
    index = {name: i for i, name in enumerate(label_names)}
    for i, label in enumerate(data.labels):
        if label not in index:
            raise LabelledDataError(f"{data.where(i)}: label {label!r} is not one the model knows "
                                    f"({list(label_names)}); relabel the data or fine-tune a model with it")
    return np.array([index[label] for label in data.labels], dtype=np.int64)


def stratified_folds(labels: Sequence[str], n_folds: int, seed: int) -> list[np.ndarray]:
    """`n_folds` disjoint index arrays covering every example, each with about the same share of
    every label: each label's examples are shuffled (seeded) and dealt round-robin."""
    if n_folds < 2 or n_folds > len(labels):
        raise LabelledDataError(f"n_folds must be in [2, {len(labels)}] for {len(labels)} examples, "
                                f"got {n_folds}")
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(n_folds)]
    position = 0
    for name in sort_labels(set(labels)):
        members = rng.permutation([i for i, label in enumerate(labels) if label == name])
        for i in members:
            folds[position % n_folds].append(int(i))
            position += 1
    return [np.sort(np.array(fold, dtype=np.int64)) for fold in folds]


def stratified_holdout(labels: Sequence[str], indices: np.ndarray, fraction: float,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, held) of `indices`: `fraction` of each label's examples among them held out
    (seeded), both sorted."""
    check_fraction("val_fraction", fraction)
    rng, held = np.random.default_rng(seed), []
    for name in sort_labels({labels[i] for i in indices}):
        members = rng.permutation([int(i) for i in indices if labels[i] == name])
        held.extend(members[:round(fraction * len(members))].tolist())
    held_idx = np.sort(np.array(held, dtype=np.int64))
    return np.setdiff1d(np.asarray(indices, dtype=np.int64), held_idx), held_idx


def fold_split(labels: Sequence[str], *, fold: int, n_folds: int, val_fraction: float,
               seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) for k-fold evaluation: fold `fold` is the test split, scored once at
    the end; validation (which picks the best checkpoint) is a stratified `val_fraction` of the
    other folds, so the test fold never influences training."""
    if not 0 <= fold < n_folds:
        raise LabelledDataError(f"fold must be in [0, {n_folds}), got {fold}")
    if not 0 < val_fraction < 1:
        raise LabelledDataError(f"val_fraction must be in (0, 1) with a fold: validation is carved out of "
                                f"the training folds, got {val_fraction}")
    folds = stratified_folds(labels, n_folds, seed)
    pool = np.sort(np.concatenate([f for k, f in enumerate(folds) if k != fold]))
    train, val = stratified_holdout(labels, pool, val_fraction, seed + 1)
    return train, val, folds[fold]


def train_val_split(labels: Sequence[str], *, val_fraction: float, seed: int, fold: int | None = None,
                    n_folds: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: fold k of stratified k-fold when `fold` is set, else a stratified
    hold-out of `val_fraction`."""
    if fold is not None:
        if not 0 <= fold < n_folds:
            raise LabelledDataError(f"fold must be in [0, {n_folds}), got {fold}")
        folds = stratified_folds(labels, n_folds, seed)
        return np.sort(np.concatenate([f for k, f in enumerate(folds) if k != fold])), folds[fold]
    return stratified_holdout(labels, np.arange(len(labels)), val_fraction, seed)


@dataclass(frozen=True)
class SpecialIds:
    cls: int
    sep: int
    pad: int
    mask: int | None


def special_ids(tokenizer: Any, *, need_mask: bool = False) -> SpecialIds:
    """[CLS], [SEP], [PAD] (and [MASK]) ids of a tokenizer (BERT or RoBERTa spellings)."""
    specials: dict[str, int] = tokenizer.special_tokens
    found = {role: next((specials[n] for n in names if n in specials), None)
             for role, names in SPECIAL_NAMES.items()}
    needed = ["cls", "sep", "pad"] + (["mask"] if need_mask else [])
    missing = [SPECIAL_NAMES[role][0] for role in needed if found[role] is None]
    if missing:
        raise LabelledDataError(f"the tokenizer has no {', '.join(missing)} special token(s) (it has "
                                f"{sorted(specials)}); a BERT needs them: use a BERT tokenizer.json, or "
                                f"train one with tokenizer.special_tokens: {list(BERT_SPECIAL_TOKENS)}")
    return SpecialIds(found["cls"], found["sep"], found["pad"], found["mask"])


def encode_texts(texts: Sequence[str], tokenizer: Any, specials: SpecialIds, *, max_length: int,
                 too_long: str = "truncate", where: Callable[[int], str] | None = None) -> list[np.ndarray]:
    """[CLS] ids [SEP] per text, at most `max_length` ids: what a text classifier reads, in
    training and at prediction alike. Longer texts are cut to fit with one warning
    (too_long="truncate") or refused naming the first one (too_long="error"); `where(i)` names
    text i in messages (default: "text i")."""
    check_choice("data.too_long", too_long, TOO_LONG)
    if max_length < 3:
        raise LabelledDataError(f"max_length must leave room for [CLS], a token and [SEP]; got {max_length}")
    where = where or (lambda i: f"text {i + 1}")
    encoded = tokenizer.encode_batch(list(texts))
    lengths = np.array([len(ids) + 2 for ids in encoded])
    over = np.flatnonzero(lengths > max_length)
    if len(over) and too_long == "error":
        i = int(over[0])
        raise LabelledDataError(f"{where(i)}: the text is {lengths[i]} tokens with [CLS] and [SEP], "
                                f"more than max_length={max_length} ({len(over)} such texts); shorten "
                                "them, raise data.max_length (up to the model's context_length) or set "
                                "data.too_long=truncate")
    if len(over):
        i = int(over[np.argmax(lengths[over])])
        log.warning("%d of %d texts exceed %d tokens and were truncated (longest: %d tokens, %s); set "
                    "data.too_long=error to refuse them", len(over), len(texts), max_length, lengths[i], where(i))
    body = max_length - 2
    return [np.array([specials.cls, *ids[:body], specials.sep], dtype=np.int64) for ids in encoded]


def encode_sentences(data: LabelledSentences, tokenizer: Any, specials: SpecialIds, *, max_length: int,
                     too_long: str = "truncate") -> list[np.ndarray]:
    """`encode_texts` of a labelled file's texts; messages name the file and line."""
    return encode_texts(data.texts, tokenizer, specials, max_length=max_length, too_long=too_long,
                        where=data.where)


def pad_rows(rows: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad rows to the longest: ids (B, L) and attention_mask (B, L), both int64."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return torch.from_numpy(ids), torch.from_numpy(mask)
