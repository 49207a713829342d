"""tformer's ViT: shapes for both poolings and position kinds, 2-D sin-cos positions equal MAE's,
the patch embedding is flatten + Linear, backends agree, it learns one batch, it compiles, bad
configs and inputs fail clearly, and the ImageNet presets have the published parameter counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tformer.config import ConfigError
from tformer.models import PRESETS, build_model, get_config
from tformer.models.vit import ViT, ViTConfig

TINY = dict(image_size=8, patch_size=2, channels=3, n_classes=5, d_model=32, n_layers=2, n_heads=4)


def tiny(**overrides) -> ViT:
    torch.manual_seed(0)
    return ViT(ViTConfig(**{**TINY, **overrides})).eval()


def mae_sincos_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE's util/pos_embed.py get_2d_sincos_pos_embed (He et al. 2022), cls_token=True."""
    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32),
                                np.arange(grid_size, dtype=np.float32)), axis=0)  # w goes first
    grid = grid.reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


@pytest.mark.parametrize("position", ["learned", "sincos2d"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_shapes(pooling: str, position: str) -> None:
    model = tiny(pooling=pooling, position=position)
    images = torch.randn(3, 3, 8, 8)
    tokens = 16 + (pooling == "cls")
    assert model.encode(images).shape == (3, tokens, 32)
    assert model.features(images).shape == (3, 32)
    assert model(images).shape == (3, 5)
    assert (model.cls_token is not None) == (pooling == "cls")
    assert tuple(model.pos_emb.shape) == (1, tokens, 32)
    learned = any(name == "pos_emb" for name, _ in model.named_parameters())
    assert learned == (position == "learned")
    assert ("pos_emb" in model.state_dict()) == learned  # the fixed table is rebuilt, not stored


def test_features_pool_the_encoded_tokens() -> None:
    images = torch.randn(2, 3, 8, 8)
    cls, mean = tiny(), tiny(pooling="mean")
    torch.testing.assert_close(cls.features(images), cls.encode(images)[:, 0])
    torch.testing.assert_close(mean.features(images), mean.encode(images).mean(1))
    torch.testing.assert_close(cls(images), cls.head(cls.features(images)))


def test_sincos2d_equals_mae() -> None:
    model = tiny(position="sincos2d", image_size=12, d_model=48)  # 6 x 6 patches
    expected = torch.from_numpy(mae_sincos_2d(48, 6)).float()
    torch.testing.assert_close(model.pos_emb[0], expected, atol=1e-6, rtol=0)
    mean = tiny(position="sincos2d", pooling="mean", image_size=12, d_model=48)
    torch.testing.assert_close(mean.pos_emb[0], expected[1:], atol=1e-6, rtol=0)


def test_patch_embedding_is_flattened_patches_times_a_linear() -> None:
    model = tiny(image_size=12, patch_size=4)
    images = torch.randn(2, 3, 12, 12)
    B, C, g, p = 2, 3, 3, 4
    patches = images.view(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)
    conv = model.patch_emb.proj  # row-major patches, each flattened (C, p, p)
    expected = F.linear(patches, conv.weight.reshape(32, -1), conv.bias)
    torch.testing.assert_close(model.patch_emb(images), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_overfits_one_batch(pooling: str) -> None:
    model = tiny(channels=1, pooling=pooling).train()
    torch.manual_seed(1)
    images, labels = torch.randn(16, 1, 8, 8), torch.randint(0, 5, (16,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_eval_mode_is_deterministic_and_train_mode_drops() -> None:
    model = tiny(dropout=0.2)
    images = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(images), model(images), atol=0, rtol=0)
        model.train()
        assert not torch.equal(model(images), model(images))


@pytest.mark.parametrize("position", ["learned", "sincos2d"])
def test_backends_agree(position: str) -> None:
    images = torch.randn(2, 3, 8, 8)
    sdpa, eager = tiny(position=position), tiny(position=position, attn_backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(sdpa(images), eager(images), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_forward_compiles_without_graph_breaks() -> None:
    model = tiny()
    images = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images), atol=1e-5, rtol=1e-5)


def test_qkv_bias_off_keeps_the_output_bias() -> None:
    block = tiny(qkv_bias=False).blocks[0]
    assert block.attn.qkv_proj.bias is None and block.attn.out_proj.bias is not None
    assert block.attn.qkv_proj.weight.shape == (96, 32)


@pytest.mark.parametrize("overrides, message", [
    (dict(image_size=10, patch_size=4), "image_size .10. must be divisible by patch_size .4."),
    (dict(labels=("a", "b")), "2 labels given for n_classes=5"),
    (dict(labels=("a", "a", "b", "c", "d")), "labels must be distinct"),
    (dict(pooling="avg"), "pooling='avg' is not valid"),
    (dict(position="sincos", d_model=32), "position='sincos' is not valid.*did you mean 'sincos2d'"),
    (dict(position="sincos2d", d_model=30, n_heads=3), "sincos2d positions need d_model divisible by 4"),
    (dict(d_model=30), "d_model .30. must be divisible by n_heads .4."),
    (dict(attn_dropout=1.0), "attn_dropout must be in"),
])
def test_config_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ViTConfig(**{**TINY, **overrides})


def test_labels_and_attn_dropout_defaults() -> None:
    config = get_config("vit-digits", labels=list("0123456789"), dropout=0.1)
    assert config.labels == tuple("0123456789") and config.attention_dropout == 0.1
    assert get_config("vit-digits", dropout=0.1, attn_dropout=0.0).attention_dropout == 0.0


def test_bad_inputs_are_named() -> None:
    model = tiny()
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, 8, 8\), got \(2, 3, 16, 16\)"):
        model(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="floating-point.*torch.uint8"):
        model(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize("name, expected", [
    ("vit-ti/16", 5_717_416), ("vit-s/16", 22_050_664), ("vit-b/16", 86_567_656)])
def test_imagenet_presets_have_the_published_parameter_counts(name: str, expected: int) -> None:
    assert PRESETS[name][0] == "vit"
    with torch.device("meta"):  # counts only, no memory
        model = build_model(name)
    assert model.num_parameters() == expected  # timm / Hugging Face, 1000 classes


@pytest.mark.parametrize("name, shape", [("vit-tiny-mnist", (1, 28, 28)), ("vit-digits", (1, 8, 8))])
def test_small_presets_run(name: str, shape: tuple) -> None:
    model = build_model(name).eval()
    with torch.no_grad():
        assert model(torch.rand(2, *shape)).shape == (2, 10)
