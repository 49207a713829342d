"""The encoder-decoder core that both encoder-decoder families assemble (`seq2seq`: translation,
`image_gen`: pixels given a condition): blocks and stacks, the decoder's cache, one decoding pass
with or without it, and `BoundDecoder`, the decoder bound to encoded inputs as a causal LM for
`tformer.inference.generate`. Embeddings, positions, heads and input checks stay in each family.

    class Family(EncoderDecoder):          # a family file
        def __init__(self, config):
            ...embeddings...
            self.build_stacks(spec, n_encoder, n_decoder, final_norms=True)
            ...head...
        def embed_target(self, ids, positions): ...    # (B, T) -> (B, T, d_model)
        def logits(self, hidden): ...                  # (B, T, d_model) -> (B, T, V)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from tformer.nn import (MLP, AttentionInputs, Block, CrossKV, KVCache, MultiHeadAttention, causal,
                        key_padding, make_activation, make_norm)
from tformer.nn.masks import Mask


@dataclass(frozen=True)
class BlockSpec:
    """What every block of both stacks is made of."""

    d_model: int
    n_heads: int
    d_ff: int
    activation: str
    norm: str
    norm_eps: float
    pre_norm: bool
    dropout: float  # residual branches and inside the feed-forward
    attn_dropout: float  # attention weights
    attn_backend: str


def build_block(spec: BlockSpec, cross: bool) -> Block[AttentionInputs]:
    """One encoder block, or (cross=True) one decoder block with cross-attention."""
    d = spec.d_model

    def attn(d_context: int | None = None) -> MultiHeadAttention:
        return MultiHeadAttention(d, spec.n_heads, d_context=d_context, dropout=spec.attn_dropout,
                                  backend=spec.attn_backend)

    ffn = MLP(d, spec.d_ff, make_activation(spec.activation), dropout=spec.dropout)
    return Block(attn(), ffn, lambda: make_norm(spec.norm, d, eps=spec.norm_eps),
                 cross_attn=attn(d_context=d) if cross else None, pre_norm=spec.pre_norm,
                 dropout=spec.dropout)


def positions_of(ids: Tensor, valid: Tensor | None) -> Tensor:
    """Position ids (B or 1, T) that count real tokens only, so left and right padding give the
    same positions to the same tokens."""
    if valid is None:
        return torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


class EncoderDecoderCache(KVCache):
    """The decoder's self-attention cache plus, per layer, the cross-attention keys/values of the
    encoded inputs (projected on the first decoding step) and their padding mask. `reorder`
    (beam search) reorders all of them.

    memory:        (B, S, d_model) encoder output until the first step has projected it, then None
    context_valid: (B, S) bool, True for real encoded tokens (None: no padding)
    cross:         one CrossKV per decoder layer, keys/values (B, H, S, head_dim)
    n_heads:       the self-attention's key/value heads, one count or one per layer (pruned models)
    """

    def __init__(self, n_layers: int, n_heads: int | list[int], head_dim: int, max_len: int, memory: Tensor,
                 context_valid: Tensor | None, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(n_layers, memory.shape[0], n_heads, head_dim, max_len, dtype=dtype, device=device)
        self.memory: Tensor | None = memory
        self.context_valid = context_valid
        self.cross = [CrossKV() for _ in range(n_layers)]

    def reorder(self, rows: Tensor) -> None:
        super().reorder(rows)
        if self.memory is not None:
            self.memory = self.memory.index_select(0, rows)
        if self.context_valid is not None:
            self.context_valid = self.context_valid.index_select(0, rows)
        for layer in self.cross:
            layer.reorder(rows)


class EncoderDecoder(nn.Module):
    """The stacks of an encoder-decoder family and the passes over them. `build_stacks` adds
    `encoder`, `decoder` (ModuleLists of blocks) and `encoder_norm`, `decoder_norm` (a norm after
    each stack, or Identity) as the family's own attributes, so their parameter names and order
    are the family's. The family supplies `embed_target` and `logits`, and may check inputs in
    `check_target`."""

    encoder: nn.ModuleList
    decoder: nn.ModuleList

    def build_stacks(self, spec: BlockSpec, n_encoder: int, n_decoder: int, *, final_norms: bool) -> None:
        def final_norm() -> nn.Module:  # pre-norm needs it; torch.nn.Transformer has it in both layouts
            return make_norm(spec.norm, spec.d_model, eps=spec.norm_eps) if final_norms else nn.Identity()

        self.encoder = nn.ModuleList(build_block(spec, cross=False) for _ in range(n_encoder))
        self.decoder = nn.ModuleList(build_block(spec, cross=True) for _ in range(n_decoder))
        self.encoder_norm, self.decoder_norm = final_norm(), final_norm()
        self.causal = causal()  # one object: FlexAttention block masks are cached on it
        self.spec = spec

    def residual_projections(self) -> list[nn.Linear]:
        """The Linear layers whose outputs are added to the residual stream: every block's
        attention and cross-attention output projections and its MLP down projection (the ones
        GPT-2's initialisation scales)."""
        blocks = [*self.encoder, *self.decoder]
        projections = [block.attn.out_proj for block in blocks] + [block.ffn.down for block in blocks]
        return projections + [block.cross_attn.out_proj for block in self.decoder]

    def embed_target(self, ids: Tensor, positions: Tensor) -> Tensor:
        """Decoder input ids (B, T) at `positions` (B or 1, T) -> (B, T, d_model)."""
        raise NotImplementedError

    def logits(self, hidden: Tensor) -> Tensor:
        """The decoder's final hidden states (B, T, d_model) -> logits (B, T, V)."""
        raise NotImplementedError

    def check_target(self, ids: Tensor, valid: Tensor | None, cached: bool) -> None:
        """Raise on decoder inputs the family cannot take (default: accept)."""

    def run_encoder(self, x: Tensor, valid: Tensor | None) -> Tensor:
        """Embedded inputs (B, S, d_model), valid (B, S) bool or None -> memory (B, S, d_model)."""
        inputs = AttentionInputs(None if valid is None else key_padding(valid))
        for block in self.encoder:
            x = block(x, inputs)
        return self.encoder_norm(x)

    def run_decoder(self, ids: Tensor, memory: Tensor | None, *, context_valid: Tensor | None = None,
                    target_valid: Tensor | None = None,
                    cache: EncoderDecoderCache | None = None) -> Tensor:
        """ids: (B, T) decoder inputs; memory: (B, S, d_model) from the encoder (a cache holds
        its own); context_valid (B, S) and target_valid (B, T): bool, True for real tokens.
        With a cache, the new tokens are appended to it. Returns logits (B, T, V)."""
        self.check_target(ids, target_valid, cached=cache is not None)
        self_mask: Mask = self.causal
        if cache is not None:
            if cache.batch_size != ids.shape[0]:
                raise ValueError(f"cache holds {cache.batch_size} sequences, input has {ids.shape[0]}")
            positions = cache.append(torch.ones_like(ids, dtype=torch.bool) if target_valid is None
                                     else target_valid)
            self_mask = self.causal & key_padding(cache.valid)
            memory, context_valid = cache.memory, cache.context_valid
        else:
            if memory is None:
                raise ValueError("decoding needs the encoder memory (or a cache from a bound decoder)")
            positions = positions_of(ids, target_valid)
            if target_valid is not None:
                self_mask = self.causal & key_padding(target_valid)
        context_mask = None if context_valid is None else key_padding(context_valid)
        x = self.embed_target(ids, positions)
        for i, block in enumerate(self.decoder):
            x = block(x, AttentionInputs(self_mask, cache=None if cache is None else cache.layers[i]),
                      AttentionInputs(context_mask, context=memory,
                                      cache=None if cache is None else cache.cross[i]))
        if cache is not None:
            cache.memory = None  # every layer has projected it into cache.cross
        return self.logits(self.decoder_norm(x))

    def decoder_cache(self, max_len: int, memory: Tensor, context_valid: Tensor | None, *,
                      dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> EncoderDecoderCache:
        """An empty decoder cache over the encoded inputs `memory` (one row per sequence)."""
        param, spec = next(self.decoder.parameters()), self.spec
        heads = [block.attn.n_kv_heads for block in self.decoder]  # per layer: pruning changes them
        return EncoderDecoderCache(len(self.decoder), heads, spec.d_model // spec.n_heads, max_len,
                                   memory, context_valid, dtype=dtype or param.dtype,
                                   device=torch.device(device or param.device))


@dataclass(frozen=True)
class DecoderConfig:
    """What generation reads off a causal LM's config."""

    vocab_size: int
    context_length: int


class BoundDecoder:
    """The decoder of an `EncoderDecoder` bound to encoded inputs: a causal LM over its tokens
    (the `CausalLM` protocol), so `generate` and `beam_search` run unchanged. Row i of a batch
    decodes encoded input i; its caches carry the cross-attention keys/values. Mode and
    parameters are the model's."""

    def __init__(self, model: EncoderDecoder, memory: Tensor, context_valid: Tensor | None,
                 config: DecoderConfig) -> None:
        self.model, self.memory, self.context_valid, self.config = model, memory, context_valid, config
        self.rows = memory.shape[0]  # sequences one call decodes

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True) -> BoundDecoder:
        self.model.train(mode)
        return self

    def eval(self) -> BoundDecoder:
        return self.train(False)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def new_cache(self, batch: int, max_len: int | None = None, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> EncoderDecoderCache:
        """A cache for the `batch` bound inputs (batch must equal their number)."""
        if batch != self.rows:
            raise ValueError(f"this decoder is bound to {self.rows} encoded inputs (sources, conditions); "
                             f"give one prompt per input, not {batch}")
        max_len = self.config.context_length if max_len is None else max_len
        if max_len > self.config.context_length:
            raise ValueError(f"a cache of {max_len} tokens exceeds the model's context length "
                             f"({self.config.context_length})")
        return self.model.decoder_cache(max_len, self.memory, self.context_valid, dtype=dtype, device=device)

    def __call__(self, ids: Tensor, *, attention_mask: Tensor | None = None,
                 cache: KVCache | None = None) -> Tensor:
        """Decoder ids (B, T) -> logits (B, T, V); with a cache, the new tokens are appended."""
        if cache is not None and not isinstance(cache, EncoderDecoderCache):
            raise TypeError("a bound decoder needs its own cache: use decoder.new_cache(batch, max_len)")
        if cache is None and ids.shape[0] != self.memory.shape[0]:
            raise ValueError(f"this decoder is bound to {self.memory.shape[0]} encoded inputs, got "
                             f"{ids.shape[0]} rows")
        return self.model.run_decoder(ids, self.memory, context_valid=self.context_valid,
                                      target_valid=None if attention_mask is None else attention_mask.bool(),
                                      cache=cache)
