"""Input checks and encoding for dolm-psm: a unit table -> canonical arrays.

Everything a user can get wrong raises :class:`dolm.errors.InputError` (exit 3) naming the
column or option and what was expected. Rows are put in a canonical order (by ``--id`` if
given, else by the values of every column used), so that every later step, and therefore
every number in the output, is independent of the input's row order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from dolm.errors import InputError

MAX_LEVELS = 20  # a treatment with more distinct values is not categorical


@dataclass
class Design:
    """The covariate design: encoded columns and where each came from."""

    X: np.ndarray  # (n, p) float, one-hot for categorical (all levels, for balance)
    names: list[str]  # encoded column names, e.g. "age", "format[polite]"
    source: list[str]  # the covariate each encoded column came from
    binary: list[bool]  # encoded column takes only values 0/1
    drop_for_model: list[bool]  # first level of a categorical: left out of the propensity model


@dataclass
class Units:
    """The cleaned unit table in canonical order."""

    df: pd.DataFrame  # canonical order; column "_row" = 0-based row in the input file
    treatment: str
    outcome: str
    covariates: list[str]
    levels: list[Any]  # treatment levels, reference first
    reference: Any
    id_column: str | None
    design: Design
    dropped_na: dict[str, Any] = field(default_factory=dict)
    outcome_binary: bool = False


def _where(rows: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    more = f", ... ({len(rows) - limit} more)" if len(rows) > limit else ""
    return f"rows {shown}{more}"


def check_columns(df: pd.DataFrame, names: list[str], option: str, path: str) -> None:
    missing = [c for c in names if c not in df.columns]
    if missing:
        cols = ", ".join(map(str, df.columns[:30]))
        raise InputError(
            f"{option}: column(s) {', '.join(map(repr, missing))} not in {path} "
            f"(columns: {cols})"
        )


def treatment_levels(s: pd.Series, column: str, reference: str | None) -> tuple[list[Any], Any]:
    """Levels of a binary/categorical treatment, reference first; refuse anything else."""
    vals = s.dropna()
    if pd.api.types.is_bool_dtype(vals):
        levels = sorted(vals.unique().tolist())
    elif pd.api.types.is_numeric_dtype(vals):
        uniq = np.unique(vals.to_numpy())
        if pd.api.types.is_float_dtype(vals) and not np.all(np.equal(np.mod(uniq, 1), 0)):
            raise InputError(
                f"--treatment {column!r}: expected a binary or categorical column, found "
                f"continuous numbers ({len(uniq)} distinct values, e.g. {uniq[:3].tolist()})"
            )
        levels = uniq.tolist()
        if pd.api.types.is_float_dtype(vals):
            levels = [int(v) if float(v).is_integer() else v for v in levels]
    else:
        levels = sorted(map(str, vals.unique().tolist()))
    if len(levels) < 2:
        raise InputError(
            f"--treatment {column!r}: expected at least two levels, found {len(levels)} "
            f"({levels})"
        )
    if len(levels) > MAX_LEVELS:
        raise InputError(
            f"--treatment {column!r}: expected a binary or categorical column (at most "
            f"{MAX_LEVELS} levels), found {len(levels)} distinct values"
        )
    if reference is None:
        ref = levels[0]
    else:
        match = [lv for lv in levels if str(lv) == str(reference)]
        if not match:
            raise InputError(
                f"--reference {reference!r}: not a level of {column!r} "
                f"(levels: {', '.join(map(str, levels))})"
            )
        ref = match[0]
    return [ref] + [lv for lv in levels if lv != ref], ref


def _is_categorical(s: pd.Series) -> bool:
    return not (pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s))


def encode_covariates(df: pd.DataFrame, covariates: list[str]) -> Design:
    cols, names, source, binary, drop = [], [], [], [], []
    for c in covariates:
        s = df[c]
        if _is_categorical(s):
            lv = sorted(map(str, s.unique().tolist()))
            as_str = s.astype(str).to_numpy()
            for j, level in enumerate(lv):
                cols.append((as_str == level).astype(float))
                names.append(f"{c}[{level}]")
                source.append(c)
                binary.append(True)
                drop.append(j == 0)
        else:
            x = s.to_numpy(dtype=float)
            cols.append(x)
            names.append(str(c))
            source.append(c)
            binary.append(bool(np.all((x == 0) | (x == 1))))
            drop.append(False)
    X = np.column_stack(cols) if cols else np.zeros((len(df), 0))
    return Design(X=X, names=names, source=source, binary=binary, drop_for_model=drop)


def prepare(
    df: pd.DataFrame,
    treatment: str,
    outcome: str,
    covariates: list[str],
    *,
    path: str = "input",
    reference: str | None = None,
    id_column: str | None = None,
    dropna: bool = False,
    extra: dict[str, list[str]] | None = None,
) -> Units:
    """Check the table and return the units in canonical order with the encoded design.

    ``extra``: option -> further columns to keep and check for missing values (``--exact``,
    ``--mahvars``, ``--caliper-on``); they join the canonical sort keys after the covariates.
    """
    check_columns(df, [treatment], "--treatment", path)
    check_columns(df, [outcome], "--outcome", path)
    check_columns(df, covariates, "--covariates", path)
    extra_cols: list[str] = []
    for option, names in (extra or {}).items():
        check_columns(df, names, option, path)
        for c in names:
            if c in (treatment, outcome):
                raise InputError(f"{option}: {c!r} is the treatment or outcome column")
        extra_cols += names
    if id_column is not None:
        check_columns(df, [id_column], "--id", path)
    if not covariates:
        raise InputError("--covariates: expected at least one covariate to match on")
    for c in covariates:
        if c in (treatment, outcome):
            raise InputError(f"--covariates: {c!r} is the treatment or outcome column")
    used = list(dict.fromkeys([treatment, outcome, *covariates, *extra_cols]))
    work = df[used + ([id_column] if id_column and id_column not in used else [])].copy()
    work["_row"] = np.arange(len(df), dtype=np.int64)

    # missing values: say how many and where
    dropped: dict[str, Any] = {}
    nan_cols = {c: np.flatnonzero(work[c].isna().to_numpy()) for c in used}
    nan_cols = {c: rows for c, rows in nan_cols.items() if len(rows)}
    if nan_cols:
        if not dropna:
            parts = [f"column {c!r}: {len(r)} missing ({_where(r)})" for c, r in nan_cols.items()]
            raise InputError(
                f"{path}: missing values: " + "; ".join(parts) + "; pass --dropna to drop "
                "these rows (the number dropped is reported)"
            )
        bad = work[used].isna().any(axis=1).to_numpy()
        dropped = {
            "rows": int(bad.sum()),
            "by_column": {c: int(len(r)) for c, r in nan_cols.items()},
        }
        work = work.loc[~bad]
    if len(work) == 0:
        raise InputError(f"{path}: no rows left after dropping missing values")
    inf_cols = {c: work["_row"].to_numpy()[np.isinf(work[c].to_numpy(dtype=float))]
                for c in used if pd.api.types.is_numeric_dtype(work[c])
                and not pd.api.types.is_bool_dtype(work[c])}
    inf_cols = {c: rows for c, rows in inf_cols.items() if len(rows)}
    if inf_cols:
        parts = [f"column {c!r}: {len(r)} infinite ({_where(r)})" for c, r in inf_cols.items()]
        raise InputError(f"{path}: infinite values: " + "; ".join(parts) + "; expected finite "
                         "numbers")

    # outcome must be numeric (bool counts as 0/1)
    y = work[outcome]
    if pd.api.types.is_bool_dtype(y):
        work[outcome] = y.astype(float)
    elif not pd.api.types.is_numeric_dtype(y):
        raise InputError(
            f"--outcome {outcome!r}: expected a numeric or boolean column, found {y.dtype}"
        )
    for c in covariates:
        s = work[c]
        if pd.api.types.is_bool_dtype(s):
            work[c] = s.astype(float)
        num = pd.api.types.is_numeric_dtype(work[c])
        if num:
            v = work[c].to_numpy()
            nun = 2 if v.min() < v.max() else 1
        else:
            nun = work[c].nunique()
        if nun < 2:
            val = work[c].iloc[0] if len(work) else None
            raise InputError(
                f"--covariates: covariate {c!r} is constant (every value is {val!r}); "
                "remove it from the covariates"
            )
        if _is_categorical(work[c]) and nun > 100:
            raise InputError(
                f"--covariates: covariate {c!r} is text with {nun} distinct values; expected a "
                "numeric column or a categorical one with at most 100 levels"
            )

    levels, ref = treatment_levels(work[treatment], treatment, reference)
    if not (pd.api.types.is_numeric_dtype(work[treatment]) or
            pd.api.types.is_bool_dtype(work[treatment])):
        work[treatment] = work[treatment].astype(str)

    # canonical order: by id, else by every used value (then original row for exact ties)
    if id_column is not None:
        if work[id_column].duplicated().any():
            dup = work.loc[work[id_column].duplicated(), id_column].iloc[0]
            raise InputError(f"--id {id_column!r}: expected unique ids, found {dup!r} twice")
        keys = [id_column]
    else:
        keys = used
    order = _canonical_order(work, keys)
    work = work.iloc[order].reset_index(drop=True)
    design = encode_covariates(work, covariates)
    yv = work[outcome].to_numpy(dtype=float)
    return Units(
        df=work,
        treatment=treatment,
        outcome=outcome,
        covariates=covariates,
        levels=levels,
        reference=ref,
        id_column=id_column,
        design=design,
        dropped_na=dropped,
        outcome_binary=bool(np.all((yv == 0) | (yv == 1))),
    )


def _canonical_order(work: pd.DataFrame, keys: list[str]) -> np.ndarray:
    arrays = []
    for k in reversed(keys):  # np.lexsort: last key is the primary one
        s = work[k]
        if pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
            arrays.append(s.to_numpy(dtype=float))
        else:
            arrays.append(pd.factorize(s.astype(str), sort=True)[0])
    # a stable sort: exact duplicates keep input order, but are identical in every used value
    if not arrays:
        return np.arange(len(work))
    # usually the first two keys (treatment, outcome) already order every row: sort on them
    # alone and fall back to all keys only when two neighbours tie on both
    o = np.lexsort(arrays[-2:])
    a, b = arrays[-1][o], arrays[-2][o] if len(arrays) > 1 else arrays[-1][o]
    if not np.any((a[1:] == a[:-1]) & (b[1:] == b[:-1])):
        return o
    return np.lexsort(arrays)
