"""Block injection: any attention with its own inputs fits a Block (relative attention equals
the residual wiring written out), and the `qk` probe of every attention module sees exactly the
queries and keys its scores are made of."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tformer.nn import MLP, AttentionInputs, Block, KVCache, MultiHeadAttention, RotaryEmbedding, causal
from tformer.nn.relative import RelativeInputs, RelativeMultiHeadAttention, relative_sinusoids

D, HEADS = 16, 2


@pytest.mark.parametrize("pre_norm", [True, False])
def test_block_with_relative_attention_is_the_residual_wiring(pre_norm: bool) -> None:
    torch.manual_seed(0)
    attn, ffn = RelativeMultiHeadAttention(D, HEADS), MLP(D, 32, nn.ReLU())
    block = Block(attn, ffn, lambda: nn.LayerNorm(D), pre_norm=pre_norm).eval()
    x, memory = torch.randn(2, 5, D), torch.randn(2, 3, D)
    inputs = RelativeInputs(relative_sinusoids(8, D), causal(), memory)
    if pre_norm:
        h = x + attn(block.attn_norm(x), inputs)
        expected = h + ffn(block.ffn_norm(h))
    else:
        h = block.attn_norm(x + attn(x, inputs))
        expected = block.ffn_norm(h + ffn(h))
    torch.testing.assert_close(block(x, inputs), expected, atol=0, rtol=0)


def record_backend(attn: nn.Module, seen: list) -> None:
    """Wrap the attention backend so that it records the q and k it is called with."""
    backend = attn.attend

    def recording(q, k, v, mask=None, **kwargs):
        seen.append((q, k))
        return backend(q, k, v, mask, **kwargs)

    attn.attend = recording


def record_probe(attn: nn.Module, seen: list) -> None:
    attn.qk.register_forward_hook(lambda module, inputs, output: seen.append(output))


def test_probe_sees_what_the_backend_gets_with_rope_and_a_cache() -> None:
    torch.manual_seed(0)
    attn = MultiHeadAttention(D, HEADS).eval()
    probed, received = [], []
    record_probe(attn, probed)
    record_backend(attn, received)
    rope, cache = RotaryEmbedding(D // HEADS, 16), KVCache(1, 2, HEADS, D // HEADS, 8)
    x = torch.randn(2, 3, D)
    positions = cache.append(torch.ones(2, 3, dtype=torch.bool))
    attn(x, AttentionInputs(causal(), rope=rope(positions), cache=cache.layers[0]))
    (q, k), (q_backend, k_backend) = probed[0], received[0]
    assert q.shape == (2, HEADS, 3, D // HEADS) and k.shape == (2, HEADS, 8, D // HEADS)  # cache slots
    assert q is q_backend and k is k_backend


def test_probe_of_grouped_query_attention_sees_the_kv_heads() -> None:
    attn = MultiHeadAttention(D, 4, n_kv_heads=2).eval()
    probed, received = [], []
    record_probe(attn, probed)
    record_backend(attn, received)
    attn(torch.randn(1, 5, D), AttentionInputs(causal()))
    (q, k), (_, k_backend) = probed[0], received[0]
    assert q.shape == (1, 4, 5, D // 4) and k.shape == (1, 2, 5, D // 4)
    torch.testing.assert_close(k.repeat_interleave(2, dim=1), k_backend, atol=0, rtol=0)


def test_probe_of_cross_attention_sees_the_context_keys() -> None:
    attn = MultiHeadAttention(D, HEADS, d_context=D).eval()
    probed, received = [], []
    record_probe(attn, probed)
    record_backend(attn, received)
    attn(torch.randn(2, 4, D), AttentionInputs(context=torch.randn(2, 7, D)))
    (q, k), (q_backend, k_backend) = probed[0], received[0]
    assert q.shape == (2, HEADS, 4, D // HEADS) and k.shape == (2, HEADS, 7, D // HEADS)
    assert q is q_backend and k is k_backend


def test_probe_of_relative_attention_sees_queries_and_memory_keys() -> None:
    attn = RelativeMultiHeadAttention(D, HEADS, backend="reference").eval()
    probed = []
    record_probe(attn, probed)
    x, memory = torch.randn(2, 5, D), torch.randn(2, 3, D)
    attn(x, RelativeInputs(relative_sinusoids(8, D), causal(), memory))
    q, k = probed[0]
    assert q.shape == (2, HEADS, 5, D // HEADS) and k.shape == (2, HEADS, 8, D // HEADS)
    keys = attn.kv_proj(torch.cat([memory, x], 1)).chunk(2, -1)[0]  # (B, M + T, d)
    torch.testing.assert_close(k, keys.view(2, 8, HEADS, -1).transpose(1, 2), atol=0, rtol=0)
