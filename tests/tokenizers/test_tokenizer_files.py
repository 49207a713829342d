"""Hostile tokenizer files: random bytes, random JSON, valid files of every kind with one part
deleted, replaced or cut off. `load_tokenizer` either loads a tokenizer that encodes and decodes,
or raises ValueError / OSError in one line naming the file; never another exception, and the file
is never changed."""

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tformer.tokenizers import CharTokenizer, load_tokenizer

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROBE = "hello world, naïve 🤖\n"

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=8), st.sampled_from(["tformer.chars", "tformer.bpe", "BPE",
                                                                "WordPiece", "ByteLevel", "<eos>"]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8) | st.sampled_from(
        ["kind", "chars", "special_tokens", "tokenizer", "model", "type", "vocab", "merges", "format",
         "eos_token", "added_tokens", "pre_tokenizer"]), inner, max_size=4)), max_leaves=12)


def check_load(content: bytes) -> None:
    """Write `content` to a file and load it: a working tokenizer or one line naming the file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tokenizer.json"
        path.write_bytes(content)
        try:
            tokenizer = load_tokenizer(path)
        except (ValueError, OSError) as e:
            message = str(e)
            assert message and "\n" not in message, message
            assert str(path) in message, message
        else:
            try:
                ids = tokenizer.encode(PROBE)
                assert all(0 <= i < tokenizer.vocab_size for i in ids)
                tokenizer.decode(ids)
            except ValueError as e:  # e.g. a character the vocabulary does not have: one line
                assert "\n" not in str(e), str(e)
        assert path.read_bytes() == content


def valid_files(bpe) -> list[dict]:
    chars = CharTokenizer.train("hello world", special_tokens=("<eos>",)).to_dict()
    return [chars, bpe.to_dict(), bpe.to_dict()["tokenizer"]]


def paths_of(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON value (vocabularies sampled, so big files stay quick)."""
    out = [prefix]
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else []
    for i, (key, value) in enumerate(items):
        if i < 12 or key in ("model", "pre_tokenizer", "added_tokens", "decoder", "normalizer"):
            out += paths_of(value, (*prefix, key))
    return out


def mutate(data: Any, path: tuple, action: str, value: Any) -> Any:
    """A deep copy of `data` with the item at `path` deleted or replaced by `value`."""
    data = json.loads(json.dumps(data))
    if not path:
        return value
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if action == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return data


@SETTINGS
@given(content=st.binary(max_size=300))
def test_random_bytes(content):
    check_load(content)


@SETTINGS
@given(value=json_values)
def test_random_json(value):
    check_load(json.dumps(value).encode())


@SETTINGS
@given(data=st.data(), which=st.integers(0, 2), action=st.sampled_from(["delete", "replace"]),
       value=json_values)
def test_valid_files_with_one_part_deleted_or_replaced(bpe, data, which, action, value):
    original = valid_files(bpe)[which]
    path = data.draw(st.sampled_from(paths_of(original)))
    if action == "delete" and not path:
        action = "replace"
    check_load(json.dumps(mutate(original, path, action, value)).encode())


@SETTINGS
@given(which=st.integers(0, 2), cut=st.floats(0, 1))
def test_valid_files_cut_off(bpe, which, cut):
    text = json.dumps(valid_files(bpe)[which]).encode()
    check_load(text[: int(len(text) * cut)])


@pytest.mark.parametrize("content", [
    b"", b"\x00\xff\xfe garbage", b"[1, 2]", b'"kind"', b"[" * 100_000 + b"]" * 100_000,
    json.dumps({"kind": "tformer.chars", "chars": [1, 2]}).encode(),
    json.dumps({"kind": "tformer.chars", "chars": ["ab"]}).encode(),
    json.dumps({"kind": "tformer.chars", "chars": []}).encode(),
    json.dumps({"kind": "tformer.chars", "chars": ["a"], "special_tokens": 5}).encode(),
    json.dumps({"kind": "tformer.chars", "chars": ["a"], "special_tokens": "<eos>"}).encode(),
    json.dumps({"kind": "tformer.chars", "chars": ["a"], "special_tokens": [1]}).encode(),
    json.dumps({"kind": ["tformer.chars"]}).encode(),
    json.dumps({"model": {"type": "Pixel"}}).encode(),
    json.dumps({"model": {"type": 5}}).encode(),
])
def test_malformed_files_of_every_kind_are_one_line_naming_the_file(tmp_path, content):
    path = tmp_path / "mystery.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="mystery.json") as error:
        load_tokenizer(path)
    assert "\n" not in str(error.value)
    assert path.read_bytes() == content


@pytest.mark.parametrize("change", [
    {"format": True}, {"format": "1"}, {"eos_token": []}, {"eos_token": 5}, {"eos_token": "<nope>"},
    {"tokenizer": []}, {"tokenizer": {"model": [], "pre_tokenizer": {}}},
])
def test_malformed_bpe_files_are_one_line_naming_the_file(tmp_path, bpe, change):
    path = tmp_path / "bpe.json"
    path.write_text(json.dumps({**bpe.to_dict(), **change}))
    with pytest.raises(ValueError, match="bpe.json") as error:
        load_tokenizer(path)
    assert "\n" not in str(error.value)
