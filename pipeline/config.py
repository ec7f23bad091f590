"""YAML configs: load with overlays, apply `--set` overrides, validate into typed dataclasses.

Every value remembers the file (or `--set` flag) it came from, so a validation error names the file, the
dotted key and what was expected, in one line. A recipe may `include:` other YAML files (paths relative to
the including file); included files are merged first, in order, and the including file wins.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

Sources = dict[tuple[str, ...], str]


class ConfigError(Exception):
    """A config problem a person can fix: the message names the file, the key and what was expected."""


def _deep_merge(base: dict, top: dict, base_src: Sources, top_src: Sources, prefix=()) -> None:
    for key, value in top.items():
        path = prefix + (key,)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value, base_src, top_src, path)
            base_src.setdefault(path, top_src.get(path, "?"))
        else:
            base[key] = value
            for p in [p for p in base_src if p[: len(path)] == path]:
                del base_src[p]
            base_src.update({p: s for p, s in top_src.items() if p[: len(path)] == path})


def _record_sources(tree: Any, source: str, prefix=()) -> Sources:
    sources = {prefix: source}
    if isinstance(tree, dict):
        for key, value in tree.items():
            sources.update(_record_sources(value, source, prefix + (key,)))
    return sources


def _unshared(node: Any) -> Any:
    """A copy of a YAML tree in which no two keys share a mapping or list: an alias (`*data`) becomes its own
    copy, so a `--set` on one stage's aliased section leaves the other stages' untouched."""
    if isinstance(node, dict):
        return {k: _unshared(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unshared(v) for v in node]
    return node


def load_yaml(path: str | Path, _seen: tuple = ()) -> tuple[dict, Sources]:
    """Read a YAML file and its `include:` chain; return the merged tree and where each key came from."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: include cycle through {' -> '.join(str(p) for p in _seen)}")
    try:
        tree = _unshared(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(tree).__name__}")
    includes = tree.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    sources: Sources = {}
    for inc in includes:
        sub, sub_src = load_yaml(path.parent / inc, _seen + (path.resolve(),))
        _deep_merge(merged, sub, sources, sub_src)
    _deep_merge(merged, tree, sources, _record_sources(tree, str(path)))
    return merged, sources


def parse_value(raw: str) -> Any:
    """A `--set` value: a YAML scalar or flow list/map; text YAML cannot read (`@general`) stays text."""
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def set_value(tree: dict, sources: Sources, dotted: str, value: Any, source: str) -> None:
    """Set `a.b.c` in `tree` to `value`, recording `source` (the flag that set it) for error messages."""
    keys = tuple(dotted.strip().split("."))
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {key} is not a section")
    node[keys[-1]] = value
    for p in [p for p in sources if p[: len(keys)] == keys]:
        del sources[p]
    sources.update(_record_sources(value, source, keys))


def apply_overrides(tree: dict, sources: Sources, overrides: list[str]) -> None:
    """Apply `a.b.c=value` overrides in order; values are parsed as YAML scalars or flow lists/maps."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set general.lr=3e-4")
        dotted, raw = item.split("=", 1)
        set_value(tree, sources, dotted, parse_value(raw), f"--set {item}")


def _where(sources: Sources, path: tuple[str, ...], fallback: str) -> str:
    for n in range(len(path), -1, -1):
        if path[:n] in sources:
            return sources[path[:n]]
    return fallback


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return repr(tp).replace("typing.", "")
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: tuple[str, ...], sources: Sources, origin_file: str) -> Any:
    def fail(reason: str | None = None):
        key = ".".join(path) or "(top level)"
        got = reason or f"got {value!r}"
        raise ConfigError(f"{_where(sources, path, origin_file)}: {key}: expected {_type_name(tp)}, {got}")

    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in [a for a in args if a is not type(None)]:
            try:
                return _coerce(value, arg, path, sources, origin_file)
            except ConfigError:
                continue
        fail()
    if origin is Literal:
        if value in args:
            return value
        fail()
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail()
        return build(tp, value, sources, path, origin_file)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            fail()
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, path + (str(i),), sources, origin_file) for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            fail()
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, val_tp, path + (str(k),), sources, origin_file) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an int beyond 1.8e308
                fail("(too large for a float)")
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 3e-4 (no dot) as a string
            except ValueError:
                pass
        fail()
    if tp is str:
        if isinstance(value, str):
            return value
        fail()
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        fail()
    fail(f"(unsupported field type {tp!r})")


def build(cls: type, data: dict, sources: Sources | None = None, path: tuple[str, ...] = (), origin_file: str = "config"):
    """Validate `data` into the dataclass `cls`: unknown keys, wrong types and missing fields are ConfigErrors."""
    sources = sources or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(sources, path, origin_file)}: {'.'.join(path) or cls.__name__}: expected a "
                          f"mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            dotted = ".".join(path + (str(key),))
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{_where(sources, path + (str(key),), origin_file)}: {dotted}: unknown key (known: {known})")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], path + (name,), sources, origin_file)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            dotted = ".".join(path + (name,))
            raise ConfigError(
                f"{_where(sources, path, origin_file)}: {dotted}: missing required field ({_type_name(hints[name])})"
            )
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{_where(sources, path, origin_file)}: {'.'.join(path) or cls.__name__}: {err}") from None


def to_dict(config: Any) -> Any:
    """A dataclass config as plain YAML/JSON-able data (paths become strings, tuples lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, Path):
        return str(config)
    return config


def config_hash(config: Any) -> str:
    """sha256 of the config's canonical JSON, leaving out fields marked `metadata={"hash": False}`, and fields
    marked `metadata={"hash": "unless_default"}` while they hold their default.

    Fields such as a worker index or a log interval do not change a stage's output, so they do not
    change its hash, and a rerun with another worker count still finds its finished work. A new option whose
    default does what the code did before it existed is "unless_default": finished stages keep their hash.
    """

    def counts(f: dataclasses.Field, value: Any) -> bool:
        mode = f.metadata.get("hash", True)
        return mode == "unless_default" and value != f.default if isinstance(mode, str) else bool(mode)

    def strip(node: Any) -> Any:
        if dataclasses.is_dataclass(node):
            return {
                f.name: strip(getattr(node, f.name))
                for f in dataclasses.fields(node)
                if counts(f, getattr(node, f.name))
            }
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [strip(v) for v in node]
        return to_dict(node)

    blob = json.dumps(strip(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def dump_yaml(data: Any, path: Path) -> None:
    """Write plain data as YAML, atomically."""
    from pipeline.manifest import atomic_write_text
    from pipeline.secrets import scrub

    atomic_write_text(path, yaml.safe_dump(scrub(to_dict(data)), sort_keys=False))
