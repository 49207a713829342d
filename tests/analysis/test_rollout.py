"""Attention rollout and gradient-weighted rollout: hand-computed cases, and equality with a
plain autograd reference on the eager backend's own attention weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor, nn

from tformer.analysis.rollout import explain_classifier, explain_generation, gradient_rollout, rollout
from tformer.models.bert import Bert, BertConfig
from tformer.models.gpt import GPT, GPTConfig
from tformer.models.seq2seq import Seq2Seq, Seq2SeqConfig
from tformer.models.vit import ViT, ViTConfig, normalise
from tformer.nn.attend import eager_attention
from tformer.nn.attention import MultiHeadAttention

B, T = 2, 7


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def bert(backend: str = "sdpa", pooling: str = "cls") -> Bert:
    torch.manual_seed(0)
    return Bert(BertConfig(vocab_size=50, context_length=16, n_layers=3, n_heads=2, d_model=16, dropout=0.0,
                           attn_dropout=0.0, head="sequence", labels=("neg", "pos", "mixed"),
                           pooling=pooling, attn_backend=backend)).eval()


def gpt(backend: str = "sdpa") -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=40, context_length=16, n_layers=3, n_heads=4, n_kv_heads=2, d_model=32,
                         position="rope", dropout=0.0, attn_backend=backend)).eval()


def vit(backend: str = "sdpa") -> ViT:
    torch.manual_seed(0)
    return ViT(ViTConfig(image_size=8, patch_size=4, channels=3, n_classes=3, d_model=32, n_layers=2,
                         n_heads=4, dropout=0.0, attn_backend=backend)).eval()


def same_weights(model: nn.Module, build, backend: str) -> nn.Module:
    other = build(backend)
    other.load_state_dict(model.state_dict())
    return other


def text() -> tuple[Tensor, Tensor]:
    ids = torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0
    return ids, mask


def images() -> Tensor:
    return torch.rand(B, 3, 8, 8, generator=torch.Generator().manual_seed(2))


# -- hand-computed cases -------------------------------------------------------------------------

def test_rollout_of_a_hand_built_case():
    """Layer 1 heads [[1,0],[1,0]] and [[1,0],[0,1]] average to [[1,0],[.5,.5]]; + I, rows
    renormalised: [[1,0],[.25,.75]]. Layer 2 [[.5,.5],[0,1]] -> [[.75,.25],[0,1]]. Product:
    [[.75 + .25 * .25, .25 * .75], [.25, .75]]."""
    layer1 = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])
    layer2 = torch.tensor([[[0.5, 0.5], [0.0, 1.0]]] * 2)
    attention = torch.stack([layer1, layer2]).unsqueeze(1)  # (L=2, B=1, H=2, 2, 2)
    expected = torch.tensor([[[0.8125, 0.1875], [0.25, 0.75]]])
    torch.testing.assert_close(rollout(attention), expected, atol=1e-7, rtol=0)


def test_gradient_rollout_of_a_hand_built_case():
    """grad * A = [[1,0],[1,-1]] -> relu -> [[1,0],[1,0]]; R = I + that @ I; a second layer
    with zero gradient adds nothing."""
    a = torch.tensor([[1.0, 0.0], [0.5, 0.5]]).view(1, 1, 1, 2, 2)
    grad = torch.tensor([[1.0, -1.0], [2.0, -2.0]]).view(1, 1, 1, 2, 2)
    attention, gradients = torch.cat([a, a]), torch.cat([grad, torch.zeros_like(grad)])
    expected = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]])
    torch.testing.assert_close(gradient_rollout(attention, gradients), expected, atol=0, rtol=0)


# -- the autograd reference ----------------------------------------------------------------------

@contextmanager
def eager_weights_in_graph(model: nn.Module) -> Iterator[list[Tensor]]:
    """Each layer's eager softmax weights, kept in the autograd graph, in call order."""
    weights: list[Tensor] = []

    def attend(q, k, v, mask=None, **kwargs):
        out, w = eager_attention(q, k, v, mask, **kwargs)
        weights.append(w)
        return out

    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.attend = attend
    yield weights


def reference_relevance(model: nn.Module, score_of) -> Tensor:
    """Chefer et al. written out: R = I; R += mean_h(relu(dS/dA * A)) @ R per layer, with dS/dA
    from autograd on the eager backend's weights."""
    with eager_weights_in_graph(model) as weights:
        score = score_of(model)
    grads = torch.autograd.grad(score.sum(), weights)
    n = weights[0].shape[-1]
    relevance = torch.eye(n).expand(weights[0].shape[0], n, n)
    for a, g in zip(weights, grads):
        relevance = relevance + (g * a).clamp(min=0).mean(1) @ relevance
    return relevance.detach()


@pytest.mark.parametrize("backend", ["sdpa", "flex", "eager"])
def test_gradient_relevance_of_a_text_classifier_equals_autograd(backend):
    model = bert(backend)
    ids, mask = text()
    got = explain_classifier(model, ids, mask, target="mixed")
    eager = same_weights(model, bert, "eager")
    expected = reference_relevance(eager, lambda m: m.classify(ids, mask)[:, 2])
    torch.testing.assert_close(got.matrix, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.scores, expected[:, 0])
    assert got.target.tolist() == [2, 2] and got.scores.shape == (B, T)


def test_gradient_relevance_of_patches_equals_autograd():
    model = vit()
    pixels = images()
    got = explain_classifier(model, pixels)
    eager = same_weights(model, vit, "eager")
    predicted = eager.classify(pixels).argmax(-1)
    expected = reference_relevance(eager, lambda m: m.classify(pixels).gather(-1, predicted[:, None]))
    torch.testing.assert_close(got.matrix, expected, atol=1e-6, rtol=1e-5)
    assert got.scores.shape == (B, 4)  # a 2 x 2 grid of patches, [CLS] left out
    torch.testing.assert_close(got.scores, expected[:, 0, 1:])
    assert got.target.tolist() == predicted.tolist()


def test_gradient_relevance_of_a_generated_token_equals_autograd():
    model = gpt()  # RoPE, grouped-query heads
    ids = torch.randint(0, 40, (B, T), generator=torch.Generator().manual_seed(3))
    got = explain_generation(model, ids, position=5)
    eager = same_weights(model, gpt, "eager")
    expected = reference_relevance(eager, lambda m: m(ids)[:, 4].gather(-1, ids[:, 5:6]))
    torch.testing.assert_close(got.matrix, expected, atol=1e-6, rtol=1e-5)
    assert got.scores.shape == (B, 5)  # the five tokens before the explained one
    torch.testing.assert_close(got.scores, expected[:, 4, :5])
    assert got.target.tolist() == ids[:, 5].tolist()


def test_left_padding_gets_no_relevance_in_generation():
    ids = torch.randint(0, 40, (B, T), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :2] = 0
    for method in ("gradient", "rollout"):
        got = explain_generation(gpt(), ids, attention_mask=mask, method=method)
        assert got.scores.shape == (B, T - 1)
        assert got.scores[1, :2].abs().max() == 0, method


# -- properties ----------------------------------------------------------------------------------

def test_rollout_rows_sum_to_one_and_padding_is_irrelevant():
    ids, mask = text()
    got = explain_classifier(bert(), ids, mask, method="rollout")
    torch.testing.assert_close(got.matrix.sum(-1), torch.ones(B, T))
    assert got.scores[1, 5:].abs().max() == 0
    assert got.method == "rollout" and got.scores.shape == (B, T)


def test_rollout_equals_the_hand_formula_on_the_models_own_maps():
    from tformer.analysis import attention_maps

    model = vit()
    maps = attention_maps(model.classify, images()).stack("self")  # (L, B, H, N, N)
    expected = torch.eye(maps.shape[-1]).expand(B, -1, -1)
    for layer in maps:
        mixed = layer.mean(1) + torch.eye(maps.shape[-1])
        expected = (mixed / mixed.sum(-1, keepdim=True)) @ expected
    got = explain_classifier(model, images(), method="rollout")
    torch.testing.assert_close(got.matrix, expected)


def test_mean_pooling_reads_the_mean_of_the_real_tokens_rows():
    ids, mask = text()
    got = explain_classifier(bert(pooling="mean"), ids, mask)
    expected = (got.matrix[1, :5]).mean(0)
    torch.testing.assert_close(got.scores[1], expected)


@pytest.mark.parametrize("method", ["gradient", "rollout"])
def test_relevance_is_deterministic(method):
    ids, mask = text()
    first = explain_classifier(bert(), ids, mask, method=method)
    second = explain_classifier(bert(), ids, mask, method=method)
    assert torch.equal(first.matrix, second.matrix) and torch.equal(first.scores, second.scores)


def test_no_gradient_is_left_on_the_parameters():
    model = bert()
    explain_classifier(model, *text())
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# -- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda: explain_classifier(bert(), *text(), target=3),
     "class 3 is out of range: the model has classes 0..2"),
    (lambda: explain_classifier(bert(), *text(), target="joy"),
     "unknown class 'joy'; the model's classes are ('neg', 'pos', 'mixed')"),
    (lambda: explain_classifier(bert(), *text(), method="lrp"),
     "unknown rollout method 'lrp'; choose one of ('gradient', 'rollout')"),
    (lambda: explain_generation(gpt(), torch.zeros(1, 4, dtype=torch.long), position=4),
     "position 4 is out of range: explain a token at 1..3 (or -3..-1); the first token has no context"),
    (lambda: explain_classifier(gpt(), torch.zeros(1, 4, dtype=torch.long)),
     "GPT is not a classifier (it can: causal_lm)"),
])
def test_bad_input_is_one_line(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert str(error.value) == message


def test_an_encoder_decoder_is_refused_in_one_line():
    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig(vocab_size=20, context_length=8, n_encoder_layers=1, n_decoder_layers=1,
                                  n_heads=2, d_model=16, dropout=0.0)).eval()
    bound = model.bind(torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"one self-attention stack .* kinds are \('encoder', 'decoder', 'cross'\)"):
        explain_generation(bound, torch.ones(1, 3, dtype=torch.long))


def test_the_image_classifier_normalises_as_in_training():
    """explain_classifier goes through classify, which normalises [0, 1] pixels itself."""
    model = vit()
    torch.testing.assert_close(model.classify(images()), model(normalise(images())))
