"""Text attacks: exact results on a hand-made classifier whose label is one embedding dimension of
one known word, typos that make the edit they claim, limits (queries, share of words) never
exceeded on a tiny BERT, determinism, whole-word neighbours only, one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import Tensor, nn

from tformer.attacks.text import (KEYBOARD_NEIGHBOURS, Victim, WordVocabulary, Words, hotflip_attack, make_typo,
                                  match_case, typo_attack, typo_candidates, word_substitution_attack)
from tformer.models import build_model
from tformer.tokenizers.huggingface import HFJsonTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# embedding rows [polarity, sentiment axis, topic axis, object axis]; the keyword classifier's
# "pos" logit is 10 * (sum of the polarity column over the sentence) - 5
ROWS = {"the": [0, 0, 0, 0], "is": [0, 0, 0, 0], "a": [0, 0, 0, 0], "good": [1, 5, 0, 0], "great": [1, 5, 1, 0],
        "fine": [0, 5, 0.5, 0], "movie": [0, 0, 0, 5], "film": [0, 0, 0.3, 5], "plot": [-0.2, 0, 5, 0],
        "##ish": [0, 5, 0, 0.1]}
VOCAB = {w: i for i, w in enumerate(SPECIALS + list(ROWS))}


def word_tokenizer(words: dict[str, int] = VOCAB) -> HFJsonTokenizer:
    """A lower-casing whitespace WordLevel tokenizer.json over `words` ([UNK] for anything else)."""
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for t, i in words.items() if t in SPECIALS]
    return HFJsonTokenizer({"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
                            "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
                            "post_processor": None, "decoder": None,
                            "model": {"type": "WordLevel", "vocab": words, "unk_token": "[UNK]"}})


class Keyword(nn.Module):
    """pos iff the polarity column sums to more than 1/2: "good" or "great" makes it positive."""

    labels = ("neg", "pos")
    max_tokens = 16

    def __init__(self) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(len(VOCAB), 4)
        table = torch.zeros(len(VOCAB), 4)
        for word, row in ROWS.items():
            table[VOCAB[word]] = torch.tensor(row, dtype=torch.float)
        self.tok_emb.weight.data = table

    def classify(self, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = torch.ones_like(inputs) if mask is None else mask
        logit = 10 * (self.tok_emb(inputs)[..., 0] * mask).sum(1) - 5
        return torch.stack([torch.zeros_like(logit), logit], 1)


@pytest.fixture(scope="module")
def keyword() -> tuple[Keyword, HFJsonTokenizer]:
    return Keyword(), word_tokenizer()


def test_vocabulary_holds_whole_words_only(keyword):
    vocab = WordVocabulary.build(*keyword)
    assert sorted(vocab.words) == ["film", "fine", "good", "great", "movie", "plot"]  # no specials, ##ish, stop words
    assert [vocab.words[r] for r in vocab.neighbours(vocab.row("good"), 2)] == ["great", "fine"]  # cosine order
    assert vocab.row("Good") == vocab.row("good") and vocab.row("goodish") is None


def test_substitution_takes_the_nearest_neighbour_that_flips(keyword):
    (result,) = word_substitution_attack(*keyword, ["The movie is good."], max_share=0.25)
    # importance: deleting "good" drops p(pos), "movie" does nothing; "great" (nearest) keeps pos, "fine" flips
    assert result.success and result.attacked == "The movie is fine." and result.changed == (3,)
    assert result.replacements == (("good", "fine"),) and result.adversarial_label == "neg"
    assert result.queries == 1 + 2 + 5  # clean, 2 deletions (stop words skipped), 5 neighbours in one batch


def test_the_last_allowed_change_must_flip(keyword):
    # "good great movie": replacing one positive word leaves the other, so no single change flips;
    # with one change allowed the attack keeps none (a lowering but non-flipping swap is refused)
    for attack in (word_substitution_attack, typo_attack, hotflip_attack):
        (result,) = attack(*keyword, ["good great movie"], max_share=0.34)
        assert result.status == "failed" and result.changed == () and result.attacked == "good great movie"
    (result,) = word_substitution_attack(*keyword, ["good great movie"], max_share=0.67)
    assert result.success and len(result.changed) == 2  # two changes: the first only lowers p(pos)


def test_meaning_guard_refuses_a_neighbour_the_model_reads_oppositely(keyword):
    (result,) = word_substitution_attack(*keyword, ["The movie is good."], max_share=0.25, meaning_guard=0.5)
    assert not result.success and "fine" not in result.attacked  # fine alone is "neg", good alone "pos"


def test_hotflip_takes_the_largest_first_order_gain(keyword):
    (result,) = hotflip_attack(*keyword, ["The movie is good."], max_share=0.25)
    # gain (e_new - e_good) . g with g along the polarity column: "plot" (-0.2) is the largest
    assert result.success and result.attacked == "The movie is plot." and result.queries == 1 + 1 + 10


def test_typo_on_the_keyword_flips_and_is_a_real_typo(keyword):
    results = typo_attack(*keyword, ["The movie is good.", "GREAT film"], max_share=0.5, seed=3)
    for result, word in zip(results, ("good", "GREAT")):
        assert result.success and len(result.changed) == 1
        (old, new), = result.replacements
        assert old == word and new in {t.result for t in typo_candidates(word)}
        assert result.attacked == result.text.replace(word, new)


def test_same_seed_same_attack_other_seed_may_differ(keyword):
    def run(seed):
        return [(r.attacked, r.queries) for r in typo_attack(*keyword, ["The movie is good."], max_share=0.25,
                                                             candidates_per_word=3, seed=seed)]
    assert run(0) == run(0)
    assert len({tuple(run(s)) for s in range(6)}) > 1


def test_misclassified_text_is_skipped(keyword):
    (result,) = word_substitution_attack(*keyword, ["the plot"], ["pos"], max_share=0.5)
    assert result.status == "skipped" and result.attacked == "the plot" and result.queries == 1


@pytest.fixture(scope="module")
def tiny_bert() -> tuple[nn.Module, HFJsonTokenizer]:
    words = SPECIALS + [w for w in "the a is good bad great awful fine movie film plot acting story dull fun " \
                        "boring long short nice poor best worst".split()]
    torch.manual_seed(0)
    model = build_model("bert-tiny", vocab_size=len(words), context_length=32, head="sequence",
                        labels=("neg", "pos"), init_std=0.5).eval()
    return model, word_tokenizer({w: i for i, w in enumerate(words)})


SENTENCES = ["the movie is good and the acting is fine", "a dull long boring film", "great fun", "the plot is poor",
             "the best story with the worst acting in a long film", "nice short movie"]


@pytest.mark.parametrize("attack", [typo_attack, word_substitution_attack, hotflip_attack])
@pytest.mark.parametrize("max_queries,max_share", [(2, 1.0), (7, 0.5), (40, 0.3), (200, 1.0)])
def test_limits_are_never_exceeded(tiny_bert, attack, max_queries, max_share):
    results = attack(*tiny_bert, SENTENCES, max_queries=max_queries, max_share=max_share)
    model, tokenizer = tiny_bert
    for text, result in zip(SENTENCES, results):
        assert result.queries <= max_queries
        assert len(result.changed) <= int(max_share * result.n_words + 1e-9)
        assert result.share_changed <= max_share
        assert len(Words.of(result.attacked)) == result.n_words
        # what the result says is what the model does on the attacked text
        probs = Victim(model, tokenizer, 10).probabilities([result.attacked])[0]
        assert model.labels[int(np.argmax(probs))] == result.adversarial_label
        assert result.success == (result.adversarial_label != result.true_label)


def test_attacks_succeed_sometimes_on_a_random_bert(tiny_bert):
    for attack in (typo_attack, word_substitution_attack, hotflip_attack):
        results = attack(*tiny_bert, SENTENCES, max_queries=300, max_share=1.0)
        assert any(r.success for r in results), attack.__name__


# -- typos ------------------------------------------------------------------------------------------

WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=3, max_size=12)


@settings(max_examples=60, deadline=None)
@given(WORDS)
def test_each_typo_makes_the_edit_it_claims(word):
    for typo in typo_candidates(word):
        r, i = typo.result, typo.position
        assert r != word and len(r) >= 2 and typo.word == word
        if typo.kind == "swap":
            assert r[i] == word[i + 1] and r[i + 1] == word[i] and r[:i] + r[i + 2:] == word[:i] + word[i + 2:]
        elif typo.kind == "drop":
            assert len(r) == len(word) - 1 and r == word[:i] + word[i + 1:]
        elif typo.kind == "insert":
            assert len(r) == len(word) + 1 and r[:i] + r[i + 1:] == word and r[i] == typo.char
            assert typo.char.lower() in KEYBOARD_NEIGHBOURS[word[min(i, len(word) - 1)].lower()]
        else:
            assert len(r) == len(word) and r[i] == typo.char and r[:i] + r[i + 1:] == word[:i] + word[i + 1:]
            assert typo.char.lower() in KEYBOARD_NEIGHBOURS[word[i].lower()]
    assert len({t.result for t in typo_candidates(word)}) == len(typo_candidates(word))


def test_keyboard_neighbours_are_the_touching_keys():
    assert sorted(KEYBOARD_NEIGHBOURS["g"]) == sorted("tyfhvb")
    assert sorted(KEYBOARD_NEIGHBOURS["q"]) == sorted("wa") and sorted(KEYBOARD_NEIGHBOURS["a"]) == sorted("qwsz")
    assert all(a in KEYBOARD_NEIGHBOURS[b] for a in KEYBOARD_NEIGHBOURS for b in KEYBOARD_NEIGHBOURS[a])  # symmetric


def test_words_replace_and_remove_keep_the_rest_of_the_text():
    words = Words.of("Don't stop, it's 42 times GOOD!")
    assert [words[i] for i in range(len(words))] == ["Don't", "stop", "it's", "times", "GOOD"]
    assert words.replaced({1: "go", 4: match_case("GOOD", "bad")}) == "Don't go, it's 42 times BAD!"
    assert words.replaced({3: ""}) == "Don't stop, it's 42 GOOD!"
    assert match_case("Good", "bad") == "Bad" and match_case("good", "bad") == "bad"


# -- bad input: one line each -----------------------------------------------------------------------

@pytest.mark.parametrize("call,message", [
    (lambda m, t: typo_attack(m, t, [""]), "text 1 is empty"),
    (lambda m, t: typo_attack(m, t, ["good"], max_queries=0), "max_queries"),
    (lambda m, t: typo_attack(m, t, ["good"], max_share=0), "max_share"),
    (lambda m, t: typo_attack(m, t, ["good"], max_share=1.5), "max_share"),
    (lambda m, t: word_substitution_attack(m, t, ["good"], meaning_guard=2), "meaning_guard"),
    (lambda m, t: typo_attack(m, t, ["good " * 20]), "more than max_length=16"),
    (lambda m, t: typo_attack(m, t, ["good"], ["meh"]), "not one of the model's classes"),
    (lambda m, t: typo_attack(nn.Linear(2, 2), t, ["good"]), "not a text classifier"),
    (lambda m, t: typo_attack(m, t, ["good"], ranking="random"), "ranking"),
    (lambda m, t: hotflip_attack(m, t, ["good"], beam=0), "beam"),
])
def test_bad_input_is_one_line(keyword, call, message):
    with pytest.raises(ValueError, match=message) as error:
        call(*keyword)
    assert "\n" not in str(error.value)


def test_make_typo_refuses_a_position_outside_the_word():
    with pytest.raises(ValueError, match="no 'swap' typo at position 3"):
        make_typo("abc", "swap", 3)
