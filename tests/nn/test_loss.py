"""nn.loss: the chunked cross-entropy through an LM head equals the plain one, value and gradients,
for any head module, with ignored targets, with and without gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tformer.models import build_model
from tformer.nn.loss import chunked_cross_entropy


def plain(hidden, head, targets):
    logits = head(hidden).float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


@pytest.mark.parametrize("chunk_logits", [1, 7 * 50, 10**9])  # one row a chunk, uneven chunks, one chunk
@pytest.mark.parametrize("head", [nn.Linear(16, 50), nn.Linear(16, 50, bias=False),  # LinearCrossEntropy
                                  nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 50))])  # checkpoint
def test_value_and_gradients_equal_the_plain_loss(chunk_logits, head):
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 11))
    targets[0, :4] = -100  # ignored positions count in neither sum nor mean
    want = plain(hidden, head, targets)
    want_grads = torch.autograd.grad(want, [hidden, *head.parameters()])
    got = chunked_cross_entropy(hidden, head, targets, chunk_logits=chunk_logits)
    got_grads = torch.autograd.grad(got, [hidden, *head.parameters()])
    assert torch.allclose(got, want, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-6)


def test_without_gradients_it_is_the_same_number():
    torch.manual_seed(1)
    head, hidden, targets = nn.Linear(8, 20), torch.randn(2, 5, 8), torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        assert torch.allclose(chunked_cross_entropy(hidden, head, targets, chunk_logits=40),
                              plain(hidden, head, targets), atol=1e-6)


def test_gpt_forward_with_targets_is_its_loss_and_its_gradients():
    torch.manual_seed(2)
    model = build_model("gpt-nano", vocab_size=97, dropout=0.0)
    ids, targets = torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))
    want = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
    want_grads = torch.autograd.grad(want, list(model.parameters()))
    got = model(ids, targets=targets)
    got_grads = torch.autograd.grad(got, list(model.parameters()))
    assert torch.allclose(got, want, atol=1e-6)
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got_grads, want_grads))


def test_linear_cross_entropy_passes_gradcheck():
    from tformer.nn.loss import LinearCrossEntropy

    torch.manual_seed(3)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, -100, 8, 1, 1, -100])
    assert torch.autograd.gradcheck(lambda h, w, b: LinearCrossEntropy.apply(h, w, b, targets, -100, 3),
                                    (hidden, weight, bias))


def test_under_bf16_autocast_it_matches_the_plain_loss_under_the_same_autocast():
    torch.manual_seed(4)
    head = nn.Linear(32, 300)
    hidden = torch.randn(4, 9, 32, requires_grad=True)
    targets = torch.randint(0, 300, (4, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = plain(hidden, head, targets)
        got = chunked_cross_entropy(hidden, head, targets, chunk_logits=300 * 5)
    want_grads = torch.autograd.grad(want, [hidden, head.weight])
    got_grads = torch.autograd.grad(got, [hidden, head.weight])
    assert torch.allclose(got, want, atol=1e-5)
    for g, w in zip(got_grads, want_grads):  # bf16 matmuls in the backward: bf16's precision
        assert torch.allclose(g, w, atol=2e-2 * float(w.abs().max()))
