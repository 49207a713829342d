"""tformer's Llama-style GPT (rope, rmsnorm, swiglu, grouped-query attention) <-> Hugging Face
LlamaForCausalLM: imported logits equal a randomly initialised transformers model's, exports load
in transformers with equal logits, round trips are bitwise, and what Llama or tformer cannot hold
is refused in one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from tformer.config import ConfigError  # noqa: E402
from tformer.inference import generate  # noqa: E402
from tformer.interop.hf_llama import load_llama, save_llama  # noqa: E402
from tformer.models.gpt import GPT, GPTConfig  # noqa: E402

TINY_HF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=48, vocab_size=101, max_position_embeddings=64, rms_norm_eps=1e-6,
               bos_token_id=None, eos_token_id=None, pad_token_id=None)
TINY = GPTConfig(vocab_size=101, context_length=64, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32,
                 d_ff=48, position="rope", norm="rmsnorm", activation="swiglu", bias=False, norm_eps=1e-6)


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-unit norms and nonzero biases, so a mis-mapped tensor cannot hide behind its init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


def make_hf(path: Path, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY_HF, **overrides})).eval()
    perturb(hf)
    hf.save_pretrained(path)
    return hf


IDS = torch.randint(0, 101, (3, 20), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 4}, {"num_key_value_heads": 1},
                                       {"attention_bias": True, "mlp_bias": True},
                                       {"tie_word_embeddings": True, "rope_theta": 500.0}],
                         ids=["gqa", "mha", "mqa", "bias", "tied_theta"])
def test_imported_logits_match_hf(tmp_path: Path, overrides: dict) -> None:
    hf = make_hf(tmp_path, **overrides)
    model = load_llama(tmp_path)
    with torch.no_grad():
        assert (model(IDS) - hf(IDS).logits).abs().max() <= 1e-4
    assert model.config.n_kv_heads == (None if overrides.get("num_key_value_heads") == 4
                                       else overrides.get("num_key_value_heads", 2))
    expected = hf.generate(IDS[:, :5], max_new_tokens=8, do_sample=False)
    assert generate(model, IDS[:, :5], 8).tolist() == expected.tolist()  # KV cache and RoPE offsets


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": None, "tie_embeddings": True, "d_ff": None},
                                       {"bias": True, "rope_base": 1000.0}], ids=["gqa", "mha_tied", "bias"])
def test_export_loads_in_transformers_and_round_trips_bitwise(tmp_path: Path, overrides: dict) -> None:
    torch.manual_seed(1)
    model = GPT(dataclasses.replace(TINY, **overrides)).eval()
    perturb(model, seed=1)
    save_llama(model, tmp_path / "export")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        assert (model(IDS) - hf(IDS).logits).abs().max() <= 1e-4
    again = load_llama(tmp_path / "export")
    assert again.config == model.config
    assert again.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "RoPE scaling 'llama3'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_parameters": None}, "RoPE scaling 'linear'"),
    ({"attention_bias": True}, "attention_bias=True and mlp_bias=False"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"), ({"model_type": "mistral"}, "only 'llama'"),
    ({"head_dim": 16}, "head_dim=16"),
    ({"rope_scaling": {"factor": 2.0}, "rope_parameters": None}, "RoPE scaling 'factor 2.0"),
    ({"num_attention_heads": 0}, "num_attention_heads=0 .* whole number"),
    ({"hidden_size": "64"}, "hidden_size='64' .* whole number")])
def test_what_tformer_cannot_hold_is_refused_in_one_line(tmp_path: Path, change: dict, message: str) -> None:
    make_hf(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ConfigError, match=message) as e:
        load_llama(tmp_path)
    assert "\n" not in str(e.value)


def test_missing_and_extra_tensors_are_named_and_pickles_refused(tmp_path: Path) -> None:
    make_hf(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'.*unexpected "
                                         "tensor 'model.layers.0.self_attn.q_norm.weight'"):
        load_llama(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        load_llama(tmp_path / "hf")


@pytest.mark.parametrize("overrides, message", [
    (dict(position="alibi"), "position='alibi'"), (dict(norm="layernorm"), "norm='layernorm'"),
    (dict(activation="gelu"), "activation='gelu'"), (dict(qk_norm=True), "qk_norm=True"),
    (dict(attn_pattern="sliding_window", attn_pattern_params={"window": 8}), "attn_pattern='sliding_window'")])
def test_unexportable_config_is_refused(tmp_path: Path, overrides: dict, message: str) -> None:
    model = GPT(dataclasses.replace(TINY, **overrides))
    with pytest.raises(ConfigError, match=message) as e:
        save_llama(model, tmp_path / "export")
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == []
