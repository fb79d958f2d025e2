"""The ``--positions`` option of the intervention tools: which token positions to act on."""

from __future__ import annotations

from dolm.cli import parse_int_list
from dolm.errors import InputError


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
    if v.lower() in ("all", "last"):
        return v.lower(), None
    if allow_span and v.startswith("span:"):
        name = v[5:].strip()
        if not name:
            raise InputError(f"{option}: expected span:NAME, found 'span:'")
        return "span", name
    accepted = "all, last, span:NAME or" if allow_span else "all, last or"
    expected = f"{accepted} comma-separated integers (negative = from the end)"
    return "list", parse_int_list(v, option, expected)
