"""Adversarial training of text classifiers in embedding space: the perturbation is the closed-form
L-inf optimum on a linear classifier, stays on content tokens and inside the ball, raises the
loss (epsilon -> 0 gives the clean loss), leaves .grad alone; a run with it trains, opens, and
resumes to the same weights as an uninterrupted run; `pgd` is refused for text in one line."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from tformer.attacks.embedding import (adversarial_loss, classify_loss, content_positions, find_token_embedding,
                                       pgd_embeddings)
from tformer.config import ConfigError
from tformer.models import build_model
from tformer.runs import open_run
from tformer.training.recipe import recipe_from_dict, train_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

CLS, SEP, PAD = 2, 3, 0


class Linear(nn.Module):
    """"pos" logit = sum over real tokens of embedding column 0 (a linear function of the embeddings)."""

    labels = ("neg", "pos")
    max_tokens = 16

    def __init__(self) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(20, 3)

    def classify(self, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        logit = (self.tok_emb(inputs)[..., 0] * mask).sum(1)
        return torch.stack([torch.zeros_like(logit), logit], 1)


def batch() -> tuple[Tensor, Tensor, Tensor]:
    """Two framed sentences, the second padded by 2: ids, mask (2, 7), labels."""
    ids = torch.tensor([[CLS, 5, 6, 7, 8, 9, SEP], [CLS, 10, 11, 12, SEP, PAD, PAD]])
    mask = (ids != PAD).long()
    return ids, mask, torch.tensor([1, 0])


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    return build_model("bert-tiny", vocab_size=20, context_length=16, head="sequence", labels=("neg", "pos"),
                       init_std=0.2, dropout=0.0, attn_dropout=0.0).eval()


def test_content_positions_skip_the_frame_and_padding():
    ids, mask, _ = batch()
    assert content_positions(mask).tolist() == [[False, True, True, True, True, True, False],
                                                 [False, True, True, True, False, False, False]]


def test_linear_classifier_gets_the_closed_form_worst_case():
    # the loss of label 1 falls with column 0, of label 0 rises: the L-inf optimum is -eps (row 0),
    # +eps (row 1) on column 0 of every content token; columns the loss ignores keep their start
    model, (ids, mask, labels), eps = Linear(), batch(), 0.1
    delta = pgd_embeddings(model, ids, mask, labels, eps, steps=2, generator=torch.Generator().manual_seed(0))
    keep = content_positions(mask)
    assert torch.allclose(delta[0, keep[0], 0], torch.full((5,), -eps))
    assert torch.allclose(delta[1, keep[1], 0], torch.full((3,), eps))
    assert (delta[~keep] == 0).all() and delta.abs().max() <= eps + 1e-7


def test_adversarial_loss_is_above_the_clean_loss_and_tiny_epsilon_is_clean():
    model, (ids, mask, labels) = tiny_bert(), batch()
    for p in model.parameters():
        p.grad = None
    clean = float(classify_loss(model, ids, mask, labels).detach())
    layer = find_token_embedding(model, ids, mask)
    assert layer is model.tok_emb
    for eps in (0.05, 0.5):
        delta = pgd_embeddings(model, ids, mask, labels, eps, steps=3, generator=torch.Generator().manual_seed(1))
        assert float(adversarial_loss(model, ids, mask, labels, delta, layer).detach()) > clean
        assert delta.abs().max() <= eps + 1e-7 and (delta[~content_positions(mask)] == 0).all()
    # epsilon -> 0: the change is within the first-order bound eps * |dL/de|_1 (over content tokens)
    zero = torch.zeros(*ids.shape, 128, requires_grad=True)
    (grad,) = torch.autograd.grad(adversarial_loss(model, ids, mask, labels, zero, layer), zero)
    eps = 1e-6
    tiny = pgd_embeddings(model, ids, mask, labels, eps, steps=2)
    bound = eps * float(grad[content_positions(mask)].abs().sum())
    assert abs(float(adversarial_loss(model, ids, mask, labels, tiny).detach()) - clean) <= 1.1 * bound + 1e-6
    assert all(p.grad is None for p in model.parameters())  # the attack never touches .grad


@pytest.mark.parametrize("kwargs,message", [
    (dict(epsilon=0.0), "epsilon must be a finite number > 0"),
    (dict(epsilon=float("nan")), "epsilon must be a finite number > 0"),
    (dict(epsilon=0.1, steps=0), "steps must be an integer >= 1"),
])
def test_bad_attack_settings_are_one_line(kwargs, message):
    model, (ids, mask, labels) = tiny_bert(), batch()
    with pytest.raises(ValueError, match=message):
        pgd_embeddings(model, ids, mask, labels, **kwargs)
    with pytest.raises(ValueError, match="not a text classifier"):
        pgd_embeddings(nn.Linear(3, 3), ids, mask, labels, 0.1)


# -- training ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> Path:
    rng, rows = random.Random(0), []
    filler = "the film food was really quite and service a".split()
    for i in range(48):
        label, word = ("pos", rng.choice(["good", "great", "nice"])) if i % 2 else ("neg", rng.choice(["bad", "dull"]))
        rows.append(f"{label}\t{' '.join(rng.choice(filler) for _ in range(rng.randint(2, 5)))} {word}")
    path = tmp_path_factory.mktemp("adv") / "reviews.tsv"
    path.write_text("label\ttext\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def spec(run_dir: Path, source: Path, steps: int, adversarial: str = "embedding") -> dict:
    return {"task": "classification", "run_dir": str(run_dir),
            "model": {"preset": "bert-tiny", "n_layers": 1, "d_model": 16, "n_heads": 2, "context_length": 16},
            "tokenizer": {"kind": "bpe", "vocab_size": 280, "special_tokens": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]},
            "data": {"source": str(source), "val_fraction": 0.25},
            "training": {"max_steps": steps, "batch_size": 4, "eval_every": 2, "warmup_steps": 1, "device": "cpu",
                         "schedule": "constant", "adversarial": adversarial, "adversarial_epsilon": 0.05,
                         "adversarial_steps": 2, "adversarial_weight": 0.5, "log_every": 1}}


def test_embedding_adversarial_run_trains_opens_and_resumes_exactly(reviews, tmp_path):
    straight = train_recipe(recipe_from_dict(spec(tmp_path / "straight", reviews, 3)))
    assert straight.step == 3 and straight.best_val_loss is not None
    train_recipe(recipe_from_dict(spec(tmp_path / "resumed", reviews, 2)))
    halfway = open_run(tmp_path / "resumed", "last").model.head.classifier.weight.detach().clone()
    train_recipe(recipe_from_dict(spec(tmp_path / "resumed", reviews, 3)))  # resumes from step 2
    a, b = open_run(tmp_path / "straight", "last"), open_run(tmp_path / "resumed", "last")
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name
    train_recipe(recipe_from_dict(spec(tmp_path / "plain", reviews, 2, adversarial="none")))
    assert not torch.equal(open_run(tmp_path / "plain", "last").model.head.classifier.weight, halfway)


def test_pgd_is_refused_for_text_in_one_line(reviews, tmp_path):
    with pytest.raises(ConfigError, match="training.adversarial: pgd perturbs pixels") as error:
        train_recipe(recipe_from_dict(spec(tmp_path / "pgd", reviews, 2, adversarial="pgd")))
    assert "\n" not in str(error.value) and not (tmp_path / "pgd").exists()
