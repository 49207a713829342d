"""The encoder-decoder Transformer (Vaswani et al. 2017) assembled from `tformer.nn`: sinusoidal
positions, post-norm (original) or pre-norm blocks, shared or separate source/target embeddings,
a tied output projection, padding masks on both sides and cross-attention whose keys/values are
projected once per source while decoding.

Decoding reuses the shared generation code: `model.bind(src_ids, src_mask)` encodes the sources
once and returns a `BoundDecoder`, a causal LM over target tokens (the `CausalLM` protocol of
`tformer.inference.generate`), so `generate` and `beam_search` translate, batched. The stacks,
the decoder cache and the bound decoder are the encoder-decoder core (`models.encoder_decoder`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from tformer.config import ConfigError, check_choice, check_fraction, check_positive
from tformer.models.encoder_decoder import (BlockSpec, BoundDecoder, DecoderConfig, EncoderDecoder,
                                            EncoderDecoderCache, positions_of)
from tformer.nn import SinusoidalPositions, TokenEmbedding
from tformer.nn.attend import BACKENDS
from tformer.nn.dropout import Dropout
from tformer.nn.feedforward import ACTIVATIONS
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

    @property
    def block_spec(self) -> BlockSpec:
        return BlockSpec(self.d_model, self.n_heads, self.d_ff or 4 * self.d_model, self.activation,
                         self.norm, self.norm_eps, self.pre_norm, self.dropout,
                         self.dropout if self.attn_dropout is None else self.attn_dropout, self.attn_backend)


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


class Seq2Seq(EncoderDecoder):
    """Source ids (B, S) and target input ids (B, T) -> next-target-token logits (B, T, V)."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = c = config
        self.src_emb = TokenEmbedding(c.vocab_size, c.d_model, scale=c.scale_embeddings)
        self.tgt_emb = (self.src_emb if c.share_embeddings else
                        TokenEmbedding(c.target_vocab_size, c.d_model, scale=c.scale_embeddings))
        self.pos = SinusoidalPositions(c.context_length, c.d_model)
        self.drop = Dropout(c.dropout)
        self.build_stacks(c.block_spec, c.n_encoder_layers, c.n_decoder_layers, final_norms=c.has_final_norm)
        self.out_proj = nn.Linear(c.d_model, c.target_vocab_size, bias=False)
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
        for emb in dict.fromkeys([self.src_emb, self.tgt_emb]):  # once each, in a fixed order
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

    def embed_target(self, ids: Tensor, positions: Tensor) -> Tensor:
        return self._embed(self.tgt_emb, ids, positions)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.out_proj(hidden)

    def check_target(self, ids: Tensor, valid: Tensor | None, cached: bool) -> None:
        self._check(ids, valid, "target", cached=cached)

    def encode(self, src_ids: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """src_ids: (B, S) long; src_mask: (B, S), 1 for real tokens, 0 for padding (either
        side). Returns the memory (B, S, d_model)."""
        self._check(src_ids, src_mask, "source")
        valid = None if src_mask is None else src_mask.bool()
        return self.run_encoder(self._embed(self.src_emb, src_ids, positions_of(src_ids, valid)), valid)

    def decode(self, tgt_ids: Tensor, memory: Tensor | None, *, src_mask: Tensor | None = None,
               tgt_mask: Tensor | None = None, cache: EncoderDecoderCache | None = None) -> Tensor:
        """tgt_ids: (B, T) target input (starting with <bos>); memory: (B, S, d_model) from
        `encode` (ignored with a cache, which holds its own). Returns logits (B, T, V)."""
        return self.run_decoder(tgt_ids, memory, context_valid=None if src_mask is None else src_mask.bool(),
                                target_valid=None if tgt_mask is None else tgt_mask.bool(), cache=cache)

    def forward(self, src_ids: Tensor, tgt_ids: Tensor, *, src_mask: Tensor | None = None,
                tgt_mask: Tensor | None = None) -> Tensor:
        """Teacher-forced logits (B, T, V): src_ids (B, S), tgt_ids (B, T) = <bos> + target;
        masks are 1 for real tokens, 0 for padding (None: no padding)."""
        memory = self.encode(src_ids, src_mask)
        return self.decode(tgt_ids, memory, src_mask=src_mask, tgt_mask=tgt_mask)

    def bind(self, src_ids: Tensor, src_mask: Tensor | None = None) -> BoundDecoder:
        """Encode the sources once; the returned decoder generates their translations."""
        valid = None if src_mask is None else src_mask.bool()
        return BoundDecoder(self, self.encode(src_ids, src_mask), valid,
                            DecoderConfig(self.config.target_vocab_size, self.config.context_length))


Seq2SeqCache = EncoderDecoderCache  # the name before the encoder-decoder core
