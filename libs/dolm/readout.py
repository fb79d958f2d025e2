"""The one prompt reader: what a prompts table's cells mean to every tool that reads them.

- a missing cell: :func:`dolm.metrics.is_missing` (None, NaN, pandas NA, NaT);
- a target/foil/choice string -> token id: :func:`dolm.metrics.first_token` (first token)
  or :class:`dolm.tokens.TokenIds` (exactly one token, or ``--first-token``);
- the token ids a metric reads: :func:`dolm.metrics.ids_matrix`, and the logit reads every
  metric is computed from: :func:`dolm.metrics.read_logits`;
- ``intended_option``: :func:`intended_choice` (below), the one meaning of the column.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dolm.metrics import first_token, ids_matrix, is_missing, read_logits

__all__ = ["first_token", "ids_matrix", "intended_choice", "is_missing", "read_logits"]


def _as_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def intended_choice(value: Any, options: Sequence[str] | None,
                    extra: Sequence[str] = ()) -> str | None:
    """The option ``intended_option`` names, or None.

    The one meaning (also in ``schemas/prompts.v1.schema.json``): the value names one of
    the row's options by its **text** (compared without surrounding whitespace: 1 names
    the choice ``" 1"``), else by its **1-based position** in ``choices`` (2 names the
    second choice). ``options`` are the row's choices; ``extra`` strings (target, foil)
    may also be named by text. A missing value, or one naming nothing, gives None.
    """
    if is_missing(value):
        return None
    text = _as_text(value)
    choices = [str(c) for c in (options or [])]
    for c in choices + [str(x) for x in extra if x]:
        if c.strip() == text:
            return c
    if choices and text.isdigit() and 1 <= int(text) <= len(choices):
        return choices[int(text) - 1]
    return None
