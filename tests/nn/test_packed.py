"""bf16 linears with packed weights: the same outputs as F.linear, the same greedy tokens, gradients
untouched, and the model as it was afterwards."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tformer.inference import beam_search, generate
from tformer.models.gpt import GPT, GPTConfig
import tformer.nn.packed as packed
from tformer.nn.packed import kernel_available, packed_linears

pytestmark = pytest.mark.skipif(not kernel_available(), reason="this PyTorch has no oneDNN packed linear")


@pytest.mark.parametrize("shape", [(1, 48), (3, 5, 48), (64, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_f_linear(shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(48, 40, bias=bias).bfloat16()
    x = torch.randn(*shape).bfloat16()
    reference = F.linear(x, linear.weight, linear.bias)
    with torch.inference_mode(), packed_linears(linear) as count:
        out = linear(x)
    assert count == 1 and out.shape == reference.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference.float(), rtol=1e-2, atol=1e-2)


def test_gradients_and_changed_weights_take_the_plain_path():
    torch.manual_seed(1)
    linear = nn.Linear(16, 8).bfloat16()
    x = torch.randn(4, 16).bfloat16()
    with packed_linears(linear):
        linear(x).float().sum().backward()  # needs grad: F.linear, differentiable
        assert linear.weight.grad is not None
        with torch.no_grad():
            first = linear(x)
            linear.weight.mul_(2)  # the weight changes: packed again, not stale
            second = linear(x)
    torch.testing.assert_close(second.float() - linear.bias.float(),
                               2 * (first.float() - linear.bias.float()), rtol=2e-2, atol=2e-2)
    assert "forward" not in vars(linear)  # the class's forward again


def test_fp32_models_are_left_alone():
    linear = nn.Linear(8, 8)
    with packed_linears(linear) as count:
        assert count == 0


def test_greedy_generation_and_beams_are_the_same_tokens():
    torch.manual_seed(2)
    model = GPT(GPTConfig(vocab_size=97, context_length=64, n_layers=2, n_heads=2, d_model=64)).eval().bfloat16()
    prompt = torch.randint(0, 97, (2, 7))
    # the reference: the same bf16 model with packing impossible (F.linear everywhere)
    fast = generate(model, prompt, 12)
    original = packed.kernel_available
    packed.kernel_available = lambda: False
    try:
        slow = generate(model, prompt, 12)
        slow_beams = beam_search(model, prompt[:1], 3, 8, n_best=3)
    finally:
        packed.kernel_available = original
    assert torch.equal(fast, slow)
    fast_beams = beam_search(model, prompt[:1], 3, 8, n_best=3)
    assert [h.tokens for h in fast_beams[0]] == [h.tokens for h in slow_beams[0]]
