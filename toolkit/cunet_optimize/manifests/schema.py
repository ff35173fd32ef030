"""Typed JSON manifests: dataclasses <-> dicts, checked field by field against their type hints.

A manifest class is a dataclass whose fields are str, int, float, bool, lists and
str-keyed dicts of those, other such dataclasses, unions with None (= not recorded), or
Any (kept as read). `from_dict` checks every declared field and stops at the first bad
one with one line that names the file, the field's path and what to do; keys a class
does not declare are kept in its `extra` dict (when it has one), so a file written by a
newer toolkit round-trips unchanged. `to_dict` writes the JSON form back (field names,
or the key in a field's metadata where JSON uses one Python cannot, e.g. "pckh_0.2").
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

from cunet_optimize.errors import CUNetError

T = TypeVar("T")
EXTRA = "extra"  # the field holding keys a manifest class does not declare
ABSENT = "_absent"  # declared keys the source dict did not have: written back absent, not as null


class ManifestError(CUNetError):
    """A manifest file that is missing, unreadable, of another schema, or has a field of the wrong type."""


def key(name: str, **kwargs: Any) -> Any:
    """A field whose JSON key is `name` (default None unless given)."""
    kwargs.setdefault("default", None)
    return dataclasses.field(metadata={"key": name}, **kwargs)


def _json_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _type_name(tp: Any) -> str:
    names = {str: "a string", bool: "true/false", int: "an integer", float: "a number", dict: "an object",
             list: "a list", type(None): "null"}
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        # null (= not recorded) is always allowed where it is, so not worth naming
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is not None:
        return names.get(origin, str(tp))
    if dataclasses.is_dataclass(tp):
        return "an object"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


class _Mismatch(Exception):
    def __init__(self, path: str, value: Any, expected: Any):
        super().__init__(f"{path} is {type(value).__name__} {str(value)[:40]!r}, expected {_type_name(expected)}")


def _kind_matches(tp: Any, value: Any) -> bool:
    """Whether `value` is of the JSON kind (object, list, string, number, bool) of type `tp`."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp) or tp
    if dataclasses.is_dataclass(tp) or origin is dict:
        return isinstance(value, dict)
    if origin is list:
        return isinstance(value, list)
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin)


def _convert(tp: Any, value: Any, path: str) -> Any:
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        # the option of the value's JSON kind; its own errors name the inner field
        option = next((o for o in options if o is not type(None) and _kind_matches(o, value)), None)
        if option is None:
            raise _Mismatch(path, value, tp)
        return _convert(option, value, path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch(path, value, tp)
        return _from_dict(tp, value, path)
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise _Mismatch(path, value, tp)
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch(path, value, tp)
        _, item = typing.get_args(tp) or (str, Any)
        return {k: _convert(item, v, f"{path}.{k}") for k, v in value.items()}
    if tp is float:  # JSON has one number type: an integer is a valid float (kept as written)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise _Mismatch(path, value, tp)
    return value


def _from_dict(cls: type[T], data: dict, path: str) -> T:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    declared, absent = set(), set()
    for f in dataclasses.fields(cls):
        if f.name == EXTRA:
            continue
        name = _json_key(f)
        declared.add(name)
        where = f"{path}.{name}" if path else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _Missing(where)
            absent.add(f.name)
            continue
        values[f.name] = _convert(hints[f.name], data[name], where)
    if EXTRA in {f.name for f in dataclasses.fields(cls)}:
        values[EXTRA] = {k: v for k, v in data.items() if k not in declared}
    obj = cls(**values)
    object.__setattr__(obj, ABSENT, frozenset(absent))  # not a field: equality ignores it
    return obj


class _Missing(Exception):
    def __init__(self, path: str):
        super().__init__(f"missing field '{path}'")


def from_dict(cls: type[T], data: Any, where: str, fix: str) -> T:
    """`data` as a `cls`; ManifestError "<where>: <field> is ..., expected ...; <fix>" otherwise."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(data).__name__}; {fix}")
    try:
        return _from_dict(cls, data, "")
    except (_Mismatch, _Missing) as exc:
        raise ManifestError(f"{where}: {exc}; {fix}") from None


def to_dict(obj: Any) -> Any:
    """The JSON form: dataclasses by their JSON keys (extra keys merged back), numpy scalars
    as Python numbers, paths as strings, NaN and infinities as null (strict JSON)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        absent = getattr(obj, ABSENT, frozenset())
        for f in dataclasses.fields(obj):
            if f.name == EXTRA or (f.name in absent and getattr(obj, f.name) == _default(f)):
                continue
            out[_json_key(f)] = to_dict(getattr(obj, f.name))
        out.update({k: to_dict(v) for k, v in (getattr(obj, EXTRA, None) or {}).items() if k not in out})
        return out
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def check_schema(data: Any, expected: str, where: str, fix: str) -> dict:
    """The one schema check of every manifest: `data` if it is an object whose "schema" is
    `expected`; ManifestError otherwise. (A reader for an older schema would convert the
    older form here; none is needed while the schema strings are unchanged.)"""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(data).__name__}; {fix}")
    if data.get("schema") != expected:
        raise ManifestError(f"{where}: schema {data.get('schema')!r}, expected {expected!r}; {fix}")
    return data


def read_json(path: str | os.PathLike, what: str, fix: str) -> Any:
    """The parsed JSON of `path`; ManifestError naming the file when it is missing or not JSON."""
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"{what} not found: {p}; {fix}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{p}: not valid JSON ({exc}); {fix}") from exc
