"""Experiment configs: dataclasses filled from a YAML file, then from command-line overrides.

Every field of a method's config can be set in YAML (`lr: 1e-4`) or on the command line
(`--lr 1e-4`, `--lr=1e-4`, `--removal-side right`, `--keep-position` for true,
`--no-keep-position` for false, `--teacher.epochs 2` for a nested field). Unknown keys and
invalid values are reported with the list of valid keys or the expected type.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path

import yaml

from icot.errors import UserError


def choice(*options, default, help=""):
    """A string field restricted to `options`."""
    return dataclasses.field(default=default, metadata={"choices": options, "help": help})


def load_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
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
    """`--key value` pairs (dotted keys nest) into a dict of YAML-typed values."""
    values: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(f"unexpected argument '{arg}'; overrides look like --key value")
        key, _, text = arg[2:].partition("=")
        if not _:
            next_is_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if next_is_value:
                text = argv[i + 1]
                i += 1
            elif key.startswith("no-") or key.startswith("no_"):
                key, text = key[3:], "false"
            else:
                text = "true"
        i += 1
        node = values
        *parents, leaf = key.replace("-", "_").split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = _scalar(text)
    return values


def _scalar(text: str):
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


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
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping of {hint.__name__} fields")
        return build(hint, value, where)
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
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
    if kind is str:
        return value if isinstance(value, str) else (str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _NO)
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


def to_dict(config) -> dict:
    """Plain dict of a config, infinities written as the YAML string 'inf'."""
    def clean(value):
        if isinstance(value, float) and math.isinf(value):
            return "inf"
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    return clean(dataclasses.asdict(config))
