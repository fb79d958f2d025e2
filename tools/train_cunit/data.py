"""Variable tables: validation of a user's (or simulate's) table and conversion to the
arrays the trainer needs. Every problem a user can cause is an ``InputError`` naming
the file and column at fault and what was expected."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from dolm.errors import InputError

BOOK_COLUMNS = ("target", "regime", "split")


@dataclass
class VariableData:
    path: str
    nodes: list[str]
    X: np.ndarray  # (n, d) float64
    targets: list[list[int]]  # per row
    regimes: list[str]
    split: np.ndarray  # per row: "train" | "test"
    extra: dict = field(default_factory=dict)

    def rows(self, which: str):
        idx = np.flatnonzero(self.split == which)
        return idx


def parse_targets(values, nodes: list[str], path: str, column: str) -> list[list[int]]:
    """``"a,b"`` -> [index(a), index(b)]; empty/null -> []; unknown names -> InputError."""
    index = {n: i for i, n in enumerate(nodes)}
    out: list[list[int]] = []
    cache: dict = {}
    for r, v in enumerate(values):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            out.append([])
            continue
        key = str(v).strip()
        if key in cache:
            out.append(cache[key])
            continue
        names = [s.strip() for s in key.split(",") if s.strip()]
        bad = [s for s in names if s not in index]
        if bad:
            raise InputError(
                f"{path}: column {column!r}, row {r}: names {bad[0]!r}, which is not a variable "
                f"of the table; expected comma-separated names among {', '.join(nodes)} "
                "(empty for observational rows)"
            )
        cache[key] = sorted({index[s] for s in names})
        out.append(cache[key])
    return out


def from_frame(
    df,
    path: str,
    extra: dict | None = None,
    target_column: str | None = "target",
    variables: list[str] | None = None,
    exclude: list[str] | None = None,
) -> VariableData:
    """Check a table and split it into variables, targets, regimes and split."""
    import pandas as pd

    extra = extra or {}
    cols = list(df.columns)
    if target_column and target_column not in cols and target_column != "target":
        raise InputError(f"--target-column {target_column}: no such column in {path}; "
                         f"found {', '.join(map(str, cols))}")
    book = {c for c in BOOK_COLUMNS if c in cols}
    if target_column:
        book.add(target_column) if target_column in cols else None
    exclude = list(exclude or [])
    for c in exclude:
        if c not in cols:
            raise InputError(f"--exclude {c}: no such column in {path}")
    if variables:
        missing = [v for v in variables if v not in cols]
        if missing:
            raise InputError(f"--variables: {path} has no column {missing[0]!r}; "
                             f"found {', '.join(map(str, cols))}")
        nodes = list(variables)
    else:
        nodes = [str(c) for c in cols if c not in book and c not in exclude]
    if len(nodes) < 2:
        raise InputError(f"{path}: expected at least 2 variable columns, found {len(nodes)}")
    for c in nodes:
        s = df[c]
        if s.dtype == bool or not pd.api.types.is_numeric_dtype(s):
            sample = next((v for v in s if not _is_number(v)), s.iloc[0] if len(s) else None)
            raise InputError(
                f"{path}: column {c!r} is not numeric (dtype {s.dtype}, e.g. {sample!r}); "
                "expected numbers in every variable column (leave other columns out with "
                "--exclude or name the variables with --variables)"
            )
    X = df[nodes].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(X)
    if bad.any():
        r, j = np.argwhere(bad)[0]
        raise InputError(
            f"{path}: column {nodes[j]!r} has {int(bad[:, j].sum())} missing or infinite "
            f"value(s) (first at row {r}); expected finite numbers (drop or impute them first)"
        )
    n, d = X.shape
    if n < d + 1:
        raise InputError(
            f"{path}: {n} rows for {d} variables; expected more rows than variables"
        )
    if target_column and target_column in cols:
        targets = parse_targets(df[target_column].tolist(), nodes, path, target_column)
    else:
        targets = [[] for _ in range(n)]
    if "regime" in cols:
        col = df["regime"]
        if isinstance(col.dtype, pd.CategoricalDtype):
            empty = [str(c) for c in col.cat.categories if not (col == c).any()]
            if empty:
                raise InputError(
                    f"{path}: column 'regime' declares regime {empty[0]!r}, which has no "
                    "rows; expected every regime to have rows (drop the unused categories)")
        regimes = ["obs" if v is None else str(v) for v in col.tolist()]
        seen: dict[str, list[int]] = {}
        for r, (name, t) in enumerate(zip(regimes, targets, strict=True)):
            if seen.setdefault(name, t) != t:
                what = ",".join(nodes[i] for i in t) or "none"
                was = ",".join(nodes[i] for i in seen[name]) or "none"
                raise InputError(
                    f"{path}: column 'regime', row {r}: regime {name!r} has targets {what} "
                    f"here but {was} on an earlier row; expected one target set per regime")
    else:
        regimes = ["obs" if not t else "do(" + ",".join(nodes[i] for i in t) + ")"
                   for t in targets]
    if "split" in cols:
        split = np.asarray(["train" if v is None else str(v) for v in df["split"].tolist()])
        wrong = sorted(set(split) - {"train", "test"})
        if wrong:
            raise InputError(f"{path}: column 'split' has value {wrong[0]!r}; "
                             "expected train or test")
    else:
        split = np.asarray(["train"] * n)
    n_train = int((split == "train").sum())
    if n_train < d + 1:
        raise InputError(
            f"{path}: {n_train} training rows (split = train) for {d} variables; "
            "expected more rows than variables"
        )
    for j, name in enumerate(nodes):
        free = np.asarray([j not in t for t in targets]) & (split == "train")
        if free.sum() >= 2 and np.std(X[free, j]) == 0:
            raise InputError(f"{path}: column {name!r} is constant; expected a variable "
                             "that varies (leave it out with --exclude)")
    return VariableData(path, nodes, X, targets, regimes, split, extra)


def _is_number(v) -> bool:
    try:
        float(v)
        return not isinstance(v, bool)
    except (TypeError, ValueError):
        return False


def dag_to_matrix(obj: dict, nodes: list[str], where: str) -> np.ndarray:
    """A ``dag`` JSON object -> (d, d) 0/1 over ``nodes``; cycles / unknown names /
    missing nodes -> InputError."""
    from .graphs import find_cycle

    if not isinstance(obj, dict) or "edges" not in obj:
        raise InputError(f"{where}: expected a dag JSON object with 'nodes' and 'edges'")
    index = {n: i for i, n in enumerate(nodes)}
    B = np.zeros((len(nodes), len(nodes)), dtype=np.int64)
    for k, e in enumerate(obj.get("edges", [])):
        if not isinstance(e, dict) or "source" not in e or "target" not in e:
            raise InputError(f"{where}: edge {k}: expected {{'source': ..., 'target': ...}}")
        for end in ("source", "target"):
            if str(e[end]) not in index:
                raise InputError(f"{where}: edge {k} names {e[end]!r}, which is not a variable; "
                                 f"expected one of {', '.join(nodes)}")
        if e["source"] == e["target"]:
            raise InputError(f"{where}: edge {k} is a self-loop on {e['source']!r}; "
                             "expected an acyclic graph")
        B[index[str(e["source"])], index[str(e["target"])]] = 1
    cycle = find_cycle(B)
    if cycle is not None:
        names = " -> ".join(nodes[i] for i in cycle + [cycle[0]])
        raise InputError(f"{where}: the graph is cyclic ({names}); expected a DAG")
    return B


def matrix_to_dag(B: np.ndarray, nodes: list[str], weights: np.ndarray | None = None) -> dict:
    edges = []
    for i, j in zip(*np.nonzero(B), strict=True):
        e = {"source": nodes[i], "target": nodes[j]}
        if weights is not None:
            e["weight"] = float(round(float(weights[i, j]), 6))
        edges.append(e)
    return {"nodes": list(nodes), "edges": edges}
