"""dolm-mediate statistical core: parity with statsmodels' Mediation, ground truth,
sensitivity identities, the vectorised simulation against a plain loop, BH across mediators."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from dolm.columns import expand_columns
from dolm.errors import InputError
from dolm_tools.mediate import core
from dolm_tools.mediate import statistical as st
from scipy.special import expit


def simulate(n, seed, kind="ll", a=0.5, b=0.6, c=0.0, direct=0.2):
    """T -> M (coef a) -> Y (coef b), T -> Y (direct), T:M interaction c, confounder x."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    t = (rng.random(n) < 0.5).astype(float)
    m = a * t + 0.3 * x + rng.normal(size=n)
    if kind[0] == "b":
        m = (rng.random(n) < expit(m - 0.2)).astype(float)
    lp = direct * t + b * m + c * t * m + 0.2 * x
    y = lp + rng.normal(size=n) if kind[1] == "l" else (rng.random(n) < expit(lp - 0.3)) * 1.0
    return pd.DataFrame({"t": t, "m": m, "x": x, "y": y})


def ours(df, **kw):
    d = core.prepare(df, "t", "y", ["m"], ["x"])
    eff, sens, res = core.run_statistical(d, core.Options(**kw), "y")
    return eff.set_index("effect"), sens, res


SM_NAMES = {
    "acme_control": "ACME (control)", "acme_treated": "ACME (treated)",
    "ade_control": "ADE (control)", "ade_treated": "ADE (treated)", "total": "Total effect",
    "acme_average": "ACME (average)", "ade_average": "ADE (average)",
    "prop_mediated_average": "Prop. mediated (average)",
}


@pytest.mark.reference
@pytest.mark.parametrize("kind", ["ll", "bl", "lb", "bb"])
def test_parity_with_statsmodels_mediation(kind):
    """Point estimates agree with statsmodels.stats.mediation.Mediation (same data, same
    models, 1000 quasi-Bayesian draws each) within 4 combined Monte Carlo standard errors:
    both are means of 1000 random draws, so they differ by simulation noise only."""
    import statsmodels.api as sm
    from statsmodels.stats.mediation import Mediation

    df = simulate(1000, 7, kind)
    n = len(df)
    fam = {"l": sm.families.Gaussian(), "b": sm.families.Binomial()}
    oex = np.column_stack([np.ones(n), df.t, df.m, df.x])
    mex = np.column_stack([np.ones(n), df.t, df.x])
    sm_res = Mediation(sm.GLM(df.y.to_numpy(), oex, family=fam[kind[1]]),
                       sm.GLM(df.m.to_numpy(), mex, family=fam[kind[0]]), (1, 1), 2
                       ).fit(n_rep=1000, rng=3)
    ref = sm_res.summary()
    eff, _, _ = ours(df)
    draws_sd = {  # MC SE of a mean of 1000 draws, from the spread of statsmodels' draws
        "acme_control": np.std(sm_res.ACME_ctrl), "acme_treated": np.std(sm_res.ACME_tx),
        "ade_control": np.std(sm_res.ADE_ctrl), "ade_treated": np.std(sm_res.ADE_tx),
        "total": np.std(sm_res.total_effect), "acme_average": np.std(sm_res.ACME_avg),
        "ade_average": np.std(sm_res.ADE_avg),
        "prop_mediated_average": 1.25 * np.std(sm_res.prop_med_avg),  # median: ~1.25x
    }
    for name, sm_name in SM_NAMES.items():
        tol = 4 * np.sqrt(2) * draws_sd[name] / np.sqrt(1000)
        assert eff.loc[name, "estimate"] == pytest.approx(ref.loc[sm_name, "Estimate"],
                                                           abs=tol), name
        # intervals: statsmodels adds mediator-noise Monte Carlo spread; same scale
        w_ours = eff.loc[name, "ci_high"] - eff.loc[name, "ci_low"]
        w_sm = ref.loc[sm_name, "Upper CI bound"] - ref.loc[sm_name, "Lower CI bound"]
        assert 0.6 < w_ours / w_sm < 1.25, (name, w_ours, w_sm)


@pytest.mark.reference
@pytest.mark.parametrize("kind,mm", [("bb", "probit"), ("lb", "linear")])
def test_probit_parity_with_statsmodels_mediation(kind, mm):
    """Probit links (R mediation's framing example): the same quasi-Bayesian effects as
    statsmodels' Mediation with probit GLMs, within 4 combined Monte Carlo SEs."""
    import statsmodels.api as sm
    from statsmodels.stats.mediation import Mediation

    df = simulate(1000, 11, kind)
    n = len(df)
    probit = sm.families.Binomial(link=sm.families.links.Probit())
    fam_m = probit if mm == "probit" else sm.families.Gaussian()
    oex = np.column_stack([np.ones(n), df.t, df.m, df.x])
    mex = np.column_stack([np.ones(n), df.t, df.x])
    sm_res = Mediation(sm.GLM(df.y.to_numpy(), oex, family=probit),
                       sm.GLM(df.m.to_numpy(), mex, family=fam_m), (1, 1), 2
                       ).fit(n_rep=1000, rng=5)
    ref = sm_res.summary()
    eff, _, res = ours(df, mediator_model=mm, outcome_model="probit")
    logit_eff, _, _ = ours(df, mediator_model="logistic" if mm == "probit" else mm,
                           outcome_model="logistic")
    for name, draws in (("acme_average", sm_res.ACME_avg), ("ade_average", sm_res.ADE_avg),
                        ("total", sm_res.total_effect)):
        tol = 4 * np.sqrt(2) * np.std(draws) / np.sqrt(1000)
        assert eff.loc[name, "estimate"] == pytest.approx(
            ref.loc[SM_NAMES[name], "Estimate"], abs=tol), name
    assert (eff.outcome_model == "probit").all() and (eff.mediator_model == mm).all()
    if mm == "probit":
        with pytest.raises(InputError, match="--ci bootstrap: .* probit"):
            ours(df, mediator_model=mm, outcome_model="probit", ci="bootstrap", sims=20)
    # the links differ, so the coefficients do; the effects on the probability scale agree
    assert eff.loc["total", "estimate"] == pytest.approx(logit_eff.loc["total", "estimate"],
                                                         abs=0.02)


def test_linear_ground_truth_and_product_of_coefficients():
    df = simulate(4000, 1)
    eff, sens, res = ours(df)
    truth = {"acme_average": 0.5 * 0.6, "ade_average": 0.2, "total": 0.5 * 0.6 + 0.2}
    for k, v in truth.items():
        assert eff.loc[k, "ci_low"] < v < eff.loc[k, "ci_high"], k
    # without interaction ACME(control) = ACME(treated); the estimate is about a_hat * b_hat
    assert eff.loc["acme_control", "estimate"] == eff.loc["acme_treated", "estimate"]
    ab = res[0]["coef_t_on_m"] * res[0]["coef_m_on_y"]
    assert eff.loc["acme_average", "estimate"] == pytest.approx(ab, abs=0.01)


def test_interaction_ground_truth():
    df = simulate(6000, 2, c=0.4)
    eff, _, _ = ours(df, interaction=True)
    # ACME(t) = a (b + c t), ADE(t) = direct + c E[M(t)] with E[M(t)] = a t
    assert eff.loc["acme_control", "ci_low"] < 0.5 * 0.6 < eff.loc["acme_control", "ci_high"]
    assert eff.loc["acme_treated", "ci_low"] < 0.5 * 1.0 < eff.loc["acme_treated", "ci_high"]
    assert eff.loc["ade_treated", "ci_low"] < 0.2 + 0.4 * 0.5 < eff.loc["ade_treated", "ci_high"]
    # sensitivity is only defined without interaction
    assert core.summary(*_summ_args(df, interaction=True))["mediators"][0]["rho_at_zero"] is None


def _summ_args(df, **kw):
    d = core.prepare(df, "t", "y", ["m"], ["x"])
    opt = core.Options(**kw)
    eff, _, res = core.run_statistical(d, opt, "y")
    return d, opt, eff, res


def test_sensitivity_identities():
    df = simulate(3000, 4)
    t, m, y, X = df.t.to_numpy(), df.m.to_numpy(), df.y.to_numpy(), df[["x"]].to_numpy()
    rhos = np.array([-0.5, 0.0, 0.5])
    s = st.sensitivity_linear(t, m, y, X, (0.0, 1.0), rhos)
    # at rho = 0 the curve is the product-of-coefficients estimate a_hat * gamma_hat
    Z = np.column_stack([np.ones(len(t)), t, X])
    a_hat = np.linalg.lstsq(Z, m, rcond=None)[0][1]
    g_hat = np.linalg.lstsq(np.column_stack([Z, m]), y, rcond=None)[0][-1]
    assert s["acme"][1] == pytest.approx(a_hat * g_hat, rel=1e-9)
    # ACME vanishes at rho = rho~ (the residual correlation), and falls as rho grows
    z = st.sensitivity_linear(t, m, y, X, (0.0, 1.0), np.array([s["rho_at_zero"]]))
    assert z["acme"][0] == pytest.approx(0.0, abs=1e-12)
    assert s["acme"][0] > s["acme"][1] > s["acme"][2]
    assert s["r2_star_product_at_zero"] == pytest.approx(s["rho_at_zero"] ** 2)


def _mu_loop(thM, thY, kind_m, kind_y, X, tv):
    """One draw and one unit at a time, exact expectations (logistic mediator)."""
    J, n = thM.shape[0], X.shape[0]
    mu = np.zeros((2, 2, J))
    for j in range(J):
        for a in (0, 1):
            for b in (0, 1):
                tot = 0.0
                for i in range(n):
                    pm = expit(thM[j, 0] + thM[j, 1] * tv[b] + thM[j, 2:] @ X[i])
                    ey = 0.0
                    for mv, w in ((1.0, pm), (0.0, 1 - pm)):
                        lin = thY[j, 0] + thY[j, 1] * tv[a] + thY[j, 2] * mv + thY[j, 3] * (
                            tv[a] * mv) + thY[j, 4:] @ X[i]
                        ey += w * (expit(lin) if kind_y == "logistic" else lin)
                    tot += ey
                mu[a, b, j] = tot / n
    return mu


@pytest.mark.parametrize("kind_y", ["logistic", "linear"])
def test_vectorised_simulation_equals_plain_loop(kind_y):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 2))
    thM = rng.normal(size=(6, 4))
    thY = rng.normal(size=(6, 6))
    spec = st.Spec(interaction=True, t_values=(0.0, 2.0))
    got = st.mu_table(thM, thY, None, "logistic", kind_y, X, spec, rng, chunk_elems=50)
    np.testing.assert_allclose(got, _mu_loop(thM, thY, "logistic", kind_y, X, (0.0, 2.0)),
                               rtol=1e-12, atol=1e-12)


def test_bootstrap_ci_and_plugin_point():
    df = simulate(1500, 5)
    eff, _, res = ours(df, ci="bootstrap", sims=300)
    ab = res[0]["coef_t_on_m"] * res[0]["coef_m_on_y"]
    assert eff.loc["acme_average", "estimate"] == pytest.approx(ab, rel=1e-9)
    assert eff.loc["acme_average", "ci_low"] < 0.3 < eff.loc["acme_average", "ci_high"]
    assert set(eff.ci_method) == {"bootstrap"}


def test_bootstrap_logistic_refits_match_statsmodels_fit():
    rng = np.random.default_rng(0)
    X = np.column_stack([np.ones(500), rng.normal(size=(500, 2))])
    y = (rng.random(500) < expit(X @ [0.2, 1.0, -0.5])).astype(float)
    fit = st.fit_model(y, X, "logistic", ["a", "b", "c"])
    w = rng.integers(0, 3, 500).astype(float)
    import statsmodels.api as sm

    ref = sm.GLM(y, X, family=sm.families.Binomial(), freq_weights=w).fit().params
    np.testing.assert_allclose(st._wlogit(X, y, w, fit.params), ref, rtol=1e-7, atol=1e-9)


def test_many_mediators_bh_and_independence_of_the_set():
    rng = np.random.default_rng(3)
    n = 2000
    t = (rng.random(n) < 0.5).astype(float)
    cols = {f"attn_to.numbers.L0.H{h}": 0.2 * rng.normal(size=n) + (0.8 * t if h == 1 else 0)
            + rng.normal(size=n) for h in range(6)}
    df = pd.DataFrame({"t": t, **cols})
    df["y"] = 0.7 * df["attn_to.numbers.L0.H1"] + 0.1 * t + rng.normal(size=n)
    meds = expand_columns(["attn_to.numbers.*"], list(df.columns), "--mediator")
    assert len(meds) == 6
    d = core.prepare(df, "t", "y", meds, [])
    eff, _, _ = core.run_statistical(d, core.Options(sims=500), "y")
    acme = eff[eff.effect == "acme_average"].set_index("mediator")
    from statsmodels.stats.multitest import multipletests

    np.testing.assert_allclose(acme.q_value, multipletests(acme.p_value, method="fdr_bh")[1])
    assert acme.significant.to_dict() == {m: m.endswith("H1") for m in meds}
    # a mediator's result does not depend on which other mediators are analysed with it
    d1 = core.prepare(df, "t", "y", ["attn_to.numbers.L0.H1"], [])
    one, _, _ = core.run_statistical(d1, core.Options(sims=500), "y")
    alone = one[one.effect == "acme_average"].iloc[0]
    assert alone.estimate == acme.loc["attn_to.numbers.L0.H1", "estimate"]


def test_same_seed_same_result_and_seed_matters():
    df = simulate(500, 9, "lb")
    a, _, _ = ours(df, seed=1)
    b, _, _ = ours(df, seed=1)
    c, _, _ = ours(df, seed=2)
    pd.testing.assert_frame_equal(a, b)
    assert not a.estimate.equals(c.estimate)


def test_prepare_refuses_bad_input():
    df = simulate(200, 0)
    with pytest.raises(InputError, match="--treatment 'x': 200 distinct values"):
        core.prepare(df, "x", "y", ["m"], [])
    df2 = df.copy()
    df2.loc[[1, 8], "m"] = np.nan
    with pytest.raises(InputError, match=r"column 'm': 2 missing \(rows 1, 8\)"):
        core.prepare(df2, "t", "y", ["m"], ["x"])
    assert core.prepare(df2, "t", "y", ["m"], ["x"], dropna=True).dropped["rows"] == 2
    with pytest.raises(InputError, match="covariate 'k' is constant"):
        core.prepare(df.assign(k=2.0), "t", "y", ["m"], ["k"])
    with pytest.raises(InputError, match="--outcome 'y': constant"):
        core.prepare(df.assign(y=0.0), "t", "y", ["m"], [])
    with pytest.raises(InputError, match="pattern 'attn_to.*' matches no column"):
        expand_columns(["attn_to.*"], list(df.columns), "--mediator")
    with pytest.raises(InputError, match=r"--covariates: column 'nope' not in the table"):
        expand_columns("x,nope", list(df.columns), "--covariates")
    assert expand_columns("m, x,m", list(df.columns), "--covariates") == ["m", "x"]
    d = core.prepare(df, "t", "y", ["m"], ["x"])
    with pytest.raises(InputError, match="--mediator-model logistic: column 'm' is not 0/1"):
        core.run_statistical(d, core.Options(mediator_model="logistic"), "y")
    # a continuous treatment works with explicit values
    d = core.prepare(df, "x", "y", ["m"], [], control_value="0", treat_value="1")
    assert d.t_values == (0.0, 1.0)
