"""Translation with an encoder-decoder: batches of similar-length sources are encoded once and
decoded greedily, by sampling or by beam search through the shared generation code
(`generate`, `beam_search`) on the model's `BoundDecoder`.

    hypotheses = translate(model, tokenizer, ["Guten Morgen!"], beam_width=4)
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from tformer.data.pairs import TokenBatches, pad_right
from tformer.inference.beam import MAX_BEAM_WIDTH, beam_search
from tformer.inference.generate import MAX_NEW_TOKENS, MAX_ROWS, Sampling, check_count, generate
from tformer.models.seq2seq import Seq2Seq
from tformer.nn.modes import evaluating
from tformer.tokenizers.base import Tokenizer

log = logging.getLogger(__name__)

MAX_TOKENS_PER_BATCH = 1_000_000  # source tokens decoded together (rows x longest)


def default_max_new_tokens(model: Seq2Seq, source_len: int) -> int:
    """2 x the longest source + 10 (room for a wordier target language), within the context."""
    return min(model.config.context_length - 1, 2 * source_len + 10)


def _check_sources(model: Seq2Seq, sources: Sequence[Sequence[int]], too_long: str) -> list[list[int]]:
    if too_long not in ("truncate", "error"):
        raise ValueError(f"too_long must be 'truncate' or 'error', got {too_long!r}")
    if len(sources) == 0:
        raise ValueError("no sentences to translate")
    limit, checked, cut = model.config.context_length, [], 0
    for i, src in enumerate(sources):
        if len(src) == 0:
            raise ValueError(f"sentence {i} is empty (no tokens): give some text to translate")
        if len(src) > limit:
            if too_long == "error":
                raise ValueError(f"sentence {i} has {len(src)} tokens, more than the model's context "
                                 f"length ({limit}); shorten it or pass too_long='truncate'")
            cut += 1
        checked.append([int(t) for t in src[:limit]])
    if cut:
        log.warning("truncated %d sentence(s) longer than the context length (%d tokens)", cut, limit)
    return checked


def _strip(tokens: Sequence[int], eos: int) -> list[int]:
    """Tokens up to (without) the first eos."""
    tokens = list(tokens)
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def _decode_batch(model: Seq2Seq, batch: list[list[int]], beam_width: int, length_penalty: float,
                  max_new_tokens: int | None, sampling: Sampling | None, seed: int | None) -> list[list[int]]:
    """Target tokens (without <bos>/<eos>) of one batch of sources."""
    c, device = model.config, model.out_proj.weight.device
    src_ids, src_mask = pad_right(batch, c.pad_id)
    n = max_new_tokens or default_max_new_tokens(model, src_ids.shape[1])
    with torch.inference_mode():
        decoder = model.bind(src_ids.to(device), src_mask.to(device))
    prompt = torch.full((len(batch), 1), c.bos_id, dtype=torch.long, device=device)
    if beam_width == 1:
        out = generate(decoder, prompt, n, sampling, stop_tokens=[c.eos_id], pad_id=c.pad_id, seed=seed)
        return [_strip(row, c.eos_id) for row in out[:, 1:].tolist()]
    hyps = beam_search(decoder, prompt, beam_width, n, eos_token=c.eos_id, length_penalty=length_penalty)
    return [_strip(h[0].tokens, c.eos_id) for h in hyps]


def _check_sizes(model: Seq2Seq, beam_width: int, max_new_tokens: int | None, max_tokens: int) -> None:
    """Refuse sizes that cannot fit before any work (`--beam 100000` would allocate a KV cache per
    beam and never finish)."""
    check_count("beam_width", beam_width, 1, MAX_BEAM_WIDTH, "every beam keeps a KV cache in memory; "
                "4 to 10 is usual")
    if max_new_tokens is not None:
        check_count("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS, "each token is a decoding step")
    check_count("max_tokens", max_tokens, 1, MAX_TOKENS_PER_BATCH,
                "source tokens per batch; the decoder state grows with it")


def _batches(lengths: list[int], max_tokens: int, max_rows: int) -> list[np.ndarray]:
    """TokenBatches' batches (similar lengths together, at most `max_tokens` tokens), each cut
    to at most `max_rows` sentences."""
    return [indices[i:i + max_rows] for indices in TokenBatches(lengths, max_tokens).in_order()
            for i in range(0, len(indices), max_rows)]


def translate_ids(model: Seq2Seq, sources: Sequence[Sequence[int]], *, beam_width: int = 1,
                  length_penalty: float = 1.0, max_new_tokens: int | None = None,
                  sampling: Sampling | None = None, seed: int | None = None,
                  max_tokens: int = 4096, too_long: str = "error") -> list[list[int]]:
    """Target token ids for each source (in the given order), without <bos>/<eos>.

    beam_width 1: greedy (or `sampling`, seeded); more: beam search with `length_penalty`.
    Sources are sorted by length and decoded in batches of at most `max_tokens` source tokens
    (rows x longest). max_new_tokens: None for 2 x the batch's longest source + 10. too_long:
    'error' or 'truncate' a source longer than the model's context.
    """
    _check_sizes(model, beam_width, max_new_tokens, max_tokens)
    if sampling is not None and beam_width > 1:
        raise ValueError("sampling and beam search do not combine: pass one of them")
    sources = _check_sources(model, sources, too_long)
    results: list[list[int]] = [[] for _ in sources]
    with evaluating(model):  # beams multiply the decoded rows: at most MAX_ROWS rows x beams
        for indices in _batches([len(s) for s in sources], max_tokens, MAX_ROWS // beam_width):
            batch = [sources[i] for i in indices]
            for i, tokens in zip(indices, _decode_batch(model, batch, beam_width, length_penalty,
                                                        max_new_tokens, sampling, seed)):
                results[i] = tokens
    return results


def translate(model: Seq2Seq, tokenizer: Tokenizer, sentences: Sequence[str], *, beam_width: int = 1,
              length_penalty: float = 1.0, max_new_tokens: int | None = None,
              sampling: Sampling | None = None, seed: int | None = None, max_tokens: int = 4096,
              too_long: str = "error") -> list[str]:
    """Translations of `sentences` (see translate_ids for the options)."""
    if isinstance(sentences, str):
        raise TypeError("translate takes a list of sentences; wrap a single one in a list")
    ids = translate_ids(model, tokenizer.encode_batch(list(sentences)), beam_width=beam_width,
                        length_penalty=length_penalty, max_new_tokens=max_new_tokens,
                        sampling=sampling, seed=seed, max_tokens=max_tokens, too_long=too_long)
    special = {model.config.pad_id, model.config.bos_id, model.config.eos_id}
    return [tokenizer.decode([t for t in tokens if t not in special]) for tokens in ids]
