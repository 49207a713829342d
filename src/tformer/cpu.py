"""How many CPU threads torch should use, from the cores that other work leaves free.

torch's intra-op threads synchronise at every operator: when another process holds one of the
cores, a 2-thread operator waits for the slower thread, and small models run several times slower
than on one thread (measured on this project's 2-core machine: the demo's step went from 93 ms
quiet to 249 ms at 2 threads beside two busy processes, 183 ms at 1 thread). `Contention` measures
the cores that *other* processes kept busy over a window (all cores' busy time from /proc/stat,
minus this process's own CPU time), and `threads_for` keeps one thread per core left free.

Linux only (/proc/stat); elsewhere, or when the user fixed a count (OMP_NUM_THREADS,
MKL_NUM_THREADS, TFORMER_CPU_THREADS=N, or a recipe's training.threads), nothing changes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

PROC_STAT = Path("/proc/stat")


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask; os.cpu_count() where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _busy_seconds() -> float | None:
    """All cores' busy seconds since boot (/proc/stat's first line), or None."""
    try:
        fields = PROC_STAT.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    ticks = [int(v) for v in fields[1:9]]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - ticks[3] - ticks[4]) / hz  # all but idle and iowait


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


class Contention:
    """Cores kept busy by other processes since the last `sample()` (or since creation)."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        """(all cores' busy seconds, this process's CPU seconds, wall clock)."""
        busy = _busy_seconds()
        return None if busy is None else (busy, _own_seconds(), time.monotonic())

    def sample(self) -> float | None:
        """Busy cores (0.0 .. all cores) used by others over the window; None where unknown or
        the window was too short to say (under 50 ms)."""
        now = self._read()
        start, self._start = self._start, now
        if start is None or now is None or now[2] - start[2] < 0.05:
            return None
        wall = now[2] - start[2]
        others = (now[0] - start[0]) - (now[1] - start[1])
        return max(0.0, others / wall)


def has_amx_bf16() -> bool:
    """Whether this CPU has AMX bf16 matrix units (Linux: /proc/cpuinfo's amx_bf16 flag)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


def threads_for(others_busy: float, cores: int) -> int:
    """One thread per core the other processes leave free (at least one)."""
    return max(1, min(cores, int(cores - others_busy + 0.5)))


FIXING_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TFORMER_CPU_THREADS")


def requested_threads() -> int | None:
    """TFORMER_CPU_THREADS as a thread count, or None when unset."""
    value = os.environ.get("TFORMER_CPU_THREADS", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"TFORMER_CPU_THREADS={value!r} is not a thread count: set a whole number of "
                         "threads (e.g. 1), or unset it to let tformer use the cores other work leaves free")
    return int(value)


def fixed_by_user() -> bool:
    """Whether the environment fixes torch's thread count (then tformer leaves it alone)."""
    return any(os.environ.get(name) for name in FIXING_VARIABLES)


class ThreadPolicy:
    """Adapts torch's intra-op thread count to contention, measured over each window between
    `update()` calls. Two windows in a row must agree before the count changes, so one busy
    moment does not flip it."""

    def __init__(self, cores: int | None = None) -> None:
        self.cores = cores or usable_cores()
        self.contention = Contention()
        self._pending: int | None = None

    def settle(self, seconds: float = 0.1) -> int:
        """Measure for `seconds` now and set the count at once (before work starts)."""
        self.contention = Contention()
        time.sleep(seconds)
        others = self.contention.sample()
        if others is not None:
            self._set(threads_for(others, self.cores), others)
        return self.current()

    def update(self) -> int | None:
        """Re-measure since the last call; returns the new count when it changed."""
        others = self.contention.sample()
        if others is None:
            return None
        wanted = threads_for(others, self.cores)
        if wanted == self.current():
            self._pending = None
            return None
        if self._pending != wanted:
            self._pending = wanted
            return None
        self._pending = None
        self._set(wanted, others)
        return wanted

    @staticmethod
    def current() -> int:
        import torch

        return torch.get_num_threads()

    def _set(self, threads: int, others: float) -> None:
        import torch

        if threads != torch.get_num_threads():
            log.info("CPU threads %d -> %d (other processes keep %.1f of %d cores busy)",
                     torch.get_num_threads(), threads, others, self.cores)
            torch.set_num_threads(threads)


@contextlib.contextmanager
def restored_threads() -> Iterator[None]:
    """Whatever a policy changes inside, torch's thread count is the caller's again afterwards."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


# glibc returns large freed blocks to the kernel (mmap'd chunks, a trimmed heap top), so every
# activation-sized tensor of the next step page-faults afresh: the demo's 2-thread step took 864k
# minor faults and 1.9 s of system time for 25 steps (78.9 ms/step); keeping freed memory in the
# heap: 119k faults, 0.4 s, 68.3 ms/step. The cost: the process keeps up to KEEP_BYTES of freed
# memory mapped instead of returning it.
KEEP_BYTES = 256 << 20
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
GLIBC_MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                          "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Tell glibc's allocator to keep freed blocks below KEEP_BYTES for reuse (process-wide: the
    CLI calls it; a program embedding tformer may). False (and nothing changed) off glibc or when
    the user tuned malloc through its environment variables."""
    if any(os.environ.get(name) for name in GLIBC_MALLOC_VARIABLES):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(option, value) == 1 for option, value in (
            (_M_MMAP_THRESHOLD, KEEP_BYTES), (_M_TRIM_THRESHOLD, KEEP_BYTES), (_M_TOP_PAD, 64 << 20)))
    except (OSError, AttributeError):  # not glibc
        return False


def return_freed_memory() -> bool:
    """The opposite of keep_freed_memory, for a process whose large blocks come and go (FSDP2
    gathers each block's parameters and frees them again twice a step): blocks of 1 MiB and more
    are mapped per allocation and returned to the kernel when freed, so resident memory follows
    live memory (GPT-2-small at 2 processes: 1734 MiB per process instead of 3108 with glibc's
    defaults, benchmarks/RESULTS.md). False (nothing changed) off glibc or when the user tuned
    malloc through its environment variables."""
    if any(os.environ.get(name) for name in GLIBC_MALLOC_VARIABLES):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(option, value) == 1 for option, value in (
            (_M_MMAP_THRESHOLD, 1 << 20), (_M_TRIM_THRESHOLD, 128 << 10), (_M_TOP_PAD, 128 << 10)))
    except (OSError, AttributeError):  # not glibc
        return False


def thread_policy(fixed: int | None = None, *, adapt: bool = True) -> ThreadPolicy | None:
    """Set torch's thread count for what comes next. `fixed`, else TFORMER_CPU_THREADS, sets it
    (None returned); OMP/MKL_NUM_THREADS or `adapt=False` leave it alone; otherwise one thread per
    core other processes leave free, measured over 0.1 s, and the policy to `update()` later."""
    import torch

    requested = fixed or requested_threads()
    if requested is not None:
        torch.set_num_threads(requested)
        return None
    if not adapt or fixed_by_user():
        return None
    policy = ThreadPolicy()
    policy.settle()
    return policy
