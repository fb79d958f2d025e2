"""Provenance chains, like the @PG lines of a SAM header.

Every dolm file carries ``dolm.provenance``: the chain of its inputs' entries followed by
the entry of the tool run that wrote it (tool, version, argv, inputs with sha256, model
spec with revision and weights hash, seed, start time, duration).

Paths of the machine are not recorded: the executable by its name, a model folder relative
to the working folder (or as ``<hf-cache>/...`` inside the Hugging Face cache).
``DOLM_ABSOLUTE_PATHS=1`` keeps them absolute.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from dolm import __version__


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (never whole in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class FileMeta:
    """What dolm knows about a file it read: schema name/version, provenance, extra metadata."""

    path: str
    schema: str | None = None
    version: int | None = None
    provenance: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None

    def model_entry(self) -> dict[str, Any] | None:
        """The most recent model recorded in the provenance chain, if any."""
        for entry in reversed(self.provenance):
            if entry.get("model"):
                return entry["model"]
        return None


class Run:
    """One tool invocation: collects inputs, model and seed; produces the provenance chain."""

    def __init__(self, tool: str, argv: list[str] | None = None, seed: int | None = None):
        self.tool = tool
        self.argv = list(sys.argv if argv is None else argv)
        if self.argv and os.path.isabs(self.argv[0]) and not _absolute_paths():
            self.argv[0] = os.path.basename(self.argv[0])
        self.seed = seed
        self.id = uuid.uuid4().hex[:16]
        self.started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        self._t0 = time.monotonic()
        self.inputs: list[dict[str, Any]] = []
        self.model: dict[str, Any] | None = None
        self.params: dict[str, Any] = {}
        self._parents: list[dict[str, Any]] = []

    def add_input(self, path: str, meta: FileMeta | None = None, sha256: str | None = None) -> None:
        """Record an input file (path + sha256) and inherit its provenance chain."""
        digest = sha256 or (meta.sha256 if meta else None)
        if digest is None and path != "-" and os.path.isfile(path):
            digest = sha256_file(path)
        self.inputs.append({"path": str(path), "sha256": digest})
        if meta is not None:
            known = {e.get("id") for e in self._parents}
            for entry in meta.provenance:
                if entry.get("id") not in known:
                    self._parents.append(entry)
                    known.add(entry.get("id"))

    def set_model(self, info: dict[str, Any]) -> None:
        """Record the model spec, revision and weights hash used by this run."""
        self.model = {k: v for k, v in info.items() if _jsonable(v)}
        for key in ("spec", "path"):
            if isinstance(self.model.get(key), str):
                self.model[key] = portable_path(self.model[key])

    def entry(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tool": self.tool,
            "version": __version__,
            "argv": self.argv,
            "inputs": self.inputs,
            "model": self.model,
            "seed": self.seed,
            "params": {k: v for k, v in self.params.items() if _jsonable(v)},
            "started": self.started,
            "duration_s": round(time.monotonic() - self._t0, 3),
        }

    def chain(self) -> list[dict[str, Any]]:
        """The inputs' chains (deduplicated, in order) followed by this run's entry."""
        return [*self._parents, self.entry()]


def _absolute_paths() -> bool:
    return os.environ.get("DOLM_ABSOLUTE_PATHS", "") not in ("", "0")


def portable_path(path: str) -> str:
    """An absolute path as recorded in provenance: inside the Hugging Face cache as
    ``<hf-cache>/...``, elsewhere relative to the working folder; other strings as given."""
    if not os.path.isabs(path) or _absolute_paths():
        return path
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache",
                                                  "huggingface"), "hub")
    real, cache = os.path.realpath(path), os.path.realpath(cache)
    if real == cache or real.startswith(cache + os.sep):
        return "<hf-cache>/" + os.path.relpath(real, cache)
    try:
        return os.path.relpath(path)
    except ValueError:  # pragma: no cover - another drive on Windows
        return path


def _jsonable(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, list, dict))
