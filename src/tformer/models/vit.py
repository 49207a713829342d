"""ViT: a Vision Transformer image classifier (Dosovitskiy et al. 2021) assembled from `tformer.nn`.

Patches -> [CLS] + positions -> pre-norm blocks -> final norm -> pooled token -> Linear. Learned
positions as in the paper (timm, Hugging Face); fixed 2-D sin-cos positions and mean pooling as in
MAE (He et al. 2022) and "Better plain ViT baselines" (Beyer et al. 2022).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tformer.config import ConfigError, check_choice, check_fraction, check_positive
from tformer.nn import MLP, Block, MultiHeadAttention, PatchEmbedding, make_activation, make_norm
from tformer.nn.attend import BACKENDS
from tformer.nn.dropout import Dropout
from tformer.nn.feedforward import ACTIVATIONS
from tformer.nn.norm import NORMS

POOLINGS = ("cls", "mean")  # cls: the [CLS] token's final state; mean: average of the patch tokens
POSITIONS = ("learned", "sincos2d")


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224  # square images, image_size x image_size pixels
    patch_size: int = 16
    channels: int = 3
    n_classes: int = 1000
    labels: tuple[str, ...] = ()  # class names in output order; when given, n_classes of them
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_ff: int | None = None  # None: 4 * d_model
    dropout: float = 0.0  # embeddings, inside the MLP, residual branches, classifier input
    attn_dropout: float | None = None  # attention weights; None: same as dropout
    pooling: str = "cls"  # "mean" builds no [CLS] token
    position: str = "learned"
    norm: str = "layernorm"
    norm_eps: float = 1e-6  # timm and the paper's JAX code; HF ViT configs say 1e-12
    activation: str = "gelu"
    qkv_bias: bool = True  # biases of q, k, v; the attention output projection always has one
    attn_backend: str = "sdpa"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))
        for name in ("image_size", "patch_size", "channels", "n_classes", "d_model", "n_layers", "n_heads"):
            check_positive(name, getattr(self, name))
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size ({self.image_size}) must be divisible by patch_size "
                              f"({self.patch_size})")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.d_ff is not None:
            check_positive("d_ff", self.d_ff)
        if self.labels and len(self.labels) != self.n_classes:
            raise ConfigError(f"{len(self.labels)} labels given for n_classes={self.n_classes}; give one "
                              f"name per class or none")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"labels must be distinct, got {list(self.labels)}")
        check_fraction("dropout", self.dropout)
        check_fraction("attn_dropout", self.attention_dropout)
        check_choice("pooling", self.pooling, POOLINGS)
        check_choice("position", self.position, POSITIONS)
        check_choice("norm", self.norm, NORMS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("attn_backend", self.attn_backend, BACKENDS)
        if self.position == "sincos2d" and self.d_model % 4:
            raise ConfigError(f"sincos2d positions need d_model divisible by 4 (sin and cos of row and "
                              f"column), got {self.d_model}")
        if self.attn_backend == "flex" and self.attention_dropout > 0:
            raise ConfigError("attn_backend='flex' cannot apply attention dropout; set attn_dropout=0 "
                              "or use attn_backend='sdpa'")

    @property
    def ffn_dim(self) -> int:
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    @property
    def attention_dropout(self) -> float:
        return self.dropout if self.attn_dropout is None else self.attn_dropout

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def n_tokens(self) -> int:
        """Sequence length: one token per patch, plus [CLS] when pooling on it."""
        return self.grid_size ** 2 + (self.pooling == "cls")


PRESETS: dict[str, dict] = {
    # CPU size. Fashion-MNIST / MNIST: 7 x 7 patches of 4 x 4 pixels, 0.8M parameters
    "vit-tiny-mnist": dict(image_size=28, patch_size=4, channels=1, n_classes=10, d_model=128,
                           n_layers=6, n_heads=4, d_ff=256),
    # scikit-learn's 8 x 8 digits: 4 x 4 patches of 2 x 2 pixels, 0.2M parameters
    "vit-digits": dict(image_size=8, patch_size=2, channels=1, n_classes=10, d_model=64, n_layers=4,
                       n_heads=4),
    # ImageNet-1k at 224 px (Dosovitskiy et al. 2021 table 1; Ti and S from Touvron et al. 2021, DeiT)
    "vit-ti/16": dict(d_model=192, n_layers=12, n_heads=3),  # 5,717,416 parameters
    "vit-s/16": dict(d_model=384, n_layers=12, n_heads=6),  # 22,050,664
    "vit-b/16": dict(d_model=768, n_layers=12, n_heads=12),  # 86,567,656
}


def sincos_2d_positions(grid_size: int, dim: int, base: float = 10000.0) -> Tensor:
    """Fixed 2-D positions (grid_size**2, dim) for patches in row-major order, as MAE's
    get_2d_sincos_pos_embed: [sin(col w), cos(col w), sin(row w), cos(row w)] with dim/4
    frequencies w_i = base^(-i / (dim/4))."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a dimension divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64),
                                torch.arange(grid_size, dtype=torch.float64), indexing="ij")
    omega = base ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    col = cols.reshape(-1, 1) * omega  # (N, dim/4)
    row = rows.reshape(-1, 1) * omega
    return torch.cat([col.sin(), col.cos(), row.sin(), row.cos()], dim=1).float()  # (N, dim)


def build_block(config: ViTConfig) -> Block:
    """Pre-norm: x = x + drop(attn(LN(x))); x = x + drop(W2 drop(gelu(W1 LN(x)))) (timm's Block)."""
    d = config.d_model
    # timm/HF: qkv_bias covers q, k, v only; the output projection always has a bias
    attn = MultiHeadAttention(d, config.n_heads, qkv_bias=config.qkv_bias, out_bias=True,
                              dropout=config.attention_dropout, backend=config.attn_backend)
    ffn = MLP(d, config.ffn_dim, make_activation(config.activation), dropout=config.dropout)
    norm = lambda: make_norm(config.norm, d, eps=config.norm_eps)  # noqa: E731
    return Block(attn, ffn, norm, pre_norm=True, dropout=config.dropout)


class ViT(nn.Module):
    """Images (B, C, H, W) float -> class logits (B, n_classes).

    `encode` gives every token's final state, `features` the pooled vector the head reads.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.patch_emb = PatchEmbedding(config.image_size, config.patch_size, config.channels, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if config.pooling == "cls" else None
        if config.position == "learned":
            self.pos_emb = nn.Parameter(torch.zeros(1, config.n_tokens, d))
        else:  # fixed; the [CLS] slot gets zeros (MAE)
            table = sincos_2d_positions(config.grid_size, d)
            if config.pooling == "cls":
                table = torch.cat([torch.zeros(1, d), table])
            self.register_buffer("pos_emb", table.unsqueeze(0), persistent=False)  # (1, N(+1), d)
        self.drop = Dropout(config.dropout)
        self.blocks = nn.ModuleList(build_block(config) for _ in range(config.n_layers))
        self.norm = make_norm(config.norm, d, eps=config.norm_eps)
        self.head = nn.Linear(d, config.n_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Hugging Face ViT's initialisation: trunc_normal_(std=init_std) for every Linear, the patch
        projection, [CLS] and learned positions (the head too: not zeroed); zero biases; unit norms.
        The cut-off is +-2 absolute as in timm/HF, so at std 0.02 effectively a plain normal."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for param in (self.cls_token, self.pos_emb):
            if isinstance(param, nn.Parameter):
                nn.init.trunc_normal_(param, std=std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode(self, images: Tensor) -> Tensor:
        """Every token's final state after the last norm: (B, N(+1), d_model); [CLS] first."""
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor (batch, channels, height, width), "
                             f"got {images.dtype}; convert e.g. uint8 pixels with images.float() / 255")
        x = self.patch_emb(images.to(self.patch_emb.proj.weight.dtype))  # (B, N, d); checks the shape
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N + 1, d)
        x = self.drop(x + self.pos_emb)
        for block in self.blocks:
            x = block(x)  # no mask: every token sees every token
        return self.norm(x)

    def features(self, images: Tensor) -> Tensor:
        """The pooled image vector (B, d_model): the [CLS] state, or the mean of the patch states."""
        tokens = self.encode(images)
        return tokens[:, 0] if self.config.pooling == "cls" else tokens.mean(dim=1)

    def forward(self, images: Tensor) -> Tensor:
        """images: (B, channels, image_size, image_size) float, normalised -> logits (B, n_classes)."""
        return self.head(self.drop(self.features(images)))

    # -- the ImageClassifier capability (tformer.models.protocols) ---------------------------------
    @property
    def labels(self) -> tuple[str, ...]:
        """Class names in output order (their indices when the config names none)."""
        return self.config.labels or tuple(str(i) for i in range(self.config.n_classes))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.config.image_size, self.config.image_size, self.config.channels

    def classify(self, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        """Images (B, C, H, W) in [0, 1] -> logits (B, n_classes); normalised as in training."""
        return self(normalise(inputs))


def normalise(images: Tensor) -> Tensor:
    """[0, 1] pixels -> [-1, 1] (mean 0.5, std 0.5 per channel), as Hugging Face's ViT image
    processor feeds them; training and prediction both call this."""
    return (images - 0.5) / 0.5
