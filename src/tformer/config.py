"""Configuration helpers: frozen dataclasses built from plain dicts with errors that name the
bad key or value and say what is allowed."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration is inconsistent or names something unknown; the message says how to fix it."""


# names other toolkits use (nanoGPT, Hugging Face) for what tformer calls otherwise
KNOWN_ALIASES = {"learning_rate": "lr", "n_layer": "n_layers", "n_head": "n_heads", "n_embd": "d_model",
                 "hidden_size": "d_model", "block_size": "context_length", "n_positions": "context_length",
                 "max_iters": "max_steps", "warmup_iters": "warmup_steps", "n_inner": "d_ff",
                 "gradient_accumulation_steps": "grad_accum", "eval_interval": "eval_every",
                 "log_interval": "log_every", "eval_iters": "eval_batches"}


def did_you_mean(name: str, options: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest option, or '' when none is close (or `name` is
    not a string: a YAML key may be a number, a list or null)."""
    if not isinstance(name, str):
        return ""
    options = list(options)
    if KNOWN_ALIASES.get(name) in options:
        return f" (did you mean {KNOWN_ALIASES[name]!r}?)"
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        hint = did_you_mean(value, map(str, choices)) if isinstance(value, str) else ""
        raise ConfigError(f"{field}={value!r} is not valid{hint}; choose one of {choices}")


def check_finite(field: str, value: Any) -> None:
    """Refuse NaN and infinity: a NaN learning rate trains a NaN model without a word."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{field} must be a finite number, got {value}")


def check_positive(field: str, value: int | float, *, allow_zero: bool = False) -> None:
    check_finite(field, value)
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{field} must be {bound}, got {value}")


def check_fraction(field: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{field} must be in [0, 1), got {value}")


def _coerce(value: Any, annotation: Any) -> tuple[bool, Any]:
    """(fits, value) for a value read from YAML against a field annotation: a list becomes a
    tuple for tuple fields, a lone item (`--set tokenizer.special_tokens=<eos>`) a one-item tuple
    (never a string's characters), an int a float for float fields; NaN and infinity do not fit
    a float field (they pass every `>` and `<` check and poison a run)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            fits, coerced = _coerce(value, option)
            if fits:
                return True, coerced
        return False, value
    if annotation is type(None):
        return value is None, value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        fits = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return fits, float(value) if fits else value
    if annotation is str:
        return isinstance(value, str), value
    if origin is tuple or annotation is tuple:
        return _coerce_tuple(value, args)
    if origin is dict or annotation is dict:
        return isinstance(value, dict), value
    return True, value  # an annotation this checker does not know: leave it to the dataclass


def _coerce_tuple(value: Any, args: tuple[Any, ...]) -> tuple[bool, Any]:
    """A list or tuple item by item; a lone scalar as a one-item tuple when the tuple is
    variadic (`tuple[str, ...]`). Fixed-length tuples (`tuple[int, int]`) need every item."""
    variadic = not args or (len(args) == 2 and args[1] is Ellipsis)
    if not isinstance(value, (list, tuple)):
        if not variadic or isinstance(value, (dict, set)) or value is None:
            return False, value
        value = (value,)
    items = [args[0] if args else Any] * len(value) if variadic else list(args)
    if len(items) != len(value):
        return False, value
    pairs = [_coerce(v, item) for v, item in zip(value, items)]
    return all(fits for fits, _ in pairs), tuple(v for _, v in pairs)


def _type_name(annotation: Any) -> str:
    """A type as a user reads it: 'finite float', 'list of str (or one item)', 'int or null'."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "null"
    if annotation is float:
        return "finite float"
    if origin is tuple or annotation is tuple:
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            return f"list of {_type_name(args[0]) if args else 'values'} (or one item)"
        return f"list of {len(args)} items ({', '.join(_type_name(a) for a in args)})"
    if origin is dict or annotation is dict:
        return "mapping"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def from_dict(cls: type[T], data: dict[str, Any], *, where: str | None = None) -> T:
    """Build dataclass `cls` from `data`, refusing unknown keys and values of the wrong type."""
    where = where or cls.__name__
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        raise ConfigError(f"unknown key {key!r} in {where}{did_you_mean(key, names)}; "
                          f"valid keys: {', '.join(names)}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and f.init
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where} needs {', '.join(repr(m) for m in missing)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        fits, values[key] = _coerce(value, hints[key])
        if not fits:
            raise ConfigError(f"{key}={_short(value)} in {where} must be of type {_type_name(hints[key])}")
    return cls(**values)


def _short(value: Any, limit: int = 80) -> str:
    """repr of a value for a one-line message: newlines escaped, long values cut."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _yaml_loader() -> type:
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    float_pattern = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$"
                               r"|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", float_pattern, list("-+0123456789."))
    return Loader


def load_yaml(text: str) -> Any:
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file holding a mapping; errors name the file, line and problem."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))  # JSON is valid YAML
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]  # one line
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text ({e})") from None
    if data is None:
        raise ConfigError(f"{path} is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, found {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'training.lr=3e-4' -> (['training', 'lr'], 0.0003); values are parsed as YAML scalars."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str],
                    sections: dict[str, Iterable[str]] | None = None) -> dict[str, Any]:
    """A copy of nested `data` with `key.sub=value` overrides applied. `sections` (name ->
    allowed keys) lets an unknown key be refused here, naming the override that holds it."""
    import copy

    result = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for depth, part in enumerate(path[:-1]):
            allowed = list(sections) if sections is not None and depth == 0 else None
            if allowed is not None and part not in allowed:
                raise ConfigError(f"unknown section {part!r} in --set {text}"
                                  f"{did_you_mean(part, allowed)}; sections: {', '.join(allowed)}")
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {'.'.join(path[:depth + 1])} is a value, not a section")
        if sections is not None and len(path) >= 2 and path[0] in sections:
            keys = list(sections[path[0]])
            if keys and path[1] not in keys:
                raise ConfigError(f"unknown key {path[1]!r} in --set {text}"
                                  f"{did_you_mean(path[1], keys)}; valid keys in {path[0]}: "
                                  f"{', '.join(keys)}")
        node[path[-1]] = value
    return result
