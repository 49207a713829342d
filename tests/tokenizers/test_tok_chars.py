"""Character tokenizer: save/load, clear errors."""

import pytest

from tformer.tokenizers import CharTokenizer, Tokenizer


def test_save_load_same_ids_and_fingerprint(tmp_path):
    tok = CharTokenizer.train(["hello", " world 🤖"], special_tokens=("<|endoftext|>",))
    tok.save(tmp_path / "c.json")
    again = CharTokenizer.load(tmp_path / "c.json")
    assert isinstance(again, Tokenizer)
    assert again.encode("hello 🤖") == tok.encode("hello 🤖") and again.fingerprint() == tok.fingerprint()
    assert again.decode([*tok.encode("he"), tok.special_tokens["<|endoftext|>"]]) == "he<|endoftext|>"


def test_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="distinct"):
        CharTokenizer(["a", "b"], special_tokens=("<e>", "<e>"))
    tok = CharTokenizer.train("ab")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([2])
    with pytest.raises(ValueError, match="empty text"):
        CharTokenizer.train("")
    path = tmp_path / "c.json"
    path.write_text('{"kind": "tformer.chars"}')
    with pytest.raises(ValueError, match="no \"chars\""):
        CharTokenizer.load(path)
