"""The encoder-decoder Transformer (Vaswani et al. 2017) assembled from `tformer.nn`: sinusoidal
positions, post-norm (original) or pre-norm blocks, shared or separate source/target embeddings,
a tied output projection, padding masks on both sides and cross-attention whose keys/values are
projected once per source while decoding.

Decoding reuses the shared generation code: `model.bind(src_ids, src_mask)` encodes the sources
once and returns a `BoundDecoder`, a causal LM over target tokens (the `CausalLM` protocol of
`tformer.inference.generate`), so `generate` and `beam_search` translate, batched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from tformer.config import ConfigError, check_choice, check_fraction, check_positive
from tformer.nn import (MLP, AttentionInputs, Block, CrossKV, KVCache, MultiHeadAttention, SinusoidalPositions,
                        TokenEmbedding, causal, key_padding, make_activation, make_norm)
from tformer.nn.attend import BACKENDS
from tformer.nn.feedforward import ACTIVATIONS
from tformer.nn.masks import Mask
from tformer.nn.norm import NORMS


@dataclass(frozen=True)
class Seq2SeqConfig:
    vocab_size: int = 37000  # source vocabulary (and target's when tgt_vocab_size is None)
    tgt_vocab_size: int | None = None  # None: the same vocabulary on both sides
    context_length: int = 256  # longest source, and longest target including <bos>
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    n_heads: int = 8
    d_model: int = 512
    d_ff: int | None = None  # None: 4 * d_model
    dropout: float = 0.1  # embeddings, residual branches and the FFN
    attn_dropout: float | None = None  # attention weights; None: = dropout (0: SDPA's fast kernels)
    activation: str = "relu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    pre_norm: bool = False  # False: post-norm, as in the original Transformer
    final_norm: bool | None = None  # a norm after each stack; None: only with pre-norm
    share_embeddings: bool = True  # one embedding table for source and target (one vocabulary)
    tie_output: bool = True  # output projection = target embedding (Press & Wolf 2017)
    scale_embeddings: bool = True  # multiply embeddings by sqrt(d_model) (section 3.4)
    attn_backend: str = "sdpa"
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_encoder_layers", "n_decoder_layers",
                     "n_heads", "d_model"):
            check_positive(name, getattr(self, name))
        if self.d_model % self.n_heads or self.d_model % 2:
            raise ConfigError(f"d_model ({self.d_model}) must be even and divisible by n_heads "
                              f"({self.n_heads}); e.g. d_model={self.n_heads * 64}")
        if self.share_embeddings and self.tgt_vocab_size not in (None, self.vocab_size):
            raise ConfigError(f"share_embeddings needs one vocabulary, but vocab_size={self.vocab_size} "
                              f"and tgt_vocab_size={self.tgt_vocab_size}; set share_embeddings=false")
        check_fraction("dropout", self.dropout)
        if self.attn_dropout is not None:
            check_fraction("attn_dropout", self.attn_dropout)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("norm", self.norm, NORMS)
        check_choice("attn_backend", self.attn_backend, BACKENDS)
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.target_vocab_size:
                raise ConfigError(f"{name}={getattr(self, name)} is outside the target vocabulary "
                                  f"[0, {self.target_vocab_size})")

    @property
    def target_vocab_size(self) -> int:
        return self.vocab_size if self.tgt_vocab_size is None else self.tgt_vocab_size

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def has_final_norm(self) -> bool:
        return self.pre_norm if self.final_norm is None else self.final_norm


PRESETS: dict[str, dict] = {
    # Vaswani et al. 2017, table 3: base (65M with a 37k shared vocabulary) and big
    "transformer-base": dict(),
    "transformer-big": dict(d_model=1024, n_heads=16, d_ff=4096, dropout=0.3),
    # CPU sizes for the shipped translation recipes and tests
    "nmt-small": dict(n_encoder_layers=3, n_decoder_layers=3, n_heads=4, d_model=256,
                      vocab_size=8000, context_length=128),
    "nmt-tiny": dict(n_encoder_layers=2, n_decoder_layers=2, n_heads=4, d_model=128,
                     vocab_size=4000, context_length=128),
}


def build_block(config: Seq2SeqConfig, cross: bool) -> Block:
    """One encoder block, or (cross=True) one decoder block with cross-attention."""
    d, c = config.d_model, config
    attn_dropout = c.dropout if c.attn_dropout is None else c.attn_dropout

    def attn(d_context: int | None = None) -> MultiHeadAttention:
        return MultiHeadAttention(d, c.n_heads, d_context=d_context, dropout=attn_dropout,
                                  backend=c.attn_backend)

    ffn = MLP(d, c.d_ff or 4 * d, make_activation(c.activation), dropout=c.dropout)
    return Block(attn(), ffn, lambda: make_norm(c.norm, d, eps=c.norm_eps),
                 cross_attn=attn(d_context=d) if cross else None, pre_norm=c.pre_norm, dropout=c.dropout)


def positions_of(ids: Tensor, valid: Tensor | None) -> Tensor:
    """Position ids (B or 1, T) that count real tokens only, so left and right padding give the
    same positions to the same tokens."""
    if valid is None:
        return torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def final_norm(config: Seq2SeqConfig) -> nn.Module:
    """The norm after a stack (pre-norm needs it; torch.nn.Transformer has it in both layouts)."""
    if not config.has_final_norm:
        return nn.Identity()
    return make_norm(config.norm, config.d_model, eps=config.norm_eps)


class Seq2SeqCache(KVCache):
    """The decoder's self-attention cache plus, per layer, the cross-attention keys/values of the
    encoded sources (projected on the first decoding step) and the source padding mask.
    `reorder` (beam search) reorders all of them.

    memory:    (B, S, d_model) encoder output until the first step has projected it, then None
    src_valid: (B, S) bool, True for real source tokens (None: no padding)
    cross:     one CrossKV per decoder layer, keys/values (B, H, S, head_dim)
    """

    def __init__(self, config: Seq2SeqConfig, max_len: int, memory: Tensor, src_valid: Tensor | None,
                 *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(config.n_decoder_layers, memory.shape[0], config.n_heads, config.head_dim,
                         max_len, dtype=dtype, device=device)
        self.memory: Tensor | None = memory
        self.src_valid = src_valid
        self.cross = [CrossKV() for _ in range(config.n_decoder_layers)]

    def reorder(self, rows: Tensor) -> None:
        super().reorder(rows)
        if self.memory is not None:
            self.memory = self.memory.index_select(0, rows)
        if self.src_valid is not None:
            self.src_valid = self.src_valid.index_select(0, rows)
        for layer in self.cross:
            layer.reorder(rows)


@dataclass(frozen=True)
class DecoderConfig:
    """What generation reads off a causal LM's config."""

    vocab_size: int
    context_length: int


class Seq2Seq(nn.Module):
    """Source ids (B, S) and target input ids (B, T) -> next-target-token logits (B, T, V)."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = c = config
        self.src_emb = TokenEmbedding(c.vocab_size, c.d_model, scale=c.scale_embeddings)
        self.tgt_emb = (self.src_emb if c.share_embeddings else
                        TokenEmbedding(c.target_vocab_size, c.d_model, scale=c.scale_embeddings))
        self.pos = SinusoidalPositions(c.context_length, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList(build_block(c, cross=False) for _ in range(c.n_encoder_layers))
        self.decoder = nn.ModuleList(build_block(c, cross=True) for _ in range(c.n_decoder_layers))
        self.encoder_norm, self.decoder_norm = final_norm(c), final_norm(c)
        self.out_proj = nn.Linear(c.d_model, c.target_vocab_size, bias=False)
        self.causal = causal()
        self.reset_parameters()
        if c.tie_output:
            self.out_proj.weight = self.tgt_emb.weight

    def reset_parameters(self) -> None:
        """Xavier-uniform matrices and zero biases (as torch.nn.Transformer); embeddings
        N(0, d_model^-1/2), so scaled embeddings and tied logits start at unit scale (fairseq)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for emb in {self.src_emb, self.tgt_emb}:
            nn.init.normal_(emb.weight, mean=0.0, std=self.config.d_model ** -0.5)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check(self, ids: Tensor, mask: Tensor | None, side: str, cached: bool = False) -> None:
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"{side} ids must be a non-empty (batch, length) tensor, got {tuple(ids.shape)}")
        if not cached and ids.shape[1] > self.config.context_length:
            raise ValueError(f"{side} of {ids.shape[1]} tokens exceeds the context length "
                             f"({self.config.context_length}); truncate it or use a longer context_length")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"{side} mask shape {tuple(mask.shape)} must equal the {side} ids shape "
                             f"{tuple(ids.shape)}")

    def _embed(self, emb: TokenEmbedding, ids: Tensor, positions: Tensor) -> Tensor:
        return self.drop(emb(ids) + self.pos(positions).to(emb.weight.dtype))  # (B, T, d_model)

    def encode(self, src_ids: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """src_ids: (B, S) long; src_mask: (B, S), 1 for real tokens, 0 for padding (either
        side). Returns the memory (B, S, d_model)."""
        self._check(src_ids, src_mask, "source")
        valid = None if src_mask is None else src_mask.bool()
        mask = None if valid is None else key_padding(valid)
        x = self._embed(self.src_emb, src_ids, positions_of(src_ids, valid))
        for block in self.encoder:
            x = block(x, AttentionInputs(mask))
        return self.encoder_norm(x)

    def decode(self, tgt_ids: Tensor, memory: Tensor | None, *, src_mask: Tensor | None = None,
               tgt_mask: Tensor | None = None, cache: Seq2SeqCache | None = None) -> Tensor:
        """tgt_ids: (B, T) target input (starting with <bos>); memory: (B, S, d_model) from
        `encode` (ignored with a cache, which holds its own). Returns logits (B, T, V)."""
        self._check(tgt_ids, tgt_mask, "target", cached=cache is not None)
        valid = None if tgt_mask is None else tgt_mask.bool()
        self_mask: Mask = self.causal
        if cache is not None:
            if cache.batch_size != tgt_ids.shape[0]:
                raise ValueError(f"cache holds {cache.batch_size} sequences, input has {tgt_ids.shape[0]}")
            positions = cache.append(torch.ones_like(tgt_ids, dtype=torch.bool) if valid is None else valid)
            self_mask = self.causal & key_padding(cache.valid)
            memory, src_valid = cache.memory, cache.src_valid
        else:
            if memory is None:
                raise ValueError("decode needs the encoder memory (or a cache from BoundDecoder.new_cache)")
            src_valid = None if src_mask is None else src_mask.bool()
            positions = positions_of(tgt_ids, valid)
            if valid is not None:
                self_mask = self.causal & key_padding(valid)
        context_mask = None if src_valid is None else key_padding(src_valid)
        x = self._embed(self.tgt_emb, tgt_ids, positions)
        for i, block in enumerate(self.decoder):
            x = block(x, AttentionInputs(self_mask, cache=None if cache is None else cache.layers[i]),
                      AttentionInputs(context_mask, context=memory,
                                      cache=None if cache is None else cache.cross[i]))
        if cache is not None:
            cache.memory = None  # every layer has projected it into cache.cross
        return self.out_proj(self.decoder_norm(x))

    def forward(self, src_ids: Tensor, tgt_ids: Tensor, *, src_mask: Tensor | None = None,
                tgt_mask: Tensor | None = None) -> Tensor:
        """Teacher-forced logits (B, T, V): src_ids (B, S), tgt_ids (B, T) = <bos> + target;
        masks are 1 for real tokens, 0 for padding (None: no padding)."""
        memory = self.encode(src_ids, src_mask)
        return self.decode(tgt_ids, memory, src_mask=src_mask, tgt_mask=tgt_mask)

    def bind(self, src_ids: Tensor, src_mask: Tensor | None = None) -> BoundDecoder:
        """Encode the sources once; the returned decoder generates their translations."""
        return BoundDecoder(self, self.encode(src_ids, src_mask),
                            None if src_mask is None else src_mask.bool())


class BoundView:
    """What generation needs of a model besides calling it: its mode and parameters, taken from
    the encoder-decoder `self.model` that this view decodes with."""

    model: nn.Module

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True) -> BoundView:
        self.model.train(mode)
        return self

    def eval(self) -> BoundView:
        return self.train(False)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()


class BoundDecoder(BoundView):
    """The decoder of a Seq2Seq bound to encoded sources: a causal LM over target tokens (the
    `CausalLM` protocol), so `generate` and `beam_search` run unchanged. Row i of a batch decodes
    source i; its caches carry the cross-attention keys/values (see Seq2SeqCache)."""

    def __init__(self, model: Seq2Seq, memory: Tensor, src_valid: Tensor | None) -> None:
        self.model, self.memory, self.src_valid = model, memory, src_valid
        self.config = DecoderConfig(model.config.target_vocab_size, model.config.context_length)

    def new_cache(self, batch: int, max_len: int | None = None, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> Seq2SeqCache:
        """A cache for the `batch` bound sources (batch must equal their number)."""
        if batch != self.memory.shape[0]:
            raise ValueError(f"this decoder is bound to {self.memory.shape[0]} sources; give one "
                             f"target prompt per source, not {batch}")
        max_len = self.config.context_length if max_len is None else max_len
        if max_len > self.config.context_length:
            raise ValueError(f"a cache of {max_len} tokens exceeds the model's context length "
                             f"({self.config.context_length})")
        weight = self.model.out_proj.weight
        return Seq2SeqCache(self.model.config, max_len, self.memory, self.src_valid,
                            dtype=dtype or weight.dtype, device=torch.device(device or weight.device))

    def __call__(self, ids: Tensor, *, attention_mask: Tensor | None = None,
                 cache: KVCache | None = None) -> Tensor:
        """Target ids (B, T) -> logits (B, T, V); with a cache, the new tokens are appended."""
        if cache is not None and not isinstance(cache, Seq2SeqCache):
            raise TypeError("a bound decoder needs its own cache: use decoder.new_cache(batch, max_len)")
        if cache is None and ids.shape[0] != self.memory.shape[0]:
            raise ValueError(f"this decoder is bound to {self.memory.shape[0]} sources, got "
                             f"{ids.shape[0]} target rows")
        return self.model.decode(ids, self.memory, src_mask=self.src_valid, tgt_mask=attention_mask,
                                 cache=cache)

