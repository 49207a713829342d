"""Serve an exported folder (`tformer.interop.onnx_export`) with onnxruntime and numpy alone: no
PyTorch is imported, so a machine without it runs the model.

    model = OnnxModel("exported/")
    model.generate_text("ROMEO:", 100, temperature=0.8, top_k=200, seed=1)   # a CausalLM
    model.translate(["Guten Morgen!"])                                       # an encoder-decoder
    model.classify_texts(["what a lovely day"])                              # a text classifier
    model.classify(images)                                                   # (B, C, H, W) in [0, 1]

Greedy decoding gives tformer's tokens (`tformer.inference.generate` / `translate`): the same
prompt layout (left padding), the same stop rule (finished rows go on with the pad token until
every row has stopped). Sampling draws from numpy's generator, reproducible with `seed` (the
tokens differ from torch's sampler, the distribution is the same).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from tformer.tokenizers import Tokenizer, load_tokenizer

MANIFEST, FORMAT = "manifest.json", "tformer-onnx"
LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
MAX_NEW_TOKENS = 100_000  # as tformer.inference.generate
# onnxruntime fusions left off: SkipLayerNormalization (residual Add + LayerNorm in one contrib op) is
# slower on CPU than the two ops it replaces (MiniLM-L6 at batch 32 x 64, 1 thread, onnxruntime 1.32:
# 53 ms vs 7 ms LayerNormalization + 5 ms Add per batch; sentences/s 80 -> 86.5, benchmarks/RESULTS.md)
SLOW_FUSIONS = ("SkipLayerNormFusion",)


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise ValueError(f"{folder} holds no {MANIFEST}; give a folder written by tformer's ONNX export")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tformer ONNX manifest (format {data.get('format')!r})")
    return data


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(-1, keepdims=True)


def filter_logits(logits: np.ndarray, top_k: int | None, top_p: float | None) -> np.ndarray:
    """Logits outside the top-k / nucleus set -> -inf (B, V), as tformer's `filter_logits`."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = -np.partition(-logits, top_k - 1, axis=-1)[:, top_k - 1:top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")
        probs = softmax(np.take_along_axis(logits, order, -1))
        drop_sorted = (np.cumsum(probs, -1) - probs) >= top_p  # mass of the tokens ranked above
        drop_sorted[:, 0] = False
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        logits = np.where(drop, -np.inf, logits)
    return logits


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not isinstance(temperature, (int, float)) or not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a whole number >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


class Sampler:
    """Next tokens (B,) from last-position logits (B, V): argmax at temperature 0, else a draw."""

    def __init__(self, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None) -> None:
        check_sampling(temperature, top_k, top_p)
        self.temperature, self.top_k, self.top_p = float(temperature), top_k, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        logits = logits.astype(np.float32)
        if self.temperature < np.finfo(np.float32).tiny:
            return logits.argmax(-1)
        probs = softmax(filter_logits(logits.astype(np.float64) / self.temperature, self.top_k, self.top_p))
        draws = self.rng.random((len(probs), 1))
        return np.minimum((np.cumsum(probs, -1) < draws).sum(-1), probs.shape[-1] - 1)


def check_count(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number in [{low}, {high:,}], got {value!r}")
    return value


def left_pad(prompts: Sequence[Sequence[int]], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths -> ids (B, T) and mask (B, T), padded on the left."""
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("give at least one prompt, each with at least one token")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):], mask[i, width - len(prompt):] = list(prompt), 1
    return ids, mask


def right_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = list(row), 1
    return ids, mask


class OnnxModel:
    """An exported folder opened in onnxruntime (CPU). `optimization`: onnxruntime's graph
    optimisation level (disable | basic | extended | all); `threads`: intra-op threads (None:
    onnxruntime's default, one per physical core)."""

    def __init__(self, folder: str | Path, *, optimization: str = "all", threads: int | None = None) -> None:
        self.folder = Path(folder).expanduser()
        self.manifest = read_manifest(self.folder)
        self.kind: str = self.manifest["kind"]
        if optimization not in LEVELS:
            raise ValueError(f"optimization must be one of {sorted(LEVELS)}, got {optimization!r}")
        options = ort.SessionOptions()
        options.graph_optimization_level = LEVELS[optimization]
        if threads is not None:
            options.intra_op_num_threads = check_count("threads", threads, 1, 1024)
        self.sessions = {name: ort.InferenceSession(str(self.folder / graph["file"]), options,
                                                    providers=["CPUExecutionProvider"],
                                                    disabled_optimizers=list(SLOW_FUSIONS))
                         for name, graph in self.manifest["graphs"].items()}
        tokenizer = self.manifest.get("tokenizer")
        self.tokenizer: Tokenizer | None = load_tokenizer(self.folder / tokenizer) if tokenizer else None
        self.decoder: dict[str, Any] = self.manifest.get("decoder", {})

    def _need(self, *kinds: str) -> None:
        if self.kind not in kinds:
            raise ValueError(f"this export is a {self.kind} ({self.manifest['family']}); that needs a "
                             f"{' or '.join(kinds)}")

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.folder} holds no tokenizer: give token ids instead of text")
        return self.tokenizer

    # -- classifiers and encoders ---------------------------------------------------------------
    def classify(self, inputs: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Logits (B, classes): token ids (B, T) with mask (B, T), or images (B, C, H, W) in [0, 1].
        A text encoder without classes returns its outputs (hidden states or per-token logits)."""
        self._need("text_classifier", "text_encoder", "image_classifier")
        name = next(iter(self.sessions))
        if self.kind == "image_classifier":
            return self.sessions[name].run(None, {"images": np.asarray(inputs, dtype=np.float32)})[0]
        ids = np.asarray(inputs, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"token ids must be a non-empty (batch, length) array, got shape {ids.shape}")
        if ids.shape[1] > self.manifest["max_tokens"]:
            raise ValueError(f"{ids.shape[1]} tokens exceed the model's limit of {self.manifest['max_tokens']}")
        mask = np.ones_like(ids) if mask is None else np.asarray(mask, dtype=np.int64)
        return self.sessions[name].run(None, {"input_ids": ids, "attention_mask": mask})[0]

    # -- causal language models ------------------------------------------------------------------
    def _empty_past(self, batch: int) -> dict[str, Any]:
        feed: dict[str, Any] = {"past_mask": np.zeros((batch, 0), dtype=np.int64)}
        for i, (heads, dim) in enumerate(self.decoder["kv_shapes"]):
            for kind in ("key", "value"):
                feed[f"past_{kind}_{i}"] = np.zeros((batch, heads, 0, dim), dtype=np.float32)
        return feed

    def _causal_step(self, feed: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """Run the decoder graph; the logits (B, V) and the present K/V as the next past (OrtValues:
        they stay in onnxruntime's memory between steps)."""
        session = self.sessions["decoder"]
        names = [o.name for o in session.get_outputs()]
        values = {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v) for k, v in feed.items()}
        outputs = session.run_with_ort_values(names, values)
        past = {name.replace("present_", "past_"): value for name, value in zip(names[1:], outputs[1:])}
        return outputs[0].numpy(), past

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               stop_tokens: Sequence[int] = (), pad_id: int | None = None) -> Iterator[np.ndarray]:
        """The next token of every prompt (B,), step by step (see `generate`)."""
        self._need("causal_lm")
        sampler = Sampler(temperature, top_k, top_p, seed)
        ids, mask = left_pad(prompts)
        self._check_decoding(ids, max_new_tokens)
        stop = np.asarray(list(stop_tokens), dtype=np.int64)
        pad = pad_id if pad_id is not None else (int(stop[0]) if len(stop) else 0)
        B = ids.shape[0]
        logits, past = self._causal_step({"input_ids": ids, "attention_mask": mask, **self._empty_past(B)})
        past_mask, finished = mask, np.zeros(B, dtype=bool)
        for step in range(max_new_tokens):
            token = np.where(finished, pad, sampler(logits)).astype(np.int64)
            yield token
            finished |= np.isin(token, stop)
            if step == max_new_tokens - 1 or finished.all():
                return
            new_mask = np.ones((B, 1), dtype=np.int64)
            logits, past = self._causal_step({"input_ids": token[:, None], "attention_mask": new_mask,
                                              "past_mask": past_mask, **past})
            past_mask = np.concatenate([past_mask, new_mask], 1)

    def _check_decoding(self, ids: np.ndarray, max_new_tokens: int) -> None:
        check_count("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
        vocab, context = self.decoder["vocab_size"], self.decoder["context_length"]
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"token id {int(ids.max() if ids.max() >= vocab else ids.min())} is outside the "
                             f"vocabulary [0, {vocab})")
        if ids.shape[1] + max_new_tokens > context:
            raise ValueError(f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's context length ({context}); shorten the prompt or generate fewer tokens")

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, **options: Any) -> np.ndarray:
        """Prompts (token lists, left-padded for you) -> (B, T + n): the padded prompts and the new
        tokens, n <= max_new_tokens. Options: temperature (0: greedy), top_k, top_p, seed,
        stop_tokens, pad_id (default: the first stop token), as `tformer.inference.generate`."""
        ids, _ = left_pad(prompts)
        steps = list(self.stream(prompts, max_new_tokens, **options))
        return np.concatenate([ids, np.stack(steps, 1)], 1)

    def generate_text(self, prompt: str, max_new_tokens: int = 200, **options: Any) -> str:
        """The prompt's continuation (without the prompt); stops at the tokenizer's end-of-text."""
        self._need("causal_lm")
        tokenizer = self._need_tokenizer()
        ids = tokenizer.encode(prompt)
        if not ids:
            raise ValueError("the prompt encodes to no tokens; give some text")
        eos = self.decoder.get("eos_id")
        options.setdefault("stop_tokens", [] if eos is None else [eos])
        new = self.generate([ids], max_new_tokens, **options)[0, len(ids):].tolist()
        return tokenizer.decode([t for t in new if t not in options["stop_tokens"]])

    # -- encoder-decoders ------------------------------------------------------------------------
    def generate_conditioned(self, conditions: Sequence[Sequence[int]], max_new_tokens: int | None = None, *,
                             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                             seed: int | None = None) -> list[list[int]]:
        """Output tokens for each condition (source sentence, image condition), without <bos> and
        cut before <eos>: the encoder graph once, then one decoder step per token, as
        `tformer.inference.translate` decodes a batch greedily (or by sampling)."""
        self._need("conditional_decoder")
        d = self.decoder
        if len(conditions) == 0 or any(len(c) == 0 for c in conditions):
            raise ValueError("give at least one condition, each with at least one token")
        if max(len(c) for c in conditions) > d["condition_length"]:
            raise ValueError(f"a condition has {max(len(c) for c in conditions)} tokens, more than the model's "
                             f"{d['condition_length']}; shorten it")
        src, src_mask = right_pad(conditions, d.get("pad_id", 0))
        n = max_new_tokens or min(d["context_length"] - 1, 2 * src.shape[1] + 10)
        check_count("max_new_tokens", n, 1, d["context_length"] - 1)
        sampler, eos = Sampler(temperature, top_k, top_p, seed), d.get("eos_id")
        pad = d.get("pad_id", eos if eos is not None else 0)
        tokens = self._decode_conditioned(src, src_mask, n, sampler, eos, pad)
        return [row[:row.index(eos)] if eos in row else row for row in tokens.tolist()]

    def _decode_conditioned(self, src: np.ndarray, src_mask: np.ndarray, n: int, sampler: Sampler,
                            eos: int | None, pad: int) -> np.ndarray:
        B, L = src.shape[0], self.decoder["n_layers"]
        encoder = self.sessions["encoder"]
        names = [o.name for o in encoder.get_outputs()]
        bos = np.full((B, 1), self.decoder["bos_id"], dtype=np.int64)
        out = encoder.run_with_ort_values(names, {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in
                                                  {"condition_ids": src, "condition_mask": src_mask, "input_ids": bos}.items()})
        logits = out[0].numpy()
        past = {name.replace("present_", "past_"): v for name, v in zip(names[1:1 + 2 * L], out[1:1 + 2 * L])}
        cross = dict(zip(names[1 + 2 * L:], out[1 + 2 * L:]))
        mask_value, finished, steps = ort.OrtValue.ortvalue_from_numpy(src_mask), np.zeros(B, dtype=bool), []
        step_session = self.sessions["decoder"]
        step_names = [o.name for o in step_session.get_outputs()]
        for step in range(n):
            token = np.where(finished, pad, sampler(logits)).astype(np.int64)
            steps.append(token)
            finished |= (token == eos) if eos is not None else False
            if step == n - 1 or finished.all():
                break
            feed = {"input_ids": ort.OrtValue.ortvalue_from_numpy(token[:, None]), "condition_mask": mask_value,
                    **past, **cross}
            out = step_session.run_with_ort_values(step_names, feed)
            logits = out[0].numpy()
            past = {name.replace("present_", "past_"): v for name, v in zip(step_names[1:], out[1:])}
        return np.stack(steps, 1)

    def translate(self, sentences: Sequence[str], max_new_tokens: int | None = None, **options: Any) -> list[str]:
        """Translations of `sentences` (greedy unless temperature > 0; see `generate_conditioned`)."""
        self._need("conditional_decoder")
        tokenizer = self._need_tokenizer()
        if isinstance(sentences, str) or not sentences:
            raise ValueError("translate takes a non-empty list of sentences")
        sources = [ids[:self.decoder["condition_length"]] for ids in tokenizer.encode_batch(list(sentences))]
        tokens = self.generate_conditioned(sources, max_new_tokens, **options)
        special = {self.decoder.get(k) for k in ("pad_id", "bos_id", "eos_id")}
        return [tokenizer.decode([t for t in row if t not in special]) for row in tokens]


__all__ = ["OnnxModel", "Sampler", "filter_logits", "read_manifest"]
