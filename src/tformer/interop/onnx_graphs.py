"""The torch modules that ONNX export traces: a model's inference as functions of plain tensors.

A graph cannot hold tformer's Python cache objects, so each generative model is exported as two
functions with its KV cache as explicit inputs and outputs, the layout of Hugging Face's ONNX
exports (the K/V of every layer concatenated along the sequence, per-row validity as a mask):

    prefill(input_ids (B, T), attention_mask (B, T))
        -> logits (B, V) of the last position, present_key_i / present_value_i (B, Hkv_i, T, D)
    step(input_ids (B, 1), attention_mask (B, P + 1), past_key_i / past_value_i (B, Hkv_i, P, D))
        -> logits (B, V), present_key_i / present_value_i (B, Hkv_i, P + 1, D)

Encoder-decoders (the `ConditionalDecoder` capability) prefill from the condition: the encoder
runs, the decoder reads its first tokens, and the cross-attention keys/values of every decoder
layer come out (`cross_key_i`, `cross_value_i`, (B, H, S, D)), so the step graph takes them
instead of the encoder output and never projects them again.

The model's own code runs unchanged: `GraphCache` is a KV cache whose past arrives as tensors
and whose layers concatenate the new keys/values (instead of writing into preallocated buffers)
and keep them for the outputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tformer.models.encoder_decoder import EncoderDecoderCache
from tformer.models.protocols import CausalLM, ConditionalDecoder
from tformer.nn.kv_cache import CrossKV, LayerKV


class GraphLayerKV(LayerKV):
    """One layer's past keys/values (B, Hkv, P, D) or None (prefill); `update` returns past + new
    and keeps them as `present`."""

    def __init__(self, cache: GraphCache, keys: Tensor | None, values: Tensor | None) -> None:
        super().__init__(cache, keys, values)  # type: ignore[arg-type]
        self.present: tuple[Tensor, Tensor] | None = None

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys is not None:
            k, v = torch.cat([self.keys, k.to(self.keys.dtype)], 2), torch.cat([self.values, v.to(self.values.dtype)], 2)
        self.present = (k, v)
        return k, v


class GraphCache(EncoderDecoderCache):
    """A KV cache of graph tensors (see the module docstring). `valid` (B, P) marks the real past
    tokens; `offset` is P, where the new tokens stand. For an encoder-decoder it also holds the
    encoder output (`memory`, prefill only) or every layer's cross keys/values (step).

    It is an `EncoderDecoderCache` so that a bound decoder takes it; its buffers are not
    preallocated, so `KVCache.__init__` is not called."""

    def __init__(self, batch: int, past: list[tuple[Tensor, Tensor]] | int, past_valid: Tensor | None, *,
                 memory: Tensor | None = None, context_valid: Tensor | None = None,
                 cross: list[tuple[Tensor, Tensor]] | int = 0) -> None:  # noqa: super-init-not-called
        pairs = [(None, None)] * past if isinstance(past, int) else past
        self.layers = [GraphLayerKV(self, k, v) for k, v in pairs]
        self.valid = past_valid
        self.offset: int | torch.SymInt = 0 if past_valid is None else past_valid.shape[1]
        self.memory, self.context_valid = memory, context_valid
        self.cross = [CrossKV() for _ in range(cross)] if isinstance(cross, int) else [_cross(k, v) for k, v in cross]
        self.max_len = 1  # unbounded here (a model refuses a cache longer than its context); the decoder checks
        self.length = 0
        self.batch = batch

    @property
    def batch_size(self) -> int:
        return self.batch

    def append(self, new_valid: Tensor) -> Tensor:
        """Positions (B, T) of the new tokens: each row counts its real tokens only."""
        seen = 0 if self.valid is None else self.valid.long().sum(-1, keepdim=True)  # (B, 1)
        positions = seen + new_valid.long().cumsum(-1) - 1
        self.valid = new_valid if self.valid is None else torch.cat([self.valid, new_valid], 1)
        return positions.clamp(min=0)

    def present(self) -> list[Tensor]:
        """present_key_0, present_value_0, present_key_1, ... for the outputs."""
        return [t for layer in self.layers for t in layer.present]  # type: ignore[union-attr]

    def cross_present(self) -> list[Tensor]:
        """cross_key_0, cross_value_0, ... (filled by the decoder's first call)."""
        return [t for layer in self.cross for t in (layer.keys, layer.values)]  # type: ignore[misc]


def _cross(keys: Tensor, values: Tensor) -> CrossKV:
    kv = CrossKV()
    kv.keys, kv.values = keys, values
    return kv


def next_token_logits(model: Any, ids: Tensor, mask: Tensor, cache: GraphCache) -> Tensor:
    """(B, V) logits of the last position: `next_logits` where the model has it (the LM head at one
    position), else the last row of its logits."""
    fast = getattr(model, "next_logits", None)
    if fast is not None:
        return fast(ids, attention_mask=mask, cache=cache)
    return model(ids, attention_mask=mask, cache=cache)[:, -1]


def layer_count(model: CausalLM, batch: int = 1) -> int:
    """Decoder layers: the length of a fresh cache (asked of the model, not its config)."""
    return len(model.new_cache(batch, 1).layers)


class CausalStep(nn.Module):
    """A CausalLM's prefill and decoding step in one graph: new ids (B, T) and their mask (B, T),
    the past's mask (B, P) and K/V (2 per layer, (B, Hkv, P, D)) -> the last position's logits
    (B, V) and the present K/V (B, Hkv, P + T, D). A prompt is the step from an empty past (P = 0)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, past_mask: Tensor,
                *past: Tensor) -> tuple[Tensor, ...]:
        cache = GraphCache(input_ids.shape[0], list(zip(past[0::2], past[1::2])), past_mask.bool())
        logits = next_token_logits(self.model, input_ids, attention_mask.bool(), cache)
        return (logits, *cache.present())


class ConditionalPrefill(nn.Module):
    """An encoder-decoder's start: the condition (B, S) and its mask, the decoder's first ids
    (B, T) -> last logits, present self-attention K/V and every layer's cross K/V."""

    def __init__(self, model: ConditionalDecoder, n_layers: int) -> None:
        super().__init__()
        self.model, self.n_layers = model, n_layers

    def forward(self, condition_ids: Tensor, condition_mask: Tensor, input_ids: Tensor) -> tuple[Tensor, ...]:
        decoder = self.model.bind(condition_ids, condition_mask)
        cache = GraphCache(input_ids.shape[0], self.n_layers, None, memory=decoder.memory, context_valid=condition_mask.bool(),
                           cross=self.n_layers)
        logits = decoder(input_ids, cache=cache)[:, -1]
        return (logits, *cache.present(), *cache.cross_present())


class ConditionalStep(nn.Module):
    """One decoding step of an encoder-decoder: new ids (B, T), the condition mask (B, S), past
    K/V (2 per layer), then cross K/V (2 per layer) -> last logits and the present self-attention
    K/V. Decoder tokens are never padded (a prompt is <bos>; finished rows go on with pad tokens).

    `decoder` is the model bound to any condition: a step reads the condition through the cross
    K/V in its cache only, never the bound encoder output."""

    def __init__(self, decoder: Any, n_layers: int) -> None:
        super().__init__()
        self.model = decoder.model  # registered, so its parameters are the graph's
        self.decoder, self.n_layers = decoder, n_layers

    def forward(self, input_ids: Tensor, condition_mask: Tensor, *kv: Tensor) -> tuple[Tensor, ...]:
        n = 2 * self.n_layers
        past, cross = kv[:n], kv[n:]
        valid = torch.ones(past[0].shape[0], past[0].shape[2], dtype=torch.bool, device=input_ids.device)
        cache = GraphCache(input_ids.shape[0], list(zip(past[0::2], past[1::2])), valid, context_valid=condition_mask.bool(),
                           cross=list(zip(cross[0::2], cross[1::2])))
        logits = self.decoder(input_ids, cache=cache)[:, -1]
        return (logits, *cache.present())


class Classify(nn.Module):
    """`model.classify(inputs, mask)` (text) or `model.classify(inputs)` (images) as a graph."""

    def __init__(self, model: nn.Module, with_mask: bool) -> None:
        super().__init__()
        self.model, self.with_mask = model, with_mask

    def forward(self, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.model.classify(inputs, mask) if self.with_mask else self.model.classify(inputs)
