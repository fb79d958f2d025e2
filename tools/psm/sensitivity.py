"""Sensitivity to unmeasured confounding: Rosenbaum bounds and E-values.

Rosenbaum bounds (Rosenbaum 2002, ch. 4; R's ``rbounds::psens``): Wilcoxon's signed-rank
statistic on the matched-set differences d_i (treated minus the mean of its matched
controls, so 1:k sets are treated as pairs of the treated unit and its control mean; zero
differences dropped, tied |d| get average ranks). If an unobserved confounder can change
the odds of treatment within a set by at most Gamma, the one-sided p-value in the direction
of the estimate is at most 1 - Phi((T - E) / sqrt(V)) with E = p+ sum r_i,
V = p+ (1 - p+) sum r_i^2, p+ = Gamma / (1 + Gamma). ``gamma_critical`` is the Gamma at which
that bound reaches alpha (0.05): the study is robust to confounding up to that strength.
For binary outcomes this reduces to the sign (McNemar-type) test on discordant sets.

E-value (VanderWeele & Ding 2017): the minimum strength of association (risk-ratio scale)
an unmeasured confounder needs with both treatment and outcome to explain the estimate
away, E = RR + sqrt(RR (RR - 1)) for RR >= 1 (RR -> 1/RR below 1). Binary outcome: RR =
(p0 + effect) / p0 with p0 the matched control risk. Continuous outcome: the approximation
RR = exp(0.91 d), d = effect / SD(outcome). The CI's E-value uses the limit nearer the null
(1 if the interval covers it).
"""

from __future__ import annotations

import numpy as np
from scipy import optimize, stats


def _rank_sums(d: np.ndarray) -> tuple[float, float, float, int]:
    """(T, sum of ranks, sum of squared ranks, n) of the signed-rank test on d != 0."""
    d = d[d != 0]
    if len(d) == 0:
        return 0.0, 0.0, 0.0, 0
    r = stats.rankdata(np.abs(d))
    return float(np.sum(r[d > 0])), float(r.sum()), float(np.sum(r**2)), len(d)


def _p_upper(sums: tuple[float, float, float, int], gamma: float) -> float:
    T, s1, s2, n = sums
    if n == 0:
        return 1.0
    pp = gamma / (1 + gamma)
    return float(stats.norm.sf((T - pp * s1) / np.sqrt(pp * (1 - pp) * s2)))


def rosenbaum_p_upper(d: np.ndarray, gamma: float) -> float:
    """Upper bound of the one-sided signed-rank p-value (alternative: effect > 0)."""
    return _p_upper(_rank_sums(d), gamma)


def rosenbaum(d: np.ndarray, alpha: float = 0.05, grid=(1, 1.25, 1.5, 2, 3, 5)) -> dict:
    sign = 1.0 if np.mean(d) >= 0 else -1.0
    sums = _rank_sums(sign * np.asarray(d, dtype=float))  # ranked once for every Gamma
    table = [{"gamma": float(g), "p_upper": _p_upper(sums, g)} for g in grid]
    p1 = _p_upper(sums, 1.0)
    if p1 >= alpha:
        gcrit = None
        note = f"not significant at alpha={alpha} even without hidden bias (Gamma = 1)"
    else:
        f = lambda lg: _p_upper(sums, float(np.exp(lg))) - alpha  # noqa: E731
        hi = np.log(2.0)
        while f(hi) < 0 and hi < np.log(1e6):
            hi *= 2
        if f(hi) < 0:
            gcrit, note = float("inf"), "significant for every Gamma tried (up to 1e6)"
        else:
            gcrit = float(np.exp(optimize.brentq(f, 0.0, hi, xtol=1e-6)))
            note = (
                f"significance at alpha={alpha} (one-sided, direction of the estimate) is "
                f"lost at Gamma = {gcrit:.3f}"
            )
    return {
        "test": "Wilcoxon signed-rank on matched-set differences (normal approximation)",
        "alpha": alpha,
        "direction": "positive" if sign > 0 else "negative",
        "n_sets": int(len(d)),
        "n_nonzero": int(np.sum(np.asarray(d) != 0)),
        "gamma_critical": gcrit,
        "p_upper_by_gamma": table,
        "note": note,
    }


def _e(rr: float) -> float:
    if not np.isfinite(rr) or rr <= 0:
        return float("nan")
    rr = rr if rr >= 1 else 1 / rr
    return float(rr + np.sqrt(rr * (rr - 1)))


def e_value(est: float, lo: float, hi: float, binary: bool, p0: float, sd_y: float) -> dict:
    if binary:
        if p0 <= 0:
            return {"e_value": None, "e_value_ci": None, "scale": "risk ratio",
                    "note": "matched control risk is 0; E-value undefined"}
        to_rr = lambda x: (p0 + x) / p0  # noqa: E731
        scale = f"risk ratio (matched control risk p0 = {p0:.4g})"
    else:
        if not sd_y > 0:
            return {"e_value": None, "e_value_ci": None, "scale": "approximate risk ratio",
                    "note": "outcome SD is 0"}
        to_rr = lambda x: float(np.exp(0.91 * x / sd_y))  # noqa: E731
        scale = f"approximate risk ratio exp(0.91 d), d = effect / SD(outcome), SD = {sd_y:.4g}"
    rr = to_rr(est)
    if lo <= 0 <= hi:
        e_ci = 1.0
    else:
        e_ci = _e(to_rr(lo if est > 0 else hi))
    return {"e_value": _e(rr), "e_value_ci": e_ci, "rr": float(rr), "scale": scale}
