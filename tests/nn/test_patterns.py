"""Sparse attention patterns: exact semantics on small matrices, every backend against a dense
float64 reference (outputs and gradients), a GPT with a pattern (KV cache, left padding,
receptive field, generate), and clear errors."""

import math

import pytest
import torch

from tformer.config import ConfigError, apply_overrides
from tformer.inference import generate
from tformer.models import get_config
from tformer.models.gpt import GPT, GPTConfig
from tformer.nn import masks
from tformer.nn.attend import _compiled_flex_attention, get_backend
from tformer.nn.patterns import PATTERNS, bigbird_blocks, local_window, pattern_mask

B, H, T, D = 2, 2, 40, 8
VOCAB = 29

# every registered sparse pattern, with parameters that make it sparse at T = 40
CASES = {
    "sliding_window": dict(window=5),
    "dilated_window": dict(window=4, dilation=3),
    "global_tokens": dict(tokens=3, window=4),
    "bigbird": dict(block_size=4, random_blocks=2, global_blocks=1),
    "strided": dict(stride=6),
    "fixed": dict(stride=8, c=2),
    "block_local": dict(block_size=8, previous=True),
}


def grid(*rows: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row] for row in rows])


def matrix(mask: masks.Mask, n: int) -> torch.Tensor:
    return mask.dense(1, 1, n, n)[0, 0]


def build(name: str, causal: bool = True, max_len: int = T) -> masks.Mask:
    return pattern_mask(name, causal=causal, max_len=max_len, **CASES[name])


def reference(q, k, v, dense_mask):
    """Textbook softmax(q kᵀ / sqrt(d)) v in float64; fully masked rows give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    scores = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~dense_mask, -math.inf)
    return (torch.softmax(scores, -1).nan_to_num(0.0) @ v).float()


def qkv(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, T, D, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def test_every_registered_sparse_pattern_is_swept():
    assert set(CASES) == set(PATTERNS) - {"causal", "full"}


# --- semantics on explicit matrices -------------------------------------------------------------

def test_strided_stride_3_is_the_sparse_transformer_pattern():
    assert torch.equal(matrix(pattern_mask("strided", causal=True, stride=3), 9), grid(
        "1........", "11.......", "111......", "1111.....", ".1111....",
        "..1111...", "1..1111..", ".1..1111.", "..1..1111"))


def test_fixed_stride_3_c_1_sees_its_block_and_the_last_cell_of_every_block():
    assert torch.equal(matrix(pattern_mask("fixed", causal=True, stride=3, c=1), 9), grid(
        "1........", "11.......", "111......", "..11.....", "..111....",
        "..1111...", "..1..11..", "..1..111.", "..1..1111"))


def test_dilated_window_keeps_every_dth_key_up_to_w_keys():
    assert torch.equal(matrix(pattern_mask("dilated_window", causal=True, window=3, dilation=2), 8), grid(
        "1.......", ".1......", "1.1.....", ".1.1....", "1.1.1...", ".1.1.1..", "..1.1.1.", "...1.1.1"))


def test_global_tokens_see_and_are_seen_by_all_and_causal_keeps_them_visible_later():
    assert torch.equal(matrix(pattern_mask("global_tokens", causal=False, tokens=2), 5),
                       grid("11111", "11111", "11...", "11...", "11..."))
    assert torch.equal(matrix(pattern_mask("global_tokens", causal=True, tokens=2, window=2), 6),
                       grid("1.....", "11....", "111...", "1111..", "11.11.", "11..11"))


def test_block_local_with_and_without_the_previous_block():
    assert torch.equal(matrix(pattern_mask("block_local", causal=False, block_size=3), 7), grid(
        "111....", "111....", "111....", "...111.", "...111.", "...111.", "......1"))
    assert torch.equal(matrix(pattern_mask("block_local", causal=True, block_size=3, previous=True), 7),
                       grid("1......", "11.....", "111....", "1111...", "11111..", "111111.", "...1111"))


def test_sliding_window_is_the_causal_half_of_the_symmetric_local_window():
    assert torch.equal(matrix(masks.causal() & local_window(4), 12), matrix(masks.sliding_window(4), 12))
    symmetric = matrix(pattern_mask("sliding_window", causal=False, window=4), 12)
    assert torch.equal(symmetric, symmetric.T) and symmetric.sum() == 12 + 2 * (11 + 10 + 9)


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_has_window_global_and_exactly_r_seeded_random_blocks(causal):
    n, r = 12, 2
    adj = bigbird_blocks(n, window_blocks=3, global_blocks=1, random_blocks=r, seed=5, causal=causal)
    assert torch.equal(adj, bigbird_blocks(n, 3, 1, r, seed=5, causal=causal))  # reproducible
    assert not torch.equal(adj, bigbird_blocks(n, 3, 1, r, seed=6, causal=causal))
    i = torch.arange(n)
    base = ((i[:, None] - i).abs() <= 1) | (i[:, None] < 1) | (i < 1)
    if causal:
        base &= i[:, None] >= i
        assert not (adj & (i[:, None] < i)).any()  # no key block from the future
    assert (adj & base).equal(base)
    candidates = (~base).sum(1) if not causal else (~base & (i[:, None] > i)).sum(1)
    assert torch.equal((adj & ~base).sum(1), candidates.clamp(max=r))
    mask = pattern_mask("bigbird", causal=causal, max_len=48, block_size=4, random_blocks=r, seed=5)
    expected = adj.repeat_interleave(4, 0).repeat_interleave(4, 1)  # block -> token level
    assert torch.equal(matrix(mask, 48), expected & (torch.ones(48, 48).tril().bool() if causal else True))


# --- every backend computes the same function ---------------------------------------------------

@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", list(CASES))
def test_dense_backends_match_reference(name, causal, backend):
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :7] = False  # left padding in example 0
    for mask in (build(name, causal), build(name, causal) & masks.key_padding(valid)):
        q, k, v = qkv()
        out = get_backend(backend)(q, k, v, mask)
        torch.testing.assert_close(out, reference(q, k, v, mask.dense(B, H, T, T)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_agree_between_sdpa_and_eager(name):
    grads = []
    for backend in ("sdpa", "eager"):
        q, k, v = qkv(requires_grad=True)
        (get_backend(backend)(q, k, v, build(name)) * torch.linspace(-1, 1, D)).sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_kv_cache_step_matches_last_rows_of_full_attention(name):
    q, k, v = qkv()
    mask = build(name)
    full = reference(q, k, v, mask.dense(B, H, T, T))
    step = get_backend("sdpa")(q[:, :, -3:], k, v, mask, q_offset=torch.tensor(T - 3))
    torch.testing.assert_close(step, full[:, :, -3:], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_flex_matches_reference_for_every_pattern():
    """Compiled FlexAttention (forward: CPU has no flex backward) with head i running pattern i:
    one compilation for all patterns (each costs 4-10 s on a 2-core CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask

    patterns = [build(name) for name in CASES]

    def one_pattern_per_head(b, h, q, kv):
        out = patterns[0].mod(b, h, q, kv) & (h == 0)
        for i, pattern in enumerate(patterns[1:], 1):
            out = out | (pattern.mod(b, h, q, kv) & (h == i))
        return out

    heads = len(patterns)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, T, D, generator=g) for _ in range(3))
    block_mask = create_block_mask(one_pattern_per_head, None, heads, T, T, device="cpu")
    with torch.no_grad():
        out = _compiled_flex_attention()(q, k, v, block_mask=block_mask)
    dense = torch.cat([p.dense(1, 1, T, T) for p in patterns], 1)  # (1, heads, T, T)
    torch.testing.assert_close(out, reference(q, k, v, dense), atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex backward needs a GPU")
@pytest.mark.parametrize("name", list(CASES))
def test_flex_gradients_match_sdpa_on_gpu(name):
    mask = pattern_mask(name, causal=True, max_len=T, device="cuda", **CASES[name])
    grads = []
    for backend in ("sdpa", "flex"):
        q, k, v = (t.detach().cuda().requires_grad_() for t in qkv())
        get_backend(backend)(q, k, v, mask).sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


# --- a GPT with a pattern -----------------------------------------------------------------------

def tiny(pattern: str, params: dict | None = None, **overrides) -> GPT:
    torch.manual_seed(0)
    config = dict(vocab_size=VOCAB, context_length=T, n_layers=2, n_heads=2, d_model=16)
    params = CASES.get(pattern) if params is None else params
    return GPT(GPTConfig(attn_pattern=pattern, attn_pattern_params=params, **{**config, **overrides})).eval()


@pytest.mark.parametrize("name", list(CASES))
def test_gpt_kv_cache_decoding_equals_full_forward(name):
    model = tiny(name)
    ids = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 30)
        steps = [model(ids[:, :17], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(17, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_gpt_left_padded_prompt_matches_the_prompt_alone(name):
    """Blocks, strides and global tokens count real tokens, not padding slots."""
    model = tiny(name)
    prompt, extra = torch.randint(0, VOCAB, (1, 21)), torch.randint(0, VOCAB, (1, 3))
    ids = torch.cat([torch.zeros(1, 5, dtype=torch.long), prompt], 1)
    mask = torch.ones_like(ids).index_fill_(1, torch.arange(5), 0)
    with torch.no_grad():
        alone = model(torch.cat([prompt, extra], 1))
        padded = model(ids, attention_mask=mask)
        cache = model.new_cache(1, 29)
        steps = [model(ids, attention_mask=mask, cache=cache)[:, 5:]]
        steps += [model(extra[:, i:i + 1], cache=cache) for i in range(3)]
    torch.testing.assert_close(padded[:, 5:], alone[:, :21], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(steps, 1), alone, atol=1e-5, rtol=0)


def test_sliding_window_receptive_field_is_window_times_layers():
    window, layers = 4, 3
    model = tiny("sliding_window", {"window": window}, n_layers=layers)
    dense = tiny("causal", n_layers=layers)
    ids = torch.randint(0, VOCAB, (1, T))
    edge = T - 1 - layers * (window - 1)  # the oldest token the last position can still see
    with torch.no_grad():
        for m in (model, dense):
            before = m(ids)[0, -1]
            far, near = ids.clone(), ids.clone()
            far[0, :edge] = (far[0, :edge] + 1) % VOCAB
            near[0, edge] = (near[0, edge] + 1) % VOCAB
            assert torch.equal(m(far)[0, -1], before) == (m is model)
            assert not torch.equal(m(near)[0, -1], before)


def test_generate_with_a_pattern_equals_greedy_over_full_forwards():
    model = tiny("fixed")
    prompt = torch.randint(0, VOCAB, (1, 9))
    out = generate(model, prompt, max_new_tokens=12)
    ids = prompt
    with torch.no_grad():
        for _ in range(12):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ids)


@pytest.mark.slow
def test_gpt_flex_equals_sdpa_with_and_without_padding_and_caches_the_block_mask():
    ids = torch.randint(0, VOCAB, (2, T))
    padding = torch.ones_like(ids)
    padding[0, :6] = 0
    reference_model, flex_model = tiny("bigbird"), tiny("bigbird", attn_backend="flex")
    with torch.no_grad():
        for attention_mask in (None, padding):
            expected = reference_model(ids, attention_mask=attention_mask)
            out = flex_model(ids, attention_mask=attention_mask)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        flex_model(ids)
    pattern = flex_model.attention_pattern(torch.device("cpu"))
    assert len(pattern._block_masks) == 1  # one length seen: one BlockMask for all layers and calls
    assert pattern.block_mask(2, 2, T, T) is pattern.block_mask(2, 2, T, T)


# --- configuration and errors -------------------------------------------------------------------

def test_a_recipe_names_a_pattern_and_its_parameters():
    model = apply_overrides({"model": {"preset": "gpt-nano", "attn_pattern": "sliding_window",
                                       "attn_pattern_params": {"window": 16}}},
                            ["model.attn_pattern_params.window=8"])["model"]
    config = get_config(model.pop("preset"), **model)
    assert config.attn_pattern_params == {"window": 8}
    assert GPT(config).attention_pattern(torch.device("cpu")).name == "sliding_window(8)"
    params = {"window": 8}
    config = GPTConfig(attn_pattern="sliding_window", attn_pattern_params=params)
    params["window"] = 1000
    assert config.attn_pattern_params == {"window": 8}  # the config keeps its own copy


@pytest.mark.parametrize("pattern, params, message", [
    ("slidng_window", {"window": 4}, "unknown attention pattern 'slidng_window'.*did you mean 'sliding_window'"),
    ("sliding_window", {"windw": 4}, "unknown parameter 'windw'.*did you mean 'window'"),
    ("sliding_window", {}, "needs parameter 'window'"),
    ("sliding_window", {"window": 65}, "reaches 65 tokens, more than the sequence \\(64\\)"),
    ("dilated_window", {"window": 20, "dilation": 4}, "reaches 77 tokens"),
    ("sliding_window", {"window": -3}, "window must be >= 1, got -3"),
    ("strided", {"stride": "8"}, "stride must be an integer, got '8'"),
    ("fixed", {"stride": 8, "c": 9}, "c .* must be <= stride"),
    ("bigbird", {"window_blocks": 2, "block_size": 4}, "window_blocks must be odd"),
    ("bigbird", {"random_blocks": -1}, "random_blocks must be >= 0"),
    ("block_local", {"block_size": 8, "previous": "yes"}, "previous must be true or false"),
])
def test_config_errors_name_the_problem(pattern, params, message):
    with pytest.raises(ConfigError, match=message):
        GPTConfig(context_length=64, attn_pattern=pattern, attn_pattern_params=params)


def test_pattern_mask_errors():
    with pytest.raises(ValueError, match="bigbird.*pass max_len"):
        pattern_mask("bigbird", causal=True)
    with pytest.raises(TypeError, match="causal"):
        pattern_mask("strided", stride=4)  # decoder or encoder must be said
    with pytest.raises(ValueError, match="tokens must be >= 1, got 0"):
        pattern_mask("global_tokens", causal=False, tokens=0)


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_past_its_max_len_keeps_window_and_global_blocks(causal):
    """It raised IndexError on any input longer than max_len."""
    mask = pattern_mask("bigbird", causal=causal, max_len=16, block_size=4, random_blocks=1, seed=5)
    long = matrix(mask, 28)  # 7 blocks; the table has 4
    assert torch.equal(long[:16, :16], matrix(mask, 16))  # the drawn pattern is unchanged inside
    i = torch.arange(28) // 4
    window_and_global = ((i[:, None] - i).abs() <= 1) | (i[:, None] < 1) | (i < 1)
    if causal:
        window_and_global &= torch.ones(28, 28).tril().bool()
    outside = (i[:, None] >= 4) | (i >= 4)
    assert torch.equal(long[outside], window_and_global[outside])
    block_mask = mask.block_mask(1, 1, 28, 28)  # flex evaluates the same function
    assert block_mask.shape[-2:] == (28, 28)
