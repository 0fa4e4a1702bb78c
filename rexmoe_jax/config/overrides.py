"""Changing a config: `section.field=value` overrides from the command line, and a run's saved
config.json read back. Unknown keys and values of the wrong type are errors that name the key."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import typing
from typing import Literal

from rexmoe_jax.config.sections import (
    ComputeConfig,
    Config,
    ConfigError,
    check_value,
    field_types,
    require,
)


def _section_types() -> dict[str, type]:
    return {f.name: type(f.default) for f in dataclasses.fields(Config)}


def _field_type(section: str, name: str):
    key = f"{section}.{name}"
    types = _section_types()
    require(section in types, f"unknown config key {key!r}; sections are {', '.join(types)}")
    kinds = {f.name: field_types(types[section])[f.name] for f in dataclasses.fields(types[section])}
    require(name in kinds, f"unknown config key {key!r}; {section} has {', '.join(kinds)}")
    return kinds[name]


def _parse_value(key: str, raw: str, kind) -> object:
    """A command-line string as a value of the field's type. Strings are kept exactly."""
    if typing.get_origin(kind) is Literal:
        raw = raw.strip()
        choices = typing.get_args(kind)
        require(raw in choices, f"{key}={raw!r}: expected one of {', '.join(choices)}")
        return raw
    if kind is bool:
        lowered = raw.strip().lower()
        require(lowered in ("true", "false", "1", "0"), f"{key}={raw!r}: expected true or false")
        return lowered in ("true", "1")
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected an integer") from None
    if kind is float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected a number") from None
        require(math.isfinite(value), f"{key}={raw!r}: expected a finite number")
        return value
    return raw


def _replace(config: Config, changes: dict[str, dict[str, object]]) -> Config:
    return dataclasses.replace(config, **{
        section: dataclasses.replace(getattr(config, section), **fields)
        for section, fields in changes.items()})


def parse_overrides(overrides: typing.Sequence[str]) -> dict[str, dict[str, object]]:
    """Each "section.field=value" read against the config's fields and types, by section;
    raises ConfigError naming a malformed item, an unknown key or a value of the wrong type."""
    changes: dict[str, dict[str, object]] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        require(bool(sep), f"override {item!r} is not of the form section.field=value")
        section, _, name = key.strip().partition(".")
        kind = _field_type(section, name)
        changes.setdefault(section, {})[name] = _parse_value(key.strip(), raw, kind)
    return changes


def apply_overrides(config: Config, overrides: typing.Sequence[str]) -> Config:
    """Returns `config` with each "section.field=value" applied, validating the result."""
    return _replace(config, parse_overrides(overrides))


def from_dict(data: dict) -> Config:
    """Rebuilds a Config saved with `to_dict` (a run's config.json), exactly: from_dict(c.to_dict())
    == c. A config.json written before the `compute` section existed has its fields under
    `model`; they are read from there."""
    compute_fields = {f.name for f in dataclasses.fields(ComputeConfig)}
    changes: dict[str, dict[str, object]] = {}
    for section, fields in data.items():
        require(isinstance(fields, dict), f"config section {section!r} is not a mapping")
        for name, value in fields.items():
            if section == "model" and name in compute_fields:
                section_now = "compute"
            else:
                section_now = section
            kind = _field_type(section_now, name)
            changes.setdefault(section_now, {})[name] = check_value(f"{section_now}.{name}", value, kind)
    return _replace(Config(), changes)


def read_json_config(folder: pathlib.Path, what: str, name: str = "config.json") -> dict:
    """The JSON object in `folder`/`name`, or a ConfigError that names the problem; `what` says
    what the folder should be ("a training run's --workdir")."""
    path = folder / name
    if not path.is_file():
        raise ConfigError(f"{str(folder)!r} has no {name}; is it {what}?")
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{str(path)!r} is not readable JSON ({err})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{str(path)!r} holds no config")
    return saved
