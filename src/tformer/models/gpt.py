"""GPT: a decoder-only causal language model (Radford et al. 2018/2019) assembled from `tformer.nn`.

The same file covers GPT-2 (learned positions, LayerNorm, GELU) and the modern variants that
differ only in parts (RoPE or ALiBi, RMSNorm, SwiGLU, grouped-query attention, QK-norm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tformer.config import ConfigError, check_choice, check_fraction, check_positive
from tformer.nn import (ALiBi, AttentionInputs, Block, KVCache, LearnedPositions, MLP, MultiHeadAttention,
                        RotaryEmbedding, SinusoidalPositions, SwiGLU, TokenEmbedding, causal,
                        key_padding, make_activation, make_norm)
from tformer.nn.attend import BACKENDS
from tformer.nn.dropout import Dropout
from tformer.nn.feedforward import ACTIVATIONS
from tformer.nn.loss import chunked_cross_entropy
from tformer.nn.masks import Mask
from tformer.nn.norm import NORMS
from tformer.nn.patterns import at_positions, check_pattern, pattern_mask

POSITIONS = ("learned", "sinusoidal", "rope", "alibi")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # None: same as n_heads; fewer: grouped-query attention
    d_model: int = 768
    d_ff: int | None = None  # None: 4 * d_model (8/3 * d_model rounded for swiglu)
    dropout: float = 0.0  # embeddings, residual branches and attention weights
    bias: bool = True
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "gelu_tanh"  # or "swiglu" for a gated feed-forward
    position: str = "learned"
    rope_base: float = 10000.0
    qk_norm: bool = False
    tie_embeddings: bool = True
    attn_backend: str = "sdpa"
    # sparse attention (tformer.nn.patterns.PATTERNS), always combined with causal; e.g.
    # attn_pattern="sliding_window", attn_pattern_params={"window": 256}. A plain dict: the
    # config stays frozen (fields cannot be reassigned) but is not hashable, and nothing hashes it.
    attn_pattern: str = "causal"
    attn_pattern_params: dict[str, Any] | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "n_layers", "n_heads", "d_model"):
            check_positive(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads "
                              f"({self.n_heads}); e.g. d_model={self.n_heads * 64}")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                              f"({self.n_kv_heads})")
        check_fraction("dropout", self.dropout)
        check_choice("norm", self.norm, NORMS)
        check_choice("activation", self.activation, [*ACTIVATIONS, "swiglu"])
        check_choice("position", self.position, POSITIONS)
        check_choice("attn_backend", self.attn_backend, BACKENDS)
        if self.attn_backend == "flex" and self.dropout > 0:
            raise ConfigError("attn_backend='flex' cannot apply attention dropout; set dropout=0 "
                              "or use attn_backend='sdpa'")
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"rope needs an even head dimension, got {self.head_dim}")
        params = self.attn_pattern_params or {}
        if not isinstance(params, dict):
            raise ConfigError(f"attn_pattern_params must be a mapping such as {{window: 256}}, "
                              f"got {params!r}")
        try:
            check_pattern(self.attn_pattern, params, self.context_length)
        except ValueError as e:
            raise ConfigError(f"attn_pattern: {e}") from None
        if self.attn_pattern_params is not None:  # a private copy: the caller's dict may change
            object.__setattr__(self, "attn_pattern_params", dict(params))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.activation == "swiglu":  # keep parameters ~ a 4x MLP; round up to 64
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model


PRESETS: dict[str, dict] = {
    "gpt2-small": dict(n_layers=12, n_heads=12, d_model=768),  # 124M
    "gpt2-medium": dict(n_layers=24, n_heads=16, d_model=1024),  # 350M
    "gpt2-large": dict(n_layers=36, n_heads=20, d_model=1280),  # 774M
    "gpt-mini": dict(n_layers=6, n_heads=6, d_model=192, context_length=256),
    "gpt-micro": dict(n_layers=4, n_heads=4, d_model=128, context_length=128),
    "gpt-nano": dict(n_layers=3, n_heads=3, d_model=48, context_length=64),
    # Llama-style parts at CPU size: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases
    "llama-mini": dict(n_layers=6, n_heads=8, n_kv_heads=2, d_model=256, context_length=256,
                       position="rope", norm="rmsnorm", activation="swiglu", bias=False),
}


def build_block(config: GPTConfig) -> Block:
    d, bias = config.d_model, config.bias
    qk_norm = ((lambda dim: make_norm(config.norm, dim, eps=config.norm_eps, bias=bias))
               if config.qk_norm else None)
    attn = MultiHeadAttention(d, config.n_heads, config.n_kv_heads, qkv_bias=bias, out_bias=bias,
                              dropout=config.dropout, backend=config.attn_backend, qk_norm=qk_norm)
    if config.activation == "swiglu":
        ffn: nn.Module = SwiGLU(d, config.ffn_dim, bias=bias, dropout=config.dropout)
    else:
        ffn = MLP(d, config.ffn_dim, make_activation(config.activation), bias=bias,
                  dropout=config.dropout)
    norm = lambda: make_norm(config.norm, d, eps=config.norm_eps, bias=bias)  # noqa: E731
    return Block(attn, ffn, norm, pre_norm=True, dropout=config.dropout)


class GPT(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = TokenEmbedding(config.vocab_size, config.d_model)
        self.pos_emb: nn.Module | None = None  # rope and alibi act inside attention instead
        if config.position == "learned":
            self.pos_emb = LearnedPositions(config.context_length, config.d_model)
        elif config.position == "sinusoidal":
            self.pos_emb = SinusoidalPositions(config.context_length, config.d_model)
        self.rope = (RotaryEmbedding(config.head_dim, config.context_length, config.rope_base)
                     if config.position == "rope" else None)
        self.alibi = ALiBi(config.n_heads) if config.position == "alibi" else None
        self.drop = Dropout(config.dropout)
        self.blocks = nn.ModuleList(build_block(config) for _ in range(config.n_layers))
        self.norm = make_norm(config.norm, config.d_model, eps=config.norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.causal = causal()
        self._patterns: dict[str, Mask] = {}  # device -> causal & pattern (caches block masks)
        self.attention_pattern(self.lm_head.weight.device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02); projections into the residual stream scaled by
        1/sqrt(2 * n_layers) (Radford et al. 2019, section 2.3)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.out_proj, block.ffn.down):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layers))

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and isinstance(self.pos_emb, LearnedPositions):
            n -= self.pos_emb.embedding.weight.numel()
        return n

    def new_cache(self, batch: int, max_len: int | None = None, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` tokens (default: context)."""
        max_len = self.config.context_length if max_len is None else max_len
        if max_len > self.config.context_length:
            raise ValueError(f"a cache of {max_len} tokens exceeds the model's context length "
                             f"({self.config.context_length})")
        param = self.tok_emb.weight  # not the head: a quantized head dequantizes on read
        heads = [block.attn.n_kv_heads for block in self.blocks]  # per layer: pruning changes them
        return KVCache(len(self.blocks), batch, heads, self.config.head_dim, max_len,
                       dtype=dtype or param.dtype, device=device or param.device)

    def attention_pattern(self, device: torch.device) -> Mask:
        """The configured pattern, combined with causal, on token positions; built once per device
        so that FlexAttention block masks are created once per sequence length."""
        c = self.config
        if c.attn_pattern == "causal":
            return self.causal
        key = str(device)
        if key not in self._patterns:
            self._patterns[key] = pattern_mask(c.attn_pattern, causal=True, max_len=c.context_length,
                                               device=device, **(c.attn_pattern_params or {}))
        return self._patterns[key]

    def _padded_mask(self, pattern: Mask, valid: Tensor) -> Mask:
        """`pattern` over key slots where valid: (B, L) bool marks real tokens (left padding, a
        KV cache's unwritten slots). A sparse pattern is evaluated at each row's token positions,
        so left padding does not move its blocks, strides or global tokens."""
        if pattern is self.causal:
            return self.causal & key_padding(valid)
        slot_positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
        return at_positions(pattern, slot_positions) & key_padding(valid)

    def _check_input(self, ids: Tensor, attention_mask: Tensor | None, cache: KVCache | None) -> None:
        if ids.dim() != 2:
            raise ValueError(f"token ids must have shape (batch, length), got {tuple(ids.shape)}")
        if ids.shape[1] == 0:
            raise ValueError("the input is empty: give at least one token")
        if cache is None and ids.shape[1] > self.config.context_length:
            raise ValueError(f"input of {ids.shape[1]} tokens exceeds the context length "
                             f"({self.config.context_length}); truncate it or use a model with "
                             "a longer context")
        if attention_mask is not None and attention_mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal the "
                             f"ids shape {tuple(ids.shape)}")
        if cache is not None and cache.max_len > self.config.context_length:
            raise ValueError(f"the cache holds {cache.max_len} tokens, more than the context length "
                             f"({self.config.context_length}); create it with model.new_cache")
        if cache is not None and cache.batch_size != ids.shape[0]:
            raise ValueError(f"cache holds {cache.batch_size} sequences, input has {ids.shape[0]}")

    def forward(self, ids: Tensor, *, attention_mask: Tensor | None = None,
                cache: KVCache | None = None, targets: Tensor | None = None) -> Tensor:
        """ids: (B, T) long -> logits (B, T, V). attention_mask: (B, T), 1 for real tokens, 0 for
        (left) padding. cache: a KVCache from `new_cache`; the new tokens are appended to it.
        targets: (B, T) next-token ids (-100: none) -> instead of logits, their mean cross-entropy,
        computed in chunks so that the (B, T, V) logits never exist at once (`nn.loss`)."""
        hidden = self.hidden(ids, attention_mask=attention_mask, cache=cache)
        if targets is not None:
            return chunked_cross_entropy(hidden, self.lm_head, targets)
        return self.lm_head(hidden)

    def next_logits(self, ids: Tensor, *, attention_mask: Tensor | None = None,
                    cache: KVCache | None = None) -> Tensor:
        """The last position's logits (B, V) only: a prompt's prefill skips the LM head at every
        other position (GPT-2-small, 512-token prompt: the head over all positions is 171 of 632 ms)."""
        return self.lm_head(self.hidden(ids, attention_mask=attention_mask, cache=cache)[:, -1])

    def hidden(self, ids: Tensor, *, attention_mask: Tensor | None = None,
               cache: KVCache | None = None) -> Tensor:
        """The final-norm hidden states (B, T, d_model) that the LM head reads (see `forward`)."""
        if not torch.compiler.is_compiling():
            self._check_input(ids, attention_mask, cache)
        B, T = ids.shape
        valid = None if attention_mask is None else attention_mask.bool()
        pattern = self.attention_pattern(ids.device)
        if cache is not None:
            positions = cache.append(torch.ones_like(ids, dtype=torch.bool) if valid is None else valid)
            mask = self._padded_mask(pattern, cache.valid)
        elif valid is not None:
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # left padding keeps positions
            mask = self._padded_mask(pattern, valid)
        else:
            positions = torch.arange(T, device=ids.device).unsqueeze(0)  # (1, T)
            mask = pattern
        x = self.tok_emb(ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        x = self.drop(x)
        rope = self.rope(positions) if self.rope is not None else None
        bias = self.alibi() if self.alibi is not None else None
        for i, block in enumerate(self.blocks):
            layer_cache = cache.layers[i] if cache is not None else None
            x = block(x, AttentionInputs(mask, bias=bias, rope=rope, cache=layer_cache))
        return self.norm(x)
