"""Sentence pairs for translation: read them (TSV/CSV/JSONL, gzipped or not, or a named dataset),
split them, encode them, and batch them by tokens: examples of similar length share a batch, so
little is padding, and a step's batch depends only on (seed, step).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from tformer.config import check_choice
from tformer.data.datasets import DATASETS, get_dataset, resolve_dataset
from tformer.data.labelled import split_tsv_line

log = logging.getLogger(__name__)

Pair = tuple[str, str]
Column = str | int
FORMATS = {".tsv": "tsv", ".txt": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
TOO_LONG = ("skip", "truncate", "error")
IGNORE = -100  # label of padding positions (cross_entropy's ignore_index)


class PairsError(ValueError):
    """Sentence pairs that cannot be used (missing, empty, misaligned, not UTF-8); the message
    names the file and line and says what to do."""


def pairs_path(source: str | Path, data_dir: str | Path | None = None,
               cache_dir: str | Path | None = None) -> Path:
    """A named sentence-pair dataset's file, or `source` as a path."""
    if isinstance(source, str) and source in DATASETS:
        spec = get_dataset(source)
        if spec.kind != "sentence-pairs":
            names = [s.name for s in DATASETS.values() if s.kind == "sentence-pairs"]
            raise PairsError(f"dataset {source!r} holds {spec.kind}, not sentence pairs; "
                             f"pair datasets: {names}")
        return resolve_dataset(source, data_dir, cache_dir)
    path = Path(source).expanduser()
    if not path.is_file():
        names = [s.name for s in DATASETS.values() if s.kind == "sentence-pairs"]
        raise PairsError(f"sentence pairs not found: {path} is not a file or a named dataset ({names})")
    return path


def _format(path: Path) -> str:
    suffix = path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix
    if suffix.lower() not in FORMATS:
        raise PairsError(f"{path}: unknown format {suffix!r}; use .tsv, .csv or .jsonl (optionally .gz)")
    return FORMATS[suffix.lower()]


def _text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise PairsError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}, {e.reason}); "
                         "re-encode the file as UTF-8") from None


def lines_of(text: str) -> list[str]:
    """Lines split at \\n (and \\r\\n) only: a U+2028 or form feed inside a text stays in it."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _table_rows(path: Path, text: str, kind: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of a TSV (tabs; a field wholly in CSV-style quotes is unquoted) or
    CSV (RFC 4180 quoting) file."""
    if kind == "tsv":
        for number, line in enumerate(lines_of(text), 1):
            if line.strip():
                yield number, split_tsv_line(line)
        return
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for fields in reader:
            if any(f.strip() for f in fields):
                yield reader.line_num, fields
    except csv.Error as e:
        raise PairsError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def _column_index(path: Path, header: list[str] | None, column: Column, side: str) -> int:
    if isinstance(column, int):
        if header is not None and not 0 <= column < len(header):
            raise PairsError(f"{path}: {side} column {column} does not exist; the file has "
                             f"{len(header)} columns {header}")
        return column
    if header is None or column not in header:
        raise PairsError(f"{path}: no {side} column {column!r}; the header names {header}. Choose "
                         "columns by header name or by 0-based index")
    return header.index(column)


def _jsonl_record(line: str, columns: tuple[Column, Column]) -> tuple[str, str] | str:
    """(source, target) of one JSONL line, or what is wrong with it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return f"not a JSON object ({e.msg})"
    if not isinstance(record, dict) or any(c not in record for c in columns):
        return f"expected a JSON object with keys {list(columns)}"
    src, tgt = record[columns[0]], record[columns[1]]
    if not isinstance(src, str) or not isinstance(tgt, str):
        return f"{list(columns)} must be strings, got {[src, tgt]!r}"
    return src, tgt


def _records(path: Path, columns: tuple[Column, Column],
             header: bool) -> Iterator[tuple[int, tuple[str, str] | str]]:
    """(line, (source, target)) of every non-blank record, or (line, problem) for a misaligned
    one; problems with the whole file (unknown columns) raise PairsError."""
    kind, text = _format(path), _text(path)
    if kind == "jsonl":
        for number, line in enumerate(lines_of(text), 1):
            if line.strip():
                yield number, _jsonl_record(line, columns)
        return
    rows = _table_rows(path, text, kind)
    names = next(rows, (0, None))[1] if header else None
    width = len(names) if names is not None else None
    index = [_column_index(path, names, c, side) for c, side in zip(columns, ("source", "target"))]
    for number, fields in rows:
        if (width is not None and len(fields) != width) or max(index) >= len(fields):
            yield number, (f"expected {width or max(index) + 1} {kind.upper()} fields, found "
                           f"{len(fields)}; is a separator missing or extra, or a text split across lines?")
        else:
            yield number, (fields[index[0]], fields[index[1]])


def first_variant(text: str, separator: str | None) -> str:
    """The first of `separator`-separated alternatives ("Hallo!; Servus!" -> "Hallo!")."""
    return text.split(separator, 1)[0].strip() if separator else text.strip()


def read_pairs(source: str | Path, columns: tuple[Column, Column] = (0, 1), *, header: bool = True,
               variant_separator: str | None = None, on_bad: str = "error",
               data_dir: str | Path | None = None, cache_dir: str | Path | None = None) -> list[Pair]:
    """(source, target) texts of a pair file or named dataset. columns: header names or 0-based
    indices (JSONL: keys). Empty or misaligned pairs raise PairsError naming file and line, or
    with on_bad="skip" are dropped with one warning. variant_separator: keep the first of several
    alternatives on each side (the Ding dictionary's "; ")."""
    check_choice("on_bad", on_bad, ("error", "skip"))
    path = pairs_path(source, data_dir, cache_dir)
    pairs, bad = [], []
    for number, record in _records(path, tuple(columns), header):
        if isinstance(record, tuple):
            src, tgt = (first_variant(t, variant_separator) for t in record)
            if src and tgt:
                pairs.append((src, tgt))
                continue
            record = f"empty {'source' if not src else 'target'} text"
        if on_bad == "error":
            raise PairsError(f"{path}:{number}: {record}; fix or remove the line, or skip bad pairs "
                             "(on_bad='skip')")
        bad.append(f"{path}:{number}: {record}")
    if bad:
        log.warning("skipped %d bad pair(s) of %s, the first: %s", len(bad), path, bad[0])
    if not pairs:
        raise PairsError(f"{path} holds no sentence pairs")
    return pairs


def split_indices(n: int, n_valid: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random train / validation / test split of n items (sorted index arrays)."""
    if n_valid < 0 or n_test < 0 or n_valid + n_test >= n:
        raise PairsError(f"cannot hold out {n_valid} validation and {n_test} test pairs of {n}: "
                         "lower the held-out sizes")
    order = np.random.default_rng(seed).permutation(n)
    valid, test = order[:n_valid], order[n_valid:n_valid + n_test]
    return np.sort(order[n_valid + n_test:]), np.sort(valid), np.sort(test)


def fit_length(src: list[int], tgt: list[int], max_len: int,
               too_long: str) -> tuple[list[int], list[int]] | None:
    """A pair that fits: source <= max_len and target + 1 (<bos>/<eos>) <= max_len tokens.
    too_long: "skip" (None), "truncate" (cut both sides), or "error"."""
    if len(src) <= max_len and len(tgt) < max_len:
        return src, tgt
    if too_long == "error":
        raise PairsError(f"a pair has {len(src)} source and {len(tgt)} target tokens, more than the "
                         f"limit of {max_len} (target: {max_len - 1}); set too_long to skip or truncate")
    return None if too_long == "skip" else (src[:max_len], tgt[:max_len - 1])


def encode_pairs(pairs: Sequence[Pair], tokenizer, max_len: int,
                 too_long: str = "skip") -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each side (any tokenizer with encode_batch). Pairs that do not fit max_len
    are skipped, truncated or refused (see fit_length); skipping or cutting is logged once."""
    check_choice("too_long", too_long, TOO_LONG)
    src_ids = tokenizer.encode_batch([s for s, _ in pairs])
    tgt_ids = tokenizer.encode_batch([t for _, t in pairs])
    sources, targets, changed = [], [], 0
    for i, (src, tgt) in enumerate(zip(src_ids, tgt_ids)):
        if not src or not tgt:
            raise PairsError(f"pair {i} encodes to no tokens: {pairs[i]!r}")
        fitted = fit_length(src, tgt, max_len, too_long)
        if fitted is None or len(fitted[0]) < len(src) or len(fitted[1]) < len(tgt):
            changed += 1
        if fitted is not None:
            sources.append(fitted[0])
            targets.append(fitted[1])
    if changed:
        log.warning("%s %d of %d pairs longer than %d tokens", "skipped" if too_long == "skip" else
                    "truncated", changed, len(pairs), max_len)
    return sources, targets


class TokenBatches:
    """Batches of example indices whose padded size, rows x longest example, stays within
    `max_tokens` (an example longer than that gets a batch of its own).

    Examples are sorted by length, ties broken at random per epoch, and cut into batches; each
    epoch visits every batch once in a random order. Batch sizes are the same every epoch (they
    depend only on the sorted lengths), so step -> (epoch, batch) is plain arithmetic and
    `batch(step)` is a pure function of (seed, step).
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, seed: int = 0) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) == 0:
            raise ValueError("no examples to batch")
        self.seed = seed
        ordered = np.sort(self.lengths)
        bounds, rows = [0], 0
        for i, length in enumerate(ordered):  # ascending: the newest example is the longest
            if rows and (rows + 1) * length > max_tokens:
                bounds.append(i)
                rows = 0
            rows += 1
        self.bounds = np.array([*bounds, len(ordered)])
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = np.lexsort((rng.random(len(self.lengths)), self.lengths))  # by length, random ties
            self._epoch = (epoch, order, rng.permutation(len(self)))
        return self._epoch[1], self._epoch[2]

    def batch(self, step: int) -> np.ndarray:
        """Example indices of step `step`'s batch."""
        epoch, position = divmod(step, len(self))
        order, visit = self._order(epoch)
        b = visit[position]
        return order[self.bounds[b]:self.bounds[b + 1]]

    def in_order(self) -> list[np.ndarray]:
        """Every batch once, shortest first, without shuffling (evaluation)."""
        order = np.argsort(self.lengths, kind="stable")
        return [order[a:b] for a, b in zip(self.bounds[:-1], self.bounds[1:])]


def pad_right(seqs: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    """ids (B, T) right-padded with `pad`, and mask (B, T) bool, True on real tokens."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = True
    return ids, mask


def collate_pairs(sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], *, pad: int,
                  bos: int, eos: int) -> dict[str, Tensor]:
    """A teacher-forcing batch: src_ids/src_mask (B, S); tgt_ids = <bos> + target and labels =
    target + <eos> (IGNORE on padding), with tgt_mask, all (B, T)."""
    src_ids, src_mask = pad_right(sources, pad)
    tgt_ids, tgt_mask = pad_right([[bos, *t] for t in targets], pad)
    labels, _ = pad_right([[*t, eos] for t in targets], IGNORE)
    return {"src_ids": src_ids, "src_mask": src_mask, "tgt_ids": tgt_ids, "tgt_mask": tgt_mask,
            "labels": labels}
