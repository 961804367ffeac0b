"""Building typed dataclass configs from YAML and dotted command-line overrides.

``--optim.lr=1e-5`` or ``--optim.lr 1e-5`` sets one key; values are parsed as YAML (numbers, booleans,
lists). Unknown keys and values of the wrong type raise :class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key."""


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """``cls(**data)`` with nested dataclasses built recursively and every key and type checked."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or 'config'}' must be a mapping; got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        message = str(exc)
        # A config class used outside this loader names its keys ``LossConfig.agg``: here that is ``loss.agg``.
        if prefix and message.startswith(f"{cls.__name__}."):
            message = prefix + message[len(cls.__name__) + 1 :]
        # A message that already leads with its dotted key (``rollout.top_p=...``) reads best as it is.
        if not prefix or message.startswith(prefix):
            raise ConfigError(message) from exc
        raise ConfigError(f"{prefix.rstrip('.')}: {message}") from exc


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list; got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}' must have {len(args)} items; got {value!r}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping; got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number; got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer; got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a string; got {value!r}")
        return str(value)
    return value


def to_dict(obj: Any) -> Any:
    """The plain-data form of a config (for saving the resolved config with the run)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def parse_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """``['--a.b=1', '--c', 'x']`` -> ``{'a.b': 1, 'c': 'x'}``; values parsed as YAML."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, raw = body, argv[i + 1]
            i += 1
        else:
            raise ConfigError(f"override {arg!r} has no value; write --{body}=VALUE")
        overrides[key] = yaml.safe_load(raw)
        i += 1
    return overrides


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"cannot set '{dotted}': '{part}' is not a section")
            node = child
        node[leaf] = value
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data
