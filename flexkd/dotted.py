"""Dotted-key configs in general: nested dataclasses built from YAML mappings and ``key=value`` overrides.

Nothing here knows flexkd's schema (that is ``flexkd.config``); the sweep file (``tuning.space``) is built
by the same machine. No torch, so that reading a config stays fast.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config value. The message is one line and names the key (or file) to change."""


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config groups at the top level")
    return data


def merge(base: dict, over: dict, depth: int | None = None) -> dict:
    """Recursive dict merge; ``over`` wins. Below ``depth`` levels, values replace instead of merging.

    Dotted overrides merge all the way down (``student.arch.hidden_size=48`` changes one field of the arch).
    """
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and (depth is None or depth > 0):
            out[key] = merge(out[key], value, None if depth is None else depth - 1)
        else:
            out[key] = value
    return out


def parse_overrides(items: list[str]) -> dict:
    """``["kd.weight=0.5", "feature.layers=uniform:2"]`` -> nested dict. Values are read as YAML scalars."""
    nested: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides look like key=value (e.g. selection.k=16)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"{item}: empty key")
        if ":" in raw and " " not in raw.strip() and not raw.strip().startswith(("[", "{")):
            value = raw.strip()  # YAML 1.1 would read a layer pair such as 9:1 as the base-60 number 541
        else:
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                value = raw
        set_dotted(nested, key, value)
    return nested


def set_dotted(nested: dict, key: str, value: Any) -> dict:
    """``set_dotted(d, "kd.weight", 0.5)`` sets ``d["kd"]["weight"]``, creating groups on the way."""
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is given both as a value and as a group")
    node[parts[-1]] = value
    return nested


def dotted(assignment: dict[str, Any]) -> dict:
    """{dotted key: value} -> nested dict, values kept as they are (no text round trip)."""
    nested: dict = {}
    for key, value in assignment.items():
        set_dotted(nested, key, value)
    return nested


def field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += valid_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not math.isfinite(number) or number != int(number):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)  # also accepts "1e-3", which YAML 1.1 reads as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is list:
        if value is None or value == "":
            return []
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    if tp is dict:
        if value is None or value == "":
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def build_dataclass(cls, data: dict, prefix: str = ""):
    """A (nested) dataclass from a mapping; unknown keys fail naming the valid ones, values are coerced."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    types_ = field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        key = f"{prefix}{unknown[0]}"
        group_keys = valid_keys(cls, prefix)
        raise ConfigError(f"{key}: unknown key; valid keys here are {', '.join(group_keys)}")
    kwargs = {}
    for name, tp in types_.items():
        if name not in data:
            continue
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, data[name] or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", data[name], tp)
    return cls(**kwargs)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> dotted keys (dict-valued fields such as data.columns flatten too)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def get_key(obj: Any, key: str) -> Any:
    node: Any = obj
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def field_docs(root) -> dict[str, str]:
    """Dotted key -> the docstring under its field, read from the source of ``root``'s module (a dataclass
    whose fields are dataclass groups). What `flexkd show --keys` prints."""
    tree = ast.parse(inspect.getsource(inspect.getmodule(root)))
    docs_by_class: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            docs = {}
            body = node.body
            for stmt, nxt in zip(body, body[1:]):
                if (
                    isinstance(stmt, ast.AnnAssign)
                    and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)
                ):
                    docs[stmt.target.id] = nxt.value.value
            docs_by_class[node.name] = docs
    out = {}
    for group, tp in field_types(root).items():
        for name in field_types(tp):
            out[f"{group}.{name}"] = docs_by_class.get(tp.__name__, {}).get(name, "")
    return out
