"""BERT: a bidirectional Transformer encoder (Devlin et al. 2019) assembled from `tformer.nn`,
with its heads: masked-LM (tied to the word embeddings), sequence and token classification.

Post-norm blocks, learned positions, token-type embeddings, GELU and LayerNorm(eps=1e-12) as in
the original; MiniLM (Wang et al. 2020) has the same architecture at other sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tformer.config import ConfigError, check_choice, check_fraction, check_positive
from tformer.nn import (
    MLP,
    AttentionInputs,
    Block,
    LearnedPositions,
    MultiHeadAttention,
    TokenEmbedding,
    key_padding,
    make_activation,
    make_norm,
)
from tformer.nn.attend import BACKENDS
from tformer.nn.dropout import Dropout
from tformer.nn.feedforward import ACTIVATIONS

HEADS = ("none", "mlm", "sequence", "token")  # none: forward returns the hidden states
POOLINGS = ("cls", "mean")  # cls: tanh(dense(h[CLS])) as BERT; mean: average of real tokens (SBERT)


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    context_length: int = 512  # max_position_embeddings
    type_vocab_size: int = 2
    n_layers: int = 12
    n_heads: int = 12
    d_model: int = 768
    d_ff: int | None = None  # None: 4 * d_model
    dropout: float = 0.1  # embeddings, residual branches, classifier input
    attn_dropout: float = 0.1  # attention weights
    activation: str = "gelu"
    norm_eps: float = 1e-12
    head: str = "none"
    labels: tuple[str, ...] = ()  # class names of a sequence/token head, in output order
    pooling: str = "cls"
    tie_embeddings: bool = True  # MLM decoder weight = word embeddings
    attn_backend: str = "sdpa"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))
        for name in ("vocab_size", "context_length", "type_vocab_size", "n_layers", "n_heads", "d_model"):
            check_positive(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        check_fraction("dropout", self.dropout)
        check_fraction("attn_dropout", self.attn_dropout)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("head", self.head, HEADS)
        check_choice("pooling", self.pooling, POOLINGS)
        check_choice("attn_backend", self.attn_backend, BACKENDS)
        if self.head in ("sequence", "token") and len(self.labels) < 2:
            raise ConfigError(f"a {self.head} classification head needs at least 2 labels, got "
                              f"{list(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"labels must be distinct, got {list(self.labels)}")

    @property
    def ffn_dim(self) -> int:
        return 4 * self.d_model if self.d_ff is None else self.d_ff


PRESETS: dict[str, dict] = {
    # Turc et al. 2019 "Well-Read Students Learn Better" compact BERTs (google/bert_uncased_L-*)
    "bert-tiny": dict(n_layers=2, n_heads=2, d_model=128),
    "bert-mini": dict(n_layers=4, n_heads=4, d_model=256),
    "bert-small": dict(n_layers=4, n_heads=8, d_model=512),
    "bert-base": dict(n_layers=12, n_heads=12, d_model=768),  # 110M with the MLM head
    "bert-large": dict(n_layers=24, n_heads=16, d_model=1024),
    # MiniLM-L6-H384 (all-MiniLM-L6-v2's shape): 6 layers, 384 dims, 12 heads of 32
    "minilm-l6": dict(n_layers=6, n_heads=12, d_model=384),
}


def build_block(config: BertConfig) -> Block:
    """Post-norm: x = LN(x + drop(attn(x))); x = LN(x + drop(W2 gelu(W1 x)))."""
    d = config.d_model
    attn = MultiHeadAttention(d, config.n_heads, dropout=config.attn_dropout, backend=config.attn_backend)
    ffn = MLP(d, config.ffn_dim, make_activation(config.activation))  # BERT has no dropout inside
    norm = lambda: make_norm("layernorm", d, eps=config.norm_eps)  # noqa: E731
    return Block(attn, ffn, norm, pre_norm=False, dropout=config.dropout)


def mean_pool(hidden: Tensor, valid: Tensor | None) -> Tensor:
    """Average of the real tokens' states: (B, T, D), (B, T) bool -> (B, D)."""
    if valid is None:
        return hidden.mean(dim=1)
    weights = valid.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class Pooler(nn.Module):
    """BERT's pooler: tanh(W h[CLS] + b), (B, T, D) -> (B, D)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class MaskedLMHead(nn.Module):
    """h -> decoder(LN(gelu(dense(h)))): (..., D) -> (..., vocab). `decoder.weight` is tied to
    the word embeddings by `Bert` when `tie_embeddings`; the bias is the head's own."""

    def __init__(self, d_model: int, vocab_size: int, activation: nn.Module, norm_eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)
        self.activation = activation
        self.norm = make_norm("layernorm", d_model, eps=norm_eps)
        self.decoder = nn.Linear(d_model, vocab_size)

    def forward(self, hidden: Tensor, valid: Tensor | None = None) -> Tensor:
        return self.decoder(self.norm(self.activation(self.dense(hidden))))


class SequenceClassifierHead(nn.Module):
    """Pooled sentence vector -> dropout -> Linear: (B, T, D) -> (B, n_labels). Pooling is the
    [CLS] pooler (BERT) or the mean of the real tokens (sentence-transformers)."""

    def __init__(self, d_model: int, n_labels: int, dropout: float, pooling: str = "cls") -> None:
        super().__init__()
        check_choice("pooling", pooling, POOLINGS)
        self.pooler = Pooler(d_model) if pooling == "cls" else None
        self.dropout = Dropout(dropout)
        self.classifier = nn.Linear(d_model, n_labels)

    def forward(self, hidden: Tensor, valid: Tensor | None = None) -> Tensor:
        pooled = self.pooler(hidden) if self.pooler is not None else mean_pool(hidden, valid)
        return self.classifier(self.dropout(pooled))


class TokenClassifierHead(nn.Module):
    """Per-token labels (tagging): dropout -> Linear, (B, T, D) -> (B, T, n_labels)."""

    def __init__(self, d_model: int, n_labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = Dropout(dropout)
        self.classifier = nn.Linear(d_model, n_labels)

    def forward(self, hidden: Tensor, valid: Tensor | None = None) -> Tensor:
        return self.classifier(self.dropout(hidden))


def build_head(config: BertConfig) -> nn.Module | None:
    """The head `config.head` names (None for "none")."""
    d, n = config.d_model, len(config.labels)
    if config.head == "mlm":
        return MaskedLMHead(d, config.vocab_size, make_activation(config.activation), config.norm_eps)
    if config.head == "sequence":
        return SequenceClassifierHead(d, n, config.dropout, config.pooling)
    if config.head == "token":
        return TokenClassifierHead(d, n, config.dropout)
    return None


class Bert(nn.Module):
    """Token ids (B, T) -> the head's output: MLM logits (B, T, V), sequence logits (B, n_labels),
    token logits (B, T, n_labels), or hidden states (B, T, D) without a head.

    `head` replaces the one `config.head` describes (any module `(hidden, valid) -> Tensor`).
    """

    def __init__(self, config: BertConfig, head: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = TokenEmbedding(config.vocab_size, config.d_model)
        self.pos_emb = LearnedPositions(config.context_length, config.d_model)
        self.type_emb = nn.Embedding(config.type_vocab_size, config.d_model)
        self.emb_norm = make_norm("layernorm", config.d_model, eps=config.norm_eps)
        self.drop = Dropout(config.dropout)
        self.blocks = nn.ModuleList(build_block(config) for _ in range(config.n_layers))
        self.head = head if head is not None else build_head(config)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT initialisation: N(0, init_std) weights, zero biases, unit LayerNorms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if isinstance(self.head, MaskedLMHead) and self.config.tie_embeddings:
            self.head.decoder.weight = self.tok_emb.weight

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_input(self, ids: Tensor, attention_mask: Tensor | None, token_type_ids: Tensor | None) -> None:
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"token ids must have shape (batch, length >= 1), got {tuple(ids.shape)}")
        if ids.shape[1] > self.config.context_length:
            raise ValueError(f"input of {ids.shape[1]} tokens exceeds the model's limit of "
                             f"{self.config.context_length} positions; truncate it (data.too_long="
                             "truncate) or use shorter texts")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and t.shape != ids.shape:
                raise ValueError(f"{name} shape {tuple(t.shape)} must equal the ids shape {tuple(ids.shape)}")
        if token_type_ids is not None and token_type_ids.numel() and (
                int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= self.config.type_vocab_size):
            raise ValueError(f"token_type_ids must be in [0, {self.config.type_vocab_size})")

    def encode(self, ids: Tensor, *, attention_mask: Tensor | None = None,
               token_type_ids: Tensor | None = None) -> Tensor:
        """Final hidden states (B, T, D). attention_mask: (B, T), 1 for tokens, 0 for padding
        (padding keys are hidden from every query); token_type_ids: (B, T) segment ids."""
        if not torch.compiler.is_compiling():
            self._check_input(ids, attention_mask, token_type_ids)
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)  # (1, T)
        types = torch.zeros_like(ids) if token_type_ids is None else token_type_ids
        x = self.drop(self.emb_norm(self.tok_emb(ids) + self.pos_emb(positions) + self.type_emb(types)))
        mask = None if attention_mask is None else key_padding(attention_mask.bool())
        for block in self.blocks:
            x = block(x, AttentionInputs(mask))
        return x

    def forward(self, ids: Tensor, *, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, predict_at: Tensor | None = None) -> Tensor:
        """The head's output (see the class). predict_at: (B, T) bool, run a per-token head only
        at these positions and return (N, out) rows in row-major order (MLM at masked tokens)."""
        hidden = self.encode(ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        if self.head is None:
            return hidden
        valid = None if attention_mask is None else attention_mask.bool()
        if predict_at is not None:
            return self.head(hidden[predict_at], None)  # (N, D) -> (N, out)
        return self.head(hidden, valid)

    # -- the TextClassifier capability (tformer.models.protocols) ----------------------------------
    def unsupported(self) -> tuple[type, ...]:
        """Without a sequence head there are no classes to predict."""
        from tformer.models.protocols import Classifier

        return () if self.config.head == "sequence" else (Classifier,)

    @property
    def labels(self) -> tuple[str, ...]:
        """Class names of the sequence head, in output order (a sequence head has at least 2)."""
        return self.config.labels

    @property
    def max_tokens(self) -> int:
        return self.config.context_length

    def classify(self, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        """[CLS] ... [SEP] ids (B, T), mask (B, T) 1 for tokens -> logits (B, n_labels)."""
        return self(inputs, attention_mask=mask)
