"""Text corpora: loading and its errors, the token cache (reuse, invalidation, repair), chunking."""

import hashlib
import json
import os
import re
import zlib
from pathlib import Path

import numpy as np
import pytest

from tformer.config import ConfigError
from tformer.data import CorpusError, DatasetNotFoundError, TokenizedCorpus, load_text, split_at_line_breaks
from tformer.tokenizers.chars import CharTokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20


class CountingTokenizer:
    """A CharTokenizer that counts encode calls (to see whether a cache was reused)."""

    splits_safely_at_line_breaks = True  # as the CharTokenizer it wraps

    def __init__(self, inner: CharTokenizer) -> None:
        self.inner, self.calls = inner, 0

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return self.inner.encode(text)

    def fingerprint(self) -> str:
        return self.inner.fingerprint()


@pytest.fixture
def counting_tokenizer():
    return CountingTokenizer(CharTokenizer.train(TEXT.lower() + TEXT.upper() + "-"))


def test_load_file_folder_and_dataset(tmp_path):
    (tmp_path / "one.txt").write_text("\ufeffone")
    assert load_text(tmp_path / "one.txt") == "one"                     # BOM dropped
    folder = tmp_path / "corpus"
    files = {"b.txt": "bee", "a/z.txt": "zed", "a.txt": "ay", ".hidden/x.txt": "no", "c.md": "no"}
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    assert load_text(folder) == "ay\n\nzed\n\nbee"                    # sorted by relative path
    (tmp_path / "data/text").mkdir(parents=True)
    (tmp_path / "data/text/shakespeare.txt").write_text("To be")
    assert load_text("shakespeare", data_dir=tmp_path / "data") == "To be"


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="did you mean 'shakespeare'"):
        load_text("shakespear")
    with pytest.raises(CorpusError, match="holds images, not text"):
        load_text("mnist-10k")
    with pytest.raises(DatasetNotFoundError):
        load_text("shakespeare", data_dir=tmp_path)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(CorpusError, match=r"empty\.txt is empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("line one\ncaf\u00e9".encode("latin-1"))
    not_utf8 = r"latin1\.txt is not UTF-8 text: byte 0xe9 at byte offset 12 \(line 2\)"
    with pytest.raises(CorpusError, match=not_utf8):
        load_text(tmp_path / "latin1.txt")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(CorpusError, match="no .txt files"):
        load_text(tmp_path / "nothing")


def build(source, tokenizer, cache, **kw):
    return TokenizedCorpus.build(source, tokenizer, cache, **kw)


def test_cache_is_reused_and_split_is_contiguous(tmp_path, counting_tokenizer):
    source = tmp_path / "t.txt"
    source.write_text(TEXT)
    first = build(source, counting_tokenizer, tmp_path / "cache", chunk_chars=500)
    calls = counting_tokenizer.calls
    assert calls > 1                                                    # chunked
    second = build(source, counting_tokenizer, tmp_path / "cache", val_fraction=0.25)
    assert counting_tokenizer.calls == calls                            # no re-tokenization
    assert isinstance(second.train, np.memmap) and second.tokens.dtype == np.uint16
    assert np.array_equal(second.tokens, counting_tokenizer.inner.encode(TEXT))
    assert np.array_equal(np.concatenate([second.train, second.val]), first.tokens)
    assert len(second.train) == int(len(TEXT) * 0.75) and second.vocab_size == counting_tokenizer.vocab_size


def test_changed_text_or_tokenizer_retokenizes(tmp_path, counting_tokenizer):
    source = tmp_path / "t.txt"
    source.write_text(TEXT)
    build(source, counting_tokenizer, tmp_path / "cache")
    source.write_text(TEXT.replace("Speak", "speak"))
    changed = build(source, counting_tokenizer, tmp_path / "cache")
    assert counting_tokenizer.calls == 2
    assert counting_tokenizer.inner.decode(changed.tokens[:200].tolist()) == source.read_text()[:200]
    other = CountingTokenizer(CharTokenizer(counting_tokenizer.inner.chars, special_tokens=["<eos>"]))
    build(source, other, tmp_path / "cache")
    assert other.calls == 1 and len(list((tmp_path / "cache").glob("*.bin"))) == 3


def corrupt_bin(cache: Path) -> None:
    (bin_path,) = cache.glob("*.bin")
    with open(bin_path, "r+b") as f:
        f.truncate(bin_path.stat().st_size - 2)


def corrupt_meta(cache: Path) -> None:
    (meta_path,) = cache.glob("*.json")
    meta_path.write_text('{"format": 1, "dtype": "uint16", "n_tok')


def zero_fill_bin(cache: Path) -> None:
    """Same size, content lost (a disk or copy that wrote zeros): the sizes still agree."""
    (bin_path,) = cache.glob("*.bin")
    bin_path.write_bytes(bytes(bin_path.stat().st_size))


def flip_one_token(cache: Path) -> None:
    (bin_path,) = cache.glob("*.bin")
    data = bytearray(bin_path.read_bytes())
    data[len(data) // 2] ^= 1
    bin_path.write_bytes(bytes(data))


def drop_checksum(cache: Path) -> None:
    """A cache whose metadata vouches for no content (as an older tformer wrote them)."""
    (meta_path,) = cache.glob("*.json")
    meta = json.loads(meta_path.read_text())
    del meta["tokens_sha256"]
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("corrupt", [corrupt_bin, corrupt_meta, zero_fill_bin, flip_one_token, drop_checksum])
def test_broken_cache_is_detected_and_rebuilt(tmp_path, counting_tokenizer, corrupt, caplog):
    source = tmp_path / "t.txt"
    source.write_text(TEXT)
    before = (source.read_bytes(), os.stat(source).st_mtime_ns)
    build(source, counting_tokenizer, tmp_path / "cache")
    corrupt(tmp_path / "cache")
    repaired = build(source, counting_tokenizer, tmp_path / "cache")
    assert counting_tokenizer.calls == 2 and "inconsistent" in caplog.text
    assert np.array_equal(repaired.tokens, counting_tokenizer.inner.encode(TEXT))
    build(source, counting_tokenizer, tmp_path / "cache")
    assert counting_tokenizer.calls == 2                                # the repaired cache is trusted
    assert (source.read_bytes(), os.stat(source).st_mtime_ns) == before


def test_crash_while_tokenizing_leaves_no_cache(tmp_path, counting_tokenizer):
    class Crashing(CountingTokenizer):
        def encode(self, text):
            if self.calls == 2:
                raise KeyboardInterrupt
            return super().encode(text)

    crashing = Crashing(counting_tokenizer.inner)
    with pytest.raises(KeyboardInterrupt):
        TokenizedCorpus.from_text(TEXT, crashing, tmp_path / "cache", chunk_chars=300)
    assert list((tmp_path / "cache").iterdir()) == []                  # no .bin, .json or temp file
    assert len(TokenizedCorpus.from_text(TEXT, counting_tokenizer, tmp_path / "cache")) == len(TEXT)


def test_corpus_errors(tmp_path, counting_tokenizer):
    with pytest.raises(ConfigError, match="val_fraction"):
        TokenizedCorpus.from_text(TEXT, counting_tokenizer, tmp_path, val_fraction=1.0)
    with pytest.raises(CorpusError, match="no text"):
        TokenizedCorpus.from_text("", counting_tokenizer, tmp_path)
    with pytest.raises(ValueError, match="not in this tokenizer's vocabulary"):
        TokenizedCorpus.from_text("\u00e9", counting_tokenizer, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_big_vocab_uses_uint32(tmp_path):
    class Wide:
        vocab_size = 70_000

        def encode(self, text):
            return [69_999 if c == "z" else ord(c) for c in text]

        def fingerprint(self):
            return "wide"

    corpus = TokenizedCorpus.from_text("abz" * 10, Wide(), tmp_path)
    assert corpus.tokens.dtype == np.uint32 and corpus.tokens[2] == 69_999


# --- chunk boundaries ----------------------------------------------------------------------

GPT2_PIECES = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+""")


class RegexPieces:
    """GPT-2-style pre-tokenization, one id per piece: chunking must not change the pieces."""

    vocab_size = 1 << 20

    def encode(self, text):
        return [zlib.crc32(piece.encode()) % self.vocab_size for piece in GPT2_PIECES.findall(text)]

    def fingerprint(self):
        return "regex-pieces"


@pytest.mark.parametrize("chunk_chars", [1, 7, 64, 1000, 10**9])
def test_chunks_are_a_partition_and_tokenize_like_the_whole(chunk_chars):
    text = TEXT + "  trailing spaces \n\n\n  indented\nlast"
    pieces = list(split_at_line_breaks(text, chunk_chars))
    assert "".join(pieces) == text
    for tokenizer in [CharTokenizer.train(text), RegexPieces()]:
        assert sum((tokenizer.encode(p) for p in pieces), []) == tokenizer.encode(text)


def test_cutting_at_blank_lines_would_change_regex_pieces():
    text = "one.\n\nTwo"
    tokenizer = RegexPieces()
    assert tokenizer.encode("one.\n\n") + tokenizer.encode("Two") != tokenizer.encode(text)
    assert list(split_at_line_breaks(text, 4)) == [text]               # no safe cut: one piece


# --- the real corpus (CI sets TFORMER_DATA_DIR) -----------------------------------------------

@pytest.mark.skipif(not os.environ.get("TFORMER_DATA_DIR"), reason="TFORMER_DATA_DIR not set")
def test_real_shakespeare_char_corpus(tmp_path):
    text = load_text("shakespeare")
    assert len(text) == 5_057_280 and text.startswith("ALL'S WELL THAT ENDS WELL\n")
    assert hashlib.sha256(text.encode()).hexdigest().startswith("a74b54d1ef1dc44b")
    tokenizer = CharTokenizer.train(text)
    corpus = TokenizedCorpus.build("shakespeare", tokenizer, tmp_path / "cache")
    assert len(corpus) == len(text) and corpus.tokens.dtype == np.uint16
    assert tokenizer.decode(corpus.val[:1000].tolist()) == text[len(corpus.train):len(corpus.train) + 1000]
    prefix = text[:300_000]
    chunked = np.concatenate([tokenizer.encode(p) for p in split_at_line_breaks(prefix, 10_000)])
    assert np.array_equal(chunked, corpus.tokens[:300_000])


def test_tokenizers_that_do_not_declare_chunking_safe_get_the_whole_text(tmp_path):
    """e.g. SentencePiece's Metaspace marks the start of every input: chunks would change ids."""
    class Whole(CountingTokenizer):
        splits_safely_at_line_breaks = False

    tokenizer = Whole(CharTokenizer.train(TEXT))
    corpus = TokenizedCorpus.from_text(TEXT, tokenizer, tmp_path, chunk_chars=100)
    assert tokenizer.calls == 1 and len(corpus) == len(TEXT)
