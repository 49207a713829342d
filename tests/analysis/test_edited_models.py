"""Analysis on edited models (issue 15): attention maps of pruned layers equal the model's own
eager weights (ALiBi slopes at the kept heads' original indices; layers with different numbers of
heads each captured whole), rollout and gradient rollout average each layer's own heads, a
request a layer cannot honour is one line, and OOD finds a quantized or LoRA-adapted head."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from tformer.analysis import attention_maps
from tformer.analysis.explain import Options, _views
from tformer.analysis.ood import find_feature_layer, fit, forward
from tformer.analysis.rollout import explain_classifier, explain_generation
from tformer.compress.prune import prune
from tformer.models import build_model
from tformer.models.bert import Bert, BertConfig
from tformer.models.gpt import GPT, GPTConfig
from tformer.nn.attend import eager_attention
from tformer.nn.attention import MultiHeadAttention
from tformer.nn.lora import LoRALinear
from tformer.nn.quantized import SCHEMES, QuantizedLinear

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

B, T = 2, 7


@contextmanager
def eager_weights(model: nn.Module) -> Iterator[list[Tensor]]:
    """Each attention's softmax weights as the eager backend computes them from what the model
    passes it (its own head bias), in call order, kept in the autograd graph."""
    weights: list[Tensor] = []

    def attend(q, k, v, mask=None, **kwargs):
        out, w = eager_attention(q, k, v, mask, **kwargs)
        weights.append(w)
        return out

    modules = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    originals = [m.attend for m in modules]
    for module in modules:
        module.attend = attend
    try:
        yield weights
    finally:
        for module, original in zip(modules, originals):
            module.attend = original


def alibi_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=40, context_length=16, n_layers=2, n_heads=4, d_model=32,
                         position="alibi", dropout=0.0)).eval()


def uneven_bert() -> Bert:
    """Global-scope pruning leaves the layers different numbers of heads."""
    torch.manual_seed(0)
    model = Bert(BertConfig(vocab_size=50, context_length=16, n_layers=3, n_heads=4, d_model=32, dropout=0.0,
                            attn_dropout=0.0, head="sequence", labels=("neg", "pos"))).eval()
    with torch.no_grad():  # make the layers' heads unequally strong, so the global ranking prunes unevenly
        for i, block in enumerate(model.blocks):
            block.attn.qkv_proj.weight.mul_(1.0 + i)
    prune(model, heads=0.5, importance="magnitude", scope="global")
    counts = [block.attn.n_heads for block in model.blocks]
    assert len(set(counts)) > 1, counts
    return model


def text() -> tuple[Tensor, Tensor]:
    ids = torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 5:] = 0
    return ids, mask


# -- pruned ALiBi: the kept heads keep their slopes -------------------------------------------------
def test_maps_of_a_pruned_alibi_model_equal_its_own_attention():
    model = alibi_gpt()
    model.blocks[0].attn.keep_heads([2, 3])  # layer 0 keeps heads 2 and 3: slopes 2 and 3, not 0 and 1
    ids = torch.randint(0, 40, (B, T), generator=torch.Generator().manual_seed(2))
    maps = attention_maps(model, ids)
    with torch.no_grad(), eager_weights(model) as expected:
        model(ids)
    for layer, weights in enumerate(expected):
        torch.testing.assert_close(maps["self", layer], weights.float(), atol=1e-6, rtol=1e-5)
    assert maps.head_ids == {("self", 0): (0, 1), ("self", 1): (0, 1, 2, 3)}
    some = attention_maps(model, ids, heads=[1])  # the second kept head: original head 3
    torch.testing.assert_close(some["self", 0], expected[0][:, 1:2].float(), atol=1e-6, rtol=1e-5)


# -- layers with different numbers of heads ----------------------------------------------------------
def test_each_layer_is_captured_with_its_own_heads(one_line_error):
    model = uneven_bert()
    ids, mask = text()
    maps = attention_maps(model.classify, ids, mask)
    with torch.no_grad(), eager_weights(model) as expected:
        model.classify(ids, mask)
    for layer, (block, weights) in enumerate(zip(model.blocks, expected)):
        assert maps.head_ids["self", layer] == tuple(range(block.attn.n_heads))
        torch.testing.assert_close(maps["self", layer], weights.float(), atol=1e-6, rtol=1e-5)
    assert [m.shape[1] for m in maps.layers("self")] == [b.attn.n_heads for b in model.blocks]
    assert "different numbers of heads" in one_line_error(lambda: maps.stack("self"))
    assert "different heads" in one_line_error(lambda: maps.heads)
    fewest = min(b.attn.n_heads for b in model.blocks)
    message = one_line_error(lambda: attention_maps(model.classify, ids, mask, heads=[fewest]))
    assert f"head {fewest} is out of range" in message and "pruned" in message
    shared = attention_maps(model.classify, ids, mask, heads=[0])  # a head every layer has: stacks
    assert shared.heads == (0,) and shared.stack("self").shape == (3, B, 1, T, T)


def reference_relevance(model: nn.Module, score_of) -> Tensor:
    """Chefer et al. written out with autograd on the eager weights, each layer's own heads averaged."""
    with eager_weights(model) as weights:
        score = score_of(model)
    grads = torch.autograd.grad(score.sum(), weights)
    relevance = torch.eye(T).expand(B, T, T)
    for a, g in zip(weights, grads):
        relevance = relevance + (g * a).clamp(min=0).mean(1) @ relevance
    return relevance.detach()


def test_gradient_rollout_of_unevenly_pruned_layers_equals_autograd():
    model = uneven_bert()
    ids, mask = text()
    got = explain_classifier(model, ids, mask, target="pos")
    expected = reference_relevance(model, lambda m: m.classify(ids, mask)[:, 1])
    torch.testing.assert_close(got.matrix, expected, atol=1e-6, rtol=1e-5)


def test_rollout_of_unevenly_pruned_layers_averages_each_layers_heads():
    model = uneven_bert()
    ids, mask = text()
    maps = attention_maps(model.classify, ids, mask)
    relevance = torch.eye(T).expand(B, T, T)
    for layer in range(3):
        mixed = maps["self", layer].mean(1) + torch.eye(T)
        relevance = (mixed / mixed.sum(-1, keepdim=True)) @ relevance
    got = explain_classifier(model, ids, mask, method="rollout")
    torch.testing.assert_close(got.matrix, relevance, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.matrix.sum(-1), torch.ones(B, T))


def test_generation_on_a_pruned_alibi_model_is_explained_both_ways():
    model = alibi_gpt()
    model.blocks[0].attn.keep_heads([2, 3])
    ids = torch.randint(0, 40, (1, T), generator=torch.Generator().manual_seed(3))
    for method in ("rollout", "gradient"):
        assert explain_generation(model, ids, method=method).scores.shape == (1, T - 1)


def test_the_explain_views_show_uneven_layers_as_the_mean_of_their_heads():
    model = uneven_bert()
    ids = text()[0][:1]
    labels = [str(i) for i in range(T)]
    [view] = _views(model.classify, (ids,), {}, Options(), {"*": (labels, labels)})
    assert view.maps.shape == (3, 1, T, T) and view.heads == ["mean"] and "different numbers of heads" in view.note
    maps = attention_maps(model.classify, ids)
    np.testing.assert_allclose(view.maps[2, 0], maps["self", 2][0].mean(0).numpy(), atol=1e-7)
    [picked] = _views(model.classify, (ids,), {}, Options(heads=[0]), {"*": (labels, labels)})
    assert picked.maps.shape == (3, 1, T, T) and picked.heads == [0] and picked.note is None


# -- OOD: the head found by what it does, whatever its class --------------------------------------
def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return build_model("vit-digits", n_layers=1, d_model=16, n_heads=2, d_ff=32, n_classes=3).eval()


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


def quantized_head(model: nn.Module) -> nn.Module:
    model.head = QuantizedLinear.from_linear(model.head, SCHEMES[-1])
    return model


def lora_head(model: nn.Module) -> nn.Module:
    model.head = LoRALinear(model.head, r=2, alpha=4)
    with torch.no_grad():
        model.head.lora_B.normal_()  # a trained adapter: the logits are no longer the base layer's
    return model


@pytest.mark.parametrize("edit", [quantized_head, lora_head], ids=["quantized", "lora"])
def test_ood_finds_an_edited_head_and_reads_its_input(edit):
    model = edit(tiny_vit())
    assert not isinstance(model.head, nn.Linear)
    pixels = torch.from_numpy(images(4, 0)).permute(0, 3, 1, 2).float() / 255.0
    assert find_feature_layer(model, (pixels, None)) == "head"
    read: list[Tensor] = []
    hook = model.head.register_forward_pre_hook(lambda _m, args: read.append(args[0]))
    with torch.no_grad():
        logits = model.classify(pixels)
    hook.remove()
    outputs = forward(model, [(pixels[:3], None), (pixels[3:], None)], "head")
    np.testing.assert_allclose(outputs.features, read[0].double().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(outputs.logits, logits.double().numpy(), rtol=1e-6, atol=1e-6)
    detector = fit(model, images(12, 1), labels=np.arange(12) % 3, k=3, batch_size=5)
    scores = detector.score(images(4, 2))
    assert all(np.isfinite(s).all() and s.shape == (4,) for s in scores.values())
