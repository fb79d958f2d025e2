"""Mediation through a set of mediators jointly: interventional effects for several mediators
(Vansteelandt & Daniel 2017, Epidemiology 28:258), quasi-Bayesian inference.

Models (mediators in the order given, covariates X everywhere):
  mediator k  M_k ~ 1 + T + X + M_1 + ... + M_{k-1}     linear, logistic or probit
  outcome     Y   ~ 1 + T + M_1 + ... + M_K [+ T:M_k] + X   linear, logistic or probit

The chain only models the *joint* distribution of the mediators given T and X; the effects
below need no assumption on the direction of the arrows between mediators, and hold when
the mediators share unobserved causes. G_{S|b} is a random draw of the set S from its
distribution given T = b and X; independent draws of single mediators come from their own
marginal distributions (an independent simulation of the chain up to M_k):

  mu(a, b)  = E[Y(a, G_{1..K|b})]                              (joint draw)
  joint     : acme(a) = mu(a, 1) - mu(a, 0), ade(b) = mu(1, b) - mu(0, b), total, proportions
  via M_k   : acme(a) = E[Y(a, G_{k|1}, G_{j|0} j != k)] - E[Y(a, G_{k|0}, G_{j|0} j != k)]
  mutual    : acme(a) = joint acme(a) - sum_k via_k acme(a)

With one mediator these are the Imai-Keele-Tingley quantities. The joint ACME equals the
joint natural indirect effect when there is no unmeasured T-M, T-Y or M-Y confounding
given X and no M-Y confounder is affected by T (Imai & Yamamoto 2013 take the same set
view); the via-M_k effects are interventional: they shift M_k's distribution alone, so they
include T -> M_j -> M_k paths from earlier mediators, and the mutual term is what the
mediators' dependence (and non-additivity of the outcome model) adds to their sum.

Inference: J draws of every model's coefficients from N(estimate, covariance), one mediator
draw per unit and parameter draw (as R's ``mediate``), the same noise under b = 0 and
b = 1 (common random numbers); estimate = mean of the draws, percentile intervals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from dolm_tools.mediate import statistical as st

ACME = ("acme_control", "acme_treated", "acme_average")


@dataclass
class JointFit:
    names: list[str]
    mediators: list[st.ModelFit]  # M_k on [1, T, X, M_1..M_{k-1}]
    outcome: st.ModelFit  # Y on [1, T, M_1..M_K, (T:M_1..T:M_K), X]
    interaction: bool
    t_values: tuple[float, float]


def fit_joint(t: np.ndarray, meds: list[np.ndarray], y: np.ndarray, X: np.ndarray,
              kinds_m: list[str], kind_y: str, interaction: bool, names: list[str],
              x_names: list[str], t_values: tuple[float, float]) -> JointFit:
    """Fit the mediator chain and the outcome model (statsmodels, as the single analysis)."""
    one = np.ones((len(t), 1))
    fits = []
    for k, (m, kind) in enumerate(zip(meds, kinds_m, strict=True)):
        Z = np.column_stack([one, t, X, *meds[:k]])
        fits.append(st.fit_model(m, Z, kind, ["const", "T", *x_names, *names[:k]]))
    inter = [t * m for m in meds] if interaction else []
    Zy = np.column_stack([one, t, *meds, *inter, X])
    fy = st.fit_model(y, Zy, kind_y, ["const", "T", *names,
                                      *([f"T:{n}" for n in names] if interaction else []),
                                      *x_names])
    return JointFit(list(names), fits, fy, interaction, t_values)


def _chain(thetas: list[np.ndarray], fits: list[st.ModelFit], X: np.ndarray, tv: float,
           noise: list[np.ndarray], upto: int) -> list[np.ndarray]:
    """Mediators 0..upto-1 drawn along the chain under T = tv: arrays (draws, units)."""
    out: list[np.ndarray] = []
    for k in range(upto):
        th, f = thetas[k], fits[k]
        p = X.shape[1]
        lin = th[:, 0, None] + th[:, 1, None] * tv + th[:, 2:2 + p] @ X.T
        for j in range(k):
            lin = lin + th[:, 2 + p + j, None] * out[j]
        if f.kind == "linear":
            out.append(lin + f.sigma * noise[k])
        else:
            out.append((noise[k] < st.INV_LINK[f.kind](lin)).astype(float))
    return out


def _outcome_mean(thY: np.ndarray, kind: str, a: float, ms: list[np.ndarray], X: np.ndarray,
                  K: int, interaction: bool) -> np.ndarray:
    """Mean over units of E[Y(a, ms)] per parameter draw."""
    lin = thY[:, 0, None] + thY[:, 1, None] * a
    for k in range(K):
        slope = thY[:, 2 + k] + (thY[:, 2 + K + k] * a if interaction else 0.0)
        lin = lin + slope[:, None] * ms[k]
    lin = lin + thY[:, 2 + K * (2 if interaction else 1):] @ X.T
    if kind != "linear":
        lin = st.INV_LINK[kind](lin)
    return lin.mean(axis=1)


def simulate(jf: JointFit, thetas: list[np.ndarray], thY: np.ndarray, X: np.ndarray,
             rng: np.random.Generator, chunk_elems: int = 2_000_000) -> dict[str, dict]:
    """Effect draws: {"joint": EFFECTS, "via:<name>": ACME, "mutual": ACME} -> arrays (J,)."""
    J = thY.shape[0]
    K = len(jf.names)
    n = len(X)
    tv = jf.t_values
    mu = np.empty((2, 2, J))
    ind0 = np.empty((2, J))  # every mediator from its own marginal under b = 0
    via = np.empty((K, 2, J))  # M_k from its marginal under b = 1, the others under b = 0
    step = max(1, chunk_elems // max(1, n * (K + 1)))
    for s0 in range(0, J, step):
        s = slice(s0, min(J, s0 + step))
        th = [x[s] for x in thetas]
        shape = (s.stop - s.start, n)

        # copy 0: the joint draw (its last mediator doubles as that mediator's marginal draw)
        # copy k < K-1: an independent chain up to mediator k, for M_k's marginal draw
        copies = [_noise(jf.mediators, shape, rng)] + [
            _noise(jf.mediators[:k + 1], shape, rng) for k in range(K - 1)]
        marg = {}
        for b in (0, 1):
            joint = _chain(th, jf.mediators, X, tv[b], copies[0], K)
            for a in (0, 1):
                mu[a, b, s] = _outcome_mean(thY[s], jf.outcome.kind, tv[a], joint, X, K,
                                            jf.interaction)
            marg[b] = [_chain(th, jf.mediators, X, tv[b], copies[k + 1], k + 1)[k]
                       for k in range(K - 1)] + [joint[K - 1]]
        for a in (0, 1):
            ind0[a, s] = _outcome_mean(thY[s], jf.outcome.kind, tv[a], marg[0], X, K,
                                       jf.interaction)
            for k in range(K):
                ms = list(marg[0])
                ms[k] = marg[1][k]
                via[k, a, s] = _outcome_mean(thY[s], jf.outcome.kind, tv[a], ms, X, K,
                                             jf.interaction) - ind0[a, s]
    out = {"joint": st.effects_from_mu(mu)}
    tot = np.zeros((2, J))
    for k, name in enumerate(jf.names):
        out[f"via:{name}"] = _acme(via[k])
        tot += via[k]
    out["mutual"] = _acme(np.stack([mu[0, 1] - mu[0, 0], mu[1, 1] - mu[1, 0]]) - tot)
    return out


def _noise(fits: list[st.ModelFit], shape: tuple[int, int],
           rng: np.random.Generator) -> list[np.ndarray]:
    """Standard normal noise for linear mediators, uniform for binary ones."""
    return [rng.standard_normal(shape) if f.kind == "linear" else rng.random(shape)
            for f in fits]


def _acme(d: np.ndarray) -> dict[str, np.ndarray]:
    return {"acme_control": d[0], "acme_treated": d[1], "acme_average": (d[0] + d[1]) / 2}


def quasi_bayes(jf: JointFit, X: np.ndarray, n_draws: int,
                rng: np.random.Generator) -> dict[str, dict]:
    """Effect draws under N(estimate, covariance) draws of every model's coefficients."""
    from threadpoolctl import threadpool_limits

    thetas = [rng.multivariate_normal(f.params, f.cov, size=n_draws) for f in jf.mediators]
    thY = rng.multivariate_normal(jf.outcome.params, jf.outcome.cov, size=n_draws)
    with threadpool_limits(1):
        return simulate(jf, thetas, thY, X, rng)


def plug_in(jf: JointFit, X: np.ndarray, reps: int, rng: np.random.Generator) -> dict:
    """The effects at the fitted coefficients, averaged over ``reps`` mediator draws per unit
    (no parameter uncertainty): for checks against closed forms."""
    thetas = [np.repeat(f.params[None], reps, axis=0) for f in jf.mediators]
    thY = np.repeat(jf.outcome.params[None], reps, axis=0)
    draws = simulate(jf, thetas, thY, X, rng)
    return {g: {e: float(np.mean(v)) for e, v in d.items()} for g, d in draws.items()}
