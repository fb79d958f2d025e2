"""Durable, resumable storage for a collect-acts run.

Two partial files live beside the outputs while a run is going:

* ``<output>.partial`` — the outcomes *journal*: JSON lines. Line 1 is a header with the
  run's fingerprint (prompts hash, model, options, shard). Then one ``{"row": {...}}``
  line per prompt, and at every commit a ``{"commit": n_done, "acts_rows": r}`` line.
  Only rows before the last commit line count; a torn tail is cut off on resume.
* ``<acts>.partial`` — the activations HDF5 file (``dolm.formats.open_h5_for_write``),
  flushed and fsynced at every commit *before* the journal's commit line is written, so
  the journal never claims rows the HDF5 file does not hold.

Rows are buffered in memory between commits (bounded in bytes by the caller). A commit
happens at batch boundaries, at most every ``DOLM_COMMIT_SECONDS`` (default 2) seconds or
when the buffer is full, and at the end.

On ``--resume`` both are reopened, the HDF5 datasets are cut back to the journal's
``acts_rows`` and work continues at prompt ``n_done``. Python floats round-trip exactly
through JSON, so the finished table equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from dolm.errors import InputError

JOURNAL_KIND = "dolm-collect-acts journal"
COORDS = ("prompt_id", "prompt_index", "position", "position_label", "token_id")


class Journal:
    """Append-only JSON-lines log of finished outcome rows with commit marks."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict[str, Any]):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.n_done = 0
        self.acts_rows = 0
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

    def resume(self) -> bool:
        """Reopen an existing journal; False when there is none (or nothing was committed).

        A journal from a run with another fingerprint is an error naming what differs.
        """
        if not self.path.exists():
            return False
        end = 0
        n_done = acts_rows = 0
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
                    n_done, acts_rows = int(obj["commit"]), int(obj["acts_rows"])
                    end = fh.tell()
        with open(self.path, "r+b") as fh:
            fh.truncate(end)
        self._fh = open(self.path, "a", encoding="utf-8")
        self.n_done, self.acts_rows = n_done, acts_rows
        return True

    # -- writing
    def append(self, rows: list[dict[str, Any]]) -> None:
        """Buffer a batch of finished rows (written by the next :meth:`commit`)."""
        self._pending += [json.dumps({"row": r}) for r in rows]

    def commit(self, acts_rows: int) -> None:
        """Write the buffered rows and a commit mark, then flush + fsync."""
        n = len(self._pending)
        self.n_done += n
        self.acts_rows = acts_rows
        self._pending.append(json.dumps({"commit": self.n_done, "acts_rows": acts_rows}))
        self._fh.write("\n".join(self._pending) + "\n")
        self._pending = []
        self._sync()

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

    def reopen(self, rows: int) -> bool:
        """Reuse datasets written by an interrupted run, cut back to ``rows`` rows.

        False when the file does not hold what the journal says (then start over).
        """
        fh = self.fh
        names = [*COORDS, *self.widths]
        for name in names:
            if name not in fh or fh[name].shape[0] < rows:
                return False
        for site, width in self.widths.items():
            ds = fh[site]
            if ds.dtype != self.dtype or ds.shape[1] != width:
                return False
        for name in names:
            ds = fh[name]
            ds.resize(rows, axis=0)
        self._rows = rows
        return True

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
        """Write the buffered rows (one resize + one write per dataset)."""
        if not self._buf:
            return
        lo, hi = self._rows, self._rows + self._buf_rows
        for name in COORDS:
            parts = [c[name] for c, _ in self._buf]
            if isinstance(parts[0], list):
                col: Any = [x for p in parts for x in p]
            else:
                col = np.concatenate(parts)
            ds = self.fh[name]
            ds.resize(hi, axis=0)
            ds[lo:hi] = col
        for site in self.widths:
            block = np.concatenate([a[site] for _, a in self._buf])
            ds = self.fh[site]
            ds.resize(hi, axis=0)
            ds[lo:hi] = block
        self._rows = hi
        self._buf, self._buf_rows, self._buf_bytes = [], 0, 0

    def commit(self) -> None:
        """Write buffered rows and flush everything to disk (HDF5 flush, then fsync)."""
        self.write()
        self.fh.flush()
        try:
            os.fsync(self.fh.id.get_vfd_handle())
        except (OSError, ValueError, TypeError):  # pragma: no cover - unusual drivers
            pass


__all__ = ["COORDS", "ActsWriter", "Journal"]
