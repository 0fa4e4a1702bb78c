"""Presets: Python files (see `configs/`) defining `get_config() -> Config`, loaded by path, or
a run's own config.json (what a training run writes in its --workdir).

The presets of a folder with an `__init__.py` build on each other (`from configs.recipe import
...`): the folder is loaded by path as a package of its name, so the file's own imports find its
neighbours without the folder's parent being on sys.path.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys

from rexmoe_jax.config.overrides import from_dict, read_json_config
from rexmoe_jax.config.sections import Config, ConfigError, require


def load_preset(path: str | pathlib.Path) -> Config:
    """Loads `get_config()` from a preset file, or the config a run saved (a .json file: its
    config.json). Whatever goes wrong in the file (a syntax error, an exception, a field of the
    wrong type) is a ConfigError naming the file."""
    path = pathlib.Path(path)
    require(path.is_file(), f"config file {str(path)!r} does not exist; see configs/ for presets")
    if path.suffix == ".json":
        try:
            return from_dict(read_json_config(path.parent, "a training run's --workdir", path.name))
        except ConfigError as err:
            raise ConfigError(f"config file {str(path)!r} is not a training run's config.json: "
                              f"{err}") from None
    require(path.suffix == ".py", f"config file {str(path)!r} is neither a Python preset (.py) nor a run's "
                                  "config.json; see configs/ for presets")
    try:
        module = _import_preset(path)
    except SyntaxError as err:
        raise ConfigError(f"config file {str(path)!r} line {err.lineno}: {err.msg}") from None
    except Exception as err:  # noqa: BLE001 - a preset is user code: anything can go wrong in it.
        raise ConfigError(f"config file {str(path)!r} failed: {_one_line(err)}") from None
    require(callable(getattr(module, "get_config", None)), f"config file {str(path)!r} defines no get_config()")
    try:
        config = module.get_config()
    except Exception as err:  # noqa: BLE001 - as above; a section's ConfigError names the field.
        raise ConfigError(f"config file {str(path)!r} failed: {_one_line(err)}") from None
    require(isinstance(config, Config),
             f"get_config() in {str(path)!r} returned {type(config).__name__}, not Config")
    try:  # The round trip checks the config's structure besides its sections' field types.
        return from_dict(config.to_dict())
    except ConfigError as err:
        raise ConfigError(f"get_config() in {str(path)!r}: {err}") from None


def load_slices(path: str | pathlib.Path) -> dict[str, tuple[str, ...]]:
    """A preset's settings per TPU slice: its module's `SLICES`, slice name -> overrides (the
    mesh and micro-batches that fit that slice; docs/tpu.md), or {} where it has none. Applied
    by train.py on that slice (`--target`, or the devices it runs on) under the command line's
    overrides (targets.slice_settings). A run's config.json has none: it holds its mesh."""
    path = pathlib.Path(path)
    if path.suffix == ".json":
        return {}
    try:
        found = getattr(_import_preset(path), "SLICES", {})
    except Exception as err:  # noqa: BLE001 - load_preset has reported the file's own failures
        raise ConfigError(f"config file {str(path)!r} failed: {_one_line(err)}") from None
    require(isinstance(found, dict) and all(
        isinstance(name, str) and isinstance(items, (list, tuple)) and all(isinstance(i, str) for i in items)
        for name, items in found.items()),
        f"SLICES in {str(path)!r} must map slice names to lists of section.field=value strings")
    return {name: tuple(items) for name, items in found.items()}


def _one_line(err: Exception) -> str:
    if isinstance(err, ConfigError):
        return str(err)
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def _import_preset(path: pathlib.Path):
    folder = path.parent.resolve()
    if not (folder / "__init__.py").is_file():
        spec = importlib.util.spec_from_file_location(f"_rexmoe_preset_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(f"{_package(folder)}.{path.stem}")


def _package(folder: pathlib.Path) -> str:
    """`folder` imported by path as the package of its name (once), so that its presets'
    `folder.module` imports resolve to its files."""
    name = folder.name
    loaded = sys.modules.get(name)
    if loaded is None:
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[name] = loaded
        try:
            spec.loader.exec_module(loaded)
        except BaseException:
            del sys.modules[name]
            raise
    where = [pathlib.Path(p).resolve() for p in getattr(loaded, "__path__", [])]
    require(folder in where, f"preset folder {str(folder)!r}: another package named {name!r} "
             f"({', '.join(map(str, where)) or 'a module'}) is already loaded")
    return name
