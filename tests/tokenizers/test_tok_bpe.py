"""Byte-level BPE: training, special tokens, save/load, fingerprints, clear errors."""

import pickle
from pathlib import Path

import pytest

from tformer.tokenizers import BPETokenizer, Tokenizer

SAMPLE = "Hello<|endoftext|> wörld 🤖, it's 2024!\n\n  東京 e\u0301 \x00 end<|pad|>"


def test_satisfies_protocol(bpe):
    assert isinstance(bpe, Tokenizer)


def test_vocab_size_is_respected(bpe):
    assert bpe.vocab_size == 400
    assert max(max(ids) for ids in bpe.encode_batch([SAMPLE, "abc" * 50])) < bpe.vocab_size


def test_vocab_size_is_exact_on_real_text(shakespeare):
    tok = BPETokenizer.train(iter([shakespeare]), vocab_size=777)
    assert tok.vocab_size == 777


def test_training_is_deterministic(corpus, bpe):
    again = BPETokenizer.train(iter([corpus]), vocab_size=400, special_tokens=("<|endoftext|>", "<|pad|>"))
    assert again.fingerprint() == bpe.fingerprint()
    assert again.to_dict() == bpe.to_dict()


def test_training_from_files_matches_lines(tmp_path, corpus):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(corpus, encoding="utf-8")
    b.write_text("", encoding="utf-8")
    tok = BPETokenizer.train([a, str(b)], vocab_size=300)
    assert tok.vocab_size == 300 and tok.decode(tok.encode(corpus)) == corpus


def test_special_tokens_are_single_ids_and_not_split(bpe):
    eot, pad = bpe.special_tokens["<|endoftext|>"], bpe.special_tokens["<|pad|>"]
    ids = bpe.encode("x<|endoftext|>y<|pad|><|endoftext|>")
    assert ids.count(eot) == 2 and ids.count(pad) == 1
    assert bpe.encode("<|endoftext|>") == [eot]
    assert bpe.eos_id == eot
    assert bpe.decode([eot]) == "<|endoftext|>"


def test_special_token_with_spaces_and_accents_round_trips(corpus):
    tok = BPETokenizer.train(iter([corpus]), vocab_size=300, special_tokens=("<|fin du texte é|>",))
    text = "a <|fin du texte é|> b"
    assert tok.special_tokens["<|fin du texte é|>"] in tok.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id is None


def test_save_load_gives_same_ids_and_fingerprint(bpe, tmp_path):
    path = tmp_path / "sub" / "bpe.json"
    bpe.save(path)
    loaded = BPETokenizer.load(path)
    assert loaded.encode(SAMPLE) == bpe.encode(SAMPLE)
    assert loaded.fingerprint() == bpe.fingerprint()
    assert loaded.special_tokens == bpe.special_tokens and loaded.eos_id == bpe.eos_id
    assert [p.name for p in path.parent.iterdir()] == ["bpe.json"]  # no temporary file left


def test_fingerprint_changes_with_the_mapping(corpus, bpe):
    other = BPETokenizer.train(iter([corpus]), vocab_size=399, special_tokens=("<|endoftext|>", "<|pad|>"))
    assert other.fingerprint() != bpe.fingerprint()


def test_to_dict_is_a_copy(bpe):
    data = bpe.to_dict()
    data["tokenizer"]["model"]["vocab"].clear()
    assert bpe.to_dict()["tokenizer"]["model"]["vocab"]


def test_pickles_for_dataloader_workers(bpe):
    copy = pickle.loads(pickle.dumps(bpe))
    assert copy.encode(SAMPLE) == bpe.encode(SAMPLE) and copy.engine == bpe.engine


def test_encode_batch_matches_encode_on_any_thread_count(bpe, corpus):
    texts = [corpus[i:i + 500] for i in range(0, len(corpus), 37)] * 20  # above the parallel threshold
    expected = [bpe.encode(t) for t in texts]
    for threads in (1, 2, 3):
        assert bpe.encode_batch(texts, num_threads=threads) == expected


def test_vocab_too_small_is_refused(corpus):
    with pytest.raises(ValueError, match="too small.*at least 257"):
        BPETokenizer.train(iter([corpus]), vocab_size=256)


def test_empty_training_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match="empty training data"):
        BPETokenizer.train(iter(["", ""]), vocab_size=300)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty training data.*empty.txt"):
        BPETokenizer.train(empty, vocab_size=300)


def test_missing_files_are_named(tmp_path, corpus):
    there = tmp_path / "there.txt"
    there.write_text(corpus)
    with pytest.raises(FileNotFoundError, match=r"gone1\.txt, .*gone2\.txt"):
        BPETokenizer.train([there, tmp_path / "gone1.txt", tmp_path / "gone2.txt"], vocab_size=300)


def test_non_utf8_file_is_named(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café olé".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt"):
        BPETokenizer.train(bad, vocab_size=300)


@pytest.mark.parametrize("content", ['{"kind": "tformer.bpe", "tokeni', "", "[1, 2]", "\xff\xfe"])
def test_corrupted_file_is_named_and_left_untouched(tmp_path, content):
    path = tmp_path / "bpe.json"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError, match="bpe.json"):
        BPETokenizer.load(path)
    assert path.read_bytes() == content.encode("latin-1")


def test_truncated_save_is_refused_and_kept(bpe, tmp_path):
    path = tmp_path / "bpe.json"
    bpe.save(path)
    cut = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(cut)
    with pytest.raises(ValueError, match="not valid JSON"):
        BPETokenizer.load(path)
    assert path.read_bytes() == cut


def test_wrong_kind_and_bad_inner_tokenizer(bpe, tmp_path):
    with pytest.raises(ValueError, match="not a tformer BPE"):
        BPETokenizer.from_dict({"kind": "tformer.chars"}, "x.json")
    data = bpe.to_dict()
    data["tokenizer"] = {**data["tokenizer"], "model": {**data["tokenizer"]["model"], "merges": [["x", "y"]]}}
    with pytest.raises(ValueError, match="could not be read"):
        BPETokenizer.from_dict(data, "x.json")


def test_out_of_range_id_is_refused(bpe):
    with pytest.raises(ValueError, match="out of range"):
        bpe.decode([1, bpe.vocab_size])


def test_bad_special_tokens_and_engine(corpus):
    with pytest.raises(ValueError, match="distinct"):
        BPETokenizer.train(iter([corpus]), vocab_size=300, special_tokens=("<a>", "<a>"))
    with pytest.raises(ValueError, match="engine"):
        BPETokenizer.train(iter([corpus]), vocab_size=300, engine="fast")


def test_list_of_texts_is_read_as_file_names():
    with pytest.raises(FileNotFoundError, match=r"iter\(texts\)"):
        BPETokenizer.train(["some text, not a path"], vocab_size=300)


def test_keeps_working_when_a_path_is_a_path_object(bpe, tmp_path):
    bpe.save(str(tmp_path / "s.json"))
    assert BPETokenizer.load(Path(tmp_path / "s.json")).encode("abc") == bpe.encode("abc")


def test_streamed_decoding_never_splits_a_character():
    from tformer.tokenizers import BPETokenizer
    from tformer.tokenizers.base import decode_stream

    text = "東京 café naïve 🙂 done"
    tokenizer = BPETokenizer.train(iter(["hello world " * 50]), vocab_size=300)
    ids = tokenizer.encode(text)
    assert len(ids) > len(text)  # several tokens per character for some of them
    pieces = list(decode_stream(tokenizer, ids))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
