"""Any Hugging Face `tokenizer.json` (BPE, WordPiece, ...) behind tformer's Tokenizer protocol."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer as HFTokenizer

from tformer.files import write_json_atomic
from tformer.tokenizers.base import json_fingerprint, read_tokenizer_json
from tformer.tokenizers.bpe import check_dense_ids, find_eos_id, one_line

log = logging.getLogger(__name__)

# Settings that belong to a model's input pipeline, not to the text <-> ids mapping.
RUNTIME_KEYS = ("truncation", "padding")


def is_hf_tokenizer_json(data: dict) -> bool:
    """True when `data` looks like a tokenizer.json: a "model" object with a "type"."""
    return isinstance(data.get("model"), dict) and "type" in data["model"] and "kind" not in data


class HFJsonTokenizer:
    """A `tokenizers.Tokenizer` read from tokenizer.json, without its truncation and padding (the
    data pipeline decides lengths). `save` writes the file's JSON back, those settings included."""

    def __init__(self, data: dict, path: str | Path = "<dict>", add_special_tokens: bool = False) -> None:
        if not is_hf_tokenizer_json(data):
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json (no \"model\" with a \"type\")")
        try:
            self._hf = HFTokenizer.from_str(json.dumps(data))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{path}: Hugging Face tokenizers could not read it ({one_line(e)})") from None
        check_dense_ids(self._hf, path)
        dropped = [k for k in RUNTIME_KEYS if data.get(k)]
        if dropped:
            log.info("%s: ignoring its %s; sequences keep their full length", path, " and ".join(dropped))
        self._hf.no_truncation()
        self._hf.no_padding()
        self._data = data
        self.add_special_tokens = add_special_tokens
        self._special = {t["content"]: t["id"] for t in data.get("added_tokens") or [] if t.get("special")}

    @property
    def model_type(self) -> str:
        """"BPE", "WordPiece", "Unigram" or "WordLevel"."""
        return self._data["model"]["type"]

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def eos_id(self) -> int | None:
        """Id of <|endoftext|>, </s>, <eos> or [SEP] (the first present), or None."""
        return find_eos_id(self._special)

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """Ids of `text`; the post-processor's tokens ([CLS] ... [SEP]) only if add_special_tokens."""
        add = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        return self._hf.encode(text, add_special_tokens=add).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool | None = None) -> list[list[int]]:
        """Like encode, on HF's thread pool (sized by RAYON_NUM_THREADS)."""
        add = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=add)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (WordPiece decoding is lossy: case, accents and spacing may differ)."""
        ids, size = [int(i) for i in ids], self.vocab_size
        bad = next((i for i in ids if not 0 <= i < size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {size}")
        return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def to_dict(self) -> dict:
        """The tokenizer.json as loaded (a fresh copy)."""
        return copy.deepcopy(self._data)

    def save(self, path: str | Path) -> None:
        """Write the tokenizer.json back (atomically), as it was loaded."""
        write_json_atomic(path, self._data)

    def fingerprint(self) -> str:
        """Hash of the tokenizer.json without truncation and padding, which we do not apply."""
        mapping = {k: v for k, v in self._data.items() if k not in RUNTIME_KEYS}
        return json_fingerprint({"kind": "hf", "tokenizer": mapping,
                                 "add_special_tokens": self.add_special_tokens})


def resolve_tokenizer_path(path: str | Path) -> Path:
    """`path` itself, or `path`/tokenizer.json when `path` is a folder."""
    path = Path(path)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"folder {path} has no tokenizer.json")
        return path / "tokenizer.json"
    return path


def load_hf_tokenizer(path: str | Path, add_special_tokens: bool = False) -> HFJsonTokenizer:
    """Load a Hugging Face tokenizer.json (or a folder holding one). Encoding adds no special tokens
    unless `add_special_tokens` (then BERT-style models wrap each text in [CLS] ... [SEP])."""
    path = resolve_tokenizer_path(path)
    data = read_tokenizer_json(path, "tokenizer.json")
    return HFJsonTokenizer(data, path, add_special_tokens=add_special_tokens)
