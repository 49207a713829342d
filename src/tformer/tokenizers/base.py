"""What every tokenizer offers, and the fingerprint that keys caches built with one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence, runtime_checkable

from tformer.files import read_json


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids. `fingerprint()` changes whenever the mapping changes (it keys caches)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def special_tokens(self) -> dict[str, int]: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save(self, path: str | Path) -> None: ...

    def fingerprint(self) -> str: ...


def read_tokenizer_json(path: str | Path, what: str = "tokenizer file") -> dict:
    """A tokenizer file's JSON object; anything else (not JSON, binary, empty, a list, absurdly
    nested) is a ValueError naming the file."""
    try:
        return read_json(path, what)
    except RecursionError:
        raise ValueError(f"{what} {path} is nested too deeply to be a tokenizer file") from None


def check_special_tokens(tokens: Any, where: str) -> list[str]:
    """`tokens` as a list of distinct non-empty strings; a single string is refused (it would
    otherwise become one special token per character)."""
    if isinstance(tokens, str) or not isinstance(tokens, (list, tuple)) or \
            not all(isinstance(t, str) and t for t in tokens) or len(set(tokens)) != len(tokens):
        raise ValueError(f"{where}: special_tokens must be a list of distinct non-empty strings, got "
                         f"{json.dumps(tokens, default=repr)[:80]}")
    return list(tokens)


def json_fingerprint(data: Any) -> str:
    """sha256 of canonical JSON: the same mapping always gives the same key."""
    blob = json.dumps(data, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def decode_stream(tokenizer: Tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """Text pieces as token ids arrive, for streaming. A character may span several byte-level
    tokens, so the text so far is decoded whole and only its new, complete part is yielded."""
    tokens: list[int] = []
    shown = ""
    for token in ids:
        tokens.append(int(token))
        text = tokenizer.decode(tokens)
        if text.endswith("\ufffd"):  # an incomplete character: wait for its other bytes
            continue
        yield text[len(shown):]
        shown = text
    rest = tokenizer.decode(tokens)[len(shown):] if tokens else ""
    if rest:
        yield rest
