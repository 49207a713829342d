"""Hugging Face ViT checkpoints -> tformer's ViT: logits and token states equal transformers'
(RGB and grey, other image sizes, no q/k/v bias); a ViTModel takes a fresh head; pickles, other
families, non-square images and missing or extra tensors fail with errors that name them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from tformer.config import ConfigError  # noqa: E402
from tformer.interop.hf_vit import convert_vit, load_vit  # noqa: E402
from tformer.runs import open_run  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            image_size=16, patch_size=4, num_channels=3, num_labels=5)


def make_hf(path: Path, cls_name: str = "ViTForImageClassification", **overrides):
    torch.manual_seed(0)
    hf = getattr(transformers, cls_name)(transformers.ViTConfig(**{**TINY, **overrides})).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # nonzero biases, non-unit norms: a mis-mapped tensor cannot hide
        for p in hf.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    hf.save_pretrained(path)
    return hf


def images(size: int = 16, channels: int = 3) -> torch.Tensor:
    return torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("overrides, size, channels", [
    ({}, 16, 3), ({"num_channels": 1}, 16, 1), ({"image_size": 24, "patch_size": 6}, 24, 3),
    ({"image_size": [20, 20]}, 20, 3), ({"qkv_bias": False, "layer_norm_eps": 1e-6}, 16, 3)],
    ids=["rgb", "grey", "24px", "size-pair", "no-qkv-bias"])
def test_logits_and_tokens_match(tmp_path: Path, overrides: dict, size: int, channels: int) -> None:
    hf = make_hf(tmp_path, **overrides)
    model = load_vit(tmp_path)
    x = images(size, channels)
    with torch.no_grad():
        ref = hf(x)
        ours = model(x)
        tokens = model.encode(x)
        ref_tokens = hf.vit(x).last_hidden_state
    assert (ours - ref.logits).abs().max() <= 1e-4
    assert (tokens - ref_tokens).abs().max() <= 1e-4
    assert not model.training and model.config.n_classes == 5
    assert model.config.labels == tuple(f"LABEL_{i}" for i in range(5))
    assert model.config.norm_eps == overrides.get("layer_norm_eps", 1e-12)


def test_labels_come_from_id2label(tmp_path: Path) -> None:
    make_hf(tmp_path, num_labels=3, id2label={0: "cat", 1: "dog", 2: "bird"})
    assert load_vit(tmp_path).config.labels == ("cat", "dog", "bird")


def test_vit_model_needs_labels_and_then_keeps_the_encoder(tmp_path: Path, caplog) -> None:
    hf = make_hf(tmp_path, "ViTModel")  # encoder + tanh pooler, no classifier
    with pytest.raises(ValueError, match="has no classifier.*pass labels="):
        load_vit(tmp_path)
    with caplog.at_level(logging.INFO, logger="tformer.interop.hf_vit"):
        model = load_vit(tmp_path, labels=("neg", "pos"))
    x = images()
    with torch.no_grad():
        assert (model.encode(x) - hf(x).last_hidden_state).abs().max() <= 1e-4
        assert model(x).shape == (3, 2)
    assert model.config.labels == ("neg", "pos") and "pooler" in caplog.text


def test_new_labels_replace_the_classifier(tmp_path: Path) -> None:
    hf = make_hf(tmp_path)
    model = load_vit(tmp_path, labels=("a", "b", "c"))
    x = images()
    with torch.no_grad():
        assert model(x).shape == (3, 3)
        assert (model.features(x) - hf.vit(x).last_hidden_state[:, 0]).abs().max() <= 1e-4


def test_pickles_are_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", **TINY}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(ValueError, match="refuses pickles.*arbitrary code.*safe_serialization=True"):
        load_vit(tmp_path)
    assert (tmp_path / "pytorch_model.bin").read_bytes() == b"not to be unpickled"


def test_other_families_and_non_square_images_are_refused(tmp_path: Path) -> None:
    make_hf(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for changes, message in [({"model_type": "deit"}, "model_type='deit'.*only 'vit'"),
                             ({"image_size": [16, 32]}, r"image_size=\[16, 32\].*square"),
                             ({"architectures": ["ViTForMaskedImageModeling"]}, "not supported"),
                             ({"hidden_act": "quick_gelu"}, "hidden_act='quick_gelu'")]:
        (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))
        with pytest.raises(ConfigError, match=message):
            load_vit(tmp_path)


@pytest.mark.parametrize("change, message", [
    ("drop", "missing tensor 'encoder.layer.1.attention.attention.key.weight'"),
    ("extra", "unexpected tensor 'vit.embeddings.mask_token'"),
    ("shape", "'classifier.weight' has shape \\(4, 32\\), config.json implies \\(5, 32\\)"),
])
def test_missing_extra_and_misshapen_tensors_are_named(tmp_path: Path, change: str, message: str) -> None:
    make_hf(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    if change == "drop":
        del tensors["vit.encoder.layer.1.attention.attention.key.weight"]
    elif change == "extra":
        tensors["vit.embeddings.mask_token"] = torch.zeros(1, 1, 32)
    else:
        tensors["classifier.weight"] = tensors["classifier.weight"][:4]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message):
        load_vit(tmp_path)


def test_convert_then_load_run_gives_the_same_model(tmp_path: Path) -> None:
    hf = make_hf(tmp_path / "hf", num_labels=3, id2label={0: "cat", 1: "dog", 2: "bird"})
    run = open_run(convert_vit(tmp_path / "hf", tmp_path / "run"))
    model, tokenizer, record = run.model, run.tokenizer, run.record
    assert record["model_family"] == "vit" and tokenizer is None
    assert model.config.labels == ("cat", "dog", "bird")
    x = images()
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max() <= 1e-4


def test_convert_never_writes_into_a_folder_that_holds_something(tmp_path: Path) -> None:
    make_hf(tmp_path / "hf", num_labels=3, id2label={0: "cat", 1: "dog", 2: "bird"})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="mine is not empty; give a new folder"):
        convert_vit(tmp_path / "hf", tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
