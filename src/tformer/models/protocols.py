"""What a model can do, as protocols. Generic code (generation, translation, prediction, and
later explanation, attacks, OOD) asks `isinstance(model, Classifier)`, never a family's name.

A family gets a verb by having the methods below; nothing else needs to change:

    CausalLM            next-token logits with a KV cache          -> generate, beam_search, stream
    MemoryLM            next-token logits with segment memory      -> generate (Transformer-XL)
    ConditionalDecoder  bind(condition) -> CausalLM                -> translate
    ImageSampler        a ConditionalDecoder over pixel tokens      -> draw
    TextClassifier      class logits of [CLS] text [SEP] token ids -> classify sentences
    ImageClassifier     class logits of images in [0, 1]           -> classify images

A model may hold a method without the ability behind it (a BERT with a masked-LM head has no
classes): it then lists the protocol in `unsupported()`, and `can(model, Protocol)`, which generic
code uses instead of a bare isinstance, says no.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class CausalLM(Protocol):
    """`model(ids, attention_mask=..., cache=...) -> logits (B, T, V)`; `config.vocab_size`,
    `config.context_length`. Optionally `next_logits(ids, attention_mask=, cache=) -> (B, V)`, the
    last position's logits alone (generation's prefill then skips the LM head elsewhere)."""

    config: Any

    def new_cache(self, batch: int, max_len: int | None = None) -> Any: ...


@runtime_checkable
class MemoryLM(Protocol):
    """`model(ids, memory) -> (logits (B, T, V), memory)`; memory replaces a KV cache."""

    config: Any

    def new_memory(self, batch: int, mem_len: int | None = None) -> Any: ...


@runtime_checkable
class ConditionalDecoder(Protocol):
    """`bind(condition_ids, condition_mask)` encodes a condition once and returns a CausalLM over
    the output tokens; `config.pad_id/bos_id/eos_id` frame text outputs."""

    config: Any

    def bind(self, condition: Tensor, condition_mask: Tensor | None = None) -> CausalLM: ...


@runtime_checkable
class ImageSampler(ConditionalDecoder, Protocol):
    """A conditional decoder whose tokens are pixels: `to_images(tokens (N, H*W))` gives uint8
    images (N, H, W, C); `condition_names()` the conditions it was trained on."""

    def to_images(self, tokens: Tensor) -> Any: ...

    def condition_names(self) -> tuple[str, ...]: ...


@runtime_checkable
class Classifier(Protocol):
    """`classify(inputs, mask) -> logits (B, len(labels))`."""

    @property
    def labels(self) -> tuple[str, ...]: ...

    def classify(self, inputs: Tensor, mask: Tensor | None = None) -> Tensor: ...


@runtime_checkable
class TextClassifier(Classifier, Protocol):
    """Inputs are token ids (B, T) framed [CLS] ... [SEP] by the tokenizer's special tokens, at
    most `max_tokens` long; mask (B, T) is 1 for tokens, 0 for padding."""

    @property
    def max_tokens(self) -> int: ...


@runtime_checkable
class ImageClassifier(Classifier, Protocol):
    """Inputs are images (B, C, H, W) with values in [0, 1]; the model normalises them itself."""

    @property
    def image_shape(self) -> tuple[int, int, int]:  # (height, width, channels)
        ...


CAPABILITIES: dict[str, type] = {
    "causal_lm": CausalLM, "memory_lm": MemoryLM, "conditional_decoder": ConditionalDecoder,
    "image_sampler": ImageSampler, "text_classifier": TextClassifier, "image_classifier": ImageClassifier,
}


def can(model: object, protocol: type) -> bool:
    """`model` has the protocol's methods and does not disown it (see the module docstring)."""
    if not isinstance(model, protocol):
        return False
    unsupported = getattr(model, "unsupported", None)
    return not (callable(unsupported) and any(p in protocol.__mro__ for p in unsupported()))


def capabilities(model: object) -> list[str]:
    """Names of the protocols `model` satisfies (for messages and listings)."""
    return [name for name, protocol in CAPABILITIES.items() if can(model, protocol)]


__all__ = ["CAPABILITIES", "CausalLM", "Classifier", "ConditionalDecoder", "ImageClassifier", "ImageSampler",
           "MemoryLM", "TextClassifier", "can", "capabilities"]
