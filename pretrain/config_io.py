"""Load, check and save typed config trees made of dataclasses.

Precedence is CLI overrides > YAML file > dataclass defaults. A YAML file may only name fields that
exist: every unknown key, at any depth, is an error that names its full dotted path and the nearest
valid key, so a typo never silently falls back to a default. Values are checked against the field
annotations (int, float, bool, str, Path, Optional/unions, Literal, tuple, list, dict and nested
dataclasses, including lists of them). A partial section or dict refines its defaults key by key
rather than replacing them; lists are replaced whole. A file may start with ``base: other.yaml``
(relative to the file) to inherit another file and override a few keys. After the tree is built,
every dataclass node that defines ``validate()`` is called, children before parents, for
cross-field checks.

    cfg = load_config(TrainConfig, "configs/v3_tiny.yaml", ["optim.lr=1e-3", "model.name=vit_small"])
    save_config(cfg, run_dir / "config.yaml")  # load_config(TrainConfig, that path, []) == cfg
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import tempfile
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = ["ConfigError", "dump_config", "load_config", "save_config"]

T = TypeVar("T")

BASE_KEY = "base"  # reserved top-level YAML key naming the file to inherit from


class ConfigError(ValueError):
    """A config file, override or value that cannot make a valid config; the message says how to fix."""


def load_config(cls: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from its defaults, then the YAML file at ``path`` (if any), then ``overrides``.

    Each override is ``dotted.key=value`` with the value written in YAML (``optim.lr=1e-3``,
    ``data.sizes=[224, 96]``, ``gram=null``).
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    data = _read_yaml(Path(path)) if path is not None else {}
    for text in overrides:
        _apply_override(cls, data, text)
    config = _build(cls, data, prefix="")
    _validate_tree(config, prefix="")
    return config


def dump_config(instance: Any) -> dict[str, Any]:
    """The config tree as plain YAML-able data (dicts, lists, str, numbers, bool, None)."""
    if not dataclasses.is_dataclass(instance) or isinstance(instance, type):
        raise TypeError(f"dump_config needs a dataclass instance, got {instance!r}")
    return _dump(instance)


def save_config(instance: Any, path: str | Path) -> None:
    """Write the resolved config as YAML; written to a temporary file and renamed, so never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(dump_config(instance), sort_keys=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------
# YAML files and overrides -> one nested dict of explicitly set values


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Parse ``path`` and, recursively, the file its ``base:`` key names, merged file-over-base."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(f"config files inherit from each other in a cycle: {cycle}")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"'{BASE_KEY}' in {str(path)!r} must be a file name, got {base!r}")
    return _deep_merge(_read_yaml(path.parent / base, (*chain, resolved)), data)


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: mappings merge key by key, anything else (lists included) replaces."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _apply_override(cls: type, data: dict[str, Any], text: str) -> None:
    """Set one ``dotted.key=value`` override in ``data``, checking the key against the schema."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            f"config override {text!r} must be key=value with a dotted key and a YAML value, "
            "e.g. optim.lr=1e-3 or data.sizes=[224,96]"
        )
    parts = key.split(".")
    annotation = _annotation_at(cls, parts)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"config override {text!r}: the value is not valid YAML: {err}") from err
    # YAML reads 2024 or 1.10 as numbers; a string field wants the text exactly as typed.
    if isinstance(value, (bool, int, float)) and _strip_optional(annotation) in (str, Path):
        value = raw.strip()
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(value, Mapping) and isinstance(node.get(last), Mapping):
        value = _deep_merge(dict(node[last]), value)
    node[last] = value


def _annotation_at(cls: type, parts: list[str]) -> Any:
    """The type annotation of the field at the dotted path; unknown keys raise with a suggestion."""
    annotation: Any = cls
    for depth, part in enumerate(parts):
        section = _strip_optional(annotation)
        here = ".".join(parts[:depth])
        if dataclasses.is_dataclass(section):
            fields = _fields(section)
            if part not in fields:
                raise _unknown_key(here, part, fields)
            annotation = fields[part]
        elif typing.get_origin(section) is dict:
            annotation = typing.get_args(section)[1] if typing.get_args(section) else Any
        else:
            raise ConfigError(
                f"config key {here!r} is a {_type_name(annotation)}, not a section, so "
                f"{'.'.join(parts)!r} cannot be set; set {here!r} itself"
            )
    return annotation


# ---------------------------------------------------------------------------------------------------
# Nested dict -> typed dataclass tree


@functools.cache
def _fields(cls: type) -> dict[str, Any]:
    """Init fields of a dataclass with resolved annotations (modules may use ``from __future__``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _unknown_key(prefix: str, key: Any, fields: Mapping[str, Any]) -> ConfigError:
    full = _join(prefix, str(key))
    if not fields:
        return ConfigError(
            f"unknown config key {full!r}; {repr(prefix) if prefix else 'the config'} has no keys"
        )
    nearest = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.0)[0]
    return ConfigError(f"unknown config key {full!r}; did you mean {_join(prefix, nearest)!r}?")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _build(cls: type[T], data: Any, prefix: str) -> T:
    """Instantiate dataclass ``cls`` from a mapping; absent fields keep their defaults."""
    if not isinstance(data, Mapping):
        raise _type_error(prefix, cls, data)
    fields = _fields(cls)
    for key in data:
        if key not in fields:
            raise _unknown_key(prefix, key, fields)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name not in fields:
            continue
        key = _join(prefix, field.name)
        if field.name in data:
            value = data[field.name]
            default = _default(field)
            # A partial mapping refines the field's own default (a section or dict), as `base:` files do.
            if isinstance(value, Mapping) and (
                dataclasses.is_dataclass(default) or isinstance(default, Mapping)
            ):
                value = _deep_merge(_dump(default), value)
            kwargs[field.name] = _coerce(value, fields[field.name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(
                f"config key {key!r} is required (it has no default); set it in the file or CLI"
            )
    return cls(**kwargs)


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against ``annotation`` and convert it (lists to tuples, str to Path, ...)."""
    if annotation is Any or annotation is object:
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error message is the most helpful one
            return _coerce(value, options[0], key)
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise _type_error(key, annotation, value)
    if origin is Literal:
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return allowed
        choices = ", ".join(repr(a) for a in args)
        raise ConfigError(f"config key {key!r} must be one of {choices}; got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, annotation, value)
        if origin is list:
            item_type = args[0] if args else Any
            return [_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            item_type = args[0] if args else Any
            return tuple(_coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(value))
        if len(value) != len(args):
            raise _type_error(key, annotation, value)
        return tuple(_coerce(item, arg, f"{key}[{i}]") for i, (item, arg) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(key, annotation, value)
        key_type, value_type = args if args else (Any, Any)
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        number = _as_number(value)
        if number is not None and float(number).is_integer():
            return int(number)
    elif annotation is float:
        number = _as_number(value)
        if number is not None:
            return float(number)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif isinstance(annotation, type) and issubclass(annotation, Path) and isinstance(value, str):
        return annotation(value)
    raise _type_error(key, annotation, value)


def _as_number(value: Any) -> int | float | None:
    """Numbers, and numeric strings YAML leaves unparsed (``1e-3`` has no dot, so YAML 1.1 keeps a str)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _type_error(key: str, annotation: Any, value: Any) -> ConfigError:
    return ConfigError(
        f"config key {key or '<root>'!r} expects {_type_name(annotation)}, "
        f"got {value!r} ({type(value).__name__})"
    )


def _type_name(annotation: Any) -> str:
    """Readable type names without module prefixes: ``tuple[float, float] | None``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in args)
    if origin is Literal:
        return f"one of {', '.join(repr(a) for a in args)}"
    if origin is not None:
        inner = ", ".join("..." if arg is Ellipsis else _type_name(arg) for arg in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _strip_optional(annotation: Any) -> Any:
    """``X`` for ``Optional[X]``; anything else unchanged."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(options) == 1:
            return options[0]
    return annotation


def _validate_tree(node: Any, prefix: str) -> None:
    """Call ``validate()`` on every dataclass node, children first; ValueErrors gain the node's path."""
    if dataclasses.is_dataclass(node):
        for name in _fields(type(node)):
            _validate_tree(getattr(node, name), _join(prefix, name))
        validate = getattr(node, "validate", None)
        if callable(validate):
            try:
                validate()
            except ConfigError:
                raise
            except ValueError as err:
                raise ConfigError(f"invalid config {prefix or '<root>'!r}: {err}") from err
    elif isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            _validate_tree(item, f"{prefix}[{i}]")
    elif isinstance(node, dict):
        for key, item in node.items():
            _validate_tree(item, _join(prefix, str(key)))


def _dump(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {name: _dump(getattr(value, name)) for name in _fields(type(value))}
    if isinstance(value, (list, tuple)):
        return [_dump(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _dump(item) for key, item in value.items()}
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot write config value {value!r} of type {type(value).__name__} to YAML")
