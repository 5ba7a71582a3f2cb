"""Typed loading of nested config dataclasses from plain dicts (YAML), with field-named errors.

Every config section is a dataclass whose fields are annotated `Annotated[type, "one-line help"]`
(plain `typing`, so `archs/` and `moe/` declare their configs without importing this package). `from_dict` walks the annotations, so an
unknown key, a wrong type or a value outside a `Literal` fails with the dotted path of the field,
what was given and what would be valid. Cross-field checks live in each dataclass's
`__post_init__` and raise `ConfigError` the same way.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config value is missing, unknown, mistyped or inconsistent; the message names the field."""


def field_types(cls: type) -> dict[str, tuple[Any, str]]:
    """{field name: (its type without `Annotated`, its help text)} of config dataclass `cls`."""
    out = {}
    for name, tp in typing.get_type_hints(cls, include_extras=True).items():
        text = ""
        if typing.get_origin(tp) is typing.Annotated:
            tp, *extras = typing.get_args(tp)
            text = next((e for e in extras if isinstance(e, str)), "")
        out[name] = (tp, text)
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)}]"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against annotation `tp`; return it converted (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list ({_type_name(tp)}), got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values ({_type_name(tp)}), got {value!r}")
            return tuple(coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported config annotation {tp!r} at {path}")


def check_keys(cls: type, data: dict, path: str, extra: tuple[str, ...] = ()) -> None:
    """Raise on keys of `data` that are not fields of `cls` (nor in `extra`), with a suggestion."""
    names = [f.name for f in dataclasses.fields(cls)] + list(extra)
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else key
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"unknown config key '{where}'; {hint}valid keys here: {', '.join(names)}")


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from `data`, checking keys and types; nested dataclasses recurse."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    check_keys(cls, data, path)
    hints = {name: tp for name, (tp, _) in field_types(cls).items()}
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = coerce(data[f.name], hints[f.name], f"{path}.{f.name}" if path else f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{path}.{f.name}: required field is missing")
    try:
        return cls(**kwargs)
    except ValueError as e:  # __post_init__ checks name the field relative to the section
        msg = str(e)
        if path and not msg.startswith(path):
            msg = f"{path}.{msg}"
        raise ConfigError(msg) from None


def to_dict(obj: Any) -> Any:
    """Plain dict/list form of a config (tuples become lists) for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value parsed as a YAML scalar)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set train.steps=100")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({e})") from None
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Merge `--set a.b=c` overrides into the nested dict `data` (in place, returned)."""
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: '{p}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per field: `section.key: type = default  # help` (for --help-config)."""
    lines = []
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp, text = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += describe(tp, name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        optional = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] \
            if typing.get_origin(tp) in (Union, types.UnionType) else []
        if len(optional) == 1:  # an optional section (e.g. model.moe): the line, then its own keys
            lines.append(f"{name}: {optional[0].__name__} | null = "
                         f"{'null' if default is None else 'set (defaults below)'}  # {text}")
            lines += describe(optional[0], name + ".")
            continue
        lines.append(f"{name}: {_type_name(tp)} = {default!r}  # {text}")
    return lines
