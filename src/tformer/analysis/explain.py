"""One explanation of one input to a trained run, whatever the model can do: what it predicted,
which input positions the prediction came from (integrated gradients, gradient-weighted rollout,
rollout) and its attention maps. `tformer explain` draws and writes it (`figures`, `page`).

    run = open_run("runs/bert-sentiment-minilm")
    e = explain(run, "a wonderful film")          # Explanation: prediction, attributions, attention

What is explained, by capability (never by family name):
    TextClassifier   the class logit (predicted, or --target) <- each token
    ImageClassifier  the class logit <- each patch (an image file or an (H, W[, C]) uint8 array)
    CausalLM         log p(next token) <- each prompt token (the model's top next token)
    MemoryLM         the same, from integrated gradients only (its attention reaches into memory)
    ImageSampler     log p(one drawn pixel) <- the pixels drawn before it, and <- the condition
    ConditionalDecoder (translation)  log p(each output token) <- each source token
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tformer.analysis.attention import attention_maps, capture_attention
from tformer.analysis.attribution import (
    blurred,
    conditional_token,
    each_output_token,
    image_class,
    integrated_gradients,
    next_token,
    text_class,
    token_baseline,
)
from tformer.analysis.rollout import explain_classifier, explain_generation
from tformer.data.labelled import encode_texts, special_ids
from tformer.inference.images import condition_ids, sample_tokens
from tformer.inference.pipeline import Pipeline
from tformer.inference.translate import translate_ids
from tformer.models.protocols import (
    CausalLM,
    ConditionalDecoder,
    ImageClassifier,
    ImageSampler,
    MemoryLM,
    TextClassifier,
)
from tformer.runs.run import Run

MAX_OUTPUT_TOKENS = 64  # translation: output tokens explained (one integrated-gradients path each)
IG = "integrated gradients"
GRADIENT_ROLLOUT = "gradient rollout"
ROLLOUT = "rollout"


@dataclass
class AttentionView:
    """Attention probabilities of one kind ("self", "encoder", "decoder", "cross") as a person
    reads them: maps (L, H, T, S) for the listed layers and heads, with row and column labels."""

    kind: str
    maps: np.ndarray  # (L, H, T, S) float32
    layers: list[int]
    heads: list[int]
    queries: list[str]
    keys: list[str]
    key_grid: tuple[int, int] | None = None  # keys are an image's pixels / patches, row-major
    note: str | None = None  # how the maps were reduced to be shown (a pruned model's uneven layers)


@dataclass
class Explanation:
    """What `explain` found for one input.

    attributions: method -> (N,) scores over `positions` (or (R, N) with one row per `rows`
    entry: a translation's output tokens). When `grid` is set the N positions are an image's
    patches or pixels, row-major, and NaN marks pixels with no score (drawn after the explained one)."""

    input: str
    verb: str  # classify, generate, translate, draw
    prediction: str
    explained: str  # what the attributions are attributions of
    positions: list[str]
    attributions: dict[str, np.ndarray]
    attention: list[AttentionView]
    rows: list[str] | None = None
    image: np.ndarray | None = None  # (H, W, C) uint8: the input image, or the drawn one
    grid: tuple[int, int] | None = None
    focus: int | None = None  # the grid cell whose prediction is explained (an image generator's pixel)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Options:
    target: str | None = None  # a class name or index (classifiers); None: the prediction
    layers: Sequence[int] | None = None  # attention layers to keep (None: all)
    heads: Sequence[int] | None = None
    n_steps: int = 32  # integrated gradients' quadrature points
    seed: int = 0  # image generators: the drawing to explain
    pixel: int | None = None  # image generators: which pixel (None: the centre)


def explain(run: Run, item: Any, options: Options = Options()) -> Explanation:
    """Explain `item` (a sentence, a prompt, an image file or array, a condition) to `run`'s model."""
    with capture_attention(run.model, layers=options.layers, heads=options.heads):
        pass  # layers and heads checked against every attention kind before any work
    for protocol, explainer in ((TextClassifier, _text_classifier), (ImageClassifier, _image_classifier),
                                (ImageSampler, _image_sampler), (ConditionalDecoder, _translator),
                                (CausalLM, _language_model), (MemoryLM, _language_model)):
        if run.can(protocol):
            explanation = explainer(run, item, options)
            explanation.notes += [view.note for view in explanation.attention if view.note]
            return explanation
    raise ValueError(f"{run.path} holds a model with nothing to explain (it cannot classify, generate, "
                     "translate or draw); explain a run fine-tuned from it")


# -- helpers ------------------------------------------------------------------------------------------

def _text(item: Any, what: str) -> str:
    if not isinstance(item, str) or not item.strip():
        raise ValueError(f"give {what} to explain (non-empty text), got {item!r}")
    return item


def token_labels(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """How each token reads: special tokens by name, others decoded one at a time."""
    names = {i: name for name, i in tokenizer.special_tokens.items()}
    return [names.get(int(i)) or visible(tokenizer.decode([int(i)])) for i in ids]


def visible(token: str) -> str:
    """A token of only white space, shown: a space as ␣, a new line as ↵, a tab as ⇥."""
    return token.translate(WHITESPACE) if token and not token.strip() else token


WHITESPACE = str.maketrans({" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"})


def _views(fn: Any, args: tuple, kwargs: dict, options: Options, labels: dict[str, tuple[list[str], list[str]]],
           *, query_row: dict[str, int] | None = None, key_grid: dict[str, tuple[int, int]] | None = None
           ) -> list[AttentionView]:
    """Attention maps of every kind the model has, as views; labels: kind -> (queries, keys).
    query_row: kind -> the one query row to keep (an image generator's explained pixel)."""
    maps = attention_maps(fn, *args, layers=options.layers, heads=options.heads, **kwargs)
    views = []
    for kind in maps.kinds:
        layers = sorted(layer for k, layer in maps if k == kind)
        heads, note = list(maps.head_ids[kind, layers[0]]), None
        if len({maps.head_ids[kind, layer] for layer in layers}) == 1:
            stacked = maps.stack(kind)[:, 0]  # (L, H, T, S) of the one example
        else:  # pruned unevenly: one panel per layer, its heads averaged
            stacked = torch.stack([m[0].mean(0, keepdim=True) for m in maps.layers(kind)])  # (L, 1, T, S)
            heads, note = ["mean"], (f"{kind} attention: the layers have different numbers of heads (pruned), "
                                     "so each layer shows the mean of its heads; --heads picks heads every "
                                     "layer has")
        queries, keys = labels.get(kind, labels.get("*", ([], [])))
        row = (query_row or {}).get(kind)
        if row is not None:
            stacked, queries = stacked[:, :, row:row + 1], [queries[row]]
        keys = keys if len(keys) == stacked.shape[-1] else [f"memory {i}" for i in range(
            stacked.shape[-1] - len(keys))] + list(keys)  # Transformer-XL: memory slots first
        views.append(AttentionView(kind, stacked.numpy(), layers, heads, list(queries), keys,
                                   (key_grid or {}).get(kind), note))
    return views


def _class_summary(logits: Tensor, labels: Sequence[str]) -> str:
    probs = torch.softmax(logits.float(), -1)[0]
    top = int(probs.argmax())
    return f"{labels[top]} (p = {float(probs[top]):.3f})"


def _gap_note(result: Any) -> str:
    gap = float(result.gap.abs().max())
    change = float((result.score - result.baseline_score).abs().max())
    return (f"integrated gradients ({result.n_steps} steps): attributions sum to F(input) - F(baseline) "
            f"within {gap:.2g} (|F(input) - F(baseline)| = {change:.3g})")


def _classifier_target(options: Options, labels: Sequence[str]) -> int | str | None:
    """--target as the classifier knows it: a class name, or an index when it is not a name."""
    target = options.target
    if target is None or target in labels:
        return target
    if target.strip().isdigit():
        return int(target)
    raise ValueError(f"unknown class {target!r}; the model's classes are {', '.join(labels)} (a name or an index)")


# -- classifiers ----------------------------------------------------------------------------------------

def _text_classifier(run: Run, item: Any, options: Options) -> Explanation:
    model, tokenizer = run.model, run.tokenizer
    text = _text(item, "a sentence")
    specials = special_ids(tokenizer)
    n = len(tokenizer.encode(text)) + 2
    if n > model.max_tokens:
        raise ValueError(f"the text is {n} tokens with [CLS] and [SEP]; this model reads at most {model.max_tokens}: "
                         "shorten it (an explanation covers the whole input, so nothing is cut)")
    row = encode_texts([text], tokenizer, specials, max_length=model.max_tokens)[0]
    ids = torch.from_numpy(row)[None]  # (1, T): [CLS] ... [SEP]
    explained = text_class(model, ids, label=_classifier_target(options, model.labels))
    target = explained.target[0]
    baseline_id = specials.mask if specials.mask is not None else specials.pad
    ig = integrated_gradients(explained, token_baseline(ids, baseline_id, keep=(specials.cls, specials.sep)),
                              n_steps=options.n_steps)
    scores = {IG: ig.per_position[0].numpy()}
    for name, method in ((GRADIENT_ROLLOUT, "gradient"), (ROLLOUT, "rollout")):
        scores[name] = explain_classifier(model, ids, target=target, method=method).scores[0].numpy()
    labels = token_labels(tokenizer, row)
    with torch.no_grad():
        prediction = _class_summary(model.classify(ids), model.labels)
    baseline = "[MASK]" if specials.mask is not None else "[PAD]"
    return Explanation(text, "classify", prediction, f"the logit of class {model.labels[target]!r}", labels,
                       scores, _views(model.classify, (ids,), {}, options, {"*": (labels, labels)}),
                       notes=[_gap_note(ig) + f"; baseline: every word token replaced by {baseline}"])


def _image_classifier(run: Run, item: Any, options: Options) -> Explanation:
    model = run.model
    image = np.array(Pipeline(run).as_image(item))  # a writable copy, (H, W, C) uint8 at the model's size
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0  # (1, C, H, W)
    explained = image_class(model, pixels, label=_classifier_target(options, model.labels))
    target = explained.target[0]
    ig = integrated_gradients(explained, blurred(pixels), n_steps=options.n_steps)
    scores = {IG: ig.per_position[0].numpy()}
    for name, method in ((GRADIENT_ROLLOUT, "gradient"), (ROLLOUT, "rollout")):
        scores[name] = explain_classifier(model, pixels, target=target, method=method).scores[0].numpy()
    g = model.config.grid_size
    patches = [f"patch ({r}, {c})" for r in range(g) for c in range(g)]
    tokens = (["[CLS]"] if model.cls_token is not None else []) + patches
    with torch.no_grad():
        prediction = _class_summary(model.classify(pixels), model.labels)
    grid = {"self": (g, g)} if model.cls_token is None else None
    return Explanation(str(item) if isinstance(item, str) else "image", "classify", prediction,
                       f"the logit of class {model.labels[target]!r}", patches, scores,
                       _views(model.classify, (pixels,), {}, options, {"*": (tokens, tokens)}, key_grid=grid),
                       image=image, grid=(g, g),
                       notes=[_gap_note(ig) + "; baseline: the image blurred (Gaussian, sigma 2 pixels)"])


# -- language models -----------------------------------------------------------------------------------

def _language_model(run: Run, item: Any, options: Options) -> Explanation:
    model, tokenizer = run.model, run.tokenizer
    prompt = _text(item, "a prompt")
    ids = tokenizer.encode(prompt)
    c = model.config  # a Transformer-XL attends over a segment and its memory: read as much at once
    limit = (getattr(c, "context_length", None) or c.seg_len + c.mem_len) - 1  # room for the next token
    if not ids or len(ids) > limit:
        raise ValueError(f"the prompt is {len(ids)} tokens; explain a prompt of 1..{limit} tokens "
                         f"(the model reads {limit + 1} at most, with the next token)")
    prompt_ids = torch.tensor([ids])
    explained = next_token(model, prompt_ids)
    token = explained.target[0]
    ig = integrated_gradients(explained, "zeros", n_steps=options.n_steps)
    scores = {IG: ig.per_position[0].numpy()}
    notes = [_gap_note(ig) + "; baseline: zero embeddings"]
    full = torch.cat([prompt_ids, torch.tensor([[token]])], 1)  # (1, T + 1): prompt + next token
    if run.can(CausalLM):
        for name, method in ((GRADIENT_ROLLOUT, "gradient"), (ROLLOUT, "rollout")):
            scores[name] = explain_generation(model, full, position=-1, method=method).scores[0].numpy()
    else:
        notes.append("rollout: not drawn for a model with segment memory (its attention rows also reach "
                     "memory slots, so they are not square)")
    labels = token_labels(tokenizer, full[0].tolist())
    with torch.no_grad():
        logits = model(prompt_ids)
        logits = logits[0] if isinstance(logits, tuple) else logits
        p = float(torch.softmax(logits[0, -1].float(), -1)[token])
    return Explanation(prompt, "generate", f"next token {labels[-1]!r} (p = {p:.3f})",
                       f"log p({labels[-1]!r} | prompt)", labels[:-1], scores,
                       _views(model, (full,), {}, options, {"*": (labels, labels)}), notes=notes)


# -- encoder-decoders ------------------------------------------------------------------------------------

def _translator(run: Run, item: Any, options: Options) -> Explanation:
    model, tokenizer = run.model, run.tokenizer
    source = tokenizer.encode(_text(item, "a sentence"))
    if not source or len(source) > model.config.context_length:
        raise ValueError(f"the sentence is {len(source)} tokens; this model reads 1..{model.config.context_length}")
    output = translate_ids(model, [source], beam_width=1, max_new_tokens=min(MAX_OUTPUT_TOKENS, model.config.context_length - 1))[0]
    c = model.config
    output = [t for t in output if t not in (c.pad_id, c.bos_id, c.eos_id)] + [c.eos_id]
    src, tgt_in = torch.tensor([source]), torch.tensor([[c.bos_id, *output[:-1]]])  # (1, S), (1, T)
    ig = integrated_gradients(each_output_token(model, src, tgt_in, torch.tensor(output)), "zeros",
                              n_steps=options.n_steps)
    source_labels, output_labels = token_labels(tokenizer, source), token_labels(tokenizer, output)
    inputs = token_labels(tokenizer, tgt_in[0].tolist())
    views = _views(model, (src, tgt_in), {}, options, {"encoder": (source_labels, source_labels),
                                                      "decoder": (inputs, inputs), "cross": (output_labels, source_labels)})
    translation = tokenizer.decode(output[:-1])
    return Explanation(str(item), "translate", translation, "log p(each output token) (rows) <- source tokens",
                       source_labels, {IG: ig.per_position.numpy()}, views, rows=output_labels,
                       notes=[_gap_note(ig) + "; one path per output token, from zero source embeddings",
                              "decoder row t predicts output token t (its input is token t - 1, or <bos>)"])


def _image_sampler(run: Run, item: Any, options: Options) -> Explanation:
    model, c = run.model, run.model.config
    condition = _text(item, "a class name or prompt")
    cond, mask = condition_ids(c, [condition], run.tokenizer)  # (1, L)
    sampling, _ = Pipeline(run).image_defaults()
    pixels = sample_tokens(model, cond, mask, sampling, seed=options.seed)  # (1, H*W), no guidance
    n = c.n_pixels
    p = n // 2 + c.width // 2 if options.pixel is None else options.pixel
    if not 0 <= p < n:
        raise ValueError(f"pixel {p} is outside the image's {n} pixels (0..{n - 1}, row-major)")
    prefix = torch.cat([torch.full((1, 1), c.bos_id), pixels[:, :p]], 1)  # (1, p + 1): <bos> + pixels before p
    token = int(pixels[0, p])
    on_pixels = integrated_gradients(conditional_token(model, cond, prefix, token=token, side="output"), "zeros",
                                     n_steps=options.n_steps)
    on_condition = integrated_gradients(conditional_token(model, cond, prefix, token=token), "zeros",
                                        n_steps=options.n_steps)
    heat = np.full(n, np.nan, dtype=np.float32)
    heat[:p] = on_pixels.per_position[0, 1:].numpy()  # <bos> (position 0) has no pixel
    cond_labels = ([condition] if c.condition == "label" else list(condition))[:cond.shape[1]]
    pixel_labels = [f"pixel ({i // c.width}, {i % c.width})" for i in range(n)]
    inputs = ["<bos>"] + pixel_labels[:-1]
    views = _views(model, (cond, pixels), {"cond_mask": mask}, options,
                   {"decoder": (pixel_labels, inputs), "cross": (pixel_labels, cond_labels),
                    "encoder": (cond_labels, cond_labels)}, query_row={"decoder": p, "cross": p})
    for view in views:
        if view.kind == "decoder":  # keys: <bos>, then pixels 0..n-2: onto the image, the last pixel unseen
            unseen = np.full(view.maps.shape[:-1] + (1,), np.nan, dtype=np.float32)
            view.maps = np.concatenate([view.maps[..., 1:], unseen], -1)
            view.keys, view.key_grid = pixel_labels, (c.height, c.width)
    r, col = divmod(p, c.width)
    condition_scores = ", ".join(f"{label!r}: {v:+.3f}" for label, v in
                                 zip(cond_labels, on_condition.per_position[0].tolist()))
    return Explanation(condition, "draw", f"an image drawn for {condition!r} (seed {options.seed})",
                       f"log p(pixel ({r}, {col}) = palette colour {token}) <- the pixels drawn before it",
                       pixel_labels, {IG: heat}, views, image=model.to_images(pixels)[0], grid=(c.height, c.width), focus=p,
                       notes=[_gap_note(on_pixels) + "; baseline: zero embeddings",
                              f"the same log-probability attributed to the condition: {condition_scores}"])


__all__ = ["GRADIENT_ROLLOUT", "IG", "ROLLOUT", "AttentionView", "Explanation", "Options", "explain",
           "token_labels", "visible"]
