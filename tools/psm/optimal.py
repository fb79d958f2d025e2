"""Optimal pair matching and optimal full matching (what R's optmatch does for MatchIt).

* :func:`optimal_pairs`: 1:k matching without replacement that minimises the total
  distance: a rectangular assignment problem (each focal unit repeated k times) solved by
  scipy's ``linear_sum_assignment``; forbidden pairs (outside the caliper) cost infinity.
* :func:`full_matching`: optimal full matching: every unit of both groups in exactly one
  matched set, each set one treated unit with one or more controls or one control with
  one or more treated units, minimising the sum of treated-control distances within sets.
  That is a minimum-weight edge cover of the bipartite graph (in a minimum edge cover every
  component is a star), solved exactly by the classic reduction to a maximum-weight
  matching: with c(v) the cheapest edge at v, a matching maximising c(u) + c(v) - d(u, v)
  plus each unmatched unit's cheapest edge is a minimum edge cover (Schrijver 2003,
  section 19.1). The matching is again one ``linear_sum_assignment``.

Both need the dense focal x pool distance matrix: ``budget`` bounds its number of entries.
"""

from __future__ import annotations

import numpy as np
from dolm.errors import InputError

BIG = 1e12


def _check_budget(n1: int, n0: int, budget: int, method: str) -> None:
    if n1 * n0 > budget:
        raise InputError(
            f"--method {method}: {n1} x {n0} = {n1 * n0:,} candidate pairs exceed the solver's "
            f"budget of {budget:,} (a dense distance matrix and an O(n^3) assignment); use "
            "--method nearest, match within --exact strata, or raise --max-pairs")


def distance_matrix(d_focal: np.ndarray, d_pool: np.ndarray, caliper: float | None,
                    Z_focal: np.ndarray | None = None, Z_pool: np.ndarray | None = None
                    ) -> np.ndarray:
    """|d_i - d_j| (or Euclidean distance between Z rows); inf outside the caliper."""
    D = np.abs(d_focal[:, None] - d_pool[None, :])
    out = D.copy() if Z_focal is None else np.sqrt(
        np.maximum(((Z_focal[:, None, :] - Z_pool[None, :, :]) ** 2).sum(-1), 0.0))
    if caliper is not None:
        out[D > caliper] = np.inf
    return out


def optimal_pairs(D: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Minimum total distance 1:k matching without replacement; returns (focal, pool)."""
    from scipy.optimize import linear_sum_assignment

    n1, n0 = D.shape
    if n1 == 0 or n0 == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e
    R = np.repeat(D, k, axis=0)  # focal i occupies rows i*k .. i*k+k-1
    C = np.where(np.isfinite(R), R, BIG)
    rows, cols = linear_sum_assignment(C)
    ok = np.isfinite(R[rows, cols])
    return (rows[ok] // k).astype(np.int64), cols[ok].astype(np.int64)


def full_matching(D: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Optimal full matching on the treated x control distance matrix ``D``; returns the
    edges (treated, control) of the stars. Units with no finite edge stay unmatched."""
    from scipy.optimize import linear_sum_assignment

    n1, n0 = D.shape
    fin = np.isfinite(D)
    r_ok, c_ok = fin.any(axis=1), fin.any(axis=0)
    Dm = np.where(fin, D, np.inf)
    c1 = np.where(r_ok, Dm.min(axis=1), 0.0)
    c0 = np.where(c_ok, Dm.min(axis=0), 0.0)
    gain = c1[:, None] + c0[None, :] - Dm
    gain = np.where(fin & (gain > 0), gain, 0.0)
    rows, cols = linear_sum_assignment(-gain)
    use = gain[rows, cols] > 0
    t_e, c_e = list(rows[use]), list(cols[use])
    covered1 = np.zeros(n1, dtype=bool)
    covered0 = np.zeros(n0, dtype=bool)
    covered1[rows[use]] = True
    covered0[cols[use]] = True
    for i in np.flatnonzero(~covered1 & r_ok):
        t_e.append(i)
        c_e.append(int(np.argmin(Dm[i])))
    for j in np.flatnonzero(~covered0 & c_ok):
        t_e.append(int(np.argmin(Dm[:, j])))
        c_e.append(j)
    edges = sorted(set(zip(map(int, t_e), map(int, c_e), strict=True)))
    # with zero distances an optimal cover may hold an edge whose ends are both covered
    # twice; dropping it costs nothing and leaves stars
    deg_t = np.bincount([a for a, _ in edges], minlength=n1)
    deg_c = np.bincount([b for _, b in edges], minlength=n0)
    keep = []
    for a, b in edges:
        if deg_t[a] > 1 and deg_c[b] > 1:
            deg_t[a] -= 1
            deg_c[b] -= 1
        else:
            keep.append((a, b))
    arr = np.asarray(keep, dtype=np.int64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def stars(t_e: np.ndarray, c_e: np.ndarray) -> np.ndarray:
    """Matched-set id of each edge of a star forest (the centre is the unit of degree > 1;
    a single pair is its own set)."""
    deg_t = np.bincount(t_e) if len(t_e) else np.zeros(0, dtype=np.int64)
    centre_is_t = deg_t[t_e] > 1 if len(t_e) else np.zeros(0, dtype=bool)
    key = np.where(centre_is_t, t_e, -1 - c_e)
    return np.unique(key, return_inverse=True)[1].astype(np.int64)
