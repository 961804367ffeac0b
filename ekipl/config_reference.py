"""The config reference, generated from the config dataclasses: ``--help`` of ``ekipl/train.py`` and
``docs/config.md``.

Each knob is documented once, in its dataclass's docstring, as ``name: text`` segments (``a, b: text`` or
``a / b: text`` for knobs that share a text). A segment starts at the beginning of a line or after a
sentence (``. name:``) and runs to the next segment or to the end of its paragraph; prose that belongs to
no knob introduces the section. The defaults shown are those of the resolved config without a file
(``load_config(None)``), so the trainer's own loss defaults appear, not ``LossConfig``'s.

    python -m ekipl.config_reference > docs/config.md     # regenerate the Markdown reference
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import functools
import inspect
import re
import shutil
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import yaml

REGENERATE = "python -m ekipl.config_reference > docs/config.md"

# Defaults that load_config derives from another key when the key is not given.
DERIVED_DEFAULTS = {"loss.temperature": "rollout.temperature"}

_NAME = r"[a-z_][a-z0-9_]*"
_HEADER = re.compile(rf"(?P<names>{_NAME}(?:[ \t]*[,/][ \t]*{_NAME})*)[ \t]*:(?=\s)")
_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")  # :meth:`Learner.update` -> `Learner.update`


@dataclass(frozen=True)
class ClassDocs:
    """What a config class's docstring says: one text per field, the prose that belongs to no field,
    and the fields it documents more than once."""

    fields: dict[str, str]
    intro: str
    repeated: tuple[str, ...]


@dataclass(frozen=True)
class Entry:
    """One settable key of the reference."""

    key: str  # dotted; list items as ``experts.experts[].k``
    type: str
    default: str  # as YAML; "required" when the key has no default
    doc: str
    owner: type  # the dataclass that declares it


@dataclass(frozen=True)
class Section:
    name: str  # the top-level key ("run"), or "" for the top-level keys that are not sections
    cls: type
    intro: str
    entries: tuple[Entry, ...]


def _clean(text: str) -> str:
    text = _ROLE.sub(r"`\1`", text).replace("``", "`")
    return " ".join(text.split())


def _docstring(cls: type) -> str:
    doc = cls.__doc__ or ""
    if doc.startswith(f"{cls.__name__}("):  # the signature dataclasses writes for a class without a docstring
        return ""
    return inspect.cleandoc(doc)


def parse_class_docs(cls: type) -> ClassDocs:
    """Splits ``cls``'s docstring into ``name: text`` segments of its dataclass fields (see the module doc)."""
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    repeated: list[str] = []
    intro: list[str] = []
    for paragraph in re.split(r"\n[ \t]*\n", _docstring(cls)):
        headers = []
        for match in _HEADER.finditer(paragraph):
            keys = [name.strip() for name in re.split(r"[,/]", match["names"])]
            before = paragraph[: match.start()]
            at_boundary = not before.strip() or before.rstrip(" \t").endswith("\n") or re.search(r"[.;]\s+$", before)
            if at_boundary and all(key in names for key in keys):
                headers.append((match, keys))
        if not headers:
            intro.append(paragraph)
            continue
        intro.append(paragraph[: headers[0][0].start()])
        for i, (match, keys) in enumerate(headers):
            end = headers[i + 1][0].start() if i + 1 < len(headers) else len(paragraph)
            text = _clean(paragraph[match.end() : end]).rstrip(";,")
            for key in keys:
                if key in docs:
                    repeated.append(key)
                docs[key] = f"{docs[key]} {text}" if key in docs else text
    return ClassDocs(docs, _clean(" ".join(intro)), tuple(repeated))


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> Any:
    """``X`` for ``Optional[X]``, else ``tp``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _list_item_type(tp: Any) -> Optional[Any]:
    """The item type of a variable-length list or tuple type, else None."""
    tp = _unwrap_optional(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, collections.abc.Sequence) or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        return args[0] if args else Any
    return None


def type_name(tp: Any) -> str:
    """A type as a YAML user reads it: ``int``, ``str | null``, ``list[int]``, ``[float, float]``."""
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if _is_dataclass_type(tp):
        return "mapping"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [type_name(a) for a in args if a is not type(None)]
        return " | ".join(parts + (["null"] if type(None) in args else []))
    item = _list_item_type(tp)
    if item is not None:
        return f"list[{type_name(item)}]"
    if origin is tuple:
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if origin is dict or tp is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def yaml_value(value: Any) -> str:
    """``value`` as it is written in YAML, on one line."""
    from ekipl.config_loader import to_dict

    text = yaml.safe_dump(to_dict(value), default_flow_style=True, width=10**9, sort_keys=False).strip()
    return text[: -len("...")].strip() if text.endswith("\n...") or text == "..." else text


def _field_value(f: dataclasses.Field, instance: Any) -> Any:
    if instance is not None:
        return getattr(instance, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _entries(cls: type, prefix: str, instance: Any, inherited: str = "", only: Optional[set[str]] = None
             ) -> Iterator[Entry]:
    """The keys of ``cls`` under ``prefix`` (those in ``only``, if given): nested dataclasses flattened, list
    items as ``key[].name``. ``inherited``: the doc of the field that holds ``cls``, for fields its own
    docstring leaves out."""
    hints = typing.get_type_hints(cls)
    docs = parse_class_docs(cls).fields
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        key, tp = f"{prefix}{f.name}", hints[f.name]
        value = _field_value(f, instance)
        doc = docs.get(f.name) or inherited
        if _is_dataclass_type(_unwrap_optional(tp)):
            nested = None if value is dataclasses.MISSING else value
            yield from _entries(_unwrap_optional(tp), f"{key}.", nested, doc)
            continue
        default = "required" if value is dataclasses.MISSING else yaml_value(value)
        if key in DERIVED_DEFAULTS:
            default = f"{DERIVED_DEFAULTS[key]} ({default})"
        yield Entry(key, type_name(tp), default, doc, cls)
        item = _list_item_type(tp)
        if item is not None and _is_dataclass_type(item):
            yield from _entries(item, f"{key}[].", None)


@functools.lru_cache(maxsize=None)
def sections() -> tuple[Section, ...]:
    """The reference: one section per top-level section of ``TrainConfig``, then its other top-level keys."""
    from ekipl.config import TrainConfig, load_config

    resolved = load_config(None)
    hints = typing.get_type_hints(TrainConfig)
    out, top = [], set()
    for f in dataclasses.fields(TrainConfig):
        cls = hints[f.name]
        if _is_dataclass_type(cls):
            entries = tuple(_entries(cls, f"{f.name}.", getattr(resolved, f.name)))
            out.append(Section(f.name, cls, parse_class_docs(cls).intro, entries))
        else:
            top.add(f.name)
    entries = tuple(_entries(TrainConfig, "", resolved, only=top))
    out.append(Section("", TrainConfig, parse_class_docs(TrainConfig).intro, entries))
    return tuple(out)


def all_entries() -> list[Entry]:
    return [entry for section in sections() for entry in section.entries]


def doc_problems() -> list[str]:
    """Knobs without a doc, or documented twice in one docstring (a test keeps this empty)."""
    problems = [f"{e.key} ({e.owner.__name__}): no doc; add '{e.key.rsplit('.', 1)[-1].split('[')[0]}: ...' "
                f"to {e.owner.__name__}'s docstring" for e in all_entries() if not e.doc]
    seen = set()
    for e in all_entries():
        if e.owner not in seen:
            seen.add(e.owner)
            problems += [f"{e.owner.__name__}.{name}: documented more than once"
                         for name in parse_class_docs(e.owner).repeated]
    return problems


def _title(section: Section) -> str:
    return f"{section.name or 'top-level keys'} ({section.cls.__module__}.{section.cls.__qualname__})"


# Markdown; the terminal's copy drops the backticks.
USAGE_NOTES = (
    "Set any key in the YAML file given to `--config`, or on the command line as `--section.key=value` or "
    "`--section.key value`; values are YAML (`1e-5`, `true`, `null`, `[1, 2]`, `{name: x}`). A numeric part "
    "indexes a list: `--experts.experts.0.k=3` sets key `k` of the first expert, `--eval.k_values.1=4` the "
    "second item; keys written `experts.experts[].k` are those of each list item. "
    "`python ekipl/train.py --config FILE --print-config` prints the resolved config (YAML, as saved in "
    "`config.resolved.yaml`) and exits; `--help` prints this reference."
)


def config_help(width: Optional[int] = None) -> str:
    """The reference for a terminal: each key with its type, default and doc, wrapped to ``width``
    (default: the terminal's, at most 100 columns)."""
    width = width or min(shutil.get_terminal_size((100, 24)).columns, 100)
    lines = ["config keys:"]
    lines += textwrap.wrap(USAGE_NOTES.replace("`", ""), width, initial_indent="  ", subsequent_indent="  ")
    for section in sections():
        lines += ["", f"{_title(section)}:"]
        if section.intro:
            lines += textwrap.wrap(section.intro, width, initial_indent="  ", subsequent_indent="  ")
        for entry in section.entries:
            default = "required" if entry.default == "required" else f"default: {entry.default}"
            lines.append(f"  {entry.key} ({entry.type}, {default})")
            lines += textwrap.wrap(entry.doc or "(undocumented)", width, initial_indent="      ",
                                   subsequent_indent="      ", break_long_words=False, break_on_hyphens=False)
    return "\n".join(lines) + "\n"


def _md_code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def render_markdown() -> str:
    """``docs/config.md``: the same reference as Markdown."""
    out = [
        "# Config reference",
        "",
        f"<!-- Generated from the config dataclasses' docstrings by `{REGENERATE}`; do not edit by hand. -->",
        "",
        USAGE_NOTES,
        "",
        "Sections: " + ", ".join(f"[`{s.name}`](#{s.name})" if s.name else "[top-level keys](#top-level-keys)"
                                 for s in sections()) + ".",
    ]
    for section in sections():
        where = f"`{section.cls.__module__}.{section.cls.__qualname__}`."
        out += ["", f"## {section.name or 'Top-level keys'}", "", f"{where} {section.intro}".rstrip(), ""]
        for entry in section.entries:
            default = "required" if entry.default == "required" else f"default {_md_code(entry.default)}"
            out.append(f"- **`{entry.key}`** ({_md_code(entry.type)}, {default}): {entry.doc or '(undocumented)'}")
    return "\n".join(out) + "\n"


class _ConfigArgumentParser(argparse.ArgumentParser):
    """``--help`` ends with the config reference (built only when asked for)."""

    def format_help(self) -> str:
        return super().format_help() + "\n" + config_help()


def cli_parser(description: str = "") -> argparse.ArgumentParser:
    """The trainer's command line: ``--config``, ``--print-config``, DeepSpeed's ``--local_rank``, and a
    ``--help`` that lists every config key. ``parse_known_args`` leaves the ``--section.key=value``
    overrides for :func:`ekipl.config.load_config`."""
    parser = _ConfigArgumentParser(
        description=description,
        usage="%(prog)s [--config FILE] [--section.key=value ...] [--print-config]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # an override is never taken for an abbreviated option
    )
    parser.add_argument("--config", metavar="FILE",
                        help="YAML training config (configs/*.yaml); omitted: the built-in defaults")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (YAML, as saved in config.resolved.yaml) and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return parser


if __name__ == "__main__":
    print(render_markdown(), end="")
