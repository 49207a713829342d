"""The GPT family: presets, cache equivalence, backends, compile, learning, clear errors."""

import pytest
import torch
import torch.nn.functional as F

from tformer.config import ConfigError
from tformer.models import build_model, get_config
from tformer.models.gpt import GPT, GPTConfig

VOCAB = 61
VARIANTS = {
    "gpt2": dict(),
    "rope_gqa_swiglu_rms": dict(position="rope", n_kv_heads=1, activation="swiglu", norm="rmsnorm",
                                bias=False, qk_norm=True),
    "alibi": dict(position="alibi"),
    "sinusoidal_untied": dict(position="sinusoidal", tie_embeddings=False),
}


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    config = dict(vocab_size=VOCAB, context_length=32, n_layers=2, n_heads=4, d_model=32)
    return GPT(GPTConfig(**{**config, **overrides})).eval()


def test_gpt2_small_preset_has_124m_parameters():
    model = build_model("gpt2-small")
    assert model.num_parameters() == 124_439_808  # the published GPT-2 small count (tied head)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_decoding_equals_full_forward_at_every_step(variant):
    model = tiny(**VARIANTS[variant])
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 12)
        steps = [model(ids[:, :5], cache=cache)]  # prefill, then one token at a time
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_left_padded_batch_matches_each_prompt_alone(variant):
    model = tiny(**VARIANTS[variant])
    short, long = torch.randint(0, VOCAB, (1, 4)), torch.randint(0, VOCAB, (1, 7))
    ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)
        cache = model.new_cache(2, 9)
        prefill = model(ids, attention_mask=mask, cache=cache)
        next_ids = torch.randint(0, VOCAB, (2, 2))
        steps = [model(next_ids[:, i:i + 1], cache=cache) for i in range(2)]
        alone_short = model(torch.cat([short, next_ids[:1]], 1))
        alone_long = model(torch.cat([long, next_ids[1:]], 1))
    torch.testing.assert_close(padded[0, 3:], alone_short[0, :4], atol=1e-5, rtol=0)
    torch.testing.assert_close(prefill, padded, atol=1e-5, rtol=0)
    decoded = torch.cat([prefill, *steps], 1)
    torch.testing.assert_close(decoded[0, 3:], alone_short[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(decoded[1], alone_long[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_attention_backends_give_the_same_model_output(backend):
    ids = torch.randint(0, VOCAB, (2, 16))
    reference = tiny()
    other = tiny(attn_backend=backend)
    other.load_state_dict(reference.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(ids), reference(ids), atol=1e-5, rtol=0)


def test_sdpa_and_eager_gradients_agree():
    ids = torch.randint(0, VOCAB, (2, 16))
    grads = []
    for backend in ("sdpa", "eager"):
        model = tiny(attn_backend=backend, position="alibi")
        logits = model(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_forward_compiles_without_graph_breaks():
    model = tiny()
    ids = torch.randint(0, VOCAB, (2, 16))
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_decoding_with_the_static_cache_compiles_once():
    """The cache has fixed shapes and a tensor write position: decoding steps reuse one graph."""
    import torch._dynamo

    model = tiny()
    ids = torch.randint(0, VOCAB, (2, 12))
    torch._dynamo.reset()
    step = torch.compile(model, fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        full = model(ids)
        cache = model.new_cache(2, 12)
        outputs = [model(ids[:, :5], cache=cache)]
        outputs += [step(ids[:, t:t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(outputs, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["gpt2", "rope_gqa_swiglu_rms"])
def test_overfits_one_batch(variant):
    model = tiny(**VARIANTS[variant]).train()
    ids = torch.randint(0, VOCAB, (4, 17))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(120):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 3.5 and losses[-1] < 0.1


def test_tied_head_shares_the_embedding_and_init_scales_residual_projections():
    model = tiny(n_layers=8)
    assert model.lm_head.weight is model.tok_emb.weight
    std_out = model.blocks[0].attn.out_proj.weight.std().item()
    std_in = model.blocks[0].attn.qkv_proj.weight.std().item()
    assert abs(std_out - 0.02 / 4) < 1e-3 and abs(std_in - 0.02) < 2e-3


def test_input_errors_are_clear():
    model = tiny()
    with pytest.raises(ValueError, match="exceeds the context length"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="token id 61 is out of range"):
        model(torch.tensor([[1, 61]]))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the model's context length"):
        model.new_cache(1, 64)


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match=r"d_model \(100\) must be divisible by n_heads \(12\)"):
        GPTConfig(d_model=100)
    with pytest.raises(ConfigError, match="unknown model or preset 'gpt2-smal'.*did you mean 'gpt2-small'"):
        get_config("gpt2-smal")
    with pytest.raises(ConfigError, match="unknown key 'n_layer'.*did you mean 'n_layers'"):
        get_config("gpt-mini", n_layer=3)
    with pytest.raises(ConfigError, match="position='rotary' is not valid"):
        GPTConfig(position="rotary")
