"""Column selection for table-driven tools: names and glob patterns given on the command line."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from dolm.errors import InputError


def expand_columns(spec: str | Sequence[str], columns: Sequence[str], option: str) -> list[str]:
    """Names or glob patterns (``attn_to.numbers.*``) -> column names, in order, deduplicated.

    ``spec`` is one string or a list of them (a repeated option); each may be comma-separated.
    A pattern that matches nothing, or a plain name not in ``columns``, raises
    :class:`~dolm.errors.InputError` naming ``option``.
    """
    items = [spec] if isinstance(spec, str) else spec
    columns = list(columns)
    out: list[str] = []
    for item in items:
        for part in (p.strip() for p in str(item).split(",")):
            if not part:
                continue
            if any(ch in part for ch in "*?["):
                hits = [c for c in columns if fnmatch.fnmatchcase(c, part)]
                if not hits:
                    raise InputError(f"{option}: pattern {part!r} matches no column")
                out += hits
            elif part not in columns:
                raise InputError(f"{option}: column {part!r} not in the table "
                                 f"(columns: {', '.join(columns[:30])})")
            else:
                out.append(part)
    return list(dict.fromkeys(out))
