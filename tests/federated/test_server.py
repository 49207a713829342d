"""The server's run directory without a Flower runtime: per-round rows (with the privacy spent
under DP), the global checkpoint each round, a resume that drops rows after its round, and a
folder that is not tformer's left alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tformer.federated.privacy import gaussian_epsilon
from tformer.federated.server import global_model
from tformer.federated.spec import FederationSpec
from tformer.runs import checkpoint
from tformer.training.recipe import recipe_from_dict

TINY = {"task": "image_classification",
        "model": {"preset": "vit-digits", "d_model": 16, "n_layers": 1, "n_heads": 2},
        "data": {"source": "digits"}, "training": {"max_steps": 4, "batch_size": 16, "warmup_steps": 0}}


def spec(tmp_path: Path, **kw) -> FederationSpec:
    recipe = recipe_from_dict({**TINY, "run_dir": str(tmp_path / "central")}).to_dict()
    return FederationSpec(**{"recipe": recipe, "clients": 2, "rounds": 3, "local_steps": 1,
                             "out": str(tmp_path / "fed"), "dp_noise": 1.5, "dp_clip": 0.1, **kw})


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rounds_checkpoints_privacy_and_resume(tmp_path):
    with global_model(spec(tmp_path), fresh=False) as server:
        for r in (0, 1, 2):
            server.evaluate(r, server.arrays())
    out = tmp_path / "fed"
    metrics = rows(out / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [0, 1, 2] and (out / "federation.png").is_file()
    assert metrics[2]["epsilon"] == gaussian_epsilon(1.5, 2, 1e-5)[0] and metrics[0]["epsilon"] == 0.0
    assert checkpoint.load_progress(out / "checkpoints" / "last")["round"] == 2
    with open(out / "metrics.jsonl", "a") as f:  # a row a killed server wrote after its last checkpoint
        f.write(json.dumps({"round": 3, "step": 3, "val_loss": 1.0}) + "\n")
    with global_model(spec(tmp_path), fresh=False) as server:
        assert server.done == 2
    assert [m["round"] for m in rows(out / "metrics.jsonl")] == [0, 1, 2]
    with pytest.raises(ValueError, match="was federated with clients=2"), global_model(spec(tmp_path, clients=3),
                                                                                      fresh=False):
        pass


def test_foreign_folder_is_refused(tmp_path, one_line_error):
    (tmp_path / "fed").mkdir()
    (tmp_path / "fed" / "thesis.tex").write_text("mine")
    message = one_line_error(lambda: global_model(spec(tmp_path), fresh=True).__enter__())
    assert "not a tformer run directory" in message
    assert [p.name for p in (tmp_path / "fed").iterdir()] == ["thesis.tex"]


def test_more_rounds_on_a_resume_keep_the_steps_per_round(tmp_path):
    """Local steps left to the default follow --rounds; a resume asking for more rounds keeps the
    steps per round the federation started with (else the step count would run backwards)."""
    first = spec(tmp_path, local_steps=0, rounds=2)
    assert first.steps_per_round == 1  # max_steps 4 over 2 rounds x 2 clients
    with global_model(first, fresh=False) as server:
        for r in (0, 1):
            server.evaluate(r, server.arrays())
    more = spec(tmp_path, local_steps=0, rounds=4)
    with global_model(more, fresh=False) as server:
        assert server.spec.steps_per_round == 1 and server.done == 1
    longer = recipe_from_dict({**TINY, "training": {**TINY["training"], "max_steps": 40},
                               "run_dir": str(tmp_path / "central")}).to_dict()
    with global_model(spec(tmp_path, local_steps=0, rounds=4, recipe=longer), fresh=False) as server:
        assert server.spec.steps_per_round == 1  # the saved schedule, not 40 / (4 x 2) = 5
    with pytest.raises(ValueError, match="local_steps=1, not 3"), \
            global_model(spec(tmp_path, local_steps=3, rounds=4), fresh=False):
        pass


def test_rounds_count_the_server_and_every_client_energy_across_a_resume(tmp_path):
    """Each round's row carries the federation's cumulative energy: the server's own plus what
    every client metered for its local steps (and reported with its update), continued by a
    resume; a client's estimate makes the total an estimate."""
    from flwr.app import MetricRecord, RecordDict

    def reply(partition: int, joules: float, measured: float) -> RecordDict:
        return RecordDict({"metrics": MetricRecord({"round": 1, "partition": partition, "examples": 10,
                                                    "energy_j": joules, "energy_measured": measured})})

    with global_model(spec(tmp_path, dp_noise=0.0), fresh=False) as server:
        server.evaluate(0, server.arrays())
        server.record_clients([reply(0, 1000.0, 0.0), reply(1, 2000.0, 0.0)])
        server.evaluate(1, server.arrays())
    first = rows(tmp_path / "fed" / "metrics.jsonl")
    assert 0 < first[0]["energy_j"] < 3000.0 < first[1]["energy_j"]  # clients' 3 kJ + the server's own
    assert first[1]["energy_method"] == "estimated" and first[1]["co2_g"] > 0
    assert [r["partition"] for r in rows(tmp_path / "fed" / "clients.jsonl")] == [0, 1]
    with global_model(spec(tmp_path, dp_noise=0.0), fresh=False) as server:
        server.record_clients([reply(0, 500.0, 0.0)])
        server.evaluate(2, server.arrays())
    assert rows(tmp_path / "fed" / "metrics.jsonl")[-1]["energy_j"] > first[1]["energy_j"] + 500.0
