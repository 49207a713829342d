"""Test-wide settings and shared fixtures: one thread for tiny models; every shipped recipe
trained 2 steps at a tiny size on local data (`trained`, once per session), a digit image."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo
from PIL import Image

from tformer.config import load_mapping
from tformer.models.registry import preset_family
from tformer.training.recipe import recipe_from_dict, train_recipe

# The backend sweeps compile FlexAttention once per mask pattern; more than dynamo's default of 8
# would silently fall back to the uncompiled path and stop testing the compiled kernel.
torch._dynamo.config.recompile_limit = 64
# Under pytest-xdist (scripts/test.sh runs two workers) the workers share the cores: each takes
# its share of the threads, or every op of one would wait for the other's.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
# Tests fix their thread counts (the `one_thread` fixture); the Trainer's contention policy
# (tformer.cpu) would change them in the middle of a test.
os.environ.setdefault("TFORMER_CPU_THREADS", str(torch.get_num_threads()))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are bound by per-op overhead: on a busy machine a second thread only waits.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_line_error():
    """`one_line_error(call)`: call raises a ValueError whose message is one line; returns it."""
    def check(call) -> str:
        with pytest.raises(ValueError) as error:
            call()
        assert "\n" not in str(error.value)
        return str(error.value)

    return check


RECIPES = sorted((Path(__file__).resolve().parents[1] / "src" / "tformer" / "recipes").glob("*.yaml"))
WORDS = "the king queen good bad love war lord my speaks of and fine dull great poor film".split()

TINY_MODEL = {  # by family: one layer, 16 dimensions
    "gpt": dict(n_layers=1, d_model=16, n_heads=2, context_length=16),
    "bert": dict(n_layers=1, d_model=16, n_heads=2, context_length=32),
    "seq2seq": dict(n_encoder_layers=1, n_decoder_layers=1, d_model=16, n_heads=2, context_length=32),
    "transformer_xl": dict(n_layers=1, d_model=16, n_heads=2, d_ff=32, seg_len=8, mem_len=8, eval_mem_len=16),
    "vit": dict(n_layers=1, d_model=16, n_heads=2, patch_size=4, d_ff=32),
    "image_gen": dict(n_encoder_layers=1, n_decoder_layers=1, d_model=16, n_heads=2),
}

@pytest.fixture(scope="session")
def local_data(tmp_path_factory) -> dict[str, Path]:
    root, rng = tmp_path_factory.mktemp("recipe-data"), random.Random(0)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))  # noqa: E731
    (root / "corpus.txt").write_text("\n".join(sentence() for _ in range(400)) + "\n", encoding="utf-8")
    rows = [f"{'pos' if i % 2 else 'neg'}\t{sentence()}" for i in range(60)]
    (root / "labelled.tsv").write_text("label\ttext\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return {"text": root / "corpus.txt", "labelled": root / "labelled.tsv", "root": root}


def pairs_file(root: Path, src: str, tgt: str) -> Path:
    rng = random.Random(1)
    lines = [f"{' '.join(rng.choice(WORDS) for _ in range(4))}\t{' '.join(rng.choice(WORDS) for _ in range(5))}"
             for _ in range(40)]
    path = root / f"pairs-{src}-{tgt}.tsv"
    path.write_text(f"{src}\t{tgt}\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny(path: Path, data: dict[str, Path], run_dir: Path, init_from: Path | None = None) -> dict:
    """The shipped recipe with sizes and sources shrunk (and init_from pointed at a tiny run)."""
    recipe = load_mapping(path)
    task, model = recipe["task"], dict(recipe["model"])
    if model.get("init_from"):
        model["init_from"] = str(init_from)  # sizes come from that run
        recipe["tokenizer"] = {"kind": "file", "path": str(init_from / "tokenizer.json")}
    else:
        model.update(TINY_MODEL[preset_family(model["preset"])])
    source = {
        "causal_lm": {"source": str(data["text"])}, "segment_lm": {"source": str(data["text"])},
        "masked_lm": {"sources": [str(data["text"]), str(data["labelled"])], "max_length": 16},
        "classification": {"source": str(data["labelled"]), "fold": None, "val_fraction": 0.25},
        "image_classification": {"source": "digits"}, "image_generation": {"source": "digits",
                                                                           "judge_samples_per_class": 2,
                                                                           "samples_per_class": 1},
    }.get(task, {})
    if task == "seq2seq":
        d = recipe["data"]
        source = {"source": str(pairs_file(data["root"], d["src_column"], d["tgt_column"])), "valid_pairs": 4,
                  "test_pairs": 4, "tokens_per_batch": 256, "n_samples": 1}
    if recipe.get("tokenizer", {}).get("kind") == "bpe":
        recipe["tokenizer"] = {**recipe["tokenizer"], "vocab_size": 300}
    recipe.update(model=model, data={**recipe.get("data", {}), **source}, run_dir=str(run_dir),
                  training={**recipe.get("training", {}), "max_steps": 2, "batch_size": 4, "eval_every": 2,
                            "eval_batches": 1, "log_every": 1, "device": "cpu", "grad_accum": 1,
                            "warmup_steps": 1},
                  sample={"tokens": 4, "prompt": "the"} if task in ("causal_lm", "segment_lm") else {})
    return recipe


@pytest.fixture(scope="session")
def trained(local_data, tmp_path_factory) -> dict[str, Path]:
    """Every shipped recipe trained 2 steps (masked-LM first: the classifiers start from it)."""
    root, runs = tmp_path_factory.mktemp("runs"), {}
    for path in sorted(RECIPES, key=lambda p: "init_from" in p.read_text()):
        recipe = tiny(path, local_data, root / path.stem, init_from=runs.get("bert-mlm-shakespeare"))
        result = train_recipe(recipe_from_dict(recipe, where=path.name))
        assert result.step == 2 and result.best_val_loss is not None and np.isfinite(result.best_val_loss)
        runs[path.stem] = root / path.stem
    return runs


def digit_png(tmp_path: Path) -> Path:
    """A handwritten 7 (scikit-learn's digits) as a 32 x 32 PNG: models resize it to their size."""
    from sklearn.datasets import load_digits

    image = (load_digits().images[7] * 16).clip(0, 255).astype(np.uint8)  # a 7, 8 x 8
    Image.fromarray(image).resize((32, 32)).save(tmp_path / "seven.png")  # another size: resized
    return tmp_path / "seven.png"


@pytest.fixture
def seven_png(tmp_path: Path) -> Path:
    return digit_png(tmp_path)
