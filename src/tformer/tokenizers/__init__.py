"""Tokenizers: characters, byte-level BPE and Hugging Face tokenizer.json files, one protocol.

    tok = train_tokenizer("bpe", ["corpus.txt"], vocab_size=4096)
    tok.save("tok.json"); tok = load_tokenizer("tok.json")
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tformer.config import check_choice
from tformer.tokenizers.base import Tokenizer, read_tokenizer_json
from tformer.tokenizers.bpe import KIND as BPE_KIND
from tformer.tokenizers.bpe import BPETokenizer, Source, split_source
from tformer.tokenizers.chars import KIND as CHARS_KIND
from tformer.tokenizers.chars import CharTokenizer
from tformer.tokenizers.huggingface import (
    HFJsonTokenizer,
    is_hf_tokenizer_json,
    load_hf_tokenizer,
    resolve_tokenizer_path,
)

__all__ = ["Tokenizer", "CharTokenizer", "BPETokenizer", "HFJsonTokenizer", "load_tokenizer",
           "load_hf_tokenizer", "train_tokenizer"]

KINDS = ("bpe", "char")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved by tformer (character or BPE) or a Hugging Face tokenizer.json; a
    folder holding tokenizer.json works too. The file's content, not its name, decides the kind."""
    path = resolve_tokenizer_path(path)
    data = read_tokenizer_json(path, "tokenizer file")
    kind = data.get("kind")
    if kind == CHARS_KIND:
        return CharTokenizer.from_dict(data, path)
    if kind == BPE_KIND:
        return BPETokenizer.from_dict(data, path)
    if is_hf_tokenizer_json(data):
        return HFJsonTokenizer(data, path)
    raise ValueError(f"{path} is not a tokenizer file tformer knows (kind={kind!r}): expected "
                     f"kind {CHARS_KIND!r} or {BPE_KIND!r}, or a Hugging Face tokenizer.json")


def train_tokenizer(kind: str, files: Source, vocab_size: int | None = None,
                    special_tokens: Sequence[str] = ("<|endoftext|>",)) -> Tokenizer:
    """Train a "bpe" (vocab_size required) or "char" tokenizer (vocab_size, if given, is a cap) on
    files (a path or a list of paths) or an iterator of texts."""
    check_choice("kind", kind, KINDS)
    if kind == "bpe":
        if vocab_size is None:
            raise ValueError("a BPE tokenizer needs vocab_size (for example 4096)")
        return BPETokenizer.train(files, vocab_size, special_tokens=special_tokens)
    paths, texts = split_source(files)
    if paths is not None:
        texts = (p.read_text(encoding="utf-8") for p in paths)
    tok = CharTokenizer.train(texts, special_tokens=special_tokens)
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise ValueError(f"the text has {tok.vocab_size - len(special_tokens)} distinct characters; with "
                         f"{len(special_tokens)} special token(s) that exceeds vocab_size={vocab_size}")
    return tok
