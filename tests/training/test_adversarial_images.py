"""Adversarial training of an image classifier (`training.adversarial: pgd`): the training loss is
the loss on PGD images made against the current weights (mixed with the clean loss by
`adversarial_weight`), validation stays clean, a run trains, resumes exactly and opens; `embedding`
is refused in one line."""

from __future__ import annotations

from pathlib import Path

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


def test_an_adversarial_run_trains_resumes_exactly_and_opens(tmp_path: Path) -> None:
    straight = train_recipe(recipe_from_dict(vit_recipe(tmp_path / "straight")))
    assert straight.step == 4 and straight.best_val_loss is not None and torch.isfinite(torch.tensor(straight.best_val_loss))
    train_recipe(recipe_from_dict(vit_recipe(tmp_path / "resumed", max_steps=2)))
    train_recipe(recipe_from_dict(vit_recipe(tmp_path / "resumed")))  # continues from step 2
    a, b = open_run(tmp_path / "straight" / "checkpoints" / "last"), open_run(tmp_path / "resumed" / "checkpoints" / "last")
    assert a.capabilities == ["image_classifier"]
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6), name
    logits = a.model.eval().classify(torch.rand(2, 1, 8, 8))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_embedding_perturbations_are_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        prepare(recipe_from_dict(vit_recipe(tmp_path, adversarial="embedding")))
    assert "for text classifiers" in str(error.value) and "\n" not in str(error.value)
