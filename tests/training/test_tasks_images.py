"""Image tasks end to end on scikit-learn's digits (no download): ViT classification and the
class- or prompt-conditioned image generator train, resume-safely shard their batches, evaluate
with the judge, write their PNGs, come back with `open_run`, and refuse bad settings clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tformer.cli import main
from tformer.config import ConfigError
from tformer.inference.pipeline import pipeline
from tformer.runs import open_run
from tformer.training.recipe import evaluate_run, prepare, recipe_from_dict, train_recipe


def generator_recipe(run_dir: Path, **data) -> dict:
    return {"task": "image_generation", "model": {"preset": "seed-sketch", "d_model": 32},
            "data": {"source": "digits", "samples_per_class": 2, "judge_samples_per_class": 4, **data},
            "training": {"max_steps": 12, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2, "eval_every": 6,
                         "log_every": 6},
            "run_dir": str(run_dir)}


def vit_recipe(run_dir: Path, **data) -> dict:
    return {"task": "image_classification", "model": {"preset": "vit-digits", "d_model": 32, "n_layers": 2},
            "data": {"source": "digits", "shift": 1, **data},
            "training": {"max_steps": 12, "batch_size": 32, "lr": 3e-3, "warmup_steps": 2, "eval_every": 6,
                         "log_every": 6},
            "run_dir": str(run_dir)}


def test_batches_are_a_function_of_the_step_and_shard_cleanly(tmp_path: Path) -> None:
    for recipe in (generator_recipe(tmp_path, guidance_dropout=0.5), vit_recipe(tmp_path)):
        task = prepare(recipe_from_dict(recipe)).task
        whole, again = task.train_batch(3, 0, 1), task.train_batch(3, 0, 1)
        halves = [task.train_batch(3, shard, 2) for shard in (0, 1)]
        for key in whole.tensors:
            assert torch.equal(whole[key], again[key])
            assert torch.equal(whole[key], torch.cat([h[key] for h in halves]))
        first = next(iter(whole.tensors))
        assert not torch.equal(whole[first], task.train_batch(4, 0, 1)[first])
        assert whole.n_examples == sum(h.n_examples for h in halves) == recipe["training"]["batch_size"]


def test_condition_dropout_uses_the_null_condition(tmp_path: Path) -> None:
    task = prepare(recipe_from_dict(generator_recipe(tmp_path, guidance_dropout=0.5))).task
    cond = torch.cat([task.train_batch(step, 0, 1)["cond_ids"] for step in range(40)])
    dropped = (cond[:, 0] == 0).float().mean()
    assert 0.35 < float(dropped) < 0.65


def test_generator_trains_evaluates_and_generates(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "gen"
    result = train_recipe(recipe_from_dict(generator_recipe(run_dir)))
    assert result.step == 12 and (run_dir / "samples.png").is_file()
    assert "the judge recognises" in (run_dir / "samples.txt").read_text()
    assert not (run_dir / "tokenizer.json").exists()  # label conditions read no text
    run = open_run(run_dir)
    assert run.tokenizer is None and run.model.config.labels[7] == "seven"
    assert run.capabilities == ["conditional_decoder", "image_sampler"]
    scores = evaluate_run(run_dir)
    assert scores["val_loss"] < np.log(17)  # learned something: below uniform over the 17 grey levels
    assert scores["held_out_real/recognised"] > 0.9  # the judge knows real digits
    assert scores["held_out_real/frechet"] < scores["per_pixel_baseline/frechet"]  # and tells them apart
    out = tmp_path / "sevens.png"
    assert main(["generate", str(run_dir), "--condition", "seven", "--condition", "1", "--n", "3",
                 "--out", str(out), "--seed", "0"]) == 0
    assert out.is_file() and "6 images" in capsys.readouterr().out
    assert main(["generate", str(run_dir), "--condition", "eleven"]) == 2
    assert "unknown class 'eleven'" in capsys.readouterr().err
    assert main(["generate", str(run_dir), "--guidance", "-2"]) == 2
    assert "guidance scale must be" in capsys.readouterr().err


def test_text_prompts_train_with_a_character_tokenizer(tmp_path: Path) -> None:
    run_dir = tmp_path / "text"
    recipe = generator_recipe(run_dir, condition="text", prompts=["a handwritten {name}", "{name}"])
    recipe["training"]["max_steps"] = 6
    train_recipe(recipe_from_dict(recipe))
    run = open_run(run_dir)
    assert run.tokenizer is not None and run.model.config.condition == "text"
    assert main(["generate", str(run_dir), "--prompt", "a handwritten seven", "--n", "2",
                 "--out", str(tmp_path / "p.png")]) == 0


def test_vit_trains_and_evaluates_on_a_held_out_split(tmp_path: Path) -> None:
    run_dir = tmp_path / "vit"
    train_recipe(recipe_from_dict(vit_recipe(run_dir)))
    scores = evaluate_run(run_dir)
    assert scores["split"] == "held-out 10%" and 170 <= scores["examples"] <= 190
    assert Path(scores["confusion_png"]).is_file()
    from tformer.training.tasks.image_classification import DataSpec, load_splits

    _, _, test, _ = load_splits(DataSpec(source="digits", shift=1))  # the run's held-out split
    predicted = pipeline(run_dir).classify(list(test.images))  # the predict API, image by image
    names = open_run(run_dir).model.labels
    accuracy = np.mean([names.index(p.label) == t for p, t in zip(predicted, test.labels)])
    assert scores["accuracy"] == pytest.approx(accuracy)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in m for m in metrics)


def test_vit_splits_are_disjoint_and_stratified() -> None:
    from tformer.training.tasks.image_classification import DataSpec, load_splits

    train, val, test, _ = load_splits(DataSpec(source="digits"))
    assert len(train) + len(val) + len(test) == 1797
    for part in (val, test):
        counts = np.bincount(part.labels, minlength=10)
        assert counts.min() >= 15


@pytest.mark.parametrize("data, match", [
    ({"guidance_scale": -1.0}, "guidance scale must be"),
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"levels": 1}, r"data.levels must be in \[2, 4096\]"),
    ({"condition": "text", "prompts": ["no placeholder"]}, "templates holding {name}"),
    ({"condition": "sound"}, "data.condition"),
])
def test_bad_generator_settings_are_named(tmp_path: Path, data: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        recipe_from_dict(generator_recipe(tmp_path, **data))


def test_non_square_images_are_refused_for_vit(tmp_path: Path) -> None:
    path = tmp_path / "wide.npz"
    np.savez(path, images=np.zeros((20, 8, 12), np.uint8), labels=np.arange(20) % 2)
    with pytest.raises(ConfigError, match="square images, these are 8x12"):
        prepare(recipe_from_dict(vit_recipe(tmp_path, source=str(path))))


def test_demo_trains_the_digit_generator_and_prints_the_judges_table(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "demo"
    assert main(["demo", "--steps", "4", "--run-dir", str(run_dir), "--set", "model.d_model=16",
                 "--set", "data.judge_samples_per_class=4", "--set", "training.eval_every=4"]) == 0
    out = capsys.readouterr().out
    for row in ("samples (guidance 2)", "held-out real digits", "per-pixel baseline", "samples.png"):
        assert row in out
    assert (run_dir / "samples.png").is_file()


def test_images_of_another_size_are_refused_at_evaluation(tmp_path: Path) -> None:
    path = tmp_path / "shapes.npz"
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), labels=np.arange(40) % 2)
    recipe = generator_recipe(tmp_path / "run", source=str(path), levels=4)
    recipe["training"].update(max_steps=2, batch_size=4)
    train_recipe(recipe_from_dict(recipe))
    np.savez(path, images=rng.integers(0, 256, (40, 10, 10), dtype=np.uint8), labels=np.arange(40) % 2)
    with pytest.raises(ConfigError, match=r"shapes.npz holds images of \(H, W, C\) = \(10, 10, 1\) but this "
                                          r"image generator expects \(8, 8, 1\)"):
        evaluate_run(tmp_path / "run")


def test_colour_images_get_a_k_means_palette(tmp_path: Path) -> None:
    path = tmp_path / "colour.npz"
    rng = np.random.default_rng(0)
    colours = np.array([[255, 0, 0], [0, 0, 255], [0, 255, 0]], np.uint8)
    images = colours[rng.integers(0, 3, (60, 6, 6))]  # (60, 6, 6, 3): three pure colours
    np.savez(path, images=images, labels=np.arange(60) % 3)
    prepared = prepare(recipe_from_dict(generator_recipe(tmp_path, source=str(path), levels=3)))
    config = prepared.model.config
    assert (config.height, config.width, config.channels, config.n_image_tokens) == (6, 6, 3, 3)
    palette = np.asarray(config.palette).reshape(3, 3)
    assert sorted(map(tuple, np.rint(palette).astype(int))) == sorted(map(tuple, colours.astype(int)))
    tokens = prepared.task.train_batch(0, 0, 1)["tokens"]
    assert tokens.shape == (16, 36) and int(tokens.max()) < 3


def test_one_class_of_images_is_refused(tmp_path: Path) -> None:
    """A one-class folder trained a one-class ViT that scored accuracy 1.0."""
    from PIL import Image

    folder = tmp_path / "shapes" / "circle"
    folder.mkdir(parents=True)
    for i in range(12):
        Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(folder / f"{i}.png")
    with pytest.raises(ConfigError, match=r"holds images of one class \('circle'\): an image classifier "
                                          "needs at least 2"):
        prepare(recipe_from_dict(vit_recipe(tmp_path / "run", source=str(tmp_path / "shapes"))))
    path = tmp_path / "zeros.npz"  # two names, but every image of the first
    np.savez(path, images=np.zeros((20, 8, 8), np.uint8), labels=np.zeros(20, np.int64),
             label_names=np.array(["a", "b"]))
    with pytest.raises(ConfigError, match=r"holds images of one class \('a'\)"):
        prepare(recipe_from_dict(vit_recipe(tmp_path / "run", source=str(path))))
    assert not (tmp_path / "run").exists()
