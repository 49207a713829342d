"""The command line: Ctrl-C exits 130, the demo never deletes a run it did not create, `tokenizer
train` never overwrites its corpus or a file it did not write, `evaluate --text` scores a user's
file, options go anywhere after the run directory, `--version`, and bad input is one line."""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import random
import re
from pathlib import Path

import pytest
import yaml

import tformer
from tformer.cli import build_parser, main
from tformer.inference.score import score_file
from tformer.training.recipe import recipe_from_dict, train_recipe
from tformer.training.trainer import TrainResult

WORDS = ["the", "king", "queen", "good", "bad", "love", "war", "lord", "my", "speaks", "of", "and", "fine", "dull", "great", "poor", "film"]
TRAINING = {"max_steps": 2, "batch_size": 4, "eval_every": 2, "eval_batches": 1, "log_every": 1,
            "warmup_steps": 1, "device": "cpu", "grad_accum": 1}
TINY_DEMO = ["model.n_encoder_layers=1", "model.n_decoder_layers=1", "model.d_model=16", "model.n_heads=2",
             "data.judge_samples_per_class=4", "data.samples_per_class=1", "training.batch_size=4",
             "training.eval_every=2", "training.eval_batches=1", "training.warmup_steps=1",
             "training.device=cpu"]


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys, pattern: str) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(pattern, err), err
    return err


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root, rng = tmp_path_factory.mktemp("cli"), random.Random(0)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
    (root / "corpus.txt").write_text("\n".join(sentence() for _ in range(300)) + "\n", encoding="utf-8")
    pairs = [f"{sentence()}\t{sentence()}" for _ in range(40)]
    (root / "pairs.tsv").write_text("de\ten\n" + "\n".join(pairs) + "\n", encoding="utf-8")
    return root


def gpt_recipe(root: Path, run_dir: Path) -> dict:
    return {"task": "causal_lm", "run_dir": str(run_dir), "training": TRAINING, "tokenizer": {"kind": "char"},
            "model": {"preset": "gpt-nano", "n_layers": 1, "d_model": 16, "n_heads": 2, "context_length": 16},
            "data": {"source": str(root / "corpus.txt"), "cache_dir": str(root / "cache")},
            "sample": {"tokens": 4, "prompt": "the"}}


@pytest.fixture(scope="module")
def gpt_run(root) -> Path:
    train_recipe(recipe_from_dict(gpt_recipe(root, root / "gpt")))
    return root / "gpt"


@pytest.fixture(scope="module")
def nmt_run(root) -> Path:
    recipe = {"task": "seq2seq", "run_dir": str(root / "nmt"), "training": TRAINING,
              "tokenizer": {"kind": "bpe", "vocab_size": 300, "special_tokens": ["<pad>", "<bos>", "<eos>"]},
              "model": {"preset": "nmt-tiny", "n_encoder_layers": 1, "n_decoder_layers": 1, "d_model": 16,
                        "n_heads": 2, "context_length": 32},
              "data": {"source": str(root / "pairs.tsv"), "src_column": "de", "tgt_column": "en",
                       "valid_pairs": 4, "test_pairs": 4, "tokens_per_batch": 256, "n_samples": 1}}
    train_recipe(recipe_from_dict(recipe))
    return root / "nmt"


# 1. Ctrl-C

def test_an_interrupted_training_exits_130_with_one_line(root, monkeypatch, capsys):
    import tformer.training.recipe as recipe_module

    path = root / "interrupted.yaml"
    path.write_text(yaml.safe_dump(gpt_recipe(root, root / "never-trained")), encoding="utf-8")
    monkeypatch.setattr(recipe_module, "train_recipe",
                        lambda recipe, fresh=False: TrainResult(5, 3.2, 3.2, False, interrupted=True))
    assert main(["train", str(path)]) == 130
    assert "interrupted at step 5" in capsys.readouterr().out

    def interrupt(recipe, fresh=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe_module, "train_recipe", interrupt)
    assert main(["train", str(path)]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


# 2. the demo

def test_demo_resumes_its_own_run_and_refuses_any_other_folder(root, gpt_run, capsys):
    demo = root / "demo"
    args = ["demo", "--run-dir", str(demo), "--steps", "2", *[a for s in TINY_DEMO for a in ("--set", s)]]
    assert main(args) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    trained = tree_digest(demo / "checkpoints")
    assert main(args) == 0  # the same demo again: resumed (already done), nothing retrained
    assert "resuming" in capsys.readouterr().out
    assert tree_digest(demo / "checkpoints") == trained

    before = tree_digest(root)
    changed = [*args, "--set", "model.d_model=32"]
    assert main(changed) == 2
    one_error_line(capsys, "model section differs.*another --run-dir")
    for other in (gpt_run, root / "corpus.txt"):
        assert main(["demo", "--run-dir", str(other), "--steps", "2"]) == 2
        one_error_line(capsys, "another --run-dir")
    foreign = root / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    before = tree_digest(root)
    assert main(["demo", "--run-dir", str(foreign), "--steps", "2"]) == 2
    one_error_line(capsys, "not a tformer demo run.*thesis.tex")
    assert tree_digest(root) == before


# 3. tokenizer train --out

def test_tokenizer_train_never_overwrites_its_corpus_or_a_foreign_file(root, capsys, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text((root / "corpus.txt").read_text())
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    before = tree_digest(tmp_path)
    for args, pattern in [(["--out", str(corpus), str(corpus)], "is one of the training files"),
                          (["--out", str(corpus), str(corpus), "--force"], "is one of the training files"),
                          (["--out", str(notes), str(corpus)], "not a tokenizer file"),
                          (["--out", str(notes), str(corpus), "--force"], "not a tokenizer file")]:
        assert main(["tokenizer", "train", "--kind", "char", *args]) == 2
        one_error_line(capsys, pattern)
    assert tree_digest(tmp_path) == before

    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", "--kind", "char", "--out", str(out), str(corpus)]) == 0
    first = out.read_text()
    assert main(["tokenizer", "train", "--kind", "char", "--special", "<x>", "--out", str(out), str(corpus)]) == 2
    one_error_line(capsys, "already exists.*--force")
    assert out.read_text() == first
    assert main(["tokenizer", "train", "--kind", "char", "--special", "<x>", "--force", "--out", str(out),
                 str(corpus)]) == 0
    assert "<x>" in json.loads(out.read_text())["special_tokens"]


# 4. evaluate --text

def test_evaluate_scores_a_text_file(gpt_run, root, capsys, tmp_path):
    text = tmp_path / "new.txt"
    text.write_text("the king speaks of war\nmy lord €\u00e9\n", encoding="utf-8")
    assert main(["evaluate", str(gpt_run), "--text", str(text), "--stride", "4"]) == 0
    out = dict(line.strip().split(": ", 1) for line in capsys.readouterr().out.splitlines())
    expected = score_file(gpt_run, text, stride=4)
    assert expected.unknown_characters == 2
    assert int(out["tokens"]) == expected.tokens == len("the king speaks of war\nmy lord \n") - 1
    assert int(out["characters"]) == expected.characters
    for key in ("loss", "bits_per_token", "bits_per_character", "perplexity"):
        assert float(out[key]) == pytest.approx(getattr(expected, key), abs=1e-4), key
    assert out["unknown_characters"].startswith("2 ") and "skipped" in out["unknown_characters"]
    assert out["checkpoint"] == "best" and out["step"] == "2"


def test_evaluate_text_refusals_are_one_line(gpt_run, nmt_run, root, capsys, tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "short.txt").write_text("t")
    for run, text, pattern in [(nmt_run, root / "corpus.txt", "not a language model \\(it can: conditional_decoder\\)"),
                               (gpt_run, tmp_path / "missing.txt", "missing.txt does not exist"),
                               (gpt_run, tmp_path, "is not a file"),
                               (gpt_run, tmp_path / "bin.txt", "not UTF-8 text"),
                               (gpt_run, tmp_path / "short.txt", "1 token.*at least 2")]:
        assert main(["evaluate", str(run), "--text", str(text)]) == 2
        one_error_line(capsys, pattern)
    assert main(["evaluate", str(gpt_run), "--text", str(root / "corpus.txt"), "--stride", "17"]) == 2
    one_error_line(capsys, "stride must be between 1 and the model's context length \\(16\\)")


# 5. translate: options after the run directory, file mode

def test_translate_takes_options_after_the_run_directory(nmt_run, capsys):
    assert main(["translate", str(nmt_run), "--beam", "1", "the king"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert main(["translate", str(nmt_run), "the king", "--beam", "2", "my lord"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_translate_file_mode_keeps_blank_lines_aligned_and_never_overwrites(nmt_run, capsys, tmp_path,
                                                                           monkeypatch):
    source, target = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("the king\n\nmy lord speaks\n   \nwar\n", encoding="utf-8")
    assert main(["translate", str(nmt_run), "--beam", "1", "--input", str(source), "--output", str(target)]) == 0
    lines = target.read_text(encoding="utf-8").split("\n")
    assert len(lines) == 6 and lines[-1] == ""  # five lines, each ended by a new line
    assert [bool(line) for line in lines[:5]] == [True, False, True, False, True]
    assert main(["translate", str(nmt_run), "--beam", "1", "--input", str(source)]) == 0
    assert capsys.readouterr().out.split("\n") == lines  # the same lines on standard output
    monkeypatch.setattr("sys.stdin", io.StringIO(source.read_text(encoding="utf-8")))
    assert main(["translate", str(nmt_run), "--beam", "1"]) == 0
    assert capsys.readouterr().out.split("\n") == lines  # standard input keeps the alignment too
    before = tree_digest(tmp_path)
    for args, pattern in [(["--output", str(source)], "is the input"),
                          (["--output", str(target)], "already exists.*--force"),
                          (["--output", str(tmp_path)], "is a folder"),
                          (["the king"], "either sentences or --input")]:
        assert main(["translate", str(nmt_run), "--input", str(source), *args]) == 2
        one_error_line(capsys, pattern)
    assert tree_digest(tmp_path) == before
    assert main(["translate", str(nmt_run), "--beam", "1", "--input", str(source), "--output", str(target),
                 "--force"]) == 0


# 6. --version

def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tformer {tformer.__version__}"
    assert tformer.__version__ == importlib.metadata.version("tformer")


# 7. bad input anywhere is one line; --debug shows the traceback

@pytest.mark.parametrize("args, pattern", [
    (["generate", "{gpt}", "--max-new-tokens", "abc"], "--max-new-tokens: invalid int value: 'abc'"),
    (["generate", "{gpt}", "--max-new-tokens", "0"], "--max-new-tokens: 0 is not a whole number >= 1"),
    (["generate", "{gpt}", "--temperature", "nan"], "--temperature: nan is not a finite number"),
    (["generate", "{gpt}", "--repetition-penalty", "inf"], "--repetition-penalty: inf is not a finite"),
    (["generate", "{gpt}", "--n", "x"], "--n: invalid int value: 'x'"),
    (["generate", "{corpus}"], "holds no tformer checkpoint"),
    (["predict", "{gpt}", "--n", "-2", "x"], "--n: -2 is not a whole number >= 1"),
    (["translate", "{nmt}", "x", "--beam", "0"], "--beam: 0 is not a whole number >= 1"),
    (["translate", "{nmt}", "x", "--beam", "100000"], "--beam: 100000 is more than 64"),
    (["translate", "{nmt}", "--input", "{missing}"], "missing.txt does not exist"),
    (["evaluate", "{gpt}", "--stride", "0", "--text", "{corpus}"], "--stride: 0 is not a whole number"),
    (["evaluate", "{gpt}", "--stride", "4"], "--stride is for --text"),
    (["tokenizer", "train", "--out", "{corpus}/tok.json", "{corpus}"], "is a file, not a folder"),
    (["tokenizer", "train", "--kind", "char", "--out", "{tmp}/t.json", "{binary}"], "binary.txt is not UTF-8"),
    (["tokenizer", "train", "--kind", "char", "--out", "{tmp}/t.json", "{tmp}"], "is a folder, not a text file"),
    (["tokenizer", "train", "--vocab-size", "-3", "--out", "{tmp}/t.json", "{corpus}"], "--vocab-size: -3 is not"),
    (["import", "bert", "{missing}", "{tmp}/imported"], "missing.txt does not exist"),
    (["demo", "--steps", "0"], "--steps: 0 is not a whole number >= 1"),
    (["train"], "the following arguments are required: recipe"),
    (["no-such-command"], "invalid choice: 'no-such-command'"),
])
def test_bad_input_is_one_clear_line(args, pattern, gpt_run, nmt_run, root, tmp_path, capsys):
    (tmp_path / "binary.txt").write_bytes(b"abc\xff\xfe")
    names = {"gpt": gpt_run, "nmt": nmt_run, "corpus": root / "corpus.txt", "tmp": tmp_path,
             "missing": tmp_path / "missing.txt", "binary": tmp_path / "binary.txt"}
    before = tree_digest(root)
    assert main([a.format(**names) for a in args]) == 2
    one_error_line(capsys, pattern)
    assert tree_digest(root) == before


def test_debug_shows_the_traceback(gpt_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--debug", "evaluate", str(gpt_run), "--text", str(tmp_path / "missing.txt")])


def test_sizes_a_user_types_are_bounded_when_parsed():
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["translate", "run", "x", "--beam", "100000"])
    assert parser.parse_args(["translate", "run", "x", "--beam", "64"]).beam == 64
