"""Shared machinery for the prompt task families: the Family/Option types and row helpers.

A family is a seeded generator of rows of the ``prompts`` table (docs/CONVENTIONS.md).
Every row carries the core columns (``CORE_COLUMNS``) plus ``text``: the full training
string (prompt + continuation) the toy-model trainer uses. Family-specific columns follow.

Train/eval separation: each family reserves its evaluation items by a hash of the item
(``reserved``) so that the split does not depend on the seed: eval draws only reserved
items, train never does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from dolm.errors import InputError

CORE_COLUMNS = [
    "prompt_id",
    "family",
    "prompt",
    "target",
    "foil",
    "choices",
    "cf_prompt",
    "cf_target",
    "cf_foil",
    "spans",
    "cf_spans",
    "group_id",
    "split",
    "text",
]

SPLITS = ("eval", "train")

# Option types understood by the gen-prompts CLI (and by ``Family.coerce``).
OPTION_TYPES = ("int", "float", "bool", "str", "choice", "int_list", "float_list", "str_list")


@dataclass(frozen=True)
class Option:
    """One family option, described so that a CLI can build a flag from it.

    ``name`` is the python keyword (``n_draws``); the CLI flag is ``--n-draws``.
    ``type`` is one of ``OPTION_TYPES``; list types are given on the command line as
    comma-separated values (``--distractors 0,1,2``). ``choices`` restricts ``choice``
    and ``str_list`` values.
    """

    name: str
    type: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def coerce(self, value: Any) -> Any:
        """Parse/check a value (a python value or a CLI string); InputError names the option."""
        if value is None:
            return None
        try:
            out = _coerce(self.type, value)
        except (TypeError, ValueError) as e:
            expected = _describe(self.type)
            raise InputError(f"{self.flag}: expected {expected}, found {value!r}") from e
        if self.choices is not None:
            vals = out if isinstance(out, list) else [out]
            bad = [v for v in vals if v not in self.choices]
            if bad:
                raise InputError(
                    f"{self.flag}: expected one of {', '.join(self.choices)}, found {bad[0]!r}"
                )
        return out


def _describe(kind: str) -> str:
    names = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
             "choice": "a string"}
    if kind.endswith("_list"):
        item = kind[: -len("_list")]
        return "comma-separated " + {"int": "integers", "float": "numbers"}.get(item, "values")
    return names.get(kind, kind)


def _coerce(kind: str, value: Any) -> Any:
    if kind == "int":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "bool":
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        return bool(value)
    if kind in ("str", "choice"):
        return str(value)
    if kind.endswith("_list"):
        item = kind[: -len("_list")]
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip() != ""]
        elif isinstance(value, (list, tuple)):
            parts = list(value)
        else:
            parts = [value]
        if not parts:
            raise ValueError(value)
        return [_coerce(item, p) for p in parts]
    raise ValueError(f"unknown option type {kind}")


@dataclass
class Family:
    """A prompt task family: ``generate(split, seed, **options) -> DataFrame``.

    ``options`` describes the keyword options (name, type, default, help) so a CLI can
    expose them; ``generate`` fills defaults, checks values (``InputError`` naming the
    option) and calls the family function ``fn(split=..., seed=..., tokenizer=..., **opts)``.
    """

    name: str
    help: str
    options: list[Option]
    fn: Callable[..., pd.DataFrame] = field(repr=False)
    columns: dict[str, str] = field(default_factory=dict)  # family column -> description

    def option(self, name: str) -> Option:
        for o in self.options:
            if o.name == name:
                return o
        raise KeyError(name)

    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}

    def generate(self, split: str = "eval", seed: int = 0, tokenizer: Any = None, **options):
        if split not in SPLITS:
            raise InputError(f"--split: expected one of eval, train, found {split!r}")
        known = {o.name: o for o in self.options}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise InputError(
                f"family {self.name}: unknown option {unknown[0]!r}; "
                f"expected one of {', '.join(sorted(known))}"
            )
        opts = {}
        for name, opt in known.items():
            value = options.get(name, opt.default)
            opts[name] = opt.coerce(value)
        df = self.fn(split=split, seed=int(seed), tokenizer=tokenizer, **opts)
        return finish_table(df, self.name, split)


# ----------------------------------------------------------------------------- helpers


def rng_for(seed: int, family: str, split: str, *extra: Any) -> np.random.Generator:
    """A numpy Generator whose stream depends on (seed, family, split, extra)."""
    key = "|".join([family, split, *map(str, extra)])
    words = np.frombuffer(hashlib.sha256(key.encode()).digest()[:16], dtype=np.uint32)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), *words])))


def stable_hash(key: str) -> int:
    """A seed-independent 64-bit hash of a string (for train/eval reservation)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def reserved(key: str, fraction: float) -> bool:
    """True if the item named ``key`` is reserved for the eval split."""
    return (stable_hash(key) % 1_000_003) < fraction * 1_000_003


def span_of(text: str, part: str, start: int = 0) -> list[int]:
    """[start, end) of the first occurrence of ``part`` in ``text`` at or after ``start``."""
    i = text.find(part, start)
    if i < 0:
        raise ValueError(f"{part!r} not in {text!r}")
    return [i, i + len(part)]


def spans_json(spans: dict[str, Sequence[int]] | None) -> str | None:
    if spans is None:
        return None
    return json.dumps({k: [int(v[0]), int(v[1])] for k, v in spans.items()}, sort_keys=False)


def token_count(tokenizer: Any, text: str) -> int:
    """Number of tokens of ``text`` (no special tokens) for an HF tokenizer or a callable."""
    if callable(getattr(tokenizer, "encode", None)):
        try:
            return len(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return len(tokenizer.encode(text))
    if callable(tokenizer):
        out = tokenizer(text)
        return len(out) if not isinstance(out, int) else out
    raise TypeError("tokenizer must have .encode or be callable")


_WORDISH = None


def simple_token_count(text: str) -> int:
    """A tokenizer-free length: words, numbers digit by digit, punctuation marks."""
    import re

    global _WORDISH
    if _WORDISH is None:
        _WORDISH = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]")
    return len(_WORDISH.findall(text))


def finish_table(df: pd.DataFrame | list[dict], family: str, split: str) -> pd.DataFrame:
    """Put the core columns first (filling missing ones with nulls) and check ids."""
    if not isinstance(df, pd.DataFrame):
        df = pd.DataFrame(list(df))
    df = df.copy()
    n = len(df)
    for col in CORE_COLUMNS:
        if col not in df.columns:
            df[col] = [None] * n
    if n and df["family"].isna().all():
        df["family"] = family
    df["split"] = df["split"].fillna(split) if n else df["split"]
    if n and df["text"].isna().any():
        miss = df["text"].isna()
        df.loc[miss, "text"] = [
            (p or "") + (t or "")
            for p, t in zip(df.loc[miss, "prompt"], df.loc[miss, "target"], strict=True)
        ]
    extra = [c for c in df.columns if c not in CORE_COLUMNS]
    df = df[CORE_COLUMNS + extra].reset_index(drop=True)
    if df["prompt_id"].duplicated().any():
        dup = df.loc[df["prompt_id"].duplicated(), "prompt_id"].iloc[0]
        raise InputError(f"prompt_id: expected unique ids, found {dup!r} twice")
    return df


def training_text(row: Any) -> str:
    """The full training string of a prompts row: its ``text`` column, else prompt + target."""
    get = row.get if hasattr(row, "get") else (lambda k, d=None: getattr(row, k, d))
    text = get("text", None)
    if isinstance(text, str):
        return text
    prompt = get("prompt", "") or ""
    target = get("target", "") or ""
    return prompt + target
