"""Will a model fit in memory? Asked before its weights are allocated, so a config too large for
the machine is one line saying how much it would need, not an allocator traceback or the kernel's
OOM killer (which may take other processes with it).

    check_fits(config)                       # opening a run: the weights once
    check_fits(config, copies=4, ...)        # training with Adam: weights, gradients, two moments

The count is exact: the model is built on PyTorch's meta device (shapes, no storage), so any
family is measured the same way without knowing its layout.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from tformer.config import ConfigError
from tformer.models.registry import FAMILIES, family_of

log = logging.getLogger(__name__)

MEMINFO = Path("/proc/meminfo")
CGROUP_V2 = Path("/sys/fs/cgroup")  # memory.max / memory.current of this container, if limited


def model_bytes(config: object) -> tuple[int, int]:
    """(parameters, bytes of parameters and buffers) of the model `config` describes, counted on
    the meta device: nothing is allocated, tied weights are counted once."""
    model_cls: type[nn.Module] = FAMILIES[family_of(config)][1]
    with torch.device("meta"):
        model = model_cls(config)
    params = list(model.parameters())
    tensors = [*params, *model.buffers()]
    return sum(p.numel() for p in params), sum(t.numel() * t.element_size() for t in tensors)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> int | None:
    """Bytes this process can still allocate: psutil's `available` if installed, else /proc/meminfo
    MemAvailable, lowered to a cgroup v2 limit (containers); None where neither can be read."""
    try:
        import psutil  # optional
        free: int | None = int(psutil.virtual_memory().available)
    except ImportError:
        free = None
        try:
            for line in MEMINFO.read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024  # kB
        except (OSError, ValueError, IndexError):
            free = None
    limit, used = _read_int(CGROUP_V2 / "memory.max"), _read_int(CGROUP_V2 / "memory.current")
    if limit is not None and used is not None:
        free = limit - used if free is None else min(free, limit - used)
    return free


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_fits(config: object, *, copies: int = 1, what: str = "this model",
               advice: str = "use a smaller config (fewer layers, a smaller d_model or vocabulary)",
               available: int | None = None) -> int:
    """Refuse (ConfigError, one line) a model whose parameters and buffers, `copies` times (1 to
    hold the weights; 4 to train with Adam), need more memory than is available. Returns the bytes
    needed. `available` defaults to `available_memory()`; when that is unknown nothing is refused."""
    n_params, size = model_bytes(config)
    need = size * copies
    free = available_memory() if available is None else available
    if free is not None and need > free:
        family = family_of(config)
        times = f" x {copies}" if copies > 1 else ""
        raise ConfigError(f"{what} ({family}, {n_params:,} parameters) needs {human_bytes(need)} of memory "
                          f"({human_bytes(size)} of weights{times}), but {human_bytes(free)} is available; "
                          f"{advice}")
    log.debug("%s: %d parameters, %s needed, %s available", what, n_params, human_bytes(need),
              "unknown" if free is None else human_bytes(free))
    return need


__all__ = ["available_memory", "check_fits", "human_bytes", "model_bytes"]
