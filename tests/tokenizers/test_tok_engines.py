"""The tiktoken engine gives exactly the ids of the HF tokenizers engine, or is not used."""

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tformer.tokenizers import BPETokenizer
from tformer.tokenizers.bpe import tiktoken_mismatch

pytest.importorskip("tiktoken")

SPECIAL = st.sampled_from(["<|endoftext|>", "<|pad|>", "<|endoftext", "'s", "  ", "\n\n"])
MIXED = st.lists(st.one_of(st.text(), SPECIAL), max_size=8).map("".join)


def engines(tok: BPETokenizer) -> tuple[BPETokenizer, BPETokenizer]:
    fast = BPETokenizer.from_dict(tok.to_dict(), engine="tiktoken")
    return fast, BPETokenizer.from_dict(tok.to_dict(), engine="hf")


def test_trained_tokenizers_use_tiktoken(bpe):
    assert bpe.engine == "tiktoken"


@pytest.fixture(scope="module")
def pair(bpe) -> tuple[BPETokenizer, BPETokenizer]:
    return engines(bpe)


@settings(max_examples=300, deadline=None)
@given(text=MIXED)
def test_engines_agree_on_random_unicode(pair, text):
    fast, hf = pair
    assert fast.encode(text) == hf.encode(text)


def test_engines_agree_on_real_text(shakespeare, shakespeare_bpe):
    fast, hf = engines(shakespeare_bpe)
    held_out = shakespeare[len(shakespeare) // 2:]
    assert fast.encode(held_out) == hf.encode(held_out)
    lines = held_out.splitlines(keepends=True)
    assert fast.encode_batch(lines, num_threads=2) == hf.encode_batch(lines, num_threads=2)


def test_engines_agree_on_the_small_corpus(bpe, corpus):
    fast, hf = engines(bpe)
    assert fast.encode(corpus) == hf.encode(corpus)
    assert fast.decode(fast.encode(corpus)) == corpus


def test_falls_back_to_hf_without_tiktoken(bpe, monkeypatch, corpus):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import tiktoken now raises ImportError
    tok = BPETokenizer.from_dict(bpe.to_dict())
    assert tok.engine == "hf" and tok.encode(corpus) == bpe.encode(corpus)
    with pytest.raises(ValueError, match="engine='tiktoken'"):
        BPETokenizer.from_dict(bpe.to_dict(), engine="tiktoken")


def test_incompatible_settings_fall_back_to_hf(bpe):
    data = bpe.to_dict()
    data["tokenizer"]["pre_tokenizer"] = {**data["tokenizer"]["pre_tokenizer"], "add_prefix_space": True}
    tok = BPETokenizer.from_dict(data)
    assert tok.engine == "hf"
    assert tok.encode("hello") != bpe.encode("hello")  # the prefix space is honoured, by HF


def test_mismatch_reasons(bpe):
    inner = bpe.to_dict()["tokenizer"]
    assert tiktoken_mismatch(inner) is None
    merges = inner["model"]["merges"]
    swapped = {**inner, "model": {**inner["model"], "merges": [merges[1], merges[0], *merges[2:]]}}
    assert "increasing" in tiktoken_mismatch(swapped)
    plain = {**inner["added_tokens"][0], "special": False}
    added = {**inner, "added_tokens": [*inner["added_tokens"], plain]}
    assert "special" in tiktoken_mismatch(added)
