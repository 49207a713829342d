"""tformer's BERT: a post-norm block equals PyTorch's TransformerEncoderLayer, padding changes
nothing at real tokens, backends agree, heads have the right shapes, the MLM decoder is tied,
and it learns one batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tformer.config import ConfigError
from tformer.models import PRESETS, build_model, get_config
from tformer.models.bert import Bert, BertConfig, build_block, mean_pool
from tformer.nn import AttentionInputs

TINY = dict(vocab_size=50, context_length=16, n_layers=2, n_heads=2, d_model=16, dropout=0.0,
            attn_dropout=0.0)


def tiny(**overrides) -> Bert:
    torch.manual_seed(0)
    return Bert(BertConfig(**{**TINY, **overrides})).eval()


def test_post_norm_block_matches_torch_encoder_layer() -> None:
    config = BertConfig(**TINY)
    torch.manual_seed(0)
    block = build_block(config).eval()
    ref = nn.TransformerEncoderLayer(16, 2, 64, dropout=0.0, activation="gelu", batch_first=True,
                                     norm_first=False, layer_norm_eps=config.norm_eps).eval()
    with torch.no_grad():  # same [q | k | v] layout as PyTorch's in_proj
        ref.self_attn.in_proj_weight.copy_(block.attn.qkv_proj.weight)
        ref.self_attn.in_proj_bias.copy_(block.attn.qkv_proj.bias)
        for ours, theirs in [(block.attn.out_proj, ref.self_attn.out_proj), (block.ffn.up, ref.linear1),
                             (block.ffn.down, ref.linear2), (block.attn_norm, ref.norm1),
                             (block.ffn_norm, ref.norm2)]:
            theirs.weight.copy_(ours.weight + 0.01 * torch.randn_like(ours.weight))
            theirs.bias.copy_(torch.randn_like(ours.bias) * 0.1)
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
    x = torch.randn(3, 7, 16)
    valid = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5]).bool()
    from tformer.nn import key_padding

    ours = block(x, AttentionInputs(key_padding(valid)))
    theirs = ref(x, src_key_padding_mask=~valid)
    assert torch.allclose(ours[valid], theirs[valid], atol=1e-5)


def test_padding_does_not_change_real_tokens() -> None:
    model = tiny(head="sequence", labels=("a", "b"), pooling="mean")
    ids = torch.randint(5, 50, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 4])
    alone = model.encode(ids)
    with_pad = model.encode(padded, attention_mask=mask)
    assert torch.allclose(alone, with_pad[:, :6], atol=1e-5)
    assert torch.allclose(model(ids), model(padded, attention_mask=mask), atol=1e-5)


def test_backends_agree_with_padding() -> None:
    ids = torch.randint(5, 50, (2, 9))
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    outs = []
    for backend in ("sdpa", "eager"):
        outs.append(tiny(attn_backend=backend).encode(ids, attention_mask=mask))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_heads_shapes_and_tied_decoder() -> None:
    ids = torch.randint(5, 50, (2, 8))
    mlm = tiny(head="mlm")
    assert mlm.head.decoder.weight is mlm.tok_emb.weight
    assert mlm(ids).shape == (2, 8, 50)
    at = torch.zeros(2, 8, dtype=torch.bool)
    at[0, 1] = at[1, 3] = at[1, 5] = True
    assert torch.allclose(mlm(ids, predict_at=at), mlm(ids)[at], atol=1e-6)
    assert tiny(head="sequence", labels=("x", "y", "z"))(ids).shape == (2, 3)
    assert tiny(head="token", labels=("O", "B", "I"))(ids).shape == (2, 8, 3)
    assert tiny()(ids).shape == (2, 8, 16)
    untied = tiny(head="mlm", tie_embeddings=False)
    assert untied.head.decoder.weight is not untied.tok_emb.weight


def test_token_types_change_the_output() -> None:
    model = tiny()
    ids = torch.randint(5, 50, (1, 6))
    types = torch.tensor([[0, 0, 0, 1, 1, 1]])
    assert not torch.allclose(model.encode(ids), model.encode(ids, token_type_ids=types))


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert mean_pool(hidden, torch.tensor([[True, True, False]])).item() == 2.0


def test_registry_presets_and_bert_base_size() -> None:
    assert {"bert-tiny", "bert-base", "minilm-l6"} <= set(PRESETS)
    with torch.device("meta"):
        base = build_model("bert-base", head="mlm")
    assert base.num_parameters() == 109_514_298  # transformers' BertForMaskedLM(bert-base)
    assert get_config("minilm-l6").d_model == 384


@pytest.mark.parametrize("overrides, words", [
    (dict(head="sequence"), "at least 2 labels"), (dict(head="token", labels=("a", "a")), "distinct"),
    (dict(pooling="max"), "pooling"), (dict(d_model=15), "divisible"), (dict(head="nsp"), "head")])
def test_bad_configs_are_refused(overrides: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        BertConfig(**{**TINY, **overrides})


def test_bad_inputs_are_named() -> None:
    model = tiny()
    with pytest.raises(ValueError, match="exceeds the model's limit of 16"):
        model(torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="token_type_ids must be in"):
        model(torch.ones(1, 4, dtype=torch.long), token_type_ids=torch.full((1, 4), 2))
    with pytest.raises(ValueError, match="out of range"):
        model(torch.full((1, 4), 50))


def test_overfits_one_batch() -> None:
    model = tiny(head="sequence", labels=("neg", "pos")).train()
    ids, labels = torch.randint(5, 50, (8, 10)), torch.tensor([0, 1] * 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(ids), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
