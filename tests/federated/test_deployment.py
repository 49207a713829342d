"""A real deployment on loopback: a SuperLink and two SuperNodes as separate processes, `flwr run`
submitting tformer's Flower app; 2 clients x 2 rounds of a tiny ViT: round 1, then the same
federation asked for 2 rounds resumes after round 1 and runs round 2 only. (Each round starts a
ClientApp process per client that imports torch: a round costs seconds, so the test runs two.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tformer.federated.deploy import write_app
from tformer.federated.spec import FederationSpec
from tformer.runs import checkpoint, open_run
from tformer.training.recipe import recipe_from_dict

TINY = {"task": "image_classification",
        "model": {"preset": "vit-digits", "d_model": 16, "n_layers": 1, "n_heads": 2},
        "data": {"source": "digits", "val_fraction": 0.1, "test_fraction": 0.1},
        "training": {"max_steps": 8, "batch_size": 16, "lr": 3e-3, "warmup_steps": 0, "threads": 1}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"flower-superlink exited with {process.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the SuperLink did not listen on port {port} within {seconds:.0f} s")


def flower_bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.fixture
def loopback(tmp_path: Path):
    """(SuperLink port, environment): the SuperLink and 2 SuperNodes run until the test ends."""
    port = free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "TFORMER_CPU_THREADS": "1",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([flower_bin("flower-superlink"), "--insecure", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    wait_for_port(port, procs[0])  # on a busy machine the SuperLink takes seconds to listen
    for k in range(2):
        procs.append(subprocess.Popen(
            [flower_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
             "--port", str(free_port()), "--node-config", f"partition-id={k} num-partitions=2"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        yield port, env
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def flwr_run(spec: FederationSpec, folder: Path, port: int, env: dict[str, str]) -> str:
    write_app(spec, folder, port=port)
    env = {**env, "FLWR_HOME": str(folder / "flwr-home")}
    done = subprocess.run([flower_bin("flwr"), "run", str(folder / "app"), "local", "--stream"], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_clients_two_rounds_then_resume(tmp_path: Path, loopback):
    port, env = loopback
    out = tmp_path / "fed"
    recipe = recipe_from_dict({**TINY, "run_dir": str(tmp_path / "central")}).to_dict()
    spec = FederationSpec(recipe=recipe, clients=2, rounds=1, partition="dirichlet:1.0", local_steps=2,
                          out=str(out))
    flwr_run(spec, tmp_path / "deploy", port, env)
    assert [r["round"] for r in rows(out / "metrics.jsonl")] == [0, 1]  # 0: the initial model
    clients = rows(out / "clients.jsonl")
    assert sorted(r["partition"] for r in clients) == [0, 1]
    assert sum(r["num-examples"] for r in clients) == 1458  # every training digit once
    assert checkpoint.load_progress(out / "checkpoints" / "last")["round"] == 1
    first = (out / "metrics.jsonl").read_text()

    flwr_run(FederationSpec(**{**json.loads(spec.to_json()), "rounds": 2}), tmp_path / "deploy", port, env)
    assert (out / "metrics.jsonl").read_text().startswith(first)  # rounds 0-1 kept as they were
    assert [r["round"] for r in rows(out / "metrics.jsonl")] == [0, 1, 2]  # no second round 0 or 1
    assert sorted((r["round"], r["partition"]) for r in rows(out / "clients.jsonl")) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    run = open_run(out, "last")  # tformer's own checkpoint format: evaluate / predict open it
    assert checkpoint.load_progress(run.checkpoint)["round"] == 2 and run.model.config.d_model == 16
