"""Fault injection: a tiny CLI training run is killed with SIGKILL at points a seeded schedule
draws (while building the token cache, mid-step, while writing a checkpoint, between a
checkpoint's two renames, halfway through a metrics line), and resumed each time by running the
same command again. At the end it equals an unbroken run: the same losses, the same metrics rows
(none twice, none missing), the same samples, and no temporary file left anywhere."""

import json
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tformer.cli import main
from tformer.files import TEMPORARY_FILE, TEMPORARY_FOLDER

STEPS = 24
SCHEDULE_SEED = 11
POINTS = {"step": 10, "checkpoint": 12, "swap": 4, "metrics": 12}  # point -> highest n drawn

KILLER = textwrap.dedent("""
    import faulthandler, json, os, signal, sys
    faulthandler.dump_traceback_later(240, exit=True)  # a hang shows where, instead of a timeout
    from tformer import files
    from tformer.cli import main
    from tformer.training.report import Reporter
    from tformer.training.trainer import Trainer

    point, n, seen = sys.argv[2], int(sys.argv[3]), [0]

    def maybe_die(name, before=None):
        if name == point:
            seen[0] += 1
            if seen[0] == n:
                if before:
                    before()
                os.kill(os.getpid(), signal.SIGKILL)

    real_fsync, real_replace = files.fsync_file, files.os.replace
    def fsync_file(path):  # a file of a checkpoint or of the token cache, written, not yet renamed
        maybe_die("cache" if str(path).endswith(".tmp.bin") else
                  "checkpoint" if "/.tmp-" in str(path) else "other")
        real_fsync(path)
    def replace(src, dst):  # a checkpoint swap: the old folder moved aside, the new one not yet in
        if os.path.basename(str(src)).startswith(".tmp-"):
            maybe_die("swap")
        real_replace(src, dst)
    real_step, real_log = Trainer.train_step, Reporter.log
    def train_step(self):
        maybe_die("step")
        return real_step(self)
    def log(self, row):
        def half_a_line():
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row)[:17])
        maybe_die("metrics", half_a_line)
        real_log(self, row)
    files.fsync_file, files.os.replace = fsync_file, replace
    Trainer.train_step, Reporter.log = train_step, log
    sys.exit(main(["train", sys.argv[1]]))
""")


def write_recipe(tmp: Path, name: str) -> Path:
    corpus = tmp / "corpus.txt"
    if not corpus.exists():
        rng = random.Random(0)
        words = ["the", "king", "queen", "speaks", "of", "love", "and", "war", "my", "lord"]
        corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(6)) for _ in range(800)))
    recipe = tmp / f"{name}.yaml"
    recipe.write_text(textwrap.dedent(f"""
        task: causal_lm
        model: {{preset: gpt-nano, context_length: 16, n_layers: 1, n_heads: 2, d_model: 16, dropout: 0.1}}
        tokenizer: {{kind: char}}
        data: {{source: {corpus}, val_fraction: 0.1, cache_dir: {tmp / f"cache-{name}"}}}
        training: {{max_steps: {STEPS}, batch_size: 4, lr: 3.0e-3, warmup_steps: 2, eval_every: 4,
                    eval_batches: 2, log_every: 1, checkpoint_every: 4, seed: 5, device: cpu}}
        sample: {{tokens: 8}}
        run_dir: {tmp / name}
    """))
    return recipe


def rows(run_dir: Path) -> list[dict]:
    """Metrics rows without the measurements that differ between runs (timings, energy, CO2)."""
    def measured(key: str) -> bool:
        return key in ("tokens_per_s", "examples_per_s") or "energy" in key or key.endswith("_per_j") \
            or key.startswith("co2")

    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.append({k: v for k, v in row.items() if not measured(k)})
    return out


def schedule(seed: int) -> list[tuple[str, int]]:
    """The token-cache build first (it happens once), then every other point once, in an order
    and at a moment (the n-th time the point is reached) drawn at random."""
    rng = random.Random(seed)
    points = sorted(POINTS)
    rng.shuffle(points)
    return [("cache", 1)] + [(point, rng.randint(1, POINTS[point])) for point in points]


def leftovers(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*")
            if TEMPORARY_FILE.match(p.name) or TEMPORARY_FOLDER.match(p.name)]


def test_kill_9_at_random_points_then_resume_equals_an_unbroken_run(tmp_path):
    assert main(["train", str(write_recipe(tmp_path, "unbroken"))]) == 0
    recipe, run = write_recipe(tmp_path, "broken"), tmp_path / "broken"
    kills = []
    for point, n in schedule(SCHEDULE_SEED):
        proc = subprocess.run([sys.executable, "-c", KILLER, str(recipe), point, str(n)],
                              capture_output=True, text=True, timeout=300, check=False,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-2000:]
        kills.append((point, n, proc.returncode == -signal.SIGKILL))
    assert kills[0] == ("cache", 1, True)  # killed while building the token cache
    assert sum(killed for *_, killed in kills) >= 3, kills
    done = subprocess.run([sys.executable, "-m", "tformer.cli", "train", str(recipe)],
                          capture_output=True, text=True, timeout=300, check=False,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    assert rows(run) == rows(tmp_path / "unbroken"), kills  # same losses, each row once
    assert (run / "samples.txt").read_text() == (tmp_path / "unbroken" / "samples.txt").read_text()
    assert leftovers(run) == [] and leftovers(tmp_path / "cache-broken") == [], kills
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "last"]
    assert json.loads((run / ".tformer-run").read_text())["finished"] is True
