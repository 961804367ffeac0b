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
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'; valid keys here: {', '.join(names)}")
        if isinstance(value, _ListEdits):  # item overrides of a list the YAML leaves at its default
            value = value.apply(to_dict(_field_default(fields[key])), f"{prefix}{key}")
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
    """Sets each dotted key of ``overrides`` in ``data`` (the YAML mapping), in order.

    A numeric part indexes a list: ``experts.experts.0.k`` sets key ``k`` of the first expert,
    ``eval.k_values.1`` the second item of a list of scalars. A list the YAML does not hold is edited
    when :func:`from_dict` knows its default; an index out of range is a :class:`ConfigError` naming the
    key and the list's length.
    """
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node: Any = data
        for depth, part in enumerate(parts):
            here = ".".join(parts[:depth])
            key: Any = _list_index(node, part, dotted, here) if isinstance(node, (list, _ListEdits)) else part
            if isinstance(node, _ListEdits):
                node.keys_set.setdefault(key, dotted)  # named in the error if the index is out of range
            if depth == len(parts) - 1:
                node[key] = value
                break
            child = node[key] if isinstance(node, list) else node.get(key)
            if child is None:  # a missing section, or a missing list when the next part is an index
                pending = isinstance(node, (_ListEdits, _Edits))  # edits of a default, merged by from_dict
                child = node[key] = _ListEdits() if parts[depth + 1].isdigit() else _Edits() if pending else {}
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"cannot set '{dotted}': '{'.'.join(parts[:depth + 1])}' is not a section or a list")
            node = child
    return data


class _Edits(dict):
    """Overrides of keys inside an item of a list that is still its default: merged into the item."""


class _ListEdits(dict):
    """Item overrides (index -> value, or -> :class:`_Edits`) of a list the YAML does not hold:
    :func:`from_dict` applies them to the field's default, whose length it then knows."""

    def __init__(self) -> None:
        super().__init__()
        self.keys_set: dict[int, str] = {}  # index -> the first override that set it

    def apply(self, base: Any, key: str) -> list[Any]:
        if not isinstance(base, list):
            raise ConfigError(
                f"cannot set '{self.keys_set[min(self)]}': '{key}' is not a list (its default is {base!r}); "
                f"give the whole list as --{key}=[...]"
            )
        items = list(base)
        for index, edit in sorted(self.items()):
            if index >= len(items):
                raise ConfigError(_out_of_range(self.keys_set[index], key, index, len(items)))
            items[index] = _merge(items[index], edit, f"{key}.{index}")
        return items


def _merge(base: Any, edit: Any, key: str) -> Any:
    if isinstance(edit, _ListEdits):
        return edit.apply(base, key)
    if isinstance(edit, _Edits):
        merged = dict(base) if isinstance(base, dict) else {}
        for name, value in edit.items():
            merged[name] = _merge(merged.get(name), value, f"{key}.{name}")
        return merged
    return edit  # a whole value replaces the default's


def _list_index(node: Any, part: str, dotted: str, where: str) -> int:
    if not part.isdigit():
        raise ConfigError(f"cannot set '{dotted}': '{where}' is a list; index its items as {where}.0, {where}.1, ...")
    index = int(part)
    if isinstance(node, list) and index >= len(node):
        raise ConfigError(_out_of_range(dotted, where, index, len(node)))
    return index


def _out_of_range(dotted: str, where: str, index: int, length: int) -> str:
    valid = f"valid indices 0..{length - 1}" if length else "it is empty"
    return (f"cannot set '{dotted}': index {index} is out of range, '{where}' has {length} item"
            f"{'' if length == 1 else 's'} ({valid}); give the whole list as --{where}=[...]")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return []


def config_yaml(cfg: Any) -> str:
    """A config as YAML: what ``--print-config`` prints and what a run saves as ``config.resolved.yaml``."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


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
