"""Transformer-XL (Dai et al. 2019): a causal language model with segment-level recurrence and
relative positional attention, assembled from `tformer.nn`.

    out = model(segment, memory)          # segment: (B, T) ids; memory: from model.new_memory(B)
    out.logits, out.memory                # (B, T, V); the memory to pass with the next segment

Each layer remembers its inputs over the last `capacity` positions of earlier segments (detached:
no gradient flows into them, section 3.2) and attends over [memory; segment] with a causal mask
offset by the memory length. Positions are relative (section 3.3, `nn.relative`), so a memory of
any length works at evaluation. Memory is per batch row; `Memory.reset(rows)` or `resets` mark
document boundaries: a position never attends to an earlier document.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from tformer.config import ConfigError, check_choice, check_fraction, check_positive
from tformer.nn import MLP, Block, Mask, TokenEmbedding, causal
from tformer.nn.dropout import Dropout
from tformer.nn.relative import (BACKENDS, RelativeInputs, RelativeMultiHeadAttention,
                                 relative_sinusoids)


@dataclass(frozen=True)
class TransformerXLConfig:
    vocab_size: int = 267735  # WikiText-103's word vocabulary
    n_layers: int = 16
    n_heads: int = 10
    d_model: int = 410
    d_ff: int = 2100
    seg_len: int = 150  # tokens per training segment (the paper's tgt_len)
    mem_len: int = 150  # positions each layer remembers in training; 0: no recurrence
    eval_mem_len: int | None = None  # at evaluation (None: mem_len); longer helps (section 4.1)
    clamp_len: int | None = None  # distances above it share one encoding (the paper's code)
    dropout: float = 0.1  # embeddings, positions, residual branches, feed-forward
    attn_dropout: float = 0.0  # on attention weights (the paper's dropatt)
    pre_norm: bool = False  # False: post-norm as in the paper
    tie_embeddings: bool = True
    attn_backend: str = "sdpa"  # sdpa | flex | eager | reference (explicit gather, for tests)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layers", "n_heads", "d_model", "d_ff", "seg_len"):
            check_positive(name, getattr(self, name))
        check_positive("mem_len", self.mem_len, allow_zero=True)
        for name in ("eval_mem_len", "clamp_len"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name), allow_zero=True)
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.d_model % 2:
            raise ConfigError(f"sinusoidal relative encodings need an even d_model, got {self.d_model}")
        check_fraction("dropout", self.dropout)
        check_fraction("attn_dropout", self.attn_dropout)
        check_choice("attn_backend", self.attn_backend, BACKENDS)

    @property
    def eval_memory(self) -> int:
        return self.mem_len if self.eval_mem_len is None else self.eval_mem_len


PRESETS: dict[str, dict] = {
    # the paper's WikiText-103 base shape (151M with adaptive softmax; here a full softmax)
    "txl-base-wt103": dict(n_layers=16, n_heads=10, d_model=410, d_ff=2100, seg_len=150, mem_len=150,
                           eval_mem_len=640, clamp_len=400),
    "txl-mini": dict(vocab_size=256, n_layers=4, n_heads=4, d_model=128, d_ff=512, seg_len=64,
                     mem_len=64, eval_mem_len=256),
    "txl-micro": dict(vocab_size=256, n_layers=2, n_heads=2, d_model=32, d_ff=64, seg_len=16,
                      mem_len=16),
}


@dataclass
class Memory:
    """The recurrent state m_τ^n (section 3.2): each layer's inputs over the last `length`
    positions, detached. After a segment of T tokens it keeps the last `capacity` of M + T."""

    states: list[Tensor]  # n_layers x (B, M, d_model)
    capacity: int  # mem_len
    docs: Tensor | None = None  # (B, M) document id per position (-1: forgotten); None: one each

    @property
    def length(self) -> int:
        return self.states[0].shape[1]

    @property
    def batch_size(self) -> int:
        return self.states[0].shape[0]

    def reset(self, rows: Tensor | Sequence[int] | None = None) -> None:
        """Forget rows (all when None): their next tokens start a new document."""
        if rows is None:
            self.states = [s[:, :0] for s in self.states]
            self.docs = None
            return
        if self.length == 0:
            return
        if self.docs is None:
            self.docs = torch.zeros(self.batch_size, self.length, dtype=torch.long,
                                    device=self.states[0].device)
        self.docs[torch.as_tensor(rows, dtype=torch.long, device=self.docs.device)] = -1


class TransformerXLOutput(NamedTuple):
    logits: Tensor  # (B, T, vocab_size)
    memory: Memory  # for the next segment


def same_document(docs: Tensor) -> Mask:
    """Query and key in the same document. docs: (B, K) per key; queries index it absolutely."""
    return Mask(lambda b, h, q, kv: docs[b, kv] == docs[b, q], "same_document", batch_dependent=True)


def build_layer(config: TransformerXLConfig) -> Block[RelativeInputs]:
    """Relative multi-head attention over [SG(memory); x], then a ReLU feed-forward, each with a
    residual connection and LayerNorm (post-norm as in the paper, or pre-norm)."""
    d = config.d_model
    attn = RelativeMultiHeadAttention(d, config.n_heads, dropout=config.attn_dropout,
                                      backend=config.attn_backend)
    ffn = MLP(d, config.d_ff, nn.ReLU(), dropout=config.dropout)
    block = Block(attn, ffn, lambda: nn.LayerNorm(d), pre_norm=config.pre_norm, dropout=config.dropout)
    # parameters in the order of checkpoints written when this layer was its own class (attn,
    # ffn, then the norms): optimizer state is saved by parameter position, not by name
    for name in ("attn_norm", "ffn_norm"):
        block._modules[name] = block._modules.pop(name)  # moves it to the end
    return block


class TransformerXL(nn.Module):
    """Token ids (B, T) and a Memory -> next-token logits (B, T, V) and the next Memory."""

    def __init__(self, config: TransformerXLConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = TokenEmbedding(config.vocab_size, config.d_model, scale=True)  # x sqrt(d)
        self.drop = Dropout(config.dropout)
        self.layers = nn.ModuleList(build_layer(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model) if config.pre_norm else nn.Identity()
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.causal = causal()  # one object: FlexAttention block masks are cached on it
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, init_std) for weights and the biases u, v; zeros for Linear biases (paper's code)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            if isinstance(module, RelativeMultiHeadAttention):
                nn.init.normal_(module.content_bias, std=self.config.init_std)
                nn.init.normal_(module.position_bias, std=self.config.init_std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_memory(self, batch: int, mem_len: int | None = None, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> Memory:
        """An empty memory for `batch` rows keeping `mem_len` positions (default: config.mem_len;
        pass config.eval_memory for evaluation)."""
        mem_len = self.config.mem_len if mem_len is None else mem_len
        if mem_len < 0:
            raise ValueError(f"mem_len must be >= 0 (0 disables the recurrence), got {mem_len}")
        if batch < 1:
            raise ValueError(f"a memory needs at least one row, got batch={batch}")
        param = self.tok_emb.weight  # not the head: a quantized head dequantizes on read
        empty = torch.zeros(batch, 0, self.config.d_model, dtype=dtype or param.dtype,
                            device=device or param.device)
        return Memory([empty] * self.config.n_layers, mem_len)

    def _check_input(self, ids: Tensor, memory: Memory, resets: Tensor | None) -> None:
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"token ids must have shape (batch, length) with length >= 1, got "
                             f"{tuple(ids.shape)}")
        if len(memory.states) != self.config.n_layers:
            raise ValueError(f"the memory has {len(memory.states)} layers, the model "
                             f"{self.config.n_layers}; create it with model.new_memory")
        if memory.batch_size != ids.shape[0] or memory.states[0].shape[-1] != self.config.d_model:
            raise ValueError(f"the memory holds {memory.batch_size} rows of width "
                             f"{memory.states[0].shape[-1]}, the input {ids.shape[0]} rows for "
                             f"d_model {self.config.d_model}; create it with model.new_memory")
        if resets is not None and (resets.shape != ids.shape or resets.dtype != torch.bool):
            raise ValueError(f"resets must be a bool tensor shaped like the ids {tuple(ids.shape)}, "
                             f"got {resets.dtype} {tuple(resets.shape)}")

    def _key_documents(self, memory: Memory, resets: Tensor | None, T: int) -> Tensor | None:
        """Document id of every key (B, M + T), or None when each row is one document."""
        if resets is None and memory.docs is None:
            return None
        B, M = memory.batch_size, memory.length
        device = memory.states[0].device
        mem_docs = (memory.docs if memory.docs is not None
                    else torch.zeros(B, M, dtype=torch.long, device=device))
        base = mem_docs[:, -1].clamp(min=0) if M else torch.zeros(B, dtype=torch.long, device=device)
        new = base.unsqueeze(1).expand(B, T)
        if resets is not None:
            new = new + resets.long().cumsum(1)  # a reset at t starts a new document there
        return torch.cat([mem_docs, new], dim=1)

    @torch.no_grad()
    def _next_memory(self, memory: Memory, hidden: list[Tensor], docs: Tensor | None) -> Memory:
        """m_{τ+1}^n = the last `capacity` positions of [m_τ^n; h_τ^n], detached (section 3.2)."""
        keep = memory.capacity
        states = [torch.cat([m, h.detach()], dim=1)[:, max(m.shape[1] + h.shape[1] - keep, 0):]
                  for m, h in zip(memory.states, hidden)]
        if docs is not None:
            docs = docs[:, docs.shape[1] - states[0].shape[1]:]
            one_document = bool(((docs == docs[:, -1:]) & (docs >= 0)).all())
            docs = None if one_document else docs
        return Memory(states, keep, docs)

    def _memory_input(self, layer: Block[RelativeInputs], states: Tensor) -> Tensor | None:
        """What a layer's keys/values read from its memory (B, M, d): pre-norm normalises the
        memory with the layer's attention norm, as the block does to x; None when empty."""
        if states.shape[1] == 0:
            return None
        return layer.attn_norm(states) if self.config.pre_norm else states

    def forward(self, ids: Tensor, memory: Memory | None = None, *,
                resets: Tensor | None = None) -> TransformerXLOutput:
        """ids: (B, T) long; memory: from `new_memory` or the previous call (None: a fresh one of
        config.mem_len); resets: (B, T) bool, True where a new document begins."""
        memory = self.new_memory(ids.shape[0], device=ids.device) if memory is None else memory
        self._check_input(ids, memory, resets)
        M, T = memory.length, ids.shape[1]
        docs = self._key_documents(memory, resets, T)  # (B, M + T) or None
        mask = self.causal if docs is None else self.causal & same_document(docs)
        x = self.drop(self.tok_emb(ids))  # (B, T, d)
        pos = relative_sinusoids(M + T, self.config.d_model, clamp_len=self.config.clamp_len,
                                 device=ids.device)
        pos = self.drop(pos.to(x.dtype))  # (M + T, d): R in descending distance
        hidden = []
        for layer, layer_memory in zip(self.layers, memory.states):
            hidden.append(x)  # the memory of layer n holds its inputs (h^{n-1})
            x = layer(x, RelativeInputs(pos, mask, self._memory_input(layer, layer_memory)))
        logits = self.lm_head(self.drop(self.norm(x)))
        return TransformerXLOutput(logits, self._next_memory(memory, hidden, docs))


def count_parameters(config: TransformerXLConfig) -> int:
    """Parameters of a model built from `config`, without allocating it."""
    d, f, L = config.d_model, config.d_ff, config.n_layers
    per_layer = 5 * d * d + 2 * d + (d * f + f + f * d + d) + 4 * d  # attention, u/v, FFN, 2 norms
    head = 0 if config.tie_embeddings else config.vocab_size * d
    return config.vocab_size * d + L * per_layer + head + (2 * d if config.pre_norm else 0)


__all__ = ["Memory", "PRESETS", "TransformerXL", "TransformerXLConfig", "TransformerXLOutput",
           "build_layer", "count_parameters", "same_document"]
