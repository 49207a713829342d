"""A transformer that generates images: an encoder reads a condition (a class label or a short
text prompt), a decoder writes the image one pixel token at a time in raster order.

Pixels become tokens through a palette (evenly spaced grey levels, or k-means colours for colour
images; `tformer.data.images.Palette`); the palette is part of the config, so a checkpoint can
turn its tokens back into pixels. The decoder adds learned row and column embeddings of the
pixel it is predicting (2-D positions). Condition token 0 is the null condition: trained with
condition dropout it gives the unconditional model that classifier-free guidance (Ho & Salimans
2022) mixes in while sampling.

Decoding reuses the shared generation code: `model.bind(cond_ids, cond_mask, guidance_scale)`
returns a causal LM over pixel tokens (the `CausalLM` protocol), sampled by `generate`. The
stacks, the decoder cache and the bound decoder are the encoder-decoder core
(`models.encoder_decoder`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tformer.config import ConfigError, check_choice, check_fraction, check_positive
from tformer.data.palette import Palette
from tformer.models.encoder_decoder import (BlockSpec, BoundDecoder, DecoderConfig, EncoderDecoder,
                                            EncoderDecoderCache)
from tformer.nn import KVCache
from tformer.nn.attend import BACKENDS
from tformer.nn.dropout import Dropout
from tformer.nn.feedforward import ACTIVATIONS
from tformer.nn.norm import NORMS

CONDITIONS = ("label", "text")
NULL = 0  # condition token of "no condition" (classifier-free guidance)
MAX_GUIDANCE = 30.0
GREY_16 = tuple(i * 255 / 15 for i in range(16))  # the default palette; tasks set it from the data


@dataclass(frozen=True)
class ImageGenConfig:
    height: int = 8
    width: int = 8
    channels: int = 1
    palette: tuple[float, ...] = GREY_16  # K x channels values in [0, 255], flattened; K = pixel tokens
    condition: str = "label"  # label: one token per class; text: character ids of a prompt
    labels: tuple[str, ...] = ()  # class names, in label-id order
    condition_vocab: int = 10  # condition tokens besides the null token (label: = len(labels))
    condition_length: int = 1  # longest condition in tokens (label: 1)
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    n_heads: int = 4
    d_model: int = 64
    d_ff: int | None = None  # None: 4 * d_model
    dropout: float = 0.0
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    attn_backend: str = "sdpa"

    def __post_init__(self) -> None:
        object.__setattr__(self, "palette", tuple(float(v) for v in self.palette))
        object.__setattr__(self, "labels", tuple(str(v) for v in self.labels))
        for name in ("height", "width", "channels", "n_encoder_layers", "n_decoder_layers", "n_heads",
                     "d_model", "condition_length"):
            check_positive(name, getattr(self, name))
        check_choice("condition", self.condition, CONDITIONS)
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if len(self.palette) < 2 * self.channels or len(self.palette) % self.channels:
            raise ConfigError(f"palette must hold K x channels ({self.channels}) values with K >= 2, got "
                              f"{len(self.palette)} values; the image_generation task sets it from the data")
        if not all(0.0 <= v <= 255.0 for v in self.palette):
            raise ConfigError("palette values must be in [0, 255]")
        if self.condition == "label" and self.condition_length != 1:
            raise ConfigError("a label condition is one token: condition_length must be 1")
        if self.condition == "label" and self.labels and self.condition_vocab != len(self.labels):
            raise ConfigError(f"condition_vocab ({self.condition_vocab}) must equal the number of labels "
                              f"({len(self.labels)}) for label conditions")
        check_positive("condition_vocab", self.condition_vocab)
        check_fraction("dropout", self.dropout)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("norm", self.norm, NORMS)
        check_choice("attn_backend", self.attn_backend, BACKENDS)

    @property
    def n_image_tokens(self) -> int:
        return len(self.palette) // self.channels

    @property
    def n_pixels(self) -> int:
        return self.height * self.width

    @property
    def bos_id(self) -> int:  # the decoder's start token, after the palette's tokens
        return self.n_image_tokens

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def block_spec(self) -> BlockSpec:
        """Pre-norm blocks; one dropout rate for residual branches, the MLP and attention."""
        return BlockSpec(self.d_model, self.n_heads, self.d_ff or 4 * self.d_model, self.activation,
                         self.norm, self.norm_eps, True, self.dropout, self.dropout, self.attn_backend)


PRESETS: dict[str, dict] = {
    # the shape of the Keras sketch tformer started from: 64 dims, 4 heads, 2 + 2 layers
    "seed-sketch": dict(d_model=64, n_heads=4, n_encoder_layers=2, n_decoder_layers=2),
    "image-gen-small": dict(d_model=128, n_heads=4, n_encoder_layers=2, n_decoder_layers=4),
}


class ImageGenerator(EncoderDecoder):
    """Condition ids (B, L) and pixel tokens (B, H*W) -> next-pixel logits (B, H*W, K)."""

    def __init__(self, config: ImageGenConfig) -> None:
        super().__init__()
        self.config = c = config
        self.cond_emb = nn.Embedding(c.condition_vocab + 1, c.d_model)  # + the null condition
        self.cond_pos = nn.Embedding(c.condition_length, c.d_model)
        self.pixel_emb = nn.Embedding(c.n_image_tokens + 1, c.d_model)  # + <bos>
        self.row_emb, self.col_emb = nn.Embedding(c.height, c.d_model), nn.Embedding(c.width, c.d_model)
        self.drop = Dropout(c.dropout)
        self.build_stacks(c.block_spec, c.n_encoder_layers, c.n_decoder_layers, final_norms=True)
        self.head = nn.Linear(c.d_model, c.n_image_tokens, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) for every matrix and embedding, zero biases, unit norms;
        the projections into the residual stream (attention and cross-attention out_proj, MLP
        down) N(0, 0.02 / sqrt(2 x layers)), layers = encoder + decoder (Radford et al. 2019, 2.3)."""
        layers = self.config.n_encoder_layers + self.config.n_decoder_layers
        residual = {id(linear.weight) for linear in self.residual_projections()}
        for p in self.parameters():
            if p.dim() < 2:
                continue
            std = 0.02 / math.sqrt(2 * layers) if id(p) in residual else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode(self, cond_ids: Tensor, cond_mask: Tensor | None = None) -> Tensor:
        """cond_ids: (B, L) long in [0, condition_vocab] (0 = null); cond_mask: (B, L), 1 for real
        tokens (right padding). Returns the memory (B, L, d_model)."""
        c = self.config
        if cond_ids.dim() != 2 or not 0 < cond_ids.shape[1] <= c.condition_length:
            raise ValueError(f"condition ids must be (batch, 1..{c.condition_length}), got {tuple(cond_ids.shape)}")
        if not torch.compiler.is_compiling() and cond_ids.numel():
            low, high = int(cond_ids.min()), int(cond_ids.max())
            if low < 0 or high > c.condition_vocab:
                raise ValueError(f"condition id {low if low < 0 else high} is outside [0, {c.condition_vocab}]")
        positions = torch.arange(cond_ids.shape[1], device=cond_ids.device)
        x = self.drop(self.cond_emb(cond_ids) + self.cond_pos(positions))
        return self.run_encoder(x, None if cond_mask is None else cond_mask.bool())

    def pixel_positions(self, positions: Tensor) -> Tensor:
        """Row + column embeddings of flat pixel indices (any shape) -> (..., d_model)."""
        positions = positions.clamp(max=self.config.n_pixels - 1)
        return self.row_emb(positions // self.config.width) + self.col_emb(positions % self.config.width)

    def embed_target(self, ids: Tensor, positions: Tensor) -> Tensor:
        """Input t predicts pixel t, whose row/column embeddings it carries."""
        return self.drop(self.pixel_emb(ids) + self.pixel_positions(positions))

    def logits(self, hidden: Tensor) -> Tensor:
        return self.head(hidden)

    def check_target(self, ids: Tensor, valid: Tensor | None, cached: bool) -> None:
        if not cached and ids.shape[1] > self.config.n_pixels:
            raise ValueError(f"{ids.shape[1]} decoder inputs exceed the image's "
                             f"{self.config.n_pixels} pixels")

    def decode(self, ids: Tensor, memory: Tensor | None, *, cond_mask: Tensor | None = None,
               cache: EncoderDecoderCache | None = None) -> Tensor:
        """ids: (B, T) decoder input (<bos>, then pixel tokens); memory: (B, L, d_model) (a cache
        holds its own). Returns logits over the palette (B, T, K)."""
        return self.run_decoder(ids, memory, context_valid=None if cond_mask is None else cond_mask.bool(),
                                cache=cache)

    def forward(self, cond_ids: Tensor, tokens: Tensor, *, cond_mask: Tensor | None = None) -> Tensor:
        """Teacher-forced logits (B, H*W, K) for pixel tokens (B, H*W) given conditions (B, L)."""
        c = self.config
        if tokens.dim() != 2 or tokens.shape[1] != c.n_pixels:
            raise ValueError(f"expected pixel tokens of shape (batch, {c.n_pixels}) for {c.height}x{c.width} "
                             f"images, got {tuple(tokens.shape)}")
        bos = torch.full_like(tokens[:, :1], c.bos_id)
        memory = self.encode(cond_ids, cond_mask)
        return self.decode(torch.cat([bos, tokens[:, :-1]], 1), memory, cond_mask=cond_mask)

    def bind(self, cond_ids: Tensor, cond_mask: Tensor | None = None,
             guidance_scale: float = 1.0) -> BoundImageDecoder:
        """Encode the conditions once (and the null condition when guided); the returned decoder
        samples one image per condition row."""
        check_guidance(guidance_scale)
        if guidance_scale != 1.0:  # rows B..2B-1: the null condition (one real token)
            null_ids = torch.full_like(cond_ids, NULL)
            null_mask = torch.zeros_like(cond_ids, dtype=torch.bool)
            null_mask[:, 0] = True
            real_mask = torch.ones_like(null_mask) if cond_mask is None else cond_mask.bool()
            cond_ids, cond_mask = torch.cat([cond_ids, null_ids]), torch.cat([real_mask, null_mask])
        valid = None if cond_mask is None else cond_mask.bool()
        return BoundImageDecoder(self, self.encode(cond_ids, valid), valid, guidance_scale)


    # -- the ImageSampler capability (tformer.models.protocols) -----------------------------------
    def condition_names(self) -> tuple[str, ...]:
        """The class names it was trained on (a text model also takes other prompts)."""
        return self.config.labels

    def palette(self) -> Palette:
        c = self.config
        return Palette(np.asarray(c.palette, dtype=np.float32).reshape(-1, c.channels))

    def to_images(self, tokens: Tensor) -> np.ndarray:
        """Pixel tokens (N, H*W) -> uint8 images (N, H, W, C) through the palette."""
        return self.palette().dequantise(tokens.cpu().numpy(), self.config.height, self.config.width)


def check_guidance(scale: float) -> None:
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and 0.0 <= scale <= MAX_GUIDANCE):
        raise ValueError(f"guidance scale must be a number in [0, {MAX_GUIDANCE:g}] (1 = no guidance, "
                         f"0 = unconditional, 1.5-4 typical), got {scale!r}")


class BoundImageDecoder(BoundDecoder):
    """The decoder bound to encoded conditions: a causal LM over pixel tokens (the `CausalLM`
    protocol). With guidance s != 1 each step runs the conditional and null rows together and
    returns log p_null + s (log p_cond - log p_null). Its vocabulary includes <bos>, which is
    never sampled (its logit is -inf)."""

    def __init__(self, model: ImageGenerator, memory: Tensor, cond_valid: Tensor | None,
                 guidance: float) -> None:
        c = model.config
        super().__init__(model, memory, cond_valid, DecoderConfig(c.n_image_tokens + 1, c.n_pixels + 1))
        self.guidance = guidance
        self.rows = memory.shape[0] // (1 if guidance == 1.0 else 2)  # guided: [conditions; null]

    def __call__(self, ids: Tensor, *, attention_mask: Tensor | None = None,
                 cache: KVCache | None = None) -> Tensor:
        """ids (B, T) -> logits (B, T, K + 1); the prompt must be unpadded (<bos> per row)."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("image prompts cannot be padded: start every image from <bos>")
        guided = self.guidance != 1.0
        logits = super().__call__(torch.cat([ids, ids]) if guided else ids, cache=cache)
        if guided:
            cond, null = F.log_softmax(logits.float(), -1).chunk(2)
            logits = null + self.guidance * (cond - null)
        never_bos = torch.full_like(logits[..., :1], -torch.inf)
        return torch.cat([logits, never_bos], -1)
