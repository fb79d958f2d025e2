"""Coverage of dolm-psm's 95% intervals on simulated data with a known effect.

    python benchmarks/psm_coverage.py [--design standard|thin] [--reps 500] [--n 1000]
        [--jobs 2] [-o FILE.json]

Each replicate draws n units: three standard-normal confounders, treatment from a logistic
model, outcome linear in the confounders plus a constant effect of 1, so the ATT, ATC, ATE
and ATO all equal 1. Two designs differ only in the propensity model's intercept:
``standard`` (-1.4: about 22% treated, 3.5 controls per treated unit, the kind of control
pool simulation studies of 1:1 matching without replacement use) and ``thin`` (-0.7: about
35% treated, 1.9 controls per treated unit, the stress case). Every estimator runs through
dolm-psm's core (the code the executable calls) on the same draw; coverage is the share of
replicates whose 95% interval holds 1, with its Monte Carlo SE sqrt(c(1 - c)/reps) (about
1 point at 500 replicates). Recorded, not asserted.
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
# propensity intercept per design (the slopes and the outcome model are shared)
DESIGNS = {"standard": -1.4, "thin": -0.7}

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


def draw(n: int, seed: int, design: str = "thin") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    lp = DESIGNS[design] + 0.6 * X[:, 0] - 0.4 * X[:, 1] + 0.3 * X[:, 2]
    t = (rng.random(n) < 1 / (1 + np.exp(-lp))).astype(int)
    y = X[:, 0] - 0.5 * X[:, 1] + 0.25 * X[:, 2] + TRUE * t + rng.normal(size=n)
    return pd.DataFrame({"x1": X[:, 0], "x2": X[:, 1], "x3": X[:, 2], "t": t, "y": y})


def replicate(args: tuple[int, int, str]) -> dict[str, list[float]]:
    """One replicate: every estimator's (estimate, se, ci_low, ci_high, seconds)."""
    rep, n, design = args
    from dolm_tools.psm.core import Options, run_psm
    from dolm_tools.psm.data import prepare

    u = prepare(draw(n, rep, design), "t", "y", ["x1", "x2", "x3"])
    out = {"_treated": [float(u.df["t"].mean())]}
    for name, (estimand, kw) in ESTIMATORS.items():
        s = time.process_time()
        res = run_psm(u, Options(refute=False, estimands=(estimand,), seed=rep, **kw))
        e = res.summary["contrasts"][0]["effects"][0]
        out[name] = [e["estimate"], e["se"], e["ci_low"], e["ci_high"],
                     time.process_time() - s]
    return out


def summarise(per_rep: list[dict[str, list[float]]]) -> dict[str, dict]:
    """Coverage (with its Monte Carlo SE), bias and SE accuracy per estimator."""
    reps = len(per_rep)
    rows = {}
    for k in ESTIMATORS:
        a = np.array([r[k] for r in per_rep])
        est, se, lo, hi, sec = a.T
        cov = float(np.mean((lo <= TRUE) & (TRUE <= hi)))
        rows[k] = {"estimand": ESTIMATORS[k][0], "coverage": cov,
                   "coverage_mc_se": float(np.sqrt(cov * (1 - cov) / reps)),
                   "mean_estimate": float(est.mean()),
                   "bias_mc_se": float(est.std(ddof=1) / np.sqrt(reps)),
                   "mean_ci_width": float((hi - lo).mean()),
                   "sd_estimate": float(est.std(ddof=1)), "mean_se": float(se.mean()),
                   "cpu_seconds_per_run": float(sec.mean())}
    return rows


MATCHIT_R = r"""
suppressMessages(library(MatchIt))
d <- read.csv(commandArgs(TRUE)[1])
m <- matchit(t ~ x1 + x2 + x3, data = d, method = "nearest", distance = "glm",
             link = "linear.logit", caliper = 0.2, m.order = "largest", replace = FALSE,
             discard = "both", distance.options = list(epsilon = 1e-14, maxit = 100))
mm <- m$match.matrix
ok <- !is.na(mm[, 1])
w <- m$weights
att <- weighted.mean(d$y[d$t == 1], w[d$t == 1]) - weighted.mean(d$y[d$t == 0], w[d$t == 0])
cat(sprintf("%d %d", match(rownames(mm)[ok], rownames(d)) - 1L,
            match(mm[ok, 1], rownames(d)) - 1L), sep = "\n")
cat(sprintf("att %.15g\ncaliper %.15g\n", att, unname(m$caliper)))
"""


def matchit_check(design: str, reps: int, n: int) -> None:
    """The first estimator's matches (nearest 1:1, logit, caliper 0.2, largest first, discard
    both) beside R MatchIt's on the first replicates: dolm's default, ``--ties data``
    (MatchIt's documented rule) and ``--ties matchit-4.5.1`` (the installed 4.5.1, whose
    caliper never binds: kosukeimai/MatchIt#163)."""
    import subprocess
    import tempfile

    from dolm_tools.psm.core import Options, run_psm
    from dolm_tools.psm.data import prepare

    with tempfile.TemporaryDirectory() as tmp:
        script, csv = os.path.join(tmp, "m.R"), os.path.join(tmp, "d.csv")
        with open(script, "w") as f:
            f.write(MATCHIT_R)
        for rep in range(reps):
            df = draw(n, rep, design)
            df.to_csv(csv, index=False)
            lines = subprocess.run(["Rscript", script, csv], capture_output=True, text=True,
                                   check=True).stdout.split("\n")
            kv = dict(x.split() for x in lines if x.startswith(("att", "caliper")))
            theirs = {tuple(map(int, x.split())) for x in lines
                      if x and not x.startswith(("att", "caliper"))}
            u = prepare(df, "t", "y", ["x1", "x2", "x3"])
            for ties in ("canonical", "data", "matchit-4.5.1"):
                res = run_psm(u, Options(refute=False, estimands=("ATT",), seed=rep, ties=ties))
                p = res.pairs
                mine = set(zip(p.treated_row.tolist(), p.control_row.tolist(), strict=True))
                c = res.summary["contrasts"][0]
                print(f"{design} replicate {rep}, --ties {ties}: {len(mine)} pairs, "
                      f"{len(mine & theirs)} of MatchIt 4.5.1's {len(theirs)} in common"
                      f"{' (identical)' if mine == theirs else ''}; ATT "
                      f"{c['effects'][0]['estimate']:.9f} vs MatchIt {float(kv['att']):.9f};"
                      f" caliper width {c['matching']['caliper_width']:.9f} vs "
                      f"{float(kv['caliper']):.9f}; m.order "
                      f"{c['matching']['directions']['ATT']['m_order']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--design", choices=sorted(DESIGNS), default="standard")
    ap.add_argument("--reps", type=int, default=500)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--jobs", type=int, default=1, help="Worker processes over replicates.")
    ap.add_argument("-o", "--output", default=None,
                    help="[default: benchmarks/results/psm_coverage[_thin].json]")
    ap.add_argument("--only", default=None, help="Run the estimators whose name has this.")
    ap.add_argument("--matchit-check", type=int, default=0, metavar="K",
                    help="Only compare the first estimator's matches with R MatchIt's on "
                    "the first K replicates (needs Rscript and MatchIt).")
    a = ap.parse_args()
    if a.matchit_check:
        matchit_check(a.design, a.matchit_check, a.n)
        return
    if a.only:
        for k in [k for k in ESTIMATORS if a.only not in k]:
            del ESTIMATORS[k]
    output = a.output or ("benchmarks/results/psm_coverage.json" if a.design == "standard"
                          else "benchmarks/results/psm_coverage_thin.json")
    t0 = time.time()
    jobs = [(rep, a.n, a.design) for rep in range(a.reps)]
    per_rep = []
    if a.jobs > 1:
        from multiprocessing import get_context

        with get_context("fork").Pool(a.jobs) as pool:
            for r in pool.imap(replicate, jobs, chunksize=5):
                per_rep.append(r)
                if len(per_rep) % 25 == 0:
                    print(f"{len(per_rep)} replicates, {time.time() - t0:.0f} s",
                          file=sys.stderr)
    else:
        for j in jobs:
            per_rep.append(replicate(j))
            if len(per_rep) % 25 == 0:
                print(f"{len(per_rep)} replicates, {time.time() - t0:.0f} s", file=sys.stderr)
    rows = summarise(per_rep)
    out = {"reps": a.reps, "n": a.n, "design": a.design,
           "propensity_intercept": DESIGNS[a.design],
           "mean_share_treated": float(np.mean([r["_treated"][0] for r in per_rep])),
           "truth": TRUE, "wall_seconds": time.time() - t0, "estimators": rows}
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with open(output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"design {a.design}: {a.reps} replicates of {a.n} units, "
          f"{100 * out['mean_share_treated']:.1f}% treated, {out['wall_seconds']:.0f} s wall")
    print("| estimator | estimand | coverage (MC SE) | mean estimate (MC SE) | SD of estimates |"
          " mean SE | mean CI width |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for k, r in rows.items():
        print(f"| {k} | {r['estimand']} | {100 * r['coverage']:.1f}% "
              f"({100 * r['coverage_mc_se']:.1f}) | {r['mean_estimate']:.3f} "
              f"({r['bias_mc_se']:.3f}) | {r['sd_estimate']:.3f} | {r['mean_se']:.3f} | "
              f"{r['mean_ci_width']:.3f} |")


if __name__ == "__main__":
    main()
