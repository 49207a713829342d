"""Structured pruning in nn: slicing heads and units out of every family's modules equals masking
them with gates, keeping everything is the identity, grouped-query attention stays consistent,
a pruned model's KV cache decodes as its full forward, and gate gradients are the importance."""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from torch import nn

from tformer.models.bert import Bert, BertConfig
from tformer.models.edits import note_edit
from tformer.models.gpt import GPT, GPTConfig
from tformer.models.image_gen import ImageGenConfig, ImageGenerator
from tformer.models.record import model_from_record, record_of
from tformer.models.seq2seq import Seq2Seq, Seq2SeqConfig
from tformer.models.transformer_xl import TransformerXL, TransformerXLConfig
from tformer.models.vit import ViT, ViTConfig
from tformer.nn import MLP, KVCache, MultiHeadAttention, SwiGLU
from tformer.nn.pruning import gates, head_modules, magnitude, masks, replay, unit_modules
from tformer.nn.relative import RelativeMultiHeadAttention

D = 32
ids = lambda n, vocab=50, seed=0: torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))

FAMILIES: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor]]] = {
    "gpt": (lambda: GPT(GPTConfig(vocab_size=50, context_length=16, n_layers=2, n_heads=4, d_model=D)),
            lambda m: m(ids(10))),
    "gpt-llama-gqa": (lambda: GPT(GPTConfig(vocab_size=50, context_length=16, n_layers=2, n_heads=4, n_kv_heads=2,
                                            d_model=D, position="rope", norm="rmsnorm", activation="swiglu",
                                            bias=False, qk_norm=True)), lambda m: m(ids(10))),
    "gpt-alibi-mqa": (lambda: GPT(GPTConfig(vocab_size=50, context_length=16, n_layers=2, n_heads=4, n_kv_heads=1,
                                            d_model=D, position="alibi")), lambda m: m(ids(10))),
    "bert": (lambda: Bert(BertConfig(vocab_size=50, context_length=16, n_layers=2, n_heads=4, d_model=D,
                                     head="mlm")), lambda m: m(ids(10))),
    "vit": (lambda: ViT(ViTConfig(image_size=8, patch_size=4, channels=1, n_classes=3, d_model=D, n_layers=2,
                                  n_heads=4, d_ff=64)),
            lambda m: m(torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)))),
    "seq2seq": (lambda: Seq2Seq(Seq2SeqConfig(vocab_size=50, tgt_vocab_size=50, n_encoder_layers=2,
                                              n_decoder_layers=2, n_heads=4, d_model=D, context_length=16)),
                lambda m: m(ids(7), ids(6, seed=1))),
    "image_gen": (lambda: ImageGenerator(ImageGenConfig(height=4, width=4, n_encoder_layers=1, n_decoder_layers=2,
                                                        n_heads=4, d_model=D)),
                  lambda m: m(torch.tensor([[1], [2]]), ids(16, vocab=4))),
    "transformer_xl": (lambda: TransformerXL(TransformerXLConfig(vocab_size=50, n_layers=2, n_heads=4, d_model=D,
                                                                 d_ff=64, seg_len=8, mem_len=8)),
                       lambda m: m(ids(8))[0]),
}


def build(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family][0]().eval()
    with torch.no_grad():  # zero-initialised biases would hide a misaligned bias slice
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def some_kept(model: nn.Module, seed: int = 0) -> dict[str, list[int]]:
    """A random choice of heads (whole key/value groups under GQA; any under MQA) and units."""
    rng, keep = torch.Generator().manual_seed(seed), {}
    for name, m in head_modules(model).items():
        n_kv = getattr(m, "n_kv_heads", m.n_heads)
        group = m.n_heads // n_kv if 1 < n_kv < m.n_heads else 1
        units = sorted(torch.randperm(m.n_heads // group, generator=rng)[: max(1, m.n_heads // group // 2)].tolist())
        keep[name] = [u * group + j for u in units for j in range(group)]
    for name, m in unit_modules(model).items():
        keep[name] = sorted(torch.randperm(m.n_units, generator=rng)[: m.n_units // 3].tolist())
    return keep


def cut(model: nn.Module, keep: dict[str, list[int]]) -> nn.Module:
    for name, kept in keep.items():
        module = model.get_submodule(name)
        (module.keep_heads if hasattr(module, "keep_heads") else module.keep_units)(kept)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_everything_is_the_identity(family: str) -> None:
    model, run = build(family), FAMILIES[family][1]
    expected = run(model)
    keep = {name: list(range(m.n_heads)) for name, m in head_modules(model).items()}
    keep.update({name: list(range(m.n_units)) for name, m in unit_modules(model).items()})
    assert torch.equal(run(cut(model, keep)), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_equals_masked(family: str) -> None:
    model, run = build(family), FAMILIES[family][1]
    assert head_modules(model) and unit_modules(model)
    keep = some_kept(model)
    with torch.no_grad(), gates(model, masks(model, keep), requires_grad=False):
        masked = run(model)
    pruned = cut(copy.deepcopy(model), keep)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(run(pruned), masked, atol=1e-5, rtol=0)
        assert not torch.allclose(run(model), masked, atol=1e-3)  # the mask did change something


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_restores_the_shapes_and_the_outputs(family: str) -> None:
    model, run = build(family), FAMILIES[family][1]
    keep = some_kept(model, seed=1)
    cut(model, keep)
    spec = {name: ({"heads": m.n_heads, "kv_heads": getattr(m, "n_kv_heads", m.n_heads),
                    "head_ids": m.head_ids.tolist()} if name in head_modules(model) else {"units": m.n_units})
            for name, m in {**head_modules(model), **unit_modules(model)}.items()}
    note_edit(model, "prune", {"modules": spec})
    fresh = model_from_record(record_of(model)).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(run(fresh), run(model))


def test_grouped_query_attention_keeps_whole_groups_or_equal_numbers() -> None:
    attn = MultiHeadAttention(D, 8, 4)  # groups {0,1} {2,3} {4,5} {6,7}
    with pytest.raises(ValueError, match="same number of heads"):
        copy.deepcopy(attn).keep_heads([0, 1, 2])
    whole = copy.deepcopy(attn)
    whole.keep_heads([2, 3, 6, 7])
    assert (whole.n_heads, whole.n_kv_heads, whole.qkv_proj.out_features) == (4, 2, 4 * 4 + 2 * 2 * 4)
    per_group = copy.deepcopy(attn)
    per_group.keep_heads([0, 3, 5, 6])
    assert (per_group.n_heads, per_group.n_kv_heads) == (4, 4)
    x = torch.randn(2, 5, D)
    for keep, pruned in (([2, 3, 6, 7], whole), ([0, 3, 5, 6], per_group)):
        gate = torch.zeros(8)
        gate[keep] = 1.0
        with torch.no_grad(), gates(attn, {"": gate}, requires_grad=False):
            torch.testing.assert_close(pruned(x), attn(x), atol=1e-5, rtol=0)


def test_swiglu_keeps_gate_and_up_aligned() -> None:
    torch.manual_seed(0)
    ffn, x = SwiGLU(D, 12), torch.randn(3, D)
    kept = [1, 4, 5, 11]
    expected = torch.nn.functional.silu(x @ ffn.gate_up.weight[kept].T) * (x @ ffn.gate_up.weight[[12 + k for k in kept]].T)
    ffn.keep_units(kept)
    torch.testing.assert_close(ffn(x), expected @ ffn.down.weight.T)


@pytest.mark.parametrize("family", ["gpt-llama-gqa", "gpt-alibi-mqa", "gpt"])
def test_pruned_gpt_decodes_with_the_cache_as_its_full_forward(family: str) -> None:
    model = build(family)
    cut(model, some_kept(model, seed=2))
    prompt = ids(9)
    cache = model.new_cache(2, 12)
    assert isinstance(cache, KVCache)
    assert [layer.keys.shape[1] for layer in cache.layers] == [b.attn.n_kv_heads for b in model.blocks]
    with torch.no_grad():
        steps = [model(prompt[:, :6], cache=cache)] + [model(prompt[:, t:t + 1], cache=cache) for t in range(6, 9)]
        torch.testing.assert_close(torch.cat(steps, dim=1), model(prompt), atol=1e-5, rtol=0)


def test_pruned_seq2seq_decodes_with_the_cache_as_its_full_forward() -> None:
    model = build("seq2seq")
    keep = some_kept(model, seed=3)
    keep["decoder.0.attn"], keep["decoder.1.attn"] = [1], [0, 2, 3]  # layers with different head counts
    cut(model, keep)
    src, tgt = ids(7), ids(6, seed=1)
    decoder = model.bind(src)
    cache = decoder.new_cache(2, 8)
    assert [layer.keys.shape[1] for layer in cache.layers] == [1, 3]
    with torch.no_grad():
        steps = [decoder(tgt[:, :3], cache=cache)] + [decoder(tgt[:, t:t + 1], cache=cache) for t in range(3, 6)]
        torch.testing.assert_close(torch.cat(steps, dim=1), model(src, tgt), atol=1e-5, rtol=0)


def test_kv_cache_allocates_per_layer() -> None:
    cache = KVCache(3, 2, [4, 1, 2], 8, 5)
    assert [layer.keys.shape for layer in cache.layers] == [(2, h, 5, 8) for h in (4, 1, 2)]
    with pytest.raises(ValueError, match="one key/value head count per layer"):
        KVCache(3, 2, [4, 1], 8, 5)


def test_gate_gradients_are_the_importance_by_finite_differences() -> None:
    model = build("gpt").double()
    tokens = ids(10)

    def loss(values=None) -> torch.Tensor:
        logits = model(tokens[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 50), tokens[:, 1:].reshape(-1))

    with gates(model) as found:
        loss().backward()
        grads = {name: gate.grad.clone() for name, gate in found.items()}
    eps = 1e-6
    for name, index in (("blocks.1.attn", 2), ("blocks.0.ffn", 17)):
        values = {}
        for sign in (1, -1):
            gate = torch.ones(len(grads[name]), dtype=torch.float64)
            gate[index] += sign * eps
            with torch.no_grad(), gates(model, {name: gate}, requires_grad=False):
                values[sign] = loss().item()
        assert abs((values[1] - values[-1]) / (2 * eps) - grads[name][index].item()) < 1e-5


def test_head_gate_gradient_is_the_output_projection_input_times_its_gradient() -> None:
    """Michel et al. 2019, eq. 2: dL/dxi_h = sum over positions of <dL/dAtt_h, Att_h>."""
    model = build("bert")
    seen = {}
    out_proj = model.get_submodule("blocks.0.attn.out_proj")
    handle = out_proj.register_forward_pre_hook(lambda _, args: seen.update(x=args[0].retain_grad() or args[0]))
    with gates(model, heads=True, units=False) as found:
        model(ids(10)).logsumexp(-1).mean().backward()
    handle.remove()
    x = seen["x"]  # (B, T, H * D), already gated by ones: the same values
    explicit = (x.grad * x).unflatten(-1, (4, -1)).sum(dim=(0, 1, 3))
    torch.testing.assert_close(found["blocks.0.attn"].grad, explicit, atol=1e-6, rtol=1e-5)


def test_magnitude_is_the_norm_of_each_heads_and_units_own_weights() -> None:
    mlp, attn = MLP(D, 16, nn.GELU()), RelativeMultiHeadAttention(D, 4)
    expected = (mlp.up.weight.pow(2).sum(1) + mlp.down.weight.pow(2).sum(0)).sqrt()
    torch.testing.assert_close(magnitude(mlp), expected.detach())
    q, o = attn.q_proj.weight.view(4, 8, D), attn.out_proj.weight.view(D, 4, 8)
    expected = (q.pow(2).sum((1, 2)) + o.pow(2).sum((0, 2))).sqrt()
    torch.testing.assert_close(magnitude(attn), expected.detach())


def test_bad_keeps_and_records_are_one_line() -> None:
    attn, mlp = MultiHeadAttention(D, 4), MLP(D, 8, nn.ReLU())
    for call, match in ((lambda: attn.keep_heads([]), "at least one head"),
                        (lambda: attn.keep_heads([0, 4]), r"\[0, 4\)"),
                        (lambda: mlp.keep_units([1, 1]), "repeat")):
        with pytest.raises(ValueError, match=match) as error:
            call()
        assert "\n" not in str(error.value)
    model = build("gpt")
    with pytest.raises(ValueError):
        replay(model, {"modules": {"blocks.0.attn": {"heads": 6}}})
    with pytest.raises(ValueError):
        replay(model, {"modules": {"blocks.0.ffn": {"units": 0}}})
    with pytest.raises(AttributeError):
        replay(model, {"modules": {"blocks.9.attn": {"heads": 1}}})
    with pytest.raises(KeyError):
        replay(model, {})
