"""Rho sensitivity for a binary (probit) outcome with a linear mediator
(statistical.sensitivity_probit_outcome) against simulation at a known error correlation.

R's mediation::medsens is the natural reference but Debian has no r-cran-mediation; the
truth here is independent of the closed form: potential outcomes Y(t, M(t')) drawn from the
structural model with correlated errors, the ACME their mean difference.
"""

from __future__ import annotations

import numpy as np
import pytest
from dolm_tools.mediate import core
from dolm_tools.mediate import statistical as st
from scipy.special import expit

A = np.array([0.2, 0.9, 0.4])  # mediator: [1, T, X]
SIGMA = 1.2
B = np.array([-0.2, 0.3, 0.3])  # outcome index: [1, T, X], plus BM * M


def draw(n: int, rho: float, bm: float, seed: int):
    """Observed data and the true ACME(control), ACME(treated) by potential outcomes."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    t = (rng.random(n) < expit(0.5 * x)).astype(float)
    z2, z1 = rng.normal(size=n), rng.normal(size=n)
    e2 = SIGMA * z2
    e1 = rho * z2 + np.sqrt(1 - rho**2) * z1  # corr(e1, e2) = rho, var(e1) = 1

    def med(tv):
        return A[0] + A[1] * tv + A[2] * x + e2

    def out(tv, m):
        return (B[0] + B[1] * tv + B[2] * x + bm * m + e1 > 0).astype(float)

    m = med(t)
    y = out(t, m)
    truth = [float(np.mean(out(tv, med(1.0)) - out(tv, med(0.0)))) for tv in (0.0, 1.0)]
    return t, m, y, x[:, None], truth


def test_acme_at_the_true_rho_recovers_the_truth():
    rho0 = 0.5
    t, m, y, X, truth = draw(200_000, rho0, 0.6, 0)
    s = st.sensitivity_probit_outcome(t, m, y, X, (0.0, 1.0), np.array([0.0, rho0]))
    # at the true rho: the truth (sampling error of n = 200k ~ 0.002)
    assert s["acme_control"][1] == pytest.approx(truth[0], abs=0.008)
    assert s["acme_treated"][1] == pytest.approx(truth[1], abs=0.008)
    # ignoring the confounding (rho = 0) is far off: the test can tell them apart
    assert abs(s["acme_control"][0] - truth[0]) > 0.05
    assert s["acme"][1] == pytest.approx((truth[0] + truth[1]) / 2, abs=0.008)


def test_rho_at_zero_is_the_confounding_of_a_null_mediator():
    """No M -> Y effect, errors correlated 0.3: the naive ACME is not 0, and the rho at which
    the ACME vanishes is the true 0.3; the curve changes sign there."""
    t, m, y, X, truth = draw(200_000, 0.3, 0.0, 1)
    assert truth == [0.0, 0.0]
    grid = np.round(np.linspace(-0.95, 0.95, 39), 4)
    s = st.sensitivity_probit_outcome(t, m, y, X, (0.0, 1.0), grid)
    assert s["rho_at_zero"] == pytest.approx(0.3, abs=0.02)
    assert s["acme"][grid == 0.0][0] > 0.05
    below, above = s["acme"][grid < s["rho_at_zero"]], s["acme"][grid > s["rho_at_zero"]]
    assert (below > 0).all() and (above < 0).all()
    assert s["r2_star_product_at_zero"] == pytest.approx(s["rho_at_zero"] ** 2)


def test_rho_zero_equals_the_reported_estimate_and_the_tool_writes_it():
    """At rho = 0 the curve is the usual ACME (here against the quasi-Bayesian mean of
    the main analysis); run_statistical writes the curve for --outcome-model probit."""
    import pandas as pd

    t, m, y, X, _ = draw(4000, 0.0, 0.8, 2)
    df = pd.DataFrame({"t": t, "m": m, "y": y, "x": X[:, 0]})
    d = core.prepare(df, "t", "y", ["m"], ["x"])
    eff, sens, res = core.run_statistical(
        d, core.Options(outcome_model="probit", sims=400, seed=0), "y")
    a0 = sens[sens.rho == 0.0]
    e = eff.set_index("effect")
    for k in ("acme_control", "acme_treated"):
        assert abs(a0[k].iloc[0] - e.loc[k].estimate) < 0.5 * e.loc[k].se
    assert set(sens.columns) == {"mediator", "rho", "acme", "acme_control", "acme_treated"}
    summ = core.summary(d, core.Options(outcome_model="probit"), eff, res)
    assert summ["mediators"][0]["rho_at_zero"] == pytest.approx(res[0]["sensitivity"]
                                                                ["rho_at_zero"])
    # the logistic outcome model has no such latent-normal sensitivity: a note, no curve
    _, sens_l, res_l = core.run_statistical(d, core.Options(sims=100), "y")
    assert len(sens_l) == 0 and "probit" in res_l[0]["sensitivity_note"]
