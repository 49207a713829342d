"""MultiHeadAttention against torch.nn.MultiheadAttention, grouped heads, caches."""

import pytest
import torch
from torch import nn

from tformer.nn import (AttentionInputs, CrossKV, KVCache, MultiHeadAttention, RotaryEmbedding, causal,
                        key_padding)

D_MODEL, HEADS = 32, 4


def copy_into_torch_mha(ours: MultiHeadAttention) -> nn.MultiheadAttention:
    ref = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
    with torch.no_grad():
        if ours.is_cross:
            ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.kv_proj.weight]))
            ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.kv_proj.bias]))
        else:
            ref.in_proj_weight.copy_(ours.qkv_proj.weight)
            ref.in_proj_bias.copy_(ours.qkv_proj.bias)
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    return ref


@pytest.mark.parametrize("backend", ["sdpa", "eager", "flex"])
def test_self_attention_equals_torch_multihead_attention(backend):
    torch.manual_seed(0)
    ours = MultiHeadAttention(D_MODEL, HEADS, backend=backend).eval()
    ref = copy_into_torch_mha(ours).eval()
    x = torch.randn(2, 10, D_MODEL)
    causal_float = torch.triu(torch.full((10, 10), float("-inf")), 1)
    expected, _ = ref(x, x, x, attn_mask=causal_float, need_weights=False)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, AttentionInputs(causal())), expected, atol=1e-5, rtol=0)


def test_cross_attention_with_key_padding_equals_torch():
    torch.manual_seed(1)
    ours = MultiHeadAttention(D_MODEL, HEADS, d_context=D_MODEL).eval()
    ref = copy_into_torch_mha(ours).eval()
    x, context = torch.randn(2, 7, D_MODEL), torch.randn(2, 11, D_MODEL)
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, 8:] = False
    expected, _ = ref(x, context, context, key_padding_mask=~valid, need_weights=False)
    ours_out = ours(x, AttentionInputs(key_padding(valid), context=context))
    torch.testing.assert_close(ours_out, expected, atol=1e-5, rtol=0)


def test_cross_attention_projects_context_once_with_a_cache():
    torch.manual_seed(2)
    attn = MultiHeadAttention(D_MODEL, HEADS, d_context=D_MODEL).eval()
    x, context = torch.randn(1, 5, D_MODEL), torch.randn(1, 9, D_MODEL)
    full = attn(x, AttentionInputs(context=context))
    cache = CrossKV()
    calls = []
    attn.kv_proj.register_forward_hook(lambda *_: calls.append(1))
    steps = [attn(x[:, i:i + 1], AttentionInputs(context=context if i == 0 else None, cache=cache))
             for i in range(5)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-6, rtol=0)
    assert len(calls) == 1


def test_grouped_query_attention_equals_repeated_key_value_heads():
    """GQA with 2 KV heads == full MHA whose K/V projections repeat each KV head's weights."""
    torch.manual_seed(3)
    gqa = MultiHeadAttention(D_MODEL, HEADS, n_kv_heads=2, qkv_bias=False, out_bias=False)
    mha = MultiHeadAttention(D_MODEL, HEADS, qkv_bias=False, out_bias=False)
    hd = D_MODEL // HEADS
    wq, wk, wv = gqa.qkv_proj.weight.split([D_MODEL, 2 * hd, 2 * hd])
    expand = lambda w: w.view(2, hd, D_MODEL).repeat_interleave(2, 0).reshape(-1, D_MODEL)  # noqa: E731
    with torch.no_grad():
        mha.qkv_proj.weight.copy_(torch.cat([wq, expand(wk), expand(wv)]))
        mha.out_proj.weight.copy_(gqa.out_proj.weight)
    x = torch.randn(2, 6, D_MODEL)
    inputs = AttentionInputs(causal())
    torch.testing.assert_close(gqa(x, inputs), mha(x, inputs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_kv_cache_steps_equal_full_attention(n_kv_heads):
    torch.manual_seed(4)
    attn = MultiHeadAttention(D_MODEL, HEADS, n_kv_heads=n_kv_heads).eval()
    rope = RotaryEmbedding(D_MODEL // HEADS, 32)
    x = torch.randn(2, 9, D_MODEL)
    positions = torch.arange(9).unsqueeze(0)
    full = attn(x, AttentionInputs(causal(), rope=rope(positions)))
    cache = KVCache(1, 2, n_kv_heads, D_MODEL // HEADS, 16)
    outputs = []
    for start, stop in [(0, 4), (4, 5), (5, 9)]:
        pos = cache.append(torch.ones(2, stop - start, dtype=torch.bool))
        mask = causal() & key_padding(cache.valid)
        outputs.append(attn(x[:, start:stop], AttentionInputs(mask, rope=rope(pos), cache=cache.layers[0])))
    torch.testing.assert_close(torch.cat(outputs, 1), full, atol=1e-5, rtol=0)


def test_cache_overflow_is_a_clear_error():
    cache = KVCache(1, 1, 2, 4, max_len=3)
    cache.append(torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="KV cache is full"):
        cache.append(torch.ones(1, 1, dtype=torch.bool))


def test_bad_head_configuration_is_explained():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        MultiHeadAttention(30, 4)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        MultiHeadAttention(32, 4, n_kv_heads=3)


def test_qk_norm_normalises_each_head():
    torch.manual_seed(5)
    attn = MultiHeadAttention(D_MODEL, HEADS, qk_norm=lambda d: nn.RMSNorm(d))
    x = torch.randn(1, 4, D_MODEL) * 100
    seen = []
    attn.qk.register_forward_hook(lambda module, inputs, output: seen.append(output))
    attn(x)
    for t in seen[0]:  # q and k as the scores see them
        torch.testing.assert_close(t.pow(2).mean(-1), torch.ones(1, HEADS, 4), atol=1e-4, rtol=0)


@pytest.mark.parametrize("d_context", [None, D_MODEL])
def test_qkv_and_output_biases_are_separate(d_context: int | None) -> None:
    attn = MultiHeadAttention(D_MODEL, HEADS, d_context=d_context, qkv_bias=False, out_bias=True)
    inputs = [attn.q_proj, attn.kv_proj] if d_context else [attn.qkv_proj]
    assert all(p.bias is None for p in inputs) and attn.out_proj.bias is not None
    attn = MultiHeadAttention(D_MODEL, HEADS, d_context=d_context, qkv_bias=True, out_bias=False)
    inputs = [attn.q_proj, attn.kv_proj] if d_context else [attn.qkv_proj]
    assert all(p.bias is not None for p in inputs) and attn.out_proj.bias is None
