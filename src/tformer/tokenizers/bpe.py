"""Byte-level BPE (GPT-2 style): trained and stored with Hugging Face `tokenizers`; encoded with
`tiktoken` when it is installed and gives the same ids (about 4x faster), else with `tokenizers`."""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Union

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from tformer.config import check_choice
from tformer.files import write_json_atomic
from tformer.tokenizers.base import check_special_tokens, json_fingerprint, read_tokenizer_json

log = logging.getLogger(__name__)

KIND = "tformer.bpe"
FORMAT = 1
ENGINES = ("auto", "tiktoken", "hf")
# GPT-2's split pattern, as HF's ByteLevel pre-tokenizer has it (tokenizers/src/pre_tokenizers/
# byte_level.rs). tiktoken's r50k_base now spells it with possessive quantifiers; we use HF's text.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "[SEP]")
PARALLEL_MIN_CHARS = 1 << 16  # below this a batch is encoded on the calling thread
# Probe text for the engine check: contractions, digits, runs of spaces, CJK, emoji, combining marks.
PROBE = ("It's 2024; they'll   say  'hello'\n\n\tworld!! 123,456 naïve café ÀÉ 東京 🤖🎉 e\u0301 "
         "a\u00a0b \u2028x  \r\n ??? 'S 'LL Ω≈ç√ -- __init__ <tag> x\u200bz \x00 end ")

Source = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], Iterator[str]]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (openai/gpt-2 src/encoder.py), as HF uses it."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}


def one_line(error: BaseException) -> str:
    """The first line of an error message (HF tokenizers' messages can span several)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def check_dense_ids(hf: HFTokenizer, path: str | Path) -> None:
    """Token ids must be 0 .. vocab_size - 1: a model's embedding has vocab_size rows, so an id
    past it (a vocabulary entry deleted or renumbered by hand) would fail inside the model."""
    ids = set(hf.get_vocab(with_added_tokens=True).values())
    size = hf.get_vocab_size(with_added_tokens=True)
    if ids != set(range(size)):
        outside = sorted(i for i in ids if not 0 <= i < size)[:3] or sorted(set(range(size)) - ids)[:3]
        raise ValueError(f"{path}: token ids must run from 0 to {size - 1} without gaps or repeats, but "
                         f"the vocabulary has {len(ids)} distinct ids ({outside} out of place); was it "
                         "edited?")


def find_eos_id(special_tokens: dict[str, int]) -> int | None:
    """Id of the first of EOS_TOKENS present, or None."""
    return next((special_tokens[t] for t in EOS_TOKENS if t in special_tokens), None)


def default_num_threads() -> int:
    """RAYON_NUM_THREADS if set (the knob HF tokenizers reads too), 1 when TOKENIZERS_PARALLELISM
    is false, else the CPUs this process may use."""
    if os.environ.get("RAYON_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["RAYON_NUM_THREADS"]))
    if os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in ("0", "false", "no", "off"):
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_files(files: Iterable[str | os.PathLike]) -> list[Path]:
    """Paths that all exist as files, or an error that names every one that does not."""
    paths = [Path(f) for f in files]
    if not paths:
        raise ValueError("no training files were given")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"training file(s) not found: {', '.join(missing)} (if these are texts "
                                "rather than file names, pass iter(texts))")
    return paths


def split_source(source: Source) -> tuple[list[Path] | None, Iterator[str] | None]:
    """A path or a list/tuple of paths -> (files, None); an iterator of strings -> (None, texts)."""
    if isinstance(source, (str, os.PathLike)):
        return check_files([source]), None
    if isinstance(source, (list, tuple)):
        return check_files(source), None
    if isinstance(source, Iterator):
        return None, source
    raise TypeError("expected a file path, a list of paths or an iterator of texts, "
                    f"got {type(source).__name__}")


class _CountingIterator:
    """Passes texts through to the trainer and counts characters, to detect empty training data."""

    def __init__(self, texts: Iterator[str]) -> None:
        self.texts, self.chars = texts, 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            if not isinstance(text, str):
                raise TypeError(f"training texts must be str, got {type(text).__name__}")
            self.chars += len(text)
            yield text


def tiktoken_mismatch(data: dict) -> str | None:
    """Why tiktoken's algorithm (merge the adjacent pair whose concatenation has the lowest rank)
    could differ from HF's (apply merges in list order) on this tokenizer.json, or None."""
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    if data.get("normalizer") or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") \
            or not pre.get("use_regex", True):
        return "needs no normalizer and a ByteLevel pre-tokenizer without prefix space"
    if model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback") \
            or model.get("ignore_merges") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        return "needs a plain BPE model (no dropout, byte fallback, ignore_merges, affixes)"
    added = data.get("added_tokens") or []
    if any(not t["special"] or t["lstrip"] or t["rstrip"] or t["single_word"] for t in added):
        return "added tokens must be plain special tokens"
    contents = [t["content"] for t in added]
    if any(a != b and a in b for a in contents for b in contents):
        return "a special token is contained in another"
    vocab = model["vocab"]
    results = ["".join(m) if isinstance(m, list) else m.replace(" ", "") for m in model["merges"]]
    ids = [vocab.get(r, -1) for r in results]
    if any(a >= b for a, b in zip([-1, *ids], ids)):
        return "merge results must be distinct and have ids increasing in merge order"
    if set(vocab) - set(contents) != set(BYTE_OF_CHAR) | set(results):
        return "vocabulary must be the 256 bytes plus one token per merge"
    return None


def build_tiktoken(hf: HFTokenizer, data: dict) -> Any | None:
    """A tiktoken.Encoding giving the same ids as `hf`, or None (logged) when that cannot be had."""
    reason = tiktoken_mismatch(data)
    try:
        import tiktoken
    except ImportError:
        reason = reason or "tiktoken is not installed"
    if reason:
        log.info("encoding BPE with HF tokenizers, not tiktoken: %s", reason)
        return None
    special = {t["content"]: t["id"] for t in data.get("added_tokens") or []}
    ranks = {bytes(BYTE_OF_CHAR[c] for c in tok): i for tok, i in data["model"]["vocab"].items()
             if tok not in special}
    enc = tiktoken.Encoding(f"tformer-bpe-{len(ranks)}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens=special)
    # Equal rules must give equal ids; check on every whole-character token and a mixed probe.
    texts = [PROBE, *special, PROBE.join(special)]
    for tok in ranks:
        try:
            texts.append(tok.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    expected = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    got = [enc.encode(t, allowed_special="all") for t in texts]
    if expected != got:
        bad = next(t for t, a, b in zip(texts, expected, got) if a != b)
        log.warning("encoding BPE with HF tokenizers: tiktoken disagrees on %r", bad)
        return None
    return enc


class BPETokenizer:
    """Byte-level BPE: any Unicode text round-trips exactly; special tokens are single ids."""

    # GPT-2's pre-tokenizer regex never joins across "word\nWord", where data.text cuts chunks
    splits_safely_at_line_breaks = True

    def __init__(self, hf: HFTokenizer, *, eos_token: str | None = None, engine: str = "auto") -> None:
        check_choice("engine", engine, ENGINES)
        self._hf = hf
        self._data = json.loads(hf.to_str())
        self._special = {t["content"]: t["id"] for t in self._data.get("added_tokens") or [] if t["special"]}
        if eos_token is not None and eos_token not in self._special:
            raise ValueError(f"eos_token {eos_token!r} is not a special token: {list(self._special)}")
        self.eos_token = eos_token if eos_token is not None else next(
            (t for t in EOS_TOKENS if t in self._special), None)
        self._tiktoken = None if engine == "hf" else build_tiktoken(hf, self._data)
        if engine == "tiktoken" and self._tiktoken is None:
            raise ValueError("engine='tiktoken' was asked for but cannot give HF's ids here (see the log); "
                             "use engine='auto'")
        self._special_set = frozenset(self._special)

    @classmethod
    def train(cls, files_or_iterator: Source, vocab_size: int,
              special_tokens: Sequence[str] = ("<|endoftext|>",), min_frequency: int = 2,
              show_progress: bool = False, engine: str = "auto") -> BPETokenizer:
        """Learn merges from files (a path or a list of paths) or from an iterator of texts."""
        specials = check_special_tokens(special_tokens, "a BPE tokenizer")
        if vocab_size < 256 + len(specials):
            raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs the 256 byte "
                             f"tokens plus {len(specials)} special token(s), at least {256 + len(specials)}")
        files, texts = split_source(files_or_iterator)
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=specials, show_progress=show_progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        if files is not None:
            if all(f.stat().st_size == 0 for f in files):
                raise ValueError(f"empty training data: {', '.join(map(str, files))} hold no text")
            try:
                hf.train([str(f) for f in files], trainer)
            except Exception as e:  # tokenizers raises a bare Exception, e.g. on non-UTF-8 bytes
                raise ValueError(f"could not train on {', '.join(map(str, files))}: {e}") from e
        else:
            counted = _CountingIterator(texts)
            hf.train_from_iterator(counted, trainer)
            if counted.chars == 0:
                raise ValueError("empty training data: the iterator gave no text")
        if hf.get_vocab_size() < vocab_size:
            log.warning("trained %d tokens, fewer than vocab_size=%d: the text has too few pairs seen "
                        "%d+ times", hf.get_vocab_size(), vocab_size, min_frequency)
        return cls(hf, engine=engine)

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-text token (`eos_token`: <|endoftext|> or another of EOS_TOKENS), or None."""
        return None if self.eos_token is None else self._special[self.eos_token]

    @property
    def engine(self) -> str:
        """"tiktoken" or "hf": which library encodes (both give the same ids)."""
        return "hf" if self._tiktoken is None else "tiktoken"

    def encode(self, text: str) -> list[int]:
        if self._tiktoken is not None:
            return self._tiktoken.encode(text, allowed_special=self._special_set)
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode on `num_threads` threads (default: default_num_threads()). With the HF engine more
        than one thread means HF's own pool, sized by RAYON_NUM_THREADS."""
        texts = list(texts)
        threads = default_num_threads() if num_threads is None else max(1, num_threads)
        if threads == 1 or len(texts) < 2 or sum(map(len, texts)) < PARALLEL_MIN_CHARS:
            return [self.encode(t) for t in texts]
        if self._tiktoken is None:
            return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]
        # tiktoken releases the GIL while it encodes; a few slices per thread keep the hand-off cheap.
        step = -(-len(texts) // (4 * threads))
        slices = [texts[i:i + step] for i in range(0, len(texts), step)]
        with ThreadPoolExecutor(threads) as pool:
            return [ids for part in pool.map(self._encode_list, slices) for ids in part]

    def _encode_list(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; a cut through a multi-byte character shows as U+FFFD."""
        ids, size = [int(i) for i in ids], self.vocab_size
        bad = next((i for i in ids if not 0 <= i < size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {size}")
        return self._hf.decode(ids, skip_special_tokens=False)

    def to_dict(self) -> dict:
        """The saved form (a fresh copy: changing it does not change this tokenizer)."""
        return {"kind": KIND, "format": FORMAT, "eos_token": self.eos_token,
                "tokenizer": copy.deepcopy(self._data)}

    def save(self, path: str | Path) -> None:
        """One JSON file: our header plus HF's tokenizer.json under "tokenizer"."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path, engine: str = "auto") -> BPETokenizer:
        return cls.from_dict(read_tokenizer_json(path, "BPE tokenizer file"), path, engine=engine)

    @classmethod
    def from_dict(cls, data: dict, path: str | Path = "<dict>", engine: str = "auto") -> BPETokenizer:
        """A saved BPE tokenizer; a field of the wrong type is a ValueError naming `path`."""
        if data.get("kind") != KIND:
            raise ValueError(f"{path} is not a tformer BPE tokenizer (kind={data.get('kind')!r})")
        version = data.get("format", FORMAT)
        if type(version) is not int or not 1 <= version <= FORMAT:
            raise ValueError(f"{path} has format {version!r}; this tformer reads formats 1 to {FORMAT}")
        inner, eos = data.get("tokenizer"), data.get("eos_token")
        model = inner.get("model") if isinstance(inner, dict) else None
        pre = inner.get("pre_tokenizer") if isinstance(inner, dict) else None
        if not (isinstance(model, dict) and model.get("type") == "BPE" and isinstance(pre, dict)
                and pre.get("type") == "ByteLevel"):
            raise ValueError(f"{path}: 'tokenizer' must hold a byte-level BPE tokenizer.json")
        if eos is not None and not isinstance(eos, str):
            raise ValueError(f"{path}: eos_token must be a string or null, got {json.dumps(eos)[:40]}")
        try:
            hf = HFTokenizer.from_str(json.dumps(inner))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed model
            raise ValueError(f"{path}: the tokenizer inside could not be read ({one_line(e)})") from None
        check_dense_ids(hf, path)
        try:
            return cls(hf, eos_token=eos, engine=engine)
        except ValueError as e:
            raise ValueError(f"{path}: {one_line(e)}") from None

    def fingerprint(self) -> str:
        """Hash of what maps text to ids: vocab, merges, special tokens, eos, pre-tokenizer."""
        model = self._data["model"]
        merges = [m if isinstance(m, list) else m.split(" ") for m in model["merges"]]
        return json_fingerprint({"kind": KIND, "vocab": model["vocab"], "merges": merges,
                                 "special_tokens": self._special, "eos_token": self.eos_token,
                                 "normalizer": self._data.get("normalizer"),
                                 "pre_tokenizer": self._data.get("pre_tokenizer")})
