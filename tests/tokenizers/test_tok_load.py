"""load_tokenizer picks the kind from the file's content; train_tokenizer trains either kind."""

import json
import subprocess
import sys

import pytest

from tformer.config import ConfigError
from tformer.tokenizers import BPETokenizer, CharTokenizer, HFJsonTokenizer, load_tokenizer, train_tokenizer

TEXT = "hello world, it's a test 🤖"


def test_loads_each_kind(bpe, tmp_path):
    chars = CharTokenizer.train(TEXT, special_tokens=("<|endoftext|>",))
    chars.save(tmp_path / "chars.json")
    bpe.save(tmp_path / "bpe.json")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(bpe.to_dict()["tokenizer"]))
    for name, cls, reference in [("chars.json", CharTokenizer, chars), ("bpe.json", BPETokenizer, bpe),
                                 ("hf", HFJsonTokenizer, bpe), ("hf/tokenizer.json", HFJsonTokenizer, bpe)]:
        tok = load_tokenizer(tmp_path / name)
        assert isinstance(tok, cls), name
        assert tok.encode(TEXT) == reference.encode(TEXT), name
    assert load_tokenizer(tmp_path / "bpe.json").fingerprint() == bpe.fingerprint()


@pytest.mark.parametrize("content", ['{"kind": "tformer.pixels"}', '{"vocab": {"a": 0}}', "not json", "[]"])
def test_unknown_or_garbled_files_give_one_clear_error(tmp_path, content):
    path = tmp_path / "mystery.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="mystery.json"):
        load_tokenizer(path)
    assert path.read_text() == content


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        load_tokenizer(tmp_path / "nothing.json")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_train_tokenizer_both_kinds(tmp_path, corpus):
    path = tmp_path / "corpus.txt"
    path.write_text(corpus, encoding="utf-8")
    bpe = train_tokenizer("bpe", path, vocab_size=300)
    assert isinstance(bpe, BPETokenizer) and bpe.vocab_size == 300 and bpe.eos_id is not None
    chars = train_tokenizer("char", [path], special_tokens=())
    assert isinstance(chars, CharTokenizer) and chars.decode(chars.encode(corpus)) == corpus
    assert train_tokenizer("char", iter([corpus])).vocab_size == chars.vocab_size + 1


def test_train_tokenizer_errors(tmp_path, corpus):
    with pytest.raises(ConfigError, match="did you mean 'bpe'"):
        train_tokenizer("bep", iter([corpus]), vocab_size=300)
    with pytest.raises(ValueError, match="needs vocab_size"):
        train_tokenizer("bpe", iter([corpus]))
    with pytest.raises(ValueError, match="exceeds vocab_size=10"):
        train_tokenizer("char", iter([corpus]), vocab_size=10)
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        train_tokenizer("char", tmp_path / "absent.txt")


def test_char_not_in_vocabulary_is_named():
    with pytest.raises(ValueError, match="'z' is not in this tokenizer's vocabulary"):
        CharTokenizer.train("abc").encode("abz")


def test_tokenizers_package_does_not_import_torch():
    code = "import sys, tformer.tokenizers; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
