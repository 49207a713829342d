"""Where joules come from: each source returns the energy used since it was created.

- `RaplSource`: Intel/AMD RAPL package counters under /sys/class/powercap (measured; the whole CPU
  package, so every process on it, not this one alone). Only top-level zones `intel-rapl:N` /
  `amd-rapl:N` are summed: their subzones (`intel-rapl:0:0` core, `:1` uncore, `:2` dram) are parts
  of the package and would count twice, and `psys` (the whole platform) overlaps the packages.
  A counter wraps at `max_energy_range_uj`.
- `NvmlSource`: NVML's total-energy counter of one NVIDIA GPU (measured; millijoules since the
  driver loaded), through `pynvml` from nvidia-ml-py (`pip install tformer[gpu-energy]`).
- `CpuTimeSource`: this process's CPU time (every thread, and children it waited for) times a
  power per busy core (estimated).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

POWERCAP = Path("/sys/class/powercap")
TOP_LEVEL_ZONE = re.compile(r"(intel|amd)-rapl:\d+")
# Intel Xeon Platinum 8480+ (a Sapphire Rapids server CPU with AMX, like this project's machines):
# 350 W TDP over 56 cores (Intel ARK) = 6.25 W per fully busy core, package power only (no DRAM,
# fans or power-supply losses). Override with TFORMER_WATTS_PER_CORE or EnergyMeter(watts_per_core=).
WATTS_PER_CORE = 350.0 / 56
WATTS_VARIABLE = "TFORMER_WATTS_PER_CORE"


class Source(Protocol):
    name: str
    measured: bool

    def joules(self) -> float:
        """Energy since the source was created."""


class RaplSource:
    """The sum of the top-level RAPL zones' counters, wraparound handled per zone."""

    name, measured = "rapl", True

    def __init__(self, zones: list[Path]) -> None:
        self.zones = zones
        self.ranges = [int((zone / "max_energy_range_uj").read_text()) for zone in zones]
        self.last = [self._read(zone) for zone in zones]
        self.total_uj = 0

    @staticmethod
    def _read(zone: Path) -> int:
        return int((zone / "energy_uj").read_text())

    @classmethod
    def find(cls, root: Path = POWERCAP) -> RaplSource | None:
        """The machine's RAPL package zones, or None where there are none or they cannot be read
        (a VM, another OS, or a kernel that keeps energy_uj to root)."""
        try:
            zones = sorted(z for z in root.iterdir() if TOP_LEVEL_ZONE.fullmatch(z.name)
                           and (z / "name").read_text().strip() != "psys")
            return cls(zones) if zones else None
        except (OSError, ValueError):
            return None

    def joules(self) -> float:
        for i, zone in enumerate(self.zones):
            now = self._read(zone)
            step = now - self.last[i]
            if step < 0:  # the counter passed max_energy_range_uj and started again from 0
                step += self.ranges[i]
            self.total_uj += step
            self.last[i] = now
        return self.total_uj / 1e6


def visible_gpu(index: int) -> int:
    """NVML numbers GPUs as the machine does; CUDA_VISIBLE_DEVICES=2,3 makes cuda:0 NVML's 2."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible) and visible[index].isdigit():
        return int(visible[index])
    return index


class NvmlSource:
    """One GPU's nvmlDeviceGetTotalEnergyConsumption (mJ, a 64-bit counter: no wraparound)."""

    name, measured = "nvml", True

    def __init__(self, nvml: Any, handle: Any) -> None:
        self.nvml, self.handle = nvml, handle
        self.start_mj = nvml.nvmlDeviceGetTotalEnergyConsumption(handle)

    @classmethod
    def find(cls, gpu_index: int) -> NvmlSource | None:
        """The GPU's counter, or None without pynvml, a driver or a GPU that has the counter
        (Volta and later)."""
        try:
            import pynvml
        except ImportError:
            log.info("pynvml is not installed: GPU energy is not measured (pip install tformer[gpu-energy])")
            return None
        try:
            pynvml.nvmlInit()
            return cls(pynvml, pynvml.nvmlDeviceGetHandleByIndex(visible_gpu(gpu_index)))
        except (getattr(pynvml, "NVMLError", RuntimeError), RuntimeError, OSError) as error:
            log.info("NVML cannot read GPU %d's energy (%s): it is not measured", gpu_index, error)
            return None

    def joules(self) -> float:
        return (self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self.start_mj) / 1e3


def process_cpu_seconds() -> float:
    """CPU seconds of this process (all its threads: torch's intra-op pool included) and of the
    children it has waited for (data workers)."""
    children = os.times()
    return time.process_time() + children.children_user + children.children_system


class CpuTimeSource:
    """An estimate: CPU seconds since creation x watts per busy core."""

    name, measured = "cpu-time", False

    def __init__(self, watts_per_core: float,
                 cpu_seconds: Callable[[], float] = process_cpu_seconds) -> None:
        if not watts_per_core > 0:
            raise ValueError(f"watts per core must be a positive number of watts, got {watts_per_core!r}")
        self.watts_per_core, self.cpu_seconds = watts_per_core, cpu_seconds
        self.start = cpu_seconds()

    def joules(self) -> float:
        return (self.cpu_seconds() - self.start) * self.watts_per_core


def watts_per_core_setting(value: float | None = None) -> float:
    """`value`, else $TFORMER_WATTS_PER_CORE, else WATTS_PER_CORE; a bad value is one line."""
    if value is not None:
        watts, where = float(value), "watts_per_core"
    else:
        text = os.environ.get(WATTS_VARIABLE)
        if not text:
            return WATTS_PER_CORE
        try:
            watts, where = float(text), WATTS_VARIABLE
        except ValueError:
            watts, where = math.nan, WATTS_VARIABLE
    if not (math.isfinite(watts) and watts > 0):
        raise ValueError(f"{where}={value if value is not None else text!r} is not a positive number of "
                         f"watts per core; e.g. {WATTS_VARIABLE}=6.25")
    return watts
