"""Parity of tformer's GPT with Hugging Face GPT-2: imported logits and greedy generations equal
HF's, exports load in transformers, and bad checkpoints fail with errors that name the problem."""

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
from tformer.interop import huggingface, load_gpt2, load_gpt2_config, save_gpt2  # noqa: E402
from tformer.models.gpt import GPT, GPTConfig  # noqa: E402

TINY_HF = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=64, bos_token_id=None,
               eos_token_id=None, pad_token_id=None)
TINY = GPTConfig(vocab_size=101, context_length=64, n_layers=2, n_heads=4, d_model=32)


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Nonzero biases and non-unit norms, so a mis-mapped tensor cannot hide behind init values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


def make_hf(path: Path, **overrides) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**TINY_HF, **overrides})).eval()
    perturb(hf)
    hf.save_pretrained(path)
    return hf


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def hf_logits(hf, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # HF needs these for left padding
    with torch.no_grad():
        return hf(ids, attention_mask=mask, position_ids=positions).logits


@pytest.mark.parametrize("overrides", [{}, {"activation_function": "gelu"}, {"activation_function": "relu"},
                                       {"n_inner": 48}, {"tie_word_embeddings": False}],
                         ids=["gpt2", "gelu", "relu", "n_inner", "untied"])
def test_imported_logits_match_hf(tmp_path: Path, overrides: dict) -> None:
    hf = make_hf(tmp_path, **overrides)
    model = load_gpt2(tmp_path)
    ids, mask = left_padded([[5, 17, 3, 99, 42, 7, 1, 64, 8, 30], [11, 2, 76, 45, 9, 100]])
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
    real = mask.bool()
    assert (ours[real] - hf_logits(hf, ids, mask)[real]).abs().max() <= 1e-4
    full = torch.ones_like(ids)
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-4
    assert torch.equal(hf_logits(hf, ids, full), hf(ids).logits)


def test_sharded_checkpoint_and_dtype(tmp_path: Path) -> None:
    hf = make_hf(tmp_path)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / huggingface.INDEX_FILE).is_file()
    single, sharded = load_gpt2(tmp_path), load_gpt2(tmp_path / "sharded", dtype=torch.float64)
    assert sharded.lm_head.weight.dtype == torch.float64
    assert sharded.lm_head.weight is sharded.tok_emb.weight  # still tied
    for name, tensor in single.state_dict().items():
        assert torch.equal(tensor.double(), sharded.state_dict()[name]), name


@pytest.mark.parametrize("prompts", [[[4, 8, 15, 16, 23, 42]], [[4, 8, 15, 16, 23, 42], [77, 1, 3]]],
                         ids=["single", "left_padded_batch"])
def test_greedy_generation_matches_hf(tmp_path: Path, prompts: list[list[int]]) -> None:
    hf = make_hf(tmp_path)
    model = load_gpt2(tmp_path)
    ids, mask = left_padded(prompts)
    expected = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, pad_token_id=0)
    ours = generate(model, ids, 12, attention_mask=mask)
    assert ours.tolist() == expected.tolist()


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "activation": "gelu", "d_ff": 40},
                                       {"bias": False}], ids=["gpt2", "untied_gelu_dff", "no_bias"])
def test_export_round_trips_and_loads_in_transformers(tmp_path: Path, overrides: dict) -> None:
    torch.manual_seed(1)
    model = GPT(dataclasses.replace(TINY, **overrides)).eval()
    perturb(model, seed=1)
    save_gpt2(model, tmp_path / "export")
    again = load_gpt2(tmp_path / "export")
    assert again.config == model.config
    assert again.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    ids, mask = left_padded([[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]])
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
    assert (ours[mask.bool()] - hf_logits(hf, ids, mask)[mask.bool()]).abs().max() <= 1e-4


def test_pickle_only_checkpoint_is_refused(tmp_path: Path, monkeypatch) -> None:
    hf = make_hf(tmp_path / "hf")
    (tmp_path / "pkl").mkdir()
    (tmp_path / "pkl" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "pkl" / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was opened"))
    with pytest.raises(ValueError, match=r"pickle.*save_pretrained\(.*safe_serialization=True"):
        load_gpt2(tmp_path / "pkl")


@pytest.mark.parametrize("key, value", [("scale_attn_by_inverse_layer_idx", True),
                                        ("reorder_and_upcast_attn", True), ("scale_attn_weights", False),
                                        ("add_cross_attention", True), ("activation_function", "quick_gelu"),
                                        ("model_type", "llama")])
def test_unsupported_config_is_refused(tmp_path: Path, key: str, value) -> None:
    make_hf(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ConfigError, match=key):
        load_gpt2_config(tmp_path)
    with pytest.raises(ConfigError, match=key):
        load_gpt2(tmp_path)


def test_missing_or_misshapen_tensor_is_named(tmp_path: Path) -> None:
    make_hf(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    tensors["transformer.h.0.attn.c_attn.bias"] = torch.zeros(95)
    tensors["transformer.h.0.attn.bias"] = torch.ones(1, 1, 64, 64)  # old mask buffer: ignored
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError) as error:
        load_gpt2(tmp_path)
    message = str(error.value)
    assert "h.1.mlp.c_fc.weight" in message and "transformer.h.0.attn.c_attn.bias" in message
    assert "(95,)" in message and "(96,)" in message and str(file) in message
    assert "h.0.attn.bias" not in message  # the old causal-mask buffer is ignored, not reported


@pytest.mark.parametrize("overrides", [dict(position="rope"), dict(position="alibi"), dict(norm="rmsnorm"),
                                       dict(activation="swiglu"), dict(n_kv_heads=2), dict(qk_norm=True),
                                       dict(attn_pattern="sliding_window", attn_pattern_params={"window": 8})])
def test_unexportable_config_is_refused(tmp_path: Path, overrides: dict) -> None:
    model = GPT(dataclasses.replace(TINY, **overrides))
    with pytest.raises(ConfigError, match=next(iter(overrides))):
        save_gpt2(model, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_a_pruned_model_is_refused_in_one_line(tmp_path: Path) -> None:
    from tformer.compress.prune import prune

    model = GPT(TINY)
    prune(model, heads=0.5, importance="magnitude")
    with pytest.raises(ConfigError, match="edited by prune") as e:
        save_gpt2(model, tmp_path / "export")
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == []


def test_failed_save_leaves_nothing_and_a_folder_with_files_is_refused(tmp_path: Path, monkeypatch) -> None:
    model = GPT(TINY)

    def save_half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(huggingface, "save_file", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_gpt2(model, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []  # no target, no staging directory

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="already holds files \\(notes.txt\\)") as e:
        save_gpt2(model, tmp_path / "mine")
    assert "\n" not in str(e.value) and [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
