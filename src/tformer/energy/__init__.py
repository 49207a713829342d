"""Energy and carbon of a run: `EnergyMeter` (RAPL and NVML counters where readable, else an
estimate from CPU time, always labelled) and `carbon` (grams CO2e per kWh by country, a shipped
table). Rank 0: the Trainer, evaluation and generation all meter themselves."""

from tformer.energy.carbon import CarbonIntensity, intensity
from tformer.energy.meter import EnergyMeter, EnergyReading, check_settings

__all__ = ["CarbonIntensity", "EnergyMeter", "EnergyReading", "check_settings", "intensity"]
