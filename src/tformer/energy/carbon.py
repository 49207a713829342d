"""Grams of CO2-equivalent per kWh of electricity, by country, from the table shipped beside this
file (`carbon_intensity.csv`: Our World in Data's carbon intensity of electricity generation, from
Ember and the Energy Institute, yearly averages for 2023; its header names the source).

A country is chosen by ISO 3166-1 code (alpha-2 `FR` or alpha-3 `FRA`), passed in or read from
the `TFORMER_COUNTRY` environment variable; without one the world average is used and the record
says so (`co2_country: "WORLD (no country given)"`)."""

from __future__ import annotations

import csv
import functools
import os
from dataclasses import dataclass
from pathlib import Path

TABLE = Path(__file__).with_name("carbon_intensity.csv")
COUNTRY_VARIABLE = "TFORMER_COUNTRY"
WORLD = "WORLD"


@dataclass(frozen=True)
class CarbonIntensity:
    code: str  # alpha-2 as in the table (WORLD for the world average)
    country: str
    g_per_kwh: float
    year: int
    chosen: bool  # False: no country was given, this is the world average by default

    @property
    def label(self) -> str:
        """What the records say: the code, and that the world average was a default."""
        return self.code if self.chosen else f"{WORLD} (no country given)"


@functools.lru_cache(maxsize=1)
def table() -> dict[str, CarbonIntensity]:
    """Every row of the shipped table, keyed by its alpha-2 and its alpha-3 code (upper case)."""
    rows = [line for line in TABLE.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    found: dict[str, CarbonIntensity] = {}
    for row in csv.DictReader(rows):
        entry = CarbonIntensity(row["alpha2"], row["country"], float(row["g_co2e_per_kwh"]), int(row["year"]),
                                chosen=True)
        found[row["alpha2"].upper()] = found[row["alpha3"].upper()] = entry
    return found


def intensity(country: str | None = None) -> CarbonIntensity:
    """The carbon intensity of `country` (else $TFORMER_COUNTRY, else the world average, flagged).
    An unknown code raises ValueError in one line that says where the valid codes are."""
    country = country if country is not None else os.environ.get(COUNTRY_VARIABLE) or None
    rows = table()
    if country is None:
        world = rows[WORLD]
        return CarbonIntensity(world.code, world.country, world.g_per_kwh, world.year, chosen=False)
    found = rows.get(country.strip().upper())
    if found is None:
        raise ValueError(f"unknown country code {country!r} for carbon intensity: give an ISO 3166 "
                         f"alpha-2 or alpha-3 code (FR, FRA, US, DEU, ...) from the alpha2/alpha3 columns of {TABLE}, "
                         f"or {WORLD} for the world average")
    return found


def grams_co2e(joules: float, carbon: CarbonIntensity) -> float:
    """CO2-equivalent grams of `joules` of electricity at `carbon`'s intensity (1 kWh = 3.6e6 J)."""
    return joules / 3.6e6 * carbon.g_per_kwh
