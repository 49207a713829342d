"""Sentence pairs: formats and column choice, errors that name file and line, splits, length
limits, token-budget batches (deterministic per (seed, step), every pair once per epoch)."""

import gzip
import json
import logging
import os

import numpy as np
import pytest

from tformer.data.datasets import find_dataset
from tformer.data.pairs import (IGNORE, PairsError, TokenBatches, collate_pairs, encode_pairs,
                                fit_length, read_pairs, split_indices)


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_tsv_by_header_name_and_by_index(tmp_path):
    f = write(tmp_path / "p.tsv", "id\tde\ten\n1\tHallo Welt.\tHello world.\n\n2\tJa.\tYes.\n")
    assert read_pairs(f, ("de", "en")) == [("Hallo Welt.", "Hello world."), ("Ja.", "Yes.")]
    assert read_pairs(f, ("en", 1)) == [("Hello world.", "Hallo Welt."), ("Yes.", "Ja.")]
    assert read_pairs(f, (1, 2), header=False)[0] == ("de", "en")


def test_csv_quoting_jsonl_and_gzip(tmp_path):
    f = write(tmp_path / "p.csv", 'src,tgt\n"Ja, gut.","Yes, fine."\n"zwei\nZeilen",two lines\n')
    assert read_pairs(f, ("src", "tgt")) == [("Ja, gut.", "Yes, fine."), ("zwei\nZeilen", "two lines")]
    rows = [{"de": "Guten Tag.", "en": "Good day."}, {"de": "Danke.", "en": "Thanks."}]
    f = write(tmp_path / "p.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_pairs(f, ("en", "de")) == [("Good day.", "Guten Tag."), ("Thanks.", "Danke.")]
    gz = tmp_path / "p.tsv.gz"
    gz.write_bytes(gzip.compress(b"de\ten\nEins.\tOne.\n"))
    assert read_pairs(gz, ("de", "en")) == [("Eins.", "One.")]


def test_only_newlines_end_a_record(tmp_path):
    f = write(tmp_path / "p.tsv", "de\ten\r\nZeile\u2028eins.\tLine\x0cone.\r\n")
    assert read_pairs(f, ("de", "en")) == [("Zeile\u2028eins.", "Line\x0cone.")]


def test_variant_separator_keeps_first_alternative(tmp_path):
    f = write(tmp_path / "p.tsv", "de\ten\nHallo!; Servus!\tHello!; Hi!\n")
    assert read_pairs(f, ("de", "en"), variant_separator="; ") == [("Hallo!", "Hello!")]
    assert read_pairs(f, ("de", "en"))[0] == ("Hallo!; Servus!", "Hello!; Hi!")


@pytest.mark.parametrize("name, text, columns, message", [
    ("p.tsv", "de\ten\nEins.\tOne.\nZwei.\n", ("de", "en"), r"p\.tsv:3: expected 2 TSV fields, found 1"),
    ("p.tsv", "de\ten\nEins.\tOne.\tExtra\n", ("de", "en"), r"p\.tsv:2: expected 2 TSV fields, found 3"),
    ("p.tsv", "de\ten\nEins.\tOne.\n  \tTwo.\n", ("de", "en"), r"p\.tsv:3: empty source text"),
    ("p.csv", "de,en\nEins.,\n", ("de", "en"), r"p\.csv:2: empty target text"),
    ("p.jsonl", '{"de": "Eins.", "en": "One."}\n{"de": "Zwei."}\n', ("de", "en"),
     r"p\.jsonl:2: expected a JSON object with keys"),
    ("p.jsonl", '{"de": "Eins.", "en": "One."\n', ("de", "en"), r"p\.jsonl:1: not a JSON object"),
    ("p.tsv", "de\ten\nEins.\tOne.\n", ("de", "fr"),
     r"no target column 'fr'; the header names \['de', 'en'\]"),
    ("p.tsv", "de\ten\n", ("de", "en"), "holds no sentence pairs"),
    ("p.xml", "<x/>", ("de", "en"), "unknown format '.xml'"),
])
def test_bad_pairs_name_file_and_line(tmp_path, name, text, columns, message):
    with pytest.raises(PairsError, match=message):
        read_pairs(write(tmp_path / name, text), columns)


def test_non_utf8_and_missing_files(tmp_path):
    bad = tmp_path / "latin.tsv"
    bad.write_bytes("de\ten\nSchön.\tNice.\n".encode("latin-1"))
    with pytest.raises(PairsError, match=r"latin\.tsv:2: not UTF-8"):
        read_pairs(bad)
    with pytest.raises(PairsError, match="not a file or a named dataset"):
        read_pairs(tmp_path / "nope.tsv")
    with pytest.raises(PairsError, match="holds text, not sentence pairs"):
        read_pairs("shakespeare")


def test_skip_bad_pairs_with_one_warning(tmp_path, caplog):
    f = write(tmp_path / "p.tsv", "de\ten\nEins.\tOne.\nZwei.\n\tDrei.\nVier.\tFour.\n")
    with caplog.at_level(logging.WARNING):
        assert read_pairs(f, ("de", "en"), on_bad="skip") == [("Eins.", "One."), ("Vier.", "Four.")]
    assert "skipped 2 bad pair(s)" in caplog.text and "p.tsv:3" in caplog.text


def test_named_dataset():
    if find_dataset("de-en-sentences") is None:
        pytest.skip(f"de-en-sentences not available (TFORMER_DATA_DIR={os.environ.get('TFORMER_DATA_DIR')})")
    pairs = read_pairs("de-en-sentences", ("de", "en"), variant_separator="; ")
    assert len(pairs) == 19116 and all(s and t and "; " not in s for s, t in pairs)


def test_split_is_disjoint_complete_and_seeded():
    train, valid, test = split_indices(100, 10, 20, seed=3)
    assert (len(train), len(valid), len(test)) == (70, 10, 20)
    assert sorted([*train, *valid, *test]) == list(range(100))
    assert all((a == b).all() for a, b in zip((train, valid, test), split_indices(100, 10, 20, seed=3)))
    assert not (valid == split_indices(100, 10, 20, seed=4)[1]).all()
    with pytest.raises(PairsError, match="cannot hold out"):
        split_indices(10, 5, 5, seed=0)


def test_length_limit_skip_truncate_error(caplog):
    assert fit_length([1] * 5, [2] * 4, 5, "skip") == ([1] * 5, [2] * 4)  # target + <bos> = 5
    assert fit_length([1] * 6, [2] * 3, 5, "skip") is None
    assert fit_length([1] * 6, [2] * 9, 5, "truncate") == ([1] * 5, [2] * 4)
    with pytest.raises(PairsError, match="more than the limit of 5"):
        fit_length([1], [2] * 5, 5, "error")

    class Chars:
        def encode_batch(self, texts):
            return [[ord(c) for c in t] for t in texts]

    with caplog.at_level(logging.WARNING):
        src, tgt = encode_pairs([("abc", "de"), ("abcdefgh", "x"), ("a", "b")], Chars(), 4, "skip")
    assert src == [[97, 98, 99], [97]] and tgt == [[100, 101], [98]]
    assert "skipped 1 of 3 pairs longer than 4" in caplog.text
    with pytest.raises(PairsError, match="encodes to no tokens"):
        encode_pairs([("a", "")], Chars(), 4)


def test_token_batches_budget_epochs_and_determinism():
    lengths = np.random.default_rng(0).integers(1, 40, size=500)
    batches = TokenBatches(lengths, max_tokens=200, seed=7)
    epoch = [batches.batch(s) for s in range(len(batches))]
    assert sorted(np.concatenate(epoch).tolist()) == list(range(500))  # every example once
    assert all(len(b) * lengths[b].max() <= 200 for b in epoch)
    again = TokenBatches(lengths, max_tokens=200, seed=7)
    assert all((again.batch(s) == batches.batch(s)).all() for s in (0, 3, len(batches) + 5))
    next_epoch = [batches.batch(len(batches) + s) for s in range(len(batches))]
    assert sorted(np.concatenate(next_epoch).tolist()) == list(range(500))
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(epoch, next_epoch))
    padded = sum(len(b) * lengths[b].max() for b in epoch)
    assert padded < 1.1 * lengths.sum()  # similar lengths share a batch: little padding
    assert sorted(np.concatenate(batches.in_order()).tolist()) == list(range(500))
    assert len(TokenBatches([50, 3], max_tokens=10).in_order()) == 2  # too long: a batch of its own


def test_collate_pairs():
    batch = collate_pairs([[5, 6, 7], [8]], [[9], [10, 11]], pad=0, bos=1, eos=2)
    assert batch["src_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["src_mask"].tolist() == [[True] * 3, [True, False, False]]
    assert batch["tgt_ids"].tolist() == [[1, 9, 0], [1, 10, 11]]
    assert batch["labels"].tolist() == [[9, 2, IGNORE], [10, 11, 2]]
    assert batch["tgt_mask"].tolist() == [[True, True, False], [True] * 3]


def test_tsv_fields_in_csv_style_quotes_are_unquoted_and_lone_quotes_kept(tmp_path):
    path = write(tmp_path / "quoted.tsv", 'de\ten\n"Hallo ""Welt"""\t"hello ""world"""\n'
                                          '5" Nagel\t"x\n"Ja," sagte er\tyes\n')
    assert read_pairs(path, ("de", "en")) == [('Hallo "Welt"', 'hello "world"'), ('5" Nagel', '"x'),
                                              ('"Ja," sagte er', "yes")]
