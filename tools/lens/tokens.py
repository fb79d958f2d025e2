"""The tokens a lens reads out per prompt: the target, the choices, the intended choice.

Every token must be exactly one token of the model's tokenizer (``--first-token`` takes
the first token of a longer string instead); anything else is an :class:`InputError`
naming the file, prompt and column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dolm.errors import InputError


@dataclass
class PromptTokens:
    """Per prompt: target id (or None), choice ids (or None), intended choice index."""

    target: list[int | None]
    choices: list[list[int] | None]
    intended: list[int | None]


def _is_null(v: Any) -> bool:
    if v is None or type(v).__name__ == "NAType":
        return True
    return isinstance(v, float) and v != v


def one_token(lm: Any, s: str, where: str, first_token: bool, cache: dict) -> int:
    """The id of ``s`` (one token, or its first token with ``first_token``)."""
    key = (s, first_token)
    if key in cache:
        return cache[key]
    try:
        if first_token:
            tid = lm.choice_token_ids([s], first_token=True)[0]
        else:
            tid = lm.token_id(s)
    except InputError as exc:
        hint = "" if first_token else " (or pass --first-token to use its first token)"
        raise InputError(f"{where}: {exc}{hint}") from None
    cache[key] = int(tid)
    return int(tid)


def resolve(
    lm: Any,
    df: Any,
    path: str,
    *,
    target: str | None = None,
    first_token: bool = False,
) -> PromptTokens:
    """Token ids of each prompt's target and choices; ``target`` overrides the column."""
    cache: dict = {}
    targets: list[int | None] = []
    choices: list[list[int] | None] = []
    intended: list[int | None] = []
    has_choices = "choices" in df.columns
    has_intended = "intended_option" in df.columns
    for i, row in enumerate(df.itertuples(index=False)):
        pid = str(row.prompt_id)
        t = target if target is not None else getattr(row, "target", None)
        if _is_null(t):
            tid = None
        else:
            where = f"--target {t!r}" if target is not None else \
                f"{path}: prompt {pid}, column 'target'"
            tid = one_token(lm, str(t), where, first_token, cache)
        targets.append(tid)
        ch = row.choices if has_choices else None
        cids = None
        if ch is not None and not _is_null(ch) and len(ch) >= 2:
            ch = [str(c) for c in ch]
            try:
                cids = [int(x) for x in lm.choice_token_ids(ch, first_token=first_token)]
            except InputError as exc:
                hint = "" if first_token else " (--first-token uses each choice's first token)"
                raise InputError(f"{path}: prompt {pid}, column 'choices': {exc}{hint}") from None
        choices.append(cids)
        ix = None
        if cids is not None:
            if tid is not None and tid in cids:
                ix = cids.index(tid)
            elif has_intended and not _is_null(df["intended_option"].iloc[i]):
                k = int(df["intended_option"].iloc[i]) - 1
                ix = k if 0 <= k < len(cids) else None
        intended.append(ix)
    return PromptTokens(target=targets, choices=choices, intended=intended)
