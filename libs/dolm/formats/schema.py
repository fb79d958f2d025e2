"""JSON Schemas from ``schemas/`` and the checks that apply them.

A table schema is a JSON Schema for one row (``"x-dolm": {"kind": "table"}``); it is
checked column-wise and vectorised over every row with pyarrow (type, nullability,
``enum``, ``minimum``, ``maximum``, and ``x-dolm.unique``), so million-row tables validate
in well under a second. HDF5, safetensors and JSON schemas are ordinary JSON Schemas
applied with ``jsonschema`` to the file's description (HDF5/safetensors) or content (JSON).
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

from dolm.errors import InputError

_NAME_RE = re.compile(r"^(?P<name>[a-z0-9_]+)\.v(?P<version>\d+)\.schema\.json$")


def schema_dir() -> Path:
    """The folder holding ``<name>.v<N>.schema.json`` (env ``DOLM_SCHEMAS`` overrides)."""
    env = os.environ.get("DOLM_SCHEMAS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "schemas"


@functools.cache
def available_schemas() -> dict[str, list[int]]:
    """Schema name -> sorted versions found in the schema folder."""
    out: dict[str, list[int]] = {}
    folder = schema_dir()
    if folder.is_dir():
        for p in folder.iterdir():
            m = _NAME_RE.match(p.name)
            if m:
                out.setdefault(m["name"], []).append(int(m["version"]))
    return {k: sorted(v) for k, v in sorted(out.items())}


@functools.cache
def load_schema(name: str, version: int | None = None) -> dict[str, Any]:
    """Load schema ``name`` (latest version unless ``version`` is given)."""
    versions = available_schemas().get(name)
    if not versions:
        known = ", ".join(available_schemas()) or "none"
        raise InputError(f"unknown schema {name!r}: known schemas are {known}")
    v = versions[-1] if version is None else int(version)
    if v not in versions:
        raise InputError(f"schema {name!r} has no version {v}: found versions {versions}")
    with open(schema_dir() / f"{name}.v{v}.schema.json") as fh:
        schema = json.load(fh)
    schema.setdefault("x-dolm", {})
    schema["x-dolm"].setdefault("version", v)
    return schema


def schema_version(name: str) -> int:
    return load_schema(name)["x-dolm"]["version"]


def schema_kind(name: str) -> str:
    return load_schema(name)["x-dolm"].get("kind", "json")


# ---------------------------------------------------------------- tables


def frame(rows: Any, schema: str, columns: list[str] | None = None) -> Any:
    """A DataFrame of ``rows`` (dicts or a DataFrame) in the column order and dtypes of
    table schema ``schema``: integers as nullable ``Int64``, numbers as ``float64``,
    booleans as ``boolean``, strings as objects with None for missing. ``columns``: the
    schema columns to keep (default: every one; absent ones are null); columns that the
    schema does not name follow in their own order. Columns the schema marks optional
    (``x-dolm.optional``) are written only when the rows have them."""
    import pandas as pd

    sch = load_schema(schema)
    props = sch["properties"]
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    optional = set(sch["x-dolm"].get("optional", ())) - set(df.columns)
    names = [c for c in props if (c in columns if columns is not None else c not in optional)]
    extra = [c for c in df.columns if c not in props]
    out = {}
    for c in names:
        col = df[c] if c in df.columns else pd.Series([None] * len(df), dtype=object)
        types = props[c].get("type", [])
        types = [types] if isinstance(types, str) else list(types)
        if "integer" in types:
            col = col.astype("Int64")
        elif "number" in types:
            col = pd.to_numeric(col, errors="coerce").astype("float64")
        elif "boolean" in types:
            col = col.astype("boolean")
        elif "string" in types:
            col = col.astype(object).where(col.notna(), None)
        out[c] = col.reset_index(drop=True)
    for c in extra:
        out[c] = df[c].reset_index(drop=True)
    return pd.DataFrame(out, columns=names + extra)




def _arrow_json_type(t: Any) -> str:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return "array"
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_struct(t) or pa.types.is_map(t):
        return "object"
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return "string"
    return str(t)


def _types(spec: dict[str, Any]) -> set[str]:
    t = spec.get("type")
    if t is None:
        return set()
    return {t} if isinstance(t, str) else set(t)


def _compatible(found: str, allowed: set[str]) -> bool:
    if not allowed or found in allowed:
        return True
    if found == "integer" and "number" in allowed:
        return True
    if found == "null":  # an all-null column: fine when the column may be null
        return "null" in allowed
    return False


def check_table(table: Any, schema: dict[str, Any], where: str) -> list[str]:
    """Check a ``pyarrow.Table`` against a row schema; return problems (empty = valid)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    problems: list[str] = []
    props: dict[str, Any] = schema.get("properties", {})
    names = set(table.column_names)
    for col in schema.get("required", []):
        if col not in names:
            problems.append(f"{where}: missing required column {col!r}")
    for col, spec in props.items():
        if col not in names:
            continue
        arr = table.column(col)
        allowed = _types(spec)
        found = _arrow_json_type(arr.type)
        if not _compatible(found, allowed):
            problems.append(
                f"{where}: column {col!r} has type {found} ({arr.type}), "
                f"expected {' or '.join(sorted(allowed))}"
            )
            continue
        if arr.null_count and allowed and "null" not in allowed:
            problems.append(
                f"{where}: column {col!r} has {arr.null_count} missing value(s), expected none"
            )
        if found == "array" and "items" in spec and len(arr):
            item_allowed = _types(spec["items"])
            item_found = _arrow_json_type(arr.type.value_type)
            if not _compatible(item_found, item_allowed):
                problems.append(
                    f"{where}: column {col!r} holds lists of {item_found}, "
                    f"expected lists of {' or '.join(sorted(item_allowed))}"
                )
        valid = pc.drop_null(arr)
        if "enum" in spec and len(valid):
            ok = pc.is_in(valid, value_set=pa.array([v for v in spec["enum"] if v is not None]))
            bad = len(valid) - pc.sum(ok).as_py() if len(ok) else 0
            if bad:
                sample = pc.filter(valid, pc.invert(ok))[0].as_py()
                problems.append(
                    f"{where}: column {col!r} has {bad} value(s) outside {spec['enum']}"
                    f" (e.g. {sample!r})"
                )
        if found in ("integer", "number") and len(valid):
            mm = pc.min_max(valid).as_py()
            if "minimum" in spec and mm["min"] is not None and mm["min"] < spec["minimum"]:
                problems.append(
                    f"{where}: column {col!r} has values below the minimum {spec['minimum']}"
                    f" (found {mm['min']})"
                )
            if "maximum" in spec and mm["max"] is not None and mm["max"] > spec["maximum"]:
                problems.append(
                    f"{where}: column {col!r} has values above the maximum {spec['maximum']}"
                    f" (found {mm['max']})"
                )
    for col in schema.get("x-dolm", {}).get("unique", []):
        if col in names and len(table):
            n_unique = pc.count_distinct(table.column(col)).as_py()
            if n_unique != len(table):
                problems.append(
                    f"{where}: column {col!r} must be unique, "
                    f"found {len(table) - n_unique} duplicate value(s)"
                )
    return problems


# ---------------------------------------------------------------- json-like


def check_json(obj: Any, schema: dict[str, Any], where: str, limit: int = 5) -> list[str]:
    """Validate a JSON-like object (a file's content or description) with jsonschema."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    for err in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))[:limit]:
        loc = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        problems.append(f"{where}: at {loc}: {err.message}")
    return problems
