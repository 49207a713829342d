"""FGSM and PGD on pixels against independent references: a linear classifier whose optimal
perturbations are known in closed form, analytic cross-entropy gradients, and torchattacks (a test
oracle only, when installed). Plus the invariants: the epsilon-ball and [0, 1] hold, restarts never
lower success, epsilon 0 changes nothing, modes and parameter gradients are left alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import Tensor, nn

from tformer.attacks.image import fgsm, pgd
from tformer.models import build_model
from tformer.models.protocols import ImageClassifier, can

SHAPE = (4, 4, 1)  # (height, width, channels)


class LinearImageClassifier(nn.Module):
    """logits = W x + b on flattened [0, 1] pixels; an ImageClassifier by its methods."""

    def __init__(self, weight: Tensor, bias: Tensor, shape: tuple[int, int, int] = SHAPE) -> None:
        super().__init__()
        self.weight, self.bias, self.shape = nn.Parameter(weight), nn.Parameter(bias), shape

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(str(i) for i in range(len(self.bias)))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.shape

    def classify(self, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        return inputs.flatten(1) @ self.weight.T + self.bias


def linear(n_classes: int = 2, seed: int = 0) -> LinearImageClassifier:
    g = torch.Generator().manual_seed(seed)
    pixels = SHAPE[0] * SHAPE[1] * SHAPE[2]
    return LinearImageClassifier(torch.randn(n_classes, pixels, generator=g), torch.randn(n_classes, generator=g))


def images(n: int, seed: int = 1, low: float = 0.0, high: float = 1.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, SHAPE[2], SHAPE[0], SHAPE[1], generator=g)


def labels_of(n: int, n_classes: int, seed: int = 2) -> Tensor:
    return torch.randint(0, n_classes, (n,), generator=torch.Generator().manual_seed(seed))


def towards_other(model: LinearImageClassifier, y: Tensor) -> Tensor:
    """(N, C, H, W) w_other - w_y for a two-class linear model: the direction that lowers the margin."""
    w = model.weight.detach()
    return (w[1 - y] - w[y]).view(-1, SHAPE[2], SHAPE[0], SHAPE[1])


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return build_model("vit-digits", d_model=32, n_layers=2, n_heads=2, d_ff=64)


def digit_batch(n: int = 6, seed: int = 3) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    index = torch.randperm(len(digits.images), generator=torch.Generator().manual_seed(seed))[:n]
    x = torch.tensor(digits.images[index.numpy()] / 16.0, dtype=torch.float32).unsqueeze(1)
    return x, torch.tensor(digits.target[index.numpy()])


def test_the_reference_model_is_an_image_classifier() -> None:
    assert can(linear(), ImageClassifier) and can(tiny_vit(), ImageClassifier)


def test_linf_fgsm_and_pgd_reach_the_closed_form_optimum_of_a_linear_model() -> None:
    model, x = linear(), images(32)
    y = labels_of(32, 2)
    eps = 0.2
    optimum = (x + eps * towards_other(model, y).sign()).clamp(0, 1)  # the box-clipped corner of the ball
    assert torch.allclose(fgsm(model, x, y, eps).images, optimum, atol=1e-6)
    for random_init in (False, True):
        result = pgd(model, x, y, eps, steps=10, random_init=random_init, seed=5, keep_best=False)
        assert torch.allclose(result.images, optimum, atol=1e-6)
        # keeping the best candidate: the optimum where the model was right, the clean image where it was wrong
        kept = pgd(model, x, y, eps, steps=10, random_init=random_init, seed=5)
        right = kept.clean_predictions == y
        assert 0 < right.sum() < len(y)
        assert torch.allclose(kept.images[right], optimum[right], atol=1e-6)
        assert torch.equal(kept.images[~right], x[~right]) and kept.success[~right].all()


def test_l2_attacks_move_along_the_weight_difference() -> None:
    model, x = linear(), images(16, low=0.3, high=0.7)  # the box never binds at this epsilon
    y = labels_of(16, 2)
    eps = 0.25
    direction = towards_other(model, y)
    optimum = x + eps * direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(fgsm(model, x, y, eps, norm="l2").images, optimum, atol=1e-6)
    assert torch.allclose(pgd(model, x, y, eps, steps=10, norm="l2", random_init=False, keep_best=False).images,
                          optimum, atol=1e-6)
    # from a random start PGD comes close to the optimal drop in margin
    margin = lambda z: ((z - x) * direction).flatten(1).sum(1)  # noqa: E731
    found = pgd(model, x, y, eps, steps=50, step_size=0.05, norm="l2", seed=1, keep_best=False).images
    assert (margin(found) >= 0.99 * margin(optimum)).all()


def test_multiclass_fgsm_follows_the_analytic_cross_entropy_gradient() -> None:
    model, x = linear(n_classes=5), images(20)
    y, t = labels_of(20, 5), labels_of(20, 5, seed=9)
    w = model.weight.detach()
    p = torch.softmax(model.classify(x).detach(), -1)
    eye = torch.eye(5)
    grad_untargeted = ((p - eye[y]) @ w).view_as(x)  # d CE(y) / dx = W^T (p - onehot(y))
    grad_towards_target = ((eye[t] - p) @ w).view_as(x)  # - d CE(t) / dx
    eps = 0.1
    assert torch.allclose(fgsm(model, x, y, eps).images, (x + eps * grad_untargeted.sign()).clamp(0, 1), atol=1e-6)
    targeted = fgsm(model, x, y, eps, targets=t)
    assert torch.allclose(targeted.images, (x + eps * grad_towards_target.sign()).clamp(0, 1), atol=1e-6)
    assert torch.equal(targeted.success, targeted.adversarial_predictions == t)


@settings(max_examples=15, deadline=None)
@given(eps=st.floats(0.0, 0.6), steps=st.integers(1, 6), norm=st.sampled_from(["linf", "l2"]),
       step_scale=st.floats(0.1, 3.0), seed=st.integers(0, 1000))
def test_the_ball_and_the_pixel_range_always_hold(eps: float, steps: int, norm: str, step_scale: float,
                                                  seed: int) -> None:
    model, x = linear(n_classes=3, seed=seed), images(8, seed=seed)
    result = pgd(model, x, labels_of(8, 3, seed=seed), eps, steps=steps, step_size=step_scale * max(eps, 1e-3),
                 norm=norm, seed=seed, restarts=2)
    delta = (result.images - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert result.images.min() >= 0 and result.images.max() <= 1


def test_success_matches_the_predictions_and_restarts_never_lower_it() -> None:
    model, x = linear(n_classes=5), images(64)
    y = model.classify(x).argmax(-1)  # every image right before the attack
    weak = dict(steps=2, step_size=0.025, seed=4)  # a weak attack, so that restarts have work to do
    one, more = pgd(model, x, y, 0.1, **weak), pgd(model, x, y, 0.1, restarts=4, **weak)
    assert torch.equal(one.success, one.adversarial_predictions != y)
    assert torch.equal(model.classify(one.images).argmax(-1), one.adversarial_predictions)
    assert torch.equal(one.clean_predictions, y) and torch.equal(more.clean_predictions, y)
    assert 0 < one.success.sum() < len(y)
    assert (more.success | ~one.success).all()  # every image fooled once is fooled with more restarts
    assert more.success.sum() > one.success.sum()
    last_only = pgd(model, x, y, 0.1, keep_best=False, **weak)  # the same start; only the last iterate counts
    assert (one.success | ~last_only.success).all()
    assert one.robust_accuracy == pytest.approx(1 - one.success.float().mean().item())


def test_pass_counts_and_batching() -> None:
    model, x = linear(n_classes=3), images(10)
    y = labels_of(10, 3)
    result = pgd(model, x, y, 0.1, steps=5, random_init=False, keep_best=False)
    assert (result.forward_passes, result.backward_passes) == (10 + 10 * 6, 10 * 5)  # clean + steps + final
    kept = pgd(model, x, y, 0.1, steps=5, random_init=False)
    right = int((kept.clean_predictions == y).sum())  # only the images the model gets right are attacked
    assert 0 < right < 10 and (kept.forward_passes, kept.backward_passes) == (10 + right * 6, right * 5)
    batched = pgd(model, x, y, 0.1, steps=5, random_init=False, batch_size=3, keep_best=False)
    assert torch.equal(result.images, batched.images) and torch.equal(result.success, batched.success)
    assert batched.forward_passes == result.forward_passes
    assert torch.equal(pgd(model, x, y, 0.1, seed=7).images, pgd(model, x, y, 0.1, seed=7).images)  # seeded
    empty = pgd(model, x[:0], y[:0], 0.1)
    assert empty.images.shape == (0, 1, 4, 4) and empty.forward_passes == 0 and len(empty.success) == 0


def test_epsilon_zero_changes_nothing_on_a_vit_and_leaves_modes_and_grads_alone() -> None:
    model = tiny_vit().train()
    x, y = digit_batch(8)
    result = pgd(model, x, y, 0.0, steps=3)
    assert torch.equal(result.images, x)
    assert torch.equal(result.adversarial_predictions, result.clean_predictions)
    assert torch.equal(result.success, result.clean_predictions != y)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    pgd(model, x, y, 0.1, steps=2)
    assert not any(m.training for m in model.modules())


class Oracle(nn.Module):
    """torchattacks calls model(images): hand it the classifier's [0, 1] entry point."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model.classify(images)


def test_matches_torchattacks() -> None:
    torchattacks = pytest.importorskip("torchattacks")
    model = tiny_vit().eval()
    x, y = digit_batch(8)
    oracle = Oracle(model)
    expected = torchattacks.FGSM(oracle, eps=0.05)(x, y)
    assert torch.allclose(fgsm(model, x, y, 0.05).images, expected, atol=1e-6)
    expected = torchattacks.PGD(oracle, eps=0.05, alpha=0.01, steps=5, random_start=False)(x, y)
    assert torch.allclose(pgd(model, x, y, 0.05, steps=5, step_size=0.01, random_init=False, keep_best=False).images,
                          expected, atol=1e-6)
    l2 = torchattacks.PGDL2(oracle, eps=0.5, alpha=0.1, steps=5, random_start=False)(x, y)
    assert torch.allclose(pgd(model, x, y, 0.5, steps=5, step_size=0.1, norm="l2", random_init=False,
                              keep_best=False).images, l2, atol=1e-5)


BAD = {
    "negative epsilon": (dict(epsilon=-0.1), "epsilon must be"),
    "nan epsilon": (dict(epsilon=float("nan")), "epsilon must be"),
    "infinite epsilon": (dict(epsilon=float("inf")), "epsilon must be"),
    "zero steps": (dict(steps=0), "steps must be"),
    "zero step size": (dict(step_size=0.0), "step_size must be"),
    "zero restarts": (dict(restarts=0), "restarts must be"),
    "unknown norm": (dict(norm="l1"), "norm must be"),
    "wrong channels": (dict(images=torch.rand(2, 3, 4, 4)), "this model takes (N, 1, 4, 4)"),
    "wrong size": (dict(images=torch.rand(2, 1, 5, 5)), "this model takes"),
    "not batched": (dict(images=torch.rand(1, 4, 4)), "this model takes"),
    "uint8 images": (dict(images=torch.zeros(2, 1, 4, 4, dtype=torch.uint8)), "float tensor"),
    "values above 1": (dict(images=torch.full((2, 1, 4, 4), 2.0)), "in [0, 1]"),
    "nan pixels": (dict(images=torch.full((2, 1, 4, 4), float("nan"))), "in [0, 1]"),
    "labels out of range": (dict(labels=torch.tensor([0, 7])), "class indices"),
    "labels of another length": (dict(labels=torch.tensor([0])), "labels must be"),
    "not an image classifier": (dict(model=nn.Linear(2, 2)), "not an image classifier"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_one_line(case: str) -> None:
    change, message = BAD[case]
    args = {"model": linear(), "images": images(2), "labels": torch.tensor([0, 1]), "epsilon": 0.1, **change}
    options = {k: args.pop(k) for k in ("steps", "step_size", "restarts", "norm") if k in args}
    with pytest.raises(ValueError, match=None) as error:
        pgd(args["model"], args["images"], args["labels"], args["epsilon"], **options)
    assert message in str(error.value) and "\n" not in str(error.value)
