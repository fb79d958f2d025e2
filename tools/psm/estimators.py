"""Effect estimators beyond the matched difference: weighted regression with sandwich
standard errors, inverse probability weighting and cross-fitted AIPW.

* :func:`wls_effect`: weighted least squares of y on t (and, for regression adjustment,
  covariates centred at the target population's weighted means and their interactions
  with t, so the coefficient of t is the g-computation estimate for that population, as
  MatchIt's effect-estimation vignette does after matching). Standard errors are
  cluster-robust by matched set / subclass (CR1: G/(G-1) (n-1)/(n-k), as statsmodels and
  R's sandwich::vcovCL) or HC1 without clusters.
* :func:`ipw`: Hajek (normalised) inverse probability weighting for ATE, ATT, ATC and the
  overlap population (ATO), optionally stabilised and trimmed; the standard error is the
  M-estimation sandwich stacked with the logistic propensity model's score, so the
  uncertainty of the estimated propensity counts.
* :func:`aipw`: augmented IPW (doubly robust), K-fold cross-fitted propensity and outcome
  models (scikit-learn learners), influence-function intervals.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

Z975 = float(stats.norm.ppf(0.975))


def _result(est: float, se: float, n: int, method: str) -> dict[str, Any]:
    p = float(2 * stats.norm.sf(abs(est) / se)) if se > 0 else float("nan")
    return dict(estimate=float(est), se=float(se), ci_low=float(est - Z975 * se),
                ci_high=float(est + Z975 * se), p_value=p, n_sets=int(n), se_method=method)


def sandwich(X: np.ndarray, resid: np.ndarray, w: np.ndarray,
             cluster: np.ndarray | None) -> np.ndarray:
    """CR1 (clusters) or HC1 covariance of weighted least squares coefficients."""
    n, k = X.shape
    bread = np.linalg.pinv(X.T @ (X * w[:, None]))
    s = X * (w * resid)[:, None]
    if cluster is not None:
        _, g = np.unique(cluster, return_inverse=True)
        G = int(g.max()) + 1
        S = np.zeros((G, k))
        np.add.at(S, g, s)
        adj = G / (G - 1) * (n - 1) / (n - k) if G > 1 else 1.0
    else:
        S = s
        adj = n / (n - k)
    return adj * bread @ (S.T @ S) @ bread


def wls_effect(y: np.ndarray, t: np.ndarray, w: np.ndarray, *, X: np.ndarray | None = None,
               target: str = "ATT", cluster: np.ndarray | None = None) -> dict[str, Any]:
    """Effect of t from a weighted regression over the units with w > 0."""
    m = w > 0
    y, t, w = y[m], t[m].astype(float), w[m]
    cl = cluster[m] if cluster is not None else None
    cols = [np.ones(len(y)), t]
    if X is not None and X.shape[1]:
        Xs = X[m]
        keep = np.ptp(Xs, axis=0) > 0
        Xs = Xs[:, keep]
        pop = {"ATT": t == 1, "ATC": t == 0}.get(target, np.ones(len(t), dtype=bool))
        mu = np.average(Xs[pop], axis=0, weights=w[pop])
        Xc = Xs - mu
        cols += list(Xc.T) + list((Xc * t[:, None]).T)
    D = np.column_stack(cols)
    beta = np.linalg.lstsq(D * np.sqrt(w)[:, None], y * np.sqrt(w), rcond=None)[0]
    V = sandwich(D, y - D @ beta, w, cl)
    kind = "regression adjustment (g-computation)" if X is not None else "weighted difference"
    se_kind = "cluster-robust (CR1) by matched set" if cl is not None else "robust (HC1)"
    return _result(beta[1], float(np.sqrt(max(V[1, 1], 0.0))), int(m.sum()),
                   f"{kind}, {se_kind} standard error, normal 95% CI")


def ipw_weights(e: np.ndarray, t: np.ndarray, estimand: str,
                stabilize: bool = False) -> np.ndarray:
    """Balancing weights for ATE, ATT, ATC or ATO (overlap) from propensity scores e."""
    t = t.astype(float)
    if estimand == "ATE":
        w = t / e + (1 - t) / (1 - e)
        if stabilize:
            p = t.mean()
            w = w * np.where(t == 1, p, 1 - p)
    elif estimand == "ATT":
        w = t + (1 - t) * e / (1 - e)
    elif estimand == "ATC":
        w = t * (1 - e) / e + (1 - t)
    elif estimand == "ATO":
        w = t * (1 - e) + (1 - t) * e
    else:
        raise ValueError(estimand)
    return w


def _logistic(X: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Unpenalised logistic regression coefficients (intercept first), Newton steps."""
    D = np.column_stack([np.ones(len(t)), X])
    b = np.zeros(D.shape[1])
    for _ in range(100):
        p = 1 / (1 + np.exp(-(D @ b)))
        g = D.T @ (t - p)
        H = (D * (p * (1 - p))[:, None]).T @ D
        step = np.linalg.lstsq(H, g, rcond=None)[0]
        b += step
        if np.max(np.abs(step)) < 1e-12:
            break
    return b


def ipw(y: np.ndarray, t: np.ndarray, X: np.ndarray, estimand: str, *,
        stabilize: bool = False, trim: float = 0.0) -> dict[str, Any]:
    """Hajek IPW with a logistic propensity model and the stacked M-estimation sandwich.

    ``trim`` > 0 drops units with a propensity outside [trim, 1 - trim] (Crump et al.) and
    refits the propensity on the rest; the estimate is then for the trimmed population.
    """
    t = t.astype(float)
    mu_x, sd_x = X.mean(axis=0), X.std(axis=0)
    sd_x[sd_x == 0] = 1.0
    Z = (X - mu_x) / sd_x
    keep = np.ones(len(t), dtype=bool)
    if trim > 0:
        b = _logistic(Z, t)
        e = 1 / (1 + np.exp(-(np.column_stack([np.ones(len(t)), Z]) @ b)))
        keep = (e >= trim) & (e <= 1 - trim)
        y, t, Z = y[keep], t[keep], Z[keep]
    D = np.column_stack([np.ones(len(t)), Z])
    b = _logistic(Z, t)
    n, k = D.shape

    def g(theta: np.ndarray) -> np.ndarray:
        beta, m1, m0 = theta[:k], theta[k], theta[k + 1]
        e = 1 / (1 + np.exp(-(D @ beta)))
        w = ipw_weights(e, t, estimand, stabilize)
        return np.column_stack([D * (t - e)[:, None], t * w * (y - m1),
                                (1 - t) * w * (y - m0)])

    e = 1 / (1 + np.exp(-(D @ b)))
    w = ipw_weights(e, t, estimand, stabilize)
    m1 = np.sum(t * w * y) / np.sum(t * w)
    m0 = np.sum((1 - t) * w * y) / np.sum((1 - t) * w)
    theta = np.concatenate([b, [m1, m0]])
    G = g(theta)
    A = np.zeros((k + 2, k + 2))
    for j in range(k + 2):
        h = 1e-6 * max(1.0, abs(theta[j]))
        tp, tm = theta.copy(), theta.copy()
        tp[j] += h
        tm[j] -= h
        A[:, j] = (g(tp).mean(axis=0) - g(tm).mean(axis=0)) / (2 * h)
    Ainv = np.linalg.pinv(A)
    V = Ainv @ (G.T @ G / n) @ Ainv.T / n
    c = np.zeros(k + 2)
    c[k], c[k + 1] = 1.0, -1.0
    se = float(np.sqrt(max(c @ V @ c, 0.0)))
    label = {"ATE": "inverse probability", "ATT": "ATT odds", "ATC": "ATC odds",
             "ATO": "overlap"}[estimand]
    extra = (", stabilised" if stabilize and estimand == "ATE" else "") + (
        f", trimmed to propensity in [{trim}, {1 - trim}] ({int((~keep).sum())} units dropped)"
        if trim > 0 else "")
    return _result(m1 - m0, se, n, f"IPW ({label} weights, Hajek{extra}), M-estimation "
                   "sandwich SE with the logistic propensity model stacked, normal 95% CI")


def aipw(y: np.ndarray, t: np.ndarray, X: np.ndarray, estimand: str, *, folds: int = 5,
         learner: str = "linear", seed: int = 0, clip: float = 0.01) -> dict[str, Any]:
    """Cross-fitted AIPW: per fold, propensity and outcome models fitted on the other folds;
    estimate and standard error from the efficient influence function."""
    from sklearn.model_selection import KFold

    t = t.astype(int)
    n = len(y)
    e = np.zeros(n)
    m1 = np.zeros(n)
    m0 = np.zeros(n)
    for tr, te in KFold(folds, shuffle=True, random_state=seed).split(X):
        ps_model, out1, out0 = _learners(learner, seed)
        ps_model.fit(X[tr], t[tr])
        e[te] = ps_model.predict_proba(X[te])[:, 1]
        a, b = tr[t[tr] == 1], tr[t[tr] == 0]
        out1.fit(X[a], y[a])
        out0.fit(X[b], y[b])
        m1[te] = out1.predict(X[te])
        m0[te] = out0.predict(X[te])
    e = np.clip(e, clip, 1 - clip)
    if estimand == "ATE":
        phi = m1 - m0 + t * (y - m1) / e - (1 - t) * (y - m0) / (1 - e)
        tau = phi.mean()
        psi = phi - tau
    elif estimand == "ATT":
        p = t.mean()
        r = t * (y - m0) - (1 - t) * e / (1 - e) * (y - m0)
        tau = r.sum() / t.sum()
        psi = (r - t * tau) / p
    elif estimand == "ATC":
        q = 1 - t.mean()
        r = (1 - t) * (m1 - y) + t * (1 - e) / e * (y - m1)
        tau = r.sum() / (1 - t).sum()
        psi = (r - (1 - t) * tau) / q
    else:
        raise ValueError(estimand)
    se = float(np.std(psi, ddof=1) / np.sqrt(n))
    return _result(tau, se, n, f"AIPW, {folds}-fold cross-fitted ({learner} learners, "
                   f"propensity clipped to [{clip}, {1 - clip}]), influence-function SE, "
                   "normal 95% CI")


def _learners(kind: str, seed: int):
    if kind == "linear":
        from sklearn.linear_model import LinearRegression, LogisticRegression

        return (LogisticRegression(C=np.inf, solver="newton-cholesky", max_iter=200),
                LinearRegression(), LinearRegression())
    if kind == "gbm":
        from sklearn.ensemble import HistGradientBoostingClassifier as C
        from sklearn.ensemble import HistGradientBoostingRegressor as R

        kw = dict(max_depth=3, learning_rate=0.05, max_iter=300, early_stopping=True,
                  random_state=seed)
        return C(**kw), R(**kw), R(**kw)
    raise ValueError(f"unknown learner {kind!r}")
