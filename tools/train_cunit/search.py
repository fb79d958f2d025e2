"""Discrete polish of a learned DAG under the interventional Gaussian likelihood.

For linear mechanisms the engine's per-node likelihood has a closed form: node j's
conditional is the least-squares regression of z_j on its parents over the rows where
j is not intervened on (DCDI's masking). Starting from the graph the continuous
optimiser found, a greedy search adds, deletes and reverses single edges while the
penalised score (NLL + ``penalty`` per edge, BIC by default) improves and the graph
stays acyclic. It repairs the few edges that the augmented Lagrangian fixes in the
wrong direction early on.

For nonlinear mechanisms the same search runs on an additive basis expansion: every
parent enters through ``k`` piecewise-linear features (itself and hinges at its
quantiles, ``hinge_features``), so a node's conditional is a least-squares additive
spline of its parents -- still a closed form, and the BIC penalty is ``k`` parameters
per edge. ``SplineFeatureScorer`` adds ``r`` random tanh features of the whole parent set
per parent (a random-feature network, so interactions between parents are fitted too);
the penalty is then ``k + r`` parameters per edge."""

from __future__ import annotations

import math

import numpy as np


def hinge_features(Z: np.ndarray, knots: int = 3) -> np.ndarray:
    """(n, d * (knots + 1)): per column z, ``[z, max(0, z - q_1), ..., max(0, z - q_K)]``
    with knots q at the column's quantiles 1/(K+1) .. K/(K+1) (a linear spline)."""
    n, d = Z.shape
    qs = np.quantile(Z, np.arange(1, knots + 1) / (knots + 1), axis=0)  # (K, d)
    F = np.empty((n, d, knots + 1))
    F[:, :, 0] = Z
    for k in range(knots):
        F[:, :, k + 1] = np.maximum(Z - qs[k], 0.0)
    return F.reshape(n, d * (knots + 1))


class _CachedScorer:
    """``score(j, parents)``: the NLL of node j given a parent set, cached per set."""

    cache: dict[tuple[int, tuple[int, ...]], float]

    def score(self, j: int, parents) -> float:
        key = (j, tuple(sorted(int(p) for p in parents)))
        hit = self.cache.get(key)
        if hit is None:
            hit = self.cache[key] = self._nll(j, key[1])
        return hit

    def _nll(self, j: int, parents: tuple[int, ...]) -> float:
        raise NotImplementedError


def _gaussian_nll(rss: float, m: int) -> float:
    rss = max(rss, 1e-12 * m)
    return 0.5 * m * (math.log(2 * math.pi * rss / m) + 1.0)


class NodeScorer(_CachedScorer):
    """Gaussian NLL of each node given a parent set, from per-node Gram matrices.

    ``features`` (n, d * k), grouped by variable: parent i enters through columns
    ``i*k .. i*k+k-1`` (default: the variables themselves, k = 1)."""

    def __init__(self, Z: np.ndarray, target_mask: np.ndarray,
                 features: np.ndarray | None = None, k: int = 1):
        n, d = Z.shape
        self.d, self.k = d, k
        if features is None:
            Zc = np.concatenate([Z, np.ones((n, 1))], axis=1)  # last column: intercept
            self.intercept, self.tcol = d, list(range(d))
        else:
            Zc = np.concatenate([features, np.ones((n, 1)), Z], axis=1)
            self.intercept = features.shape[1]
            self.tcol = [self.intercept + 1 + j for j in range(d)]
        total = Zc.T @ Zc
        self.gram = []
        self.count = []
        for j in range(d):
            rows = target_mask[:, j]
            Zr = Zc[rows]
            self.gram.append(total - Zr.T @ Zr)  # rows where j is not intervened on
            self.count.append(int(n - rows.sum()))
        self.cache: dict[tuple[int, tuple[int, ...]], float] = {}

    def _nll(self, j: int, parents: tuple[int, ...]) -> float:
        G = self.gram[j]
        k = self.k
        idx = [i * k + c for i in parents for c in range(k)] + [self.intercept]
        t = self.tcol[j]
        m = self.count[j]
        if m < 2:
            return 0.0
        Gpp = G[np.ix_(idx, idx)]
        Gpj = G[idx, t]
        try:
            beta = np.linalg.solve(Gpp + 1e-9 * np.eye(len(idx)), Gpj)
        except np.linalg.LinAlgError:
            beta = np.linalg.lstsq(Gpp, Gpj, rcond=None)[0]
        return _gaussian_nll(float(G[t, t] - Gpj @ beta), m)


class SplineFeatureScorer(_CachedScorer):
    """Gaussian NLL of node j given parents P: least squares on the parents' hinge
    features plus ``r * |P|`` random tanh features ``tanh(z_P R_P + c)`` (R, c fixed per
    seed, so a parent set always gets the same features), over the rows where j is not
    intervened on."""

    def __init__(self, Z: np.ndarray, target_mask: np.ndarray, knots: int = 3, r: int = 8,
                 seed: int = 0):
        n, d = Z.shape
        self.Z, self.M, self.d, self.r = Z, target_mask, d, r
        self.hk = knots + 1
        self.k = self.hk + r
        self.H = hinge_features(Z, knots).reshape(n, d, self.hk)
        rng = np.random.default_rng(seed)
        self.R = rng.standard_normal((d, d * r))
        self.c = rng.uniform(-2.0, 2.0, d * r)
        self.cache: dict[tuple[int, tuple[int, ...]], float] = {}

    def _nll(self, j: int, parents: tuple[int, ...]) -> float:
        rows = ~self.M[:, j]
        m = int(rows.sum())
        if m < 2:
            return 0.0
        P = list(parents)
        cols = [np.ones((m, 1))]
        if P:
            q = self.r * len(P)
            cols.append(self.H[rows][:, P].reshape(m, -1))
            cols.append(np.tanh(self.Z[rows][:, P] @ self.R[P, :q] + self.c[:q]))
        X = np.concatenate(cols, axis=1)
        y = self.Z[rows, j]
        beta = np.linalg.lstsq(X, y, rcond=None)[0]
        return _gaussian_nll(float(((y - X @ beta) ** 2).sum()), m)


def _reach(B: np.ndarray) -> np.ndarray:
    """reach[i, j]: a directed path of length >= 1 from i to j."""
    R = B.astype(bool)
    while True:
        R2 = R | ((R.astype(np.int64) @ R.astype(np.int64)) > 0)
        if (R2 == R).all():
            return R
        R = R2


def greedy_polish(
    Z: np.ndarray,
    target_mask: np.ndarray,
    B: np.ndarray,
    penalty: float | None = None,
    max_moves: int = 1000,
    features: np.ndarray | None = None,
    k: int = 1,
    return_score: bool = False,
    scorer=None,
):
    """Hill-climb from ``B`` (0/1 DAG) on NLL + penalty * |edges|; returns the DAG (and
    its penalised score with ``return_score``). ``features``/``k``: see NodeScorer (or
    pass any ``scorer`` with ``score(j, parents)`` and ``k``); the default penalty is
    BIC's ``k/2 log n`` per edge.

    ``toggle[i, j]`` is the score gain of adding i -> j (if absent) or deleting it (if
    present), penalty included; a reversal i -> j => j -> i gains
    ``toggle[i, j] + toggle[j, i]``. Only the columns whose parent set changed are
    re-scored after a move."""
    n, d = Z.shape
    if scorer is None:
        scorer = NodeScorer(Z, target_mask, features, k)
    else:
        k = scorer.k
    penalty = 0.5 * k * math.log(n) if penalty is None else penalty
    B = (np.asarray(B) != 0).astype(np.int64).copy()
    parents = [set(np.flatnonzero(B[:, j]).tolist()) for j in range(d)]
    cur = np.array([scorer.score(j, parents[j]) for j in range(d)])
    toggle = np.full((d, d), -np.inf)

    def rescore(j):
        for i in range(d):
            if i == j:
                continue
            if B[i, j]:
                toggle[i, j] = cur[j] - scorer.score(j, parents[j] - {i}) + penalty
            else:
                toggle[i, j] = cur[j] - scorer.score(j, parents[j] | {i}) - penalty

    for j in range(d):
        rescore(j)
    for _ in range(max_moves):
        R = _reach(B)
        edge = B.astype(bool)
        # add i -> j: absent both ways, and j does not reach i
        add_ok = ~edge & ~edge.T & ~R.T
        np.fill_diagonal(add_ok, False)
        # reverse i -> j: no other path i ~> j (through a child c != j of i)
        other = (B.astype(np.int64) @ (R | np.eye(d, dtype=bool)).astype(np.int64)) - edge
        rev_ok = edge & (other <= 0)
        gains = np.where(edge | add_ok, toggle, -np.inf)
        rev_gain = np.where(rev_ok, toggle + toggle.T, -np.inf)
        k1, k2 = int(np.argmax(gains)), int(np.argmax(rev_gain))
        g1, g2 = gains.flat[k1], rev_gain.flat[k2]
        if max(g1, g2) <= 1e-9:
            break
        if g2 > g1:
            i, j = divmod(k2, d)
            B[i, j], B[j, i] = 0, 1
            parents[j].discard(i)
            parents[i].add(j)
            for node in (i, j):
                cur[node] = scorer.score(node, parents[node])
            rescore(i)
            rescore(j)
        else:
            i, j = divmod(k1, d)
            if B[i, j]:
                B[i, j] = 0
                parents[j].discard(i)
            else:
                B[i, j] = 1
                parents[j].add(i)
            cur[j] = scorer.score(j, parents[j])
            rescore(j)
    if return_score:
        return B, float(cur.sum() + penalty * B.sum())
    return B
