"""The words of a text and the typos of a word, the raw material of the text attacks (`text`)
and the typo sweeps (`analysis.text_robustness`); plain Python, no model.

    words = Words.of("Don't buy it."); words[0], words.replaced({2: "take"})
    typo_candidates("great")   # swaps, drops, QWERTY-neighbour inserts and substitutions
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

TYPO_KINDS = ("swap", "drop", "insert", "substitute")
WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")  # letters, with inner apostrophes (don't, it's)
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves s t don't isn't wasn't it's i'm didn't
doesn't aren't weren't can't couldn't won't wouldn't shouldn't haven't hasn't hadn't i've i'd i'll you're
""".split())
QWERTY_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
QWERTY_OFFSETS = (0.0, 0.5, 1.0)  # each row's stagger, in key widths (half a key per row)


def _keyboard_neighbours() -> dict[str, str]:
    """Letter -> the letters whose keys touch it on a staggered QWERTY keyboard (centres within 1.2
    key widths): g -> t, y, f, h, v, b."""
    centres = {ch: (col + QWERTY_OFFSETS[row], float(row))
               for row, keys in enumerate(QWERTY_ROWS) for col, ch in enumerate(keys)}
    return {ch: "".join(other for other, (x2, y2) in centres.items()
                        if other != ch and math.hypot(x - x2, y - y2) < 1.2)
            for ch, (x, y) in centres.items()}


KEYBOARD_NEIGHBOURS = _keyboard_neighbours()


# -- typos ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Typo:
    """One character edit of `word` at letter `position`: swap (with the next letter), drop,
    insert `char` before it, or substitute it by `char`; `result` is the edited word."""

    kind: str
    word: str
    position: int
    char: str
    result: str


def _same_case(template: str, ch: str) -> str:
    return ch.upper() if template.isupper() else ch


def make_typo(word: str, kind: str, position: int, char: str = "") -> Typo:
    """Apply one edit (see `Typo`); a position outside the word is one ValueError line."""
    limit = len(word) - (1 if kind == "swap" else 0) + (1 if kind == "insert" else 0)
    if kind not in TYPO_KINDS or not 0 <= position < limit:
        raise ValueError(f"no {kind!r} typo at position {position} of {word!r} (kinds: {', '.join(TYPO_KINDS)})")
    if kind == "swap":
        result = word[:position] + word[position + 1] + word[position] + word[position + 2:]
    elif kind == "drop":
        result = word[:position] + word[position + 1:]
    elif kind == "insert":
        result = word[:position] + char + word[position:]
    else:
        result = word[:position] + char + word[position + 1:]
    return Typo(kind, word, position, char, result)


def typo_candidates(word: str) -> list[Typo]:
    """Every distinct typo of a word of >= 3 letters that leaves >= 2 letters and changes it:
    swaps of different adjacent letters, drops, inserts of a key neighbouring the next (or last)
    letter, substitutions by a neighbouring key; in that order, first of equal results kept."""
    if len(word) < 3:
        return []
    edits = [make_typo(word, "swap", i) for i in range(len(word) - 1) if word[i] != word[i + 1]]
    edits += [make_typo(word, "drop", i) for i in range(len(word))]
    for i in range(len(word) + 1):
        anchor = word[min(i, len(word) - 1)]
        edits += [make_typo(word, "insert", i, _same_case(anchor, ch))
                  for ch in KEYBOARD_NEIGHBOURS.get(anchor.lower(), "")]
    for i, letter in enumerate(word):
        edits += [make_typo(word, "substitute", i, _same_case(letter, ch))
                  for ch in KEYBOARD_NEIGHBOURS.get(letter.lower(), "")]
    seen, unique = {word}, []
    for edit in edits:
        if edit.result not in seen:
            seen.add(edit.result)
            unique.append(edit)
    return unique


# -- words of a text -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Words:
    """A text and the character spans of its words."""

    text: str
    spans: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, text: str) -> Words:
        return cls(text, tuple(m.span() for m in WORD.finditer(text)))

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int) -> str:
        start, end = self.spans[i]
        return self.text[start:end]

    def replaced(self, changes: dict[int, str]) -> str:
        """The text with word i replaced by changes[i] ('' removes it and one space beside it)."""
        out, cursor = [], 0
        for i in sorted(changes):
            start, end = self.spans[i]
            if not changes[i]:  # removal: also eat one neighbouring space
                if end < len(self.text) and self.text[end] == " ":
                    end += 1
                elif start > 0 and self.text[start - 1] == " " and start - 1 >= cursor:
                    start -= 1
            out += [self.text[cursor:start], changes[i]]
            cursor = end
        return "".join(out + [self.text[cursor:]])


def match_case(old: str, new: str) -> str:
    """`new` written with the capitalisation of `old` (GOOD -> BAD, Good -> Bad)."""
    if len(old) > 1 and old.isupper():
        return new.upper()
    return new[:1].upper() + new[1:] if old[:1].isupper() else new


__all__ = ["KEYBOARD_NEIGHBOURS", "STOP_WORDS", "TYPO_KINDS", "WORD", "Typo", "Words", "make_typo", "match_case",
           "typo_candidates"]
