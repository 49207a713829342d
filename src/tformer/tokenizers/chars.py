"""Character-level tokenizer: one id per distinct character of the training text (nanoGPT's
Shakespeare-char). Small vocabularies for small experiments."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from tformer.files import write_json_atomic
from tformer.tokenizers.base import check_special_tokens, json_fingerprint, read_tokenizer_json

KIND = "tformer.chars"


class CharTokenizer:
    """ids are positions in a sorted character list; special tokens come after the characters."""

    splits_safely_at_line_breaks = True  # encoding pieces of a text gives the ids of the whole

    def __init__(self, chars: Sequence[str], special_tokens: Sequence[str] = ()) -> None:
        if isinstance(chars, str) or not all(isinstance(c, str) and len(c) == 1 for c in chars) \
                or len(set(chars)) != len(chars):
            raise ValueError("chars must be a list of distinct single characters")
        special_tokens = check_special_tokens(special_tokens, "a character tokenizer")
        self.chars = list(chars)
        self._ids = {c: i for i, c in enumerate(self.chars)}
        self._special = {tok: len(self.chars) + i for i, tok in enumerate(special_tokens)}
        self._by_id = {**dict(enumerate(self.chars)), **{i: t for t, i in self._special.items()}}

    @classmethod
    def train(cls, texts: str | Iterable[str], special_tokens: Sequence[str] = ()) -> CharTokenizer:
        """Collect the distinct characters of a text (or of an iterable of texts)."""
        seen: set[str] = set()
        for text in [texts] if isinstance(texts, str) else texts:
            seen.update(text)
        if not seen:
            raise ValueError("cannot build a character tokenizer from empty text")
        return cls(sorted(seen), special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + len(self._special)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this tokenizer's vocabulary of "
                             f"{len(self.chars)} characters (it was built from other text)") from None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        try:
            return "".join(self._by_id[int(i)] for i in ids)
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is out of range for a vocabulary of "
                             f"{self.vocab_size}") from None

    def to_dict(self) -> dict:
        return {"kind": KIND, "chars": self.chars, "special_tokens": list(self._special)}

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        return cls.from_dict(read_tokenizer_json(path, "character tokenizer file"), path)

    @classmethod
    def from_dict(cls, data: dict, path: str | Path = "<dict>") -> CharTokenizer:
        """A saved character tokenizer; a field of the wrong type is a ValueError naming `path`."""
        if data.get("kind") != KIND:
            raise ValueError(f"{path} is not a tformer character tokenizer (kind={data.get('kind')!r})")
        chars = data.get("chars")
        if not isinstance(chars, list) or not chars:
            raise ValueError(f"{path} has no \"chars\" list of characters; was it edited?")
        try:
            return cls(chars, check_special_tokens(data.get("special_tokens", []), str(path)))
        except ValueError as e:
            message = str(e)
            raise ValueError(message if str(path) in message else f"{path}: {message}") from None

    def fingerprint(self) -> str:
        return json_fingerprint(self.to_dict())
