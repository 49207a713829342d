"""Beam search finds what exhaustive enumeration finds, reduces to greedy at width 1, gives the
same hypotheses for a prompt alone or in a left-padded batch, and matches transformers' beam search."""

import itertools
import math

import pytest
import torch

from tformer.inference.beam import Hypothesis, beam_search
from tformer.inference.generate import generate, pad_prompts
from tformer.models import build_model

V = 5
PROMPT = [1, 2, 3]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("gpt-nano", vocab_size=V, n_layers=2).eval()


def all_continuations(model, prompt, n):
    """Every continuation of n tokens, (V**n, n), and the log-prob of each of its prefixes
    (V**n, n) cumulated, from one full forward pass without a cache (independent of beam.py)."""
    conts = torch.tensor(list(itertools.product(range(V), repeat=n)))  # (V**n, n)
    ids = torch.cat([torch.tensor(prompt).expand(len(conts), -1), conts], dim=1)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).double(), -1)  # (V**n, T + n, V)
    steps = log_probs[:, len(prompt) - 1:-1].gather(-1, conts.unsqueeze(-1)).squeeze(-1)  # (V**n, n)
    return conts, steps.cumsum(-1)


def exhaustive_candidates(model, n, eos, length_penalty):
    """Every distinct continuation of at most n tokens that stops at its first eos -> its score."""
    conts, cumulative = all_continuations(model, PROMPT, n)
    candidates = {}
    for row, cum in zip(conts.tolist(), cumulative.tolist()):
        length = row.index(eos) + 1 if eos in row else n
        candidates[tuple(row[:length])] = cum[length - 1] / length ** length_penalty
    return candidates


def check_against_enumeration(hyps, candidates):
    """hyps are the best len(hyps) candidates, with their scores (ties may come in any order)."""
    best = sorted(candidates.values(), reverse=True)[:len(hyps)]
    assert [h.score for h in hyps] == pytest.approx(best, abs=1e-5)
    for h in hyps:  # every log-prob, not only the best one's, matches a full forward pass
        assert h.score == pytest.approx(candidates[tuple(h.tokens)], abs=1e-5)


def test_exhaustive_optimum_without_eos(model):
    n = 3
    conts, cumulative = all_continuations(model, PROMPT, n)
    totals = cumulative[:, -1]
    best, second = totals.topk(2).values
    assert best - second > 1e-4  # the optimum is unique, so the tokens must match it
    width = V ** (n - 1)
    hyps = beam_search(model, torch.tensor([PROMPT]), width, n, length_penalty=0.0, n_best=width)[0]
    assert hyps[0].tokens == conts[totals.argmax()].tolist()
    assert hyps[0].log_prob == pytest.approx(float(best), abs=1e-5)
    assert hyps[0].score == pytest.approx(float(best), abs=1e-5)
    check_against_enumeration(hyps, exhaustive_candidates(model, n, None, 0.0))


@pytest.mark.parametrize("n", [3, 4])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 3.0])
def test_exhaustive_optimum_with_eos(model, n, length_penalty):
    """With width V**(n-1) every prefix stays live, and early_stopping=False stops only when
    nothing can beat the kept hypotheses, so the W best length-normalised sequences are found."""
    eos = 4
    candidates = exhaustive_candidates(model, n, eos, length_penalty)
    width = V ** (n - 1)
    hyps = beam_search(model, [PROMPT], width, n, length_penalty=length_penalty,
                       early_stopping=False, eos_token=eos, n_best=width)[0]
    ranked = sorted(candidates, key=lambda t: -candidates[t])
    assert candidates[ranked[0]] - candidates[ranked[1]] > 1e-4
    assert hyps[0].tokens == list(ranked[0])
    check_against_enumeration(hyps, candidates)


def test_width_one_is_greedy(model):
    ids = torch.tensor([PROMPT, [4, 0, 2]])
    greedy = generate(model, ids, 10)[:, len(PROMPT):]
    result = beam_search(model, ids, 1, 10)
    assert [hyps[0].tokens for hyps in result] == greedy.tolist()


@pytest.mark.parametrize("early_stopping", [True, False])
def test_batched_left_padded_prompts_match_each_alone(model, early_stopping):
    prompts = [[1, 2, 3, 4, 0], [2], [3, 1]]
    ids, mask = pad_prompts(prompts)
    kwargs = dict(eos_token=0, n_best=4, early_stopping=early_stopping)
    batched = beam_search(model, ids, 4, 6, attention_mask=mask, **kwargs)
    for prompt, hyps in zip(prompts, batched):
        [alone] = beam_search(model, torch.tensor([prompt]), 4, 6, **kwargs)
        assert [h.tokens for h in hyps] == [h.tokens for h in alone]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in alone], abs=1e-5)


def test_eos_ends_hypotheses_and_n_best_is_sorted(model):
    n, eos, lp = 6, 3, 1.0
    for early_stopping in (True, False):
        hyps = beam_search(model, [PROMPT], 4, n, eos_token=eos, n_best=4, length_penalty=lp,
                           early_stopping=early_stopping)[0]
        assert len(hyps) == 4 and all(isinstance(h, Hypothesis) for h in hyps)
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        assert any(h.tokens[-1] == eos for h in hyps)  # eos is likely enough to be emitted here
        for h in hyps:
            assert eos not in h.tokens[:-1] and 1 <= len(h.tokens) <= n
            assert len(h.tokens) == n or h.tokens[-1] == eos
            assert h.score == pytest.approx(h.log_prob / len(h.tokens) ** lp)
            # the log-prob is that of the tokens under a full forward pass
            ids = torch.tensor([PROMPT + h.tokens])
            with torch.no_grad():
                log_probs = torch.log_softmax(model(ids)[0, len(PROMPT) - 1:-1].double(), -1)
            expected = log_probs.gather(-1, torch.tensor(h.tokens).unsqueeze(-1)).sum()
            assert h.log_prob == pytest.approx(float(expected), abs=1e-5)


def test_searching_on_never_does_worse(model):
    """early_stopping=False runs the same steps as True, then keeps looking."""
    kwargs = dict(eos_token=3, length_penalty=1.0)
    stopped = beam_search(model, [PROMPT], 3, 8, early_stopping=True, **kwargs)[0][0]
    searched = beam_search(model, [PROMPT], 3, 8, early_stopping=False, **kwargs)[0][0]
    assert searched.score >= stopped.score - 1e-6


def test_fewer_continuations_than_n_best(model):
    """One new token has only V continuations: the filler beams (-inf) are not returned."""
    hyps = beam_search(model, [PROMPT], 2 * V, 1, eos_token=0, n_best=2 * V)[0]
    assert sorted(h.tokens for h in hyps) == [[t] for t in range(V)]
    assert all(math.isfinite(h.score) for h in hyps)


# (beam_width, max_new_tokens, length_penalty, early_stopping, eos_token) for the parity test.
# early_stopping=False cases that need the right bound: with lp > 0 HF's cur-len heuristic
# stops too soon on (3, 8, 2.0) and (2, 12, 3.0); with lp < 0 a max-len bound stops too soon
# on (3, 8, -2.0). (2, 4, 1.0, True, 3): a prompt fills up at the last step, where live beams
# still compete.
HF_CASES = [(2, 6, 1.0, True, 3), (2, 4, 1.0, True, 3), (3, 6, 1.0, False, 3),
            (3, 8, 2.0, False, 4), (3, 5, 0.0, True, 0), (2, 12, 3.0, False, 2),
            (3, 8, -2.0, False, 2), (3, 5, 1.0, False, None), (5, 9, 0.5, True, 2)]


@pytest.mark.parametrize("width, n, length_penalty, early_stopping, eos", HF_CASES)
def test_matches_transformers_beam_search(tmp_path, width, n, length_penalty, early_stopping, eos):
    """Parity with Hugging Face's beam search on the same weights exported as GPT-2; our
    early_stopping=False is its "never" (an exact bound), True is its True."""
    transformers = pytest.importorskip("transformers")
    from tformer.interop import save_gpt2

    torch.manual_seed(1)
    model = build_model("gpt-nano", vocab_size=V, n_layers=2, init_std=0.3).eval()  # peakier
    hf = transformers.GPT2LMHeadModel.from_pretrained(save_gpt2(model, tmp_path / "gpt2")).eval()
    ids, mask = pad_prompts([[1, 2, 3, 4, 0], [2], [3, 1]])
    ours = beam_search(model, ids, width, n, attention_mask=mask, length_penalty=length_penalty,
                       early_stopping=early_stopping, eos_token=eos, n_best=width)
    out = hf.generate(ids, attention_mask=mask.long(), num_beams=width, num_return_sequences=width,
                      max_new_tokens=n, do_sample=False, length_penalty=length_penalty,
                      early_stopping=early_stopping or "never", eos_token_id=eos,
                      pad_token_id=0 if eos is None else eos, output_scores=True,
                      return_dict_in_generate=True)
    sequences = out.sequences[:, ids.shape[1]:].view(len(ours), width, -1).tolist()
    scores = out.sequences_scores.view(len(ours), width).tolist()
    for hyps, hf_sequences, hf_scores in zip(ours, sequences, scores):
        hf_tokens = [s[:s.index(eos) + 1] if eos in s else s for s in hf_sequences]  # drop padding
        assert [h.tokens for h in hyps] == hf_tokens
        assert [h.score for h in hyps] == pytest.approx(hf_scores, rel=1e-5, abs=1e-4)


def test_restores_training_mode(model):
    model.train()
    try:
        beam_search(model, [PROMPT], 2, 2)
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize("kwargs, message", [
    (dict(beam_width=0), "beam_width"),
    (dict(n_best=0), "n_best"),
    (dict(n_best=3), "n_best"),
    (dict(eos_token=V), "eos_token"),
    (dict(eos_token=-1), "eos_token"),
    (dict(length_penalty=math.nan), "length_penalty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=64), "context length"),
    (dict(beam_width=100_000), r"beam_width=100000 is more than 256 \(every beam keeps a KV cache"),
    (dict(beam_width=2.0), "beam_width must be a whole number"),
    (dict(length_penalty="1"), "length_penalty must be a finite number"),
    (dict(length_penalty=-2000.0), r"length_penalty must be in \[-10, 10\]"),  # was ZeroDivisionError
])
def test_bad_input(model, kwargs, message):
    args = dict(beam_width=2, max_new_tokens=3) | kwargs
    with pytest.raises(ValueError, match=message):
        beam_search(model, [PROMPT], **args)


def test_bad_prompt(model):
    with pytest.raises(ValueError, match="empty"):
        beam_search(model, torch.tensor([[1, 2]]), 2, 3, attention_mask=torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="left-padded"):
        beam_search(model, torch.tensor([[1, 2, 0]]), 2, 3, attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError):
        beam_search(model, torch.tensor([[1, V]]), 2, 3)  # token outside the vocabulary


def test_prompts_times_beams_are_bounded(model):
    from tformer.inference.generate import MAX_ROWS
    with pytest.raises(ValueError, match=r"prompts x beam_width=.* is more than"):
        beam_search(model, torch.ones(MAX_ROWS // 4 + 1, 2, dtype=torch.long), 4, 2)
