"""Covariate balance in the shape of MatchIt's ``summary()``.

For each covariate (categorical ones one row per level) and the distance (propensity
score), before ("all") and after ("matched") matching:

* ``smd``: (weighted mean treated - weighted mean control) / s, where s is the SD in the
  *whole* sample before matching of the treated group (ATT), of the control group (ATC), or
  sqrt((s_t^2 + s_c^2) / 2) (ATE); the same s before and after, as in MatchIt. SDs use n - 1.
* ``var_ratio``: weighted variance treated / control (reliability weights, n - 1 analogue:
  sum w (x - m)^2 / (sum w - sum w^2 / sum w)); left empty for binary columns, as in MatchIt.
* ``ecdf_mean``, ``ecdf_max``: mean and max absolute difference of the weighted empirical
  CDFs over the distinct values; for a binary column both are |p_t - p_c| (MatchIt).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def wmean(x: np.ndarray, w: np.ndarray) -> float:
    return float(np.sum(w * x) / np.sum(w))


def wvar(x: np.ndarray, w: np.ndarray) -> float:
    sw = np.sum(w)
    m = np.sum(w * x) / sw
    denom = sw - np.sum(w**2) / sw
    if denom <= 0:
        return float("nan")
    return float(np.sum(w * (x - m) ** 2) / denom)


def value_ends(xs: np.ndarray) -> np.ndarray:
    """For sorted ``xs``: where a new value starts after each element (length n - 1).
    Values within a relative 1e-12 of each other are one value: a propensity score
    computed for two units with the same covariates can differ in the last bit (BLAS
    blocking), and a tie must not split into two eCDF steps because of it."""
    a, b = xs[:-1], xs[1:]
    return (b - a) > 1e-12 * np.maximum(np.abs(a), np.abs(b))


@dataclass
class SortedColumn:
    """One column sorted once (stable) with its treatment flags, reused by every call."""

    order: np.ndarray
    xs: np.ndarray
    ts: np.ndarray
    distinct: bool  # every value once: each subset's eCDF steps at every unit

    @classmethod
    def of(cls, x: np.ndarray, t: np.ndarray) -> SortedColumn:
        order = np.argsort(x, kind="stable")
        xs = x[order]
        return cls(order, xs, t[order], bool(np.all(value_ends(xs))))


def ecdf_diffs(x, t, w, order=None) -> tuple[float, float]:
    """Mean and max |F_t - F_c| of the weighted eCDFs over the distinct values of x among
    the units with w > 0. ``order`` (argsort of x, or a :class:`SortedColumn`) may be
    passed to reuse one sort."""
    if isinstance(order, SortedColumn):
        ws = w[order.order]
        if order.distinct:
            keep = ws > 0
            ws, ts = (ws, order.ts) if keep.all() else (ws[keep], order.ts[keep])
            w1 = ws * ts
            c = np.cumsum(w1) / w1.sum() - np.cumsum(ws - w1) / (ws.sum() - w1.sum())
            d = np.abs(c)
            return float(d.mean()), float(d.max())
        ts, xs = order.ts, order.xs
    else:
        if order is None:
            order = np.argsort(x, kind="stable")
        ws, ts, xs = w[order], t[order], x[order]
    keep = ws > 0
    if not keep.all():
        ws, ts, xs = ws[keep], ts[keep], xs[keep]
    w1 = np.where(ts == 1, ws, 0.0)
    w0 = ws - w1
    c1 = np.cumsum(w1) / w1.sum()
    c0 = np.cumsum(w0) / w0.sum()
    last = np.flatnonzero(np.append(value_ends(xs), True))  # last index of each value
    d = np.abs(c1[last] - c0[last])
    return float(d.mean()), float(d.max())


def group_sds(x: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """SDs of x among the treated and the controls (NaN for a group of fewer than 2)."""
    m1 = t == 1
    s1 = np.std(x[m1], ddof=1) if np.sum(m1) > 1 else np.nan
    s0 = np.std(x[~m1], ddof=1) if np.sum(~m1) > 1 else np.nan
    return float(s1), float(s0)


def scale_from(s1: float, s0: float, estimand: str) -> float:
    """The SMD denominator for an estimand from the group SDs (:func:`group_sds`)."""
    if estimand == "ATT":
        return float(s1)
    if estimand == "ATC":
        return float(s0)
    return float(np.sqrt((s1**2 + s0**2) / 2))


def scale_sd(x: np.ndarray, t: np.ndarray, estimand: str) -> float:
    """The SMD denominator in the full sample (before matching)."""
    return scale_from(*group_sds(x, t), estimand)


def balance_row(x, t, w, binary: bool, sd: float, order=None) -> dict[str, float | None]:
    """Balance statistics of one column for weights ``w`` (0 = not in the sample)."""
    m1, m0 = (t == 1) & (w > 0), (t == 0) & (w > 0)
    x1, w1, x0, w0 = x[m1], w[m1], x[m0], w[m0]
    if len(x1) == 0 or len(x0) == 0:
        nan = float("nan")
        return dict(mean_treated=nan, mean_control=nan, smd=nan, var_ratio=None,
                    ecdf_mean=nan, ecdf_max=nan)
    mt, mc = wmean(x1, w1), wmean(x0, w0)
    diff = mt - mc
    smd = diff / sd if sd and np.isfinite(sd) and sd > 0 else (0.0 if diff == 0 else float("nan"))
    if binary:
        vr = None
        em = ex = abs(diff)
    else:
        v0 = wvar(x0, w0)
        vr = wvar(x1, w1) / v0 if v0 and np.isfinite(v0) and v0 > 0 else float("nan")
        em, ex = ecdf_diffs(x, t, w, order)
    return dict(mean_treated=mt, mean_control=mc, smd=float(smd), var_ratio=vr,
                ecdf_mean=em, ecdf_max=ex)


SMD_THRESHOLD = 0.1
VAR_RATIO_RANGE = (0.5, 2.0)


def flags(row: dict, kind: str) -> dict[str, bool | None]:
    """cobalt's balance thresholds: |SMD| > 0.1, variance ratio outside [0.5, 2]."""
    if kind == "distance":
        return {"smd_flag": None, "var_ratio_flag": None}
    smd, vr = row["smd"], row["var_ratio"]
    lo, hi = VAR_RATIO_RANGE
    return {
        "smd_flag": bool(abs(smd) > SMD_THRESHOLD) if np.isfinite(smd) else None,
        "var_ratio_flag": (bool(not lo <= vr <= hi) if vr is not None and np.isfinite(vr)
                           else None),
    }


def ess(w: np.ndarray) -> float:
    """Kish effective sample size (sum w)^2 / sum w^2 of the positive weights."""
    w = w[w > 0]
    return float(np.sum(w) ** 2 / np.sum(w**2)) if len(w) else 0.0
