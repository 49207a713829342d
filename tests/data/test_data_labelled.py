"""Labelled sentences: TSV / CSV / JSONL read the same, malformed rows are named by file and
line, splits are stratified and deterministic, unseen labels and too-long texts are refused or
truncated as asked."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from tformer.data.labelled import (
    LabelledDataError,
    SpecialIds,
    encode_sentences,
    label_ids,
    load_labelled,
    pad_rows,
    sort_labels,
    special_ids,
    stratified_folds,
    train_val_split,
)

ROWS = [("joy", "What a lovely day."), ("anger", "Stop that, now!"), ("joy", 'She said "yes", twice.')]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "emotion-sample.tsv"


def write(tmp_path: Path, fmt: str) -> Path:
    path = tmp_path / f"data.{fmt}"
    if fmt == "tsv":
        path.write_text("label\tsource\ttext\n" + "".join(f"{y}\tme\t{t}\n" for y, t in ROWS))
    elif fmt == "csv":
        path.write_text("text,label\n" + "".join('"' + t.replace('"', '""') + f'",{y}\n' for y, t in ROWS))
    else:
        path.write_text("\n".join(json.dumps({"text": t, "label": y}) for y, t in ROWS) + "\n")
    return path


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl"])
def test_formats_read_the_same(tmp_path: Path, fmt: str) -> None:
    data = load_labelled(write(tmp_path, fmt))
    assert data.texts == tuple(t for _, t in ROWS) and data.labels == ("joy", "anger", "joy")
    assert data.label_names() == ("anger", "joy")
    assert data.lines == ((2, 3, 4) if fmt != "jsonl" else (1, 2, 3))


@pytest.mark.parametrize("content, words", [
    ("label\ttext\njoy\tfine\nsad\tone\ttoo many\n", r"data.tsv line 3: expected 2 tab-separated fields"),
    ("label\ttext\njoy\tfine\n\t  x\n", "line 3: the label is empty"),
    ("label\ttext\njoy\t   \n", "line 2: the text is empty"),
    ("category\ttext\njoy\tfine\n", r"line 1: the header \['category', 'text'\] has no column 'label'"),
])
def test_malformed_tsv_names_file_and_line(tmp_path: Path, content: str, words: str) -> None:
    path = tmp_path / "data.tsv"
    path.write_text(content)
    with pytest.raises(LabelledDataError, match=words):
        load_labelled(path)
    assert path.read_text() == content  # nothing rewritten


def test_malformed_csv_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text('text,label\n"fine",joy\nunquoted, comma,x\n')
    with pytest.raises(LabelledDataError, match="a.csv line 3: expected 2 comma-separated"):
        load_labelled(tmp_path / "a.csv")
    (tmp_path / "q.csv").write_text('text,label\n"fine",joy\n"stray" quote,x\n')
    with pytest.raises(LabelledDataError, match="q.csv line 3: malformed CSV"):
        load_labelled(tmp_path / "q.csv")
    (tmp_path / "b.jsonl").write_text('{"text": "ok", "label": 1}\n{"text": "broken"\n')
    with pytest.raises(LabelledDataError, match="b.jsonl line 2: not valid JSON"):
        load_labelled(tmp_path / "b.jsonl")
    (tmp_path / "c.txt").write_text("label\ttext\n")
    with pytest.raises(LabelledDataError, match="set data.format"):
        load_labelled(tmp_path / "c.txt")


def test_jsonl_labels_become_strings_in_natural_order(tmp_path: Path) -> None:
    path = tmp_path / "n.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{i}", "label": y}) for i, y in enumerate([10, 2, 1, 2])))
    assert load_labelled(path).label_names() == ("1", "2", "10")
    assert sort_labels(["b", "10", "a", "9"]) == ("9", "10", "a", "b")


def test_emotion_example_file() -> None:
    data = load_labelled(EXAMPLES)
    assert len(data) >= 40
    assert set(data.label_names()) == {"anger", "fear", "joy", "love", "sadness", "surprise"}


def test_named_dataset() -> None:
    if not os.environ.get("TFORMER_DATA_DIR"):
        pytest.skip("needs TFORMER_DATA_DIR")
    data = load_labelled("uci-sentiment")
    assert len(data) == 3000 and data.label_names() == ("0", "1")


def test_stratified_folds_partition_and_balance() -> None:
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    folds = stratified_folds(labels, 5, seed=3)
    everything = np.sort(np.concatenate(folds))
    assert (everything == np.arange(100)).all()
    for fold in folds:
        assert [sum(labels[i] == y for i in fold) for y in "abc"] == [10, 6, 4]
    assert all((f == g).all() for f, g in zip(folds, stratified_folds(labels, 5, seed=3)))
    train, val = train_val_split(labels, val_fraction=0.0, seed=3, fold=2)
    assert (val == folds[2]).all() and len(np.intersect1d(train, val)) == 0
    train, val = train_val_split(labels, val_fraction=0.2, seed=0)
    assert len(val) == 20 and len(train) == 80 and sum(labels[i] == "c" for i in val) == 4


def test_unseen_label_is_named_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "eval.tsv"
    path.write_text("label\ttext\njoy\tok\nsurprise\twow\n")
    data = load_labelled(path)
    with pytest.raises(LabelledDataError, match=r"eval.tsv line 3: label 'surprise' is not one the model"):
        label_ids(data, ("anger", "joy"))
    assert label_ids(data, ("anger", "joy", "surprise")).tolist() == [1, 2]


class WordTokenizer:
    """Whitespace words -> ids, with BERT specials (a stand-in for a real tokenizer)."""

    special_tokens = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[MASK]": 3}

    def encode_batch(self, texts):
        return [[4 + len(w) for w in t.split()] for t in texts]


def test_too_long_truncates_with_a_warning_or_refuses(tmp_path: Path, caplog) -> None:
    path = tmp_path / "d.tsv"
    path.write_text("label\ttext\na\tone two\nb\tone two three four five six\n")
    data, tok = load_labelled(path), WordTokenizer()
    specials = special_ids(tok, need_mask=True)
    with caplog.at_level(logging.WARNING):
        rows = encode_sentences(data, tok, specials, max_length=5)
    assert [len(r) for r in rows] == [4, 5] and rows[1][0] == 1 and rows[1][-1] == 2
    assert "1 of 2 texts" in caplog.text and "line 3" in caplog.text
    with pytest.raises(LabelledDataError, match="d.tsv line 3: the text is 8 tokens.*max_length=5"):
        encode_sentences(data, tok, specials, max_length=5, too_long="error")
    ids, mask = pad_rows(rows, pad_id=0)
    assert ids.shape == (2, 5) and mask.tolist() == [[1, 1, 1, 1, 0], [1] * 5]


def test_missing_special_tokens_are_named() -> None:
    class Plain:
        special_tokens = {"<|endoftext|>": 0}

    with pytest.raises(LabelledDataError, match=r"no \[CLS\], \[SEP\], \[PAD\].*special_tokens"):
        special_ids(Plain())
    assert special_ids(WordTokenizer()) == SpecialIds(cls=1, sep=2, pad=0, mask=3)


def test_tsv_fields_in_csv_style_quotes_are_unquoted_and_lone_quotes_kept(tmp_path: Path) -> None:
    """Spreadsheets (and csv's excel-tab dialect) quote TSV fields: the quotes are not text."""
    path = tmp_path / "quoted.tsv"
    path.write_text('"text"\tlabel\n"a ""b"" c"\tpos\nit\'s 5" tall\tneg\n"Hi," she said, "bye"\t"neg"\n'
                    '"x\tpos\n', encoding="utf-8")
    data = load_labelled(path)
    assert data.texts == ('a "b" c', "it's 5\" tall", '"Hi," she said, "bye"', '"x')
    assert data.labels == ("pos", "neg", "neg", "pos")


def test_unquoting_agrees_with_the_csv_module_on_quoted_fields() -> None:
    import csv
    import io

    from tformer.data.labelled import unquote_tsv_field

    for text in ['a "b" c', "", '"', '""', "tab-free, with commas", '"quoted"']:
        buffer = io.StringIO()
        csv.writer(buffer, dialect="excel-tab", quoting=csv.QUOTE_ALL).writerow([text])
        assert unquote_tsv_field(buffer.getvalue().rstrip("\r\n")) == text


def test_fold_k_is_the_test_split_and_validation_comes_from_the_other_folds() -> None:
    from tformer.data.labelled import fold_split

    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    folds = stratified_folds(labels, 5, seed=3)
    train, val, test = fold_split(labels, fold=2, n_folds=5, val_fraction=0.25, seed=3)
    assert (test == folds[2]).all()
    assert len(np.intersect1d(val, test)) == 0 and len(np.intersect1d(train, test)) == 0
    assert len(np.intersect1d(train, val)) == 0
    assert (np.sort(np.concatenate([train, val, test])) == np.arange(100)).all()
    assert [sum(labels[i] == y for i in val) for y in "abc"] == [10, 6, 4]  # stratified: 25% of 40/24/16
    with pytest.raises(LabelledDataError, match=r"val_fraction must be in \(0, 1\) with a fold"):
        fold_split(labels, fold=2, n_folds=5, val_fraction=0.0, seed=3)
