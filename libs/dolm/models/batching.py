"""Batch loops that back off on out-of-memory errors.

``iter_batched(n_items, fn, batch_size)`` calls ``fn(start, stop)`` on consecutive
slices covering ``range(n_items)`` and yields ``(start, stop, result)`` as each batch
finishes (so results can be written batch by batch). On a torch out-of-memory error
(CUDA ``OutOfMemoryError``, MPS, or a CPU ``RuntimeError`` mentioning "not enough
memory"/``DefaultCPUAllocator``) the batch size is halved and the same slice retried;
the smaller size is kept for the rest. ``batch_size="auto"`` starts at
``min(max_batch_size, n_items)``; an integer starts there (a warning goes to stderr
when it has to shrink). At batch size 1 the error is re-raised as DolmRuntimeError.
``run_batched`` is the same, returning the list of results. ``pad_right`` turns token id
lists into one right-padded batch.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from dolm.errors import DolmRuntimeError, InputError

_OOM_TEXT = ("out of memory", "not enough memory", "defaultcpuallocator",
             "can't allocate memory", "cannot allocate memory", "failed to allocate")


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error from torch (any device)."""
    import torch

    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(
        torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc).lower()
        return any(t in msg for t in _OOM_TEXT)
    return False


def _free_memory():
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        mps = getattr(torch, "mps", None)
        if mps is not None and getattr(torch.backends, "mps", None) is not None \
                and torch.backends.mps.is_available():
            mps.empty_cache()
    except Exception:  # pragma: no cover
        pass


def parse_batch_size(batch_size) -> int | str:
    """``"auto"`` or a positive int (also from a string); InputError otherwise."""
    if batch_size == "auto" or batch_size is None:
        return "auto"
    try:
        value = int(batch_size)
    except (TypeError, ValueError):
        raise InputError(f"--batch-size: expected a positive integer or 'auto', "
                         f"found {batch_size!r}") from None
    if value < 1:
        raise InputError(f"--batch-size: expected a positive integer or 'auto', found {value}")
    return value


def iter_batched(n_items: int, fn: Callable[[int, int], object], batch_size="auto", *,
                 max_batch_size: int = 64, start: int = 0,
                 on_backoff: Callable[[int], None] | None = None,
                 cut: Callable[[int, int], int] | None = None) -> Iterator[tuple]:
    """Yield ``(start, stop, fn(start, stop))`` for consecutive slices (see module doc).

    ``start`` skips items already done (resume). ``on_backoff(new_size)`` is called
    whenever the batch size is halved. ``cut(i, size)``: where the batch starting at ``i``
    ends, at most ``size`` items (default ``i + size``), for callers that plan cheaper
    batch boundaries.
    """
    bs = parse_batch_size(batch_size)
    auto = bs == "auto"
    size = max(1, min(max_batch_size if auto else bs, max(n_items - start, 1)))
    i = start
    while i < n_items:
        stop = min(i + size, n_items)
        if cut is not None:
            stop = max(i + 1, min(stop, cut(i, size)))
        failed = None
        try:
            result = fn(i, stop)
        except Exception as exc:
            if not is_oom(exc):
                raise
            failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if failed is not None:
            _free_memory()
            if size == 1:
                raise DolmRuntimeError(f"out of memory at batch size 1 ({failed})")
            size = max(1, (stop - i) // 2)
            if not auto:
                print(f"dolm: out of memory; batch size reduced to {size}", file=sys.stderr)
            if on_backoff is not None:
                on_backoff(size)
            continue
        yield i, stop, result
        i = stop


def run_batched(n_items: int, fn: Callable[[int, int], object], batch_size="auto", *,
                max_batch_size: int = 64, on_backoff=None) -> list:
    """Results of ``fn(start, stop)`` over consecutive slices, in order (see module doc)."""
    return [r for _, _, r in iter_batched(n_items, fn, batch_size, max_batch_size=max_batch_size,
                                          on_backoff=on_backoff)]


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device: Any = None) -> tuple[Any, Any]:
    """Token id lists -> ``(input_ids, attention_mask)``, long tensors of shape
    ``(len(seqs), longest)``, each row padded with ``pad_id`` after its tokens (mask 0)."""
    import torch

    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask
