"""HDF5 files (activations and other arrays): atomic, resumable writes and schema checks.

A writer works on ``<path>.partial`` (a name that never looks complete), flushes as
batches arrive so a killed run keeps what was durably written, and ``finish_h5``
validates and renames it onto ``path``. Root attributes ``dolm.schema``,
``dolm.provenance`` and ``dolm.extra`` hold JSON strings.

The schema for an HDF5 format is a JSON Schema over :func:`describe_h5`'s output::

    {"attrs": {name: value, ...},
     "datasets": {"path/in/file": {"dtype": "float16", "shape": [n, d],
                                    "chunks": [..] | null, "compression": "gzip" | null}}}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dolm.errors import DolmRuntimeError, InputError
from dolm.formats.io import (
    KEY_EXTRA,
    KEY_PROVENANCE,
    KEY_SCHEMA,
    _join,
    _meta_from_kv,
    check_output,
    commit_rename,
    write_error,
)
from dolm.formats.provenance import FileMeta, Run
from dolm.formats.schema import check_json, load_schema, schema_version


def partial_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".partial")


def open_h5_for_write(
    path: str | os.PathLike,
    schema: str,
    run: Run | None,
    force: bool = False,
    resume: bool = False,
    extra: dict[str, Any] | None = None,
) -> Any:
    """Open ``<path>.partial`` for writing (or appending, with ``resume``); return h5py.File."""
    import h5py

    check_output(path, force)
    part = partial_path(path)
    if resume and part.exists():
        try:
            fh = h5py.File(part, "a")
        except OSError as exc:
            raise InputError(f"{part}: cannot resume from a corrupt partial file: {exc}") from None
        found = json.loads(fh.attrs.get(KEY_SCHEMA, "{}")).get("name")
        if found != schema:
            fh.close()
            raise InputError(f"{part}: partial file is a {found!r} file, expected {schema!r}")
        return fh
    fh = h5py.File(part, "w")
    fh.attrs[KEY_SCHEMA] = json.dumps({"name": schema, "version": schema_version(schema)})
    fh.attrs[KEY_PROVENANCE] = json.dumps(run.chain() if run else [])
    fh.attrs[KEY_EXTRA] = json.dumps(extra or {}, default=str)
    return fh


def finish_h5(fh: Any, path: str | os.PathLike, schema: str, run: Run | None) -> None:
    """Record the final provenance, close, validate and rename ``.partial`` onto ``path``."""
    part = partial_path(path)
    try:
        if run is not None:
            fh.attrs[KEY_PROVENANCE] = json.dumps(run.chain())
        fh.flush()
        fh.close()
    except (OSError, RuntimeError) as exc:
        raise write_error(part, exc) from None
    name, problems = check_h5(str(part), schema)
    if problems:
        raise DolmRuntimeError("output fails its schema (a dolm bug):\n  " + _join(problems))
    commit_rename(part, Path(path))


def describe_h5(path: str) -> dict[str, Any]:
    """JSON description of an HDF5 file: root attributes and every dataset's layout."""
    import h5py

    out: dict[str, Any] = {"attrs": {}, "datasets": {}}
    with h5py.File(path, "r") as fh:
        for k, v in fh.attrs.items():
            out["attrs"][k] = _plain(v)

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                dt = obj.dtype
                out["datasets"][name] = {
                    "dtype": "string" if h5py.check_string_dtype(dt) else str(dt),
                    "shape": list(obj.shape),
                    "chunks": list(obj.chunks) if obj.chunks else None,
                    "compression": obj.compression,
                    "attrs": {k: _plain(v) for k, v in obj.attrs.items()},
                }

        fh.visititems(visit)
    return out


def _plain(v: Any) -> Any:
    import numpy as np

    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_h5_meta(path: str) -> FileMeta:
    """Schema, provenance and extra metadata from an HDF5 file's root attributes."""
    import h5py

    if not os.path.exists(path):
        raise InputError(f"{path}: file not found")
    try:
        with h5py.File(path, "r") as fh:
            kv = {k: _plain(v) for k, v in fh.attrs.items() if k.startswith("dolm.")}
    except OSError as exc:
        raise InputError(f"{path}: truncated or corrupt HDF5 file: {exc}") from None
    return _meta_from_kv(path, {k: str(v) for k, v in kv.items()})


def check_h5(path: str, schema: str | None = None) -> tuple[str | None, list[str]]:
    """Validate an HDF5 file against its (or the given) schema; return (name, problems)."""
    try:
        meta = read_h5_meta(path)
        desc = describe_h5(path)
    except InputError as exc:
        return schema, [str(exc)]
    except OSError as exc:
        return schema, [f"{path}: truncated or corrupt HDF5 file: {exc}"]
    if schema is not None and meta.schema is not None and meta.schema != schema:
        return meta.schema, [f"{path}: is a {meta.schema!r} file, expected a {schema!r} file"]
    name = meta.schema or schema
    if name is None:
        return None, [f"{path}: HDF5 file without a 'dolm.schema' attribute"]
    problems = check_json(desc, load_schema(name, meta.version), path)
    if load_schema(name, meta.version).get("x-dolm", {}).get("same_rows"):
        rows = {ds: info["shape"][0] for ds, info in desc["datasets"].items() if info["shape"]}
        if len(set(rows.values())) > 1:
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(rows.items())[:6])
            problems.append(f"{path}: datasets must have the same number of rows, found {detail}")
    return name, problems


def check_h5_data(path: str, schema: str | None = None, limit: int = 8) -> list[str]:
    """Read every dataset of an HDF5 file, chunk by chunk; return problems.

    A chunk that cannot be read (a corrupt gzip chunk, a truncated file) is named by
    dataset and rows; where the schema says ``"finite": true`` NaN/inf values are too.
    """
    import h5py
    import numpy as np

    finite = False
    if schema is not None:
        finite = bool(load_schema(schema).get("x-dolm", {}).get("finite"))
    problems: list[str] = []
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        return [f"{path}: truncated or corrupt HDF5 file: {exc}"]
    with fh:
        names: list[str] = []
        fh.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        for name in names:
            ds = fh[name]
            if not ds.shape or ds.size == 0:
                continue
            step = ds.chunks[0] if ds.chunks else max(1, (1 << 22) // max(1, ds[0:1].nbytes))
            bad = 0
            for lo in range(0, ds.shape[0], step):
                hi = min(ds.shape[0], lo + step)
                try:
                    block = ds[lo:hi]
                except (OSError, RuntimeError, ValueError) as exc:
                    problems.append(f"{path}: dataset {name!r}: rows {lo}..{hi - 1} cannot be "
                                    f"read (a corrupt or truncated chunk): {exc}")
                    break
                if finite and np.asarray(block).dtype.kind in "fc":
                    bad += int(block.size - np.count_nonzero(np.isfinite(block)))
            if bad:
                problems.append(f"{path}: dataset {name!r} has {bad} NaN/inf value(s) of "
                                f"{ds.size}; expected finite numbers")
            if len(problems) >= limit:
                break
    return problems


def read_h5(path: str, schema: str | None = None, run: Run | None = None) -> tuple[Any, FileMeta]:
    """Open a validated HDF5 file read-only; return (h5py.File, FileMeta). Caller closes."""
    import h5py

    name, problems = check_h5(path, schema)
    if problems:
        raise InputError(_join(problems))
    meta = read_h5_meta(path)
    if run is not None:
        run.add_input(path, meta)
    return h5py.File(path, "r"), meta


__all__ = [
    "KEY_EXTRA",
    "KEY_PROVENANCE",
    "KEY_SCHEMA",
    "check_h5",
    "check_h5_data",
    "describe_h5",
    "finish_h5",
    "open_h5_for_write",
    "partial_path",
    "read_h5",
    "read_h5_meta",
]
