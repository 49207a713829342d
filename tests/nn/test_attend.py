"""Every attention backend computes the same function, for every mask pattern and score bias."""

import math

import pytest
import torch

from tformer.nn import masks
from tformer.nn.attend import BACKENDS, eager_attention, flex_attend, get_backend, sdpa_attend
from tformer.nn.position import ALiBi

B, H, T, D = 2, 3, 24, 16


def reference(q, k, v, dense_mask=None, dense_bias=None, scale=None):
    """Textbook softmax(q kᵀ / sqrt(d) + bias) v in float64; fully masked rows give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-2, -1) * (scale or 1 / math.sqrt(q.shape[-1]))
    if dense_bias is not None:
        scores = scores + dense_bias.double()
    if dense_mask is not None:
        scores = scores.masked_fill(~dense_mask, float("-inf"))
    weights = torch.softmax(scores, -1).nan_to_num(0.0)
    return (weights @ v).float()


def patterns(kv_len=T):
    torch.manual_seed(7)
    valid = torch.ones(B, kv_len, dtype=torch.bool)
    valid[0, :5] = False  # left padding in example 0
    valid[1, -3:] = False  # right padding in example 1
    return {
        "none": None,
        "full": masks.full(),
        "causal": masks.causal(),
        "padding": masks.key_padding(valid),
        "sliding_window": masks.sliding_window(5),
        "prefix_lm": masks.prefix_lm(torch.tensor([4, 9])),
        "causal_and_padding": masks.causal() & masks.key_padding(valid),
        "window_or_prefix": masks.sliding_window(3) | masks.prefix_lm(torch.tensor([6, 2])),
    }


def qkv(q_len=T, kv_len=T, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    make = lambda n: torch.randn(B, H, n, D, generator=g).requires_grad_(requires_grad)  # noqa: E731
    return make(q_len), make(kv_len), make(kv_len)


def dense_of(mask, q_len=T, kv_len=T, q_offset=0):
    return None if mask is None else mask.dense(B, H, q_len, kv_len, q_offset=q_offset)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(patterns()))
def test_dense_backends_match_reference(backend, name):
    mask = patterns()[name]
    q, k, v = qkv()
    out = get_backend(backend)(q, k, v, mask)
    torch.testing.assert_close(out, reference(q, k, v, dense_of(mask)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(patterns()))
def test_gradients_agree_between_sdpa_and_eager(name):
    mask = patterns()[name]
    grads = []
    for backend in ("sdpa", "eager"):
        q, k, v = qkv(requires_grad=True)
        (get_backend(backend)(q, k, v, mask) * torch.linspace(-1, 1, D)).sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(patterns()))
def test_flex_matches_reference(name):
    """Compiled FlexAttention (forward; CPU has no flex backward) against the dense reference."""
    mask = patterns()[name]
    q, k, v = qkv()
    with torch.no_grad():
        out = flex_attend(q, k, v, mask)
    torch.testing.assert_close(out, reference(q, k, v, dense_of(mask)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_query_offset_matches_last_rows_of_full_attention(backend):
    """A KV-cache step: 4 queries at absolute positions 20..23 against 24 keys."""
    q, k, v = qkv()
    mask = masks.causal() & masks.sliding_window(6)
    full = reference(q, k, v, dense_of(mask))
    with torch.no_grad():
        step = get_backend(backend)(q[:, :, -4:], k, v, mask, q_offset=torch.tensor(20))
    torch.testing.assert_close(step, full[:, :, -4:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_alibi_bias_agrees_across_backends(backend):
    q, k, v = qkv()
    bias = ALiBi(H)()
    mask = masks.causal()
    expected = reference(q, k, v, dense_of(mask), bias.dense(B, H, T, T))
    with torch.no_grad():
        out = get_backend(backend)(q, k, v, mask, bias=bias)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_flex_needing_gradients_on_cpu_falls_back_to_the_same_function(caplog):
    from tformer.nn import attend

    attend._warn_flex_fallback_once.cache_clear()
    q, k, v = qkv(requires_grad=True)
    mask = masks.sliding_window(4)
    with caplog.at_level("WARNING"):
        out = flex_attend(q, k, v, mask)
        flex_attend(q, k, v, mask)
    assert caplog.text.count("falls back to SDPA") == 1  # said once, not every call
    out.sum().backward()
    torch.testing.assert_close(out, reference(q, k, v, dense_of(mask)), atol=1e-5, rtol=0)
    assert q.grad is not None


def test_eager_returns_weights_that_sum_to_one_over_visible_keys():
    q, k, v = qkv()
    mask = masks.causal()
    out, weights = eager_attention(q, k, v, mask)
    assert weights.shape == (B, H, T, T)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H, T))
    assert weights.triu(1).abs().max() == 0  # nothing attends to the future
    torch.testing.assert_close(out, weights @ v)


def test_attention_dropout_changes_output_and_keeps_the_expectation():
    q, k, v = qkv()
    mask = masks.causal()
    torch.manual_seed(0)
    dropped = sdpa_attend(q, k, v, mask, dropout=0.5)
    assert not torch.allclose(dropped, sdpa_attend(q, k, v, mask))
    # inverted dropout keeps the expectation: average over many draws approaches the clean output
    torch.manual_seed(0)
    mean = torch.stack([eager_attention(q, k, v, mask, dropout=0.3)[0] for _ in range(400)]).mean(0)
    assert (mean - sdpa_attend(q, k, v, mask)).abs().mean() < 0.03


def test_flex_refuses_attention_dropout():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="dropout"):
        flex_attend(q, k, v, masks.causal(), dropout=0.1)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown attention backend 'cuda_magic'"):
        get_backend("cuda_magic")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex backward needs a GPU")
@pytest.mark.parametrize("name", ["full", "causal", "sliding_window"])
def test_flex_gradients_match_sdpa_on_gpu(name):
    mask = patterns()[name]
    grads = []
    for backend in ("sdpa", "flex"):
        q, k, v = (t.detach().cuda().requires_grad_() for t in qkv())
        get_backend(backend)(q, k, v, mask).sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("head_dim", [16, 32])
def test_low_precision_attention_with_gradients_runs_in_fp32_on_cpu(head_dim):
    # SDPA's bf16 CPU backward is slow for narrow heads: such attention is computed in fp32 (even
    # under autocast) and returned in bf16; values and gradients follow the fp32 reference
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 20, head_dim) for _ in range(3))
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    low = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    expected = sdpa_attend(*ref, masks.causal())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa_attend(*low, masks.causal())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)
    expected.sum().backward()
    out.float().sum().backward()
    for a, b in zip(low, ref):
        torch.testing.assert_close(a.grad.float(), b.grad, atol=5e-2, rtol=5e-2)


def test_a_single_query_step_on_cpu_builds_no_block_mask(monkeypatch):
    # decode steps change offset and padding every step: flex would build a BlockMask each time
    import torch.nn.attention.flex_attention as flex_module

    def refuse(*args, **kwargs):
        raise AssertionError("a one-row step must not build a BlockMask")

    monkeypatch.setattr(flex_module, "create_block_mask", refuse)
    q, k, v = qkv()
    mask = masks.causal() & masks.sliding_window(6)
    full = reference(q, k, v, dense_of(mask))
    with torch.no_grad():
        step = flex_attend(q[:, :, -1:], k, v, mask, q_offset=torch.tensor(T - 1))
    torch.testing.assert_close(step, full[:, :, -1:], atol=1e-5, rtol=0)
