"""Coverage of dolm-psm's 95% intervals on simulated data with a known effect.

    python benchmarks/psm_coverage.py [--reps 500] [--n 1000] [-o FILE.json]

Each replicate draws n units: three standard-normal confounders, treatment from a logistic
model (about 35% treated), outcome linear in the confounders plus a constant effect of 1, so
the ATT, ATC, ATE and ATO all equal 1. Every estimator runs through dolm-psm's core (the
code the executable calls) on the same draw; coverage is the share of replicates whose 95%
interval holds 1 (Monte Carlo SE about 1 point at 500 replicates). Recorded, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import pandas as pd

TRUE = 1.0

# name -> (estimand, Options fields)
ESTIMATORS = {
    "nearest 1:1, caliper 0.2, diff (AI)": ("ATT", dict()),
    "nearest 1:1, caliper 0.2, bias-corrected (AI)": ("ATT", dict(estimator="bias-corrected")),
    "nearest 1:1 with replacement, diff (AI)": ("ATT", dict(replace=True, caliper=None)),
    "nearest 1:2 with replacement, diff (AI)": ("ATT", dict(replace=True, ratio=2,
                                                            caliper=None)),
    "nearest 1:1, caliper 0.2, regression (CR1)": ("ATT", dict(estimator="regression")),
    "optimal 1:1, regression (CR1)": ("ATT", dict(match_method="optimal", caliper=None,
                                                  estimator="regression")),
    "full, diff (AI)": ("ATT", dict(match_method="full", caliper=None,
                                    common_support="none")),
    "full, regression": ("ATT", dict(match_method="full", caliper=None,
                                     common_support="none", estimator="regression")),
    "subclass 6, regression (HC1)": ("ATE", dict(match_method="subclass",
                                                 estimator="regression")),
    "IPW ATE": ("ATE", dict(match_method="ipw")),
    "IPW ATE stabilised, trimmed 0.02": ("ATE", dict(match_method="ipw", stabilize=True,
                                                     trim=0.02)),
    "IPW ATT": ("ATT", dict(match_method="ipw")),
    "IPW ATC": ("ATC", dict(match_method="ipw")),
    "overlap weights ATO": ("ATO", dict(match_method="ipw")),
    "AIPW ATE (linear, 5-fold)": ("ATE", dict(match_method="aipw")),
    "AIPW ATT (linear, 5-fold)": ("ATT", dict(match_method="aipw")),
    "AIPW ATC (linear, 5-fold)": ("ATC", dict(match_method="aipw")),
}


def draw(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    lp = -0.7 + 0.6 * X[:, 0] - 0.4 * X[:, 1] + 0.3 * X[:, 2]
    t = (rng.random(n) < 1 / (1 + np.exp(-lp))).astype(int)
    y = X[:, 0] - 0.5 * X[:, 1] + 0.25 * X[:, 2] + TRUE * t + rng.normal(size=n)
    return pd.DataFrame({"x1": X[:, 0], "x2": X[:, 1], "x3": X[:, 2], "t": t, "y": y})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=500)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("-o", "--output", default="benchmarks/results/psm_coverage.json")
    ap.add_argument("--only", default=None, help="Run the estimators whose name has this.")
    a = ap.parse_args()
    if a.only:
        for k in [k for k in ESTIMATORS if a.only not in k]:
            del ESTIMATORS[k]
    from dolm_tools.psm.core import Options, run_psm
    from dolm_tools.psm.data import prepare

    hits = {k: 0 for k in ESTIMATORS}
    est_sum = {k: 0.0 for k in ESTIMATORS}
    est_sq = {k: 0.0 for k in ESTIMATORS}
    se_sum = {k: 0.0 for k in ESTIMATORS}
    width = {k: 0.0 for k in ESTIMATORS}
    secs = {k: 0.0 for k in ESTIMATORS}
    t0 = time.time()
    for rep in range(a.reps):
        u = prepare(draw(a.n, rep), "t", "y", ["x1", "x2", "x3"])
        for name, (estimand, kw) in ESTIMATORS.items():
            s = time.perf_counter()
            res = run_psm(u, Options(refute=False, estimands=(estimand,), seed=rep, **kw))
            secs[name] += time.perf_counter() - s
            e = res.summary["contrasts"][0]["effects"][0]
            hits[name] += e["ci_low"] <= TRUE <= e["ci_high"]
            est_sum[name] += e["estimate"]
            est_sq[name] += e["estimate"] ** 2
            se_sum[name] += e["se"]
            width[name] += e["ci_high"] - e["ci_low"]
        if (rep + 1) % 25 == 0:
            print(f"{rep + 1} replicates, {time.time() - t0:.0f} s", file=sys.stderr)
    rows = {k: {"estimand": ESTIMATORS[k][0], "coverage": hits[k] / a.reps,
                "mean_estimate": est_sum[k] / a.reps, "mean_ci_width": width[k] / a.reps,
                "sd_estimate": float(np.sqrt(max(est_sq[k] / a.reps - (est_sum[k] / a.reps) ** 2,
                                                 0.0) * a.reps / max(a.reps - 1, 1))),
                "mean_se": se_sum[k] / a.reps,
                "seconds_per_run": secs[k] / a.reps} for k in ESTIMATORS}
    out = {"reps": a.reps, "n": a.n, "truth": TRUE, "design": __doc__.split("\n\n")[1],
           "estimators": rows}
    os.makedirs(os.path.dirname(a.output) or ".", exist_ok=True)
    with open(a.output, "w") as f:
        json.dump(out, f, indent=1)
    print("| estimator | estimand | coverage | mean estimate | SD of estimates | mean SE |"
          " mean CI width |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for k, r in rows.items():
        print(f"| {k} | {r['estimand']} | {100 * r['coverage']:.1f}% | "
              f"{r['mean_estimate']:.3f} | {r['sd_estimate']:.3f} | {r['mean_se']:.3f} | "
              f"{r['mean_ci_width']:.3f} |")


if __name__ == "__main__":
    main()
