"""A run directory is tformer's before anything in it is replaced; one process trains in it at a
time; a resume refuses changed data, repairs a torn metrics line, rewinds samples and removes a
crash's temporary files; reports tell the truth (plain lines off a terminal, tokens scored)."""

import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tformer.cli import main
from tformer.config import ConfigError
from tformer.training.recipe import evaluate_run, load_recipe, recipe_from_dict, train_recipe
from tformer.training.report import Reporter

WORDS = ["the", "king", "queen", "speaks", "of", "love", "and", "war", "my", "lord"]


def corpus(tmp: Path, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    path = tmp / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(400)))
    return path


def recipe(tmp: Path, run_dir, *, steps: int = 4, **training):
    source = tmp / "corpus.txt" if (tmp / "corpus.txt").exists() else corpus(tmp)
    return recipe_from_dict({
        "task": "causal_lm",
        "model": {"preset": "gpt-nano", "context_length": 16, "n_layers": 1, "n_heads": 2, "d_model": 16},
        "tokenizer": {"kind": "char"},
        "data": {"source": str(source), "val_fraction": 0.1, "cache_dir": str(tmp / "cache")},
        "training": {"max_steps": steps, "batch_size": 4, "eval_every": 2, "eval_batches": 2,
                     "log_every": 1, "warmup_steps": 1, "device": "cpu", **training},
        "sample": {"tokens": 4}, "run_dir": str(run_dir)})


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- 1. only tformer's own run directories are written into -----------------------------------

def test_a_foreign_folder_is_refused_and_left_as_it_was(tmp_path):
    run = tmp_path / "d"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "mine.bin").write_text("x")
    (run / "tokenizer.json").write_text("{\"mine\": true}")
    (run / "metrics.jsonl").write_text("my notes\n")
    before = digest(run)
    for fresh in (False, True):
        with pytest.raises(ValueError, match="d is not a tformer run directory .*mine|choose a new"):
            train_recipe(recipe(tmp_path, run), fresh=fresh)
        assert digest(run) == before
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "metrics.jsonl", "tokenizer.json"]


def test_the_cli_names_a_foreign_folder_in_one_line(tmp_path, capsys):
    run = tmp_path / "d"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "mine.bin").write_text("x")
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe(tmp_path, run).to_dict()))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "not a tformer run" in err
    assert (run / "checkpoints" / "mine.bin").read_text() == "x"


def test_a_new_or_empty_folder_trains_and_is_marked(tmp_path):
    (tmp_path / "empty").mkdir()
    for name in ("empty", "new"):
        assert train_recipe(recipe(tmp_path, tmp_path / name)).step == 4
        marker = json.loads((tmp_path / name / ".tformer-run").read_text())
        assert marker["tformer_run"] == 1 and marker["finished"] is True


def test_a_finished_run_with_only_best_keeps_its_best_model(tmp_path):
    run = tmp_path / "run"
    train_recipe(recipe(tmp_path, run))
    import shutil

    shutil.rmtree(run / "checkpoints" / "last")
    before = digest(run)
    with pytest.raises(ValueError, match="finished run .*checkpoints/best.* --fresh"):
        train_recipe(recipe(tmp_path, run))
    assert digest(run) == before
    assert train_recipe(recipe(tmp_path, run), fresh=True).step == 4  # asked for: replaced


def test_fresh_clears_a_tformer_run_but_not_files_the_user_put_there(tmp_path):
    run = tmp_path / "run"
    train_recipe(recipe(tmp_path, run))
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "keep.bin").write_text("mine")
    assert train_recipe(recipe(tmp_path, run, steps=2), fresh=True).step == 2
    assert (run / "notes.txt").read_text() == (run / "checkpoints" / "keep.bin").read_text() == "mine"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2


def test_a_run_trained_before_markers_still_resumes(tmp_path):
    run = tmp_path / "run"
    train_recipe(recipe(tmp_path, run))
    (run / ".tformer-run").unlink()
    assert train_recipe(recipe(tmp_path, run, steps=6)).step == 6
    assert (run / ".tformer-run").is_file()


def test_the_trainer_refuses_a_foreign_folder(tmp_path):
    from tformer.training import Trainer
    from tformer.training.recipe import prepare

    (tmp_path / "data").mkdir()
    r = recipe(tmp_path / "data", tmp_path / "unused")
    prepared = prepare(r)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match="not a tformer run directory"):
        Trainer(prepared.model, prepared.task, r.training, foreign).fit()
    assert sorted(p.name for p in foreign.iterdir()) == ["mine.txt"]


# -- 3. run_dir values ------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["", "null", "~", "[a]"])
def test_empty_null_or_odd_run_dir_is_refused(tmp_path, value, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "keep.bin").write_text("x")
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe(tmp_path, tmp_path / "x").to_dict()))
    if value == "~":
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        assert load_recipe(path, ["run_dir=~/runs/a"]).run_dir == str(tmp_path / "home" / "runs" / "a")
        return
    with pytest.raises(ConfigError, match="run_dir"):
        load_recipe(path, [f"run_dir={value}"])
    assert (tmp_path / "checkpoints" / "keep.bin").read_text() == "x"
    assert not (tmp_path / "None").exists()


# -- 2. one process at a time ------------------------------------------------------------------

def test_a_second_training_process_is_refused_and_a_dead_ones_lock_does_not_block(tmp_path):
    run = tmp_path / "run"
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe(tmp_path, run, steps=100_000, eval_every=1000).to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "tformer.cli", "train", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        metrics = (run / "metrics.jsonl").read_text()
        with pytest.raises(ValueError, match="another process is training in .*run"):
            train_recipe(recipe(tmp_path, run, steps=2))
        with pytest.raises(ValueError, match="another process is training"):
            train_recipe(recipe(tmp_path, run, steps=2), fresh=True)
        assert (run / "metrics.jsonl").read_text().startswith(metrics)  # nothing of it was touched
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert train_recipe(recipe(tmp_path, run, steps=2), fresh=True).step == 2  # the kernel freed it


# -- 4. a resume on changed data is refused ------------------------------------------------------

def test_resuming_on_changed_training_text_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    train_recipe(recipe(tmp_path, run))
    config = json.loads((run / "checkpoints" / "last" / "config.json").read_text())
    text = (tmp_path / "corpus.txt").read_text()
    assert config["data_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    (tmp_path / "corpus.txt").write_text(text.replace("king", "kong"))
    before = digest(run)
    with pytest.raises(ConfigError, match="training data .* changed .*--fresh"):
        train_recipe(recipe(tmp_path, run, steps=8))
    assert digest(run) == before
    assert train_recipe(recipe(tmp_path, run, steps=8), fresh=True).step == 8


def labelled_and_image_recipes(tmp: Path) -> list[tuple[dict, Path, callable]]:
    """(recipe, data file, how to change the file) for a sentence classifier and an image classifier."""
    import numpy as np

    tsv = tmp / "labelled.tsv"
    tsv.write_text("label\ttext\n" + "".join(f"{'pos' if i % 2 else 'neg'}\tthe film was {'good' if i % 2 else 'bad'} "
                                              f"{i}\n" for i in range(40)), encoding="utf-8")
    rng = np.random.default_rng(0)
    npz = tmp / "images.npz"
    np.savez(npz, images=rng.integers(0, 255, (40, 8, 8), dtype=np.uint8), labels=np.arange(40) % 2)
    training = {"max_steps": 2, "batch_size": 4, "eval_every": 2, "warmup_steps": 1, "device": "cpu"}
    bert = {"task": "classification", "run_dir": str(tmp / "bert"), "training": training,
            "model": {"preset": "bert-tiny", "n_layers": 1, "d_model": 16, "n_heads": 2, "context_length": 16},
            "tokenizer": {"kind": "bpe", "vocab_size": 280, "special_tokens": ["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                                               "[MASK]"]},
            "data": {"source": str(tsv)}}
    vit = {"task": "image_classification", "run_dir": str(tmp / "vit"), "training": training,
           "model": {"preset": "vit-digits", "n_layers": 1, "d_model": 16, "n_heads": 2},
           "data": {"source": str(npz), "val_fraction": 0.2, "test_fraction": 0.2}}

    def relabel_tsv() -> None:
        tsv.write_text(tsv.read_text(encoding="utf-8").replace("pos\t", "POS\t", 1).replace("POS\t", "neg\t"),
                       encoding="utf-8")

    def brighten_npz() -> None:
        data = dict(np.load(npz))
        data["images"][0] = 255 - data["images"][0]
        np.savez(npz, **data)

    return [(bert, tsv, relabel_tsv), (vit, npz, brighten_npz)]


def test_resuming_on_changed_labelled_or_image_data_is_refused(tmp_path):
    for spec, _, change in labelled_and_image_recipes(tmp_path):
        run = Path(spec["run_dir"])
        train_recipe(recipe_from_dict(spec))
        change()
        before = digest(run)
        longer = {**spec, "training": {**spec["training"], "max_steps": 4}}
        with pytest.raises(ConfigError, match="training data .* changed .*--fresh"):
            train_recipe(recipe_from_dict(longer))
        assert digest(run) == before, spec["task"]


# -- 5. metrics and samples on resume -----------------------------------------------------------

def test_resume_rewinds_samples_and_repairs_a_torn_metrics_line(tmp_path, caplog):
    reporter = Reporter(tmp_path, 30, stream=io.StringIO())
    for step in (10, 20, 30):
        reporter.log({"step": step, "train_loss": 1.0})
        reporter.samples(step, [f"text of step {step}\n--- not a header"])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 31, "train_lo')  # killed mid-write
    with caplog.at_level(logging.WARNING):
        reporter.truncate_after(20)
    assert "metrics.jsonl" in caplog.text and "line 4" in caplog.text
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20]
    samples = (tmp_path / "samples.txt").read_text()
    assert "step 20" in samples and "step 30" not in samples and samples.endswith("header\n")
    reporter.truncate_after(0)
    assert (tmp_path / "metrics.jsonl").read_text() == "" and (tmp_path / "samples.txt").read_text() == ""


def test_a_resumed_cli_run_has_each_samples_block_once(tmp_path):
    run = tmp_path / "run"
    train_recipe(recipe(tmp_path, run, steps=4, checkpoint_every=4))
    with open(run / "samples.txt", "a") as f:  # an evaluation after the last checkpoint, then a crash
        f.write("--- step 5 ---\nstale\n")
    train_recipe(recipe(tmp_path, run, steps=6, checkpoint_every=4))
    headers = [line for line in (run / "samples.txt").read_text().splitlines() if line.startswith("--- step")]
    assert headers == ["--- step 2 ---", "--- step 4 ---", "--- step 6 ---"]


# -- 6. temporaries of a crash -------------------------------------------------------------------

def test_a_crashs_temporary_files_are_removed_at_the_next_start(tmp_path):
    run, pid = tmp_path / "run", dead_pid()
    train_recipe(recipe(tmp_path, run))
    stale = [run / f".loss.png.{pid}-0123abcd.tmp.png", run / f".metrics.jsonl.{pid}-89abcdef.tmp.jsonl",
             run / "checkpoints" / f".model.safetensors.{pid}-00000000.tmp.safetensors",
             tmp_path / "cache" / f".abc.bin.{pid}-0000ffff.tmp.bin"]
    for path in stale:
        path.write_text("half")
    import shutil

    shutil.copytree(run / "checkpoints" / "best", run / "checkpoints" / f".tmp-best-{pid}-deadbeef")
    shutil.copytree(run / "checkpoints" / "last", run / "checkpoints" / f".old-last-{pid}-cafebabe")
    kept = [run / f".loss.png.{os.getpid()}-0123abcd.tmp.png",  # a live process's
            run / ".my.tmp", run / f".notes.{pid}-0123abcd.tmp.txt"]  # not tformer's form
    for path in kept:
        path.write_text("keep")
    train_recipe(recipe(tmp_path, run, steps=6))
    for path in stale:
        assert not path.exists(), path
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "last"]
    assert all(path.read_text() == "keep" for path in kept)


def test_a_best_checkpoint_cut_between_its_renames_is_recovered(tmp_path):
    run, pid = tmp_path / "run", dead_pid()
    train_recipe(recipe(tmp_path, run))
    best = run / "checkpoints" / "best"
    best.rename(run / "checkpoints" / f".old-best-{pid}-deadbeef")
    (run / "checkpoints" / "last").rename(run / "checkpoints" / f".old-last-{pid}-deadbeef")
    train_recipe(recipe(tmp_path, run, steps=6))  # last came back too: it resumes, not restarts
    assert best.is_dir() and sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "last"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == [1, 2, 3, 4, 5, 6]


# -- 7. the progress line -----------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_plain_lines_off_a_terminal_and_one_line_on_it(tmp_path):
    log_file, terminal = io.StringIO(), Terminal()
    for stream in (log_file, terminal):
        reporter = Reporter(tmp_path, 10, stream=stream)
        for step in (1, 2, 3):
            reporter.progress(step, 2.0, 1e-3, 100.0)
        reporter.end_line()
    assert "\r" not in log_file.getvalue() and len(log_file.getvalue().splitlines()) == 3
    assert "ETA --:--" in log_file.getvalue().splitlines()[0]
    assert terminal.getvalue().count("\r") == 3 and terminal.getvalue().endswith("\n")


# -- 8. evaluate says how many tokens it scored ----------------------------------------------------

def test_evaluate_reports_the_tokens_it_scored(tmp_path):
    run = tmp_path / "run"
    train_recipe(recipe(tmp_path, run))
    result = evaluate_run(run)
    assert result["val_tokens"] == 2 * 4 * 16  # eval_batches x batch_size x context


# -- 10. relative paths in a recipe file -----------------------------------------------------------

def test_relative_paths_in_a_recipe_file_are_found_beside_it(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "tok.json").write_text("{}")
    (folder / "r.yaml").write_text(textwrap.dedent("""
        task: causal_lm
        model: {preset: gpt-nano, init_from: base}
        tokenizer: {kind: file, path: tok.json}
        run_dir: out
    """))
    (folder / "base").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load_recipe(folder / "r.yaml")
    assert Path(loaded.tokenizer.path) == folder / "tok.json"
    assert Path(loaded.model["init_from"]) == folder / "base"
    assert loaded.run_dir == "out"  # outputs go where the user runs, as before
    overridden = load_recipe(folder / "r.yaml", ["tokenizer.path=mine.json"])
    assert overridden.tokenizer.path == "mine.json"  # typed by the user: relative to the cwd


def test_a_missing_init_from_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = recipe(tmp_path, tmp_path / "run")
    bad = recipe_from_dict({**r.to_dict(), "model": {**r.model, "init_from": "runs/absent"}})
    with pytest.raises(ConfigError, match=r"model.init_from='runs/absent' not found: looked in .*runs/absent"):
        train_recipe(bad)
