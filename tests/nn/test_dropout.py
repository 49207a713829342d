"""tformer's fast CPU dropout against PyTorch's: same law (keep rate, scale, expectation), masks
independent of each other, repeatable under a seed, and a backward that uses the same mask."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tformer.nn.dropout import LANES, Dropout, dropout, keep_mask


@pytest.mark.parametrize("p", [0.05, 0.1, 0.2, 0.5, 0.9])
def test_keep_rate_and_scale_follow_p(p):
    torch.manual_seed(0)
    x = torch.ones(400_000)
    out = dropout(x, p)
    kept = out != 0
    n = x.numel()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sd  # PyTorch's keep rate, 5 sigma
    drop_below = round(p * LANES)
    assert torch.allclose(out[kept], torch.tensor(LANES / (LANES - drop_below)))
    assert abs(out.mean().item() - 1.0) < 5 * sd / (1 - p)  # the expectation is the input


def test_matches_pytorch_dropout_in_distribution():
    torch.manual_seed(1)
    x = torch.randn(200, 1000)
    ours = torch.stack([dropout(x, 0.3) for _ in range(20)])
    theirs = torch.stack([F.dropout(x, 0.3) for _ in range(20)])
    assert abs((ours == 0).float().mean() - (theirs == 0).float().mean()) < 0.003
    assert ((ours.mean(0) - x) ** 2).mean() < 1.2 * 0.3 / 0.7 / 20 * (x ** 2).mean()  # variance x^2 p/(1-p)
    assert torch.allclose(ours.mean(0).mean(), theirs.mean(0).mean(), atol=0.01)


def test_masks_are_independent_between_elements_and_calls():
    torch.manual_seed(2)
    a, _ = keep_mask(torch.Size([1_000_003]), 0.5)  # an odd size: the last word is partly used
    b, _ = keep_mask(torch.Size([1_000_003]), 0.5)
    fa, fb = a.float() - 0.5, b.float() - 0.5
    # neighbours (same 64-bit word or the next), lanes 4 apart, and two calls: no correlation
    for u, v in [(fa[:-1], fa[1:]), (fa[:-4], fa[4:]), (fa, fb)]:
        corr = (u * v).mean() / 0.25
        assert abs(corr.item()) < 0.01
    assert not torch.equal(a, b)


def test_repeatable_under_a_seed_and_with_a_generator():
    x = torch.randn(64, 33)
    torch.manual_seed(3)
    first = dropout(x, 0.25)
    torch.manual_seed(3)
    assert torch.equal(first, dropout(x, 0.25))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(dropout(x, 0.25, generator=g1), dropout(x, 0.25, generator=g2))


def test_backward_uses_the_forward_mask():
    torch.manual_seed(4)
    x = torch.randn(3, 50, 7, dtype=torch.float64, requires_grad=True)
    out = dropout(x, 0.4)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    kept = (out != 0).double()
    scale = LANES / (LANES - round(0.4 * LANES))
    assert torch.allclose(x.grad, weights * kept * scale)
    # and the whole thing is linear in x for a fixed mask: gradcheck with the mask frozen
    torch.manual_seed(5)
    keep, s = keep_mask(x.shape, 0.4)
    assert torch.autograd.gradcheck(lambda t: t * keep * s, (x.detach().requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_keeps_dtype_and_shape(dtype):
    x = torch.randn(5, 6, 7).to(dtype)
    out = dropout(x, 0.5)
    assert out.dtype == dtype and out.shape == x.shape


def test_edges_and_module():
    x = torch.randn(10, 10)
    assert dropout(x, 0.0) is x
    assert dropout(x, 0.7, training=False) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout(x, 1.5)
    module = Dropout(0.5)
    assert isinstance(module, nn.Dropout) and module.state_dict() == {}
    module.eval()
    assert torch.equal(module(x), x)
    module.train()
    assert (module(x) == 0).any()
    assert Dropout(0.5, inplace=True)(x.clone()).shape == x.shape
