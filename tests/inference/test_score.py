"""Scoring a text: the summed NLL equals a direct full forward when the text fits in one window or
segment, and a reference loop (one window, one target run at a time) when it does not."""

import math

import pytest
import torch
import torch.nn.functional as F

from tformer.inference.score import causal_nll, causal_windows, memory_nll, score_text, token_nll
from tformer.models.gpt import GPT, GPTConfig
from tformer.models.transformer_xl import TransformerXL, TransformerXLConfig
from tformer.tokenizers import CharTokenizer

VOCAB, CONTEXT = 29, 16


@pytest.fixture(scope="module")
def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, context_length=CONTEXT, n_layers=2, n_heads=2, d_model=16)).eval()


@pytest.fixture(scope="module")
def txl() -> TransformerXL:
    torch.manual_seed(0)
    config = TransformerXLConfig(vocab_size=VOCAB, n_layers=2, n_heads=2, d_model=16, d_ff=32, seg_len=6,
                                 mem_len=6, eval_mem_len=10)
    return TransformerXL(config).eval()


def ids_of(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def full_forward_nll(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids[:-1].unsqueeze(0))
    return float(F.cross_entropy(logits[0], ids[1:], reduction="sum"))


def test_causal_text_in_one_window_equals_the_full_forward_exactly(gpt):
    ids = ids_of(CONTEXT + 1)  # CONTEXT inputs, CONTEXT targets
    assert causal_nll(gpt, ids, stride=CONTEXT) == full_forward_nll(gpt, ids)
    assert token_nll(gpt, ids.tolist(), stride=CONTEXT) == full_forward_nll(gpt, ids)


def reference_sliding_nll(model, ids: torch.Tensor, stride: int) -> tuple[float, list[int], list[int]]:
    """One target at a time: target t is predicted from the window that ends at the last target of
    its run of `stride` and holds at most CONTEXT inputs."""
    total, scored, contexts = 0.0, [], []
    n = len(ids)
    for t in range(1, n):
        run_end = min(1 + ((t - 1) // stride + 1) * stride, n)  # one past the run's last target
        lo = max(0, run_end - 1 - CONTEXT)
        with torch.no_grad():
            logits = model(ids[lo:run_end - 1].unsqueeze(0))[0]
        total += float(F.cross_entropy(logits[t - 1 - lo], ids[t]))
        scored.append(t)
        contexts.append(t - lo)
    return total, scored, contexts


@pytest.mark.parametrize("stride", [1, 5, CONTEXT // 2, CONTEXT])
def test_causal_sliding_windows_equal_a_reference_loop(gpt, stride):
    ids = ids_of(3 * CONTEXT + 7, seed=stride)
    expected, scored, contexts = reference_sliding_nll(gpt, ids, stride)
    assert scored == list(range(1, len(ids)))  # every token after the first, once
    assert min(contexts[CONTEXT:]) == CONTEXT - stride + 1  # as much left context as fits
    assert causal_nll(gpt, ids, stride=stride) == pytest.approx(expected, rel=1e-5)
    assert causal_nll(gpt, ids, stride=stride, batch_size=1) == pytest.approx(expected, rel=1e-5)


def test_windows_cover_every_target_once_within_the_context():
    for n, stride in [(2, 1), (17, 16), (50, 7), (100, 16)]:
        windows = causal_windows(n, CONTEXT, stride)
        targets = [t for _, first, end in windows for t in range(first, end)]
        assert targets == list(range(1, n))
        assert all(end - 1 - lo <= CONTEXT for lo, _, end in windows)
    with pytest.raises(ValueError, match="stride must be between 1 and"):
        causal_windows(50, CONTEXT, CONTEXT + 1)
    with pytest.raises(ValueError, match="stride must be between 1 and"):
        causal_windows(50, CONTEXT, 0)


def test_memory_text_in_one_segment_equals_the_full_forward_exactly(txl):
    ids = ids_of(txl.config.seg_len + 1)
    with torch.no_grad():
        logits, _ = txl(ids[:-1].unsqueeze(0), txl.new_memory(1, txl.config.eval_memory))
    expected = float(F.cross_entropy(logits[0], ids[1:], reduction="sum"))
    assert memory_nll(txl, ids) == expected
    assert token_nll(txl, ids) == expected


def test_memory_segments_carry_the_memory_like_a_reference_loop(txl):
    ids = ids_of(23)
    seg, total = txl.config.seg_len, 0.0
    memory = txl.new_memory(1, txl.config.eval_memory)
    inputs, targets = ids[:-1], ids[1:]
    with torch.no_grad():
        for start in range(0, len(inputs), seg):
            logits, memory = txl(inputs[start:start + seg].unsqueeze(0), memory)
            total += float(F.cross_entropy(logits[0], targets[start:start + seg], reduction="sum"))
    assert memory_nll(txl, ids) == pytest.approx(total, rel=1e-6)
    without_memory = sum(memory_nll(txl, ids[s:s + seg + 1]) for s in range(0, len(inputs), seg))
    assert memory_nll(txl, ids) != pytest.approx(without_memory, rel=1e-6)  # the memory matters


def test_score_text_reports_units_and_skips_unknown_characters(gpt):
    tokenizer = CharTokenizer([chr(ord("a") + i) for i in range(VOCAB)])
    text = "abcdefg€hij€klmnop"
    score = score_text(gpt, tokenizer, text, stride=CONTEXT)
    kept = text.replace("€", "")
    assert score.unknown_characters == 2 and "2 character(s)" in score.note and "€" in score.note
    assert score.tokens == len(kept) - 1 and score.characters == len(kept) - 1
    assert score.nll == full_forward_nll(gpt, torch.tensor(tokenizer.encode(kept)))
    assert score.loss == pytest.approx(score.nll / score.tokens)
    assert score.bits_per_token == pytest.approx(score.loss / math.log(2))
    assert score.bits_per_character == pytest.approx(score.bits_per_token)  # one token per character
    assert score.perplexity == pytest.approx(math.exp(score.loss))


def test_too_short_or_unknown_text_and_non_language_models_are_refused(gpt):
    tokenizer = CharTokenizer(["a", "b"])
    with pytest.raises(ValueError, match="1 token.*at least 2"):
        score_text(gpt, tokenizer, "a")
    with pytest.raises(ValueError, match="0 token.*at least 2.*skipped"):
        score_text(gpt, tokenizer, "xyz")
    with pytest.raises(ValueError, match="not a language model"):
        token_nll(torch.nn.Linear(2, 2), [1, 2, 3])
