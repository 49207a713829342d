"""Transformer-XL: recurrence equals one long pass, backends agree, causality, no gradient into
memory, document resets, presets and clear errors."""

import pytest
import torch
import torch.nn.functional as F

from tformer.config import ConfigError
from tformer.models import build_model, get_config
from tformer.models.transformer_xl import TransformerXL, TransformerXLConfig, count_parameters

VOCAB = 37


def tiny(**overrides) -> TransformerXL:
    """Weights at std 0.3 so attention is far from uniform and a wrong position shows."""
    torch.manual_seed(0)
    config = dict(vocab_size=VOCAB, n_layers=2, n_heads=2, d_model=32, d_ff=64, seg_len=8,
                  mem_len=8, dropout=0.0, init_std=0.3)
    return TransformerXL(TransformerXLConfig(**{**config, **overrides})).eval()


def ids(batch=2, length=24, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def run_segments(model, tokens, seg_len, mem_len, resets=None):
    memory = model.new_memory(tokens.shape[0], mem_len)
    logits = []
    for start in range(0, tokens.shape[1], seg_len):
        part = None if resets is None else resets[:, start:start + seg_len]
        out = model(tokens[:, start:start + seg_len], memory, resets=part)
        logits.append(out.logits)
        memory = out.memory
    return torch.cat(logits, 1), memory


@pytest.mark.parametrize("variant", [dict(), dict(pre_norm=True), dict(attn_backend="eager"),
                                     dict(attn_backend="reference")])
def test_segments_with_memory_equal_one_pass(variant):
    model, tokens = tiny(**variant), ids()
    with torch.no_grad():
        whole = model(tokens, model.new_memory(2, 0)).logits
        segmented, memory = run_segments(model, tokens, seg_len=8, mem_len=24)
    torch.testing.assert_close(segmented, whole, atol=1e-5, rtol=1e-5)
    assert memory.length == 24 and all(s.shape == (2, 24, 32) for s in memory.states)


def test_memory_matters_and_keeps_only_mem_len_positions():
    model, tokens = tiny(), ids()
    with torch.no_grad():
        whole = model(tokens, model.new_memory(2, 0)).logits
        short, memory = run_segments(model, tokens, seg_len=8, mem_len=4)
        none, _ = run_segments(model, tokens, seg_len=8, mem_len=0)
        alone = model(tokens[:, 16:], model.new_memory(2, 0)).logits
    assert memory.length == 4
    torch.testing.assert_close(none[:, 16:], alone, atol=1e-5, rtol=1e-5)  # mem_len 0: no recurrence
    assert (short[:, 8:] - whole[:, 8:]).abs().max() > 1e-3  # 4 remembered positions differ from 8+
    assert (short[:, 8:] - none[:, 8:]).abs().max() > 1e-3


def test_backends_agree_on_logits_and_gradients():
    tokens = ids()
    results = {}
    for backend in ("reference", "sdpa", "eager"):
        model = tiny(attn_backend=backend).train()
        first = model(tokens[:, :8])
        logits = model(tokens[:, 8:16], first.memory).logits
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 9:17].flatten()).backward()
        results[backend] = logits, [p.grad for p in model.parameters()]
    for backend in ("sdpa", "eager"):
        torch.testing.assert_close(results[backend][0], results["reference"][0], atol=1e-5, rtol=1e-5)
        for a, b in zip(results[backend][1], results["reference"][1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_causal_with_memory():
    model, tokens = tiny(), ids()
    changed = tokens.clone()
    changed[:, 13] = (changed[:, 13] + 1) % VOCAB
    with torch.no_grad():
        a, _ = run_segments(model, tokens, seg_len=8, mem_len=8)
        b, _ = run_segments(model, changed, seg_len=8, mem_len=8)
    torch.testing.assert_close(a[:, :13], b[:, :13], atol=0, rtol=0)
    assert (a[:, 13:] - b[:, 13:]).abs().max() > 1e-4


def test_no_gradient_flows_into_memory():
    model = tiny(tie_embeddings=False).train()
    first_tokens = torch.arange(0, 10).repeat(2, 1)  # ids 0-9 only in the first segment
    second_tokens = torch.arange(20, 30).repeat(2, 1)  # ids 20-29 only in the second
    out = model(first_tokens)
    assert all(not s.requires_grad and s.grad_fn is None for s in out.memory.states)
    model(second_tokens, out.memory).logits.square().mean().backward()
    grad = model.tok_emb.weight.grad
    assert grad[:10].abs().max() == 0 and grad[20:30].abs().max() > 0


def test_reset_rows_and_documents_inside_a_segment():
    model, tokens = tiny(), ids()
    with torch.no_grad():
        first = model(tokens[:, :8])
        first.memory.reset([1])  # row 1 starts a new document
        carried = model(tokens[:, 8:16], first.memory).logits
        fresh = model(tokens[:, 8:16], model.new_memory(2)).logits
        with_memory = model(tokens[:, 8:16], model(tokens[:, :8]).memory).logits
        torch.testing.assert_close(carried[1], fresh[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(carried[0], with_memory[0], atol=1e-5, rtol=1e-5)
        resets = torch.zeros_like(tokens, dtype=torch.bool)
        resets[0, 11] = True  # a document starts at position 11 of row 0 (segment 2)
        segmented, _ = run_segments(model, tokens, seg_len=8, mem_len=16, resets=resets)
        alone = model(tokens[:1, 11:]).logits  # relative positions: the same as starting afresh
    torch.testing.assert_close(segmented[0, 11:], alone[0], atol=1e-5, rtol=1e-5)


def test_presets_and_registry():
    assert count_parameters(get_config("txl-base-wt103")) == 150_850_870  # paper: 151M (Table 1)
    mini = build_model("txl-mini", vocab_size=65)
    assert isinstance(mini, TransformerXL) and mini.num_parameters() == count_parameters(mini.config)
    assert get_config("txl-mini").eval_memory == 256 and get_config("txl-micro").eval_memory == 16


def test_learns_a_batch():
    model = tiny(n_layers=1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = ids(length=17)
    losses = []
    for _ in range(20):
        logits = model(tokens[:, :16]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_input_is_refused():
    with pytest.raises(ConfigError, match="mem_len must be >= 0, got -1"):
        TransformerXLConfig(mem_len=-1)
    with pytest.raises(ConfigError, match="eval_mem_len must be >= 0"):
        TransformerXLConfig(eval_mem_len=-5)
    with pytest.raises(ConfigError, match="attn_backend='fast' is not valid"):
        TransformerXLConfig(attn_backend="fast")
    with pytest.raises(ConfigError, match="even d_model"):
        TransformerXLConfig(d_model=33, n_heads=3)
    model = tiny()
    with pytest.raises(ValueError, match="mem_len must be >= 0"):
        model.new_memory(2, -1)
    with pytest.raises(ValueError, match="holds 3 rows"):
        model(ids(), model.new_memory(3))
    with pytest.raises(ValueError, match="the memory has 1 layers, the model 2"):
        model(ids(), tiny(n_layers=1).new_memory(2))
    with pytest.raises(ValueError, match="resets must be a bool tensor"):
        model(ids(), resets=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="length >= 1"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[VOCAB]]))
