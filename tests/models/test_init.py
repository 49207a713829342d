"""Initial parameter scales of every family equal what its `reset_parameters` documents: the
measured std of each random matrix against the documented one (models large enough that the
estimate is tight), residual projections scaled where the family says so, biases zero, norm
gains one. The expectations are written from the documentation, by parameter name."""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
from torch import nn

from tformer.models.bert import Bert, BertConfig
from tformer.models.gpt import GPT, GPTConfig
from tformer.models.image_gen import ImageGenConfig, ImageGenerator
from tformer.models.seq2seq import Seq2Seq, Seq2SeqConfig
from tformer.models.transformer_xl import TransformerXL, TransformerXLConfig
from tformer.models.vit import ViT, ViTConfig

D = 128  # every matrix has >= 16k entries: its std estimate is within ~1% (one sigma)
RESIDUAL = ("attn.out_proj.weight", "ffn.down.weight")  # cross_attn.out_proj too (same suffix)


def gpt_std(name: str, p: torch.Tensor) -> float:
    """N(0, 0.02); out_proj and MLP down N(0, 0.02 / sqrt(2 n_layers)) (GPT-2)."""
    return 0.02 / math.sqrt(2 * 4) if name.endswith(RESIDUAL) else 0.02


def image_gen_std(name: str, p: torch.Tensor) -> float:
    """GPT-2's, with layers = encoder + decoder layers (2 + 3)."""
    return 0.02 / math.sqrt(2 * 5) if name.endswith(RESIDUAL) else 0.02


def seq2seq_std(name: str, p: torch.Tensor) -> float:
    """Embeddings N(0, d^-1/2); matrices Xavier-uniform, std sqrt(2 / (fan_in + fan_out))."""
    if name.endswith("emb.weight"):
        return D ** -0.5
    fan_out, fan_in = p.shape
    return math.sqrt(2 / (fan_in + fan_out))


FAMILIES: dict[str, tuple[Callable[[], nn.Module], Callable[[str, torch.Tensor], float]]] = {
    "gpt": (lambda: GPT(GPTConfig(vocab_size=1000, context_length=256, n_layers=4, n_heads=4, d_model=D)),
            gpt_std),
    "gpt-llama": (lambda: GPT(GPTConfig(vocab_size=1000, context_length=256, n_layers=4, n_heads=4,
                                        n_kv_heads=2, d_model=D, position="rope", norm="rmsnorm",
                                        activation="swiglu", bias=False, tie_embeddings=False)), gpt_std),
    "bert": (lambda: Bert(BertConfig(vocab_size=1000, context_length=256, n_layers=2, n_heads=4, d_model=D,
                                     head="mlm")), lambda name, p: 0.02),
    "vit": (lambda: ViT(ViTConfig(image_size=64, patch_size=8, channels=3, n_classes=200, d_model=D,
                                  n_layers=2, n_heads=4)), lambda name, p: 0.02),  # trunc_normal, cut at +-2
    "seq2seq": (lambda: Seq2Seq(Seq2SeqConfig(vocab_size=1000, tgt_vocab_size=800, share_embeddings=False,
                                              tie_output=False, n_encoder_layers=2, n_decoder_layers=2,
                                              n_heads=4, d_model=D)), seq2seq_std),
    "image_gen": (lambda: ImageGenerator(ImageGenConfig(height=16, width=16, condition="text",
                                                        condition_vocab=200, condition_length=130,
                                                        n_encoder_layers=2, n_decoder_layers=3, n_heads=4,
                                                        d_model=D)), image_gen_std),
    "transformer_xl": (lambda: TransformerXL(TransformerXLConfig(vocab_size=1000, n_layers=2, n_heads=4,
                                                                 d_model=D, d_ff=512)), lambda name, p: 0.02),
}


def is_norm_gain(name: str) -> bool:
    parts = name.split(".")
    return len(parts) > 1 and "norm" in parts[-2] and parts[-1] == "weight"


@pytest.mark.parametrize("family", FAMILIES)
def test_initial_scales_are_the_documented_ones(family: str) -> None:
    build, expected_std = FAMILIES[family]
    torch.manual_seed(0)
    model = build()
    checked = 0
    for name, p in model.named_parameters():
        p = p.detach().double()
        if name.endswith(".bias"):
            assert torch.all(p == 0), f"{family}: {name} should start at zero"
        elif is_norm_gain(name):
            assert torch.all(p == 1), f"{family}: {name} should start at one"
        else:
            want, n = expected_std(name, p), p.numel()
            sigma = 1 / math.sqrt(2 * n)  # relative standard error of a std estimate
            assert abs(p.std().item() / want - 1) < max(6 * sigma, 0.02), \
                f"{family}: {name} has std {p.std().item():.5f}, documented {want:.5f}"
            assert abs(p.mean().item()) < 6 * want / math.sqrt(n), f"{family}: {name} is not centred"
            checked += 1
    assert checked >= 6


@pytest.mark.parametrize("family", ["gpt", "image_gen"])
def test_every_residual_projection_is_scaled(family: str) -> None:
    """The residual projections are found by name above; here: every attention (self and cross)
    has its out_proj and every MLP its down projection among the scaled ones."""
    build, expected_std = FAMILIES[family]
    torch.manual_seed(0)
    model = build()
    modules = [name for name, _ in model.named_modules()]
    n_attention = sum(name.endswith("attn.out_proj") for name in modules)
    n_down = sum(name.endswith("ffn.down") for name in modules)
    scaled = [name for name, p in model.named_parameters() if p.dim() == 2 and expected_std(name, p) < 0.02]
    assert len(scaled) == n_attention + n_down
    for name in scaled:
        std = dict(model.named_parameters())[name].std().item()
        assert std < 0.02 / 2, f"{family}: {name} has std {std:.4f}, not the scaled one"
