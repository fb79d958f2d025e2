"""Nearest-neighbour matching on the logit of the propensity score.

Hand-rolled (no library matches with a caliper, 1:k without replacement, MatchIt's
"largest first" order and a row-order-free tie rule) but small:

* with replacement: each focal unit takes its k nearest pool units (vectorised: the k
  nearest in one dimension lie within k places either side in the sorted pool);
* without replacement: greedy, focal units in order of decreasing score (MatchIt's
  ``m.order = "largest"``), k rounds as in MatchIt (every focal unit gets its 1st match,
  then its 2nd, ...); taken pool units are skipped with two union-find "next free" arrays,
  so each match costs near O(1) after one binary search.

Ties in distance go to the pool unit that comes first in the canonical order (``rank``), so
the result depends only on the values, never on the input's row order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Matches:
    """Pairs (focal, pool) as local indices into the arrays given to :func:`match`."""

    focal: np.ndarray  # int, one entry per pair
    pool: np.ndarray  # int
    distance: np.ndarray  # |logit ps difference|
    unmatched: np.ndarray  # focal indices (eligible) that got no match

    @property
    def n_pairs(self) -> int:
        return len(self.focal)


def common_support(ps: np.ndarray, t: np.ndarray, mode: str) -> np.ndarray:
    """Boolean mask of units kept by MatchIt-style ``discard`` on the propensity score."""
    keep = np.ones(len(ps), dtype=bool)
    if mode == "none":
        return keep
    p1, p0 = ps[t == 1], ps[t == 0]
    if mode in ("both", "control"):  # controls outside the treated range
        keep &= ~((t == 0) & ((ps < p1.min()) | (ps > p1.max())))
    if mode in ("both", "treated"):  # treated outside the control range
        keep &= ~((t == 1) & ((ps < p0.min()) | (ps > p0.max())))
    return keep


def match(
    d_focal: np.ndarray,
    d_pool: np.ndarray,
    rank_focal: np.ndarray,
    rank_pool: np.ndarray,
    k: int = 1,
    replace: bool = False,
    caliper: float | None = None,
    order: np.ndarray | None = None,
    all_ties: bool = False,
) -> Matches:
    """Match every focal unit to up to ``k`` pool units on the scalar distance ``d``.

    Among pool units at equal distance the one with the smallest ``rank`` wins. ``order``:
    the focal units' matching order without replacement (default: largest ``d`` first).
    ``all_ties`` (with replacement only): every pool unit as near as the k-th nearest joins
    the set (Abadie & Imbens 2006's J_M(i)), so a set can hold more than ``k`` units.
    """
    cal = np.inf if caliper is None else float(caliper)
    if len(d_pool) == 0 or len(d_focal) == 0:
        e = np.zeros(0, dtype=np.int64)
        return Matches(e, e, np.zeros(0), np.arange(len(d_focal)))
    if replace:
        f, p, dist = _with_replacement(d_focal, d_pool, rank_pool, k, cal)
        if all_ties:
            f, p, dist = _add_ties(d_focal, d_pool, f, dist)
    else:
        pool_order = np.lexsort((rank_pool, d_pool))
        vals = d_pool[pool_order]
        if order is None:
            order = np.lexsort((rank_focal, -d_focal))  # largest score first
        f, p, dist = _without_replacement(d_focal, order, vals, rank_pool[pool_order], k, cal)
        p = pool_order[p]
    got = np.zeros(len(d_focal), dtype=bool)
    got[f] = True
    o = np.lexsort((rank_pool[p], dist, rank_focal[f]))  # tidy: by focal, then nearest first
    return Matches(f[o], p[o], dist[o], np.flatnonzero(~got))


def _with_replacement(d_focal, d_pool, rank_pool, k, cal):
    # the k nearest lie among the k next pool units on the right, ordered (value, rank) up,
    # and the k next on the left, ordered (value down, rank up)
    n = len(d_pool)
    kk = min(k, n)
    if n > 1 and np.all(rank_pool[1:] > rank_pool[:-1]):  # ranks follow the index (usual):
        up = np.argsort(d_pool, kind="stable")  # a stable sort on the value alone is enough
        sv = d_pool[up]
        # without tied values the two orders are the same; else sort ties by rank downwards
        down = up if not np.any(sv[1:] == sv[:-1]) else (
            (n - 1) - np.argsort(d_pool[::-1], kind="stable"))
    else:
        up = np.lexsort((rank_pool, d_pool))
        down = np.lexsort((-rank_pool, d_pool))  # read right-to-left: value down, rank up
    vals = d_pool[up]
    pos = np.searchsorted(vals, d_focal)
    if kk == 1:  # the nearer of two candidates; on equal distance the smaller rank
        r_ok, l_ok = pos < n, pos > 0
        r = up[np.minimum(pos, n - 1)]
        lft = down[np.maximum(pos - 1, 0)]
        dr = np.where(r_ok, d_pool[r] - d_focal, np.inf)
        dl = np.where(l_ok, d_focal - d_pool[lft], np.inf)
        take_r = (dr < dl) | ((dr == dl) & (rank_pool[r] < rank_pool[lft]))
        best = np.where(take_r, r, lft)
        bdist = np.where(take_r, dr, dl)
        ok = bdist <= cal
        return np.flatnonzero(ok), best[ok], bdist[ok]
    right = pos[:, None] + np.arange(kk)[None, :]
    left = pos[:, None] - 1 - np.arange(kk)[None, :]
    okr, okl = right < n, left >= 0
    cand = np.concatenate([up[np.clip(right, 0, n - 1)], down[np.clip(left, 0, n - 1)]], axis=1)
    valid = np.concatenate([okr, okl], axis=1)
    dist = np.abs(d_pool[cand] - d_focal[:, None])
    dist[~valid] = np.inf
    rows = np.repeat(np.arange(len(d_focal)), cand.shape[1])
    o = np.lexsort((rank_pool[cand].ravel(), dist.ravel(), rows))
    o = o.reshape(len(d_focal), cand.shape[1])[:, :kk]
    best = cand.ravel()[o]
    bdist = dist.ravel()[o]
    ok = bdist <= cal
    f = np.repeat(np.arange(len(d_focal)), kk).reshape(len(d_focal), kk)
    return f[ok], best[ok], bdist[ok]


def _add_ties(d_focal, d_pool, f, dist):
    """Every pool unit no farther than each focal unit's farthest match (within the caliper
    that match already passed)."""
    if len(f) == 0:
        return f, np.zeros(0, dtype=np.int64), dist
    dk = np.zeros(len(d_focal))
    np.maximum.at(dk, f, dist)
    foc = np.unique(f)
    x, r = d_focal[foc], dk[foc]
    srt = np.argsort(d_pool, kind="stable")
    vals = d_pool[srt]
    slack = 1e-9 * (1.0 + np.abs(x) + r)  # |v - x| <= r is checked exactly below
    lo = np.searchsorted(vals, x - r - slack, "left")
    hi = np.searchsorted(vals, x + r + slack, "right")
    cnt = hi - lo
    ff = np.repeat(foc, cnt)
    start = np.repeat(lo - np.concatenate([[0], np.cumsum(cnt)[:-1]]), cnt)
    j = start + np.arange(cnt.sum())
    dd = np.abs(vals[j] - d_focal[ff])
    ok = dd <= dk[ff]
    return ff[ok], srt[j[ok]], dd[ok]


def _find(parent: list[int], x: int) -> int:
    root = x
    while parent[root] != root:
        root = parent[root]
    while parent[x] != root:
        parent[x], x = root, parent[x]
    return root


def _without_replacement(d_focal, order, vals, rank_sorted, k, cal):
    n = len(vals)
    # right[i]: smallest free index >= i (n = none); left[i+1]: largest free index <= i (0 = none)
    right = list(range(n + 1))
    left = list(range(n + 1))
    # first index of each run of equal values: the lowest-rank free unit of the left
    # candidate's value is the first free index from there
    new = np.ones(n, dtype=bool)
    new[1:] = vals[1:] != vals[:-1]
    gstart = np.maximum.accumulate(np.where(new, np.arange(n), 0)).tolist()
    pos = np.searchsorted(vals, d_focal).tolist()
    order = np.asarray(order).tolist()
    dl = d_focal.tolist()
    vl = vals.tolist()
    rl = rank_sorted.tolist()
    out_f: list[int] = []
    out_p: list[int] = []
    out_d: list[float] = []
    active = order
    inf = float("inf")
    for _ in range(k):
        nxt = []
        for i in active:
            x = dl[i]
            r = _find(right, pos[i])
            lft = _find(left, pos[i]) - 1  # left is shifted by one: index j lives at j+1
            if lft >= 0:
                lft = _find(right, gstart[lft])
            dr = vl[r] - x if r < n else inf
            dl_ = x - vl[lft] if lft >= 0 else inf
            if dr < dl_ or (dr == dl_ and r < n and (lft < 0 or rl[r] < rl[lft])):
                j, dj = r, dr
            else:
                j, dj = lft, dl_
            if j < 0 or j >= n or dj > cal:
                continue
            out_f.append(i)
            out_p.append(j)
            out_d.append(dj)
            right[j] = j + 1
            left[j + 1] = j
            nxt.append(i)
        active = nxt
        if len(out_p) >= n:
            break
    return (
        np.asarray(out_f, dtype=np.int64),
        np.asarray(out_p, dtype=np.int64),
        np.asarray(out_d, dtype=float),
    )
