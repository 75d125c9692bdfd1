"""Typed configs, one path for every command: dataclasses validated by pydantic, loaded from
`configs/*.yaml` (or any YAML file) and overridable as `section.key=value`."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

from l2c.errors import L2CError

T = TypeVar("T")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(L2CError, ValueError):
    """A config file or override that does not fit the config's dataclass."""


def resolve_config_path(name: str | Path) -> Path:
    """A path as given, or a name under the project's `configs/` (with or without `.yaml`)."""
    p = Path(name)
    if p.exists():
        return p
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.exists():
            return cand
    raise ConfigError(f"config {name!r} not found (looked in . and {CONFIG_DIR})")


def apply_override(data: dict, override: str) -> None:
    """`a.b=3` sets data['a']['b'] = 3; the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    key, _, raw = override.partition("=")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def _forbid_extra(cls: type) -> None:
    """Unknown keys are errors in `cls` and every dataclass nested in it (pydantic reads the class's config)."""
    if "__pydantic_config__" in vars(cls):
        return
    cls.__pydantic_config__ = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
    for tp in typing.get_type_hints(cls).values():
        for arg in (tp, *typing.get_args(tp)):
            if dataclasses.is_dataclass(arg):
                _forbid_extra(arg)


def _validate_tree(obj) -> None:
    """Each config's own cross-field checks (`validate()`), inner sections first."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _validate_tree(value)
    if callable(check := getattr(obj, "validate", None)):
        check()


def _known_keys(cls: type, loc: tuple) -> list[str]:
    """The keys of the section that `loc` (a path ending in the unknown key) points into."""
    for part in loc[:-1]:
        hint = typing.get_type_hints(cls).get(str(part))
        cls = next((a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)), None)
        if cls is None:
            return []
    return [f.name for f in dataclasses.fields(cls)]


def _message(cls: type, e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        where = ".".join(str(x) for x in err["loc"]) or "config"
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            parts.append(f"{where}: unknown key; known: {', '.join(_known_keys(cls, err['loc']))}")
        elif err["type"].startswith("bool"):
            parts.append(f"{where}: expected true/false, got {err['input']!r}")
        else:
            parts.append(f"{where}: {err['msg'].lower()}, got {err['input']!r}")
    more = f" (and {e.error_count() - 5} more)" if e.error_count() > 5 else ""
    return "; ".join(parts) + more


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from a (nested) dict, validated by pydantic: unknown keys and wrong types are
    errors (`ConfigError`, one line naming each key), then each section's `validate()` runs."""
    _forbid_extra(cls)
    try:
        obj = TypeAdapter(cls).validate_python(data)
    except ValidationError as e:
        raise ConfigError(f"{where or cls.__name__}: {_message(cls, e)}") from None
    _validate_tree(obj)
    return obj


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def load_yaml(path: str | Path) -> dict:
    """A config file's mapping (`configs/NAME` or a path); malformed YAML names the file, line and column."""
    p = resolve_config_path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}{at}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                flags: dict | None = None) -> T:  # fmt: skip
    """The one path from a command line to a typed config: the YAML file (or the defaults), then `key=value`
    overrides, then `flags` ({dotted key: value}, the options given on the command line: see `given`), each
    winning over the one before."""
    data: dict = load_yaml(path) if path else {}
    for ov in overrides or []:
        apply_override(data, ov)
    for key, value in (flags or {}).items():
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return from_dict(cls, data)


def given(ctx, options: dict) -> dict:
    """The entries of `options` ({config key: (option name, value)}) whose option was typed on the command line
    (not left at its default): what `load_config(flags=...)` applies over the file and the overrides."""
    out = {}
    for key, (name, value) in options.items():
        source = ctx.get_parameter_source(name) if ctx is not None else None
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            out[key] = value
    return out


def dump_config(obj, path: str | Path) -> None:
    from l2c import atomic

    atomic.write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))
