"""Adversarial training of an image classifier (`training.adversarial: pgd`): the training loss is
the loss on PGD images made against the current weights (mixed with the clean loss by
`adversarial_weight`), validation stays clean, a run trains, resumes exactly and opens; `embedding`
is refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tformer.attacks.image import pgd_images
from tformer.config import ConfigError
from tformer.models.vit import normalise
from tformer.runs import open_run
from tformer.training.recipe import prepare, recipe_from_dict, train_recipe

ADVERSARY = {"adversarial": "pgd", "adversarial_epsilon": 0.1, "adversarial_steps": 2}


def vit_recipe(run_dir: Path, max_steps: int = 4, **training) -> dict:
    return {"task": "image_classification", "model": {"preset": "vit-digits", "d_model": 32, "n_layers": 2},
            "data": {"source": "digits", "shift": 1, "label_smoothing": 0.1},
            "training": {"max_steps": max_steps, "batch_size": 16, "lr": 3e-3, "warmup_steps": 1, "eval_every": 2,
                         "log_every": 2, "device": "cpu", **ADVERSARY, **training},
            "run_dir": str(run_dir)}


def reference_loss(model: torch.nn.Module, batch, epsilon: float, steps: int, weight: float) -> torch.Tensor:
    """The loss the task should compute, assembled here from the attack and torch alone."""
    pixels = (batch["images"] * 0.5 + 0.5).clamp(0, 1)
    model.eval()
    adversarial = pgd_images(model, pixels, batch["labels"], epsilon, steps=steps, step_size=2.5 * epsilon / steps,
                             generator=torch.Generator().manual_seed(batch.context))
    model.train()
    loss = lambda images: F.cross_entropy(model(images), batch["labels"], label_smoothing=0.1)  # noqa: E731
    return weight * loss(normalise(adversarial)) + (1 - weight) * loss(batch["images"])


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_the_training_loss_is_the_loss_on_pgd_images(tmp_path: Path, weight: float) -> None:
    prepared = prepare(recipe_from_dict(vit_recipe(tmp_path, adversarial_weight=weight)))
    model, task = prepared.model.train(), prepared.task
    batch = task.train_batch(0, 0, 1)
    clean = F.cross_entropy(model(batch["images"]), batch["labels"], label_smoothing=0.1)
    loss = task.loss(model, batch)
    assert torch.isfinite(loss) and loss > clean + 1e-3  # the adversarial images are harder
    assert torch.allclose(loss, reference_loss(model, batch, 0.1, 2, weight), atol=1e-6)
    assert all(m.training for m in model.modules())  # the attack ran in eval mode and gave train mode back
    assert all(p.grad is None for p in model.parameters())  # the attack touched no parameter's .grad
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()  # validation: clean images, no label smoothing
    assert torch.allclose(task.loss(model, batch), F.cross_entropy(model(batch["images"]), batch["labels"]))


def test_without_an_adversary_the_loss_is_clean(tmp_path: Path) -> None:
    prepared = prepare(recipe_from_dict(vit_recipe(tmp_path, adversarial="none")))
    model, batch = prepared.model.train(), prepared.task.train_batch(0, 0, 1)
    expected = F.cross_entropy(model(batch["images"]), batch["labels"], label_smoothing=0.1)
    assert torch.allclose(prepared.task.loss(model, batch), expected)


def test_an_adversarial_run_trains_and_opens(tmp_path: Path) -> None:
    result = train_recipe(recipe_from_dict(vit_recipe(tmp_path / "run", max_steps=2)))
    assert result.step == 2 and result.best_val_loss is not None and np.isfinite(result.best_val_loss)
    run = open_run(tmp_path / "run")
    assert run.capabilities == ["image_classifier"]
    logits = run.model.classify(torch.rand(2, 1, 8, 8))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_the_attack_is_a_function_of_the_step_so_a_resume_repeats_it(tmp_path: Path) -> None:
    """Nothing extra to save: a fresh task (as after a resume) makes the same adversarial images."""
    first, again = (prepare(recipe_from_dict(vit_recipe(tmp_path))) for _ in range(2))
    again.model.load_state_dict(first.model.state_dict())
    batches = [p.task.train_batch(3, 0, 1) for p in (first, again)]
    assert batches[0].context == batches[1].context != first.task.train_batch(4, 0, 1).context
    halves = {first.task.train_batch(3, shard, 2).context for shard in (0, 1)}
    assert len(halves) == 2  # each shard its own random start
    losses = [p.task.loss(p.model.train(), b) for p, b in zip((first, again), batches)]
    assert torch.equal(losses[0], losses[1])


def test_embedding_perturbations_are_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        prepare(recipe_from_dict(vit_recipe(tmp_path, adversarial="embedding")))
    assert "for text classifiers" in str(error.value) and "\n" not in str(error.value)
