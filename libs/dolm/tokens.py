"""Token ids of the strings a prompts table names (target, foil, choices) for a readout.

Each string must be exactly one token of the model's tokenizer, or, with ``first_token``,
its first token is taken; anything else is an :class:`~dolm.errors.InputError` naming
where the string came from (an option, or the file, prompt and column).
"""

from __future__ import annotations

from typing import Any

from dolm.errors import InputError
from dolm.metrics import is_missing


class TokenIds:
    """Cached ``string -> id`` lookups for one model and one ``first_token`` setting."""

    def __init__(self, lm: Any, first_token: bool = False) -> None:
        self.lm = lm
        self.first_token = first_token
        self._cache: dict[str, int] = {}

    def __call__(self, s: str, where: str) -> int:
        """The id of ``s`` (one token, or its first token); InputError prefixed by ``where``."""
        if s not in self._cache:
            try:
                if self.first_token:
                    tid = self.lm.choice_token_ids([s], first_token=True)[0]
                else:
                    tid = self.lm.token_id(s)
            except InputError as exc:
                hint = "" if self.first_token else \
                    " (or pass --first-token to use its first token)"
                raise InputError(f"{where}: {exc}{hint}") from None
            self._cache[s] = int(tid)
        return self._cache[s]

    def cell(self, row: Any, column: str, override: str | None,
             path: str) -> tuple[str | None, int | None]:
        """``(string, id)`` of ``row.<column>``, or of ``override`` (``--<column>``) when given;
        ``(None, None)`` when that is missing."""
        v = override if override is not None else getattr(row, column, None)
        if is_missing(v):
            return None, None
        where = f"--{column} {v!r}" if override is not None else \
            f"{path}: prompt {row.prompt_id}, column '{column}'"
        return str(v), self(str(v), where)
