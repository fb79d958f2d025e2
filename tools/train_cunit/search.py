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
the penalty is then ``k + r`` parameters per edge.

With unknown intervention targets (``RegimeTargetScorer``) the rows come in regimes,
and each node's score also chooses the regimes in which it was intervened on: the
search then runs over graphs and targets together."""

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

    def design(self, parents) -> np.ndarray:
        """(n, k |P|) over every row: the parents' hinge features and their random tanh
        features (what ``_nll`` regresses on; used by ``RegimeTargetScorer``)."""
        P = list(parents)
        n = len(self.Z)
        if not P:
            return np.empty((n, 0))
        q = self.r * len(P)
        return np.concatenate([self.H[:, P].reshape(n, -1),
                               np.tanh(self.Z[:, P] @ self.R[P, :q] + self.c[:q])], axis=1)

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


class RegimeTargetScorer(_CachedScorer):
    """Unknown intervention targets: node j's score given parents P, with the regimes in
    which j was intervened on chosen at the same time (a likelihood-ratio test per node
    per regime, under BIC).

    Rows come in regimes (``regimes``: an integer id per row; ``obs`` is the
    observational one, never a target). For a parent set P, node j's conditional is one
    least-squares regression on P's features shared by every regime not in S_j, and in
    each regime r of S_j a Gaussian of its own (a perfect intervention: j no longer
    listens to its parents; 2 parameters). S_j grows greedily while a regime's move to it
    lowers NLL + ``target_penalty`` (default BIC: log n) per regime; the score is that
    minimum, and ``targets(j, P)`` the chosen S_j. ``design``: None = linear (the
    variables themselves, k = 1), else a scorer with ``design(P)`` (n, k|P|) and ``k``
    (``SplineFeatureScorer``: the MLP mechanisms' surrogate)."""

    def __init__(self, Z: np.ndarray, regimes: np.ndarray, obs: int, design=None,
                 target_penalty: float | None = None):
        n, d = Z.shape
        self.Z, self.d, self.design = Z, d, design
        self.k = 1 if design is None else design.k
        self.regimes = np.asarray(regimes)
        ids = sorted(set(self.regimes.tolist()))
        self.ids = np.asarray(ids)
        self.rows = [np.flatnonzero(self.regimes == r) for r in ids]
        self.cand = np.asarray([i for i, r in enumerate(ids) if r != obs and
                                len(self.rows[i]) >= 2])
        self.penalty = math.log(n) if target_penalty is None else target_penalty
        if design is None:  # per-regime Gram matrices of [Z, 1], once
            Zc = np.concatenate([Z, np.ones((n, 1))], axis=1)
            self.gram = np.stack([Zc[r].T @ Zc[r] for r in self.rows])
        self.cache: dict[tuple[int, tuple[int, ...]], float] = {}
        self.chosen: dict[tuple[int, tuple[int, ...]], tuple[int, ...]] = {}

    def _stats(self, j: int, parents: tuple[int, ...]):
        """Per regime: Gram of [features, 1], X'y, y'y (intercept last)."""
        if self.design is None:
            idx = list(parents) + [self.d, j]
            G = self.gram[:, idx][:, :, idx]
        else:
            F = np.concatenate([self.design.design(parents), np.ones((len(self.Z), 1)),
                                self.Z[:, [j]]], axis=1)
            G = np.stack([F[r].T @ F[r] for r in self.rows])
        return G[:, :-1, :-1], G[:, :-1, -1], G[:, -1, -1]

    def _nll(self, j: int, parents: tuple[int, ...]) -> float:
        Gr, br, yyr = self._stats(j, parents)
        m_r = Gr[:, -1, -1]  # intercept x intercept = rows per regime
        s_r = br[:, -1]  # sum of y per regime
        marg = np.array([_gaussian_nll(float(yy - s * s / max(m, 1)), int(m))
                         for yy, s, m in zip(yyr, s_r, m_r, strict=True)])
        p = Gr.shape[1]
        ridge = 1e-9 * np.eye(p)
        G, b, yy, m = Gr.sum(0), br.sum(0), float(yyr.sum()), float(m_r.sum())

        def shared(Gs, bs, yys, ms):
            beta = np.linalg.solve(Gs + ridge, bs[..., None])[..., 0]
            rss = yys - (bs * beta).sum(-1)
            return np.array([_gaussian_nll(float(r), int(c))
                             for r, c in zip(np.atleast_1d(rss), np.atleast_1d(ms),
                                             strict=True)])

        cur = float(shared(G[None], b[None], np.array([yy]), np.array([m]))[0])
        chosen: list[int] = []
        extra = 0.0
        left = [int(c) for c in self.cand]
        while left:
            c = np.asarray(left)
            ms = m - m_r[c]
            ok = ms >= p + 2
            if not ok.any():
                break
            c = c[ok]
            cand = shared(G[None] - Gr[c], b[None] - br[c], yy - yyr[c], m - m_r[c])
            gain = cur - (cand + marg[c]) - self.penalty
            best = int(np.argmax(gain))
            if gain[best] <= 0:
                break
            r = int(c[best])
            chosen.append(r)
            left.remove(r)
            G, b, yy, m = G - Gr[r], b - br[r], yy - float(yyr[r]), m - float(m_r[r])
            cur = float(cand[best])
            extra += float(marg[r]) + self.penalty
        self.chosen[(j, parents)] = tuple(int(self.ids[r]) for r in sorted(chosen))
        return cur + extra

    def targets(self, j: int, parents) -> tuple[int, ...]:
        """The regimes (ids) in which node j is intervened on, given its parents."""
        key = (j, tuple(sorted(int(p) for p in parents)))
        self.score(j, key[1])
        return self.chosen[key]

    def target_mask(self, B: np.ndarray) -> np.ndarray:
        """(n, d) bool: row i's node j is intervened on (its regime is in S_j given B)."""
        M = np.zeros((len(self.Z), self.d), dtype=bool)
        for j in range(self.d):
            for r in self.targets(j, np.flatnonzero(B[:, j])):
                M[self.regimes == r, j] = True
        return M


def search_graph_and_targets(scorer: RegimeTargetScorer, known, starts=(), rounds: int = 5):
    """The search over graphs and targets (unknown targets), from several starts: the
    empty graph, the graph the known-target search finds when every node is taken as a
    target in the regimes where its conditional on all other variables changes (a
    superset: targets and their parents), and ``starts``. From each, the joint greedy
    search alternates with a known-target greedy search (from the empty graph, ``known(M)``
    for the current target mask M) while the joint score improves (the joint search
    alone stalls in local optima). Returns (graph, penalised score) of the best."""
    d = scorer.d
    pen = 0.5 * scorer.k * math.log(len(scorer.Z))

    def total(A):
        return sum(scorer.score(j, tuple(np.flatnonzero(A[:, j]))) for j in range(d)) + \
            pen * A.sum()

    def alternate(A):
        A = greedy_polish(scorer.Z, None, A, scorer=scorer)
        for _ in range(rounds):
            A2 = greedy_polish(scorer.Z, None, known(scorer.target_mask(A)), scorer=scorer)
            if total(A2) >= total(A) - 1e-9:
                break
            A = A2
        return A

    mb = np.zeros(scorer.Z.shape, dtype=bool)
    for j in range(d):
        for r in scorer.targets(j, [i for i in range(d) if i != j]):
            mb[scorer.regimes == r, j] = True
    best = None
    for A0 in [np.zeros((d, d), dtype=np.int64), known(mb), *starts]:
        A = alternate(np.asarray(A0, dtype=np.int64))
        score = total(A)
        if best is None or score < best[1] - 1e-9:
            best = (A, score)
    return best


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
