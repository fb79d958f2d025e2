"""Durable, resumable storage for a collect-acts run.

Two partial files live beside the outputs while a run is going:

* ``<output>.partial`` — the outcomes *journal*: JSON lines. Line 1 is a header with the
  run's fingerprint (prompts hash, model, options, shard). Then one ``{"row": {...}}``
  line per prompt, and at every commit a ``{"commit": n_done, "acts_rows": r,
  "acts_sha256": h}`` line (``h``: sha256 of the activation rows that commit added).
  Only rows before the last commit line count; a torn tail is cut off on resume.
* ``<acts>.partial`` — the activations HDF5 file (``dolm.formats.open_h5_for_write``),
  flushed and fsynced at every commit *before* the journal's commit line is written, so
  the journal never claims rows the HDF5 file does not hold.

Rows are buffered in memory between commits (bounded in bytes by the caller). A commit
happens at batch boundaries, at most every ``DOLM_COMMIT_SECONDS`` (default 2) seconds or
when the buffer is full, and at the end.

On ``--resume`` both are reopened and every committed activation row is read back and
checked against the journal's hashes (a kill during a chunk rewrite can leave a
compressed chunk unreadable or a torn one wrong); on any mismatch or read error the run
starts over from the top. Otherwise the HDF5 datasets are cut back to the journal's
``acts_rows`` and work continues at prompt ``n_done``. Python floats round-trip exactly
through JSON, so the finished table equals an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from dolm.activations import COORDS
from dolm.errors import InputError
from dolm.formats import write_error

JOURNAL_KIND = "dolm-collect-acts journal"
RESUMABLE = "what was committed stays in the partial files: free space and rerun with --resume"


class Journal:
    """Append-only JSON-lines log of finished outcome rows with commit marks."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict[str, Any]):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.n_done = 0
        self.acts_rows = 0
        self.segments: list[tuple[int, int, str | None]] = []
        self._fh: Any = None
        self._pending: list[str] = []

    # -- opening
    def start(self) -> None:
        """Begin a fresh journal (any old partial is replaced)."""
        self._fh = open(self.path, "w", encoding="utf-8")
        header = {"journal": JOURNAL_KIND, "version": 1, "fingerprint": self.fingerprint}
        self._fh.write(json.dumps(header, sort_keys=True) + "\n")
        self._sync()
        self.n_done = self.acts_rows = 0
        self.segments = []

    def resume(self) -> bool:
        """Reopen an existing journal; False when there is none (or nothing was committed).

        A journal from a run with another fingerprint is an error naming what differs.
        """
        if not self.path.exists():
            return False
        end = 0
        n_done = acts_rows = 0
        segments: list[tuple[int, int, str | None]] = []
        with open(self.path, "rb") as fh:
            first = fh.readline()
            try:
                header = json.loads(first)
            except ValueError:
                return False
            if not isinstance(header, dict) or header.get("journal") != JOURNAL_KIND:
                raise InputError(
                    f"{self.path}: not a dolm-collect-acts partial file; remove it or drop --resume"
                )
            diff = _first_difference(header.get("fingerprint"), self.fingerprint)
            if diff is not None:
                raise InputError(
                    f"--resume: {self.path} was started with other inputs or options "
                    f"({diff}); rerun with the same ones, or without --resume to start over"
                )
            end = fh.tell()
            for line in fh:
                if not line.endswith(b"\n"):
                    break  # torn tail
                try:
                    obj = json.loads(line)
                except ValueError:
                    break
                if "commit" in obj:
                    rows = int(obj["acts_rows"])
                    if rows > acts_rows:
                        segments.append((acts_rows, rows, obj.get("acts_sha256")))
                    n_done, acts_rows = int(obj["commit"]), rows
                    end = fh.tell()
        with open(self.path, "r+b") as fh:
            fh.truncate(end)
        self._fh = open(self.path, "a", encoding="utf-8")
        self.n_done, self.acts_rows, self.segments = n_done, acts_rows, segments
        return True

    # -- writing
    def append(self, rows: list[dict[str, Any]]) -> None:
        """Buffer a batch of finished rows (written by the next :meth:`commit`)."""
        self._pending += [json.dumps({"row": r}) for r in rows]

    def commit(self, acts_rows: int, acts_sha256: str | None = None) -> None:
        """Write the buffered rows and a commit mark, then flush + fsync.

        ``acts_sha256``: the hash of the activation rows added since the last commit.
        """
        n = len(self._pending)
        self.n_done += n
        mark: dict[str, Any] = {"commit": self.n_done, "acts_rows": acts_rows}
        if acts_rows > self.acts_rows:
            mark["acts_sha256"] = acts_sha256
        self.acts_rows = acts_rows
        self._pending.append(json.dumps(mark))
        try:
            self._fh.write("\n".join(self._pending) + "\n")
            self._pending = []
            self._sync()
        except OSError as exc:
            raise write_error(self.path, exc, RESUMABLE) from None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    # -- reading back
    def rows(self) -> Iterator[dict[str, Any]]:
        """Committed rows, in order."""
        pending: list[dict[str, Any]] = []
        with open(self.path, encoding="utf-8") as fh:
            fh.readline()
            for line in fh:
                obj = json.loads(line)
                if "row" in obj:
                    pending.append(obj["row"])
                elif "commit" in obj:
                    yield from pending
                    pending = []

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def _first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """A short description of the first place two JSON-like values differ, or None."""
    a = json.loads(json.dumps(a))
    b = json.loads(json.dumps(b))
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else k)
            if d is not None:
                return d
        return None
    if a != b:
        return f"{where or 'value'}: {_short(a)} then, {_short(b)} now"
    return None


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."


class ActsWriter:
    """Appends rows to the per-site datasets of an activations HDF5 file."""

    def __init__(
        self,
        fh: Any,
        widths: dict[str, int],
        dtype: str,
        compression: str = "gzip",
    ):
        self.fh = fh
        self.widths = widths
        self.dtype = np.dtype(dtype)
        self.compression = compression
        self._rows = 0
        self._segment = hashlib.sha256()
        self._open: dict[str, Any] = {}
        self.broken = False
        self._buf: list[tuple[dict[str, Any], dict[str, np.ndarray]]] = []
        self._buf_rows = 0
        self._buf_bytes = 0

    def _comp(self) -> dict[str, Any]:
        if self.compression == "gzip":
            return {"compression": "gzip", "compression_opts": 1, "shuffle": True}
        if self.compression == "lzf":
            return {"compression": "lzf", "shuffle": True}
        return {}

    def create(self) -> None:
        import h5py

        fh = self.fh
        text = h5py.string_dtype("utf-8")
        comp = self._comp()
        for name, dt in (
            ("prompt_id", text),
            ("prompt_index", "int64"),
            ("position", "int32"),
            ("position_label", text),
            ("token_id", "int32"),
        ):
            fh.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(4096,), **comp)
        for site, width in self.widths.items():
            row_bytes = max(1, width * self.dtype.itemsize)
            chunk_rows = int(min(4096, max(8, (256 * 1024) // row_bytes)))
            fh.create_dataset(
                site,
                shape=(0, width),
                maxshape=(None, width),
                dtype=self.dtype,
                chunks=(chunk_rows, width),
                rdcc_nbytes=max(1 << 20, 4 * chunk_rows * row_bytes),
                **comp,
            )
        self._rows = 0

    def reopen(self, rows: int, segments: list[tuple[int, int, str | None]]) -> str | None:
        """Reuse datasets written by an interrupted run, cut back to ``rows`` rows.

        Every committed segment ``(lo, hi, sha256)`` is read back and hashed. Returns None
        when all of it checks out, else why not (then the caller starts over).
        """
        fh = self.fh
        names = [*COORDS, *self.widths]
        try:
            for name in names:
                if name not in fh or fh[name].shape[0] < rows:
                    return f"dataset {name!r} does not hold the {rows} committed rows"
            for site, width in self.widths.items():
                ds = fh[site]
                if ds.dtype != self.dtype or ds.shape[1] != width:
                    return f"dataset {site!r} has another dtype or width"
            for lo, hi, want in segments:
                got = self._hash_rows(lo, hi)
                if want is None or got != want:
                    return f"rows {lo}..{hi - 1} differ from what was committed"
            for name in names:
                fh[name].resize(rows, axis=0)
        except Exception as exc:  # noqa: BLE001 - any failure to read back means start over
            return f"{type(exc).__name__}: {exc}"
        self._rows = rows
        self._segment = hashlib.sha256()
        return None

    def _hash_rows(self, lo: int, hi: int) -> str:
        h = hashlib.sha256()
        for name in COORDS:
            ds = self.fh[name]
            if name in ("prompt_id", "position_label"):
                _hash_strings(h, list(ds.asstr()[lo:hi]))
            else:
                h.update(np.ascontiguousarray(ds[lo:hi]).tobytes())
        for site in self.widths:
            h.update(np.ascontiguousarray(self.fh[site][lo:hi]).tobytes())
        return h.hexdigest()

    def append(self, coords: dict[str, Any], acts: dict[str, np.ndarray]) -> None:
        """Buffer a batch of rows; they reach the file on :meth:`write` / :meth:`commit`."""
        n = len(coords["prompt_id"])
        if n == 0:
            return
        self._buf.append((coords, acts))
        self._buf_rows += n
        self._buf_bytes += sum(a.nbytes for a in acts.values())

    @property
    def buffered_bytes(self) -> int:
        return self._buf_bytes

    @property
    def rows(self) -> int:
        """Rows written or buffered so far."""
        return self._rows + self._buf_rows

    def write(self) -> None:
        """Write the buffered rows (one resize + one write per dataset), hashing them."""
        if not self._buf:
            return
        lo, hi = self._rows, self._rows + self._buf_rows
        h = self._segment
        for name in COORDS:
            parts = [c[name] for c, _ in self._buf]
            ds = self._dataset(name)
            if name in ("prompt_id", "position_label"):
                col: Any = [str(x) for p in parts for x in p]
                _hash_strings(h, col)
            else:
                col = np.ascontiguousarray(np.concatenate(parts), dtype=ds.dtype)
                h.update(col.tobytes())
            ds.resize(hi, axis=0)
            ds[lo:hi] = col
        for site in self.widths:
            block = np.ascontiguousarray(np.concatenate([a[site] for _, a in self._buf]),
                                         dtype=self.dtype)
            h.update(block.tobytes())
            ds = self._dataset(site)
            ds.resize(hi, axis=0)
            ds[lo:hi] = block
        self._rows = hi
        self._buf, self._buf_rows, self._buf_bytes = [], 0, 0

    def _dataset(self, name: str) -> Any:
        """The open dataset ``name``, kept open: closing one flushes its chunk cache, and a
        flush that fails there (a full disk) cannot be reported, only ignored."""
        if name not in self._open:
            self._open[name] = self.fh[name]
        return self._open[name]

    def _check_space(self) -> None:
        """Refuse to write a commit the disk has no room for, before HDF5 tries.

        HDF5 cannot recover from a failed write (later calls fail or crash); what a commit
        needs is about its buffered rows plus one new chunk per dataset.
        """
        import errno
        import shutil

        need = self._buf_bytes + (1 << 16)
        for name in self._open or [*COORDS, *self.widths]:
            ds = self.fh[name]
            chunk = ds.chunks or ds.shape
            need += int(np.prod(chunk)) * (16 if ds.dtype.kind == "O" else ds.dtype.itemsize)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(self.fh.filename))).free
        if free < need:
            raise _NoRoom(errno.ENOSPC, f"{free} bytes free, a commit needs about {need}")

    def commit(self) -> str:
        """Write buffered rows and flush everything to disk (HDF5 flush, then fsync).

        Returns the sha256 of the rows written since the last commit (for the journal).
        A failed write (a full disk) is a runtime error naming the file.
        """
        try:
            self._check_space()
            self.write()
            self.fh.flush()
        except (OSError, RuntimeError) as exc:
            err = write_error(self.fh.filename, exc, RESUMABLE)
            # HDF5 wrote part of the commit: the file cannot be closed safely any more
            self.broken = err.hard_exit = not isinstance(exc, _NoRoom)
            raise err from None
        try:
            os.fsync(self.fh.id.get_vfd_handle())
        except (OSError, ValueError, TypeError):  # pragma: no cover - unusual drivers
            pass
        digest = self._segment.hexdigest()
        self._segment = hashlib.sha256()
        return digest


class _NoRoom(OSError):
    """Not enough free space for a commit (found before HDF5 wrote anything)."""


def _hash_strings(h: Any, values: list[str]) -> None:
    for v in values:
        b = v.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)


__all__ = ["COORDS", "ActsWriter", "Journal"]
