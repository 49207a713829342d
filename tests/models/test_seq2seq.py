"""The encoder-decoder: parity with torch.nn.Transformer, padding, cached decoding, cross-attention
keys/values computed once, beam 1 = greedy, and errors that name the problem."""

import pytest
import torch
from torch import nn

from tformer.config import ConfigError
from tformer.inference import beam_search, generate
from tformer.models import build_model, get_config
from tformer.models.seq2seq import Seq2Seq, Seq2SeqConfig
from tformer.nn import KVCache

V, D, H, FF = 37, 32, 4, 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(**overrides) -> Seq2Seq:
    torch.manual_seed(0)
    values = dict(vocab_size=V, context_length=24, n_encoder_layers=2, n_decoder_layers=2,
                  n_heads=H, d_model=D, d_ff=FF, dropout=0.0)
    return Seq2Seq(Seq2SeqConfig(**{**values, **overrides})).eval()


def copy_attention(dst: nn.MultiheadAttention, qkv_weight, qkv_bias, out: nn.Linear) -> None:
    dst.in_proj_weight.copy_(qkv_weight)
    dst.in_proj_bias.copy_(qkv_bias)
    dst.out_proj.weight.copy_(out.weight)
    dst.out_proj.bias.copy_(out.bias)


def torch_transformer_like(model: Seq2Seq) -> nn.Transformer:
    """torch.nn.Transformer holding model's weights (final norms: copied, or Identity if none)."""
    c = model.config
    ref = nn.Transformer(D, H, c.n_encoder_layers, c.n_decoder_layers, FF, dropout=0.0,
                         batch_first=True, norm_first=c.pre_norm)
    with torch.no_grad():
        for ours, theirs in zip(model.encoder, ref.encoder.layers):
            copy_attention(theirs.self_attn, ours.attn.qkv_proj.weight, ours.attn.qkv_proj.bias,
                           ours.attn.out_proj)
            for a, b in [(ours.ffn.up, theirs.linear1), (ours.ffn.down, theirs.linear2),
                         (ours.attn_norm, theirs.norm1), (ours.ffn_norm, theirs.norm2)]:
                b.load_state_dict(a.state_dict())
        for ours, theirs in zip(model.decoder, ref.decoder.layers):
            copy_attention(theirs.self_attn, ours.attn.qkv_proj.weight, ours.attn.qkv_proj.bias,
                           ours.attn.out_proj)
            cross = ours.cross_attn
            copy_attention(theirs.multihead_attn, torch.cat([cross.q_proj.weight, cross.kv_proj.weight]),
                           torch.cat([cross.q_proj.bias, cross.kv_proj.bias]), cross.out_proj)
            for a, b in [(ours.ffn.up, theirs.linear1), (ours.ffn.down, theirs.linear2),
                         (ours.attn_norm, theirs.norm1), (ours.cross_norm, theirs.norm2),
                         (ours.ffn_norm, theirs.norm3)]:
                b.load_state_dict(a.state_dict())
        for ours_norm, side in [(model.encoder_norm, ref.encoder), (model.decoder_norm, ref.decoder)]:
            if isinstance(ours_norm, nn.Identity):
                side.norm = nn.Identity()
            else:
                side.norm.load_state_dict(ours_norm.state_dict())
    return ref.eval()


def padded_batch():
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, V, (3, 7), generator=g)
    tgt = torch.randint(3, V, (3, 6), generator=g)
    src_mask = torch.ones_like(src, dtype=torch.bool)
    tgt_mask = torch.ones_like(tgt, dtype=torch.bool)
    src_mask[1, 4:], src_mask[2, 6:], tgt_mask[0, 3:], tgt_mask[2, 5:] = False, False, False, False
    return src.masked_fill(~src_mask, 0), tgt.masked_fill(~tgt_mask, 0), src_mask, tgt_mask


@pytest.mark.parametrize("variant", [dict(pre_norm=False, final_norm=True),
                                     dict(pre_norm=False, final_norm=False),
                                     dict(pre_norm=True)])
def test_matches_torch_transformer(variant):
    model = tiny(**variant)
    ref = torch_transformer_like(model)
    src, tgt, src_mask, tgt_mask = padded_batch()
    ours = model(src, tgt, src_mask=src_mask, tgt_mask=tgt_mask)
    pos = lambda mask: (mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = ref(model.src_emb(src) + model.pos(pos(src_mask)), model.tgt_emb(tgt) + model.pos(pos(tgt_mask)),
                 tgt_mask=nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.bool),
                 src_key_padding_mask=~src_mask, tgt_key_padding_mask=~tgt_mask,
                 memory_key_padding_mask=~src_mask)
    theirs = model.out_proj(hidden)
    assert (ours - theirs)[tgt_mask].abs().max() <= 1e-5


def test_padding_does_not_change_real_positions():
    model = tiny()
    src, tgt = torch.randint(3, V, (1, 5)), torch.randint(3, V, (1, 4))
    alone = model(src, tgt)
    right = torch.cat([src, torch.zeros(1, 3, dtype=torch.long)], 1)
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), src], 1)
    for padded, mask in [(right, right != 0), (left, left != 0)]:
        out = model(padded, tgt, src_mask=mask)
        torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)


def test_cached_decoding_equals_uncached():
    model = tiny()
    src, tgt, src_mask, _ = padded_batch()
    full = model(src, tgt, src_mask=src_mask)  # (B, T, V)
    decoder = model.bind(src, src_mask)
    cache = decoder.new_cache(3, 6)
    first = decoder(tgt[:, :2], cache=cache)  # a prefill of two tokens, then one at a time
    steps = [first] + [decoder(tgt[:, t:t + 1], cache=cache) for t in range(2, 6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_cross_attention_keys_values_are_projected_once_per_source():
    model = tiny()
    calls = []
    for block in model.decoder:
        block.cross_attn.kv_proj.register_forward_hook(lambda *_: calls.append(1))
    src, _, src_mask, _ = padded_batch()
    generate(model.bind(src, src_mask), [[1]] * 3, max_new_tokens=8)
    assert len(calls) == model.config.n_decoder_layers
    calls.clear()
    beam_search(model.bind(src, src_mask), [[1]] * 3, beam_width=3, max_new_tokens=8)
    assert len(calls) == model.config.n_decoder_layers


def test_beam_one_equals_greedy():
    model = tiny()
    src, _, src_mask, _ = padded_batch()
    greedy = generate(model.bind(src, src_mask), [[1]] * 3, max_new_tokens=10)[:, 1:]
    beams = beam_search(model.bind(src, src_mask), [[1]] * 3, beam_width=1, max_new_tokens=10)
    assert [hyps[0].tokens for hyps in beams] == greedy.tolist()


def test_generation_restores_training_mode():
    model = tiny().train()
    generate(model.bind(torch.tensor([[5, 6]])), [[1]], max_new_tokens=2)
    assert model.training


def test_shared_and_separate_embeddings():
    shared = tiny()
    assert shared.src_emb is shared.tgt_emb and shared.out_proj.weight is shared.tgt_emb.weight
    separate = tiny(share_embeddings=False, tgt_vocab_size=29, tie_output=False)
    assert separate.src_emb.weight.shape == (V, D) and separate.tgt_emb.weight.shape == (29, D)
    assert separate.out_proj.weight is not separate.tgt_emb.weight
    assert separate(torch.tensor([[36, 5]]), torch.tensor([[1, 28]])).shape == (1, 2, 29)
    assert shared.num_parameters() < separate.num_parameters()


def test_presets_are_registered():
    assert get_config("transformer-base").d_model == 512
    model = build_model("nmt-tiny", vocab_size=100)
    assert isinstance(model, Seq2Seq) and model.config.n_encoder_layers == 2


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError, match="share_embeddings"):
        Seq2SeqConfig(vocab_size=10, tgt_vocab_size=12)
    with pytest.raises(ConfigError, match="divisible by n_heads"):
        Seq2SeqConfig(d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="eos_id"):
        Seq2SeqConfig(vocab_size=10, eos_id=10)
    with pytest.raises(ConfigError, match="attn_dropout"):
        Seq2SeqConfig(attn_dropout=1.5)


def test_bad_inputs_name_the_problem():
    model = tiny()
    src = torch.tensor([[4, 5, 6]])
    with pytest.raises(ValueError, match="source of 30 tokens exceeds the context length"):
        model(torch.ones(1, 30, dtype=torch.long), src)
    with pytest.raises(ValueError, match="target mask shape"):
        model(src, src, tgt_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="out of range"):
        model(src, torch.tensor([[1, V]]))
    with pytest.raises(ValueError, match="source ids must be a non-empty"):
        model.encode(torch.ones(1, 0, dtype=torch.long))
    decoder = model.bind(src)
    with pytest.raises(ValueError, match="bound to 1 encoded inputs"):
        decoder.new_cache(2, 4)
    with pytest.raises(TypeError, match="its own cache"):
        decoder(torch.tensor([[1]]), cache=KVCache(2, 1, H, D // H, 4))
