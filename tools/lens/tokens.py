"""The tokens a lens reads out per prompt: the target, the choices, the intended choice.

Every token must be exactly one token of the model's tokenizer (``--first-token`` takes
the first token of a longer string instead); anything else is an :class:`InputError`
naming the file, prompt and column (lookups: :mod:`dolm.tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dolm.errors import InputError
from dolm.metrics import is_missing
from dolm.readout import intended_choice
from dolm.tokens import TokenIds


@dataclass
class PromptTokens:
    """Per prompt: target id (or None), choice ids (or None), intended choice index."""

    target: list[int | None]
    choices: list[list[int] | None]
    intended: list[int | None]


def resolve(
    lm: Any,
    df: Any,
    path: str,
    *,
    target: str | None = None,
    first_token: bool = False,
) -> PromptTokens:
    """Token ids of each prompt's target and choices; ``target`` overrides the column."""
    ids = TokenIds(lm, first_token)
    targets: list[int | None] = []
    choices: list[list[int] | None] = []
    intended: list[int | None] = []
    has_choices = "choices" in df.columns
    has_intended = "intended_option" in df.columns
    for i, row in enumerate(df.itertuples(index=False)):
        pid = str(row.prompt_id)
        _, tid = ids.cell(row, "target", target, path)
        targets.append(tid)
        ch = row.choices if has_choices else None
        cids = None
        if ch is not None and not is_missing(ch) and len(ch) >= 2:
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
            elif has_intended:
                named = intended_choice(df["intended_option"].iloc[i], ch)
                ix = None if named is None else ch.index(named)
        intended.append(ix)
    return PromptTokens(target=targets, choices=choices, intended=intended)
