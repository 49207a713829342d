"""Text corpora for language models: read text (a named dataset, a file, a folder of .txt files),
tokenize it once into a cached memmap with a train/val split, and draw causal-LM batches that are
a pure function of (seed, step), so resumed and multi-process runs see the same global batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from tformer.config import check_fraction, did_you_mean
from tformer.data.datasets import DATASETS, Progress, cache_root, get_dataset, resolve_dataset
from tformer.files import atomic_path, remove_stale_temporaries, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
CHUNK_CHARS = 1 << 20  # characters per tokenizer call when building a corpus


class TextEncoder(Protocol):
    """The part of `tformer.tokenizers.Tokenizer` a corpus needs (any tokenizer satisfies it)."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def fingerprint(self) -> str: ...


class CorpusError(ValueError):
    """Text that cannot become a corpus (empty, not UTF-8, ...); the message names the file."""


def read_text_file(path: Path) -> str:
    """A UTF-8 file's text (a leading BOM dropped); empty files and undecodable bytes are refused
    with the file, byte offset and line."""
    raw = path.read_bytes()
    if not raw.strip():
        raise CorpusError(f"{path} is empty (no text to train on)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise CorpusError(f"{path} is not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset {e.start} "
                          f"(line {line}) is invalid ({e.reason}); re-encode the file, e.g. "
                          f"`iconv -f latin1 -t utf-8 {path.name}`") from None
    return text.removeprefix("\ufeff")


def read_text_folder(folder: Path) -> str:
    """Every .txt file under `folder` (recursively, hidden ones skipped), sorted by relative path,
    joined with "\\n\\n" (one blank line between files that do not end in a newline)."""
    files = sorted((p for p in folder.rglob("*.txt") if p.is_file() and
                    not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise CorpusError(f"folder {folder} has no .txt files")
    return "\n\n".join(read_text_file(p) for p in files)


def load_text(source: str | Path, *, data_dir: str | Path | None = None,
              cache_dir: str | Path | None = None) -> str:
    """Text of `source`: a named text dataset (a str such as "shakespeare"; names win over a path
    of the same name, write "./shakespeare" for the path), a UTF-8 file, or a folder of .txt files."""
    if isinstance(source, str) and source in DATASETS:
        spec = get_dataset(source)
        if spec.kind != "text":
            text_names = [s.name for s in DATASETS.values() if s.kind == "text"]
            raise CorpusError(f"dataset {source!r} holds {spec.kind}, not text; text datasets: {text_names}")
        return read_text_file(resolve_dataset(source, data_dir, cache_dir))
    path = Path(source).expanduser()
    if not path.exists():
        hint = did_you_mean(str(source), DATASETS) if isinstance(source, str) else ""
        raise FileNotFoundError(f"text source {str(source)!r} is neither a file, a folder nor a named "
                                f"dataset{hint}; named datasets: {', '.join(DATASETS)}")
    return read_text_folder(path) if path.is_dir() else read_text_file(path)


def _is_safe_cut(text: str, newline: int) -> bool:
    """A cut right after text[newline] == "\\n" with non-space characters on both sides."""
    return (0 < newline < len(text) - 1 and not text[newline - 1].isspace()
            and not text[newline + 1].isspace())


def split_at_line_breaks(text: str, chunk_chars: int) -> Iterator[str]:
    """Pieces of about `chunk_chars` characters whose concatenation is `text`.

    Every cut falls right after a newline that sits between two non-space characters
    ("word\\nWord"), the last such one before the size limit, else the first after it. A cut there
    splits no run of whitespace, so any tokenizer whose pieces never span a newline next to text
    (characters; GPT-2-style regex pre-tokenization, which keeps "\\n\\n" or " \\n" runs whole)
    gives the same ids chunk by chunk as on the whole text. Cutting at a blank line would not:
    GPT-2's regex reads "\\n\\nThe" as "\\n", "\\n", "The" but a chunk ending in "\\n\\n" as one piece.
    """
    start = 0
    while len(text) - start > chunk_chars:
        limit = start + chunk_chars
        cut = text.rfind("\n", start + 1, limit)
        while cut != -1 and not _is_safe_cut(text, cut):
            cut = text.rfind("\n", start + 1, cut)
        if cut == -1:
            cut = text.find("\n", limit)
            while cut != -1 and not _is_safe_cut(text, cut):
                cut = text.find("\n", cut + 1)
        if cut == -1:
            break  # no safe place left: the rest is one piece
        yield text[start:cut + 1]
        start = cut + 1
    yield text[start:]


def _write_tokens(text: str, tokenizer: TextEncoder, path: Path, dtype: type, chunk_chars: int,
                  progress: Progress | None) -> tuple[int, str]:
    """Tokenize chunk by chunk into a temporary file, fsync, rename to `path`; the token count and
    the sha256 of the bytes written (hashed as they are written, not read back)."""
    n_tokens, done, vocab, digest = 0, 0, tokenizer.vocab_size, hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # only tokenizers that declare it (byte-level BPE, chars) give the same ids chunk by
        # chunk; others (e.g. SentencePiece's Metaspace, which marks each input's start) get
        # the whole text at once
        safe = getattr(tokenizer, "splits_safely_at_line_breaks", False)
        for chunk in split_at_line_breaks(text, chunk_chars) if safe else [text]:
            ids = np.asarray(tokenizer.encode(chunk), dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab):
                bad = ids[(ids < 0) | (ids >= vocab)][0]
                raise CorpusError(f"the tokenizer returned id {bad}, outside its vocab_size {vocab}")
            data = ids.astype(dtype).tobytes()
            f.write(data)
            digest.update(data)
            n_tokens, done = n_tokens + ids.size, done + len(chunk)
            if progress is not None:
                progress("tokenize", done, len(text))
        if n_tokens == 0:
            raise CorpusError("the tokenizer produced no tokens for this text")
    return n_tokens, digest.hexdigest()


def _open_cache(bin_path: Path, meta_path: Path, expected: dict, check_content: bool = True
                ) -> np.memmap | None:
    """The cached tokens when the metadata is readable, matches `expected` and agrees with the
    .bin's size and (with `check_content`) its sha256; otherwise None (the caller rebuilds) with
    the reason logged. The hash catches a .bin of the right size with the wrong bytes (zero-filled
    by a disk or a copy), which would otherwise train on garbage: about 12 ms for Shakespeare's
    5 M tokens (10 MB) where tokenizing them takes 0.7 s."""
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        wrong = [k for k, v in expected.items() if meta.get(k) != v]
        dtype, n_tokens = np.dtype(meta["dtype"]), int(meta["n_tokens"])
        if wrong:
            problem = f"metadata disagrees on {wrong}"
        elif dtype not in (np.uint16, np.uint32) or n_tokens <= 0:
            problem = f"metadata has dtype {dtype} and {n_tokens} tokens"
        elif not bin_path.is_file() or bin_path.stat().st_size != n_tokens * dtype.itemsize:
            size = bin_path.stat().st_size if bin_path.is_file() else "no"
            problem = f"{bin_path.name} has {size} bytes, metadata says {n_tokens} x {dtype.itemsize}"
        elif check_content and not isinstance(meta.get("tokens_sha256"), str):
            problem = "metadata has no checksum of the tokens (an older cache)"
        elif check_content and sha256_file(bin_path) != meta["tokens_sha256"]:
            problem = f"{bin_path.name} does not match its checksum: its content changed"
        else:
            return np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,))
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        problem = f"metadata unreadable ({type(e).__name__}: {e})"
    log.warning("token cache %s is inconsistent (%s); rebuilding it", meta_path, problem)
    return None


class TokenizedCorpus:
    """A corpus's token ids in a read-only memmap. `train` is the first `1 - val_fraction` of the
    tokens and `val` the rest (contiguous, as nanoGPT splits); both are views, nothing is copied."""

    def __init__(self, tokens: np.ndarray, vocab_size: int, val_fraction: float = 0.1,
                 path: Path | None = None) -> None:
        check_fraction("val_fraction", val_fraction)
        self.tokens, self.vocab_size, self.val_fraction, self.path = tokens, vocab_size, val_fraction, path
        n_train = int(len(tokens) * (1 - val_fraction))
        self.train: np.ndarray = tokens[:n_train]
        self.val: np.ndarray = tokens[n_train:]

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return (f"TokenizedCorpus({len(self.tokens):,} tokens: {len(self.train):,} train / "
                f"{len(self.val):,} val, vocab_size={self.vocab_size}, path={self.path})")

    @classmethod
    def build(cls, source: str | Path, tokenizer: TextEncoder, cache_dir: str | Path | None = None,
              val_fraction: float = 0.1, *, chunk_chars: int = CHUNK_CHARS,
              progress: Progress | None = None) -> TokenizedCorpus:
        """Load `source` (see `load_text`) and tokenize it, or reuse the cache in `cache_dir`
        (default: `<cache root>/tokens`) made earlier from the same text and tokenizer."""
        return cls.from_text(load_text(source), tokenizer, cache_dir, val_fraction,
                             chunk_chars=chunk_chars, progress=progress, name=str(source))

    @classmethod
    def from_text(cls, text: str, tokenizer: TextEncoder, cache_dir: str | Path | None = None,
                  val_fraction: float = 0.1, *, chunk_chars: int = CHUNK_CHARS,
                  progress: Progress | None = None, name: str = "<text>") -> TokenizedCorpus:
        """Tokenize `text` once into `<cache_dir>/<key>.bin` (+ `.json` metadata), key = sha256 of
        the text and the tokenizer's fingerprint: changed text or tokenizer means a new cache.
        The .bin is written and renamed before the metadata, so a crash leaves no trusted cache."""
        check_fraction("val_fraction", val_fraction)
        if not text:
            raise CorpusError(f"{name} has no text")
        if chunk_chars <= 0:
            raise ValueError(f"chunk_chars must be > 0, got {chunk_chars}")
        folder = Path(cache_dir) if cache_dir is not None else cache_root() / "tokens"
        remove_stale_temporaries(folder)  # a killed build's partial .bin (only dead processes' files)
        expected = {"format": CACHE_FORMAT, "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                    "tokenizer_fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size}
        key = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:32]
        bin_path, meta_path = folder / f"{key}.bin", folder / f"{key}.json"
        tokens = _open_cache(bin_path, meta_path, expected)
        if tokens is not None:
            log.info("reusing token cache %s for %s (%d tokens)", bin_path, name, len(tokens))
        else:
            folder.mkdir(parents=True, exist_ok=True)
            dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
            log.info("tokenizing %s (%d characters) into %s", name, len(text), bin_path)
            meta_path.unlink(missing_ok=True)  # from here on, no stale metadata can vouch for the .bin
            n_tokens, digest = _write_tokens(text, tokenizer, bin_path, dtype, chunk_chars, progress)
            write_json_atomic(meta_path, {**expected, "dtype": np.dtype(dtype).name, "n_tokens": n_tokens,
                                          "tokens_sha256": digest, "n_chars": len(text), "source": name},
                              indent=1)
            tokens = _open_cache(bin_path, meta_path, expected, check_content=False)  # hashed as written
            if tokens is None:
                raise CorpusError(f"token cache {bin_path} could not be read back after writing it")
        return cls(tokens, tokenizer.vocab_size, val_fraction, bin_path)


def _check_batch_args(n_tokens: int, batch_size: int, context: int, rank: int, world_size: int,
                      seed: int, step: int) -> None:
    if batch_size <= 0 or context <= 0 or world_size <= 0:
        raise ValueError(f"batch_size, context and world_size must be > 0, got {batch_size}, {context}, "
                         f"{world_size}")
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} (the global batch) is not divisible by world_size "
                         f"{world_size}; choose a multiple of {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be >= 0, got seed={seed}, step={step}")
    if n_tokens < context + 1:
        raise ValueError(f"a window of context {context} needs {context + 1} tokens but the array has "
                         f"{n_tokens}; use a smaller context or more text (for a validation split, a "
                         "larger val_fraction)")


def _windows(tokens: np.ndarray, starts: np.ndarray, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = starts[:, None] + np.arange(context)        # (b, context)
    x = torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))
    y = torch.from_numpy(np.asarray(tokens[index + 1], dtype=np.int64))  # next token of each position
    return x, y


def causal_lm_batch(tokens: np.ndarray, batch_size: int, context: int, step: int, seed: int,
                    rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) int64 tensors of shape (batch_size // world_size, context), y = x shifted by one.

    The window starts of the whole global batch are drawn from `np.random.default_rng([seed, step])`
    and rank r takes rows [r*b, (r+1)*b): a batch depends on (seed, step) alone, so a resumed run
    continues exactly, and N processes together see the global batch of one process."""
    _check_batch_args(len(tokens), batch_size, context, rank, world_size, seed, step)
    starts = np.random.default_rng([seed, step]).integers(0, len(tokens) - context, size=batch_size)
    rows = batch_size // world_size
    return _windows(tokens, starts[rank * rows:(rank + 1) * rows], context)


def eval_batches(tokens: np.ndarray, batch_size: int, context: int, n_batches: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n_batches` fixed (x, y) batches for validation loss: the same windows at every evaluation,
    drawn from a stream of their own ([seed, i, 1]) and split over ranks like `causal_lm_batch`."""
    if n_batches <= 0:
        raise ValueError(f"n_batches must be > 0, got {n_batches}")
    _check_batch_args(len(tokens), batch_size, context, rank, world_size, seed, 0)
    rows = batch_size // world_size
    batches = []
    for i in range(n_batches):
        starts = np.random.default_rng([seed, i, 1]).integers(0, len(tokens) - context, size=batch_size)
        batches.append(_windows(tokens, starts[rank * rows:(rank + 1) * rows], context))
    return batches
