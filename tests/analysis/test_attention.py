"""Attention maps from any backend equal the eager backend's own softmax weights.

The oracle is the eager path itself: each attention's `attend` is replaced (in the test only) by
`nn.attend.eager_attention`, which returns the weights it multiplies the values by; Transformer-XL's
`relative_attention` gets the same through the backend lookup it makes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tformer.analysis import attention_maps, attention_sites
from tformer.analysis.attention import capture_attention
from tformer.models.bert import Bert, BertConfig
from tformer.models.gpt import GPT, GPTConfig
from tformer.models.image_gen import ImageGenConfig, ImageGenerator
from tformer.models.record import model_record
from tformer.models.seq2seq import Seq2Seq, Seq2SeqConfig
from tformer.models.transformer_xl import TransformerXL, TransformerXLConfig
from tformer.models.vit import ViT, ViTConfig
from tformer.nn import relative
from tformer.nn.attend import eager_attention
from tformer.nn.attention import MultiHeadAttention
from tformer.nn.relative import RelativeMultiHeadAttention
from tformer.runs import checkpoint, open_run

BACKENDS = ("sdpa", pytest.param("flex", marks=pytest.mark.slow), "eager")  # flex compiles kernels
B, T = 2, 6


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@contextmanager
def eager_weights(model: nn.Module) -> Iterator[dict[nn.Module, Tensor]]:
    """Every attention's softmax weights as the eager backend computes them, by module."""
    weights: dict[nn.Module, Tensor] = {}
    current: list[nn.Module] = []

    def recording(module: nn.Module | None) -> Callable:
        def attend(q, k, v, mask=None, **kwargs):
            out, w = eager_attention(q, k, v, mask, **kwargs)
            weights[module or current[-1]] = w.detach()
            return out
        return attend

    handles = []
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            assert module.backend == "eager"
            module.attend = recording(module)
        elif isinstance(module, RelativeMultiHeadAttention):
            handles.append(module.register_forward_pre_hook(lambda m, args: current.append(m)))
    original = relative.get_backend
    relative.get_backend = lambda name: recording(None)
    try:
        yield weights
    finally:
        relative.get_backend = original
        for handle in handles:
            handle.remove()


def left_padded(n_pad: int = 2) -> Tensor:
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :n_pad] = 0
    return mask


def gpt(backend: str, **overrides: Any) -> GPT:
    torch.manual_seed(0)
    values = {"vocab_size": 40, "context_length": 16, "n_layers": 2, "n_heads": 4, "d_model": 32,
              "dropout": 0.0}
    return GPT(GPTConfig(**{**values, **overrides, "attn_backend": backend})).eval()


def run_gpt(model: GPT, call: Callable) -> Any:
    ids = torch.randint(0, 40, (B, T), generator=torch.Generator().manual_seed(1))
    return call(model, ids, attention_mask=left_padded())


def run_gpt_cached(model: GPT, call: Callable) -> Any:
    """A prompt into a KV cache, then one new token: queries at offset T, keys are cache slots."""
    ids = torch.randint(0, 40, (B, T + 1), generator=torch.Generator().manual_seed(2))
    mask = torch.cat([left_padded(), torch.ones(B, 1, dtype=torch.long)], 1)
    cache = model.new_cache(B, 10)
    model(ids[:, :T], attention_mask=mask[:, :T], cache=cache)
    return call(model, ids[:, T:], attention_mask=mask[:, T:], cache=cache)


def bert(backend: str) -> Bert:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, context_length=16, n_layers=2, n_heads=2, d_model=16, dropout=0.0,
                        attn_dropout=0.0, head="sequence", labels=("no", "yes"), attn_backend=backend)
    return Bert(config).eval()


def run_bert(model: Bert, call: Callable) -> Any:
    ids = torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 4:] = 0
    return call(model.classify, ids, mask)


def vit(backend: str) -> ViT:
    torch.manual_seed(0)
    return ViT(ViTConfig(image_size=8, patch_size=4, channels=3, n_classes=3, d_model=32, n_layers=2,
                         n_heads=4, dropout=0.0, attn_backend=backend)).eval()


def run_vit(model: ViT, call: Callable) -> Any:
    return call(model.classify, torch.rand(B, 3, 8, 8, generator=torch.Generator().manual_seed(4)))


def txl(backend: str) -> TransformerXL:
    torch.manual_seed(0)
    return TransformerXL(TransformerXLConfig(vocab_size=30, n_layers=2, n_heads=2, d_model=16, d_ff=32,
                                             seg_len=4, mem_len=5, dropout=0.0,
                                             attn_backend=backend)).eval()


def run_txl(model: TransformerXL, call: Callable) -> Any:
    """A second segment over a memory of 5 positions (3 from the first segment's 7, clipped)."""
    ids = torch.randint(0, 30, (B, 7 + 4), generator=torch.Generator().manual_seed(5))
    memory = model(ids[:, :7]).memory
    return call(model, ids[:, 7:], memory)


def seq2seq(backend: str) -> Seq2Seq:
    torch.manual_seed(0)
    return Seq2Seq(Seq2SeqConfig(vocab_size=30, context_length=16, n_encoder_layers=2, n_decoder_layers=3,
                                 n_heads=4, d_model=32, d_ff=64, dropout=0.0, attn_backend=backend)).eval()


def run_seq2seq(model: Seq2Seq, call: Callable) -> Any:
    g = torch.Generator().manual_seed(6)
    src, tgt = torch.randint(3, 30, (B, 7), generator=g), torch.randint(3, 30, (B, 5), generator=g)
    src_mask, tgt_mask = torch.ones(B, 7, dtype=torch.long), torch.ones(B, 5, dtype=torch.long)
    src_mask[1, 5:], tgt_mask[0, 3:] = 0, 0
    return call(model, src, tgt, src_mask=src_mask, tgt_mask=tgt_mask)


def image_gen(backend: str) -> ImageGenerator:
    torch.manual_seed(0)
    return ImageGenerator(ImageGenConfig(height=3, width=4, palette=(0.0, 128.0, 255.0), condition="text",
                                         labels=("a", "b"), condition_vocab=7, condition_length=4,
                                         d_model=32, n_heads=4, attn_backend=backend)).eval()


def run_image_gen(model: ImageGenerator, call: Callable) -> Any:
    g = torch.Generator().manual_seed(7)
    cond, tokens = torch.randint(1, 7, (B, 4), generator=g), torch.randint(0, 3, (B, 12), generator=g)
    cond_mask = torch.ones(B, 4, dtype=torch.long)
    cond_mask[0, 2:] = 0
    return call(model, cond, tokens, cond_mask=cond_mask)


CASES: dict[str, tuple[Callable, Callable]] = {
    "gpt-padded": (gpt, run_gpt),
    "gpt-sliding-window": (lambda b: gpt(b, attn_pattern="sliding_window",
                                         attn_pattern_params={"window": 3}), run_gpt),
    "gpt-alibi": (lambda b: gpt(b, position="alibi"), run_gpt),
    "gpt-rope-grouped-query": (lambda b: gpt(b, position="rope", n_kv_heads=2, qk_norm=True), run_gpt),
    "gpt-kv-cache-sliding-window": (lambda b: gpt(b, attn_pattern="sliding_window",
                                                  attn_pattern_params={"window": 4}), run_gpt_cached),
    "bert-padded": (bert, run_bert),
    "vit": (vit, run_vit),
    "transformer-xl-memory": (txl, run_txl),
    "seq2seq-padded": (seq2seq, run_seq2seq),
    "image-gen-text": (image_gen, run_image_gen),
}


def plain(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    with torch.no_grad():
        return fn(*args, **kwargs)


def with_backend(model: nn.Module, backend: str, build: Callable) -> nn.Module:
    """A model of the same weights on another backend."""
    other = build(backend)
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_maps_equal_the_eager_backends_weights(case, backend):
    build, run = CASES[case]
    model = build(backend)
    eager = with_backend(model, "eager", build)
    with eager_weights(eager) as expected:
        run(eager, plain)
    maps = run(model, attention_maps)
    sites = attention_sites(eager)
    assert set(maps) == {(kind, layer) for kind, modules in sites.items() for layer in range(len(modules))}
    for (kind, layer), probs in maps.items():
        want = expected[sites[kind][layer]].float()
        assert probs.shape == want.shape
        assert (probs - want).abs().max() <= 1e-6, (kind, layer)


def test_the_kinds_of_every_family():
    assert list(attention_sites(gpt("sdpa"))) == ["self"]
    assert list(attention_sites(txl("sdpa"))) == ["self"]
    sites = attention_sites(seq2seq("sdpa"))
    assert {kind: len(modules) for kind, modules in sites.items()} == {"encoder": 2, "decoder": 3, "cross": 3}


def test_chosen_layers_and_heads_are_slices_of_the_full_maps():
    model = gpt("sdpa", position="rope", n_kv_heads=2)
    full = run_gpt(model, attention_maps)
    some = run_gpt(model, lambda *a, **k: attention_maps(*a, layers=[1], heads=[3, 0], **k))
    assert set(some) == {("self", 1)} and some.heads == (3, 0)
    torch.testing.assert_close(some["self", 1], full["self", 1][:, [3, 0]], atol=1e-7, rtol=0)
    torch.testing.assert_close(full.output, run_gpt(model, plain))  # the forward's own result


def test_positions_follow_the_cache_and_the_memory():
    maps = run_gpt_cached(gpt("sdpa"), attention_maps)
    assert maps.query_positions["self", 0].tolist() == [T]
    assert maps.key_positions["self", 0].tolist() == list(range(10))
    assert maps["self", 0][..., T + 1:].abs().max() == 0  # unwritten slots get no weight
    maps = run_txl(txl("sdpa"), attention_maps)
    assert maps.query_positions["self", 1].tolist() == [5, 6, 7, 8]  # behind 5 memory positions
    assert maps["self", 1].shape == (B, 2, 4, 9)


def test_rows_sum_to_one_and_padding_gets_no_weight():
    maps = run_bert(bert("sdpa"), attention_maps)
    probs = maps["self", 1]  # (B, H, T, T)
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, 2, T))
    assert probs[0, :, :, 4:].abs().max() == 0


def test_a_run_opened_from_disk(tmp_path):
    model = seq2seq("sdpa")
    checkpoint.save(tmp_path / "checkpoints" / "best", model, progress={"step": 1},
                    config={**model_record(model.config), "has_tokenizer": False})
    opened = open_run(tmp_path).model
    maps = run_seq2seq(opened, lambda *a, **k: attention_maps(*a, kinds=["cross"], **k))
    expected = run_seq2seq(model, lambda *a, **k: attention_maps(*a, kinds=["cross"], **k))
    assert set(maps) == {("cross", 0), ("cross", 1), ("cross", 2)}
    torch.testing.assert_close(maps["cross", 2], expected["cross", 2], atol=0, rtol=0)
    assert maps["cross", 2].shape == (B, 4, 5, 7)  # target x source: an alignment


def test_capture_reads_any_call_and_takes_its_hooks_away():
    model = bert("sdpa")
    ids = torch.randint(0, 50, (1, 5))
    with torch.no_grad(), capture_attention(model, layers=[0]) as maps:
        model.encode(ids)
    assert set(maps) == {("self", 0)}
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("build, kwargs, message", [
    (gpt, {"layers": [2]}, "layer 2 is out of range: self attention has layers 0..1"),
    (gpt, {"heads": [4]}, "head 4 is out of range: the attention has heads 0..3"),
    (gpt, {"kinds": ["cross"]}, "this model has no cross-attention; its attention kinds are ('self',)"),
    (seq2seq, {"kinds": ["encoder"], "layers": [2]}, "layer 2 is out of range: encoder attention has layers 0..1"),
])
def test_bad_choices_are_one_line_naming_the_valid_range(build, kwargs, message):
    model = build("sdpa")
    with pytest.raises(ValueError) as error:
        attention_maps(model, torch.zeros(1, 3, dtype=torch.long), **kwargs)
    assert str(error.value) == message


def test_a_module_without_attention_is_one_line():
    with pytest.raises(ValueError, match="Linear has no attention layers"):
        attention_maps(nn.Linear(2, 2), torch.zeros(1, 2))


def test_the_config_is_left_as_it_was():
    model = gpt("sdpa")
    config = dataclasses.replace(model.config)
    run_gpt(model, attention_maps)
    assert model.config == config and all(m.backend == "sdpa" for m in model.modules()
                                          if isinstance(m, MultiHeadAttention))
