"""Typo sweeps and attacked sentences for people: typos land where and as often as the rate says,
seeded; accuracy equals direct classification at rate 0 and is exact on a keyword classifier at
rate 1; the curve is a PNG; changed words are marked and the rest escaped (markdown, HTML)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from tformer.analysis.text_robustness import (mark_changes, plot_typo_sweeps, sweep_table, typo_sweep,
                                              with_typos)
from tformer.attacks.text import TextAttackResult, Victim, Words, typo_candidates, word_substitution_attack
from tformer.tokenizers.huggingface import HFJsonTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POLARITY = {"the": 0, "is": 0, "a": 0, "good": 1, "fine": 0, "movie": 0, "film": 0, "plot": 0}
VOCAB = {w: i for i, w in enumerate(SPECIALS + list(POLARITY))}


def word_tokenizer() -> HFJsonTokenizer:
    """A lower-casing whitespace WordLevel tokenizer.json ([UNK] for any other word)."""
    added = [{"id": VOCAB[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t in SPECIALS]
    return HFJsonTokenizer({"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                            "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
                            "post_processor": None, "decoder": None,
                            "model": {"type": "WordLevel", "vocab": VOCAB, "unk_token": "[UNK]"}})


class Keyword(nn.Module):
    """"pos" iff the text holds "good"; "fine" is good's nearest embedding neighbour."""

    labels = ("neg", "pos")
    max_tokens = 16

    def __init__(self) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(len(VOCAB), 3)
        table = torch.zeros(len(VOCAB), 3)
        table[VOCAB["good"]] = torch.tensor([1.0, 5.0, 0.0])
        table[VOCAB["fine"]] = torch.tensor([0.0, 5.0, 0.5])
        table[VOCAB["movie"]], table[VOCAB["film"]] = torch.tensor([0.0, 0.0, 5.0]), torch.tensor([0.0, 0.3, 5.0])
        table[VOCAB["plot"]] = torch.tensor([0.0, -3.0, 1.0])
        self.tok_emb.weight.data = table

    def classify(self, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = torch.ones_like(inputs) if mask is None else mask
        logit = 10 * (self.tok_emb(inputs)[..., 0] * mask).sum(1) - 5
        return torch.stack([torch.zeros_like(logit), logit], 1)


def test_typos_hit_the_share_of_words_asked_and_are_seeded():
    text = "The film is good, the plot is a mess and it is too long."
    words = Words.of(text)
    for rate in (0.0, 0.2, 0.5, 1.0):
        noisy, changed = with_typos(text, rate, np.random.default_rng(7))
        typeable = [i for i in range(len(words)) if len(words[i]) >= 3]
        assert len(changed) == min(round(rate * len(words)), len(typeable)) and set(changed) <= set(typeable)
        after = Words.of(noisy)
        for i in range(len(words)):
            if i in changed:
                assert after[i] in {t.result for t in typo_candidates(words[i])}
            else:
                assert after[i] == words[i]
        assert (noisy, changed) == with_typos(text, rate, np.random.default_rng(7))
    assert with_typos(text, 0.0, np.random.default_rng(0)) == (text, ())


def test_sweep_is_exact_on_the_keyword_classifier():
    model, tokenizer = Keyword(), word_tokenizer()
    texts = ["the good", "good movie", "the plot", "a movie is a film"]
    labels = ["pos", "pos", "neg", 0]
    sweep = typo_sweep(model, tokenizer, texts, labels, rates=(0.0, 1.0), seed=0)
    direct = Victim(model, tokenizer, 10).probabilities(texts).argmax(1)
    assert sweep.accuracy[0] == float(np.mean(direct == np.array([1, 1, 0, 0]))) == 1.0
    # at rate 1 every >= 3-letter word is misspelt: "good" becomes [UNK], so both positives turn negative
    assert sweep.accuracy[1] == 0.5 and sweep.n_texts == 4
    assert sweep == typo_sweep(model, tokenizer, texts, labels, rates=(0.0, 1.0), seed=0)
    table = sweep_table({"keyword": sweep})
    assert "| 0.00 | 0.000 | 1.000 |" in table and "| 1.00 |" in table


def test_curve_is_a_png(tmp_path):
    model, tokenizer = Keyword(), word_tokenizer()
    sweep = typo_sweep(model, tokenizer, ["the good", "the plot"], ["pos", "neg"], rates=(0.0, 0.5, 1.0))
    path = plot_typo_sweeps({"a": sweep, "b": sweep}, tmp_path / "sweep.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_changed_words_are_marked_and_the_rest_escaped():
    model, tokenizer = Keyword(), word_tokenizer()
    (result,) = word_substitution_attack(model, tokenizer, ["The <b>movie</b> is *good*"], max_share=0.5)
    assert result.success and result.replacements == (("good", "fine"),)
    assert mark_changes(result) == r"The \<b\>movie\</b\> is \*~~good~~ **fine**\*"
    assert mark_changes(result, "html") == "The &lt;b&gt;movie&lt;/b&gt; is *<del>good</del> <ins>fine</ins>*"
    unchanged = TextAttackResult("a film", "a film", "failed", (), (), 2, 1, 0.0, "neg", "neg", 0.9, "neg", 0.9)
    assert mark_changes(unchanged) == "a film"


@pytest.mark.parametrize("call,message", [
    (lambda m, t: typo_sweep(m, t, ["good"], ["pos"], rates=(0.1, 1.5)), "typo rates are shares"),
    (lambda m, t: typo_sweep(m, t, ["good", "bad"], ["pos"]), "one label per text"),
    (lambda m, t: typo_sweep(object(), t, ["good"], ["pos"]), "not a text classifier"),
    (lambda m, t: mark_changes(None, "latex"), "style must be"),
])
def test_bad_input_is_one_line(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call(Keyword(), word_tokenizer())
    assert "\n" not in str(error.value)
