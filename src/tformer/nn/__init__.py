"""Shared building blocks (imports torch only): masks, attention backends, attention (and the
inputs it reads), positions, feed-forward, norms, blocks, embeddings and KV caches."""

from tformer.nn.attend import BACKENDS, ScoreBias, eager_attention, get_backend
from tformer.nn.attention import AttentionInputs, MultiHeadAttention
from tformer.nn.block import Attention, Block
from tformer.nn.embed import PatchEmbedding, TokenEmbedding, check_token_ids
from tformer.nn.feedforward import MLP, SwiGLU, make_activation
from tformer.nn.kv_cache import CrossKV, KVCache, LayerKV
from tformer.nn.masks import Mask, and_masks, causal, full, key_padding, or_masks, prefix_lm, sliding_window
from tformer.nn.norm import make_norm
from tformer.nn.position import (ALiBi, LearnedPositions, RotaryEmbedding, SinusoidalPositions,
                                 apply_rotary, alibi_slopes)
from tformer.nn.probe import QKProbe

__all__ = [
    "ALiBi", "Attention", "AttentionInputs", "BACKENDS", "Block", "CrossKV", "KVCache", "LayerKV",
    "LearnedPositions", "MLP", "Mask", "MultiHeadAttention", "PatchEmbedding", "QKProbe",
    "RotaryEmbedding", "ScoreBias", "SinusoidalPositions",
    "SwiGLU", "TokenEmbedding", "alibi_slopes", "and_masks", "apply_rotary", "causal",
    "check_token_ids", "eager_attention", "full", "get_backend", "key_padding", "make_activation",
    "make_norm", "or_masks", "prefix_lm", "sliding_window",
]
