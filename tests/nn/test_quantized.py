"""nn.quantized: an int8 linear stays within the error its int8 step sizes allow of the float
linear, agrees with plain fake-quantization math and with torch.ao's quantize_dynamic, keeps its
int8 tensors in the state dict, falls back to a differentiable path, and a malformed replay is one
line."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from tformer.config import ConfigError
from tformer.models.edits import replay_edits
from tformer.models.registry import build_model
from tformer.nn.packed import packed_linears
from tformer.nn.quantized import (
    DYNAMIC,
    FEW_ROWS,
    MANY_ROWS,
    QMAX,
    WEIGHT_ONLY,
    QuantizedLinear,
    _has_vnni,
    kernel_available,
    quantize_rows,
    replay,
)

pytestmark = pytest.mark.usefixtures("one_thread")
BF16_STEP = 2.0 ** -8  # bf16 keeps 8 significant bits: rounding moves a value by <= 2^-8 of it


def linear_and_input(rows: int, seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(seed)
    linear = nn.Linear(64, 48)
    return linear.eval(), torch.randn(rows, 64)


def weight_error_bound(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """|x (W - W_q)^T| <= sum_k |x_k| * s_n / 2: each int8 weight is within half a step s_n."""
    _, scale = quantize_rows(linear.weight)
    return x.abs().sum(-1, keepdim=True) * scale / 2  # (rows, out)


def activation_range_step(x: torch.Tensor) -> float:
    """fbgemm's step for the activations: their range (with 0) over 255 levels (127 without VNNI)."""
    levels = 255 if _has_vnni() else 127
    return float(x.max().clamp(min=0) - x.min().clamp(max=0)) / levels


@pytest.mark.skipif(not kernel_available(DYNAMIC), reason="no fbgemm here")
@pytest.mark.parametrize("rows", [1, MANY_ROWS + 8])
def test_dynamic_within_int8_steps_of_float(rows):
    linear, x = linear_and_input(rows)
    q = QuantizedLinear.from_linear(linear, DYNAMIC)
    with torch.no_grad():
        want, got = linear(x), q(x)
    s_x = activation_range_step(x)
    _, s_w = quantize_rows(linear.weight)
    # (x + e_x)(W + e_W)^T - xW^T, |e_x| <= s_x / 2, |e_W| <= s_w / 2
    bound = (weight_error_bound(linear, x) + linear.weight.abs().sum(1) * s_x / 2 + 64 * s_x * s_w / 4)
    assert ((got - want).abs() <= bound + 1e-5).all()
    assert (got - want).abs().max() > 0  # it is quantized


@pytest.mark.skipif(not kernel_available(DYNAMIC), reason="no fbgemm here")
@pytest.mark.parametrize("rows", [7, MANY_ROWS + 8])  # fbgemm, oneDNN
def test_dynamic_equals_fake_quantization_and_torch_ao(rows):
    """Plain float math of the same quantization (asymmetric uint8 activations, the int8 weight)
    gives the same outputs; torch.ao's quantize_dynamic (its own per-channel weights) is within
    both quantizations' steps."""
    linear, x = linear_and_input(rows)
    q = QuantizedLinear.from_linear(linear, DYNAMIC)
    levels = 255 if _has_vnni() else 127
    lo, hi = x.min().clamp(max=0).double(), x.max().clamp(min=0).double()
    s_x = (hi - lo) / levels
    zero = torch.round(-lo / s_x).clamp(0, levels)
    x_hat = (torch.round(x.double() / s_x + zero).clamp(0, levels) - zero) * s_x
    w_hat = q.qweight.double() * q.scale.double()[:, None]
    fake = (x_hat @ w_hat.T + linear.bias.double()).float()
    with torch.no_grad():
        got = q(x)
    assert torch.allclose(got, fake, atol=1e-4, rtol=1e-4)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = torch.ao.quantization.quantize_dynamic(
            nn.Sequential(copy.deepcopy(linear)), {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig})
        with torch.no_grad():
            theirs = ao(x)
    bound = weight_error_bound(linear, x) + linear.weight.abs().sum(1) * s_x.float() / 2
    # each within its own steps of the float output: within twice the steps of each other
    assert ((got - theirs).abs() <= 2 * bound + 1e-4).all()


@pytest.mark.parametrize("rows", [1, FEW_ROWS + 1])
def test_weight_only_within_int8_and_bf16_steps(rows):
    linear, x = linear_and_input(rows)
    q = QuantizedLinear.from_linear(linear, WEIGHT_ONLY)
    with torch.no_grad():
        want, got = linear(x), q(x)
        dequantized = nn.functional.linear(x, q.weight, linear.bias)
    # the int8 weight, plus (few rows: bf16 activations, scales and products) 3 bf16 roundings
    bf16 = 3 * BF16_STEP * (x.abs() @ linear.weight.abs().T + linear.bias.abs()) if rows <= FEW_ROWS else 0
    assert ((got - want).abs() <= weight_error_bound(linear, x) + bf16 + 1e-5).all()
    if rows > FEW_ROWS:
        assert torch.allclose(got, dequantized, atol=1e-6)


@pytest.mark.parametrize("scheme", [DYNAMIC, WEIGHT_ONLY])
@pytest.mark.parametrize("in_features, out_features", [(84, 63), (40, 5), (8, 50), (1, 3)])
def test_any_width_is_right_when_decoding(scheme, in_features, out_features):
    """Pruned layers have any width; int8pack reads past rows whose width is not a multiple of 16
    (garbage or a segfault), so those widths must take another path and still be right."""
    if not kernel_available(scheme):
        pytest.skip(f"no {scheme} kernel here")
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features).eval()
    q = QuantizedLinear.from_linear(linear, scheme)
    x = torch.randn(1, in_features)
    with torch.no_grad():
        got, want = q(x), nn.functional.linear(x, q.weight, linear.bias)
    scale = float(want.abs().max()) + 1e-3
    assert torch.isfinite(got).all() and float((got - want).abs().max()) <= 0.05 * scale


def test_state_dict_holds_int8_weights_and_float_scales():
    linear, _ = linear_and_input(1)
    q = QuantizedLinear.from_linear(linear, DYNAMIC)
    state = q.state_dict()
    assert set(state) == {"qweight", "scale", "bias"}
    assert state["qweight"].dtype == torch.int8 and state["scale"].dtype == torch.float32
    assert state["qweight"].abs().max() == QMAX  # each row's largest weight takes the last level
    assert torch.allclose(q.weight, linear.weight, atol=float(q.scale.max()) / 2 + 1e-7)


@pytest.mark.parametrize("scheme", [DYNAMIC, WEIGHT_ONLY])
def test_gradients_take_the_dequantized_weight(scheme):
    linear, x = linear_and_input(3)
    q = QuantizedLinear.from_linear(linear, scheme)
    x.requires_grad_(True)
    q(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    nn.functional.linear(x2, q.weight, q.bias).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


def test_bf16_packing_leaves_quantized_layers_alone():
    model = build_model("gpt-nano").to(torch.bfloat16).eval()
    from tformer.nn.quantized import swap_linears

    swap_linears(model, ["blocks.0.ffn.up"], DYNAMIC)
    bf16_linears = sum(type(m) is nn.Linear for m in model.modules())
    with packed_linears(model) as n, torch.no_grad():
        assert n == bf16_linears
        out = model(torch.randint(0, model.config.vocab_size, (1, 5)))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("params", [
    {"scheme": "int4", "modules": ["lm_head"]},
    {"scheme": DYNAMIC, "modules": ["blocks.0.attn"]},  # not a Linear
    {"scheme": DYNAMIC, "modules": ["no.such.layer"]},
    {"scheme": DYNAMIC, "modules": "lm_head"},
    {"scheme": DYNAMIC},
])
def test_malformed_replay_is_one_line(params):
    model = build_model("gpt-nano")
    with pytest.raises(ConfigError) as error:
        replay_edits(model, [{"kind": "quantize", **params}], where="config.json")
    assert "\n" not in str(error.value) and "quantize" in str(error.value)


def test_replay_builds_the_shapes_empty():
    model = build_model("gpt-nano")
    replay(model, {"scheme": WEIGHT_ONLY, "modules": ["blocks.0.ffn.down", "lm_head"]})
    head = model.lm_head
    assert isinstance(head, QuantizedLinear) and head.scheme == WEIGHT_ONLY
    assert head.qweight.shape == (model.config.vocab_size, model.config.d_model)
    assert isinstance(model.blocks[0].ffn.down, QuantizedLinear)
