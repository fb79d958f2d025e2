"""dolm-psm speed and estimates side by side with causalml and DoWhy, in one run.

    python benchmarks/psm.py [--n 100000] [--p 10] [--full] [--repeat 3] [--big 1000000]
                             [--only-replace] [--keep wall|cpu] [--out benchmarks/results/psm.md]

Data: n units, p standard-normal confounders, treatment from a logistic model (about 30%
treated), outcome linear in the confounders plus a constant effect of 1 (true ATT = 1).
Task: 1:1 nearest-neighbour matching on the propensity score with a caliper of 0.2 SD of
the logit propensity, ATT.

* dolm-psm: ``run_psm`` end to end (unpenalised logistic propensity, trimming, matching,
  ATT with Abadie-Imbens SE, balance, Rosenbaum bounds, E-value; no refuters).
* causalml ``NearestNeighborMatch``: matching only, on the logit propensity we fit with
  scikit-learn (its time is included); caliper 0.2 x SD of the score over all units.
  Without replacement it loops over treated units in pandas (quadratic time), so that row
  runs on a 20k subsample unless --full is given.
* DoWhy ``backdoor.propensity_score_matching``: its own (L2-penalised) logistic propensity,
  1:1 with replacement, no caliper; ATT.

causalml is a benchmark-only dependency: ``pip install --no-deps causalml`` (its matching
module needs nothing beyond numpy, pandas and scikit-learn).

Each row runs ``--repeat`` times, interleaved with the other rows, and keeps the fastest
wall time and the CPU seconds (``time.process_time``) of that run: on a shared machine the
wall time measures the load as much as the code, the CPU time far less so.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
import warnings

import numpy as np
import pandas as pd


def simulate(n: int, p: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    beta = np.linspace(0.5, -0.3, p) * 0.6
    t = (rng.random(n) < 1 / (1 + np.exp(-(X @ beta - 1.0)))).astype(int)
    gamma = np.linspace(-0.5, 0.8, p)
    y = X @ gamma + 1.0 * t + rng.normal(size=n)
    df = pd.DataFrame(X, columns=[f"x{j}" for j in range(p)])
    df["t"], df["y"] = t, y
    return df


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def ours(df, covs, replace=False, estimands=("ATT",)):
    from dolm_tools.psm.core import Options, run_psm
    from dolm_tools.psm.data import prepare

    u = prepare(df, "t", "y", covs)
    res = run_psm(u, Options(estimands=estimands, refute=False, replace=replace))
    eff = {e["estimand"]: e for e in res.summary["contrasts"][0]["effects"]}
    return eff["ATT"]["estimate"], eff["ATT"]["n_sets"]


def ours_matching(df, covs, replace=True):
    """dolm-psm's share of the work causalml does: propensity fit and matching (the
    library functions ``run_psm`` calls first), without effects, balance or sensitivity."""
    import numpy as np
    from dolm_tools.psm.core import Options, match_contrast, model_matrix
    from dolm_tools.psm.data import prepare

    u = prepare(df, "t", "y", covs)
    t = u.df["t"].to_numpy().astype(int)
    X, names = model_matrix(u.design.X, u.design.names, u.design.drop_for_model)
    m = match_contrast(X, names, t, np.arange(len(t)), Options(estimands=("ATT",),
                       replace=replace), ("ATT",))
    pf, pm, _ = m.pairs["ATT"]
    y = u.df["y"].to_numpy(dtype=float)
    return float(np.mean(y[pf]) - np.mean(y[pm])), int(len(np.unique(pf)))


def causalml_nn(df, covs, replace):
    from causalml.match import NearestNeighborMatch
    from sklearn.linear_model import LogisticRegression

    X = df[covs].to_numpy()
    Z = (X - X.mean(0)) / X.std(0)
    ps = LogisticRegression(C=np.inf, solver="newton-cholesky").fit(Z, df.t).predict_proba(Z)[:, 1]
    data = df[["t", "y"]].assign(score=np.log(ps) - np.log1p(-ps))
    m = NearestNeighborMatch(caliper=0.2, replace=replace, ratio=1, random_state=0, n_jobs=1)
    matched = m.match(data, "t", ["score"])
    att = matched.loc[matched.t == 1, "y"].mean() - matched.loc[matched.t == 0, "y"].mean()
    return float(att), int((matched.t == 1).sum())


def dowhy_psm(df, covs):
    logging.getLogger("dowhy").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from dowhy import CausalModel

        model = CausalModel(data=df[covs + ["t", "y"]], treatment="t", outcome="y",
                            common_causes=covs)
        est = model.identify_effect(proceed_when_unidentifiable=True)
        r = model.estimate_effect(est, method_name="backdoor.propensity_score_matching",
                                  target_units="att")
    return float(r.value), int(df.t.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--p", type=int, default=10)
    ap.add_argument("--small", type=int, default=20_000,
                    help="units for causalml without replacement (quadratic time)")
    ap.add_argument("--full", action="store_true",
                    help="also run causalml without replacement on all --n units (slow)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="runs per row (fastest kept)")
    ap.add_argument("--big", type=int, default=0,
                    help="also time dolm-psm's default run (ATT+ATC+ATE) on this many units")
    ap.add_argument("--only-replace", action="store_true",
                    help="only the with-replacement rows (dolm-psm and causalml) and --big")
    ap.add_argument("--keep", choices=("wall", "cpu"), default="wall",
                    help="which of the --repeat runs a row keeps: the fastest wall time, or "
                    "the fewest CPU seconds (steadier on a loaded machine)")
    ap.add_argument("--out", default="benchmarks/results/psm.md")
    a = ap.parse_args()

    import dolm_tools.psm.core  # noqa: F401  (imports outside the timings)
    import sklearn.linear_model  # noqa: F401
    import threadpoolctl  # noqa: F401

    df = simulate(a.n, a.p, a.seed)
    small = simulate(a.small, a.p, a.seed)
    covs = [f"x{j}" for j in range(a.p)]
    todo = []

    def add(tool, setting, n, fn):
        todo.append((tool, setting, n, fn))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if not a.only_replace:
        add("dolm-psm", "1:1, no replacement, caliper 0.2", a.n, lambda: ours(df, covs))
    add("dolm-psm", "1:1, with replacement, caliper 0.2", a.n,
        lambda: ours(df, covs, replace=True))
    add("dolm-psm", "propensity + matching only, with replacement, caliper 0.2", a.n,
        lambda: ours_matching(df, covs))
    add("causalml NearestNeighborMatch", "1:1, with replacement, caliper 0.2", a.n,
        lambda: causalml_nn(df, covs, True))
    if not a.only_replace:
        add("dolm-psm", "ATT+ATC+ATE, no replacement (default run)", a.n,
            lambda: ours(df, covs, estimands=("ATT", "ATC", "ATE")))
        add("DoWhy propensity_score_matching", "1:1, with replacement, no caliper", a.n,
            lambda: dowhy_psm(df, covs))
        add("dolm-psm", "1:1, no replacement, caliper 0.2", a.small, lambda: ours(small, covs))
        add("causalml NearestNeighborMatch", "1:1, no replacement, caliper 0.2", a.small,
            lambda: causalml_nn(small, covs, False))
    if a.full:
        add("causalml NearestNeighborMatch", "1:1, no replacement, caliper 0.2", a.n,
            lambda: causalml_nn(df, covs, False))
    if a.big:
        big = simulate(a.big, a.p, a.seed)
        add("dolm-psm", "ATT+ATC+ATE, no replacement (default run), big", a.big,
            lambda: ours(big, covs, estimands=("ATT", "ATC", "ATE")))
    best: dict[int, dict] = {}
    for _ in range(a.repeat):
        for i, (tool, setting, n, fn) in enumerate(todo):
            (att, n_t), secs, cpu = timed(fn)
            print(f"{tool:32s} {setting:48s} n={n:>7} {secs:8.2f} s wall {cpu:7.2f} s CPU "
                  f"ATT={att:.4f} load {os.getloadavg()[0]:.1f}", flush=True)
            key = "cpu" if a.keep == "cpu" else "seconds"
            if i not in best or (cpu if a.keep == "cpu" else secs) < best[i][key]:
                best[i] = {"tool": tool, "setting": setting.replace(", big", ""), "units": n,
                           "seconds": secs, "cpu": cpu, "ATT": att, "treated matched": n_t}
    rows = [best[i] for i in range(len(todo))]
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    base = {(r["units"], r["setting"].split(",")[1].strip()): r for r in rows
            if r["tool"] == "dolm-psm" and r["setting"].startswith("1:1")}
    lines = [
        "# dolm-psm benchmark",
        "",
        f"`python benchmarks/psm.py --n {a.n} --p {a.p} --repeat {a.repeat}"
        f"{' --big ' + str(a.big) if a.big else ''}{' --only-replace' if a.only_replace else ''}"
        f"{' --keep cpu' if a.keep == 'cpu' else ''}`"
        f": {a.p} confounders, true ATT = 1, "
        f"{df.t.mean():.0%} treated. Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"load average {load:.1f} at the start and {load_end:.1f} at the end (shared machine: "
        "compare ratios within the run, and CPU seconds rather than wall). "
        f"{'Fewest CPU seconds' if a.keep == 'cpu' else 'Fastest'} of "
        f"{a.repeat} interleaved runs; seconds, imports excluded.",
        "",
        "| tool | setting | units | wall s | CPU s | wall / dolm-psm | CPU / dolm-psm "
        "| ATT (truth 1) | treated matched |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        key = (r["units"], "no replacement" if "no replacement" in r["setting"] else
               "with replacement")
        ref = base.get(key)
        ratio = f"{r['seconds'] / ref['seconds']:.2f}" if ref else "-"
        cratio = f"{r['cpu'] / ref['cpu']:.2f}" if ref else "-"
        lines.append(f"| {r['tool']} | {r['setting']} | {r['units']} | {r['seconds']:.2f} | "
                     f"{r['cpu']:.2f} | {ratio} | {cratio} | {r['ATT']:.4f} | "
                     f"{r['treated matched']} |")
    lines += [
        "",
        "Ratios compare with dolm-psm on the same units and the same replacement setting. "
        "dolm-psm's time includes the propensity fit, trimming, balance tables (SMD, variance "
        "ratio, eCDF), Abadie-Imbens SEs, Rosenbaum bounds and E-values; causalml's includes "
        "a scikit-learn propensity fit and matching only; DoWhy's its own propensity fit and "
        "matching (no caliper, so every treated unit is matched, and its L2-penalised "
        "propensity model).",
    ]
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
