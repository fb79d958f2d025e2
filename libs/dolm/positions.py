"""The one ``--positions`` language: which token positions a tool acts on or reads.

A spec is one of (the union every tool draws from)::

    all             every prompt token
    last            the last prompt token
    3 | -1 | 0,2,-1 integers, comma-separated; negative counts from the end (-1 = last)
    span:NAME       every token overlapping the span NAME of the prompts' ``spans`` column
    NAME            the same (where a tool allows bare span names)
    NAME_first      the first token of span NAME
    NAME_last       the last token of span NAME

:func:`parse_spec` parses one spec into a :class:`PositionSpec`; :func:`parse_positions`
is the single-spec form of the intervention tools (patch, ablate, lens) and
:func:`parse_specs` the list form (collect-acts). :func:`resolve` turns a spec into token
positions of one prompt from its token count, character offsets and spans;
:func:`parse_spans` reads a ``spans`` cell and :func:`span_tokens` maps a character span to
tokens; :func:`token_mask` resolves one spec against every row of an encoding (the
(rows, T) mask an intervention writes through). This module depends on nothing but
:mod:`dolm.errors` and :func:`dolm.metrics.is_missing`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dolm.errors import InputError
from dolm.metrics import is_missing

BUILTIN = ("last", "all")
_INT = re.compile(r"[+-]?\d+")
_NAME = re.compile(r"[A-Za-z_][\w-]*")


@dataclass(frozen=True)
class PositionSpec:
    """A parsed spec: ``kind`` is ``all``, ``last``, ``ints`` (``ints`` holds them),
    ``span``, ``span_first`` or ``span_last`` (``name`` holds the span name);
    ``text`` is the spec as given."""

    kind: str
    text: str
    ints: tuple[int, ...] = ()
    name: str | None = None


def parse_spec(spec: str | None, option: str = "--positions") -> PositionSpec:
    """One spec of the language above (empty means ``all``).

    A bare ``NAME`` is a span; ``NAME_first``/``NAME_last`` are parsed as the first/last
    token of ``NAME`` (:func:`resolve` falls back to a span literally named so).
    """
    v = (spec or "all").strip()
    if v.lower() in BUILTIN:
        return PositionSpec(v.lower(), v)
    ints = _ints(v)
    if ints:
        return PositionSpec("ints", v, ints=ints)
    if v.startswith("span:"):
        name = v[5:].strip()
        if not name:
            raise InputError(f"{option}: expected span:NAME, found 'span:'")
        return PositionSpec("span", v, name=name)
    name = v
    if not _NAME.fullmatch(name):
        raise InputError(f"{option}: {v!r} is not a position spec; expected all, last, "
                         "comma-separated integers (negative = from the end), span:NAME, "
                         "NAME_first or NAME_last")
    for suffix in ("_first", "_last"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return PositionSpec(f"span{suffix}", v, name=name[: -len(suffix)])
    return PositionSpec("span", v, name=name)


def _ints(v: str) -> tuple[int, ...] | None:
    """Comma-separated integers (empty items ignored), or None if any item is not one."""
    parts = [p.strip() for p in v.split(",") if p.strip()]
    if not parts or not all(_INT.fullmatch(p) for p in parts):
        return None
    return tuple(int(p) for p in parts)


def parse_positions(
    value: str | None, *, allow_span: bool = False, option: str = "--positions"
) -> tuple[str, list[int] | str | None]:
    """``all`` | ``last`` | comma-separated ints (negative = from the end) | ``span:NAME``.

    Returns ``("all", None)``, ``("last", None)``, ``("list", [ints])`` or, only with
    ``allow_span``, ``("span", NAME)``. Empty means ``all``; ``all``/``last`` are
    case-insensitive. Anything else raises :class:`~dolm.errors.InputError` naming ``option``
    and what it accepts (``span:NAME`` only where it is allowed).
    """
    v = (value or "all").strip()
    accepted = "all, last, span:NAME or" if allow_span else "all, last or"
    expected = f"{accepted} comma-separated integers (negative = from the end)"
    if allow_span and v.startswith("span:"):
        s = parse_spec(v, option)
        return "span", s.name
    try:
        s = parse_spec(v, option)
    except InputError:
        s = None
    if s is not None and s.kind in BUILTIN:
        return s.kind, None
    if s is not None and s.kind == "ints":
        return "list", list(s.ints)
    parts = [p.strip() for p in v.split(",") if p.strip()]
    if not parts:
        raise InputError(f"{option}: expected at least one integer")
    bad = next(p for p in parts if not _INT.fullmatch(p))
    raise InputError(f"{option}: expected {expected}, found {bad!r}")


def parse_specs(value: str | Sequence[str] | None, option: str = "--positions") -> list[str]:
    """``"last,subject_last"`` (or repeated options) -> ["last", "subject_last"]: a list of
    specs, each one token position set (integers are one spec each)."""
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
    """Whether any spec names a span (and so needs the prompts' spans and offsets)."""
    return any(parse_spec(s).kind.startswith("span") for s in specs)


def parse_spans(value: Any, prompt_id: str, where: str, *, column: str = "spans",
                strict: bool = False) -> dict[str, tuple[int, int]]:
    """A ``spans`` cell (JSON object, or a dict: name -> [start, end) character offsets)
    as a dict; {} when null. ``strict``: every span must be two integers with start <=
    end (a span that is written back or compared, as dolm-patch does), not merely
    convertible to them."""
    if is_missing(value):
        return {}
    where = f"{where}: column {column!r} of prompt {prompt_id!r}"
    try:
        obj = json.loads(value) if isinstance(value, str) else dict(value)
        out = {}
        for name, se in obj.items():
            if strict and (not isinstance(se, (list, tuple)) or len(se) != 2
                           or not all(isinstance(x, int) and not isinstance(x, bool)
                                      for x in se) or se[0] > se[1]):
                raise InputError(f"{where}: span {name!r} must be [start, end) with start "
                                 f"<= end, found {se!r}")
            start, end = int(se[0]), int(se[1])
            out[str(name)] = (start, end)
        return out
    except (ValueError, TypeError, KeyError, IndexError):
        raise InputError(
            f"{where}: expected a JSON object name -> [char_start, char_end), found {value!r}"
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
    s = parse_spec(spec, option)
    if s.kind == "last":
        return np.array([n_tokens - 1], dtype=np.int64)
    if s.kind == "all":
        return np.arange(n_tokens, dtype=np.int64)
    if s.kind == "ints":
        out = sorted({q + n_tokens if q < 0 else q for q in s.ints})
        if out[0] < 0 or out[-1] >= n_tokens:
            raise InputError(f"{option} {spec}: out of range for prompt {prompt_id!r} "
                             f"({n_tokens} tokens)")
        return np.array(out, dtype=np.int64)
    name, pick = s.name, s.kind[5:] or None
    if pick and spec in spans:  # a span literally named NAME_first / NAME_last
        name, pick = spec, None
    if name not in spans:
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


def token_mask(enc: Any, spec: str, spans: Sequence[dict] | None = None,
               option: str = "--positions") -> np.ndarray:
    """(rows, T) bool: the positions one spec selects in each row of ``enc`` (a
    :class:`dolm.models.Encoding`: ``input_ids``, ``lengths``, ``offsets``, ``names``);
    ``spans``: each row's spans (:func:`parse_spans`), needed by span specs only."""
    n, t = enc.input_ids.shape
    out = np.zeros((n, t), dtype=bool)
    is_span = parse_spec(spec, option).kind.startswith("span")
    if is_span and getattr(enc, "offsets", None) is None:
        raise InputError(f"{option} {spec}: the tokenizer gives no character offsets; span "
                         "positions are unusable")
    for i, length in enumerate(enc.lengths):
        off = np.asarray(enc.offsets[i]).reshape(-1, 2) if is_span else None
        pos = resolve(spec, int(length), off, spans[i] if spans else {}, str(enc.names[i]),
                      option)
        out[i, pos] = True
    return out


__all__ = ["BUILTIN", "PositionSpec", "needs_spans", "parse_positions", "parse_spec",
           "parse_spans", "parse_specs", "resolve", "span_tokens", "token_mask"]
