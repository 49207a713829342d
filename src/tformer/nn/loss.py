"""Next-token cross-entropy through a language-model head in chunks of positions, without the
(positions, vocabulary) logits ever existing at once.

GPT-2-small at batch 4 x 256 holds 4 x 256 x 50,257 fp32 logits (206 MB), as large again for
their log-softmax and for their gradient: more than its twelve checkpointed blocks keep. Here
each chunk's logits are made, reduced to a loss and freed, and made again in the backward pass.
A plain `nn.Linear` head takes `LinearCrossEntropy`, which adds every chunk's weight gradient into
one buffer (autograd would hold a (V, d) gradient per chunk and their sum); any other head module
takes non-reentrant `torch.utils.checkpoint` per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

CHUNK_LOGITS = 1 << 23  # logits per chunk (8M: 32 MiB in fp32)


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(h W^T + b, t) (ignore_index rows count 0), chunk by chunk.
    Saves h, W, b, t and one log-sum-exp per row; backward remakes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                ignore_index: int, rows: int) -> Tensor:
        acc = torch.promote_types(hidden.dtype, torch.float32)  # bf16 logits are summed in fp32
        total = hidden.new_zeros((), dtype=acc)
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            logits = F.linear(hidden[start:start + rows], weight, bias).to(acc)  # (n, V)
            lse[start:start + rows] = torch.logsumexp(logits, -1)
            total += F.cross_entropy(logits, targets[start:start + rows], ignore_index=ignore_index,
                                     reduction="sum")
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.ignore_index, ctx.rows = ignore_index, rows
        device = hidden.device.type  # backward remakes the logits under the same autocast as here
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = lse.dtype
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
        for start in range(0, hidden.shape[0], ctx.rows):
            h, t = hidden[start:start + ctx.rows], targets[start:start + ctx.rows]
            with torch.autocast(ctx.autocast[0], dtype=ctx.autocast[1], enabled=ctx.autocast[2]):
                logits = F.linear(h, weight, bias).to(acc)
            grad = torch.exp_(logits.sub_(lse[start:start + ctx.rows, None]))  # softmax, in place
            kept = t != ctx.ignore_index
            grad[kept.nonzero().squeeze(1), t[kept]] -= 1.0
            grad.mul_((grad_total * kept).unsqueeze(1))  # ignored rows get no gradient
            if need_h:
                grad_h[start:start + ctx.rows] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(grad.t(), h.to(acc))
            if need_b:
                grad_b += grad.sum(0)
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return grad_h, cast(grad_w, weight), cast(grad_b, bias) if bias is not None else None, None, None, None


def _chunk_loss(head: nn.Module, hidden: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    logits = head(hidden).float()  # (n, V)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


def chunked_cross_entropy(hidden: Tensor, head: nn.Module, targets: Tensor, *, ignore_index: int = -100,
                          chunk_logits: int = CHUNK_LOGITS) -> Tensor:
    """mean over targets != ignore_index of cross_entropy(head(hidden), targets), the same value
    and gradients as computing all logits at once. hidden: (..., d); targets: (...) long; the head
    may be any module mapping d to the vocabulary (its width is read from its output)."""
    hidden, targets = hidden.flatten(0, -2), targets.flatten()  # (N, d), (N,)
    vocabulary = getattr(head, "out_features", None) or head(hidden[:1]).shape[-1]
    rows = max(1, chunk_logits // vocabulary)
    count = (targets != ignore_index).sum().clamp(min=1)
    if type(head) is nn.Linear:
        return LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, ignore_index, rows) / count
    grads = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        h, t = hidden[start:start + rows], targets[start:start + rows]
        if grads:
            total = total + checkpoint(_chunk_loss, head, h, t, ignore_index, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, t, ignore_index)
    return total / count
