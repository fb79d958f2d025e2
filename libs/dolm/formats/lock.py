"""One run per output: an advisory lock beside every output file.

``output_locks([("--output", path), ...], run)`` takes an exclusive ``flock`` on
``<folder>/.<name>.lock`` for each output before the tool writes anything, and holds it
until the run ends. A second run on the same output is refused at once (exit 3) with a
message naming the output and the run that holds it (tool, pid, start time). The
kernel drops the lock when a process dies, so a killed run never leaves a stale lock: the
next run takes it over.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dolm.errors import InputError


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of an output: ``.<name>.lock`` in the output's folder."""
    p = Path(path)
    return p.parent / f".{p.name}.lock"


def _holder(lock: Path, tries: int = 20) -> str:
    """Who holds ``lock``. The holder writes its details just after taking the lock, so
    a run refused in that instant retries the read for up to ~0.5 s."""
    import time

    info: dict = {}
    for i in range(tries):
        try:
            info = json.loads(lock.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if info:
            break
        if i + 1 < tries:
            time.sleep(0.025)
    if not info:
        return "another run"
    return (f"dolm-{info.get('tool', '?')} (pid {info.get('pid', '?')}, run "
            f"{info.get('run', '?')}, started {info.get('started', '?')})")


def _acquire(option: str, path: str, info: dict[str, Any]) -> tuple[int, Path]:
    import fcntl

    lock = lock_path(path)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise InputError(f"{option} {path}: cannot create the lock file {lock}: "
                             f"{exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"{option} {path}: another run is writing this output: "
                             f"{_holder(lock)}; wait for it to finish or choose another "
                             "output") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its previous holder removed meanwhile
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
            return fd, lock
        os.close(fd)


@contextlib.contextmanager
def output_locks(outputs: list[tuple[str, str]], run: Any = None) -> Iterator[None]:
    """Hold an exclusive lock on each ``(option, path)`` output for the block's duration.

    ``-`` (stdout) and empty paths are skipped; the same file named twice is locked once.
    """
    info = {"pid": os.getpid(), "tool": getattr(run, "tool", None),
            "run": getattr(run, "id", None), "started": getattr(run, "started", None)}
    held: list[tuple[int, Path]] = []
    seen: set[str] = set()
    try:
        for option, path in outputs:
            if not path or str(path) == "-":
                continue
            key = os.path.realpath(path)
            if key in seen:
                continue
            seen.add(key)
            held.append(_acquire(option, str(path), info))
        yield
    finally:
        for fd, lock in reversed(held):
            with contextlib.suppress(OSError):
                lock.unlink()
            os.close(fd)


__all__ = ["lock_path", "output_locks"]
