"""Incremental decoding: cached generation against a no-cache reference, sampling controls."""

import math

import pytest
import torch

from tformer.inference import Sampling, generate, pad_prompts, stream
from tformer.inference.generate import MAX_NEW_TOKENS, MAX_ROWS, apply_repetition_penalty, filter_logits
from tformer.models.gpt import GPT, GPTConfig

VOCAB = 37


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=VOCAB, context_length=48, n_layers=2, n_heads=2, d_model=32)
    return GPT(config).eval()


def greedy_without_cache(model, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0].tolist()


def test_greedy_equals_argmax_of_full_forward(model):
    out = generate(model, torch.tensor([[3, 1, 4, 1, 5]]), 12)
    assert out[0].tolist() == greedy_without_cache(model, [3, 1, 4, 1, 5], 12)


def test_batched_prompts_of_different_lengths_match_each_alone(model):
    prompts = [[3, 1, 4], [2, 7, 1, 8, 2, 8], [9]]
    out = generate(model, prompts, 8)
    for row, prompt in zip(out, prompts):
        assert row[-8:].tolist() == greedy_without_cache(model, prompt, 8)[-8:]


def test_seeded_sampling_is_reproducible(model):
    sampling = Sampling(temperature=1.3, top_k=10, top_p=0.9)
    first = generate(model, [[1, 2]], 15, sampling, seed=11)
    assert torch.equal(first, generate(model, [[1, 2]], 15, sampling, seed=11))
    assert not torch.equal(first, generate(model, [[1, 2]], 15, sampling, seed=12))


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    greedy = generate(model, [[5, 6, 7]], 10)
    assert torch.equal(generate(model, [[5, 6, 7]], 10, Sampling(top_k=1), seed=0), greedy)
    assert torch.equal(generate(model, [[5, 6, 7]], 10, Sampling(top_p=1e-6), seed=0), greedy)


def test_filter_logits_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_logits(probs.log(), top_k=None, top_p=0.8).isfinite()
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.8
    kept = filter_logits(probs.log()[:, [3, 1, 0, 2]], top_k=None, top_p=0.81).isfinite()
    assert kept.tolist() == [[False, True, True, True]]  # order does not matter
    assert filter_logits(probs.log(), top_k=2, top_p=None).isfinite().sum() == 2


def test_repetition_penalty_follows_ctrl():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


def test_repetition_penalty_changes_greedy_output(model):
    plain = generate(model, [[4, 4, 4]], 12)
    penalised = generate(model, [[4, 4, 4]], 12, Sampling(temperature=0.0, repetition_penalty=5.0))
    assert not torch.equal(plain, penalised)


def test_stop_tokens_end_rows_and_pad_after(model):
    prompts = [[3, 1, 4], [2, 7]]
    free = generate(model, prompts, 10)
    stop = int(free[0, 5])  # the third token row 0 generates
    out = generate(model, prompts, 10, stop_tokens=[stop], pad_id=0)
    row0 = out[0, 3:].tolist()
    first_stop = row0.index(stop)
    assert all(t == 0 for t in row0[first_stop + 1:])
    steps = list(stream(model, [[3, 1, 4]], 10, stop_tokens=[stop]))
    assert int(steps[-1][0]) == stop and len(steps) <= 3  # stops as soon as every row stopped


def test_streaming_callback_sees_every_token(model):
    seen = []
    out = generate(model, [[1, 2, 3]], 6, on_token=lambda t: seen.append(int(t[0])))
    assert seen == out[0, 3:].tolist()


def test_generation_restores_training_mode(model):
    model.train()
    generate(model, [[1]], 2)
    assert model.training
    model.eval()


def test_bad_prompts_and_settings_are_explained(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pad_prompts([[1], []])
    with pytest.raises(ValueError, match="exceeds the model's context length"):
        generate(model, [list(range(30))], 20)
    with pytest.raises(ValueError, match="token id 99 is out of range"):
        generate(model, [[1, 99]], 2)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        Sampling(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], 0)


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "1", None])
def test_nan_infinite_or_non_numeric_sampling_values_are_one_line(field, value):
    if field == "top_p" and value is None:
        return  # None is top_p's default: no nucleus filtering
    with pytest.raises(ValueError, match=f"{field} must be a finite number, got") as caught:
        Sampling(**{field: value})
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("top_k", [2.5, True, "3", 0])
def test_top_k_must_be_a_whole_number(top_k):
    with pytest.raises(ValueError, match="top_k must be"):
        Sampling(top_k=top_k)


@pytest.mark.parametrize("sampling", [Sampling(temperature=1e-88), Sampling(temperature=1e-30),
                                      Sampling(repetition_penalty=1e-311), Sampling(top_p=1e-311)],
                         ids=["temperature-underflow", "temperature-overflow", "penalty", "top_p"])
def test_extreme_but_valid_sampling_values_still_sample(model, sampling):
    """Found by tests/test_properties.py: these made softmax NaN, then torch.multinomial raised."""
    out = generate(model, [[3, 1, 4]], 4, sampling, seed=0)
    assert out.shape == (1, 7) and int(out.max()) < VOCAB


def test_generation_sizes_are_bounded_before_any_work(model):
    with pytest.raises(ValueError, match=f"max_new_tokens={MAX_NEW_TOKENS + 1} is more than 100,000 "
                                         r"\(each token is a forward pass"):
        generate(model, [[1, 2]], MAX_NEW_TOKENS + 1, sliding=True)  # sliding: no context bound
    with pytest.raises(ValueError, match="max_new_tokens must be a whole number, got 2.5"):
        generate(model, [[1, 2]], 2.5)
    with pytest.raises(ValueError, match=f"the number of prompts={MAX_ROWS + 1} is more than"):
        generate(model, torch.ones(MAX_ROWS + 1, 2, dtype=torch.long), 1)


def test_sliding_generation_past_the_context_recomputes_the_last_half(model):
    """Reference: a full forward over the window; once it would exceed the context, the window
    restarts at the last context // 2 tokens."""
    context, prompt, n = model.config.context_length, [3, 1, 4, 1, 5], 70
    seq, start = list(prompt), 0
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq[start:]]))[0, -1].argmax()))
            if len(seq) - start > context:
                start = len(seq) - context // 2
    out = generate(model, [prompt], n, sliding=True)
    assert out[0].tolist() == seq
    with pytest.raises(ValueError, match="sliding=True"):
        generate(model, [prompt], n)


def test_streaming_does_not_leak_inference_mode_to_the_caller(model):
    for _ in stream(model, [[1, 2]], 3):
        assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()


def test_right_padding_is_refused(model):
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, torch.tensor([[1, 2, 0]]), 2, attention_mask=torch.tensor([[1, 1, 0]]))


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_next_logits_is_the_last_row_of_the_logits_with_padding_and_a_cache(position):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, context_length=32, n_layers=2, n_heads=2, d_model=16,
                          position=position)).eval()
    ids, mask = pad_prompts([[3, 4, 5, 6, 7], [8, 9]])  # left padding
    with torch.no_grad():
        full_cache, fast_cache = model.new_cache(2, 16), model.new_cache(2, 16)
        full = model(ids, attention_mask=mask, cache=full_cache)[:, -1]
        fast = model.next_logits(ids, attention_mask=mask, cache=fast_cache)
        torch.testing.assert_close(fast, full, rtol=0, atol=1e-6)
        step = torch.tensor([[10], [11]])  # and the caches they leave behind decode alike
        torch.testing.assert_close(model(step, cache=fast_cache), model(step, cache=full_cache), rtol=0, atol=1e-6)
