"""Joint mediation through a set (dolm_tools.mediate.joint, ``dolm-mediate statistical
--joint``) against ground truth on simulated data.

Two mediators, M1 -> M2, Gaussian errors. With a probit outcome every quantity has a closed
form: for M ~ N(mu, Sigma) and a probit index c + b'M, E[Phi(c + b'M + e)] =
Phi((c + b'mu) / sqrt(1 + b' Sigma b)); the joint draw uses the mediators' covariance, the
independent marginal draws of the via-effects its diagonal. The truth is that formula at the
true coefficients, averaged over the sample's covariates (the estimand the estimator targets).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from dolm.formats import read_table, validate_file
from dolm_tools.mediate import core, joint
from scipy.special import expit, ndtr

# M1 = A1 . [1, T, X1, X2] + N(0, S1^2);  M2 = A2 . [1, T, X1, X2] + G * M1 + N(0, S2^2)
A1, S1 = np.array([0.3, 0.8, 0.5, 0.0]), 1.0
A2, G, S2 = np.array([-0.2, 0.5, 0.0, 0.3]), 0.6, 0.8
# probit outcome index: B . [1, T, X1, X2] + BM1 M1 + BM2 M2
B, BM = np.array([-0.3, 0.4, 0.2, -0.2]), np.array([0.5, 0.7])


def simulate(n: int, seed: int, outcome: str = "probit") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    t = (rng.random(n) < expit(0.4 * x[:, 0])).astype(float)
    Z = np.column_stack([np.ones(n), t, x])
    m1 = Z @ A1 + S1 * rng.normal(size=n)
    m2 = Z @ A2 + G * m1 + S2 * rng.normal(size=n)
    idx = Z @ B + BM[0] * m1 + BM[1] * m2
    y = (idx + rng.normal(size=n) > 0).astype(float) if outcome == "probit" else (
        idx + rng.normal(size=n))
    return pd.DataFrame({"t": t, "x1": x[:, 0], "x2": x[:, 1], "m1": m1, "m2": m2, "y": y})


def probit_truth(x: np.ndarray, a1, s1, a2, g, s2, b, bm) -> dict[str, float]:
    """Joint and via ACMEs (control, treated) in closed form for the chain model."""
    n = len(x)

    def mean_y(a, b1, b2, joint_draw):
        z1 = np.column_stack([np.ones(n), np.full(n, b1), x])
        z2 = np.column_stack([np.ones(n), np.full(n, b2), x])
        mu1 = z1 @ a1
        mu2 = z2 @ a2 + g * (z2 @ a1)  # M2's mean under T = b2 (through M1 under b2 too)
        v1, v2, c12 = s1**2, g**2 * s1**2 + s2**2, g * s1**2
        var = bm[0] ** 2 * v1 + bm[1] ** 2 * v2 + (2 * bm[0] * bm[1] * c12 if joint_draw else 0)
        za = np.column_stack([np.ones(n), np.full(n, a), x])
        return float(np.mean(ndtr((za @ b + bm[0] * mu1 + bm[1] * mu2) / np.sqrt(1 + var))))

    out = {}
    for a, lab in ((0, "control"), (1, "treated")):
        j = mean_y(a, 1, 1, True) - mean_y(a, 0, 0, True)
        v1 = mean_y(a, 1, 0, False) - mean_y(a, 0, 0, False)
        v2 = mean_y(a, 0, 1, False) - mean_y(a, 0, 0, False)
        out |= {f"joint_{lab}": j, f"via1_{lab}": v1, f"via2_{lab}": v2,
                f"mutual_{lab}": j - v1 - v2}
    out["ade_control"] = mean_y(1, 0, 0, True) - mean_y(0, 0, 0, True)
    return out


def _fit(df: pd.DataFrame, kind_y: str) -> joint.JointFit:
    X = df[["x1", "x2"]].to_numpy()
    return joint.fit_joint(df.t.to_numpy(), [df.m1.to_numpy(), df.m2.to_numpy()],
                           df.y.to_numpy(), X, ["linear", "linear"], kind_y, False,
                           ["m1", "m2"], ["x1", "x2"], (0.0, 1.0))


@pytest.fixture(scope="module")
def probit_data():
    return simulate(20000, 1)


def test_simulation_engine_equals_closed_form_at_fitted_coefficients(probit_data):
    """The Monte Carlo engine (chain draws, independent marginal copies, common random
    numbers) against the closed form evaluated at the same fitted coefficients."""
    df = probit_data
    jf = _fit(df, "probit")
    f1, f2, fy = jf.mediators[0], jf.mediators[1], jf.outcome
    x = df[["x1", "x2"]].to_numpy()
    ref = probit_truth(x, f1.params, f1.sigma, f2.params[:4], f2.params[4], f2.sigma,
                       fy.params[[0, 1, 4, 5]], fy.params[2:4])
    got = joint.plug_in(jf, x, reps=48, rng=np.random.default_rng(0))
    for lab in ("control", "treated"):
        assert got["joint"][f"acme_{lab}"] == pytest.approx(ref[f"joint_{lab}"], abs=2e-3)
        assert got["via:m1"][f"acme_{lab}"] == pytest.approx(ref[f"via1_{lab}"], abs=2e-3)
        assert got["via:m2"][f"acme_{lab}"] == pytest.approx(ref[f"via2_{lab}"], abs=2e-3)
        assert got["mutual"][f"acme_{lab}"] == pytest.approx(ref[f"mutual_{lab}"], abs=2e-3)
    assert got["joint"]["ade_control"] == pytest.approx(ref["ade_control"], abs=2e-3)
    # the mutual term is real here (correlated mediators, a non-additive outcome model)
    assert abs(ref["mutual_treated"]) > 0.01


def test_probit_outcome_recovers_true_joint_and_path_effects(probit_data):
    df = probit_data
    d = core.prepare(df, "t", "y", ["m1", "m2"], ["x1", "x2"])
    eff, _, res = core.run_statistical(
        d, core.Options(outcome_model="probit", sims=300, seed=3, joint="pair"), "y")
    truth = probit_truth(df[["x1", "x2"]].to_numpy(), A1, S1, A2, G, S2, B, BM)
    e = eff.set_index(["mediator", "effect"])
    for label, key in (("pair", "joint"), ("pair: via m1", "via1"), ("pair: via m2", "via2"),
                       ("pair: mutual", "mutual")):
        for lab in ("control", "treated"):
            r = e.loc[(label, f"acme_{lab}")]
            assert r.se < 0.012, (label, lab, r.se)
            assert abs(r.estimate - truth[f"{key}_{lab}"]) < 4 * r.se, (label, lab, r.estimate,
                                                                         truth[f"{key}_{lab}"])
    assert set(eff.path) == {"joint", "via", "mutual"} and set(eff.mediator_set) == {"pair"}
    assert res[0]["members"] == ["m1", "m2"]


def test_linear_outcome_path_analysis_truth():
    """Linear outcome: the via-effects are the path products (M2's includes T -> M1 -> M2),
    the mutual term is 0 and joint = their sum."""
    df = simulate(4000, 2, outcome="linear")
    d = core.prepare(df, "t", "y", ["m1", "m2"], ["x1", "x2"])
    eff, _, _ = core.run_statistical(d, core.Options(sims=400, seed=0, joint="set"), "y")
    e = eff.set_index(["mediator", "effect"])
    via1 = BM[0] * A1[1]
    via2 = BM[1] * (A2[1] + G * A1[1])
    for label, truth in (("set: via m1", via1), ("set: via m2", via2), ("set", via1 + via2),
                         ("set: mutual", 0.0)):
        r = e.loc[(label, "acme_average")]
        assert abs(r.estimate - truth) < 4 * r.se + 1e-9, (label, r.estimate, truth, r.se)
    r = e.loc[("set", "ade_average")]
    assert abs(r.estimate - B[1]) < 4 * r.se
    assert abs(e.loc[("set: mutual", "acme_average")].estimate) < 0.01


def test_one_mediator_set_is_the_single_analysis():
    """A set of one: via = joint ACME exactly, mutual 0, and the joint ACME equals the
    Imai-Keele-Tingley estimate of the one-mediator analysis (to Monte Carlo error)."""
    df = simulate(3000, 4, outcome="linear")
    d = core.prepare(df, "t", "y", ["m1"], ["x1", "x2"])
    eff, _, _ = core.run_statistical(d, core.Options(sims=400, seed=0, joint="one"), "y")
    single, _, _ = core.run_statistical(d, core.Options(sims=400, seed=0), "y")
    e = eff.set_index(["mediator", "effect"])
    for lab in ("control", "treated"):
        assert e.loc[("one: via m1", f"acme_{lab}")].estimate == pytest.approx(
            e.loc[("one", f"acme_{lab}")].estimate, abs=1e-12)
        assert e.loc[("one: mutual", f"acme_{lab}")].estimate == pytest.approx(0, abs=1e-12)
    s = single.set_index(["mediator", "effect"]).loc[("m1", "acme_average")]
    j = e.loc[("one", "acme_average")]
    assert abs(j.estimate - s.estimate) < 0.5 * s.se


def _mediate(*args):
    local = os.path.join(os.path.dirname(sys.executable), "dolm-mediate")
    exe = local if os.path.exists(local) else (shutil.which("dolm-mediate") or "dolm-mediate")
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True)


def test_cli_joint_set(tmp_path):
    df = simulate(3000, 5)
    df["y"] = df.y.astype(bool)
    df.to_parquet(tmp_path / "units.parquet")
    out = tmp_path / "med.parquet"
    r = _mediate("statistical", tmp_path / "units.parquet", "-t", "t", "-y", "y", "-m", "m1,m2",
                 "-c", "x1,x2", "--outcome-model", "probit", "--joint", "heads", "--sims", "200",
                 "-o", out)
    assert r.returncode == 0, r.stderr
    for f in (out, tmp_path / "med.summary.json"):
        assert validate_file(str(f))[1] == [], f
    eff, _ = read_table(str(out))
    assert sorted(set(eff.mediator)) == ["heads", "heads: mutual", "heads: via m1",
                                         "heads: via m2"]
    truth = probit_truth(df[["x1", "x2"]].to_numpy(), A1, S1, A2, G, S2, B, BM)
    row = eff[(eff.mediator == "heads") & (eff.effect == "acme_treated")].iloc[0]
    assert abs(row.estimate - truth["joint_treated"]) < 4 * row.se
    assert row.ci_low < truth["joint_treated"] < row.ci_high
    s = json.loads((tmp_path / "med.summary.json").read_text())
    assert s["mediators"][0]["members"] == ["m1", "m2"] and s["options"]["joint"] == "heads"
    bad = _mediate("statistical", tmp_path / "units.parquet", "-t", "t", "-y", "y", "-m",
                   "m1,m2", "--joint", "heads", "--ci", "bootstrap", "-o", tmp_path / "b.parquet")
    assert bad.returncode == 3 and "--joint" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "b.parquet").exists()


def test_binary_mediator_in_the_chain():
    """A 0/1 first mediator (logistic) feeding a linear one, linear outcome: the via-effects
    are the coefficients times the true shifts of the mediators' means."""
    rng = np.random.default_rng(6)
    n = 6000
    x = rng.normal(size=n)
    t = (rng.random(n) < 0.5).astype(float)
    p1 = [expit(-0.3 + 1.2 * tv + 0.5 * x) for tv in (0.0, 1.0)]
    m1 = (rng.random(n) < np.where(t == 1, p1[1], p1[0])).astype(float)
    m2 = 0.1 + 0.4 * t + 0.9 * m1 + 0.2 * x + rng.normal(size=n)
    y = 0.5 + 0.3 * t + 0.8 * m1 + 0.6 * m2 - 0.2 * x + rng.normal(size=n)
    df = pd.DataFrame({"t": t, "x": x, "m1": m1, "m2": m2, "y": y})
    d = core.prepare(df, "t", "y", ["m1", "m2"], ["x"])
    eff, _, res = core.run_statistical(d, core.Options(sims=400, seed=1, joint="s"), "y")
    dp1 = float(np.mean(p1[1] - p1[0]))
    e = eff.set_index(["mediator", "effect"])
    for label, truth in (("s: via m1", 0.8 * dp1), ("s: via m2", 0.6 * (0.4 + 0.9 * dp1))):
        r = e.loc[(label, "acme_average")]
        assert abs(r.estimate - truth) < 4 * r.se, (label, r.estimate, truth, r.se)
    assert eff[eff.mediator == "s: via m1"].mediator_model.iloc[0] == "logistic"
    assert res[0]["mediator_model"] is None  # a mixed set
