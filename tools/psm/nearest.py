"""Nearest-neighbour matching with R MatchIt 4.5's rules (``--ties data``).

MatchIt (``matchit(method = "nearest")``) puts every unit, focal and pool, in one list
sorted by the distance (a stable sort, so equal distances keep the data order). Focal units
are visited in ``m.order`` (largest / smallest distance first, data order, or random), in
``ratio`` rounds (every focal unit gets its 1st match, then its 2nd, ...). A focal unit takes
the nearest available pool unit to its left or its right in that list; when both are equally
far the left one wins. A caliper stops the search on a side at the first available unit
outside it; a covariate caliper skips units outside it and looks further. With replacement a
pool unit stays available (but a focal unit never takes the same one twice). With a matrix
distance (Mahalanobis, or ``mahvars`` within a propensity caliper) the nearest eligible pool
unit in data order wins ties. ``exact`` strata are matched one at a time.

Everything here works on positions ``0..n-1`` given in *data order* (the input file's row
order): ``rank`` is that order.
"""

from __future__ import annotations

import numpy as np
from dolm_tools.psm.matching import Matches, _find


def _empty(n_focal: int) -> Matches:
    e = np.zeros(0, dtype=np.int64)
    return Matches(e, e, np.zeros(0), np.arange(n_focal))


def _tidy(f, p, dist, n_focal: int, rank_pool: np.ndarray) -> Matches:
    f = np.asarray(f, dtype=np.int64)
    p = np.asarray(p, dtype=np.int64)
    dist = np.asarray(dist, dtype=float)
    got = np.zeros(n_focal, dtype=bool)
    got[f] = True
    o = np.lexsort((rank_pool[p], dist, f)) if len(f) else np.zeros(0, dtype=np.int64)
    return Matches(f[o], p[o], dist[o], np.flatnonzero(~got))


def focal_order(d_focal: np.ndarray, rank_focal: np.ndarray, m_order: str,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """Visiting order of the focal units (R's ``order()`` is stable: ties in data order)."""
    if m_order == "largest":
        return np.lexsort((rank_focal, -d_focal))
    if m_order == "smallest":
        return np.lexsort((rank_focal, d_focal))
    data = np.argsort(rank_focal, kind="stable")
    if m_order == "data":
        return data
    if m_order == "random":
        rng = rng or np.random.default_rng(0)
        return data[rng.permutation(len(data))]
    raise ValueError(f"unknown m_order {m_order!r}")


def match_scalar(
    d_focal: np.ndarray, d_pool: np.ndarray, rank_focal: np.ndarray, rank_pool: np.ndarray,
    order: np.ndarray, k: int = 1, replace: bool = False, caliper: float | None = None,
    cov_focal: np.ndarray | None = None, cov_pool: np.ndarray | None = None,
    cov_caliper: np.ndarray | None = None, matchit451: bool = False,
) -> Matches:
    """MatchIt's ``nn_matchC_vec`` on a scalar distance (see the module docstring).

    ``cov_*``: optional (n, c) covariates with per-column caliper widths. ``matchit451``:
    reproduce MatchIt 4.5.1-4.5.3, whose C++ ``abs`` on a double truncated distance
    differences to integers (kosukeimai/MatchIt#163: a propensity caliper never binds and
    the left neighbour wins whenever both differences are below 1) and whose repeat check
    with replacement compared 0- with 1-based indices (a control can fill several of one
    focal unit's 1:k places). ``rank`` must then be the unit's row among all units.
    """
    n1, n0 = len(d_focal), len(d_pool)
    if n1 == 0 or n0 == 0:
        return _empty(n1)
    cal = np.inf if caliper is None else float(caliper)
    # the pool in MatchIt's sorted list order; a focal unit sits after every pool unit that
    # sorts before it by (distance, data rank)
    po = np.lexsort((rank_pool, d_pool))
    vals = d_pool[po]
    rk = rank_pool[po]
    both_d = np.concatenate([vals, d_focal])
    both_r = np.concatenate([rk, rank_focal])
    is_pool = np.concatenate([np.ones(n0, bool), np.zeros(n1, bool)])
    allo = np.lexsort((both_r, both_d))
    before = np.cumsum(is_pool[allo])  # pool units up to and including each sorted position
    pos = np.empty(n0 + n1, dtype=np.int64)
    pos[allo] = before
    pos = pos[n0:]  # per focal: number of pool units sorting before it
    use_cov = cov_caliper is not None and len(cov_caliper) > 0
    if replace and not use_cov and not matchit451:
        f, p, dist = _replace_vec(d_focal, vals, pos, k, cal)
    else:
        cf = cov_focal if use_cov else None
        cp = cov_pool[po] if use_cov else None
        f, p, dist = _loop(d_focal, vals, pos, order, k, replace, cal, cf, cp,
                           cov_caliper if use_cov else None, rk if matchit451 else None)
    p = po[p] if len(p) else p
    return _tidy(f, p, dist, n1, rank_pool)


def _replace_vec(d_focal, vals, pos, k, cal):
    # the k nearest: the k next on the left (walking left) and the k next on the right;
    # MatchIt's merge takes the left one on a tie: a stable sort by (distance, side, step)
    n = len(vals)
    kk = min(k, n)
    steps = np.arange(kk)
    left = pos[:, None] - 1 - steps[None, :]
    right = pos[:, None] + steps[None, :]
    cand = np.concatenate([left, right], axis=1)
    valid = (cand >= 0) & (cand < n)
    cc = np.clip(cand, 0, n - 1)
    dist = np.abs(vals[cc] - d_focal[:, None])
    dist[~valid] = np.inf
    m = len(d_focal)
    side = np.repeat([0, 1], kk)
    rows = np.repeat(np.arange(m), 2 * kk)
    o = np.lexsort((np.tile(np.tile(steps, 2), m), np.tile(side, m), dist.ravel(), rows))
    o = o.reshape(m, 2 * kk)[:, :kk]
    best = cc.ravel()[o]
    bd = dist.ravel()[o]
    ok = bd <= cal
    f = np.repeat(np.arange(m), kk).reshape(m, kk)
    return f[ok], best[ok], bd[ok]


def _loop(d_focal, vals, pos, order, k, replace, cal, cov_focal, cov_pool, cov_cal,
          compat_rank=None):
    n = len(vals)
    compat = compat_rank is not None
    crk = compat_rank.tolist() if compat else []

    def diff(a: float, b: float) -> float:  # MatchIt 4.5.1: C abs() truncates to int
        return float(int(abs(a - b))) if compat else abs(a - b)

    def seen(i: int, j: int) -> bool:
        return (crk[j] in taken[i]) if compat else (j in taken[i])

    right = list(range(n + 1))  # right[i]: smallest free index >= i (n = none)
    left = list(range(n + 1))  # left[i + 1] - 1: largest free index <= i (-1 = none)
    vl = vals.tolist()
    dl = d_focal.tolist()
    pl = pos.tolist()
    use_cov = cov_cal is not None
    track = replace or compat  # MatchIt 4.5.1 checks a focal unit's own matches in any case
    taken: list[set[int]] = [set() for _ in range(len(d_focal))] if track else []
    out_f: list[int] = []
    out_p: list[int] = []
    out_d: list[float] = []
    n_free = n

    def ok_cov(i: int, j: int) -> bool:
        d = np.abs(cov_pool[j] - cov_focal[i])
        return bool(np.all((np.trunc(d) if compat else d) <= cov_cal))

    for _ in range(k):
        for i in order.tolist():
            x = dl[i]
            # left side
            j = (_find(left, pl[i]) - 1) if not replace else pl[i] - 1
            jl = -1
            while j >= 0:
                if (track and seen(i, j)) or (use_cov and not ok_cov(i, j)):
                    j = (_find(left, j) - 1) if not replace else j - 1
                    continue
                if diff(x, vl[j]) <= cal:
                    jl = j
                break
            j = _find(right, pl[i]) if not replace else pl[i]
            jr = -1
            while j < n:
                if (track and seen(i, j)) or (use_cov and not ok_cov(i, j)):
                    j = _find(right, j + 1) if not replace else j + 1
                    continue
                if diff(vl[j], x) <= cal:
                    jr = j
                break
            if jl < 0 and jr < 0:
                continue
            if jl >= 0 and (jr < 0 or diff(vl[jl], x) <= diff(vl[jr], x)):
                j = jl
            else:
                j = jr
            dj = abs(vl[j] - x)
            out_f.append(i)
            out_p.append(j)
            out_d.append(dj)
            if track:
                taken[i].add(crk[j] + 1 if compat else j)
            if not replace:
                right[j] = j + 1
                left[j + 1] = j
                n_free -= 1
                if n_free == 0:
                    break
        if not replace and n_free == 0:
            break
    return (np.asarray(out_f, dtype=np.int64), np.asarray(out_p, dtype=np.int64),
            np.asarray(out_d, dtype=float))


def match_matrix(
    Z_focal: np.ndarray, Z_pool: np.ndarray, rank_pool: np.ndarray, order: np.ndarray,
    k: int = 1, replace: bool = False, caliper: float | None = None,
    d_focal: np.ndarray | None = None, d_pool: np.ndarray | None = None,
    cov_focal: np.ndarray | None = None, cov_pool: np.ndarray | None = None,
    cov_caliper: np.ndarray | None = None,
) -> Matches:
    """MatchIt's ``nn_matchC`` with Mahalanobis-transformed covariates ``Z`` (Euclidean
    distance between rows); ``d_*`` and ``caliper``: the propensity caliper (``mahvars``)."""
    n1, n0 = len(Z_focal), len(Z_pool)
    if n1 == 0 or n0 == 0:
        return _empty(n1)
    po = np.argsort(rank_pool, kind="stable")  # candidates in data order: first minimum wins
    Zp = Z_pool[po]
    dp = d_pool[po] if d_pool is not None else None
    cp = cov_pool[po] if cov_pool is not None else None
    avail = np.ones(n0, dtype=bool)
    out_f: list[int] = []
    out_p: list[int] = []
    out_d: list[float] = []
    rounds = 1 if replace else k
    for _ in range(rounds):
        for i in order.tolist():
            if not replace and not avail.any():
                break
            elig = avail.copy() if not replace else np.ones(n0, dtype=bool)
            if caliper is not None:
                elig &= np.abs(dp - d_focal[i]) <= caliper
            if cov_caliper is not None and len(cov_caliper):
                elig &= np.all(np.abs(cp - cov_focal[i]) <= cov_caliper, axis=1)
            idx = np.flatnonzero(elig)
            if len(idx) == 0:
                continue
            dist = np.sqrt(np.sum((Zp[idx] - Z_focal[i]) ** 2, axis=1))
            if replace:
                take = idx[np.argsort(dist, kind="stable")[:k]] if len(idx) > k else idx
                dd = np.sqrt(np.sum((Zp[take] - Z_focal[i]) ** 2, axis=1))
                out_f += [i] * len(take)
                out_p += take.tolist()
                out_d += dd.tolist()
            else:
                j = int(np.argmin(dist))
                out_f.append(i)
                out_p.append(int(idx[j]))
                out_d.append(float(dist[j]))
                avail[idx[j]] = False
    p = po[np.asarray(out_p, dtype=np.int64)] if out_p else np.zeros(0, dtype=np.int64)
    return _tidy(out_f, p, out_d, n1, rank_pool)


def mahalanobis_transform(X: np.ndarray, t: np.ndarray, keep: np.ndarray,
                          robust: bool = False) -> np.ndarray:
    """Rows whose Euclidean distances are MatchIt's Mahalanobis distances.

    ``mahalanobis``: columns standardised over all units, pooled within-group covariance of
    the kept units, (generalised) inverse. ``robust``: ranks of the kept units' columns,
    covariance of the ranks with its diagonal set to the variance of untied ranks.
    """
    X = np.asarray(X, dtype=float)
    var_cols = np.ptp(X[keep], axis=0) >= np.sqrt(np.finfo(float).eps)
    X = X[:, var_cols]
    if robust:
        from scipy.stats import rankdata

        R = np.zeros_like(X)
        R[keep] = np.column_stack([rankdata(X[keep, j]) for j in range(X.shape[1])])
        V = np.cov(R[keep], rowvar=False, ddof=1).reshape(X.shape[1], X.shape[1])
        mult = np.std(np.arange(1, keep.sum() + 1), ddof=1) / np.sqrt(np.diag(V))
        V = V * np.outer(mult, mult)
        X = R
    else:
        X = (X - X.mean(axis=0)) / X.std(axis=0, ddof=1)
        Xk, tk = X[keep], t[keep]
        C = Xk.copy()
        for g in np.unique(tk):
            C[tk == g] -= C[tk == g].mean(axis=0)
        V = C.T @ C / (len(C) - len(np.unique(tk)))
    inv = np.linalg.pinv(V, hermitian=True)
    w, U = np.linalg.eigh((inv + inv.T) / 2)
    w = np.clip(w, 0, None)
    return X @ (U * np.sqrt(w))
