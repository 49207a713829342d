"""Masks, positions, feed-forward, norms, blocks and embeddings."""

import math

import pytest
import torch
from torch import nn

from tformer.nn import (MLP, AttentionInputs, Block, LearnedPositions, MultiHeadAttention,
                        PatchEmbedding, RotaryEmbedding, SinusoidalPositions, SwiGLU, TokenEmbedding,
                        alibi_slopes, apply_rotary, causal, full, key_padding, make_activation, make_norm,
                        prefix_lm, sliding_window)


def test_mask_functions_give_the_expected_dense_patterns():
    assert torch.equal(causal().dense(1, 1, 4, 4)[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    window = sliding_window(2).dense(1, 1, 4, 4)[0, 0].int().tolist()
    assert window == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    prefix = prefix_lm(torch.tensor([2])).dense(1, 1, 4, 4)[0, 0].int().tolist()
    assert prefix == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert full().dense(2, 3, 4, 5).shape == (1, 1, 4, 5)
    valid = torch.tensor([[False, True, True]])
    combined = (causal() & key_padding(valid)).dense(1, 1, 3, 3)[0, 0].int().tolist()
    assert combined == [[0, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_block_masks_of_static_patterns_are_built_once():
    mask = causal()
    first = mask.block_mask(1, 1, 256, 256)
    assert mask.block_mask(1, 1, 256, 256) is first
    assert mask.block_mask(1, 1, 128, 128) is not first


def test_mask_arguments_are_validated():
    with pytest.raises(ValueError, match="sliding window"):
        sliding_window(0)
    with pytest.raises(ValueError, match="bool tensor"):
        key_padding(torch.ones(2, 3))


def test_sinusoidal_table_matches_the_paper_formula():
    table = SinusoidalPositions(50, 8).table
    pos, i = 17, 3
    assert math.isclose(table[pos, 2 * i], math.sin(pos / 10000 ** (2 * i / 8)), abs_tol=1e-6)
    assert math.isclose(table[pos, 2 * i + 1], math.cos(pos / 10000 ** (2 * i / 8)), abs_tol=1e-6)


def test_rotary_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(16, 64)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rope(torch.tensor([[pq]]))
        ck, sk = rope(torch.tensor([[pk]]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(score(10, 7), score(40, 37), atol=1e-5, rtol=0)
    assert not torch.isclose(score(10, 7), score(10, 2))


def test_rotary_matches_hugging_face_llama():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 4, 6, 16)
    cos, sin = RotaryEmbedding(16, 32)(torch.arange(6).unsqueeze(0))
    hf_q, hf_k = llama.apply_rotary_pos_emb(q, k, cos[:, 0], sin[:, 0])
    torch.testing.assert_close(apply_rotary(q, cos, sin), hf_q)
    torch.testing.assert_close(apply_rotary(k, cos, sin), hf_k)


def test_alibi_slopes_follow_the_paper():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert len(alibi_slopes(6)) == 6 and alibi_slopes(6)[:4].tolist() == alibi_slopes(4).tolist()


def test_learned_positions_look_up_rows():
    pos = LearnedPositions(10, 4)
    torch.testing.assert_close(pos(torch.tensor([[3]]))[0, 0], pos.embedding.weight[3])


def test_swiglu_and_mlp_shapes_and_activation_names():
    x = torch.randn(2, 3, 8)
    assert SwiGLU(8, 12)(x).shape == x.shape
    assert MLP(8, 32, make_activation("gelu_tanh"))(x).shape == x.shape
    with pytest.raises(ValueError, match="unknown activation 'gleu'"):
        make_activation("gleu")


def test_norms_by_name():
    assert isinstance(make_norm("rmsnorm", 8), nn.RMSNorm)
    assert make_norm("layernorm", 8, bias=False).bias is None
    with pytest.raises(ValueError, match="unknown norm"):
        make_norm("batchnorm", 8)


def test_post_norm_block_equals_torch_transformer_encoder_layer():
    torch.manual_seed(0)
    d, heads, ff = 16, 4, 32
    ref = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True).eval()
    attn = MultiHeadAttention(d, heads)
    block = Block(attn, MLP(d, ff, nn.ReLU()), lambda: nn.LayerNorm(d), pre_norm=False).eval()
    with torch.no_grad():
        attn.qkv_proj.weight.copy_(ref.self_attn.in_proj_weight)
        attn.qkv_proj.bias.copy_(ref.self_attn.in_proj_bias)
        attn.out_proj.load_state_dict(ref.self_attn.out_proj.state_dict())
        block.ffn.up.load_state_dict(ref.linear1.state_dict())
        block.ffn.down.load_state_dict(ref.linear2.state_dict())
        block.attn_norm.load_state_dict(ref.norm1.state_dict())
        block.ffn_norm.load_state_dict(ref.norm2.state_dict())
    x = torch.randn(2, 5, d)
    torch.testing.assert_close(block(x, AttentionInputs(full())), ref(x), atol=1e-5, rtol=0)


def test_token_embedding_names_an_out_of_range_id():
    emb = TokenEmbedding(10, 4)
    with pytest.raises(ValueError, match="token id 12 is out of range for a vocabulary of 10"):
        emb(torch.tensor([[1, 12]]))
    with pytest.raises(ValueError, match="integer tensor"):
        emb(torch.tensor([[1.0]]))


def test_patch_embedding_equals_flatten_and_linear():
    patch = PatchEmbedding(8, 4, 3, 5)
    images = torch.randn(2, 3, 8, 8)
    out = patch(images)
    assert out.shape == (2, 4, 5)
    first = images[0, :, :4, :4].reshape(-1)  # top-left patch, (C, p, p) flattened
    torch.testing.assert_close(out[0, 0], patch.proj.weight.reshape(5, -1) @ first + patch.proj.bias,
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, 8, 8\)"):
        patch(torch.randn(2, 1, 8, 8))
