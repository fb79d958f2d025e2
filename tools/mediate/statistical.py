"""Causal mediation analysis (Imai, Keele & Tingley 2010), vectorised.

Models (one mediator at a time, covariates X in both):
  mediator  M ~ 1 + T + X                 linear (OLS), logistic or probit
  outcome   Y ~ 1 + T + M [+ T:M] + X     linear (OLS), logistic or probit

With mu(a, b) = mean over units of E[Y(t_a, M(t_b))] the quantities are (R's ``mediate``
names in brackets): ACME(control) = mu(0,1) - mu(0,0) [d0], ACME(treated) = mu(1,1) - mu(1,0)
[d1], ADE(control) = mu(1,0) - mu(0,0) [z0], ADE(treated) = mu(1,1) - mu(0,1) [z1], total
= mu(1,1) - mu(0,0) [tau], proportion mediated = ACME / total [n0, n1], and the averages.

Inference, as in R's ``mediation`` and ``statsmodels.stats.mediation``:
* quasi-Bayesian: draw J parameter vectors of each model from N(estimate, covariance)
  (King, Tomz & Wittenberg 2000); point estimate = mean of the draws (median for the
  proportions), 95% interval = 2.5 and 97.5 percentiles.
* bootstrap: refit both models on J resamples of the units; point estimate on the original
  sample, percentile interval.

Hand-rolled for speed: R and statsmodels loop over draws and simulate a mediator value per
unit; here all draws are matrix algebra. Where E over the mediator's distribution has a
closed form it is used exactly (linear outcome: E[M]; binary mediator with binary
outcome: the two-point mixture); for a binary outcome with a linear mediator one mediator
draw per unit and simulation is used, as in R (the same noise under both treatment values).
The bootstrap refits use weighted least squares / Newton steps on resampling counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.special import expit, ndtr

INV_LINK = {"logistic": expit, "probit": ndtr}  # binary models: P(1) from the linear predictor

EFFECTS = (
    "acme_control", "acme_treated", "acme_average",
    "ade_control", "ade_treated", "ade_average",
    "total",
    "prop_mediated_control", "prop_mediated_treated", "prop_mediated_average",
)


@dataclass
class ModelFit:
    kind: str  # "linear" | "logistic" | "probit"
    params: np.ndarray
    cov: np.ndarray
    sigma: float | None  # residual SD (linear), df-corrected as R's summary()$sigma
    names: list[str]
    converged: bool = True


def fit_model(y: np.ndarray, X: np.ndarray, kind: str, names: list[str]) -> ModelFit:
    """OLS or unpenalised logistic regression (statsmodels) with the usual covariance."""
    import warnings

    import statsmodels.api as sm

    if kind == "linear":
        r = sm.OLS(y, X).fit()
        return ModelFit("linear", np.asarray(r.params), np.asarray(r.cov_params()),
                        float(np.sqrt(r.scale)), names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sm.Probit if kind == "probit" else sm.Logit
        r = model(y, X).fit(disp=0, method="newton", maxiter=100)
    return ModelFit(kind, np.asarray(r.params), np.asarray(r.cov_params()), None, names,
                    converged=bool(r.mle_retvals.get("converged", True)))


@dataclass
class Spec:
    """Column layout of the two design matrices (see module doc)."""

    interaction: bool
    t_values: tuple[float, float]  # (control, treated) values of T

    @property
    def y_x_start(self) -> int:
        return 4 if self.interaction else 3


def design(t: np.ndarray, m: np.ndarray, X: np.ndarray, interaction: bool):
    one = np.ones((len(t), 1))
    dm = np.column_stack([one, t, X])
    cols = [one, t, m] + ([t * m] if interaction else []) + [X]
    return dm, np.column_stack(cols)


def mu_table(thM: np.ndarray, thY: np.ndarray, sigma_m: float | None, kind_m: str,
             kind_y: str, X: np.ndarray, spec: Spec, rng: np.random.Generator,
             chunk_elems: int = 2_000_000) -> np.ndarray:
    """mu[a, b, j]: mean over units of E[Y(t_a, M(t_b))] under parameter draw j."""
    J = thM.shape[0]
    tv = spec.t_values
    a0, aT, aX = thM[:, 0], thM[:, 1], thM[:, 2:]
    b0, bT, bM = thY[:, 0], thY[:, 1], thY[:, 2]
    bTM = thY[:, 3] if spec.interaction else np.zeros(J)
    bX = thY[:, spec.y_x_start:]
    xbar = X.mean(axis=0)
    mu = np.empty((2, 2, J))
    inv_m, inv_y = INV_LINK.get(kind_m), INV_LINK.get(kind_y)
    slope = [bM + bTM * tv[a] for a in (0, 1)]  # d E[Y] / d M under t_a

    if kind_y == "linear":
        if kind_m == "linear":
            em = [a0 + aT * tv[b] + aX @ xbar for b in (0, 1)]
        else:
            em = [np.empty(J), np.empty(J)]
            for s in _chunks(J, len(X), chunk_elems):
                base = a0[s, None] + aX[s] @ X.T
                for b in (0, 1):
                    em[b][s] = inv_m(base + aT[s, None] * tv[b]).mean(axis=1)
        cst = b0 + bX @ xbar
        for a in (0, 1):
            for b in (0, 1):
                mu[a, b] = cst + bT * tv[a] + slope[a] * em[b]
        return mu

    buf = None
    for s in _chunks(J, len(X), chunk_elems):
        baseM = aX[s] @ X.T
        baseM += a0[s, None]
        baseY = bX[s] @ X.T
        baseY += b0[s, None]
        if buf is None or buf.shape != baseM.shape:
            buf = np.empty_like(baseM)
            mb = np.empty_like(baseM)
        if kind_m != "linear":
            # E over M in {0, 1}: p_b * E[Y | m=1] + (1 - p_b) * E[Y | m=0]
            p = []
            for b in (0, 1):
                pb = baseM + (aT[s] * tv[b])[:, None]
                p.append(inv_m(pb, out=pb))
            for a in (0, 1):
                np.add(baseY, (bT[s] * tv[a])[:, None], out=buf)
                y0 = inv_y(buf)
                buf += slope[a][s, None]
                y1 = inv_y(buf, out=buf)
                y1 -= y0  # mean(p y1 + (1 - p) y0) = mean(y0) + mean(p (y1 - y0))
                m0 = y0.mean(axis=1)
                for b in (0, 1):
                    np.multiply(p[b], y1, out=y0)
                    mu[a, b, s] = m0 + y0.mean(axis=1)
        else:
            e = rng.standard_normal(baseM.shape)
            e *= sigma_m
            baseM += e
            for b in (0, 1):
                np.add(baseM, (aT[s] * tv[b])[:, None], out=mb)
                for a in (0, 1):
                    np.multiply(mb, slope[a][s, None], out=buf)
                    buf += baseY
                    buf += (bT[s] * tv[a])[:, None]
                    inv_y(buf, out=buf)
                    mu[a, b, s] = buf.mean(axis=1)
    return mu


def _chunks(J: int, n: int, elems: int):
    step = max(1, elems // max(1, n))
    for start in range(0, J, step):
        yield slice(start, min(J, start + step))


def effects_from_mu(mu: np.ndarray) -> dict[str, np.ndarray]:
    d0 = mu[0, 1] - mu[0, 0]
    d1 = mu[1, 1] - mu[1, 0]
    z0 = mu[1, 0] - mu[0, 0]
    z1 = mu[1, 1] - mu[0, 1]
    tau = mu[1, 1] - mu[0, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        n0, n1 = d0 / tau, d1 / tau
    return {
        "acme_control": d0, "acme_treated": d1, "acme_average": (d0 + d1) / 2,
        "ade_control": z0, "ade_treated": z1, "ade_average": (z0 + z1) / 2,
        "total": tau,
        "prop_mediated_control": n0, "prop_mediated_treated": n1,
        "prop_mediated_average": (n0 + n1) / 2,
    }


def p_values(x: np.ndarray) -> tuple[float, float]:
    """(normal-approximation, empirical) two-sided p-values of 'effect = 0' from draws.

    empirical: 2 min(P(draw > 0), P(draw < 0)), R's and statsmodels' (resolution 2/J);
    normal: 2 Phi(-|mean| / sd) of the draws, finer-grained for multiple-testing control.
    """
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan"), float("nan")
    emp = 2 * min(np.mean(x > 0), np.mean(x < 0))
    sd = np.std(x, ddof=1)
    mean = np.mean(x)
    nrm = float(2 * stats.norm.sf(abs(mean) / sd)) if sd > 0 else (0.0 if mean != 0 else 1.0)
    return nrm, float(min(1.0, emp))


def summarise(draws: dict[str, np.ndarray], point: dict[str, float] | None = None,
              level: float = 0.95, names: tuple[str, ...] = EFFECTS) -> list[dict]:
    """Estimate, percentile interval and p-values per quantity.

    ``point``: plug-in estimates (bootstrap); else the mean of the draws (the median for
    proportions mediated), as R's ``mediate`` and statsmodels do.
    """
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    rows = []
    for name in names:
        x = draws[name]
        fin = x[np.isfinite(x)]
        if point is not None:
            est = point[name]
        elif name.startswith("prop"):
            est = float(np.median(fin)) if len(fin) else float("nan")
        else:
            est = float(np.mean(fin)) if len(fin) else float("nan")
        lo, hi = (np.percentile(fin, [lo_q, hi_q]) if len(fin) else (np.nan, np.nan))
        p_n, p_e = p_values(x)
        rows.append({"effect": name, "estimate": float(est), "ci_low": float(lo),
                     "ci_high": float(hi), "se": float(np.std(fin, ddof=1)) if len(fin) > 1
                     else float("nan"), "p_value_normal": p_n, "p_value_empirical": p_e})
    return rows


def quasi_bayes(fm: ModelFit, fy: ModelFit, X: np.ndarray, spec: Spec, n_draws: int,
                rng: np.random.Generator) -> dict[str, np.ndarray]:
    from threadpoolctl import threadpool_limits

    thM = rng.multivariate_normal(fm.params, fm.cov, size=n_draws)
    thY = rng.multivariate_normal(fy.params, fy.cov, size=n_draws)
    with threadpool_limits(1):  # small matrix products: threads cost more than they gain
        return effects_from_mu(mu_table(thM, thY, fm.sigma, fm.kind, fy.kind, X, spec, rng))


def point_effects(fm: ModelFit, fy: ModelFit, X: np.ndarray, spec: Spec,
                  rng: np.random.Generator) -> dict[str, float]:
    mu = mu_table(fm.params[None], fy.params[None], fm.sigma, fm.kind, fy.kind, X, spec, rng)
    return {k: float(v[0]) for k, v in effects_from_mu(mu).items()}


# ----------------------------------------------------------------- bootstrap refits


def _wls(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    Xw = X * w[:, None]
    return np.linalg.solve(X.T @ Xw, Xw.T @ y)


def _wlogit(X: np.ndarray, y: np.ndarray, w: np.ndarray, start: np.ndarray,
            iters: int = 25, tol: float = 1e-10) -> np.ndarray:
    beta = start.copy()
    for _ in range(iters):
        p = expit(X @ beta)
        g = X.T @ (w * (y - p))
        H = (X * (w * p * (1 - p))[:, None]).T @ X
        step = np.linalg.solve(H + 1e-12 * np.eye(len(beta)), g)
        beta += step
        if np.max(np.abs(step)) < tol:
            break
    return beta


def bootstrap(t, m, y, X, fm: ModelFit, fy: ModelFit, spec: Spec, n_boot: int,
              rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Refit both models on ``n_boot`` resamples (as multinomial counts); effects per refit."""
    dm, dy = design(t, m, X, spec.interaction)
    n = len(t)
    thM = np.empty((n_boot, dm.shape[1]))
    thY = np.empty((n_boot, dy.shape[1]))
    sig = np.empty(n_boot)
    for b in range(n_boot):
        w = np.bincount(rng.integers(0, n, n), minlength=n).astype(float)
        if fm.kind == "linear":
            thM[b] = _wls(dm, m, w)
            r = m - dm @ thM[b]
            sig[b] = np.sqrt(np.sum(w * r * r) / (n - dm.shape[1]))
        else:
            thM[b] = _wlogit(dm, m, w, fm.params)
        thY[b] = _wls(dy, y, w) if fy.kind == "linear" else _wlogit(dy, y, w, fy.params)
    if fm.kind == "linear" and fy.kind == "logistic":
        # the mediator noise SD differs per refit: simulate each replicate with its own
        out = np.empty((2, 2, n_boot))
        for b in range(n_boot):
            out[:, :, b:b + 1] = mu_table(thM[b:b + 1], thY[b:b + 1], sig[b], fm.kind, fy.kind,
                                          X, spec, rng)
        return effects_from_mu(out)
    return effects_from_mu(mu_table(thM, thY, fm.sigma, fm.kind, fy.kind, X, spec, rng))


# ----------------------------------------------------------------- sensitivity


def sensitivity_linear(t, m, y, X, t_values, rhos: np.ndarray) -> dict:
    """ACME as a function of rho = corr(mediator error, outcome error); Imai, Keele &
    Yamamoto (2010, Statistical Science), Theorem 2, linear models without interaction:

      ACME(rho) = beta2 sigma1 / sigma2 * (rho~ - rho sqrt((1 - rho~^2) / (1 - rho^2)))

    beta2 = T's coefficient in the mediator model (times t1 - t0), sigma2 its residual SD,
    sigma1 the residual SD of the outcome model *without* M, rho~ the correlation of the two
    residuals. ACME(0) is the usual estimate and ACME = 0 exactly at rho = rho~.
    """
    one = np.ones((len(t), 1))
    Z = np.column_stack([one, t, X])
    bm, *_ = np.linalg.lstsq(Z, m, rcond=None)
    by, *_ = np.linalg.lstsq(Z, y, rcond=None)
    e2 = m - Z @ bm
    e1 = y - Z @ by
    dof = len(t) - Z.shape[1]
    s1 = np.sqrt(e1 @ e1 / dof)
    s2 = np.sqrt(e2 @ e2 / dof)
    rt = float(np.corrcoef(e1, e2)[0, 1])
    beta2 = bm[1] * (t_values[1] - t_values[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        acme = beta2 * s1 / s2 * (rt - rhos * np.sqrt((1 - rt**2) / (1 - rhos**2)))
    # R^2 form: the product of the shares of (residual, or total) variance in M and Y that
    # an unobserved confounder would have to explain for ACME = 0 (Imai et al. 2010, 4.2):
    # R*2_M R*2_Y = rho~^2 and R~2_M R~2_Y = rho~^2 (1 - R2_M)(1 - R2_Y), with R2_Y of the
    # outcome model with M
    Zy = np.column_stack([Z, m])
    b3, *_ = np.linalg.lstsq(Zy, y, rcond=None)
    e3 = y - Zy @ b3
    r2_m = 1 - (e2 @ e2) / np.sum((m - m.mean()) ** 2)
    r2_y = 1 - (e3 @ e3) / np.sum((y - y.mean()) ** 2)
    return {
        "rho": rhos, "acme": acme, "rho_at_zero": rt,
        "r2_star_product_at_zero": rt**2,
        "r2_tilde_product_at_zero": rt**2 * (1 - r2_m) * (1 - r2_y),
    }


def sensitivity_probit_outcome(t, m, y, X, t_values, rhos: np.ndarray) -> dict:
    """ACME as a function of rho for a linear mediator and a probit outcome model without
    interaction (Imai, Keele & Yamamoto 2010, section 4.3; R ``medsens``'s binary outcome).

    Structural models M = a.z + e2 (e2 ~ N(0, s^2)), Y = 1[b.z + bM M + e1 > 0] (e1 ~
    N(0, 1)), z = [1, T, X], corr(e1, e2) = rho. Given M, e1 = rho e2 / s + sqrt(1 - rho^2) u,
    so the observed probit of Y on [z, M] has coefficients g_z = (b_z - rho a_z / s) / r and
    g_M = (bM + rho / s) / r with r = sqrt(1 - rho^2): the mediator OLS and the probit fit
    identify b for every rho (the joint likelihood factorises), and

      E[Y(t, M(t'))] = mean_x Phi((b.z(t) + bM a.z(t')) / sqrt(1 + bM^2 s^2 + 2 rho bM s)).

    The ACME is 0 where bM = 0: rho = g_M s / sqrt(1 + g_M^2 s^2).
    """
    import statsmodels.api as sm

    one = np.ones((len(t), 1))
    Z = np.column_stack([one, t, X])
    a, *_ = np.linalg.lstsq(Z, m, rcond=None)
    e2 = m - Z @ a
    s = float(np.sqrt(e2 @ e2 / (len(t) - Z.shape[1])))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = np.asarray(sm.Probit(y, np.column_stack([Z, m])).fit(disp=0, method="newton",
                                                                  maxiter=100).params)
    g_z, g_m = g[:-1], g[-1]
    rhos = np.asarray(rhos, dtype=float)
    acme = np.full((2, len(rhos)), np.nan)
    zt = [np.column_stack([one, np.full(len(t), v), X]) for v in t_values]
    for i, rho in enumerate(rhos):
        if not -1 < rho < 1:
            continue
        r = np.sqrt(1 - rho**2)
        b_z = g_z * r + rho * a / s
        b_m = g_m * r - rho / s
        scale = np.sqrt(1 + b_m**2 * s**2 + 2 * rho * b_m * s)
        em = [zt[k] @ a for k in (0, 1)]
        for k in (0, 1):
            base = zt[k] @ b_z
            acme[k, i] = np.mean(ndtr((base + b_m * em[1]) / scale)
                                 - ndtr((base + b_m * em[0]) / scale))
    rho0 = float(g_m * s / np.sqrt(1 + (g_m * s) ** 2))
    # R^2 form (Imai et al. 2010, 4.2) with the latent outcome's variance
    r2_m = 1 - (e2 @ e2) / np.sum((m - m.mean()) ** 2)
    v = np.var(np.column_stack([Z, m]) @ g)
    r2_y = v / (1 + v)
    return {
        "rho": rhos, "acme": acme.mean(axis=0), "acme_control": acme[0],
        "acme_treated": acme[1], "rho_at_zero": rho0,
        "r2_star_product_at_zero": rho0**2,
        "r2_tilde_product_at_zero": rho0**2 * (1 - r2_m) * (1 - r2_y),
    }
