"""Typed configuration files: plain dicts (from YAML or JSON) into frozen dataclasses, and back.

`from_dict(MyConfig, data, source="file.yaml")` checks every key and value against the
dataclass's type hints and raises `ConfigError` naming the file and the full key path
(`optim.lr: expected a number, got 'fast'`) instead of failing later inside the code.

Supported field types: bool, int, float (an int is accepted), str, None, `X | None`,
`Literal[...]`, `tuple[T, ...]`, `tuple[A, B]`, `list[T]`, `dict[str, T]`, `Any`, nested
dataclasses, and unions of these (tried in order; e.g. `str | MyDataclass`). Lists become tuples
for tuple fields (YAML has no tuples). Missing keys take the dataclass defaults. A float field
also accepts a string such as "1e-4", which YAML 1.1 does not read as a number.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class ConfigError(ValueError):
    """A configuration that does not fit its schema; the message names the source and the key."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; an empty file is an empty mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, found {type(data).__name__}")
    return data


def from_dict(cls: type, data: Any, source: str = "config", where: str = "") -> Any:
    """Build dataclass `cls` from `data`, checking keys and types; see the module docstring."""
    return _convert(cls, data, source, where)


def to_dict(obj: Any) -> Any:
    """Dataclasses (nested) -> plain dicts/lists, ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def merge_dicts(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive merge: mappings merge key by key, anything else in `override` replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


# --- conversion ------------------------------------------------------------------------------

def _fail(source: str, where: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {where or '(top level)'}: {message}")


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true/false"}.get(
            tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, source: str, where: str) -> Any:
    if tp is Any:
        return value
    # A dataclass is a class too: it must be caught before the plain-class converters.
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, source, where)
    origin = typing.get_origin(tp)
    if origin in _GENERIC_CONVERTERS:
        return _GENERIC_CONVERTERS[origin](tp, value, source, where)
    if isinstance(tp, type):
        return _NUMBER_CONVERTERS.get(tp, _convert_instance)(tp, value, source, where)
    raise TypeError(f"config_io cannot handle the field type {tp!r} at {where}")


def _convert_union(tp: Any, value: Any, source: str, where: str) -> Any:
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise _fail(source, where, f"must not be null (expected {_type_name(tp)})")
    candidates = [a for a in args if a is not type(None)]
    errors = []
    for candidate in candidates:
        try:
            return _convert(candidate, value, source, where)
        except ConfigError as exc:
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    # A mapping given where a dataclass is one of the options: the dataclass's error is the useful one.
    for candidate, error in zip(candidates, errors, strict=True):
        if isinstance(value, dict) and dataclasses.is_dataclass(candidate):
            raise error
    names = " or ".join(_type_name(c) for c in candidates)
    raise _fail(source, where, f"expected {names}, got {_describe(value)}")


def _convert_literal(tp: Any, value: Any, source: str, where: str) -> Any:
    args = typing.get_args(tp)
    if value not in args:
        raise _fail(source, where, f"must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
    return value


def _convert_sequence(tp: Any, value: Any, source: str, where: str) -> list | tuple:
    """`list[T]`, `tuple[T, ...]` and `tuple[A, B]`; YAML has no tuples, so a list becomes one."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if not isinstance(value, list | tuple):
        raise _fail(source, where, f"expected a list, got {_describe(value)}")
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise _fail(source, where, f"expected a list of {len(args)} items, got {len(value)}")
        items = [_convert(a, v, source, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))]
    else:
        item_type = args[0] if args else Any
        items = [_convert(item_type, v, source, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _convert_mapping(tp: Any, value: Any, source: str, where: str) -> dict:
    args = typing.get_args(tp)
    if not isinstance(value, dict):
        raise _fail(source, where, f"expected a mapping, got {_describe(value)}")
    value_type = args[1] if len(args) == 2 else Any
    return {k: _convert(value_type, v, source, _join(where, k)) for k, v in value.items()}


def _convert_int(tp: Any, value: Any, source: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(source, where, f"expected an integer, got {_describe(value)}")
    return value


def _convert_float(tp: Any, value: Any, source: str, where: str) -> float:
    # PyYAML (YAML 1.1) reads `1e-4` (no dot) as a string; accept exactly that spelling.
    if isinstance(value, str) and _EXPONENT_FLOAT.match(value.strip()):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(source, where, f"expected a number, got {_describe(value)}")
    return float(value)


def _convert_instance(tp: type, value: Any, source: str, where: str) -> Any:
    """Any other class (NoneType, bool, str, ...): the value must already be an instance."""
    if not isinstance(value, tp):
        raise _fail(source, where, f"expected {_type_name(tp)}, got {_describe(value)}")
    return value


_GENERIC_CONVERTERS = {
    typing.Union: _convert_union,
    types.UnionType: _convert_union,
    typing.Literal: _convert_literal,
    tuple: _convert_sequence,
    list: _convert_sequence,
    dict: _convert_mapping,
}
# An instance check alone is wrong for numbers: True is an int, and a float field takes ints and "1e-4".
_NUMBER_CONVERTERS = {int: _convert_int, float: _convert_float}


def _build_dataclass(cls: type, value: Any, source: str, where: str) -> Any:
    if dataclasses.is_dataclass(value) and isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise _fail(source, where, f"expected a mapping (section {cls.__name__}), got {_describe(value)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in value if k not in fields]
    if unknown:
        key = _join(where, unknown[0])
        raise ConfigError(f"{source}: {key}: unknown key"
                          f"{'' if len(unknown) == 1 else f' (and {len(unknown) - 1} more: {unknown[1:]})'}; "
                          f"known keys{' of ' + where if where else ''}: {', '.join(sorted(fields))}")
    kwargs = {k: _convert(hints[k], v, source, _join(where, k)) for k, v in value.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise _fail(source, where, str(exc)) from exc
