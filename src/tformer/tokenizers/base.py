"""What every tokenizer offers, and the fingerprint that keys caches built with one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence, runtime_checkable


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
