"""Hypothesis strategies for commands whose every field sits at, or just past, the edge of its type,
generated from the pydantic models of `autoglm_wire.protocol` (`Command` and the params model of
each kind): integers at their bounds and at +-2^63 and 2^64, floats at their bounds, +-1e308, 1e999,
NaN and Infinity, datetimes naive, in year 1, 9999 or at the wire's limits, with offsets, strings
with NUL, lone surrogates, 64 KB, unicode, literals and near misses, unknown kinds, extra fields,
fields left out. Most values are valid, so most commands reach the engine.
"""

from __future__ import annotations

import json
import re
import types
import typing
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, get_args, get_origin

from hypothesis import strategies as st
from pydantic import BaseModel

from autoglm_wire.protocol import INT64_MAX, INT64_MIN, PARAMS_BY_KIND, Command


@dataclass(frozen=True)
class Raw:
    """A JSON token written as is (`1e999`, `NaN`): json.dumps cannot produce them from a float."""

    token: str


_RAW = re.compile(r'"\\u0000raw:([^"\\]*)\\u0000"')


def to_json(value: Any) -> bytes:
    """JSON text of `value`, Raw tokens inlined; non-ASCII escaped as json.dumps does (lone surrogates too)."""
    text = json.dumps(value, default=lambda raw: f"\x00raw:{raw.token}\x00")
    return _RAW.sub(lambda m: m.group(1), text).encode()


INT_EDGES = [0, -1, 1, INT64_MAX, INT64_MAX + 1, INT64_MIN, INT64_MIN - 1, 2**64, -(2**64)]
FLOAT_EDGES: list[Any] = [0.0, -0.0, 5e-324, 1e-308, 1e308, -1e308, Raw("1e999"), Raw("-1e999"), Raw("NaN"),
                          Raw("Infinity"), Raw("-Infinity")]
STRING_EDGES = ["", "a", "\x00", "a\x00b", "\ud800", "x\udfffy", "x" * 65536, "é漢字🙂", "\u202eRTL", "\n\t\"\\",
                "\ufeff", "\U0010ffff", "/", "+", "#", "$SYS/x", "../reply"]
VALID_DATETIMES = ["2026-11-21T10:00:00Z", "2026-11-21T10:00:00.123456+00:00", "2026-11-21T10:00:00+14:00",
                   "2026-11-21T10:00:00-23:59", "2100-01-01T00:00:00Z", "2199-12-31T23:59:59Z"]
DATETIME_EDGES: list[Any] = [
    "0001-01-01", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "9999-12-31T23:59:59+14:00",
    "1969-12-31T23:59:59Z", "1970-01-01T00:00:00Z", "2200-01-01T00:00:00Z", "2026-11-21T10:00:00", "2026-11-21",
    "2020-01-01T00:00:00Z", 0, -1, 2**63, 1.5e9, "", "now",
]
TEXT = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")  # NUL and surrogates are edges
KINDS = sorted(PARAMS_BY_KIND)
UNKNOWN_KINDS = ["", "PING", "ping ", "exec", "onnx2", "\u0000", "x" * 1000]
EXTRA_KEYS = ["extra", "__proto__", "topic", "reply_to", "sig2", "params2"]

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(STRING_EDGES) | st.text(TEXT, max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)


def _bound(metadata: list[Any], name: str) -> Any:
    return next((getattr(m, name) for m in metadata if getattr(m, name, None) is not None), None)


def _mostly(inside: st.SearchStrategy[Any], edges: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Nine draws in ten from `inside` (valid values), one from `edges` (at or past the bounds): a
    command has about ten fields, and most commands should get past validation. (Hypothesis
    favours small integers: they pick the valid side.)"""
    return st.integers(0, 9).flatmap(lambda n: edges if n == 9 else inside)


def _ints(metadata: list[Any]) -> st.SearchStrategy[Any]:
    low = _bound(metadata, "ge")
    low = low if low is not None else (_bound(metadata, "gt") + 1 if _bound(metadata, "gt") is not None else -1000)
    high = _bound(metadata, "le")
    high = high if high is not None else 1000
    edges = INT_EDGES + [low - 1, low, low + 1, high - 1, high, high + 1, True, 1.0, "1"]
    return _mostly(st.integers(low, min(high, low + 10)) | st.integers(low, high), st.sampled_from(edges))


def _floats(metadata: list[Any]) -> st.SearchStrategy[Any]:
    open_low = _bound(metadata, "gt") is not None
    low = _bound(metadata, "gt") if open_low else _bound(metadata, "ge")
    low = low if low is not None else -1e6
    high = _bound(metadata, "le")
    high = high if high is not None else 1e6
    edges = FLOAT_EDGES + [low, low - 1e-9, low + 1e-9, high, high - 1e-9, high + 1e-9, "0.5", None]
    return _mostly(st.floats(low, high, exclude_min=open_low), st.sampled_from(edges))


def _strings(metadata: list[Any]) -> st.SearchStrategy[Any]:
    pattern = _bound(metadata, "pattern")
    min_length = _bound(metadata, "min_length") or 0
    inside = st.from_regex(pattern, fullmatch=True) if pattern else st.text(TEXT, min_size=min_length, max_size=40)
    max_length = _bound(metadata, "max_length")
    edges = STRING_EDGES + ([("y" * max_length), "y" * (max_length + 1)] if max_length else []) + [1, None, ["a"]]
    return _mostly(inside, st.sampled_from(edges))


def values_for(annotation: Any, metadata: list[Any]) -> st.SearchStrategy[Any]:
    """Values at and past the edges of one field's type (and, mostly, ordinary ones in between)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *more = get_args(annotation)
        return values_for(base, [*more, *metadata])
    if origin in (typing.Union, types.UnionType):
        others = [arg for arg in get_args(annotation) if arg is not type(None)]
        chosen = st.one_of([values_for(arg, metadata) for arg in others])
        return _mostly(st.none(), chosen) if len(others) < len(get_args(annotation)) else chosen
    if origin is Literal:
        literals = list(get_args(annotation))
        return _mostly(st.sampled_from(literals), st.sampled_from([str(v).upper() for v in literals] + ["", None, 2]))
    if origin is list:
        (item,) = get_args(annotation)
        max_length = _bound(metadata, "max_length")
        sizes = _mostly(st.integers(1, 3), st.sampled_from([0, max_length or 0, (max_length or 0) + 1]))
        return sizes.flatmap(lambda n: st.lists(values_for(item, []), min_size=n, max_size=n))
    if origin is dict:
        _, value = get_args(annotation)
        return st.dictionaries(st.text(TEXT, max_size=10), values_for(value, []), max_size=3)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return model_objects(annotation)
    if annotation is bool:
        return _mostly(st.booleans(), st.sampled_from([0, 1, "true", None]))
    if annotation is int:
        return _ints(metadata)
    if annotation is float:
        return _floats(metadata)
    if annotation is str:
        return _strings(metadata)
    if annotation is datetime:
        return _mostly(st.sampled_from(VALID_DATETIMES), st.sampled_from(DATETIME_EDGES))
    return json_values  # Any


def model_objects(model: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    """A JSON object for `model`: each field drawn from `values_for`; optional fields mostly left out
    (their defaults are valid), required ones rarely; now and then an extra field."""

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for name, info in model.model_fields.items():
            keep = draw(st.integers(0, 19)) < (19 if info.is_required() else 10)
            if keep:
                obj[info.alias or name] = draw(values_for(info.annotation, list(info.metadata)))
        if draw(st.integers(0, 29)) == 29:
            obj[draw(st.sampled_from(EXTRA_KEYS))] = draw(json_values)
        return obj

    return build()


@st.composite
def commands(draw: st.DrawFn) -> dict[str, Any]:
    """A command envelope with the params of its kind (or an unknown kind), its fields at the edges.
    The caller sets `id` (unique per case) unless the case is one about the id itself."""
    kind = draw(_mostly(st.sampled_from(KINDS), st.sampled_from(UNKNOWN_KINDS)))
    envelope = {k: v for k, v in draw(model_objects(Command)).items() if k not in {"kind", "params", "id"}}
    params = draw(model_objects(PARAMS_BY_KIND[kind])) if kind in PARAMS_BY_KIND else draw(
        st.dictionaries(st.text(TEXT, max_size=8), json_values, max_size=3))
    return {**envelope, "kind": kind, "params": params}


ID_VARIANTS = ["plain"] * 24 + ["longest", "too_long", "illegal", "missing", "number", "unicode"]


def with_id(command: dict[str, Any], serial: str, variant: str) -> dict[str, Any]:
    """`command` with an id: unique (`serial`) and valid, or at or past the id's edges."""
    ids: dict[str, Any] = {"plain": serial, "longest": serial.ljust(128, "x"), "too_long": serial.ljust(129, "x"),
                           "illegal": f"{serial}/+", "number": 2**64, "unicode": f"{serial}-é"}
    if variant == "missing":
        return command
    return {"id": ids[variant], **command}
