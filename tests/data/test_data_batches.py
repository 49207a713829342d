"""Causal-LM batches: a pure function of (seed, step), ranks partition the global batch, y = x + 1."""

import numpy as np
import pytest
import torch

from tformer.data import causal_lm_batch, eval_batches

TOKENS = np.arange(1000, dtype=np.uint16)  # token i at position i: a window shows where it came from


def test_windows_are_slices_and_targets_are_shifted():
    x, y = causal_lm_batch(TOKENS, batch_size=8, context=16, step=0, seed=0)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)                                        # next token
    assert torch.equal(x - x[:, :1], torch.arange(16).expand(8, 16))    # contiguous windows


def test_batch_depends_only_on_seed_and_step():
    a = causal_lm_batch(TOKENS, 8, 16, step=5, seed=1)
    causal_lm_batch(TOKENS, 8, 16, step=6, seed=1)                      # no hidden state between calls
    b = causal_lm_batch(TOKENS, 8, 16, step=5, seed=1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], causal_lm_batch(TOKENS, 8, 16, step=6, seed=1)[0])
    assert not torch.equal(a[0], causal_lm_batch(TOKENS, 8, 16, step=5, seed=2)[0])
    starts = np.random.default_rng([1, 5]).integers(0, len(TOKENS) - 16, size=8)
    assert np.array_equal(a[0][:, 0].numpy(), starts)                  # the documented recipe


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_partition_the_global_batch(world_size):
    x, y = causal_lm_batch(TOKENS, 8, 16, step=3, seed=7)
    parts = [causal_lm_batch(TOKENS, 8, 16, step=3, seed=7, rank=r, world_size=world_size)
             for r in range(world_size)]
    assert all(p[0].shape == (8 // world_size, 16) for p in parts)
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_smallest_array_and_memmap(tmp_path):
    path = tmp_path / "t.bin"
    TOKENS[:17].tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    x, y = causal_lm_batch(tokens, 2, 16, step=0, seed=0)              # only one window fits
    assert torch.equal(x[0], torch.arange(16)) and torch.equal(y[1], torch.arange(1, 17))


def test_eval_batches_are_fixed_and_split_over_ranks():
    first = eval_batches(TOKENS, 4, 8, n_batches=3, seed=0)
    again = eval_batches(TOKENS, 4, 8, n_batches=3, seed=0)
    assert len(first) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert all(torch.equal(y, x + 1) for x, y in first)
    halves = [eval_batches(TOKENS, 4, 8, 3, seed=0, rank=r, world_size=2) for r in range(2)]
    assert all(torch.equal(torch.cat([halves[0][i][0], halves[1][i][0]]), first[i][0]) for i in range(3))


@pytest.mark.parametrize("kwargs, message", [
    (dict(tokens=TOKENS[:16], context=16), r"needs 17 tokens but the array has 16"),
    (dict(batch_size=6, world_size=4), r"not divisible by world_size 4"),
    (dict(rank=2, world_size=2), r"rank must be in \[0, 2\)"),
    (dict(seed=-1), r"seed and step must be >= 0"),
    (dict(context=0), r"must be > 0"),
])
def test_errors(kwargs, message):
    args = dict(tokens=TOKENS, batch_size=8, context=16, step=0, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        causal_lm_batch(**args)
    if "step" not in kwargs and "seed" not in kwargs:
        with pytest.raises(ValueError, match=message):
            eval_batches(**{k: v for k, v in args.items() if k != "step"}, n_batches=1)
