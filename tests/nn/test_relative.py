"""Relative positional attention (Transformer-XL): the fast paths (relative shift + any backend)
equal the explicit-gather reference, outputs and gradients."""

import pytest
import torch

from tformer.nn import causal
from tformer.nn.masks import Mask
from tformer.nn.relative import (RelativeInputs, RelativeMultiHeadAttention, position_scores, rel_shift,
                                 relative_attention, relative_attention_reference,
                                 relative_sinusoids)

B, H, D = 2, 3, 8


def inputs(T: int, M: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Unit-scale random q, k, v, r, u, v_bias: attention far from uniform, so errors show."""
    g = torch.Generator().manual_seed(seed)
    K = M + T
    shapes = {"q": (B, H, T, D), "k": (B, H, K, D), "v": (B, H, K, D), "r": (H, K, D),
              "content_bias": (H, D), "position_bias": (H, D)}
    return {name: torch.randn(*shape, generator=g).requires_grad_() for name, shape in shapes.items()}


def document_mask(T: int, M: int) -> Mask:
    docs = torch.zeros(B, M + T, dtype=torch.long)
    docs[0, M + 2:] = 1  # row 0: a new document starts at the third query
    docs[1, :3] = -1  # row 1: the oldest memory positions are forgotten
    return causal() & Mask(lambda b, h, q, kv: docs[b, kv] == docs[b, q], "docs", batch_dependent=True)


def test_rel_shift_moves_row_i_left_by_t_minus_1_minus_i():
    T, K = 5, 9
    x = torch.randn(2, T, K)
    shifted = rel_shift(x)
    for i in range(T):
        for j in range(i + K - T + 1):  # the valid (causal) part
            assert shifted[:, i, j].equal(x[:, i, j + T - 1 - i])


def test_position_scores_equal_explicit_distances():
    T, M = 4, 6
    t = inputs(T, M)
    bd = position_scores(t["q"], t["r"], t["position_bias"])
    r_by_distance = t["r"].flip(1)  # row δ: distance δ
    for i in range(T):
        for j in range(M + i + 1):
            expected = ((t["q"][:, :, i] + t["position_bias"]) * r_by_distance[:, M + i - j]).sum(-1)
            torch.testing.assert_close(bd[:, :, i, j], expected)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("case", ["no_memory", "memory", "memory_and_documents"])
def test_fast_path_equals_reference_outputs_and_gradients(backend, case):
    T, M = 7, (0 if case == "no_memory" else 5)
    mask = document_mask(T, M) if case == "memory_and_documents" else causal()
    t = inputs(T, M)
    names = list(t)
    fast = relative_attention(*t.values(), mask, backend=backend)
    fast_grads = torch.autograd.grad(fast.square().sum(), list(t.values()))
    ref = relative_attention_reference(*t.values(), mask)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(t.values()))
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(names, fast_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"gradient of {name}")


def test_flex_forward_equals_reference():
    """FlexAttention reads the shifted position scores in a score_mod (forward only on CPU)."""
    T, M = 8, 8
    with torch.no_grad():
        t = {name: x.detach() for name, x in inputs(T, M).items()}  # leaves: flex checks requires_grad
        flex = relative_attention(*t.values(), causal(), backend="flex")
        ref = relative_attention_reference(*t.values(), causal())
    torch.testing.assert_close(flex, ref, atol=1e-5, rtol=1e-5)


def test_module_backends_agree():
    torch.manual_seed(0)
    attn = RelativeMultiHeadAttention(16, 2, backend="reference")
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    pos = relative_sinusoids(8, 16)
    ref = attn(x, RelativeInputs(pos, causal(), memory))
    attn.backend = "sdpa"
    torch.testing.assert_close(attn(x, RelativeInputs(pos, causal(), memory)), ref, atol=1e-5, rtol=1e-5)


def test_scores_depend_only_on_distance():
    """Shifting every position (a longer memory of zeros, masked off) changes nothing: the
    encoding is relative."""
    torch.manual_seed(0)
    attn = RelativeMultiHeadAttention(16, 2)
    x = torch.randn(1, 6, 16)
    alone = attn(x, RelativeInputs(relative_sinusoids(6, 16), causal()))
    memory = torch.randn(1, 4, 16)
    hide_memory = causal() & Mask(lambda b, h, q, kv: kv >= 4, "no_memory")
    behind = attn(x, RelativeInputs(relative_sinusoids(10, 16), hide_memory, memory))
    torch.testing.assert_close(behind, alone, atol=1e-5, rtol=1e-5)


def test_relative_sinusoids_descend_and_clamp():
    R = relative_sinusoids(6, 8)
    assert R.shape == (6, 8) and R[-1, 0] == 0.0  # the last row is distance 0: sin(0)
    clamped = relative_sinusoids(6, 8, clamp_len=2)
    assert clamped[0].equal(R[-3]) and clamped[3].equal(R[3])  # distances 5 and 2 -> 2


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown relative attention backend 'fast'"):
        RelativeMultiHeadAttention(16, 2, backend="fast")
    with pytest.raises(ValueError, match="divisible"):
        RelativeMultiHeadAttention(15, 2)
    attn = RelativeMultiHeadAttention(16, 2)
    with pytest.raises(ValueError, match="pos has 5 rows, expected one per key \\(8\\)"):
        attn(torch.randn(1, 4, 16), RelativeInputs(relative_sinusoids(5, 16), causal(), torch.randn(1, 4, 16)))
    with pytest.raises(ValueError, match="at least one key"):
        relative_sinusoids(0, 16)
