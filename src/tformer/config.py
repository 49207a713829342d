"""Configuration helpers: frozen dataclasses built from plain dicts with errors that name the
bad key or value and say what is allowed."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Iterable, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration is inconsistent or names something unknown; the message says how to fix it."""


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest option, or '' when none is close."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        hint = did_you_mean(value, map(str, choices)) if isinstance(value, str) else ""
        raise ConfigError(f"{field}={value!r} is not valid{hint}; choose one of {choices}")


def check_positive(field: str, value: int | float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{field} must be {bound}, got {value}")


def check_fraction(field: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{field} must be in [0, 1), got {value}")


def from_dict(cls: type[T], data: dict[str, Any], *, where: str | None = None) -> T:
    """Build dataclass `cls` from `data`, refusing keys it does not have."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = where or cls.__name__
        key = unknown[0]
        raise ConfigError(f"unknown key {key!r} in {where}{did_you_mean(key, names)}; "
                          f"valid keys: {', '.join(names)}")
    return cls(**data)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
