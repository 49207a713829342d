"""LoRA layers: a fresh adapter (B = 0) computes exactly the base; merged equals unmerged; only
adapters get gradients; every family gets default targets by module type; the adapter equals an
independent x W^T + s x A^T B^T; a plain checkpoint loads into an adapted model; bad targets are
one line."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tformer.models import build_model
from tformer.nn.lora import LoRALinear, add_lora, lora_layers, merge, remove_lora, replay, unmerge

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {  # one model per family, a few layers of 16 dimensions
    "gpt-nano": dict(vocab_size=20, n_layers=1, d_model=16, n_heads=2),
    "bert-tiny": dict(vocab_size=20, n_layers=1, d_model=16, n_heads=2, head="sequence", labels=("a", "b")),
    "transformer-base": dict(n_encoder_layers=1, n_decoder_layers=1, d_model=16, n_heads=2, d_ff=32,
                             vocab_size=20, tgt_vocab_size=20),
    "txl-base-wt103": dict(n_layers=1, d_model=16, n_heads=2, d_ff=32, vocab_size=20),
    "vit-tiny-mnist": dict(n_layers=1, d_model=16, n_heads=2, patch_size=4, d_ff=32),
    "seed-sketch": dict(n_encoder_layers=1, n_decoder_layers=1, d_model=16, n_heads=2),
}
EXPECTED = {  # the default targets' last names, per family
    "gpt-nano": {"qkv_proj", "out_proj", "up", "down"},
    "bert-tiny": {"qkv_proj", "out_proj", "up", "down"},
    "transformer-base": {"qkv_proj", "q_proj", "kv_proj", "out_proj", "up", "down"},
    "txl-base-wt103": {"q_proj", "kv_proj", "out_proj", "up", "down"},
    "vit-tiny-mnist": {"qkv_proj", "out_proj", "up", "down"},
    "seed-sketch": {"qkv_proj", "q_proj", "kv_proj", "out_proj", "up", "down"},
}


def randomise_adapters(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=generator))


@pytest.mark.parametrize("preset", TINY)
def test_every_family_gets_default_targets_and_a_fresh_lora_is_the_base(preset: str) -> None:
    torch.manual_seed(0)
    base = build_model(preset, **TINY[preset]).eval()
    model = copy.deepcopy(base)
    params = add_lora(model, r=4, alpha=8)
    names = params["modules"]
    assert {n.rsplit(".", 1)[-1] for n in names} == EXPECTED[preset]
    assert not any(n.startswith(("head", "lm_head")) or n.endswith("pos_proj") for n in names)
    # the base's state dict (names and values) is a subset of the adapted model's
    state, adapted = base.state_dict(), model.state_dict()
    assert set(adapted) - set(state) == {f"{n}.{a}" for n in names for a in ("lora_A", "lora_B")}
    assert all(torch.equal(adapted[k], v) for k, v in state.items())
    # only adapters are trainable
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapted) - set(state)


def test_zero_b_equals_base_exactly_and_merge_unmerge() -> None:
    torch.manual_seed(0)
    base = build_model("gpt-nano", **TINY["gpt-nano"]).eval()
    model = copy.deepcopy(base)
    add_lora(model, r=4, alpha=8)
    ids = torch.randint(0, 20, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))  # B = 0: the update is exactly zero
        randomise_adapters(model)
        unmerged = model(ids)
        assert (unmerged - base(ids)).abs().max() > 1e-3
        before = {n: p.clone() for n, p in model.named_parameters()}
        assert merge(model) == 4
        merged = model(ids)
        assert (merged - unmerged).abs().max() <= 1e-5
        unmerge(model)
        assert (model(ids) - unmerged).abs().max() <= 1e-5
        assert all((p - before[n]).abs().max() <= 1e-6 for n, p in model.named_parameters())
        plain = copy.deepcopy(model)
        remove_lora(plain)
        assert not lora_layers(plain) and (plain(ids) - unmerged).abs().max() <= 1e-5


def test_adapter_matches_the_formula_and_dropout_only_touches_the_adapter() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(12, 6)
    layer = LoRALinear(linear, r=3, alpha=6, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 12)
    want = x @ linear.weight.T + linear.bias + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    layer.eval()
    assert torch.allclose(layer(x), want, atol=1e-5)
    layer.train()
    torch.manual_seed(1)
    out = layer(x)
    assert not torch.allclose(out, want, atol=1e-3)  # dropout on the adapter's input
    with torch.no_grad():
        layer.lora_B.zero_()
    assert torch.allclose(layer(x), linear(x), atol=0)  # ... never on the base path


def test_only_adapters_get_gradients() -> None:
    torch.manual_seed(0)
    model = build_model("bert-tiny", **TINY["bert-tiny"])
    add_lora(model, r=2, alpha=4)
    ids = torch.randint(1, 20, (2, 7))
    model(ids).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(n.endswith(("lora_A", "lora_B")) for n in with_grad)
    assert any(n.endswith("lora_A") for n in with_grad)  # B = 0 still passes a gradient to B, A: dB != 0


def test_plain_checkpoint_loads_and_replay_rebuilds_shapes() -> None:
    torch.manual_seed(0)
    base = build_model("vit-tiny-mnist", **TINY["vit-tiny-mnist"])
    model = copy.deepcopy(base)
    params = add_lora(model, ["attn.qkv_proj", "blocks.*.ffn.up"], r=2, alpha=2)
    assert params["modules"] == ["blocks.0.attn.qkv_proj", "blocks.0.ffn.up"]
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(n.endswith(("lora_A", "lora_B")) for n in missing)
    randomise_adapters(model)
    fresh = build_model("vit-tiny-mnist", **TINY["vit-tiny-mnist"])
    replay(fresh, params)
    fresh.load_state_dict(model.state_dict())  # strict: the same names and shapes
    images = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(images), model.eval()(images))


@pytest.mark.parametrize("targets, message", [
    (["qkv"], "LoRA target 'qkv' matches no linear layer of this GPT; its linears are named "),
    (["qkv_proj", "blocks.9.*"], "'blocks.9.\\*' matches no linear"),
    ([], "non-empty list"),
])
def test_targets_matching_nothing_is_one_line(targets: list, message: str, one_line_error) -> None:
    model = build_model("gpt-nano", **TINY["gpt-nano"])
    import re

    assert re.search(message, one_line_error(lambda: add_lora(model, targets)))
    assert not lora_layers(model)  # nothing was changed


def test_a_weight_tied_to_the_embeddings_is_refused(one_line_error) -> None:
    model = build_model("gpt-nano", **TINY["gpt-nano"])  # tie_embeddings: lm_head.weight is tok_emb.weight
    assert model.lm_head.weight is model.tok_emb.weight
    message = one_line_error(lambda: add_lora(model, ["lm_head", "qkv_proj"]))
    assert "lm_head" in message and "tok_emb" in message
    assert not lora_layers(model)


def test_bad_params_and_double_lora_are_refused(one_line_error) -> None:
    model = build_model("gpt-nano", **TINY["gpt-nano"])
    assert "positive integer" in one_line_error(lambda: add_lora(model, r=0))
    assert "[0, 1)" in one_line_error(lambda: add_lora(model, dropout=1.0))
    add_lora(model, r=2)
    assert "already has LoRA" in one_line_error(lambda: add_lora(model, r=2))
    with pytest.raises(KeyError):
        replay(build_model("gpt-nano", **TINY["gpt-nano"]), {"modules": ["blocks.7.attn.qkv_proj"], "r": 2,
                                                              "alpha": 2})


def test_a_merged_model_refuses_to_be_saved() -> None:
    model = build_model("gpt-nano", **TINY["gpt-nano"])
    add_lora(model, r=2)
    merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        model.state_dict()
