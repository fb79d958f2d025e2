"""dolm-psm statistics core: ground truth, invariance, hand-computed balance, parity."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from dolm.errors import InputError
from dolm_tools.psm import balance as bal
from dolm_tools.psm import sensitivity as sens
from dolm_tools.psm.core import Options, run_psm
from dolm_tools.psm.dag import backdoor_set
from dolm_tools.psm.data import prepare
from dolm_tools.psm.matching import match
from scipy import stats

TRUE_ATT = 1.0


def confounded(n: int, seed: int) -> pd.DataFrame:
    """Three confounders drive both treatment (about 30% treated) and outcome; effect 1."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    lp = -1.0 + 0.8 * X[:, 0] - 0.6 * X[:, 1] + 0.4 * X[:, 2]
    t = (rng.random(n) < 1 / (1 + np.exp(-lp))).astype(int)
    y = X[:, 0] - 0.5 * X[:, 1] + 0.25 * X[:, 2] + TRUE_ATT * t + rng.normal(size=n)
    return pd.DataFrame({"x1": X[:, 0], "x2": X[:, 1], "x3": X[:, 2], "t": t, "y": y})


def _att(res):
    eff = {e["estimand"]: e for e in res.summary["contrasts"][0]["effects"]}
    return eff["ATT"], eff["naive"]


def test_att_ci_covers_truth_and_naive_does_not():
    # Defaults (1:1 greedy, caliper 0.2 SD). Over 100 seeds of this design the AI 95% CI
    # covered the truth 87% of the time (mean estimate 1.058: greedy caliper matching leaves
    # a little imbalance; caliper 0.05 gives 95%); the naive CI never did.
    seeds = range(8)
    covered, estimates = 0, []
    for seed in seeds:
        u = prepare(confounded(1200, seed), "t", "y", ["x1", "x2", "x3"])
        att, naive = _att(run_psm(u, Options(estimands=("ATT",), refute=False, seed=seed)))
        covered += att["ci_low"] <= TRUE_ATT <= att["ci_high"]
        estimates.append(att["estimate"])
        assert not naive["ci_low"] <= TRUE_ATT <= naive["ci_high"], seed
        assert abs(att["estimate"] - TRUE_ATT) < abs(naive["estimate"] - TRUE_ATT) / 3
    assert covered >= len(seeds) - 2
    assert abs(np.mean(estimates) - TRUE_ATT) < 0.1


def test_tight_caliper_covers_truth_every_seed():
    for seed in range(5):
        u = prepare(confounded(1200, seed), "t", "y", ["x1", "x2", "x3"])
        att, _ = _att(run_psm(u, Options(estimands=("ATT",), refute=False, caliper=0.05)))
        assert att["ci_low"] <= TRUE_ATT <= att["ci_high"], (seed, att)


def test_gbm_propensity_removes_most_confounding():
    # trees fit a smooth propensity in steps, so some confounding remains (mean estimate
    # about 1.2 over seeds of this design, where the logistic model is correct)
    u = prepare(confounded(1500, 11), "t", "y", ["x1", "x2", "x3"])
    res = run_psm(u, Options(estimands=("ATT",), refute=False, method="gbm", replace=True))
    att, naive = _att(res)
    assert abs(att["estimate"] - TRUE_ATT) < 0.4 < abs(naive["estimate"] - TRUE_ATT)
    assert "cross-fitted" in res.summary["contrasts"][0]["propensity"]["description"]


@pytest.mark.parametrize(
    "kw", [dict(replace=True, ratio=2, se="ai"), dict(se="bootstrap", n_boot=300)]
)
def test_att_variants_cover_truth(kw):
    u = prepare(confounded(1500, 11), "t", "y", ["x1", "x2", "x3"])
    att, naive = _att(run_psm(u, Options(estimands=("ATT",), refute=False, **kw)))
    assert att["ci_low"] <= TRUE_ATT <= att["ci_high"], att
    assert att["se"] > 0


def test_ate_atc_and_counts():
    # with replacement, over 100 seeds of this design the AI 95% CIs covered the truth
    # 96% (ATT), 93% (ATC) and 93% (ATE) of the time
    covered = {"ATT": 0, "ATC": 0, "ATE": 0}
    for seed in range(8):
        u = prepare(confounded(1500, seed), "t", "y", ["x1", "x2", "x3"])
        res = run_psm(u, Options(refute=False, replace=True))
        c = res.summary["contrasts"][0]
        eff = {e["estimand"]: e for e in c["effects"]}
        for e in covered:
            covered[e] += eff[e]["ci_low"] <= TRUE_ATT <= eff[e]["ci_high"]
    assert min(covered.values()) >= 6, covered
    n_att = eff["ATT"]["n_sets"]
    n_atc = eff["ATC"]["n_sets"]
    assert eff["ATE"]["n_sets"] == n_att + n_atc
    ate = (n_att * eff["ATT"]["estimate"] + n_atc * eff["ATC"]["estimate"]) / (n_att + n_atc)
    assert eff["ATE"]["estimate"] == pytest.approx(ate)
    cnt = c["counts"]["ATT"]
    for g in ("treated", "control"):
        k = cnt[g]
        assert k["matched"] + k["unmatched"] + k["discarded"] == k["all"]
    # balance improves for every covariate
    b = res.balance[(res.balance.estimand == "ATT") & res.balance.variable.str.startswith("x")]
    before = b[b["sample"] == "all"].set_index("variable").smd.abs()
    after = b[b["sample"] == "matched"].set_index("variable").smd.abs()
    assert (after < before).all() and (after < 0.1).all()
    # pairs: ATT rows have one treated focal unit per set, weights sum to 1 per set
    p = res.pairs[res.pairs.estimand == "ATT"]
    assert p.groupby("set_id").weight.sum().round(12).eq(1).all()
    assert p.groupby("set_id").treated_row.nunique().eq(1).all()


def test_row_order_invariance():
    df = confounded(800, 5)
    df["g"] = np.where(df.x1 > 0.3, "hi", "lo")
    df["d"] = (df.x2 > 0).astype(int)  # discrete covariates make exact ties in the score
    covs = ["x1", "g", "d"]
    opt = Options(refute=False, ratio=2)
    a = run_psm(prepare(df, "t", "y", covs), opt)
    shuffled = df.sample(frac=1.0, random_state=3)
    b = run_psm(prepare(shuffled, "t", "y", covs), opt)
    assert a.summary["contrasts"][0]["effects"] == b.summary["contrasts"][0]["effects"]
    pd.testing.assert_frame_equal(a.balance, b.balance)
    # rows refer to the input file: map both to the original index
    ia = a.pairs.assign(t=df.index[a.pairs.treated_row], c=df.index[a.pairs.control_row])
    ib = b.pairs.assign(t=shuffled.index[b.pairs.treated_row],
                        c=shuffled.index[b.pairs.control_row])
    key = ["estimand", "t", "c"]
    ta = ia[key + ["distance", "weight"]].sort_values(key).reset_index(drop=True)
    tb = ib[key + ["distance", "weight"]].sort_values(key).reset_index(drop=True)
    # identical rows (same covariates, treatment, outcome) are interchangeable; ours are unique
    pd.testing.assert_frame_equal(ta, tb)


def test_same_seed_same_output_gbm_bootstrap():
    u = prepare(confounded(600, 2), "t", "y", ["x1", "x2", "x3"])
    opt = Options(refute=False, method="gbm", se="bootstrap", n_boot=200, seed=4)
    assert run_psm(u, opt).summary == run_psm(u, opt).summary


def test_hand_computed_balance():
    # treated x = 1, 2, 3 ; control x = 2, 4, 6, 8
    x = np.array([1, 2, 3, 2, 4, 6, 8], dtype=float)
    t = np.array([1, 1, 1, 0, 0, 0, 0])
    w = np.ones(7)
    sd_t = np.std([1, 2, 3], ddof=1)  # 1.0
    r = bal.balance_row(x, t, w, False, bal.scale_sd(x, t, "ATT"))
    assert r["smd"] == pytest.approx((2 - 5) / sd_t)  # -3
    assert r["var_ratio"] == pytest.approx(1.0 / (20 / 3))  # var_c = 6.667
    # eCDF over {1,2,3,4,6,8}: |F_t - F_c| = 1/3, 5/12, 3/4, 1/2, 1/4, 0
    assert r["ecdf_mean"] == pytest.approx((4 + 5 + 9 + 6 + 3 + 0) / 12 / 6)
    assert r["ecdf_max"] == pytest.approx(0.75)
    # ATE scale: pooled SD sqrt((1 + 6.667) / 2)
    assert bal.scale_sd(x, t, "ATE") == pytest.approx(np.sqrt((1 + 20 / 3) / 2))
    # weights: control 2 counted twice, control 8 dropped -> weighted mean (2+2+4+6)/4
    w2 = np.array([1, 1, 1, 2, 1, 1, 0], dtype=float)
    r2 = bal.balance_row(x, t, w2, False, sd_t)
    assert r2["mean_control"] == pytest.approx(3.5)
    assert r2["smd"] == pytest.approx((2 - 3.5) / sd_t)
    # binary: eCDF stats are the difference in proportions, no variance ratio
    xb = np.array([1, 0, 1, 0, 0, 1, 0], dtype=float)
    rb = bal.balance_row(xb, t, w, True, bal.scale_sd(xb, t, "ATT"))
    assert rb["ecdf_mean"] == rb["ecdf_max"] == pytest.approx(2 / 3 - 1 / 4)
    assert rb["var_ratio"] is None


def test_ecdf_ties_survive_a_last_bit_difference():
    """Two units with the same propensity score up to the last bit (BLAS blocking gives
    that for equal covariate rows) are one eCDF step, as with an exact tie: the hand
    example above with control 2 moved by one ulp gives the same mean and max."""
    x = np.array([1, 2, 3, 2, 4, 6, 8], dtype=float)
    t = np.array([1, 1, 1, 0, 0, 0, 0])
    w = np.ones(7)
    exact = bal.ecdf_diffs(x, t, w)
    x2 = x.copy()
    x2[3] = np.nextafter(2.0, 3.0)
    assert bal.ecdf_diffs(x2, t, w) == pytest.approx(exact, abs=0)
    assert bal.ecdf_diffs(x2, t, w, bal.SortedColumn.of(x2, t)) == pytest.approx(exact, abs=0)
    assert exact == pytest.approx(((4 + 5 + 9 + 6 + 3 + 0) / 12 / 6, 0.75))
    # a real difference (1e-9 relative) is still two values
    x3 = x.copy()
    x3[3] = 2.0 + 2e-9
    assert bal.ecdf_diffs(x3, t, w)[0] != pytest.approx(exact[0], rel=1e-6)


def test_tiny_table_through_pipeline_balance_all():
    df = pd.DataFrame({"x": [1, 2, 3, 2, 4, 6, 8, 5.0], "z": [0, 1, 0, 1, 1, 0, 0, 1.0],
                       "t": [1, 1, 1, 0, 0, 0, 0, 0], "y": [1.0, 2, 3, 4, 5, 6, 7, 8]})
    res = run_psm(prepare(df, "t", "y", ["x", "z"]),
                  Options(refute=False, caliper=None, common_support="none"))
    row = res.balance.query("estimand == 'ATT' and variable == 'x' and sample == 'all'").iloc[0]
    xc = np.array([2, 4, 6, 8, 5.0])
    assert row.smd == pytest.approx((2 - xc.mean()) / 1.0)
    assert row.var_ratio == pytest.approx(1.0 / xc.var(ddof=1))


def _greedy_reference(df_, dp, rf, rp, k, cal):
    """Plain O(n^2) version of MatchIt's greedy nearest-neighbour without replacement."""
    free = set(range(len(dp)))
    order = sorted(range(len(df_)), key=lambda i: (-df_[i], rf[i]))
    pairs = []
    active = order
    for _ in range(k):
        nxt = []
        for i in active:
            if not free:
                break
            j = min(free, key=lambda j: (abs(df_[i] - dp[j]), rp[j]))
            if abs(df_[i] - dp[j]) > cal:
                continue
            free.remove(j)
            pairs.append((i, j))
            nxt.append(i)
        active = nxt
    return sorted(pairs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_matching_equals_reference(seed):
    rng = np.random.default_rng(seed)
    nf, npool = 40, 70
    df_ = np.round(rng.normal(size=nf), 1)  # rounding makes ties
    dp = np.round(rng.normal(size=npool), 1)
    rf = rng.permutation(nf)
    rp = rng.permutation(npool) + 100
    for k, cal in ((1, np.inf), (2, 0.3), (3, 0.15)):
        m = match(df_, dp, rf, rp, k=k, replace=False, caliper=cal)
        got = sorted(zip(m.focal.tolist(), m.pool.tolist(), strict=True))
        assert got == _greedy_reference(df_, dp, rf, rp, k, cal)


def test_with_replacement_is_k_nearest():
    rng = np.random.default_rng(0)
    df_, dp = np.round(rng.normal(size=30), 1), np.round(rng.normal(size=50), 1)  # ties
    rp = rng.permutation(50)
    m = match(df_, dp, np.arange(30), rp, k=3, replace=True, caliper=None)
    for i in range(30):
        want = np.lexsort((rp, np.abs(dp - df_[i])))[:3]
        assert m.pool[m.focal == i].tolist() == want.tolist()


def test_all_ties_is_every_unit_as_near_as_the_kth():
    rng = np.random.default_rng(1)
    df_, dp = np.round(rng.normal(size=30), 1), np.round(rng.normal(size=50), 1)  # ties
    for k, cal in ((1, None), (2, None), (2, 0.15)):
        m = match(df_, dp, np.arange(30), rng.permutation(50), k=k, replace=True,
                  caliper=cal, all_ties=True)
        for i in range(30):
            dist = np.abs(dp - df_[i])
            near = np.sort(dist)[:k]  # the k nearest; those inside the caliper are matched
            near = near[near <= (np.inf if cal is None else cal)]
            want = set(np.flatnonzero(dist <= near.max())) if len(near) else set()
            assert set(m.pool[m.focal == i].tolist()) == want


def test_all_ties_atc_on_discrete_covariates_is_the_cell_average():
    """With replacement and --ties all, a propensity score taking one value per covariate
    cell makes each control's set every treated unit of its cell: the ATC is the average
    over controls of (treated mean of the cell - own outcome), by hand below. One tie rule
    (canonical) sends all of a cell's controls to one treated unit instead."""
    rng = np.random.default_rng(3)
    n = 600
    cell = rng.integers(0, 4, size=n)
    t = (rng.random(n) < np.array([0.2, 0.35, 0.5, 0.6])[cell]).astype(int)
    y = (rng.random(n) < 0.3 + 0.1 * cell - 0.15 * t).astype(float)
    df = pd.DataFrame({"cell": cell.astype(str), "t": t, "y": y})
    u = prepare(df, "t", "y", ["cell"])
    opt = dict(refute=False, estimands=("ATC",), replace=True, caliper=None,
               common_support="none")
    e = run_psm(u, Options(ties="all", **opt)).summary["contrasts"][0]["effects"][0]
    m1 = pd.Series(y[t == 1]).groupby(cell[t == 1]).mean()
    want = np.mean(m1.loc[cell[t == 0]].to_numpy() - y[t == 0])
    assert e["estimate"] == pytest.approx(want, abs=1e-12)
    canon = run_psm(u, Options(**opt)).summary["contrasts"][0]["effects"][0]
    assert abs(canon["estimate"] - want) > 0.01


def test_bias_correction_removes_the_matching_bias_of_a_linear_outcome():
    """Without noise and with an outcome linear in the covariates, the Abadie-Imbens (2011)
    correction gives the effect exactly however poor the matches (every treated unit, few
    controls, no caliper); the plain difference keeps the covariate gap of its pairs."""
    rng = np.random.default_rng(5)
    n = 300
    X = rng.normal(size=(n, 3))
    t = (rng.random(n) < 1 / (1 + np.exp(-(0.3 + 1.2 * X[:, 0])))).astype(int)
    y = 2.0 * X[:, 0] - X[:, 1] + 0.5 * X[:, 2] + 1.5 * t
    df = pd.DataFrame({"x1": X[:, 0], "x2": X[:, 1], "x3": X[:, 2], "t": t, "y": y})
    u = prepare(df, "t", "y", ["x1", "x2", "x3"])
    for est in ("ATT", "ATC"):
        opt = dict(refute=False, estimands=(est,), caliper=None, common_support="none")
        bc = run_psm(u, Options(estimator="bias-corrected", **opt))
        plain = run_psm(u, Options(**opt))
        e = bc.summary["contrasts"][0]["effects"][0]
        assert e["estimate"] == pytest.approx(1.5, abs=1e-9)
        assert abs(plain.summary["contrasts"][0]["effects"][0]["estimate"] - 1.5) > 0.02


def test_balance_on_squares_and_interactions_by_hand():
    df = confounded(400, 2)
    df["g"] = np.where(df.x3 > 0.3, "hi", "lo")
    u = prepare(df, "t", "y", ["x1", "x2", "g"])
    res = run_psm(u, Options(refute=False, estimands=("ATT",),
                             balance_terms=("squares", "interactions")))
    b = res.balance.set_index(["variable", "sample"])
    names = set(res.balance.variable)
    assert {"x1^2", "x2^2", "x1*x2", "x1*g[hi]", "x2*g[lo]"} <= names
    assert "g[hi]^2" not in names and "g[hi]*g[lo]" not in names  # binary / same covariate
    w = res.units.set_index("row")["weight_att"].reindex(np.arange(len(df))).to_numpy()
    t = df.t.to_numpy()
    for name, v in (("x1^2", df.x1**2), ("x1*x2", df.x1 * df.x2),
                    ("x2*g[lo]", df.x2 * (df.g == "lo"))):
        v = v.to_numpy()
        sd = np.std(v[t == 1], ddof=1)
        before = (v[t == 1].mean() - v[t == 0].mean()) / sd
        m1, m0 = (t == 1) & (w > 0), (t == 0) & (w > 0)
        after = (np.average(v[m1], weights=w[m1]) - np.average(v[m0], weights=w[m0])) / sd
        assert b.loc[(name, "all"), "smd"] == pytest.approx(before, rel=1e-9)
        assert b.loc[(name, "matched"), "smd"] == pytest.approx(after, rel=1e-9)


def test_rosenbaum_gamma1_equals_wilcoxon():
    rng = np.random.default_rng(0)
    d = rng.normal(0.3, 1, size=200)
    ref = stats.wilcoxon(d, alternative="greater", method="approx", correction=False).pvalue
    assert sens.rosenbaum_p_upper(d, 1.0) == pytest.approx(ref, rel=1e-9)
    r = sens.rosenbaum(d)
    assert r["gamma_critical"] > 1
    assert sens.rosenbaum_p_upper(d, r["gamma_critical"]) == pytest.approx(0.05, abs=1e-6)
    ps = [row["p_upper"] for row in r["p_upper_by_gamma"]]
    assert ps == sorted(ps)


def test_e_value_vanderweele_ding():
    # VanderWeele & Ding (2017): RR = 3.9 -> E-value 7.26; RR below 1 inverts
    assert sens._e(3.9) == pytest.approx(3.9 + np.sqrt(3.9 * 2.9))
    assert sens._e(1 / 3.9) == pytest.approx(sens._e(3.9))
    ev = sens.e_value(0.1, 0.05, 0.15, binary=True, p0=0.1, sd_y=1.0)
    assert ev["rr"] == pytest.approx(2.0)
    assert ev["e_value_ci"] == pytest.approx(sens._e(1.5))
    assert sens.e_value(0.1, -0.01, 0.2, binary=False, p0=0, sd_y=1.0)["e_value_ci"] == 1.0


def _dag(edges, latent=()):
    nodes = sorted({v for e in edges for v in e})
    return {"nodes": nodes, "edges": [{"source": a, "target": b} for a, b in edges],
            "latent": list(latent)}


def test_dag_backdoor_set_and_refusals():
    cols = ["t", "y", "x", "w", "m"]
    g = _dag([("x", "t"), ("x", "y"), ("t", "y"), ("w", "y"), ("t", "m"), ("m", "y")])
    info = backdoor_set(g, "g.json", cols, "t", "y")
    assert info["adjustment_set"] == ["x"]
    # latent confounder: not identifiable, the open path is named
    g2 = _dag([("u", "t"), ("u", "y"), ("t", "y"), ("x", "t")], latent=["u"])
    with pytest.raises(InputError, match=r"t <- u -> y"):
        backdoor_set(g2, "g.json", cols, "t", "y")
    # a node that is neither a column nor latent
    g3 = _dag([("age", "t"), ("age", "y"), ("t", "y")])
    with pytest.raises(InputError, match="'age'"):
        backdoor_set(g3, "g.json", cols, "t", "y")


def test_prepare_refuses_bad_input():
    df = confounded(100, 0)
    with pytest.raises(InputError, match="continuous"):
        prepare(df, "x1", "y", ["x2"])
    df2 = df.copy()
    df2.loc[[3, 7], "x2"] = np.nan
    with pytest.raises(InputError, match=r"'x2': 2 missing \(rows 3, 7\)"):
        prepare(df2, "t", "y", ["x1", "x2"])
    u = prepare(df2, "t", "y", ["x1", "x2"], dropna=True)
    assert u.dropped_na["rows"] == 2 and len(u.df) == 98
    df3 = df.assign(c=1.0)
    with pytest.raises(InputError, match="'c' is constant"):
        prepare(df3, "t", "y", ["x1", "c"])
    with pytest.raises(InputError, match="--caliper"):
        run_psm(prepare(df, "t", "y", ["x1"]), Options(caliper=0.0, refute=False))


def test_multilevel_each_level_vs_reference():
    rng = np.random.default_rng(1)
    n = 1500
    x = rng.normal(size=n)
    logits = np.stack([np.zeros(n), 0.8 * x, -0.8 * x], axis=1)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    arm = np.array([rng.choice(3, p=pi) for pi in p])
    levels = np.array(["direct", "polite", "fewshot"])[arm]
    y = x + np.array([0.0, 1.0, -0.5])[arm] + rng.normal(size=n)
    df = pd.DataFrame({"fmt": levels, "x": x, "y": y})
    res = run_psm(prepare(df, "fmt", "y", ["x"], reference="direct"),
                  Options(refute=False, estimands=("ATT",), replace=True))
    got = {c["contrast"]: c["effects"][0] for c in res.summary["contrasts"]}
    assert set(got) == {"fewshot vs direct", "polite vs direct"}
    assert got["polite vs direct"]["ci_low"] <= 1.0 <= got["polite vs direct"]["ci_high"]
    assert got["fewshot vs direct"]["ci_low"] <= -0.5 <= got["fewshot vs direct"]["ci_high"]


def test_refuters_run_on_our_estimator():
    u = prepare(confounded(400, 1), "t", "y", ["x1", "x2", "x3"])
    res = run_psm(u, Options(estimands=("ATT",), refute_sims=5))
    ref = res.summary["contrasts"][0]["refutation"]
    got = {r["refuter"]: r for r in ref["results"]}
    assert set(got) == {"placebo_treatment", "random_common_cause", "data_subset"}
    assert abs(got["placebo_treatment"]["new_effect"]) < 0.5
    assert got["random_common_cause"]["new_effect"] == pytest.approx(
        got["random_common_cause"]["estimate"], abs=0.5)


@pytest.mark.parametrize("estimator", ["diff", "bias-corrected", "regression"])
@pytest.mark.parametrize("estimand", ["ATT", "ATE"])
def test_refuters_estimate_with_the_runs_estimator(estimator, estimand):
    """The refuters' estimator reproduces the reported estimate for every --estimator (it
    used to return the plain matched difference for bias-corrected and regression runs)."""
    from dolm_tools.psm.core import point_estimate

    u = prepare(confounded(400, 1), "t", "y", ["x1", "x2", "x3"])
    opt = Options(estimands=(estimand,), refute=False, estimator=estimator)
    res = run_psm(u, opt)
    want = res.summary["contrasts"][0]["effects"][0]["estimate"]
    got = point_estimate(u.design.X, u.design.names, u.df["t"].to_numpy(),
                         u.df["y"].to_numpy(float), np.arange(400), opt, estimand)
    assert got == pytest.approx(want, abs=1e-10)


def test_refute_sample_keeps_the_treated_share():
    from dolm_tools.psm.refute import refute_sample

    t = np.r_[np.ones(300, int), np.zeros(700, int)][np.random.default_rng(0).permutation(1000)]
    idx = refute_sample(t, 100, seed=3)
    assert len(idx) == 100 and len(np.unique(idx)) == 100 and np.all(np.diff(idx) > 0)
    assert t[idx].sum() == 30  # treated and controls in their proportions
    assert not np.array_equal(idx, refute_sample(t, 100, seed=4))
    assert refute_sample(t, 1000, 3) is None and refute_sample(t, 0, 3) is None


def test_refuters_on_a_subsample_of_a_large_contrast():
    """Above --refute-max-units the refuters run on a subsample and test against the
    estimate on that subsample; at or below it nothing changes (the default covers every
    table of up to 20,000 units)."""
    from dolm_tools.psm.core import point_estimate
    from dolm_tools.psm.refute import refute_sample

    u = prepare(confounded(400, 1), "t", "y", ["x1", "x2", "x3"])
    opt = Options(estimands=("ATT",), refute_sims=5, seed=2)
    full = run_psm(u, opt).summary["contrasts"][0]["refutation"]
    same = run_psm(u, Options(estimands=("ATT",), refute_sims=5, seed=2,
                              refute_max_units=400)).summary["contrasts"][0]["refutation"]
    assert full == same and full["sample"] is None and full["n_units"] == 400
    res = run_psm(u, Options(estimands=("ATT",), refute_sims=5, seed=2, refute_max_units=250))
    att = res.summary["contrasts"][0]["effects"][0]["estimate"]
    ref = res.summary["contrasts"][0]["refutation"]
    smp = ref["sample"]
    assert (ref["n_units"], smp["n_units"], smp["of_units"], smp["max_units"]) == (
        250, 250, 400, 250)
    # the sample's own estimate, recomputed from its rows, is what the tests compare with
    df = u.df
    X, t = df[["x1", "x2", "x3"]].to_numpy(float), df["t"].to_numpy()
    idx = refute_sample(t, 250, 2)
    want = point_estimate(X[idx], ["x1", "x2", "x3"], t[idx], df["y"].to_numpy(float)[idx],
                          np.arange(400)[idx], opt, "ATT")
    assert smp["estimate"] == pytest.approx(want, abs=1e-12) and want != att
    got = {r["refuter"]: r for r in ref["results"]}
    assert all(r["estimate"] == smp["estimate"] for r in got.values())
    assert abs(got["placebo_treatment"]["new_effect"]) < 0.5  # truth 0; the effect is 1
    assert got["random_common_cause"]["new_effect"] == pytest.approx(want, abs=0.5)


def _brute_nearest(d_focal, d_pool, rank_pool, order, k, cal):
    """Greedy nearest without replacement, by brute force: each focal unit in ``order``
    takes the nearest free pool unit (ties: the smaller rank), k rounds."""
    free = np.ones(len(d_pool), dtype=bool)
    out = {}
    for _ in range(k):
        for i in order:
            if not free.any():
                break
            dist = np.where(free, np.abs(d_pool - d_focal[i]), np.inf)
            best = np.flatnonzero(dist == dist.min())
            j = best[np.argmin(rank_pool[best])]
            if dist[j] <= cal:
                out.setdefault(int(i), set()).add(int(j))
                free[j] = False
    return out


@pytest.mark.parametrize("m_order", ["largest", "smallest", "data", "random"])
def test_matchit_rule_takes_the_nearest_free_unit(m_order):
    # continuous scores (no ties): MatchIt's left/right walk is greedy nearest-free matching
    from dolm_tools.psm import nearest

    rng = np.random.default_rng(4)
    df, dp = rng.normal(size=60), rng.normal(size=200)
    rf, rp = rng.permutation(260)[:60], rng.permutation(260)[60:]
    order = nearest.focal_order(df, rf, m_order, np.random.default_rng(1))
    for k, cal in ((1, np.inf), (2, np.inf), (2, 0.05)):
        m = nearest.match_scalar(df, dp, rf, rp, order, k, False, None if cal == np.inf else cal)
        got = {}
        for f, p in zip(m.focal, m.pool, strict=True):
            got.setdefault(int(f), set()).add(int(p))
        assert got == _brute_nearest(df, dp, rp, order, k, cal)
        assert np.all(m.distance <= cal)
        mr = nearest.match_scalar(df, dp, rf, rp, order, k, True, None if cal == np.inf else cal)
        for f in range(60):  # with replacement: the k nearest within the caliper
            near = np.argsort(np.abs(dp - df[f]), kind="stable")[:k]
            near = {int(j) for j in near if abs(dp[j] - df[f]) <= cal}
            assert set(mr.pool[mr.focal == f].tolist()) == near


def test_atc_with_fifty_controls_per_treated_targets_the_controls():
    # 60 treated, 3000 controls; the effect grows with x, and the treated have larger x, so
    # the ATT (about 1.6) and ATC (about 1.0) differ. Without replacement only 60 controls
    # could be matched: the default matches the ATC direction with replacement instead.
    rng = np.random.default_rng(12)
    n = 3060
    x = rng.normal(size=n)
    t = np.zeros(n, dtype=int)
    p = np.exp(0.8 * x)
    t[rng.choice(n, 60, replace=False, p=p / p.sum())] = 1
    tau = 1.0 + 0.8 * x
    y = x + tau * t + rng.normal(scale=0.5, size=n)
    df = pd.DataFrame({"x": x, "t": t, "y": y})
    assert (t == 0).sum() == 50 * (t == 1).sum()
    u = prepare(df, "t", "y", ["x"])
    kw = dict(refute=False, caliper=None, common_support="none")
    res = run_psm(u, Options(**kw))
    c = res.summary["contrasts"][0]
    eff = {e["estimand"]: e for e in c["effects"]}
    assert eff["ATC"]["population"] == "control" and eff["ATC"]["n_population"] == 3000
    assert eff["ATC"]["n_focal_matched"] == 3000 and eff["ATC"]["n_sets"] == 3000
    assert c["matching"]["directions"]["ATC"]["replace"] is True
    assert "3000 control units" in c["matching"]["directions"]["ATC"]["pool_short"]
    true_atc, true_att = tau[t == 0].mean(), tau[t == 1].mean()
    assert eff["ATC"]["ci_low"] <= true_atc <= eff["ATC"]["ci_high"], (eff["ATC"], true_atc)
    assert abs(eff["ATC"]["estimate"] - true_atc) < abs(eff["ATC"]["estimate"] - true_att)
    assert eff["ATE"]["n_sets"] == n and eff["ATE"]["population_covered"] == 1.0
    true_ate = tau.mean()
    assert eff["ATE"]["ci_low"] <= true_ate <= eff["ATE"]["ci_high"]
    # MatchIt's behaviour, reported honestly: 60 of 3000 controls
    sub = run_psm(u, Options(**kw, pool_short="subset")).summary["contrasts"][0]
    atc = next(e for e in sub["effects"] if e["estimand"] == "ATC")
    assert atc["n_focal_matched"] == 60 and atc["population_covered"] == pytest.approx(0.02)
    with pytest.raises(InputError, match="3000 control units x ratio 1 > 60 treated"):
        run_psm(u, Options(**kw, pool_short="refuse"))


def test_exact_stratum_without_controls_is_named():
    df = confounded(300, 1)
    df["site"] = np.where(df.x1 > 1.2, "far", "near")
    df.loc[(df.site == "far"), "t"] = 1  # no control in the 'far' stratum
    u = prepare(df, "t", "y", ["x1", "x2"], extra={"--exact": ["site"]})
    with pytest.raises(InputError, match=r"--exact site: stratum \(site\) = \(far\).*no control"):
        run_psm(u, Options(refute=False, exact=("site",), estimands=("ATT",)))


def test_optimal_pairs_equal_brute_force():
    import itertools

    from dolm_tools.psm import optimal as om

    rng = np.random.default_rng(5)
    for n1, n0, k in ((5, 7, 1), (3, 7, 2), (4, 4, 1)):
        D = rng.random((n1, n0))
        f, p = om.optimal_pairs(D, k)
        best = min(itertools.permutations(range(n0), n1 * k),
                   key=lambda perm: sum(D[i // k, j] for i, j in enumerate(perm)))
        want = sorted((i // k, j) for i, j in enumerate(best))
        assert sorted(zip(f.tolist(), p.tolist(), strict=True)) == want
    # a caliper forbids pairs: units without an allowed partner stay unmatched
    D = np.array([[0.1, np.inf], [np.inf, np.inf], [0.3, 0.2]])
    f, p = om.optimal_pairs(D)
    assert sorted(zip(f.tolist(), p.tolist(), strict=True)) == [(0, 0), (2, 1)]


def test_full_matching_is_the_minimum_edge_cover():
    import itertools

    from dolm_tools.psm import optimal as om
    from scipy.optimize import linprog

    rng = np.random.default_rng(8)
    for n1, n0 in ((3, 4), (2, 5), (4, 3)):
        D = rng.random((n1, n0))
        t_e, c_e = om.full_matching(D)
        cost = D[t_e, c_e].sum()
        # every unit once, stars only (each edge has an end of degree 1)
        assert set(t_e.tolist()) == set(range(n1)) and set(c_e.tolist()) == set(range(n0))
        dt, dc = np.bincount(t_e, minlength=n1), np.bincount(c_e, minlength=n0)
        assert np.all((dt[t_e] == 1) | (dc[c_e] == 1))
        edges = list(itertools.product(range(n1), range(n0)))
        brute = min(sum(D[e] for e in sub) for r in range(1, len(edges) + 1)
                    for sub in itertools.combinations(edges, r)
                    if {a for a, _ in sub} == set(range(n1))
                    and {b for _, b in sub} == set(range(n0))) if len(edges) <= 12 else None
        A = np.zeros((n1 + n0, len(edges)))
        for j, (a, b) in enumerate(edges):
            A[a, j] = A[n1 + b, j] = 1
        lp = linprog([D[e] for e in edges], A_ub=-A, b_ub=-np.ones(n1 + n0), bounds=(0, 1))
        assert cost == pytest.approx(lp.fun, abs=1e-9)
        if brute is not None:
            assert cost == pytest.approx(brute, abs=1e-12)
    # a larger problem against the LP (the bipartite edge-cover polytope is integral)
    D = rng.random((30, 45))
    t_e, c_e = om.full_matching(D)
    edges = list(itertools.product(range(30), range(45)))
    A = np.zeros((75, len(edges)))
    for j, (a, b) in enumerate(edges):
        A[a, j] = A[30 + b, j] = 1
    lp = linprog([D[e] for e in edges], A_ub=-A, b_ub=-np.ones(75), bounds=(0, 1))
    assert D[t_e, c_e].sum() == pytest.approx(lp.fun, abs=1e-8)


@pytest.mark.parametrize("method", ["optimal", "full"])
def test_optimal_and_full_matching_estimate_the_att(method):
    u = prepare(confounded(500, 3), "t", "y", ["x1", "x2", "x3"])
    kw = dict(refute=False, caliper=None, common_support="none", estimands=("ATT", "ATE"))
    res = run_psm(u, Options(match_method=method, **kw))
    eff = {e["estimand"]: e for e in res.summary["contrasts"][0]["effects"]}
    naive = eff["naive"]["estimate"]
    assert abs(eff["ATT"]["estimate"] - TRUE_ATT) < abs(naive - TRUE_ATT) / 2, eff["ATT"]
    p = res.pairs[res.pairs.estimand == "ATT"]
    if method == "optimal":  # 1:1 without replacement, every treated unit matched
        assert p.control_row.is_unique and len(p) == int(u.df.t.sum())
        greedy = run_psm(u, Options(**kw)).pairs
        assert p.distance.sum() <= greedy[greedy.estimand == "ATT"].distance.sum()
    else:  # every unit in exactly one set; a set has one treated or one control unit
        assert eff["ATE"]["population_covered"] == 1.0
        nt = p.groupby("control_row").treated_row.nunique()
        nc = p.groupby("treated_row").control_row.nunique()
        shared = nt[nt > 1].index
        assert nc[p[p.control_row.isin(shared)].treated_row].eq(1).all()


def test_full_matching_refuses_a_problem_over_budget():
    u = prepare(confounded(400, 3), "t", "y", ["x1", "x2", "x3"])
    with pytest.raises(InputError, match="--method full: .* exceed the solver's budget"):
        run_psm(u, Options(refute=False, match_method="full", max_pairs=1000))


def test_regression_adjustment_cluster_se_equals_statsmodels():
    sm = pytest.importorskip("statsmodels.api")
    from dolm_tools.psm import estimators as E

    rng = np.random.default_rng(2)
    n = 300
    X = rng.normal(size=(n, 2))
    t = (rng.random(n) < 0.4).astype(float)
    y = X @ [1.0, -0.5] + 2 * t + rng.normal(size=n)
    w = rng.uniform(0.5, 2, n)
    cl = rng.integers(0, 60, n)
    r = E.wls_effect(y, t, w, target="ATE", cluster=cl)
    fit = sm.WLS(y, sm.add_constant(t), weights=w).fit(cov_type="cluster",
                                                       cov_kwds={"groups": cl})
    assert r["estimate"] == pytest.approx(fit.params[1], rel=1e-10)
    assert r["se"] == pytest.approx(fit.bse[1], rel=1e-8)
    r = E.wls_effect(y, t, w, X=X, target="ATE", cluster=None)
    Xc = X - np.average(X, axis=0, weights=w)
    D = sm.add_constant(np.column_stack([t, Xc, Xc * t[:, None]]))
    fit = sm.WLS(y, D, weights=w).fit(cov_type="HC1")
    assert r["estimate"] == pytest.approx(fit.params[1], rel=1e-10)
    assert r["se"] == pytest.approx(fit.bse[1], rel=1e-8)


def test_ipw_and_aipw_recover_the_effect():
    from dolm_tools.psm import estimators as E

    df = confounded(3000, 25)
    u = prepare(df, "t", "y", ["x1", "x2", "x3"])
    res = run_psm(u, Options(refute=False, match_method="ipw",
                             estimands=("ATE", "ATT", "ATC", "ATO")))
    eff = {e["estimand"]: e for e in res.summary["contrasts"][0]["effects"]}
    X = df[["x1", "x2", "x3"]].to_numpy()
    t, y = df.t.to_numpy(), df.y.to_numpy()
    for est in ("ATE", "ATT", "ATC", "ATO"):
        assert eff[est]["ci_low"] <= TRUE_ATT <= eff[est]["ci_high"], (est, eff[est])
    # Hajek ATE by hand from the same (unpenalised logistic) propensity
    e = res.units.sort_values("row").propensity.to_numpy()
    w1, w0 = t / e, (1 - t) / (1 - e)
    hajek = np.sum(w1 * y) / w1.sum() - np.sum(w0 * y) / w0.sum()
    assert eff["ATE"]["estimate"] == pytest.approx(hajek, abs=1e-6)
    # estimating the propensity makes the ATE's sandwich SE no larger than the SE that
    # treats the weights as known (Hirano, Imbens & Ridder 2003)
    known = E.wls_effect(y, t, E.ipw_weights(e, t, "ATE"), target="ATE")
    assert eff["ATE"]["se"] <= known["se"]
    # overlap weights balance the means of the propensity model's covariates exactly
    b = res.balance[(res.balance.estimand == "ATO") & (res.balance["sample"] == "matched")]
    assert b[b.type != "distance"].smd.abs().max() < 1e-8
    for est in ("ATE", "ATT"):
        r = E.aipw(y, t, X, est, seed=1)
        assert r["ci_low"] <= TRUE_ATT <= r["ci_high"], (est, r)


def test_balance_flags_follow_cobalt_thresholds():
    u = prepare(confounded(800, 4), "t", "y", ["x1", "x2", "x3"])
    res = run_psm(u, Options(refute=False, estimands=("ATT",)))
    b = res.balance[res.balance.type != "distance"]
    assert (b.smd_flag == (b.smd.abs() > 0.1)).all()
    vr = b.var_ratio.astype(float)
    assert (b.var_ratio_flag == ((vr < 0.5) | (vr > 2))).all()
    before = b[b["sample"] == "all"]
    assert before.smd_flag.any()  # confounded: imbalanced before matching
    flags = res.summary["contrasts"][0]["balance_flags"]["ATT"]
    after = b[(b["sample"] == "matched") & b.smd_flag.astype(bool)]
    assert flags["smd_over_0.1"] == after.variable.tolist()


def test_newton_logistic_is_the_maximum_likelihood_fit():
    """The numpy Newton fit (exact gradient, Hessian on a row subsample beyond 16384 rows)
    reaches scikit-learn's unpenalised optimum; separation is reported, not hidden."""
    from dolm_tools.psm.propensity import newton_logistic
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    for n in (500, 40_000):  # full Hessian; subsampled Hessian
        Z = rng.normal(size=(n, 4))
        t = (rng.random(n) < 1 / (1 + np.exp(-(Z @ [0.8, -0.5, 0.3, 0.0] - 0.7)))).astype(int)
        beta, ok = newton_logistic(Z, t)
        ref = LogisticRegression(C=np.inf, solver="newton-cholesky", tol=1e-12,
                                 max_iter=200).fit(Z, t)
        assert ok
        np.testing.assert_allclose(beta, np.r_[ref.intercept_, ref.coef_.ravel()], atol=1e-8)
    Z = rng.normal(size=(300, 2))
    _, ok = newton_logistic(Z, (Z[:, 0] > 0).astype(int))  # perfectly separated
    assert not ok
