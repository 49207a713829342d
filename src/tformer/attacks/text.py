"""Black- and white-box attacks on any `TextClassifier`, offline, on the run's own tokenizer and
embeddings: character typos, word substitution from the model's embedding neighbours, and
HotFlip-style gradient-guided word flips. All untargeted: an attack succeeds when the model's
prediction leaves the true label.

    results = typo_attack(run.model, run.tokenizer, texts, labels, max_queries=300, max_share=0.15)
    results[0].attacked, results[0].changed, results[0].queries

Every attack works on words (letters and apostrophes; digits and punctuation are never touched),
changes each word at most once, and stops when the label flips, when `floor(max_share * words)`
words are changed, or when `max_queries` texts (the clean one included) went through the model
for that example; a batch of k candidate texts counts k queries, a gradient 1. The last change
the share allows is kept only if it flips the label (else the next words are tried), so a
sentence allowing one change is searched for a one-word flip. A candidate text
that becomes longer than the model reads is discarded unclassified. Stop words are never
attacked nor proposed.

- `typo_attack`: words ranked by importance, each gets the typo (swap adjacent letters, drop a
  letter, insert or substitute a QWERTY neighbour) that lowers the true class most (TextBugger's
  character bugs, Li et al. 2019).
- `word_substitution_attack`: words ranked by importance, candidates are the word's cosine
  nearest neighbours in the model's token-embedding table among whole-word tokens (no subword
  pieces, no special tokens); the first candidate, by similarity, that flips the label wins, else
  the one lowering the true class most (TextFooler's greedy loop, Jin et al. 2020, without its
  downloaded counter-fitted vectors and sentence encoder).
- `hotflip_attack`: the first-order estimate (e_new - e_old) . dLoss/de of replacing each
  single-token word by each whole-word token (Ebrahimi et al. 2018), the `beam` best flips
  verified by real forward passes, greedily.

Importance ("deletion"): the drop of the true-class probability when the word is removed (one
query per word); ("gradient"): the norm of dLoss/de summed over the word's tokens (one query).

Embedding neighbours of a sentiment word are often its antonyms (good / bad share contexts):
`meaning_guard` refuses a replacement whose class distribution as a lone word ("[CLS] w [SEP]")
differs from the original word's by more than this total-variation distance, i.e. the model
itself reads the two words as carrying different labels. It is computed once per vocabulary
(`WordVocabulary.lone_word_probabilities`), not counted in any example's queries.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.attacks.embedding import added, check_text_classifier, embedding_table, find_token_embedding
from tformer.attacks.words import (KEYBOARD_NEIGHBOURS, STOP_WORDS, TYPO_KINDS, Typo, Words, make_typo, match_case,
                                   typo_candidates)
from tformer.data.labelled import encode_texts, pad_rows, special_ids

RANKINGS = ("deletion", "gradient")


# -- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextAttackResult:
    """One example's attack. status: "succeeded" (the label left `true_label`), "failed", or
    "skipped" (the clean prediction was already wrong: nothing to attack). `changed` holds word
    indices of the original text; `replacements` the (old, new) words in that order."""

    text: str
    attacked: str
    status: str
    changed: tuple[int, ...]
    replacements: tuple[tuple[str, str], ...]
    n_words: int
    queries: int
    seconds: float
    true_label: str
    clean_label: str
    clean_probability: float  # of clean_label
    adversarial_label: str
    adversarial_probability: float  # of adversarial_label

    @property
    def success(self) -> bool:
        return self.status == "succeeded"

    @property
    def share_changed(self) -> float:
        return len(self.changed) / self.n_words if self.n_words else 0.0


class Victim:
    """The model seen through texts: encodes with `encode_texts` (what training uses), counts
    every text it classifies against one example's budget."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_queries: int) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.specials = special_ids(tokenizer)
        self.max_queries, self.queries = max_queries, 0

    @property
    def remaining(self) -> int:
        return self.max_queries - self.queries

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        return encode_texts(texts, self.tokenizer, self.specials, max_length=10**9)

    def batch(self, rows: Sequence[np.ndarray]) -> tuple[Tensor, Tensor]:
        ids, mask = pad_rows(rows, self.specials.pad)
        device = next(self.model.parameters()).device
        return ids.to(device), mask.to(device)

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """(n, C) class probabilities; rows of texts longer than the model reads are NaN (no query)."""
        rows = self.encode(texts)
        fits = [i for i, row in enumerate(rows) if len(row) <= self.model.max_tokens]
        out = np.full((len(texts), len(self.model.labels)), np.nan)
        if fits:
            with torch.no_grad():
                logits = self.model.classify(*self.batch([rows[i] for i in fits]))
            out[fits] = F.softmax(logits.float(), -1).cpu().numpy()
        self.queries += len(fits)
        return out

    def gradient(self, text: str, label: int, layer: nn.Module) -> tuple[Tensor, Tensor]:
        """(token ids (T,), dLoss/de (T, D)): cross-entropy of `label` against the token
        embeddings of `text` (one query)."""
        ids, mask = self.batch(self.encode([text]))
        delta = torch.zeros(*ids.shape, layer.embedding_dim, device=ids.device, requires_grad=True)
        with added(layer, delta):
            loss = F.cross_entropy(self.model.classify(ids, mask).float(), torch.tensor([label], device=ids.device))
        (grad,) = torch.autograd.grad(loss, delta)
        self.queries += 1
        return ids[0], grad[0]


# -- the model's whole-word vocabulary --------------------------------------------------------------


@dataclass
class WordVocabulary:
    """The whole-word tokens of a model's tokenizer: a token whose text is letters only (>= 2),
    not a stop word, not special, and which is exactly what `encode(" " + word)` gives; with its
    row of the token-embedding table (as the embedding layer outputs it)."""

    model: nn.Module
    tokenizer: Any
    ids: Tensor  # (W,) token ids
    words: tuple[str, ...]
    vectors: Tensor  # (W, D) embeddings
    row_of: dict[int, int] = field(default_factory=dict)  # token id -> row
    _lone: np.ndarray | None = None

    @classmethod
    def build(cls, model: nn.Module, tokenizer: Any) -> WordVocabulary:
        check_text_classifier(model)
        specials = special_ids(tokenizer)
        probe = torch.tensor([[specials.cls, specials.sep]], device=next(model.parameters()).device)
        table = embedding_table(find_token_embedding(model, probe, torch.ones_like(probe)))
        special = set(tokenizer.special_tokens.values())
        texts = [tokenizer.decode([i]).strip() for i in range(table.shape[0])]
        keep = [i for i, w in enumerate(texts) if i not in special and len(w) >= 2 and w.isalpha()
                and w.lower() not in STOP_WORDS]
        encoded = tokenizer.encode_batch([" " + texts[i] for i in keep])
        ids = [i for i, e in zip(keep, encoded) if e == [i]]
        if not ids:
            raise ValueError("the tokenizer has no whole-word tokens (letters only, one token each): word "
                             "attacks need a word-level or subword vocabulary")
        index = torch.tensor(ids)
        return cls(model, tokenizer, index, tuple(texts[i] for i in ids), table[index.to(table.device)].cpu(),
                   {i: r for r, i in enumerate(ids)})

    def row(self, word: str) -> int | None:
        """The vocabulary row of a word the tokenizer reads as one whole-word token, else None."""
        encoded = self.tokenizer.encode(" " + word)
        return self.row_of.get(encoded[0]) if len(encoded) == 1 else None

    def neighbours(self, row: int, k: int) -> list[int]:
        """The k rows of highest cosine similarity to `row` (itself and same-text words excluded)."""
        unit = F.normalize(self.vectors, dim=-1)
        order = torch.argsort(unit @ unit[row], descending=True, stable=True).tolist()
        word = self.words[row].lower()
        return [r for r in order if r != row and self.words[r].lower() != word][:k]

    def lone_word_probabilities(self) -> np.ndarray:
        """(W, C) the model's class probabilities of each word alone, "[CLS] word [SEP]"."""
        if self._lone is None:
            specials = special_ids(self.tokenizer)
            device = next(self.model.parameters()).device
            rows = torch.stack([torch.full_like(self.ids, specials.cls), self.ids, torch.full_like(self.ids, specials.sep)], 1)
            parts = []
            with torch.no_grad():
                for chunk in rows.to(device).split(1024):
                    parts.append(F.softmax(self.model.classify(chunk, torch.ones_like(chunk)).float(), -1).cpu())
            self._lone = torch.cat(parts).numpy()
        return self._lone

    def same_meaning(self, row: int, candidates: list[int], guard: float | None) -> list[int]:
        """The candidates whose lone-word class distribution is within `guard` (total variation)
        of the word's; all of them when guard is None."""
        if guard is None:
            return candidates
        lone = self.lone_word_probabilities()
        return [c for c in candidates if 0.5 * float(np.abs(lone[c] - lone[row]).sum()) <= guard]


# -- checks and the shared loop ------------------------------------------------------------------------


def _check_limits(max_queries: int, max_share: float, ranking: str) -> None:
    if not (isinstance(max_queries, int) and max_queries >= 2):
        raise ValueError(f"max_queries must be an integer >= 2 (the clean text and one candidate), got {max_queries!r}")
    if not (isinstance(max_share, (int, float)) and 0 < max_share <= 1):
        raise ValueError(f"max_share (the share of words an attack may change) must be in (0, 1], got {max_share!r}")
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, got {ranking!r}")


def _check_texts(model: nn.Module, tokenizer: Any, texts: Sequence[str], labels: Sequence[int | str] | None) -> list[int | None]:
    check_text_classifier(model)
    if isinstance(texts, str) or not len(texts):
        raise ValueError("give a list of one or more texts to attack")
    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"got {len(labels)} labels for {len(texts)} texts; give one label per text (or None)")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text {i + 1} is empty; give texts with words to attack")
    encode_texts(texts, tokenizer, special_ids(tokenizer), max_length=model.max_tokens, too_long="error")
    names = model.labels
    out: list[int | None] = []
    for label in labels if labels is not None else [None] * len(texts):
        if isinstance(label, str) and label in names:
            label = names.index(label)
        if label is not None and not (isinstance(label, (int, np.integer)) and 0 <= label < len(names)):
            raise ValueError(f"label {label!r} is not one of the model's classes ({', '.join(names)})")
        out.append(None if label is None else int(label))
    return out


@dataclass
class State:
    """One example under attack."""

    words: Words
    truth: int
    probs: np.ndarray  # (C,) at the current text
    changes: dict[int, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.words.replaced(self.changes)

    @property
    def flipped(self) -> bool:
        return int(np.argmax(self.probs)) != self.truth


def _eligible(words: Words) -> list[int]:
    return [i for i in range(len(words)) if words[i].lower() not in STOP_WORDS]


def _importance(victim: Victim, state: State, ranking: str, layer: nn.Module | None) -> list[int]:
    """Eligible word indices, most important first (stable for ties)."""
    eligible = _eligible(state.words)
    if ranking == "gradient" and eligible:
        ids, grad = victim.gradient(state.text, state.truth, layer)
        norms = grad.norm(dim=-1).cpu().numpy()
        spans = token_positions(victim, state.words)
        scores = [float(norms[list(spans[i])].sum()) if spans[i] else 0.0 for i in eligible]
    else:
        eligible = eligible[:max(victim.remaining - 1, 0)]
        probs = victim.probabilities([state.words.replaced({i: ""}) for i in eligible]) if eligible else np.zeros((0, 1))
        scores = [state.probs[state.truth] - (p[state.truth] if np.isfinite(p).all() else state.probs[state.truth])
                  for p in probs]
    return [eligible[j] for j in np.argsort(-np.asarray(scores, dtype=float), kind="stable")]


def token_positions(victim: Victim, words: Words) -> list[range]:
    """Positions of each word's tokens in [CLS] text [SEP]: encodings of the text up to the word's
    start and end differ by exactly its tokens (pre-tokenizers split at spaces and punctuation)."""
    prefixes = [words.text[:s] for s, _ in words.spans] + [words.text[:e] for _, e in words.spans]
    lengths = [len(e) for e in victim.tokenizer.encode_batch(prefixes)]
    n = len(words)
    return [range(1 + lengths[i], 1 + lengths[n + i]) for i in range(n)]


def _try(victim: Victim, state: State, i: int, options: list[str], must_flip: bool) -> bool:
    """Classify the text with word i replaced by each option (within the budget): keep the first
    option that flips the label, else (unless `must_flip`: the last word the share allows) the
    one lowering the true class most if it does. Returns whether the state changed."""
    options = options[:victim.remaining]
    if not options:
        return False
    probs = victim.probabilities([state.words.replaced({**state.changes, i: o}) for o in options])
    return _keep(state, [(i, o) for o in options], probs, must_flip)


def _keep(state: State, options: list[tuple[int, str]], probs: np.ndarray, must_flip: bool) -> bool:
    """Take the first (word, replacement) whose row of probs flips the label, else the one
    lowering the true class most, if it does and a flip is not required."""
    true_p = np.where(np.isfinite(probs[:, state.truth]), probs[:, state.truth], np.inf)
    flips = [j for j in range(len(options)) if np.isfinite(true_p[j]) and int(np.argmax(probs[j])) != state.truth]
    best = flips[0] if flips else int(np.argmin(true_p))
    if not flips and (must_flip or not true_p[best] < state.probs[state.truth]):
        return False
    i, word = options[best]
    state.changes[i], state.probs = word, probs[best]
    return True


def _attack_each(model: nn.Module, tokenizer: Any, texts: Sequence[str], labels: Sequence[int | str] | None,
                 max_queries: int, max_share: float, ranking: str,
                 attack_one: Callable[[Victim, State, int], None]) -> list[TextAttackResult]:
    """Shared frame: checks, the clean query, skip misclassified texts, time and count each."""
    _check_limits(max_queries, max_share, ranking)
    truths = _check_texts(model, tokenizer, texts, labels)
    was_training = model.training
    model.eval()
    try:
        results = []
        for text, truth in zip(texts, truths):
            started, victim = time.perf_counter(), Victim(model, tokenizer, max_queries)
            clean = victim.probabilities([text])[0]
            truth = int(np.argmax(clean)) if truth is None else truth
            state = State(Words.of(text), truth, clean)
            if not state.flipped:
                attack_one(victim, state, math.floor(max_share * len(state.words) + 1e-9))
            status = "skipped" if int(np.argmax(clean)) != truth else "succeeded" if state.flipped else "failed"
            results.append(_result(model, state, clean, status, victim.queries, time.perf_counter() - started))
        return results
    finally:
        model.train(was_training)


def _result(model: nn.Module, state: State, clean: np.ndarray, status: str, queries: int,
            seconds: float) -> TextAttackResult:
    names, order = model.labels, sorted(state.changes)
    clean_label, adversarial_label = int(np.argmax(clean)), int(np.argmax(state.probs))
    return TextAttackResult(state.words.text, state.text, status, tuple(order),
                            tuple((state.words[i], state.changes[i]) for i in order), len(state.words),
                            queries, seconds, names[state.truth], names[clean_label], float(clean[clean_label]),
                            names[adversarial_label], float(state.probs[adversarial_label]))


def _layer_if(ranking: str, model: nn.Module, tokenizer: Any) -> nn.Module | None:
    if ranking != "gradient":
        return None
    specials = special_ids(tokenizer)
    probe = torch.tensor([[specials.cls, specials.sep]], device=next(model.parameters()).device)
    return find_token_embedding(model, probe, torch.ones_like(probe))


# -- the attacks -----------------------------------------------------------------------------------------


def typo_attack(model: nn.Module, tokenizer: Any, texts: Sequence[str], labels: Sequence[int | str] | None = None,
                *, max_queries: int = 300, max_share: float = 0.15, candidates_per_word: int = 24,
                ranking: str = "deletion", seed: int = 0) -> list[TextAttackResult]:
    """Greedy character typos on the most important words (see the module docstring); each
    word's candidates are `candidates_per_word` typos drawn (seeded) from `typo_candidates`."""
    if not (isinstance(candidates_per_word, int) and candidates_per_word >= 1):
        raise ValueError(f"candidates_per_word must be an integer >= 1, got {candidates_per_word!r}")
    rng = np.random.default_rng(seed)
    layer = _layer_if(ranking, model, tokenizer)

    def attack_one(victim: Victim, state: State, max_changed: int) -> None:
        for i in _importance(victim, state, ranking, layer):
            if len(state.changes) >= max_changed or state.flipped or victim.remaining <= 0:
                return
            typos = typo_candidates(state.words[i])
            pick = rng.permutation(len(typos))[:candidates_per_word]
            _try(victim, state, i, [typos[j].result for j in sorted(pick)], len(state.changes) == max_changed - 1)

    return _attack_each(model, tokenizer, texts, labels, max_queries, max_share, ranking, attack_one)


def word_substitution_attack(model: nn.Module, tokenizer: Any, texts: Sequence[str],
                             labels: Sequence[int | str] | None = None, *, max_queries: int = 300,
                             max_share: float = 0.15, neighbours: int = 30, ranking: str = "deletion",
                             meaning_guard: float | None = None,
                             vocabulary: WordVocabulary | None = None) -> list[TextAttackResult]:
    """Greedy replacement of the most important words by their embedding neighbours (see the
    module docstring). `vocabulary`: a prebuilt `WordVocabulary.build(model, tokenizer)` to reuse."""
    if not (isinstance(neighbours, int) and neighbours >= 1):
        raise ValueError(f"neighbours must be an integer >= 1, got {neighbours!r}")
    _check_guard(meaning_guard)
    check_text_classifier(model)
    vocab = vocabulary or WordVocabulary.build(model, tokenizer)
    layer = _layer_if(ranking, model, tokenizer)

    def attack_one(victim: Victim, state: State, max_changed: int) -> None:
        for i in _importance(victim, state, ranking, layer):
            if len(state.changes) >= max_changed or state.flipped or victim.remaining <= 0:
                return
            row = vocab.row(state.words[i])
            if row is None:
                continue
            rows = vocab.same_meaning(row, vocab.neighbours(row, neighbours), meaning_guard)
            _try(victim, state, i, [match_case(state.words[i], vocab.words[r]) for r in rows],
                 len(state.changes) == max_changed - 1)

    return _attack_each(model, tokenizer, texts, labels, max_queries, max_share, ranking, attack_one)


def hotflip_attack(model: nn.Module, tokenizer: Any, texts: Sequence[str], labels: Sequence[int | str] | None = None,
                   *, max_queries: int = 300, max_share: float = 0.15, beam: int = 10,
                   meaning_guard: float | None = None, vocabulary: WordVocabulary | None = None) -> list[TextAttackResult]:
    """Greedy HotFlip on single-token words (see the module docstring): each round one gradient,
    then the `beam` flips of largest estimated loss increase are classified for real."""
    if not (isinstance(beam, int) and beam >= 1):
        raise ValueError(f"beam must be an integer >= 1, got {beam!r}")
    _check_guard(meaning_guard)
    check_text_classifier(model)
    vocab = vocabulary or WordVocabulary.build(model, tokenizer)
    layer = _layer_if("gradient", model, tokenizer)
    table = embedding_table(layer).cpu()

    def attack_one(victim: Victim, state: State, max_changed: int) -> None:
        while len(state.changes) < max_changed and not state.flipped and victim.remaining >= 2:
            ranked = _estimated_flips(victim, state, vocab, table, layer, beam, meaning_guard)
            last = len(state.changes) == max_changed - 1
            # the last change the share allows must flip: go down the ranking, a beam at a time
            for start in range(0, len(ranked) if last else min(beam, len(ranked)), beam):
                options = ranked[start:start + beam][:victim.remaining]
                if not options:
                    return
                texts = [state.words.replaced({**state.changes, i: w}) for i, w in options]
                if _keep(state, options, victim.probabilities(texts), last):
                    break
            else:
                return

    return _attack_each(model, tokenizer, texts, labels, max_queries, max_share, "gradient", attack_one)


def _estimated_flips(victim: Victim, state: State, vocab: WordVocabulary, table: Tensor, layer: nn.Module,
                     beam: int, guard: float | None) -> list[tuple[int, str]]:
    """(word index, replacement) by first-order loss increase (e_new - e_old) . g, largest first:
    the `beam` best whole-word tokens of each unchanged single-token word."""
    text = state.text
    current = Words.of(text)  # word indices are stable: replacements are single words
    ids, grad = victim.gradient(text, state.truth, layer)
    grad = grad.cpu()
    spans = token_positions(victim, current)
    scored: list[tuple[float, int, int]] = []
    for i in _eligible(state.words):
        row = vocab.row(state.words[i])
        if i in state.changes or len(spans[i]) != 1 or row is None:
            continue
        p = spans[i][0]
        gain = vocab.vectors @ grad[p] - float(table[int(ids[p])] @ grad[p])  # (W,)
        gain[row] = -math.inf
        top = torch.topk(gain, min(beam * 4, len(gain))).indices.tolist()
        for r in vocab.same_meaning(row, top, guard)[:beam]:
            scored.append((float(gain[r]), i, r))
    scored.sort(key=lambda s: -s[0])
    return [(i, match_case(state.words[i], vocab.words[r])) for _, i, r in scored]


def _check_guard(guard: float | None) -> None:
    if guard is not None and not (isinstance(guard, (int, float)) and 0 <= guard <= 1):
        raise ValueError(f"meaning_guard is a total-variation distance in [0, 1] (or None), got {guard!r}")


ATTACKS: dict[str, Callable[..., list[TextAttackResult]]] = {
    "typo": typo_attack, "substitution": word_substitution_attack, "hotflip": hotflip_attack}

__all__ = ["ATTACKS", "KEYBOARD_NEIGHBOURS", "STOP_WORDS", "TYPO_KINDS", "TextAttackResult", "Typo", "Victim",
           "WordVocabulary", "Words", "hotflip_attack", "make_typo", "match_case", "token_positions",
           "typo_attack", "typo_candidates", "word_substitution_attack"]
