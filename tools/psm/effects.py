"""Effect estimates from matched sets: ATT, ATC, ATE, their standard errors, the naive gap.

A matched set is a focal unit and its matches. For ATT the focal units are the treated and
d_i = y_i - mean(y of its matched controls); for ATC the focal units are the controls and
d_i = mean(y of its matched treated) - y_i; the ATE pools both kinds of set. An estimate is
the mean of d_i over the sets.

Standard errors (hand-rolled; no maintained Python package implements them):

* ``ai``: Abadie & Imbens (2006, Econometrica 74(1), Theorem 7), matching on the propensity
  score treated as known, with conditional variances sigma^2(X_j) estimated by matching each
  unit to its J nearest units of its own group (J = 2, as Stata's ``teffects``). For sets
  of variable size (a caliper, ties) the K_M(j)/M terms generalise to
  w_j = sum over sets using j of 1 / M_i:
  V = [ sum_i (d_i - tau)^2 + sum_j ((f_j + w_j)^2 - f_j - q_j) sigma^2_j ] / N^2,
  f_j = 1 if j is a focal unit, q_j = sum over sets using j of 1 / M_i^2.
  With 1:1 matching without replacement this is the paired variance.
* ``bias-corrected`` (``--estimator bias-corrected``): Abadie & Imbens (2011, JBES 29(1)):
  each match's outcome is moved to its focal unit's covariates by a linear regression of
  the outcome on the covariates over the matched pool units (weighted by their use),
  d_i - (mu(X_i) - mean mu(X_j)) for the ATT; the same variance formula applies.
  Inexact matches (a caliper, a thin pool) leave a bias of the order of the SE that the
  plain difference keeps and no SE formula can carry.
* ``bootstrap``: the paired (matched-set) bootstrap of Austin & Small (2014): resample
  whole matched sets (stratified by kind for the ATE), percentile interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

Z975 = float(stats.norm.ppf(0.975))


@dataclass
class SetDiffs:
    """Per-set differences of one matching direction (unit indices are contrast-local)."""

    focal: np.ndarray  # focal unit of each set
    d: np.ndarray  # difference treated - control of each set
    size: np.ndarray  # number of matches M_i
    pair_focal: np.ndarray  # per pair: set index
    pair_match: np.ndarray  # per pair: unit index of the match


def set_diffs(y: np.ndarray, pf: np.ndarray, pm: np.ndarray, focal_treated: bool) -> SetDiffs:
    """``pf``/``pm``: per pair, the focal unit and its match (unit indices)."""
    focal, inv, counts = np.unique(pf, return_inverse=True, return_counts=True)
    mean_match = np.bincount(inv, weights=y[pm], minlength=len(focal)) / counts
    d = y[focal] - mean_match if focal_treated else mean_match - y[focal]
    return SetDiffs(focal=focal, d=d, size=counts, pair_focal=inv, pair_match=pm)


def bias_correct(s: SetDiffs, X: np.ndarray, y: np.ndarray, focal_treated: bool) -> SetDiffs:
    """Abadie-Imbens (2011) regression bias correction of one direction's set differences."""
    pm = s.pair_match
    use = np.bincount(pm, weights=1.0 / s.size[s.pair_focal], minlength=len(y))
    units = np.flatnonzero(use > 0)
    A = np.column_stack([np.ones(len(units)), X[units]])
    sw = np.sqrt(use[units])
    beta = np.linalg.lstsq(A * sw[:, None], y[units] * sw, rcond=None)[0]
    mu = X @ beta[1:]  # the intercept cancels
    mean_match = np.bincount(s.pair_focal, weights=mu[pm], minlength=len(s.focal)) / s.size
    adj = mu[s.focal] - mean_match
    d = s.d - adj if focal_treated else s.d + adj
    return SetDiffs(focal=s.focal, d=d, size=s.size, pair_focal=s.pair_focal, pair_match=pm)


def cond_var(dist: np.ndarray, y: np.ndarray, t: np.ndarray, J: int = 2,
             need: np.ndarray | None = None) -> np.ndarray:
    """sigma^2(X_j, W_j): J/(J+1) (y_j - mean of its J nearest same-group units)^2, for the
    units ``need`` (indices; default all; the others are left 0)."""
    out = np.zeros(len(y))
    want = np.ones(len(y), dtype=bool) if need is None else np.isin(np.arange(len(y)), need)
    for g in (0, 1):
        idx = np.flatnonzero(t == g)
        n = len(idx)
        if n < 2 or not want[idx].any():
            continue
        jj = min(J, n - 1)
        o = idx[np.lexsort((idx, dist[idx]))]
        v, yy = dist[o], y[o]
        pos = np.flatnonzero(want[o])
        m = len(pos)
        offs = np.concatenate([np.arange(-jj, 0), np.arange(1, jj + 1)])
        cand = pos[:, None] + offs[None, :]
        valid = (cand >= 0) & (cand < n)
        cc = np.clip(cand, 0, n - 1)
        dd = np.abs(v[cc] - v[pos][:, None])
        dd[~valid] = np.inf
        rows = np.repeat(np.arange(m), cand.shape[1])
        srt = np.lexsort((np.abs(offs)[None, :].repeat(m, 0).ravel(), dd.ravel(), rows))
        srt = srt.reshape(m, cand.shape[1])[:, :jj]
        nb = cc.ravel()[srt]
        out[o[pos]] = jj / (jj + 1) * (yy[pos] - yy[nb].mean(axis=1)) ** 2
    return out


def ai_variance(sets: list[SetDiffs], n_units: int, sigma2) -> float:
    """Abadie-Imbens variance of the mean of d over all the given sets (see module doc).
    ``sigma2``: conditional variances per unit, or a function of the unit indices that
    need them returning the full-length array (:func:`cond_var` with ``need``)."""
    d = np.concatenate([s.d for s in sets])
    N = len(d)
    tau = d.mean()
    f = np.zeros(n_units)
    w = np.zeros(n_units)
    q = np.zeros(n_units)
    for s in sets:
        f[s.focal] = 1.0
        inv_m = 1.0 / s.size[s.pair_focal]
        w += np.bincount(s.pair_match, weights=inv_m, minlength=n_units)
        q += np.bincount(s.pair_match, weights=inv_m**2, minlength=n_units)
    extra = (f + w) ** 2 - f - q
    # extra is 0 for a unit used once (1:1 without replacement): only the others need sigma^2
    used = np.flatnonzero(np.abs(extra) > 1e-12)
    s2 = sigma2(used)[used] if callable(sigma2) else sigma2[used]
    v = (np.sum((d - tau) ** 2) + np.sum(extra[used] * s2)) / N**2
    return float(max(v, 0.0))


def bootstrap(sets: list[SetDiffs], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Paired bootstrap of the mean of d: resample sets within each kind."""
    sizes = np.array([len(s.d) for s in sets], dtype=float)
    total = sizes.sum()
    out = np.zeros(n_boot)
    chunk = max(1, int(2e7 // max(1, int(sizes.max()))))
    for s, n in zip(sets, sizes, strict=True):
        n = int(n)
        for start in range(0, n_boot, chunk):
            b = min(chunk, n_boot - start)
            idx = rng.integers(0, n, size=(b, n))
            out[start : start + b] += s.d[idx].sum(axis=1)
    return out / total


def estimate(
    sets: list[SetDiffs],
    n_units: int,
    sigma2,
    se_method: str,
    n_boot: int,
    rng: np.random.Generator,
) -> dict[str, float | str | int]:
    d = np.concatenate([s.d for s in sets])
    tau = float(d.mean())
    if se_method == "ai":
        se = float(np.sqrt(ai_variance(sets, n_units, sigma2)))
        lo, hi = tau - Z975 * se, tau + Z975 * se
        method = "Abadie-Imbens (2006), propensity score treated as known, normal 95% CI"
    else:
        boot = bootstrap(sets, n_boot, rng)
        se = float(np.std(boot, ddof=1))
        lo, hi = (float(v) for v in np.quantile(boot, [0.025, 0.975]))
        method = f"paired (matched-set) bootstrap, {n_boot} replicates, percentile 95% CI"
    p = float(2 * stats.norm.sf(abs(tau) / se)) if se > 0 else (0.0 if tau != 0 else 1.0)
    return dict(estimate=tau, se=se, ci_low=float(lo), ci_high=float(hi), p_value=p,
                n_sets=int(len(d)), se_method=method)


def naive(y: np.ndarray, t: np.ndarray) -> dict[str, float | str | int]:
    """Difference in means over all units with a Welch standard error."""
    y1, y0 = y[t == 1], y[t == 0]
    diff = float(y1.mean() - y0.mean())
    v1 = y1.var(ddof=1) / len(y1) if len(y1) > 1 else np.nan
    v0 = y0.var(ddof=1) / len(y0) if len(y0) > 1 else np.nan
    se = float(np.sqrt(v1 + v0))
    p = float(2 * stats.norm.sf(abs(diff) / se)) if se > 0 else float("nan")
    return dict(estimate=diff, se=se, ci_low=diff - Z975 * se, ci_high=diff + Z975 * se,
                p_value=p, n_sets=int(len(y)), se_method="Welch, normal 95% CI")
