"""Stratification methods with R MatchIt 4.5's rules: exact, CEM, propensity subclasses.

Each returns a subclass code per unit (-1: not in any subclass with both groups, weight 0);
:func:`subclass_weights` gives MatchIt's weights (``weights.subclass``), so a weighted
difference in means is MatchIt's estimate: ATT: treated 1, control n_t/n_c of its subclass;
ATC: control 1, treated n_c/n_t; ATE: n/n_t and n/n_c (each group rescaled to sum to its
matched count, which does not change a weighted mean).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _codes(keys: pd.Series, t: np.ndarray) -> np.ndarray:
    """Subclass per unit: strata that hold both groups, numbered in order of first
    appearance among the treated (MatchIt: ``intersect`` of the treated and control keys)."""
    k = keys.to_numpy()
    tr_keys = pd.unique(k[t == 1])
    co_keys = set(pd.unique(k[t == 0]).tolist())
    common = [x for x in tr_keys.tolist() if x in co_keys]
    lookup = {x: i for i, x in enumerate(common)}
    return np.array([lookup.get(x, -1) for x in k.tolist()], dtype=np.int64)


def _key(frame: pd.DataFrame) -> pd.Series:
    """One integer per distinct row of values (vectorised: factorize each column, then the
    distinct rows of the code matrix)."""
    if frame.shape[1] == 0:
        return pd.Series(np.zeros(len(frame), dtype=np.int64))
    codes = np.column_stack([pd.factorize(frame[c].astype(str))[0] for c in frame.columns])
    inv = np.unique(codes, axis=0, return_inverse=True)[1].ravel()
    return pd.Series(inv.astype(np.int64))


def exact_strata(df: pd.DataFrame, columns: list[str], t: np.ndarray) -> np.ndarray:
    """Exact matching: one subclass per combination of values present in both groups."""
    return _codes(_key(df[columns]), t)


def sturges_bins(n: int) -> int:
    return int(np.ceil(np.log2(n) + 1))


def cem_coarsen(x: np.ndarray, bins: int | None = None) -> np.ndarray:
    """MatchIt's default CEM coarsening of a numeric column: ``bins`` (Sturges) equal-width
    bins between min and max, the outer edges open (R's ``seq`` and ``findInterval``)."""
    x = np.asarray(x, dtype=float)
    b = bins or sturges_bins(len(x))
    lo, hi = float(x.min()), float(x.max())
    by = (hi - lo) / b
    breaks = np.concatenate([[-np.inf], lo + np.arange(1, b) * by, [np.inf]])
    return np.searchsorted(breaks, x, side="right")


def cem_strata(df: pd.DataFrame, columns: list[str], t: np.ndarray,
               bins: dict[str, int] | None = None) -> np.ndarray:
    """Coarsened exact matching: numeric columns binned (:func:`cem_coarsen`), others exact."""
    parts = {}
    for c in columns:
        s = df[c]
        if pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
            parts[c] = cem_coarsen(s.to_numpy(dtype=float), (bins or {}).get(c))
        else:
            parts[c] = s.astype(str).to_numpy()
    return _codes(_key(pd.DataFrame(parts)), t)


def _r_quantile(x: np.ndarray, probs: np.ndarray) -> np.ndarray:
    return np.quantile(x, probs)  # numpy's default is R's type 7


def subclass_strata(distance: np.ndarray, t: np.ndarray, keep: np.ndarray, n_sub: int,
                    estimand: str = "ATT", min_n: int = 1) -> np.ndarray:
    """Propensity subclasses: cut points at quantiles of the distance (of the treated for
    the ATT, the controls for the ATC, everyone for the ATE); subclasses that lack a group
    take the nearest units from a neighbour (MatchIt's ``subclass_scoot``)."""
    probs = np.linspace(0, 1, n_sub + 1)
    base = {"ATT": distance[t == 1], "ATC": distance[t == 0]}.get(estimand, distance)
    q = _r_quantile(base, probs)
    sub = np.full(len(t), -1, dtype=np.int64)
    cls = np.searchsorted(q, distance[keep], side="right")
    sub[keep] = np.clip(cls, 1, len(q) - 1) - 1
    if min_n > 0:
        sub[keep] = _scoot(sub[keep], t[keep], distance[keep], min_n)
    # renumber the subclasses present 0..k-1 (MatchIt: factor levels)
    present = np.unique(sub[sub >= 0])
    out = np.full(len(t), -1, dtype=np.int64)
    out[sub >= 0] = np.searchsorted(present, sub[sub >= 0])
    return out


def _scoot(sub: np.ndarray, t: np.ndarray, x: np.ndarray, min_n: int) -> np.ndarray:
    """Give every subclass at least ``min_n`` units of each group by moving the closest
    units of the nearest non-empty neighbour subclass (the direction with more spare units
    weighted by distance), as MatchIt's ``subclass_scootC``."""
    uniq = np.unique(sub)
    s_idx = np.searchsorted(uniq, sub)
    nsub = len(uniq)
    for g in np.unique(t):
        ind = np.flatnonzero(t == g)
        tab = np.bincount(s_idx[ind], minlength=nsub)
        for _ in range(min_n):
            while tab.min() <= 0:
                s = int(np.flatnonzero(tab == 0)[0])
                if s == nsub - 1:
                    left = True
                elif s == 0:
                    left = False
                else:
                    score = sum((tab[s2] - 1) / (s2 - s) for s2 in range(nsub)
                                if tab[s2] > 1 and s2 != s)
                    left = score <= 0
                rng = range(s - 1, -1, -1) if left else range(s + 1, nsub)
                s2 = next(j for j in rng if tab[j] > 0)
                cand = ind[s_idx[ind] == s2]
                xs = x[cand]
                # ties: the last unit in data order with the extreme value
                pick = cand[np.flatnonzero(xs == (xs.max() if left else xs.min()))[-1]]
                s_idx[pick] = s
                tab[s] += 1
                tab[s2] -= 1
            tab -= 1
    return uniq[s_idx]


def subclass_weights(sub: np.ndarray, t: np.ndarray, estimand: str) -> np.ndarray:
    """MatchIt's ``weights.subclass`` (0 outside the subclasses)."""
    w = np.zeros(len(t))
    ok = sub >= 0
    k = int(sub[ok].max()) + 1 if ok.any() else 0
    i1, i0 = ok & (t == 1), ok & (t == 0)
    n1 = np.bincount(sub[i1], minlength=k).astype(float)
    n0 = np.bincount(sub[i0], minlength=k).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        if estimand == "ATT":
            w[i1] = 1.0
            w[i0] = (n1 / n0)[sub[i0]]
        elif estimand == "ATC":
            w[i0] = 1.0
            w[i1] = (n0 / n1)[sub[i1]]
        else:
            w[i1] = ((n1 + n0) / n1)[sub[i1]]
            w[i0] = ((n1 + n0) / n0)[sub[i0]]
    for m in (i1, i0):
        if w[m].sum() > 0:
            w[m] *= m.sum() / w[m].sum()
    return w
