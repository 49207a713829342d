"""Will a model fit in memory? Asked before its weights are allocated, so a config too large for
the machine is one line saying how much it would need, not an allocator traceback or the kernel's
OOM killer (which may take other processes with it).

    check_fits(config)                       # opening a run: the weights once
    check_fits(config, copies=4, ...)        # training with Adam: weights, gradients, two moments

The count is exact: the model is built on PyTorch's meta device (shapes, no storage), so any
family is measured the same way without knowing its layout.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from tformer.config import ConfigError
from tformer.models.registry import FAMILIES, family_of

log = logging.getLogger(__name__)

MEMINFO = Path("/proc/meminfo")
CGROUP_V2 = Path("/sys/fs/cgroup")  # memory.max / memory.current of this container, if limited


MAX_MODULES = 10_000  # far above any real model (GPT-2 large: ~600); stops n_layers=10**9 in ~2 s


class _TooLarge(Exception):
    """Raised from inside a meta build that has already passed the budget."""


@contextlib.contextmanager
def _module_budget() -> Iterator[list[int]]:
    """Count the modules (and the bytes of tensors) this thread registers while the block runs;
    stop the build (_TooLarge) past MAX_MODULES. Meta tensors cost nothing, but each module is a
    Python object: an absurd depth (n_layers=10**9) would take hours and all memory to build."""
    thread, seen, total = threading.get_ident(), set(), [0, 0]  # bytes, modules

    def tensor(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
        if value is not None and threading.get_ident() == thread and id(value) not in seen:
            seen.add(id(value))
            total[0] += value.numel() * value.element_size()

    def submodule(module: nn.Module, name: str, value: nn.Module | None) -> None:
        if threading.get_ident() == thread:
            total[1] += 1
            if total[1] > MAX_MODULES:
                raise _TooLarge

    hooks = [register_module_parameter_registration_hook(tensor),
             register_module_buffer_registration_hook(tensor),
             register_module_module_registration_hook(submodule)]
    try:
        yield total
    finally:
        for hook in hooks:
            hook.remove()


def model_bytes(config: object) -> tuple[int, int]:
    """(parameters, bytes of parameters and buffers) of the model `config` describes, counted on
    the meta device: nothing is allocated, tied weights are counted once. A model of more than
    MAX_MODULES modules is refused (ConfigError) with the bytes counted until then."""
    model_cls: type[nn.Module] = FAMILIES[family_of(config)][1]
    with _module_budget() as total:
        try:
            with torch.device("meta"):
                model = model_cls(config)
        except _TooLarge:
            raise ConfigError(f"a {family_of(config)} model of this config has more than {MAX_MODULES:,} "
                              f"modules (already {human_bytes(total[0])} of weights when counting "
                              "stopped); use fewer layers") from None
        except (RuntimeError, OverflowError) as e:  # sizes past what a tensor can address
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"a {family_of(config)} model of this config cannot be built ({reason}); "
                              "use a smaller config") from None
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
        times = f" ({human_bytes(size)} of weights x {copies})" if copies > 1 else ""
        raise ConfigError(f"{what} ({family}, {n_params:,} parameters) needs {human_bytes(need)} of memory"
                          f"{times}, but {human_bytes(free)} is available; {advice}")
    log.debug("%s: %d parameters, %s needed, %s available", what, n_params, human_bytes(need),
              "unknown" if free is None else human_bytes(free))
    return need


__all__ = ["available_memory", "check_fits", "human_bytes", "model_bytes"]
