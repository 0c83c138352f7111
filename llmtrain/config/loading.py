"""Recipe YAML + dotted `key=value` overrides -> a validated `Config` (sections: config/schema.py).

Loading is strict: an unknown key, a wrong type or an impossible value is a `ConfigError` whose
one-line message names the file, line and key and says how to fix it.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import os
import types
import typing
from typing import Any, Literal, Optional, Union

import yaml

from ..errors import ConfigError
from .schema import Config, DataConfig, SourceConfig
from .validation import validate

# --------------------------------------------------------------------------- loading


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key (for file:line errors)."""


def _construct_mapping(loader, node, deep=False):
    mapping = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.setdefault("__lines__", {})[key] = key_node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _strip_lines(obj):
    if isinstance(obj, dict):
        return {k: _strip_lines(v) for k, v in obj.items() if k != "__lines__"}
    if isinstance(obj, list):
        return [_strip_lines(v) for v in obj]
    return obj


def _flatten(tree: dict, path: str, prefix: str = "") -> dict[str, tuple[Any, str]]:
    """{'train': {'lr': 1}} -> {'train.lr': (1, 'file:3')}; free-form dicts stay whole."""
    out: dict[str, tuple[Any, str]] = {}
    lines = tree.get("__lines__", {})
    for key, value in tree.items():
        if key == "__lines__":
            continue
        dotted = f"{prefix}{key}"
        origin = f"{path}:{lines.get(key, '?')}"
        if isinstance(value, dict) and _is_section(dotted):
            out.update(_flatten(value, path, dotted + "."))
        else:
            out[dotted] = (_strip_lines(value), origin)
    return out


def _section_types(cls=Config, prefix="") -> dict[str, type]:
    """Every settable dotted key -> its annotated type; sections are recursed into."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in ("origins", "notices"):
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_section_types(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


_KEYS = _section_types()
_SECTIONS = {k.rsplit(".", 1)[0] for k in _KEYS if "." in k} | {
    ".".join(k.split(".")[:i]) for k in _KEYS for i in range(1, k.count(".") + 1)
}


def _is_section(dotted: str) -> bool:
    return dotted in _SECTIONS


def _check_type(key: str, value: Any, tp, where: str) -> Any:
    """Validate `value` against annotation `tp`; return it (ints widened to float where needed)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(key, value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: {key} has an invalid value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {key}={value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key}={value!r} must be a number")
        return float(value)
    if tp is str:
        if isinstance(value, datetime.date):  # YAML reads an unquoted 2024-07-26 as a date
            return value.isoformat()
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key}={value!r} must be a string")
        return value
    if tp is list or origin is list:
        if isinstance(value, (str, dict)):
            return [value]  # a single source is a one-element list
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key}={value!r} must be a list")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping")
        return value
    return value


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(_KEYS) + sorted(_SECTIONS), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else "; see README.md for the list of keys"
    return ConfigError(f"{where}: unknown key {key}{hint}")


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ('train.lr', 0.0003): the value is parsed as a YAML scalar or list."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.max_steps=100)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 3e-4 as a string (no dot): accept scientific notation for numbers
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            pass
    return key.strip(), value


def load_config(recipe: Optional[str], overrides: list[str] = ()) -> Config:
    """Read a recipe YAML and apply `key=value` overrides; validate everything."""
    flat: dict[str, tuple[Any, str]] = {}
    if recipe is not None:
        if not os.path.isfile(recipe):
            raise ConfigError(f"recipe {recipe} not found; pass --recipe with a YAML file (see recipes/)")
        try:
            with open(recipe) as f:
                tree = yaml.load(f, Loader=_LineLoader) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{recipe}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{recipe}: a recipe must be a YAML mapping of sections")
        flat.update(_flatten(tree, recipe))
    for text in overrides:
        key, value = parse_override(text)
        if isinstance(value, dict) and _is_section(key):
            flat.update(_flatten(value, "override", key + "."))
        else:
            flat[key] = (value, f"override {key}")
    return build_config(flat)


def build_config(flat: dict[str, tuple[Any, str]]) -> Config:
    cfg = Config()
    for key, (value, where) in flat.items():
        if key not in _KEYS:
            raise _unknown_key(key, where)
        value = _check_type(key, value, _KEYS[key], where)
        section = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            section = getattr(section, p)
        setattr(section, leaf, value)
        _record_origin(cfg, key, where)
    validate(cfg)
    return cfg


def _record_origin(cfg: Config, key: str, where: str) -> None:
    """Every section on the key's path learns where the key was set (Section.where)."""
    section = cfg
    section.origins[key] = where
    for part in key.split(".")[:-1]:
        section = getattr(section, part)
        section.origins[key] = where



def sources(data: DataConfig, key: str) -> list[SourceConfig]:
    """data.train / data.eval entries (key "data.train" or "data.eval") -> SourceConfig, with clear errors."""
    out = []
    where = data.where(key)
    for i, entry in enumerate(getattr(data, key.split(".", 1)[1])):
        if isinstance(entry, str):
            out.append(SourceConfig(path=entry))
        elif isinstance(entry, dict):
            unknown = set(entry) - {f.name for f in dataclasses.fields(SourceConfig)}
            if unknown:
                raise ConfigError(f"{where}: {key}[{i}] has unknown field(s) {sorted(unknown)}; allowed: "
                                  f"{', '.join(f.name for f in dataclasses.fields(SourceConfig))}")
            if "path" not in entry:
                raise ConfigError(f"{where}: {key}[{i}] needs a path")
            src = SourceConfig(**entry)
            if not (isinstance(src.weight, (int, float)) and src.weight > 0):
                raise ConfigError(f"{where}: {key}[{i}].weight={src.weight!r} must be a number > 0")
            _check_source(src, f"{where}: {key}[{i}]")
            out.append(src)
        else:
            raise ConfigError(f"{where}: {key}[{i}]={entry!r} must be a path or a mapping with path/format/weight")
    return out


# what a source's `columns` may map to: the fields the row readers understand
SOURCE_FIELDS = ("messages", "conversations", "instruction", "input", "output", "system", "prompt", "chosen",
                 "rejected", "text")


def _check_source(src: SourceConfig, where: str) -> None:
    for name in ("name", "split", "revision"):
        value = getattr(src, name)
        if value is not None and not (isinstance(value, str) and value):
            raise ConfigError(f"{where}.{name}={value!r} must be a non-empty string")
    if not isinstance(src.streaming, bool):
        raise ConfigError(f"{where}.streaming={src.streaming!r} must be true or false")
    if src.columns is None:
        return
    if not isinstance(src.columns, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                    for k, v in src.columns.items()):
        raise ConfigError(f"{where}.columns must map our field names to dataset column names, "
                          f"e.g. {{messages: conversation}}")
    unknown = sorted(set(src.columns) - set(SOURCE_FIELDS))
    if unknown:
        hint = difflib.get_close_matches(unknown[0], SOURCE_FIELDS, n=1)
        raise ConfigError(f"{where}.columns has key(s) {unknown}: keys are our field names ({', '.join(SOURCE_FIELDS)}) "
                          f"and values the dataset's columns, e.g. {{messages: {unknown[0]}}}"
                          + (f"; did you mean {hint[0]}?" if hint else ""))


def to_dict(cfg: Config) -> dict:
    """The recipe's values as nested dicts (what config.yaml holds), without origins and notices."""
    return _section_dict(cfg)


def _section_dict(section) -> dict:
    return {f.name: _section_dict(v) if dataclasses.is_dataclass(v) else copy.deepcopy(v)
            for f in dataclasses.fields(section) if f.name not in ("origins", "notices")
            for v in [getattr(section, f.name)]}


_SECRET_SUFFIXES = ("_token", "_key", "_secret", "password")


def redact(obj: Any) -> Any:
    """Replace values of secret-looking keys (api keys, tokens) before anything is written."""
    if isinstance(obj, dict):
        return {
            k: ("<redacted>" if isinstance(k, str) and k.lower().endswith(_SECRET_SUFFIXES) and v else redact(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def save_resolved(cfg: Config, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(redact(to_dict(cfg)), f, sort_keys=False)
    os.replace(tmp, path)
