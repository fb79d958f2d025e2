"""Reading and writing dolm files: Parquet/CSV tables, JSON, HDF5, safetensors.

Every writer validates against the schema, writes to a temporary name in the target
folder and renames, so an interrupted run never leaves a file that looks complete.
Every reader validates before work starts and raises :class:`dolm.errors.InputError`
(exit 3) naming the file, column or dataset and what was expected.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dolm.errors import DolmRuntimeError, InputError
from dolm.formats.provenance import FileMeta, Run, sha256_bytes, sha256_file
from dolm.formats.schema import (
    available_schemas,
    check_json,
    check_table,
    load_schema,
    schema_version,
)

PARQUET_MAGIC = b"PAR1"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
KEY_SCHEMA = "dolm.schema"
KEY_PROVENANCE = "dolm.provenance"
KEY_EXTRA = "dolm.extra"


# ---------------------------------------------------------------- atomic writes


def check_output(path: str | os.PathLike | None, force: bool, option: str = "--output") -> None:
    """Refuse an existing output without ``--force`` (exit 3), before any work is done."""
    if path is None or str(path) == "-":
        return
    p = Path(path)
    if p.exists() and not force:
        raise InputError(f"{option} {p}: file exists; pass --force to overwrite it")
    if not p.parent.exists():
        raise InputError(f"{option} {p}: folder {p.parent} does not exist")


_BATCHES: list[list[tuple[Path, Path]]] = []


@contextlib.contextmanager
def all_or_none() -> Iterator[None]:
    """Outputs written inside the block appear together when it ends, or none of them.

    Every :func:`atomic_path` write (``write_table``, ``write_json``, ``save_safetensors``)
    inside stays under its temporary name; they are renamed onto their names only when
    the block ends without an error. On an error (a full disk while writing the third of
    four outputs) every temporary file is removed and no output is touched.
    """
    batch: list[tuple[Path, Path]] = []
    _BATCHES.append(batch)
    try:
        yield
    except BaseException:
        _BATCHES.pop()
        for tmp, _ in batch:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise
    _BATCHES.pop()
    for tmp, target in batch:
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left untouched; a
    failed write (a full disk) is a :class:`DolmRuntimeError` naming the file. The file
    gets the mode a plain ``open(path, "w")`` would give it (0o666 less the umask), not
    the 0o600 of a temporary file. Inside :func:`all_or_none` the rename waits for the
    block's end.
    """
    target = Path(path)
    check_output(target, force)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise write_error(target, exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            os.chmod(tmp_path, 0o666 & ~_umask())
        except OSError as exc:
            raise write_error(target, exc) from None
        commit_rename(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def commit_rename(tmp: Path, target: Path) -> None:
    """Rename a finished temporary file onto its name, now or (inside
    :func:`all_or_none`) when the block ends."""
    if _BATCHES:
        _BATCHES[-1].append((tmp, target))
    else:
        os.replace(tmp, target)


def write_error(path: str | os.PathLike, exc: BaseException,
                note: str = "the output was not written") -> DolmRuntimeError:
    """A failed write (full disk, quota, permissions) as a runtime error naming the file."""
    import errno

    code = getattr(exc, "errno", None)
    reason = getattr(exc, "strerror", None) or str(exc)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc):
        detail = reason if code == errno.ENOSPC and "free" in str(reason) else ""
        reason = "no space left on the device" + (f" ({detail})" if detail else "")
    return DolmRuntimeError(f"{path}: could not write: {reason}; {note}")


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _schema_header(schema: str) -> dict[str, Any]:
    return {"name": schema, "version": schema_version(schema)}


# ---------------------------------------------------------------- tables


def _read_input_bytes(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    return Path(path).read_bytes()


def _missing(path: str, what: str = "file") -> InputError:
    return InputError(f"{path}: {what} not found")


def read_table(
    path: str | os.PathLike,
    schema: str | None = None,
    run: Run | None = None,
    columns: list[str] | None = None,
) -> tuple[Any, FileMeta]:
    """Read a Parquet (or CSV/TSV/JSONL) table, validate it, return (DataFrame, FileMeta).

    ``schema``: the format the caller needs. A dolm file naming another schema is refused;
    a plain file (no dolm metadata, e.g. a user's CSV) is checked against ``schema``.
    ``-`` reads Parquet from stdin (buffered whole: its footer is at the end).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(path)
    if path != "-" and not os.path.exists(path):
        raise _missing(path)
    if path != "-" and os.path.isdir(path):
        raise InputError(f"{path}: is a folder, expected a table file (Parquet or CSV)")
    suffix = Path(path).suffix.lower()
    digest: str | None = None
    kv: dict[str, str] = {}
    if suffix in (".csv", ".tsv", ".jsonl", ".ndjson"):
        table = _read_text_table(path, suffix)
    else:
        data = _read_input_bytes(path) if path == "-" else None
        source: Any = pa.BufferReader(data) if data is not None else path
        if data is not None:
            digest = sha256_bytes(data)
            head, tail = data[:4], data[-4:]
        else:
            with open(path, "rb") as fh:
                head = fh.read(4)
                fh.seek(max(0, os.path.getsize(path) - 4))
                tail = fh.read(4)
        if head != PARQUET_MAGIC:
            raise InputError(
                f"{path}: not a Parquet file (expected a file starting with PAR1; "
                "CSV/TSV/JSONL files need the matching extension)"
            )
        if tail != PARQUET_MAGIC:
            raise InputError(f"{path}: truncated or corrupt Parquet file (no footer)")
        try:
            table = pq.read_table(source, columns=columns)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{path}: corrupt Parquet file: {exc}") from None
        raw = table.schema.metadata or {}
        kv = {k.decode(): v.decode() for k, v in raw.items() if k.decode().startswith("dolm.")}
    meta = _meta_from_kv(path, kv)
    meta.sha256 = digest
    if schema is not None and meta.schema is not None and meta.schema != schema:
        raise InputError(f"{path}: is a {meta.schema!r} file, expected a {schema!r} file")
    check_name = meta.schema or schema
    if check_name is not None:
        problems = check_table(table, load_schema(check_name, meta.version), path)
        if problems:
            raise InputError(_join(problems))
    if run is not None:
        run.add_input(path, meta, sha256=digest)
    return table.to_pandas(), meta


def _read_text_table(path: str, suffix: str) -> Any:
    import pandas as pd
    import pyarrow as pa

    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    bad = head.find(b"\0")
    if bad < 0:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(head) - 4:  # not just a character cut at the end
                bad = exc.start
    if bad >= 0:
        raise InputError(f"{path}: not a {suffix[1:].upper()} text file (binary data at byte "
                         f"{bad}; expected UTF-8 text)")
    try:
        if suffix in (".jsonl", ".ndjson"):
            df = pd.read_json(path, lines=True)
        else:
            df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    except Exception as exc:  # pandas raises many parser error types
        raise InputError(f"{path}: could not parse as {suffix[1:].upper()}: {exc}") from None
    return pa.Table.from_pandas(df, preserve_index=False)


def _meta_from_kv(path: str, kv: dict[str, str]) -> FileMeta:
    meta = FileMeta(path=path)
    try:
        if KEY_SCHEMA in kv:
            head = json.loads(kv[KEY_SCHEMA])
            meta.schema, meta.version = head["name"], int(head["version"])
        if KEY_PROVENANCE in kv:
            meta.provenance = json.loads(kv[KEY_PROVENANCE])
        if KEY_EXTRA in kv:
            meta.extra = json.loads(kv[KEY_EXTRA])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: unreadable dolm metadata: {exc}") from None
    return meta


def _join(problems: list[str], limit: int = 8) -> str:
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return "\n  ".join(problems[:limit]) + more


def to_arrow(df: Any) -> Any:
    """pandas DataFrame (or pyarrow Table) -> pyarrow Table without the index."""
    import pyarrow as pa

    if isinstance(df, pa.Table):
        return df
    return pa.Table.from_pandas(df, preserve_index=False)


def write_table(
    df: Any,
    path: str | os.PathLike,
    schema: str,
    run: Run | None,
    force: bool = False,
    extra: dict[str, Any] | None = None,
) -> None:
    """Validate ``df`` against ``schema`` and write it as Parquet with dolm metadata.

    ``-`` writes to stdout. Otherwise written to a temporary file and renamed.
    """
    import pyarrow.parquet as pq

    table = to_arrow(df)
    problems = check_table(table, load_schema(schema), f"output {path}")
    if problems:
        raise DolmRuntimeError("output fails its schema (a dolm bug):\n  " + _join(problems))
    md = dict(table.schema.metadata or {})
    md[KEY_SCHEMA.encode()] = json.dumps(_schema_header(schema)).encode()
    md[KEY_PROVENANCE.encode()] = json.dumps(run.chain() if run else []).encode()
    md[KEY_EXTRA.encode()] = json.dumps(extra or {}, default=str).encode()
    table = table.replace_schema_metadata(md)
    if str(path) == "-":
        buf = io.BytesIO()
        pq.write_table(table, buf)
        sys.stdout.buffer.write(buf.getvalue())
        sys.stdout.buffer.flush()
        return
    with atomic_path(path, force) as tmp:
        pq.write_table(table, tmp)


def read_meta(path: str | os.PathLike) -> FileMeta:
    """Schema and provenance of any dolm file (Parquet, HDF5, JSON, safetensors)."""
    path = str(path)
    kind = sniff(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            raw = pq.read_schema(path).metadata or {}
        except Exception as exc:
            raise InputError(f"{path}: corrupt Parquet file: {exc}") from None
        return _meta_from_kv(path, {k.decode(): v.decode() for k, v in raw.items()})
    if kind == "hdf5":
        from dolm.formats.h5 import read_h5_meta

        return read_h5_meta(path)
    if kind == "safetensors":
        return _meta_from_kv(path, read_safetensors_metadata(path))
    if kind == "json":
        obj = _load_json(path)
        head = obj.get("dolm", {}) if isinstance(obj, dict) else {}
        meta = FileMeta(path=path, provenance=head.get("provenance", []))
        if "schema" in head:
            meta.schema, meta.version = head["schema"]["name"], int(head["schema"]["version"])
        return meta
    return FileMeta(path=path)


# ---------------------------------------------------------------- JSON


def _load_json(path: str) -> Any:
    if not os.path.exists(path):
        raise _missing(path)
    try:
        with open(path) as fh:
            return json.load(fh)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON: {exc}") from None


def read_json(
    path: str | os.PathLike, schema: str | None = None, run: Run | None = None
) -> tuple[Any, FileMeta]:
    """Read and validate a dolm JSON file; return (object, FileMeta)."""
    path = str(path)
    obj = _load_json(path)
    meta = read_meta(path)
    if schema is not None and meta.schema is not None and meta.schema != schema:
        raise InputError(f"{path}: is a {meta.schema!r} file, expected a {schema!r} file")
    name = meta.schema or schema
    if name is not None:
        spec = load_schema(name, meta.version)
        problems = check_json(obj, spec, path)
        if not problems and spec.get("x-dolm", {}).get("graph") == "dag":
            problems = dag_problems(obj, path)
        if problems:
            raise InputError(_join(problems))
    meta.sha256 = sha256_file(path)
    if run is not None:
        run.add_input(path, meta)
    return obj, meta


def dag_problems(obj: dict[str, Any], path: str) -> list[str]:
    """Graph checks of a ``dag`` file: every edge joins known nodes; no directed cycle."""
    nodes = [str(n) for n in obj.get("nodes", [])]
    known = set(nodes)
    out: dict[str, list[str]] = {n: [] for n in nodes}
    problems = []
    for i, e in enumerate(obj.get("edges", [])):
        s, t = str(e.get("source")), str(e.get("target"))
        for v in (s, t):
            if v not in known:
                problems.append(f"{path}: edge {i} ({s} -> {t}) names {v!r}, which is not "
                                "in 'nodes'")
        if s in known and t in known:
            out[s].append(t)
    if problems:
        return problems
    import numpy as np

    from dolm.graphs import find_cycle

    index = {n: i for i, n in enumerate(nodes)}
    B = np.zeros((len(nodes), len(nodes)), dtype=bool)
    for s, targets in out.items():
        for t in targets:
            B[index[s], index[t]] = True
    cycle = find_cycle(B)
    if cycle is not None:
        k = cycle.index(min(cycle))  # start at the node listed first
        names = [nodes[i] for i in cycle[k:] + cycle[:k]]
        return [f"{path}: expected a DAG, found a cycle: {' -> '.join(names + names[:1])}"]
    return []


def write_json(
    obj: dict[str, Any], path: str | os.PathLike, schema: str, run: Run | None, force: bool = False
) -> None:
    """Add the ``dolm`` header, validate, and write JSON atomically (``-`` = stdout)."""
    out = dict(obj)
    out["dolm"] = {"schema": _schema_header(schema), "provenance": run.chain() if run else []}
    problems = check_json(out, load_schema(schema), f"output {path}")
    if problems:
        raise DolmRuntimeError("output fails its schema (a dolm bug):\n  " + _join(problems))
    text = json.dumps(out, indent=2, default=_json_default) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with atomic_path(path, force) as tmp:
        tmp.write_text(text)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.bool_):
        return bool(o)
    return str(o)


def json_safe(obj: Any) -> Any:
    """A JSON-safe copy: NaN/inf -> None, numpy scalars -> Python, tuples -> lists, str keys."""
    import math

    import numpy as np

    def conv(o: Any) -> Any:
        if isinstance(o, dict):
            return {str(k): conv(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [conv(v) for v in o]
        if isinstance(o, (np.bool_, bool)):
            return bool(o)
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, (float, np.floating)):
            f = float(o)
            return f if math.isfinite(f) else None
        return o

    return conv(obj)


# ---------------------------------------------------------------- safetensors


def read_safetensors_metadata(path: str) -> dict[str, str]:
    """The ``__metadata__`` string map of a safetensors file (header only, no tensors)."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or n > 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(fh.read(n))
    except (ValueError, OSError) as exc:
        raise InputError(f"{path}: not a valid safetensors file: {exc}") from None
    return header.get("__metadata__", {}) or {}


def describe_safetensors(path: str) -> dict[str, Any]:
    """A JSON description of a safetensors file: metadata and tensors (dtype, shape)."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        md = header.pop("__metadata__", {}) or {}
        tensors = {k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in header.items()}
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}: not a valid safetensors file: {exc}") from None
    return {"metadata": md, "tensors": tensors}


def safetensors_size_problem(path: str) -> str | None:
    """Why a safetensors file's length disagrees with its header (truncated), or None."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (ValueError, OSError, KeyError, TypeError, IndexError, AttributeError) as exc:
        return f"{path}: not a valid safetensors file: {exc}"
    want, have = 8 + n + end, os.path.getsize(path)
    if have < want:
        return (f"{path}: truncated safetensors file: {have} bytes, its header describes "
                f"{want}")
    return None


def nonfinite_problems(arrays: Any, path: str, what: str = "tensor") -> list[str]:
    """``path: tensor NAME has K NaN/inf value(s)`` for each (name, numpy array) given."""
    import numpy as np

    out = []
    for name, a in arrays:
        a = np.asarray(a)
        if a.dtype.kind in "fc":
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            if bad:
                out.append(f"{path}: {what} {name!r} has {bad} NaN/inf value(s) of {a.size}; "
                           "expected finite numbers")
    return out


def save_safetensors(
    tensors: dict[str, Any],
    path: str | os.PathLike,
    schema: str,
    run: Run | None,
    force: bool = False,
    extra: dict[str, Any] | None = None,
) -> None:
    """Save torch tensors as safetensors with dolm metadata, validated and atomic."""
    from safetensors.torch import save_file

    md = {
        KEY_SCHEMA: json.dumps(_schema_header(schema)),
        KEY_PROVENANCE: json.dumps(run.chain() if run else []),
        KEY_EXTRA: json.dumps(extra or {}, default=_json_default),
    }
    with atomic_path(path, force) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=md)
        problems = check_json(describe_safetensors(str(tmp)), load_schema(schema), f"output {path}")
        if problems:
            raise DolmRuntimeError("output fails its schema (a dolm bug):\n  " + _join(problems))


def load_safetensors(
    path: str | os.PathLike, schema: str | None = None, run: Run | None = None
) -> tuple[dict[str, Any], FileMeta]:
    """Load tensors and metadata from a dolm safetensors file, validated."""
    from safetensors.torch import load_file

    path = str(path)
    if not os.path.exists(path):
        raise _missing(path)
    meta = _meta_from_kv(path, read_safetensors_metadata(path))
    if schema is not None and meta.schema is not None and meta.schema != schema:
        raise InputError(f"{path}: is a {meta.schema!r} file, expected a {schema!r} file")
    name = meta.schema or schema
    if name is not None:
        problems = check_json(describe_safetensors(path), load_schema(name, meta.version), path)
        if problems:
            raise InputError(_join(problems))
    size = safetensors_size_problem(path)
    if size is not None:
        raise InputError(size)
    try:
        tensors = load_file(path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise InputError(f"{path}: corrupt safetensors file: {exc}") from None
    if name is not None and load_schema(name, meta.version).get("x-dolm", {}).get("finite"):
        problems = nonfinite_problems(
            ((k, v.float().numpy()) for k, v in tensors.items()), path)
        if problems:
            raise InputError(_join(problems))
    meta.sha256 = sha256_file(path)
    if run is not None:
        run.add_input(path, meta)
    return tensors, meta


# ---------------------------------------------------------------- any file


def sniff(path: str) -> str:
    """File kind from its first bytes: parquet, hdf5, safetensors, json, csv, or unknown."""
    if not os.path.exists(path):
        raise _missing(path)
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head[:4] == PARQUET_MAGIC:
        return "parquet"
    if head[:8] == HDF5_MAGIC:
        return "hdf5"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    suffix = Path(path).suffix.lower()
    if suffix in (".csv", ".tsv", ".jsonl", ".ndjson"):
        return "csv"
    return "unknown"


def validate_file(
    path: str | os.PathLike, schema: str | None = None, quick: bool = False
) -> tuple[str | None, list[str]]:
    """Validate any dolm file; return (schema name, problems). No problems = valid.

    Reads everything a consumer would: every row of a table, every HDF5 dataset chunk
    and every safetensors tensor (NaN/inf where the schema says ``finite``), a DAG's
    graph. ``quick``: HDF5 layout and metadata only, no dataset is read.
    """
    path = str(path)
    try:
        kind = sniff(path)
        if kind == "csv":
            if schema is None:
                return None, [f"{path}: a {Path(path).suffix[1:].upper()} file carries no "
                              "dolm schema; pass --schema NAME to check it against one"]
            _, meta = read_table(path, schema=schema)
            return schema, []
        if kind == "parquet":
            if schema is None and read_meta(path).schema is None:
                return None, [f"{path}: Parquet file without dolm metadata (no 'dolm.schema')"]
            _, meta = read_table(path, schema=schema)
            return meta.schema or schema, []
        if kind == "hdf5":
            from dolm.formats.h5 import check_h5, check_h5_data

            name, problems = check_h5(path, schema)
            if not problems and not quick:
                problems = check_h5_data(path, name)
            return name, problems
        if kind == "json":
            meta = read_meta(path)
            if meta.schema is None and schema is None:
                return None, [f"{path}: JSON file without a 'dolm.schema' header"]
            read_json(path, schema=schema)
            return meta.schema or schema, []
        if kind == "safetensors":
            meta = _meta_from_kv(path, read_safetensors_metadata(path))
            if meta.schema is None and schema is None:
                return None, [f"{path}: safetensors file without 'dolm.schema' metadata"]
            load_safetensors(path, schema=schema)
            return meta.schema or schema, []
        return None, [
            f"{path}: unknown file type (expected Parquet, HDF5, JSON or safetensors; "
            f"known schemas: {', '.join(available_schemas())})"
        ]
    except InputError as exc:
        return schema, [str(exc)]
