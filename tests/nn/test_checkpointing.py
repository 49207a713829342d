"""A checkpointed Block: the same output and gradients as a plain one with dropout on (the
recompute draws the same masks), its activations really recomputed in backward, and no checkpoint
outside training with gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tformer.nn import MLP, AttentionInputs, Block, MultiHeadAttention, causal

pytestmark = pytest.mark.usefixtures("one_thread")

D, HEADS = 16, 2


def block(pre_norm: bool = True) -> Block:
    torch.manual_seed(0)
    attn = MultiHeadAttention(D, HEADS, dropout=0.2)
    return Block(attn, MLP(D, 32, nn.GELU()), lambda: nn.LayerNorm(D), pre_norm=pre_norm, dropout=0.2)


def count_attention_calls(module: Block) -> list[int]:
    calls = [0]
    # the attention, not the last sub-layer: the recompute stops once the saved tensors are back
    module.attn.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def run(module: Block, x: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = module(x, AttentionInputs(causal()))
    out.square().sum().backward()
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("pre_norm", [True, False])
def test_checkpointed_block_equals_plain_block_with_dropout(pre_norm: bool) -> None:
    plain = block(pre_norm).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpointed = True
    calls = count_attention_calls(checkpointed)
    x = torch.randn(2, 6, D)
    out, x_grad, grads = run(plain, x)
    out_c, x_grad_c, grads_c = run(checkpointed, x)
    assert calls[0] == 2  # forward, then the recompute in backward
    torch.testing.assert_close(out_c, out, atol=0, rtol=0)
    torch.testing.assert_close(x_grad_c, x_grad, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert not torch.equal(out, run(plain, x, seed=2)[0])  # dropout is on: another seed, other masks


def test_no_checkpoint_in_eval_or_without_gradients() -> None:
    module = block()
    module.checkpointed = True
    calls = count_attention_calls(module)
    x = torch.randn(2, 6, D)
    run(module.eval(), x)  # eval with gradients (attribution): plain forward
    assert calls[0] == 1
    with torch.no_grad():
        module.train()(x)
    assert calls[0] == 2
