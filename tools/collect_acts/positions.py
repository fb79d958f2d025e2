"""Which token positions to read: ``--positions`` specs and named character spans -> tokens.

A spec is ``last`` (the last prompt token), ``all`` (every prompt token), a span name
from the prompts' ``spans`` column (every token overlapping it), or ``<span>_first`` /
``<span>_last`` (its first / last token). Spans are ``[char_start, char_end)`` in the
prompt text; tokens map to characters through the tokenizer's offsets.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from dolm.errors import InputError

BUILTIN = ("last", "all")


def parse_specs(value: str | Sequence[str] | None, option: str = "--positions") -> list[str]:
    """``"last,subject_last"`` (or repeated options) -> ["last", "subject_last"]."""
    if value is None:
        return ["last"]
    parts = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for part in parts:
        for spec in str(part).split(","):
            spec = spec.strip()
            if not spec:
                continue
            if not all(c.isalnum() or c in "_-" for c in spec):
                raise InputError(
                    f"{option}: {spec!r} is not a position spec; expected last, all, a span "
                    "name from the prompts' spans column, or <span>_first / <span>_last"
                )
            if spec not in out:
                out.append(spec)
    if not out:
        raise InputError(f"{option}: expected at least one position spec (e.g. last)")
    return out


def needs_spans(specs: Sequence[str]) -> bool:
    return any(s not in BUILTIN for s in specs)


def parse_spans(value: Any, prompt_id: str, where: str) -> dict[str, tuple[int, int]]:
    """The ``spans`` cell (JSON object name -> [start, end)) as a dict; {} when null."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return {}
    try:
        obj = json.loads(value) if isinstance(value, str) else dict(value)
        out = {}
        for name, se in obj.items():
            start, end = int(se[0]), int(se[1])
            out[str(name)] = (start, end)
        return out
    except (ValueError, TypeError, KeyError, IndexError):
        raise InputError(
            f"{where}: column 'spans' of prompt {prompt_id!r}: expected a JSON object "
            f"name -> [char_start, char_end), found {value!r}"
        ) from None


def span_tokens(offsets: np.ndarray, start: int, end: int) -> np.ndarray:
    """Indices of tokens whose character range overlaps ``[start, end)``.

    Tokens with an empty range (special tokens such as BOS) never match.
    """
    s = offsets[:, 0]
    e = offsets[:, 1]
    hit = (s < end) & (e > start) & (e > s)
    return np.nonzero(hit)[0]


def resolve(
    spec: str,
    n_tokens: int,
    offsets: np.ndarray | None,
    spans: dict[str, tuple[int, int]],
    prompt_id: str,
    option: str = "--positions",
) -> np.ndarray:
    """Token positions (ascending) selected by one spec for one prompt."""
    if spec == "last":
        return np.array([n_tokens - 1], dtype=np.int64)
    if spec == "all":
        return np.arange(n_tokens, dtype=np.int64)
    name, pick = spec, None
    if spec not in spans:
        for suffix in ("_last", "_first"):
            if spec.endswith(suffix) and spec[: -len(suffix)] in spans:
                name, pick = spec[: -len(suffix)], suffix[1:]
                break
    if name not in spans:
        for suffix in ("_last", "_first"):
            if spec.endswith(suffix) and len(spec) > len(suffix):
                name = spec[: -len(suffix)]
        have = ", ".join(sorted(spans)) or "none"
        raise InputError(
            f"{option} {spec}: prompt {prompt_id!r} has no span {name!r} "
            f"(its spans: {have}); expected last, all, a span name, or <span>_first/<span>_last"
        )
    start, end = spans[name]
    assert offsets is not None
    toks = span_tokens(offsets[:n_tokens], start, end)
    if len(toks) == 0:
        raise InputError(
            f"{option} {spec}: span {name!r} [{start}, {end}) of prompt {prompt_id!r} "
            "covers no token"
        )
    if pick == "last":
        return toks[-1:]
    if pick == "first":
        return toks[:1]
    return toks


__all__ = ["BUILTIN", "needs_spans", "parse_spans", "parse_specs", "resolve", "span_tokens"]
