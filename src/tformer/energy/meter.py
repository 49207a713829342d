"""An energy meter for a run: joules from measured counters where they can be read (NVML for a
GPU, RAPL for the CPU package), else an estimate from CPU time; every reading says which
(`energy_method: measured | estimated`, `energy_source`), with kWh and CO2-equivalent grams.

Counters are read only when asked (the Trainer asks once per log interval), so metering costs a
few file reads or one NVML call per interval, nothing per step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tformer.energy import carbon as carbon_table
from tformer.energy.carbon import CarbonIntensity
from tformer.energy.sources import (
    POWERCAP,
    CpuTimeSource,
    NvmlSource,
    RaplSource,
    Source,
    watts_per_core_setting,
)

JOULES_PER_KWH = 3.6e6


@dataclass(frozen=True)
class EnergyReading:
    """Energy so far, how it was obtained, its carbon, and optionally the work it did."""

    joules: float
    method: str  # "measured" when every part comes from a counter, else "estimated"
    source: str  # e.g. "rapl", "nvml+rapl", "nvml+cpu-time@6.25W/core", "cpu-time@6.25W/core"
    carbon: CarbonIntensity
    work: tuple[tuple[str, float], ...] = ()  # (what, amount): ("tokens", 5e4), ("examples", 512)
    work_joules: float | None = None  # the energy that work took (None: all of `joules`)

    @property
    def kwh(self) -> float:
        return self.joules / JOULES_PER_KWH

    @property
    def co2_g(self) -> float:
        return carbon_table.grams_co2e(self.joules, self.carbon)

    def doing(self, work_joules: float | None = None, **work: float) -> EnergyReading:
        """This reading with work done (tokens=..., examples=...) in `work_joules` of it (default:
        all of it), for `<what>_per_j`: a resumed run's last session, a log interval."""
        return replace(self, work=tuple(work.items()), work_joules=work_joules)

    def per_joule(self) -> dict[str, float | None]:
        """`<what>_per_j` for each kind of work; None while no energy was counted."""
        joules = self.joules if self.work_joules is None else self.work_joules
        return {f"{what}_per_j": amount / joules if joules > 0 else None for what, amount in self.work}

    def fields(self) -> dict[str, float | str | None]:
        """Record fields: energy_j, energy_kwh, co2_g (all cumulative), the labels, work per joule."""
        return {"energy_j": self.joules, "energy_kwh": self.kwh, "co2_g": self.co2_g,
                "energy_method": self.method, "energy_source": self.source,
                "co2_country": self.carbon.label, "co2_g_per_kwh": self.carbon.g_per_kwh, **self.per_joule()}

    def summary(self) -> str:
        """One line for a person: energy, kWh, the method and source, CO2e, work per joule."""
        per = "".join(f", {value:,.4g} {name.removesuffix('_per_j')}/J"
                      for name, value in self.per_joule().items() if value is not None)
        return (f"energy {format_joules(self.joules)} ({self.kwh:.3g} kWh, {self.method}: {self.source}), "
                f"{self.co2_g:.3g} g CO2e at {self.carbon.g_per_kwh:g} g/kWh ({self.carbon.label}, "
                f"{self.carbon.year}){per}")


def format_joules(joules: float) -> str:
    for unit, size in (("MJ", 1e6), ("kJ", 1e3)):
        if abs(joules) >= size:
            return f"{joules / size:.3g} {unit}"
    return f"{joules:.3g} J"


class EnergyMeter:
    """`EnergyMeter.open(...)` then `meter.reading()` whenever a record is due.

    Under several processes each one meters itself; the caller sums `joules()` over processes and
    gives the sum to `reading(joules)`. RAPL counts the whole CPU package, so on a machine with
    several processes only local rank 0 reads it (`local_rank`); the others add their GPU only."""

    def __init__(self, sources: Sequence[Source], carbon: CarbonIntensity, *, note: str = "",
                 missing: str = "") -> None:
        """`missing`: a part of the machine that is used but not counted (e.g. a GPU without
        NVML); the readings are then estimates, whatever the other sources are."""
        self.sources, self.carbon = list(sources), carbon
        measured = all(s.measured for s in self.sources) and not missing
        self.method = "measured" if measured else "estimated"
        self.source = "+".join([describe(s) for s in self.sources] + [part for part in (note, missing) if part])

    @classmethod
    def open(cls, *, gpu_index: int | None = None, country: str | None = None,
             watts_per_core: float | None = None, local_rank: int = 0,
             powercap: Path = POWERCAP) -> EnergyMeter:
        """The best sources this process can read: NVML for its GPU (when `gpu_index` is given),
        RAPL for the CPU, else the CPU-time estimate. An unknown country or a bad power figure
        raises ValueError before anything runs."""
        watts = watts_per_core_setting(watts_per_core)
        intensity = carbon_table.intensity(country)
        sources: list[Source] = []
        gpu = NvmlSource.find(gpu_index) if gpu_index is not None else None
        if gpu is not None:
            sources.append(gpu)
        missing = "gpu-not-counted(no NVML: pip install nvidia-ml-py)" if gpu_index is not None and gpu is None else ""
        rapl = RaplSource.find(powercap)
        if rapl is not None and local_rank > 0:  # the package is counted once, by local rank 0
            return cls(sources, intensity, note="rapl@local-rank-0", missing=missing)
        sources.append(rapl if rapl is not None else CpuTimeSource(watts))
        return cls(sources, intensity, missing=missing)

    @classmethod
    def for_device(cls, device: Any = None, **options: Any) -> EnergyMeter:
        """`open` for work on `device` (a torch.device, or None for the CPU): its GPU is metered
        too when it is a CUDA device."""
        gpu = (device.index or 0) if device is not None and device.type == "cuda" else None
        return cls.open(gpu_index=gpu, **options)

    def joules(self) -> float:
        """This process's energy since the meter was opened."""
        return sum(source.joules() for source in self.sources)

    def reading(self, joules: float | None = None) -> EnergyReading:
        """A reading of `joules` (default: this process's own `joules()`)."""
        joules = self.joules() if joules is None else joules
        return EnergyReading(joules, self.method, self.source, self.carbon)


def describe(source: Source) -> str:
    watts = getattr(source, "watts_per_core", None)
    return source.name if watts is None else f"{source.name}@{watts:g}W/core"


def check_settings(country: str | None = None, watts_per_core: float | None = None) -> None:
    """Check now what a meter would read later (the country's carbon intensity, else
    $TFORMER_COUNTRY; the power figure, else $TFORMER_WATTS_PER_CORE), so that a bad one is refused
    in one line before a run changes anything."""
    watts_per_core_setting(watts_per_core)
    carbon_table.intensity(country)

