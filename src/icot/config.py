"""Experiment configs: dataclasses filled from a YAML file, then from command-line overrides.

Every field of a method's config can be set in YAML (`lr: 1e-4`) or on the command line
(`--lr 1e-4`, `--lr=1e-4`, `--removal-side right`, `--keep-position` for true,
`--no-keep-position` for false, `--teacher.epochs 2` for a nested field). Unknown keys and
invalid values are reported with the list of valid keys or the expected type. A string field
keeps exactly the text the user typed (`--out 007` is the directory `007`, not `7`); the other
fields take YAML's reading of it.

Each field is documented once, where it is declared: `option(default, help=...)` (or
`choice(...)` for a restricted string) keeps its help text, its bounds and whether a resumed run
may change it (`resumable`) in the field's metadata. `icot train --method X --help` lists them
(`describe`), and docs/config.md is generated from the same source (`python -m icot.config_doc`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path

import yaml

from icot.errors import UserError


def option(default=dataclasses.MISSING, *, help: str, resumable: bool = False, bounds: str | None = None,
           default_factory=dataclasses.MISSING):
    """A config field with its help text (one sentence: what it does, its unit, what null means),
    whether a resumed run may change it, and its bounds (a key of BOUNDS, checked by check_bounds)."""
    metadata = {"help": help, "resumable": resumable}
    if bounds is not None:
        if bounds not in BOUNDS:
            raise ValueError(f"bounds {bounds!r}: expected one of {', '.join(BOUNDS)}")
        metadata["bounds"] = bounds
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def choice(*options, default, help: str, resumable: bool = False):
    """A string field restricted to `options`."""
    return dataclasses.field(default=default, metadata={"choices": options, "help": help, "resumable": resumable})


def inherit(cls, name: str, default, note: str = ""):
    """Field `name` of config class `cls` declared again with another default: the same help (and
    `note` on the new default), bounds and resumability."""
    base = next(f for f in dataclasses.fields(cls) if f.name == name)
    metadata = dict(base.metadata)
    if note:
        metadata["help"] = f"{metadata['help']}; {note}"
    return dataclasses.field(default=default, metadata=metadata)


# The bounds a field's metadata may name: the test of a value (null always passes) and what the
# error says of a value that fails it.
BOUNDS = {
    ">=1": (lambda v: v >= 1, "must be at least 1"),
    ">=0": (lambda v: v >= 0, "must not be negative"),
    ">0": (lambda v: v > 0, "must be positive"),
    "(0,1]": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
}


def check_bounds(config, names, section: str = "") -> None:
    """Each of the fields `names` of `config` within its metadata's bounds (null passes), else
    UserError `config: SECTIONNAME must be ..., got VALUE` ("at least 1 (or null)" where null may be
    given)."""
    specs = {f.name: f for f in dataclasses.fields(config)}
    hints = typing.get_type_hints(type(config))
    for name in names:
        test, text = BOUNDS[specs[name].metadata["bounds"]]
        value = getattr(config, name)
        if value is not None and not test(value):
            nullable = _is_union(hints[name]) and type(None) in typing.get_args(hints[name])
            or_null = " (or null)" if nullable and text == "must be at least 1" else ""
            raise UserError(f"config: {section}{name} {text}{or_null}, got {value}")


def fields_with(cls, key: str) -> list[str]:
    """The names of the fields of dataclass `cls` whose metadata has `key` set (true)."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get(key)]


def resumable(*classes) -> set[str]:
    """The names of the fields a resumed run may change, in config classes `classes` and their
    sections (a section's field by its own name: `teacher.lr` is `lr`)."""
    names = set()
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                names |= resumable(hints[f.name])
            elif f.metadata.get("resumable"):
                names.add(f.name)
    return names


def describe(cls, prefix: str = "", skip=()) -> list[dict]:
    """Every field of config class `cls` (a section's as `section.field`) as {name, type, default,
    choices, help}, in declaration order; fields named in `skip` are left out."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows += describe(hint, f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        rows.append({"name": prefix + f.name, "type": _hint_text(hint), "default": _default_text(default),
                     "choices": f.metadata.get("choices"), "help": f.metadata.get("help", ""),
                     "resumable": bool(f.metadata.get("resumable"))})
    return rows


def _hint_text(hint) -> str:
    if _is_union(hint):
        return " | ".join(_hint_text(o) for o in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) in (list, tuple):
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", str(hint))


def _default_text(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_default_text, value)) + "]"
    return str(value)


def help_text(cls, skip=()) -> str:
    """The fields of config class `cls` for `icot train --help`: one paragraph each, name, type,
    default (and choices), then its help."""
    import textwrap

    lines = []
    for row in describe(cls, skip=skip):
        choices = f"; one of {', '.join(row['choices'])}" if row["choices"] else ""
        resume = "; a resume may change it" if row["resumable"] else ""
        lines.append(f"  --{row['name'].replace('_', '-')}  ({row['type']}, default {row['default']}{choices}{resume})")
        lines += textwrap.wrap(row["help"], width=96, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


class Plain(str):
    """A plain (unquoted) scalar as the user typed it, `007` or `true`, with YAML's reading of it
    in `value` (7, True): a string field keeps the text, the other fields take the value."""

    def __new__(cls, text: str, value):
        plain = super().__new__(cls, text)
        plain.value = value
        return plain

    def __getnewargs__(self):  # picklable: a demo's worker process receives configs built from YAML
        return str(self), self.value


class Flag(Plain):
    """`--name` or `--no-name` given without a value: true or false, for a true/false field only."""


class Loader(yaml.SafeLoader):
    """YAML that keeps the text of every plain scalar YAML would read as a number, bool or null."""

    def construct_object(self, node, deep=False):
        value = super().construct_object(node, deep)
        if isinstance(node, yaml.ScalarNode) and node.style is None and not isinstance(value, str):
            return Plain(node.value, value)
        return value


def load_yaml(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such config file")
    if not path.is_file():
        raise UserError(f"{path}: not a regular file; expected a YAML config file")
    try:
        values = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if values is None:
        raise UserError(f"{path}: empty config file")
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping of field: value")
    return values


def parse_overrides(argv: list[str]) -> dict:
    """`--key value` pairs (dotted keys nest) into a dict of values as typed (`_typed`)."""
    values: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(f"unexpected argument '{arg}'; overrides look like --key value")
        key, _, text = arg[2:].partition("=")
        flag = None
        if not _:
            next_is_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if next_is_value:
                text = argv[i + 1]
                i += 1
            else:
                negated = key.startswith(("no-", "no_"))
                key, flag = (key[3:], Flag("false", False)) if negated else (key, Flag("true", True))
        i += 1
        node = values
        *parents, leaf = key.replace("-", "_").split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        if flag is None and not text.strip():
            raise UserError(f"--{key}: a value is required (got an empty one)")
        node[leaf] = flag if flag is not None else _typed(text)
    return values


def _typed(text: str):
    """A command-line value: its text, with YAML's reading of it as one plain scalar (no comments:
    `run #2` is that text) or, written `[...]`/`{...}`, as a YAML flow list or mapping."""
    if text.lstrip().startswith(("[", "{")):
        try:
            return Plain(text, yaml.load(text, Loader=Loader))
        except yaml.YAMLError as e:
            raise UserError(f"'{text}': invalid YAML ({getattr(e, 'problem', None) or e})") from None
    loader = Loader("")
    node = yaml.ScalarNode(loader.resolve(yaml.ScalarNode, text, (True, False)), text)
    value = loader.construct_object(node)
    return value if isinstance(value, Plain) else text


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def build(cls, values: dict, where: str = "config"):
    """An instance of dataclass `cls` from a dict, checking every key and value."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}'; valid keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _convert(value, hints[name], fields[name], f"{where}: {name}")
    config = cls(**kwargs)
    if hasattr(config, "validate"):
        config.validate()
    return config


def _convert(value, hint, field, where):
    if dataclasses.is_dataclass(hint):
        value = value.value if isinstance(value, Plain) else value
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping of {hint.__name__} fields")
        return build(hint, value, where)
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if isinstance(value, Flag) and bool not in options:
        expected = " or ".join(_type_name(o) for o in options if o is not type(None))
        raise UserError(f"{where}: given without a value; expected {expected}")
    if isinstance(value, Plain) and value.value is None:
        value = None
    if value is None:
        if type(None) in options:
            return None
        raise UserError(f"{where}: a value is required")
    for option in options:
        converted = _as(value, option)
        if converted is not _NO:
            choices = field.metadata.get("choices") if field is not None else None
            if choices and converted not in choices:
                raise UserError(f"{where}: '{value}' is not one of {', '.join(map(str, choices))}")
            return converted
    expected = " or ".join(_type_name(o) for o in options if o is not type(None))
    raise UserError(f"{where}: expected {expected}, got {value!r}")


_NO = object()


def _as(value, kind):
    if isinstance(value, Plain):
        return str(value) if kind is str else _as(value.value, kind)
    if kind is bool:
        return value if isinstance(value, bool) else _NO
    if kind is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if kind is float:
        if isinstance(value, str):  # YAML reads `1e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                return _NO
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
            return float(value)
        return _NO
    if kind is str:  # a number typed where a string goes is a Plain, and keeps its text
        return str(value) if isinstance(value, str) else _NO
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        items = value if isinstance(value, list) else [value]
        converted = [_as(v, item) for v in items]
        return _NO if any(c is _NO for c in converted) else converted
    return _NO


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _type_name(kind) -> str:
    if typing.get_origin(kind) is list:
        return f"a list of {_type_name(typing.get_args(kind)[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


def changed(config, name: str) -> bool:
    """Whether setting `name` differs from its default: one that cannot act is then refused."""
    spec = next(f for f in dataclasses.fields(config) if f.name == name)
    default = spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
    return getattr(config, name) != default


def to_dict(config) -> dict:
    """Plain dict of a config, infinities written as the YAML string 'inf'."""
    def clean(value):
        if isinstance(value, float) and math.isinf(value):
            return "inf"
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    return clean(dataclasses.asdict(config))
