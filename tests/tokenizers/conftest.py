"""Shared training text and trained tokenizers for the tokenizer tests (small: milliseconds)."""

import os
from pathlib import Path

import pytest

from tformer.tokenizers import BPETokenizer

CORPUS = """\
It is a truth universally acknowledged, that a single man in possession of a good fortune, must be
in want of a wife. However little known the feelings or views of such a man may be on his first
entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families.
Der schnelle braune Fuchs springt über den faulen Hund; naïve café, résumé, Ångström.
東京は日本の首都です。 Привет, мир! 🤖🎉 The year 2024 had 366 days; they'll say it's 3.14.
def train(model, data):  # code    with   runs of spaces
    return model.fit(data, epochs=10)
""" * 3

SPECIALS = ("<|endoftext|>", "<|pad|>")
SHAKESPEARE_BYTES = 200_000


@pytest.fixture(scope="session")
def corpus() -> str:
    return CORPUS


@pytest.fixture(scope="session")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(iter([CORPUS]), vocab_size=400, special_tokens=SPECIALS)


@pytest.fixture(scope="session")
def shakespeare() -> str:
    """A 200 KB slice of $TFORMER_DATA_DIR/text/shakespeare.txt; skip when the variable is unset."""
    root = os.environ.get("TFORMER_DATA_DIR")
    if not root:
        pytest.skip("set TFORMER_DATA_DIR to run tests on real text")
    raw = (Path(root) / "text" / "shakespeare.txt").read_bytes()[:SHAKESPEARE_BYTES]
    return raw.decode("utf-8", errors="ignore")


@pytest.fixture(scope="session")
def shakespeare_bpe(shakespeare: str) -> BPETokenizer:
    return BPETokenizer.train(iter([shakespeare[: len(shakespeare) // 2]]), vocab_size=1024)
