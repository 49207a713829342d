"""End to end through the CLI: train, kill -9 mid-run or mid-checkpoint, resume to the same
losses; torchrun with 2 processes equals 1 process; bad input changes nothing on disk."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tformer.cli import main

STEPS = 80


def write_corpus(path: Path) -> Path:
    import random

    rng = random.Random(0)
    words = ["the", "king", "queen", "speaks", "of", "love", "and", "war", "my", "lord", "sweet"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(3000)]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_recipe(tmp: Path, run: str, *, dropout: float = 0.1, batch: int = 8, steps: int = STEPS) -> Path:
    corpus = tmp / "corpus.txt"
    if not corpus.exists():
        write_corpus(corpus)
    recipe = tmp / f"{run}.yaml"
    recipe.write_text(textwrap.dedent(f"""
        task: causal_lm
        model: {{preset: gpt-nano, context_length: 32, n_layers: 2, n_heads: 2, d_model: 32,
                 dropout: {dropout}}}
        tokenizer: {{kind: char}}
        data: {{source: {corpus}, val_fraction: 0.1, cache_dir: {tmp / "cache"}}}
        training: {{max_steps: {steps}, batch_size: {batch}, lr: 3.0e-3, warmup_steps: 5,
                    eval_every: 10, eval_batches: 2, log_every: 1, checkpoint_every: 10,
                    seed: 3, device: cpu}}
        sample: {{tokens: 16}}
        run_dir: {tmp / run}
    """))
    return recipe


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tformer.cli", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and max(train_losses(run_dir), default=0) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"training did not reach step {step}: {proc.communicate()}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    tmp = tmp_path_factory.mktemp("reference")
    assert main(["train", str(write_recipe(tmp, "run"))]) == 0
    run = tmp / "run"
    for name in ("metrics.jsonl", "loss.png", "samples.txt", "tokenizer.json"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "best").is_dir() and (run / "checkpoints" / "last").is_dir()
    return train_losses(run)


def assert_same_losses(run_dir: Path, reference: dict[int, float]) -> None:
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    worst = max(abs(losses[s] - reference[s]) for s in reference)
    assert worst <= 1e-6, worst


def test_sigkill_mid_training_then_resume_reaches_the_same_losses(tmp_path, reference):
    recipe = write_recipe(tmp_path, "run")
    proc = cli("train", str(recipe))
    wait_for_step(tmp_path / "run", 25, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert max(train_losses(tmp_path / "run")) < STEPS
    done = cli("train", str(recipe))
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert_same_losses(tmp_path / "run", reference)


CRASH_WHILE_CHECKPOINTING = """
import os, signal, sys
from tformer.runs import checkpoint
from tformer.cli import main
original, saves = checkpoint._write_json, []
def write_json(path, data):
    if path.name == checkpoint.MANIFEST and path.parent.name.startswith(".tmp-last"):
        saves.append(path)
        if len(saves) == 3:  # the step-30 save: weights and state written, manifest not yet
            os.kill(os.getpid(), signal.SIGKILL)
    original(path, data)
checkpoint._write_json = write_json
sys.exit(main(["train", sys.argv[1]]))
"""


def test_sigkill_while_writing_a_checkpoint_then_resume(tmp_path, reference):
    recipe = write_recipe(tmp_path, "run")
    crashed = subprocess.run([sys.executable, "-c", CRASH_WHILE_CHECKPOINTING, str(recipe)],
                             capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    checkpoints = tmp_path / "run" / "checkpoints"
    assert json.loads((checkpoints / "last" / "progress.json").read_text())["step"] == 20
    done = cli("train", str(recipe))
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert_same_losses(tmp_path / "run", reference)
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]  # debris cleaned up


def test_two_torchrun_processes_match_one_process(tmp_path):
    single = write_recipe(tmp_path, "single", dropout=0.0, steps=12)
    double = write_recipe(tmp_path, "double", dropout=0.0, steps=12)
    assert main(["train", str(single)]) == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", "-m", "tformer.cli", "train", str(double)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = train_losses(tmp_path / "single"), train_losses(tmp_path / "double")
    assert sorted(one) == sorted(two) == list(range(1, 13))
    assert max(abs(one[s] - two[s]) for s in one) < 1e-5


def test_ddp_resume_with_dropout_is_exact(tmp_path):
    """Each process keeps its own random stream across a resume (2 processes, dropout 0.2)."""
    def torchrun(recipe, *overrides):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", "29518", "-m", "tformer.cli", "train", str(recipe),
                               "--set", "training.schedule=constant", *overrides],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    straight = write_recipe(tmp_path, "straight", dropout=0.2, steps=12)
    broken = write_recipe(tmp_path, "broken", dropout=0.2, steps=12)
    torchrun(straight)
    torchrun(broken, "--set", "training.max_steps=6")
    torchrun(broken)
    one, two = train_losses(tmp_path / "straight"), train_losses(tmp_path / "broken")
    assert sorted(two) == list(range(1, 13))
    assert max(abs(one[s] - two[s]) for s in one) < 1e-6


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_input_gets_one_clear_error_and_changes_nothing(tmp_path, reference, capsys):
    recipe = write_recipe(tmp_path, "run", steps=10)
    assert main(["train", str(recipe)]) == 0
    capsys.readouterr()
    cases = {
        "unknown key": (["train", str(recipe), "--set", "training.learning_rate=1"],
                        "unknown key 'learning_rate'.*did you mean 'lr'"),
        "unknown section": (["train", str(recipe), "--set", "trainer.lr=1"], "unknown section 'trainer'"),
        "bad value": (["train", str(recipe), "--set", "training.precision=fp8"], "precision='fp8'"),
        "missing data": (["train", str(recipe), "--set", f"data.source={tmp_path / 'nope.txt'}"],
                         "nope.txt"),
        "missing recipe": (["train", str(tmp_path / "absent.yaml")], "recipe not found"),
    }
    cases["wrong type"] = (["train", str(recipe), "--set", "training.batch_size=abc"],
                           "batch_size='abc' .* must be of type int")
    cases["no samples"] = (["train", str(recipe), "--set", "sample.tokens=0"], "sample.tokens must be >= 1")
    cases["no gpu"] = (["train", str(recipe), "--set", "training.device=cuda"], "no CUDA GPU")
    cases["changed model"] = (["train", str(recipe), "--set", "model.d_model=64"],
                              "model section differs .* use --fresh")
    cases["fresh with bad data"] = (["train", str(recipe), "--fresh", "--set",
                                     f"data.source={tmp_path / 'nope.txt'}"], "nope.txt")
    duplicated = tmp_path / "duplicated.yaml"
    duplicated.write_text(recipe.read_text() + "\ntask: causal_lm\n")
    cases["duplicate key"] = (["train", str(duplicated)], "duplicate key 'task'")
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("task: causal_lm\nmodel: [unclosed\n")
    cases["malformed recipe"] = (["train", str(malformed)], "not valid YAML at line")
    before = tree_digest(tmp_path)
    for name, (args, pattern) in cases.items():
        assert main(args) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, (name, err)
        assert re.search(pattern, err), (name, err)
    assert tree_digest(tmp_path) == before


def test_a_corrupted_checkpoint_stops_resume_with_a_clear_error(tmp_path, capsys):
    recipe = write_recipe(tmp_path, "run", steps=10)
    assert main(["train", str(recipe)]) == 0
    weights = tmp_path / "run" / "checkpoints" / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    recipe.write_text(recipe.read_text().replace("max_steps: 10", "max_steps: 20"))
    capsys.readouterr()
    before = tree_digest(tmp_path)
    assert main(["train", str(recipe)]) == 2
    assert "truncated" in capsys.readouterr().err
    assert tree_digest(tmp_path) == before


def test_generate_and_evaluate_a_trained_run(tmp_path, capsys):
    recipe = write_recipe(tmp_path, "run", steps=10)
    assert main(["train", str(recipe)]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "the king", "--max-new-tokens", "50",
                 "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the king") and len(out) > 50
    assert main(["evaluate", str(tmp_path / "run")]) == 0
    assert "perplexity" in capsys.readouterr().out
