"""FSDP2 (`training.strategy=fsdp2`) on CPU with 2 gloo processes under torchrun: the same losses
as one process (with gradient accumulation), an exact resume after kill -9, and the same
checkpoint files whatever the process count (saved by 2 processes, resumed by 1; saved by 1,
resumed by 2). Bad launches are refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_model

from tformer.cli import main
from tformer.config import ConfigError
from tformer.models.gpt import GPT, GPTConfig
from tformer.runs import checkpoint
from tformer.training import CausalLMTask, TrainConfig, Trainer, distributed, memory_plan

STEPS, KILL_AT = 8, 6  # checkpoints every 4 steps: a kill at step 6 resumes from step 4


# One process of two, in the environment torchrun gives its workers, optionally killed with
# SIGKILL before a given step. A fresh interpreter, not a fork of pytest: a fork inherits whatever
# threads earlier tests left running (gRPC's from the Flower tests, OpenMP's pool) and hung there.
RANK_PROCESS = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from tformer.cli import main
from tformer.training import Trainer
kill_before = int(sys.argv[1])
if kill_before:
    real_step = Trainer.train_step
    def train_step(self):
        if self.step + 1 == kill_before:  # every rank dies before this step
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(self)
    Trainer.train_step = train_step
sys.exit(main(sys.argv[2:]))
"""


def two_processes(*argv: str, kill_before: int = 0) -> list[int | None]:
    """`torchrun --nproc_per_node 2 -m tformer.cli ARGV` as two worker processes (torchrun's
    environment, without its agent process). Exit codes (-9: killed); stderr of each on failure."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_PROCESS, str(kill_before), *argv], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    codes = []
    for rank, proc in enumerate(procs):
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        codes.append(proc.returncode)
        if proc.returncode not in (0, -signal.SIGKILL):
            print(f"rank {rank} exited {proc.returncode}:\n{err[-3000:]}")
    return codes


def write_recipe(tmp: Path, run: str, strategy: str = "fsdp2") -> Path:
    corpus = tmp / "corpus.txt"
    if not corpus.exists():
        import random

        rng = random.Random(0)
        words = ["the", "king", "queen", "speaks", "of", "love", "and", "war", "my", "lord", "sweet"]
        corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
                                    for _ in range(1500)))
    recipe = tmp / f"{run}.yaml"
    recipe.write_text(textwrap.dedent(f"""
        task: causal_lm
        model: {{preset: gpt-nano, context_length: 16, n_layers: 2, n_heads: 2, d_model: 16, dropout: 0.0}}
        tokenizer: {{kind: char}}
        data: {{source: {corpus}, val_fraction: 0.1, cache_dir: {tmp / "cache"}}}
        training: {{max_steps: {STEPS}, batch_size: 8, grad_accum: 2, lr: 3.0e-3, warmup_steps: 2,
                    schedule: constant, eval_every: 4, eval_batches: 3, log_every: 1, checkpoint_every: 4,
                    seed: 3, device: cpu, threads: 1, strategy: {strategy}}}
        sample: {{tokens: 8}}
        run_dir: {tmp / run}
    """))
    return recipe


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train_loss" in r]
    assert steps == sorted(set(steps)), steps  # no row twice after a resume
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def assert_same_losses(run_dir: Path, reference: dict[int, float]) -> None:
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    worst = max(abs(losses[s] - reference[s]) for s in reference)
    assert worst <= 1e-5, worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One process to the end (the reference); two FSDP2 processes killed with SIGKILL before
    step 6, and a copy of that run directory made before anything resumes it."""
    tmp = tmp_path_factory.mktemp("fsdp")
    assert main(["train", str(write_recipe(tmp, "single", strategy="ddp"))]) == 0
    killed = two_processes("train", str(write_recipe(tmp, "killed")), kill_before=KILL_AT)
    assert killed == [-signal.SIGKILL] * 2
    assert json.loads((tmp / "killed/checkpoints/last/progress.json").read_text())["step"] == 4
    assert max(train_losses(tmp / "killed")) == KILL_AT - 1
    shutil.copytree(tmp / "killed", tmp / "to_one")
    return tmp


def test_fsdp2_killed_and_resumed_equals_one_process(runs):
    """Steps 1-5 ran sharded before the kill, 5-8 again after resuming from step 4."""
    assert two_processes("train", str(runs / "killed.yaml")) == [0, 0]
    assert_same_losses(runs / "killed", train_losses(runs / "single"))
    last = checkpoint.load(runs / "killed/checkpoints/last", None)
    assert last.progress["step"] == STEPS and len(last.train_state["rng"]) == 2


def test_the_memory_plan_counts_this_process_shards(runs):
    """Under fsdp2 each process holds about half of the parameters, gradients and AdamW state
    (counted from its DTensor shards, padding included), and every rank's peak is recorded."""
    plan = json.loads((runs / "killed" / memory_plan.PLAN_FILE).read_text())
    assert plan["settings"]["strategy"] == "fsdp2" and plan["settings"]["processes"] == 2
    whole = 4 * plan["n_parameters"]  # fp32
    assert whole / 2 <= plan["parameters"] < whole / 2 * 1.05
    assert plan["gradients"] == plan["parameters"] and plan["optimizer_state"] == 2 * plan["parameters"]
    [row] = plan["measured"]
    assert len(row["measured_peak_by_rank"]) == 2 and row["measured_peak"] == row["measured_peak_by_rank"][0]


def test_saved_by_two_processes_resumes_with_one(runs):
    recipe = write_recipe(runs, "to_one")
    assert main(["train", str(recipe), "--set", "training.strategy=ddp"]) == 0  # a plain process
    assert_same_losses(runs / "to_one", train_losses(runs / "single"))


def test_saved_by_one_process_resumes_with_two_and_the_files_are_alike(runs):
    recipe = write_recipe(runs, "from_one")
    assert main(["train", str(recipe), "--set", "training.strategy=ddp", "--set", "training.max_steps=4"]) == 0
    # activation checkpointing (applied before sharding) changes no loss either
    assert two_processes("train", str(recipe), "--set", "training.activation_checkpointing=true") == [0, 0]
    assert_same_losses(runs / "from_one", train_losses(runs / "single"))
    # the checkpoint FSDP2 wrote has the one-process layout: the same tensor names, the tied head
    # stored once, and an optimizer state numbered like optimizer.state_dict()'s
    sharded, single = runs / "from_one/checkpoints/last", runs / "single/checkpoints/last"
    assert checkpoint.stored_dtypes(sharded / checkpoint.WEIGHTS) == checkpoint.stored_dtypes(single / checkpoint.WEIGHTS)
    a, b = (checkpoint.load_train_state(path, "cpu")["optimizer"] for path in (sharded, single))
    assert [g["params"] for g in a["param_groups"]] == [g["params"] for g in b["param_groups"]]
    worst = max((a["state"][i][k] - b["state"][i][k]).abs().max().item()
                for i in b["state"] for k in ("exp_avg", "exp_avg_sq", "step"))
    assert worst < 1e-6


def test_a_state_dict_is_saved_like_the_model(tmp_path):
    """What FSDP2's rank 0 writes (a gathered state dict, tied tensors shared) is byte for byte
    the file save_model writes for the model."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=23, context_length=8, n_layers=1, n_heads=2, d_model=8))
    save_model(model, str(tmp_path / "model.safetensors"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["tok_emb.weight"]
    checkpoint.save(tmp_path / "ckpt", state, progress={"step": 0}, config={})
    assert (tmp_path / "ckpt" / checkpoint.WEIGHTS).read_bytes() == (tmp_path / "model.safetensors").read_bytes()


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(0)
    ours, theirs = (torch.nn.Linear(4, 3) for _ in range(2))
    theirs.load_state_dict(ours.state_dict())
    for model in (ours, theirs):
        (model(torch.randn(5, 4, generator=torch.Generator().manual_seed(1))) ** 2).sum().backward()
    norm = distributed.clip_grad_norm(ours.parameters(), 0.5)
    assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.5))
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours.parameters(), theirs.parameters()))


def test_bad_launches_are_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=r"torchrun --nproc_per_node N"):
        distributed.setup("cpu", "fsdp2")
    assert main(["train", str(write_recipe(tmp_path, "run"))]) == 2  # the CLI prints the one line
    assert "torchrun --nproc_per_node N" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="cannot run on meta"):
        distributed.check_strategy("fsdp2", torch.device("meta"), size=2)
    distributed.check_strategy("ddp", torch.device("meta"))  # DDP's own checks are elsewhere
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: fsdp2 has nothing to shard
    assert distributed.setup("cpu", "fsdp2").size == 1


def test_a_world_size_that_does_not_divide_the_batch_is_refused(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 23, 2000).astype(np.uint16)
    task = CausalLMTask(tokens[:1500], tokens[1500:], context=8, batch_size=8, seed=1, n_eval_batches=1)
    model = GPT(GPTConfig(vocab_size=23, context_length=8, n_layers=1, n_heads=2, d_model=8))
    config = TrainConfig(batch_size=8, grad_accum=2, strategy="fsdp2", device="cpu")
    with pytest.raises(ConfigError, match=r"divisible by grad_accum x processes \(2 x 3\)"):
        Trainer(model, task, config, tmp_path, world=distributed.World(rank=0, size=3))
