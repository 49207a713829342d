"""`tformer federate`: bad input is one line (exit 2) and nothing is written; `--app` writes the
Flower app of a deployment and prints the commands that run it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tformer.cli import main

DIGITS = {"task": "image_classification", "model": {"preset": "vit-digits", "d_model": 16, "n_layers": 1, "n_heads": 2},
          "data": {"source": "digits"}, "training": {"max_steps": 4, "batch_size": 16}}
TEXT = {"task": "causal_lm", "model": {"preset": "gpt-micro", "n_layers": 1, "d_model": 16, "n_heads": 2,
                                        "context_length": 8},
        "data": {"source": "PLACEHOLDER"}, "training": {"max_steps": 4, "batch_size": 2}}


def recipe(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**data, "run_dir": str(tmp_path / "run")}))
    return str(path)


@pytest.mark.parametrize("args, message", [
    (["--partition", "dirichlet:0"], "alpha must be > 0"),
    (["--partition", "dirichlet:-0.5"], "alpha must be > 0"),
    (["--partition", "shards:3"], "is not a partition"),
    (["--clients", "5000"], "5000 clients for 1458 training examples"),
    (["--partition", "groups"], "no natural groups"),
    (["--strategy", "fedprox", "--mu", "0"], "--mu must be > 0"),
    (["--dp-noise", "1.0"], "--dp-clip > 0"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    clients = [] if "--clients" in args else ["--clients", "2"]
    out = tmp_path / "fed"
    assert main(["federate", recipe(tmp_path, DIGITS), *clients, "--rounds", "1", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err and err.startswith("error:")
    assert not out.exists()


def test_a_task_that_cannot_be_partitioned(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question.\n" * 40)
    data = {**TEXT, "data": {"source": str(corpus)}, "tokenizer": {"kind": "char"}}
    out = tmp_path / "fed"
    assert main(["federate", recipe(tmp_path, data), "--clients", "2", "--rounds", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot be partitioned" in err and not out.exists()


def test_app_writes_a_flower_app(tmp_path, capsys):
    app = tmp_path / "deploy"
    assert main(["federate", recipe(tmp_path, DIGITS), "--clients", "2", "--rounds", "3", "--app", str(app),
                 "--port", "9300"]) == 0
    printed = capsys.readouterr().out
    assert "flower-superlink --insecure --port 9300" in printed and "partition-id=1 num-partitions=2" in printed
    project = (app / "app" / "pyproject.toml").read_text()
    assert 'serverapp = "tformer.federated.apps:server_app"' in project and '\\"rounds\\": 3' in project
    assert 'address = "127.0.0.1:9300"' in (app / "flwr-home" / "config.toml").read_text()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    assert main(["federate", recipe(tmp_path, DIGITS), "--clients", "2", "--rounds", "3", "--app",
                 str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "x"
