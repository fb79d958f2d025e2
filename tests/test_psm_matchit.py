"""dolm-psm against R MatchIt 4.5 (reference; skipped where Rscript or MatchIt is missing).

One Rscript run matches the lalonde data (shipped with MatchIt: many tied controls, with
re74 = re75 = 0) and a simulated table of discrete covariates (ties everywhere) under each
setting; dolm matches the same CSVs with the same options. The matched sets must be
identical, the weighted difference in means (MatchIt's weights) equal to 1e-6, and for the
stratification methods the subclasses and weights the same. MatchIt fits glm to
convergence 1e-14 so both sides have the same propensity scores (checked to 1e-8).

Debian's MatchIt is 4.5.1, whose scalar-distance nearest matching truncates |distance
differences| to integers (kosukeimai/MatchIt#163, fixed upstream later): dolm reproduces it
with ``ties="matchit-4.5.1"``, which differs from ``ties="data"`` (the intended rule, checked
against brute force in tests/test_psm.py) only in that truncation and an index off-by-one."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from dolm_tools.psm.core import Options, run_psm
from dolm_tools.psm.data import prepare


def _has_matchit() -> bool:
    if shutil.which("Rscript") is None:
        return False
    r = subprocess.run(["Rscript", "-e", "library(MatchIt)"], capture_output=True)
    return r.returncode == 0


pytestmark = pytest.mark.skipif(not _has_matchit(), reason="needs Rscript and R MatchIt")

LALONDE_COVS = ["age", "educ", "race", "married", "nodegree", "re74", "re75"]
COVS = {"lalonde": LALONDE_COVS, "lalonde_num": [c for c in LALONDE_COVS if c != "race"],
        "lalonde_cat": ["race", "married", "nodegree"],
        "lalonde_cem": ["age", "educ", "race", "married", "re74"], "sim": ["a", "b", "c"]}

# name -> (data set, MatchIt arguments, dolm Options fields)
CASES = {
    "ps_largest": ("lalonde", 'distance="glm"', dict(distance="ps")),
    "logit_largest": ("lalonde", 'distance="glm", link="linear.logit"', dict(distance="logit")),
    "ps_smallest": ("lalonde", 'm.order="smallest"', dict(distance="ps", m_order="smallest")),
    "ps_data": ("lalonde", 'm.order="data"', dict(distance="ps", m_order="data")),
    "ps_1to2": ("lalonde", "ratio=2", dict(distance="ps", ratio=2)),
    "logit_1to2_smallest": ("lalonde", 'link="linear.logit", ratio=2, m.order="smallest"',
                            dict(distance="logit", ratio=2, m_order="smallest")),
    "ps_replace": ("lalonde", "replace=TRUE", dict(distance="ps", replace=True)),
    "logit_replace_1to3": ("lalonde", 'link="linear.logit", replace=TRUE, ratio=3',
                           dict(distance="logit", replace=True, ratio=3)),
    "ps_caliper": ("lalonde", "caliper=0.1", dict(distance="ps", caliper=0.1)),
    "logit_caliper_1to2": ("lalonde", 'link="linear.logit", caliper=0.2, ratio=2',
                           dict(distance="logit", caliper=0.2, ratio=2)),
    "ps_discard_both": ("lalonde", 'discard="both"', dict(distance="ps", common_support="both")),
    "logit_discard_control_caliper": (
        "lalonde", 'link="linear.logit", discard="control", caliper=0.3',
        dict(distance="logit", common_support="control", caliper=0.3)),
    "ps_discard_treated_replace": ("lalonde", 'discard="treated", replace=TRUE',
                                   dict(distance="ps", common_support="treated", replace=True)),
    "ps_atc": ("lalonde", 'estimand="ATC"', dict(distance="ps", estimands=("ATC",))),
    "logit_atc_largest": ("lalonde", 'estimand="ATC", link="linear.logit", m.order="largest"',
                          dict(distance="logit", estimands=("ATC",), m_order="largest")),
    # MatchIt 4.5.1 factorises a rank-deficient covariance (all levels of a factor) with a
    # pivoted Cholesky whose trailing block is not a valid factor: numeric covariates here
    "mahalanobis": ("lalonde_num", 'distance="mahalanobis"', dict(distance="mahalanobis")),
    "mahalanobis_1to2": ("lalonde_num", 'distance="mahalanobis", ratio=2',
                         dict(distance="mahalanobis", ratio=2)),
    # (with replacement MatchIt takes the k nearest with std::partial_sort, whose order of
    # equidistant controls is unspecified, so exact ties are not comparable there)
    "mahvars_caliper": ("lalonde", 'mahvars=~age+educ+re74+re75, caliper=0.25',
                        dict(distance="ps", mahvars=("age", "educ", "re74", "re75"),
                             caliper=0.25)),
    "exact_race_married": ("lalonde", "exact=~race+married",
                           dict(distance="ps", exact=("race", "married"))),
    "caliper_on_age": ("lalonde", "caliper=c(0.3, age=0.5)",
                       dict(distance="ps", caliper=0.3, caliper_on=(("age", 0.5),))),
    "exact_method": ("lalonde_cat", 'method="exact"', dict(match_method="exact")),
    "exact_method_ate": ("lalonde_cat", 'method="exact", estimand="ATE"',
                         dict(match_method="exact", estimands=("ATE",))),
    "cem": ("lalonde_cem", 'method="cem"', dict(match_method="cem")),
    "cem_atc": ("lalonde_cem", 'method="cem", estimand="ATC"',
                dict(match_method="cem", estimands=("ATC",))),
    "subclass": ("lalonde", 'method="subclass"', dict(match_method="subclass", distance="ps")),
    "subclass_10_ate": ("lalonde", 'method="subclass", subclass=10, estimand="ATE"',
                        dict(match_method="subclass", n_subclass=10, estimands=("ATE",))),
    "sim_subclass_atc": ("sim", 'method="subclass", subclass=8, estimand="ATC"',
                         dict(match_method="subclass", n_subclass=8, estimands=("ATC",))),
    "sim_ps": ("sim", "", dict(distance="ps")),
    "sim_logit_1to2": ("sim", 'link="linear.logit", ratio=2',
                       dict(distance="logit", ratio=2)),
    "sim_replace_1to2": ("sim", "replace=TRUE, ratio=2", dict(distance="ps", replace=True,
                                                             ratio=2)),
    "sim_caliper_data": ("sim", 'caliper=0.05, m.order="data"',
                         dict(distance="ps", caliper=0.05, m_order="data")),
    "sim_exact": ("sim", "exact=~c", dict(distance="ps", exact=("c",))),
}

R_SCRIPT = r"""
suppressMessages(library(MatchIt))
args <- commandArgs(trailingOnly = TRUE)
out <- args[1]
data("lalonde", package = "MatchIt")
lalonde$race <- as.character(lalonde$race)
write.csv(lalonde, file.path(out, "lalonde.csv"), row.names = FALSE)
sim <- read.csv(file.path(out, "sim.csv"))
forms <- list(lalonde = treat ~ age + educ + race + married + nodegree + re74 + re75,
              lalonde_num = treat ~ age + educ + married + nodegree + re74 + re75,
              lalonde_cat = treat ~ race + married + nodegree,
              lalonde_cem = treat ~ age + educ + race + married + re74,
              sim = treat ~ a + b + c)
ys <- list(lalonde = "re78", lalonde_num = "re78", lalonde_cat = "re78", lalonde_cem = "re78",
           sim = "y")
cases <- read.csv(file.path(out, "cases.csv"), stringsAsFactors = FALSE)
pairs <- list(); ests <- list(); dists <- list(); wts <- list()
for (i in seq_len(nrow(cases))) {
  d <- if (startsWith(cases$data[i], "lalonde")) lalonde else sim
  call <- sprintf(paste0("matchit(forms[[cases$data[i]]], data = d, ",
                         "distance.options = list(epsilon = 1e-14, maxit = 100)%s)"),
                  if (nchar(cases$args[i])) paste0(", ", cases$args[i]) else "")
  m <- suppressWarnings(eval(parse(text = call)))
  mm <- m$match.matrix
  y <- d[[ys[[cases$data[i]]]]]
  w <- m$weights
  t <- d$treat
  ests[[i]] <- data.frame(name = cases$name[i],
    estimate = weighted.mean(y[t == 1], w[t == 1]) - weighted.mean(y[t == 0], w[t == 0]))
  if (!is.null(mm)) {
    f <- rep(match(rownames(mm), rownames(d)) - 1L, ncol(mm))
    g <- match(as.vector(mm), rownames(d)) - 1L
    pairs[[i]] <- data.frame(name = cases$name[i], focal = f, match = g)[!is.na(g), ]
  }
  wts[[i]] <- data.frame(name = cases$name[i], row = seq_along(w) - 1L, weight = unname(w),
    subclass = if (is.null(m$subclass)) NA_integer_ else as.integer(m$subclass))
  if (!is.null(m$distance))
    dists[[i]] <- data.frame(name = cases$name[i], row = seq_along(m$distance) - 1L,
                             distance = unname(m$distance))
}
set.seed(7)
m <- matchit(forms$lalonde, data = lalonde, m.order = "random",
             distance.options = list(epsilon = 1e-14, maxit = 100))
set.seed(7)
ord <- sample.int(sum(lalonde$treat == 1))
mm <- m$match.matrix
pairs[[length(pairs) + 1]] <- data.frame(name = "random",
  focal = match(rownames(mm), rownames(lalonde)) - 1L,
  match = match(mm[, 1], rownames(lalonde)) - 1L)
write.csv(data.frame(order = ord - 1L), file.path(out, "order.csv"), row.names = FALSE)
write.csv(do.call(rbind, pairs), file.path(out, "pairs.csv"), row.names = FALSE)
write.csv(do.call(rbind, ests), file.path(out, "estimates.csv"), row.names = FALSE)
write.csv(do.call(rbind, dists), file.path(out, "distances.csv"), row.names = FALSE)
write.csv(do.call(rbind, wts), file.path(out, "weights.csv"), row.names = FALSE)
"""


def _sim(n: int = 700, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 5, n)
    b = rng.integers(0, 2, n)
    c = rng.integers(0, 3, n)
    lp = -1.2 + 0.35 * a - 0.5 * b + 0.3 * c
    t = (rng.random(n) < 1 / (1 + np.exp(-lp))).astype(int)
    y = 0.5 * a - b + 0.7 * c + 2.0 * t + rng.normal(size=n)
    return pd.DataFrame({"treat": t, "a": a, "b": b, "c": c, "y": y})


@pytest.fixture(scope="module")
def matchit(tmp_path_factory):
    out = tmp_path_factory.mktemp("matchit")
    _sim().to_csv(out / "sim.csv", index=False)
    pd.DataFrame([{"name": k, "data": v[0], "args": v[1]} for k, v in CASES.items()]).to_csv(
        out / "cases.csv", index=False)
    script = out / "run.R"
    script.write_text(R_SCRIPT)
    r = subprocess.run(["Rscript", str(script), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = {k: pd.read_csv(out / f"{k}.csv")
           for k in ("pairs", "estimates", "distances", "order", "weights")}
    data = {"lalonde": pd.read_csv(out / "lalonde.csv"), "sim": pd.read_csv(out / "sim.csv")}
    return res, data


def _dolm(df: pd.DataFrame, covs: list[str], y: str, fields: dict):
    kw = dict(ties="matchit-4.5.1", caliper=None, common_support="none", estimands=("ATT",),
              refute=False, pool_short="subset")
    kw.update(fields)
    extra = {"--exact": list(kw.get("exact", ())), "--mahvars": list(kw.get("mahvars", ())),
             "--caliper-on": [c for c, _ in kw.get("caliper_on", ())]}
    u = prepare(df, "treat", y, covs, extra=extra)
    return run_psm(u, Options(**kw))


def _sets(res, estimand: str) -> dict[int, set[int]]:
    p = res.pairs[res.pairs.estimand == estimand]
    focal, other = ("treated_row", "control_row") if estimand == "ATT" else (
        "control_row", "treated_row")
    return {int(k): set(map(int, g[other])) for k, g in p.groupby(focal)}


@pytest.mark.parametrize("case", list(CASES))
def test_same_matches_and_estimate_as_matchit(matchit, case):
    ref, data = matchit
    name, _, fields = CASES[case]
    covs = COVS[name]
    y = "y" if name == "sim" else "re78"
    res = _dolm(data["sim" if name == "sim" else "lalonde"], covs, y, fields)
    est = fields.get("estimands", ("ATT",))[0]
    p = ref["pairs"][ref["pairs"].name == case]
    want = {int(k): set(map(int, g["match"])) for k, g in p.groupby("focal")}
    got = _sets(res, est)
    assert got == want, (case, len(got), len(want),
                         sum(got.get(k) == v for k, v in want.items()))
    d = ref["distances"][ref["distances"].name == case]
    if len(d) and fields.get("distance") in ("ps", "logit"):
        col = "propensity" if fields["distance"] == "ps" else "logit_propensity"
        ours = res.units.sort_values("row")[col].to_numpy()
        np.testing.assert_allclose(ours, d.sort_values("row").distance.to_numpy(), atol=1e-8)
    eff = {e["estimand"]: e for e in res.summary["contrasts"][0]["effects"]}
    want_est = ref["estimates"].set_index("name").estimate[case]
    assert eff[est]["estimate"] == pytest.approx(want_est, abs=1e-6)
    # MatchIt's weights (each group rescaled to its matched count, as MatchIt does)
    w = ref["weights"][ref["weights"].name == case].sort_values("row")
    ours = res.units.sort_values("row")[f"weight_{est.lower()}"].to_numpy()
    for g in (0, 1):
        tg = res.units.sort_values("row").treated.to_numpy() == bool(g)
        a, b = ours[tg], w.weight.to_numpy()[tg]
        np.testing.assert_allclose(a / a.sum() * (a > 0).sum(), b, rtol=1e-9, atol=1e-12)
    if fields.get("match_method") in ("exact", "cem", "subclass"):
        sub = res.units.sort_values("row").subclass.to_numpy(dtype=float, na_value=np.nan)
        pairs = pd.crosstab(sub, w.subclass.to_numpy(dtype=float))  # same partition
        assert ((pairs > 0).sum(axis=1) == 1).all() and ((pairs > 0).sum(axis=0) == 1).all()


def test_random_order_equals_matchit(matchit):
    from dolm_tools.psm import nearest

    ref, data = matchit
    df = data["lalonde"]
    res = _dolm(df, LALONDE_COVS, "re78", dict(distance="ps"))
    ps = res.units.sort_values("row").propensity.to_numpy()
    t = df.treat.to_numpy()
    tr, co = np.flatnonzero(t == 1), np.flatnonzero(t == 0)
    order = ref["order"]["order"].to_numpy()
    m = nearest.match_scalar(ps[tr], ps[co], tr, co, order, matchit451=True)
    got = dict(zip(tr[m.focal].tolist(), co[m.pool].tolist(), strict=True))
    p = ref["pairs"][ref["pairs"].name == "random"].dropna()
    want = dict(zip(p.focal.astype(int), p["match"].astype(int), strict=True))
    assert got == want
