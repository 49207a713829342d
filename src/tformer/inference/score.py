"""Score a text with a language model: the negative log-likelihood of every token, reported in
nats and bits per token and per character, and perplexity. Any `CausalLM` is scored in sliding
windows over its context, any `MemoryLM` (Transformer-XL) in segments with its memory carried;
`tformer evaluate RUN --text FILE` prints the result.

    score = score_file("runs/gpt-shakespeare-char", "hamlet.txt")
    score.bits_per_character, score.perplexity, score.tokens
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.models.protocols import CausalLM, MemoryLM, can
from tformer.nn.modes import evaluating
from tformer.runs import Run, open_run
from tformer.tokenizers import BPETokenizer, CharTokenizer, HFJsonTokenizer, Tokenizer

BATCH_WINDOWS = 8  # windows of equal length scored in one forward pass


@dataclass(frozen=True)
class TextScore:
    """Summed negative log-likelihood of the scored tokens and what it means per token and per
    character. The text's first token is context only (nothing precedes it to predict it from), so
    `tokens` and `characters` count what comes after it."""

    nll: float  # nats, summed over the scored tokens
    tokens: int  # tokens scored
    characters: int  # characters those tokens spell
    unknown_characters: int = 0  # characters the tokenizer does not know (skipped before scoring)
    note: str = ""  # how unknown characters were handled

    @property
    def loss(self) -> float:
        """Mean nats per token."""
        return self.nll / self.tokens

    @property
    def bits_per_token(self) -> float:
        return self.loss / math.log(2)

    @property
    def bits_per_character(self) -> float:
        return self.nll / math.log(2) / max(self.characters, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))  # exp(>709) overflows a float

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "bits_per_token": self.bits_per_token,
                "bits_per_character": self.bits_per_character, "perplexity": self.perplexity,
                "tokens": self.tokens, "characters": self.characters,
                "unknown_characters": self.unknown_characters, "note": self.note}


def causal_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows `(lo, first, end)` over `n_tokens` tokens: feed ids[lo:end-1], score the targets
    ids[first:end] (target t is predicted from ids[lo:t]). Targets 1 .. n-1 come in runs of
    `stride`, each scored exactly once, in a window that ends at its run and reaches as far back as
    the context allows: every target sees at least `context - stride + 1` tokens of left context
    (all there is near the start)."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be between 1 and the model's context length ({context}), got {stride}")
    windows = []
    for first in range(1, n_tokens, stride):
        end = min(first + stride, n_tokens)
        windows.append((max(0, end - 1 - context), first, end))
    return windows


def _equal_length_batches(windows: list[tuple[int, int, int]], size: int) -> Iterator[list[tuple[int, int, int]]]:
    """Consecutive windows whose inputs have the same length, at most `size` at a time."""
    group: list[tuple[int, int, int]] = []
    for window in windows:
        if group and (len(group) == size or window[2] - window[0] != group[0][2] - group[0][0]):
            yield group
            group = []
        group.append(window)
    if group:
        yield group


@torch.no_grad()
def causal_nll(model: CausalLM, ids: Tensor, *, stride: int | None = None,
               batch_size: int = BATCH_WINDOWS) -> float:
    """Summed NLL (nats) of ids[1:] (1-D) under a causal LM, in sliding windows of its context
    (default stride: half the context, so each token sees at least half a context before it)."""
    context = int(model.config.context_length)
    stride = max(1, context // 2) if stride is None else stride
    total = 0.0
    with evaluating(model):  # type: ignore[arg-type]
        for group in _equal_length_batches(causal_windows(len(ids), context, stride), batch_size):
            inputs = torch.stack([ids[lo:end - 1] for lo, _, end in group])  # (B, window)
            logits = model(inputs)  # type: ignore[operator]  # (B, window, V)
            for row, (lo, first, end) in zip(logits, group):
                total += float(F.cross_entropy(row[first - lo - 1:].float(), ids[first:end], reduction="sum"))
    return total


@torch.no_grad()
def memory_nll(model: MemoryLM, ids: Tensor, *, mem_len: int | None = None) -> float:
    """Summed NLL (nats) of ids[1:] (1-D) under a memory LM: segments of `config.seg_len` in order,
    the memory (default `config.eval_memory` positions) carried from one to the next."""
    seg_len = int(model.config.seg_len)
    memory = model.new_memory(1, model.config.eval_memory if mem_len is None else mem_len)
    total = 0.0
    with evaluating(model):  # type: ignore[arg-type]
        for start in range(0, len(ids) - 1, seg_len):
            end = min(start + seg_len, len(ids) - 1)
            logits, memory = model(ids[start:end].unsqueeze(0), memory)  # type: ignore[operator]
            total += float(F.cross_entropy(logits[0].float(), ids[start + 1:end + 1], reduction="sum"))
    return total


def token_nll(model: nn.Module, ids: Sequence[int] | Tensor, *, stride: int | None = None,
              mem_len: int | None = None) -> float:
    """Summed NLL (nats) of every token after the first, for any causal or memory LM."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(ids, dtype=torch.long, device=device).flatten()
    if len(ids) < 2:
        raise ValueError(f"the text is {len(ids)} token(s) long; scoring needs at least 2 (the first "
                         "is context only)")
    if can(model, CausalLM):
        return causal_nll(model, ids, stride=stride)  # type: ignore[arg-type]
    if can(model, MemoryLM):
        if stride is not None:
            raise ValueError("a stride is for the sliding windows of a causal LM; a memory LM (Transformer-XL) "
                             "reads the text in segments with its memory carried, so leave the stride out")
        return memory_nll(model, ids, mem_len=mem_len)  # type: ignore[arg-type]
    raise ValueError(f"a {type(model).__name__} is not a language model (it has neither next-token "
                     "logits with a cache nor a segment memory), so it cannot score text")


def known_text(tokenizer: Tokenizer, text: str) -> tuple[str, int, str]:
    """The text the tokenizer can encode, how many characters were dropped, and a note saying so.
    A character tokenizer knows only the characters it was built from: the others are skipped and
    counted. Byte-level BPE knows every byte. Other tokenizers map unknown text to an [UNK] token,
    which is scored as the model sees it."""
    if isinstance(tokenizer, CharTokenizer):
        known = set(tokenizer.chars)
        kept = "".join(c for c in text if c in known)
        skipped = len(text) - len(kept)
        unknown = sorted({c for c in text if c not in known})
        shown = "".join(unknown[:10]) + ("..." if len(unknown) > 10 else "")
        note = (f"{skipped} character(s) the character tokenizer does not know were skipped ({shown!r})"
                if skipped else "every character is in the character tokenizer's vocabulary")
        return kept, skipped, note
    if isinstance(tokenizer, BPETokenizer):
        return text, 0, "byte-level BPE: every byte is known, nothing was skipped"
    if isinstance(tokenizer, HFJsonTokenizer):
        unk = tokenizer.to_dict().get("model", {}).get("unk_token")
        unk_id = tokenizer.token_to_id(unk) if isinstance(unk, str) else None
        count = tokenizer.encode(text).count(unk_id) if unk_id is not None else 0
        return text, 0, f"{count} token(s) are the unknown token {unk!r}; they are scored as the model sees them"
    return text, 0, ""


def score_text(model: nn.Module, tokenizer: Tokenizer, text: str, *, stride: int | None = None,
               mem_len: int | None = None) -> TextScore:
    """Score `text` (see the module docstring); characters the tokenizer lacks are skipped."""
    kept, skipped, note = known_text(tokenizer, text)
    ids = tokenizer.encode(kept)
    if len(ids) < 2:
        raise ValueError(f"the text encodes to {len(ids)} token(s) the model knows; scoring needs at "
                         f"least 2 (the first is context only){'; ' + note if skipped else ''}")
    nll = token_nll(model, ids, stride=stride, mem_len=mem_len)
    characters = max(len(kept) - len(tokenizer.decode(ids[:1])), 1)  # the first token is context
    return TextScore(nll, len(ids) - 1, characters, skipped, note)


def read_text(path: str | Path) -> str:
    """A UTF-8 text file, or a clear error naming it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"text file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{path} is not a file; give a UTF-8 text file to score")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); give a UTF-8 text file") from None
    except OSError as e:
        raise OSError(f"cannot read {path}: {e.strerror}") from None


def score_run(run: Run, text: str, *, stride: int | None = None, mem_len: int | None = None) -> TextScore:
    """Score `text` with an opened run's language model and tokenizer."""
    if run.tokenizer is None or not (run.can(CausalLM) or run.can(MemoryLM)):
        what = ", ".join(run.capabilities) or "nothing a verb uses"
        raise ValueError(f"{run.path} holds a model that is not a language model (it can: {what}); "
                         "scoring a text needs a causal or Transformer-XL language model run")
    return score_text(run.model, run.tokenizer, text, stride=stride, mem_len=mem_len)


def score_file(run_dir: str | Path, path: str | Path, *, which: str = "best", stride: int | None = None,
               mem_len: int | None = None) -> TextScore:
    """Open a run and score a UTF-8 text file with its language model."""
    return score_run(open_run(run_dir, which), read_text(path), stride=stride, mem_len=mem_len)


__all__ = ["TextScore", "causal_nll", "causal_windows", "known_text", "memory_nll", "read_text", "score_file",
           "score_run", "score_text", "token_nll"]
