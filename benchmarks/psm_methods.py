"""dolm-psm's matching methods beside R MatchIt's times on the same data, plus the large runs.

    python benchmarks/psm_methods.py [--n 5000] [--big 1000000] [-o FILE.md]

Data as benchmarks/psm.py (p = 10 standard-normal confounders, about 30% treated, true
ATT = 1). Each dolm row is ``run_psm`` end to end (propensity fit, matching, effects with
SEs, balance; no refuters), timed in-process. MatchIt rows run one Rscript each on the
same CSV and time ``matchit()`` alone (R's ``system.time``, the glm fit included); exact
matching uses 3 covariates cut into terciles (continuous covariates never match exactly),
on both sides. optmatch (MatchIt's optimal and full) is not in Debian: no MatchIt row.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from psm import simulate  # noqa: E402

METHODS = [
    # (label, dolm Options fields, MatchIt arguments or None, units)
    ("nearest 1:1, PS, no replacement", dict(distance="ps", caliper=None,
                                             common_support="none"), 'method="nearest"'),
    ("nearest 1:1, PS, with replacement", dict(distance="ps", caliper=None, replace=True,
                                               common_support="none"),
     'method="nearest", replace=TRUE'),
    ("nearest 1:1, logit, caliper 0.2", dict(caliper=0.2, common_support="none"),
     'method="nearest", link="linear.logit", caliper=0.2'),
    ("nearest, Mahalanobis", dict(distance="mahalanobis", common_support="none"),
     'method="nearest", distance="mahalanobis"'),
    ("optimal 1:1", dict(match_method="optimal", caliper=None, common_support="none"), None),
    ("full", dict(match_method="full", caliper=None, common_support="none"), None),
    ("exact (3 covariates in terciles)", dict(match_method="exact", common_support="none"),
     'method="exact"'),
    ("cem (3 covariates, Sturges bins)", dict(match_method="cem", common_support="none"),
     'method="cem"'),
    ("subclass 6", dict(match_method="subclass", common_support="none"), 'method="subclass"'),
    ("ipw (ATT)", dict(match_method="ipw"), None),
    ("aipw (ATT)", dict(match_method="aipw"), None),
]


def dolm_time(df, covs, fields) -> tuple[float, float]:
    from dolm_tools.psm.core import Options, run_psm
    from dolm_tools.psm.data import prepare

    t0 = time.perf_counter()
    u = prepare(df, "t", "y", covs)
    res = run_psm(u, Options(estimands=fields.pop("estimands", ("ATT",)), refute=False,
                             **fields))
    dt = time.perf_counter() - t0
    return dt, res.summary["contrasts"][0]["effects"][0]["estimate"]


def matchit_time(csv: str, formula: str, args: str) -> float | None:
    if shutil.which("Rscript") is None:
        return None
    code = (f'suppressMessages(library(MatchIt)); d <- read.csv("{csv}"); '
            f'cat(system.time(suppressWarnings(matchit({formula}, data = d, {args})))'
            '[["elapsed"]])')
    r = subprocess.run(["Rscript", "-e", code], capture_output=True, text=True)
    return float(r.stdout.strip()) if r.returncode == 0 else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--big", type=int, default=1_000_000)
    ap.add_argument("-o", "--output", default="benchmarks/results/psm_methods.md")
    a = ap.parse_args()
    p = 10
    df = simulate(a.n, p, 0)
    covs = [f"x{j}" for j in range(p)]
    cut = df.copy()
    for c in ("x0", "x1", "x2"):
        cut[c] = np.digitize(df[c], np.quantile(df[c], [1 / 3, 2 / 3]))
    lines = [f"Data: benchmarks/psm.py's simulation, {p} confounders, true ATT = 1. "
             "Seconds wall-clock, one run each, imports excluded.", "",
             "| method | units | dolm-psm s | MatchIt 4.5.1 s | dolm ATT |",
             "| --- | --- | --- | --- | --- |"]
    dolm_time(simulate(500, p, 1), covs, dict())  # warm-up: lazy imports are not timed
    with tempfile.TemporaryDirectory() as tmp:
        full_csv, cut_csv = os.path.join(tmp, "d.csv"), os.path.join(tmp, "cut.csv")
        df.to_csv(full_csv, index=False)
        cut.to_csv(cut_csv, index=False)
        for label, fields, margs in METHODS:
            mm = fields.get("match_method")
            data, cv, csv = (cut, ["x0", "x1", "x2"], cut_csv) if mm == "exact" else (
                (df, ["x0", "x1", "x2"], full_csv) if mm == "cem" else (df, covs, full_csv))
            secs, att = dolm_time(data, cv, dict(fields))
            rt = matchit_time(csv, "t ~ " + " + ".join(cv), margs) if margs else None
            lines.append(f"| {label} | {a.n} | {secs:.2f} | "
                         f"{'n/a' if rt is None else f'{rt:.2f}'} | {att:.4f} |")
            print(lines[-1], file=sys.stderr)
    big = simulate(100_000, p, 0)
    secs, att = dolm_time(big, covs, dict(replace=True))
    lines += ["", "| large runs | units | dolm-psm s | ATT |", "| --- | --- | --- | --- |",
              f"| nearest 1:1 with replacement, caliper 0.2 (ATT) | 100000 | {secs:.2f} | "
              f"{att:.4f} |"]
    print(lines[-1], file=sys.stderr)
    big = simulate(a.big, p, 0)
    secs, att = dolm_time(big, covs, dict(estimands=("ATT", "ATC", "ATE")))
    lines.append(f"| default run (ATT+ATC+ATE, nearest 1:1, caliper 0.2) | {a.big} | "
                 f"{secs:.2f} | {att:.4f} |")
    print(lines[-1], file=sys.stderr)
    os.makedirs(os.path.dirname(a.output) or ".", exist_ok=True)
    with open(a.output, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
