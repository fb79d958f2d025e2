"""dolm-psm: propensity score matching on any unit table (Parquet or CSV)."""

from __future__ import annotations

import click
from dolm.cli import log, output_option, seed_option, tool
from dolm.columns import expand_columns
from dolm.errors import InputError
from dolm_tools.psm import REFUTE_MAX_UNITS


def _caliper(ctx, param, value):
    if value is None:
        return None
    if not value > 0:
        raise click.BadParameter(f"expected a positive number of SDs of the distance, "
                                 f"found {value}")
    return value


def _caliper_on(value: str) -> tuple[str, float]:
    col, sep, width = value.rpartition("=")
    try:
        w = float(width)
    except ValueError:
        w = float("nan")
    if not sep or not col or not w > 0:
        raise InputError(f"--caliper-on: expected COLUMN=SDS with a positive number of SDs, "
                         f"found {value!r}")
    return col, w


def _numeric(s) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)


def _sibling(output: str, suffix: str) -> str | None:
    if output == "-":
        return None
    base = output[:-5] if output.endswith(".json") else output
    return f"{base}.{suffix}.parquet"


@tool("psm", outputs=("output", "pairs", "balance", "units"))
@click.argument("table", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--treatment", "-t", required=True, help="Treatment column (binary or categorical).")
@click.option("--outcome", "-y", required=True, help="Outcome column (numeric or boolean).")
@click.option("--covariates", "-c", default=None,
              help="Comma-separated covariate columns; glob patterns allowed ('attn_to.*').")
@click.option("--dag", "dag_path", type=click.Path(dir_okay=False), default=None,
              help="A dag JSON file: DoWhy identifies the backdoor adjustment set from it "
              "(instead of --covariates). Nodes the table lacks must be listed as 'latent'.")
@click.option("--reference", default=None,
              help="Reference (control) level of the treatment; default: the smallest level. "
              "Every other level is compared with it.")
@click.option("--id", "id_column", default=None,
              help="Unit id column: reported in the pairs and used for the canonical order.")
@click.option("--propensity", type=click.Choice(["logistic", "gbm"]), default="logistic",
              show_default=True,
              help="logistic: unpenalised logistic regression on standardised covariates; "
              "gbm: gradient boosting (scikit-learn HistGradientBoostingClassifier).")
@click.option("--method", "match_method",
              type=click.Choice(["nearest", "optimal", "full", "exact", "cem", "subclass", "ipw",
                                 "aipw"]),
              default="nearest", show_default=True,
              help="nearest: greedy nearest neighbour; optimal: 1:k pairs minimising the total "
              "distance; full: optimal full matching (every unit in one set); exact / cem: "
              "strata of equal (coarsened: Sturges bins) covariate values; subclass: "
              "propensity quantile subclasses (weights as MatchIt's). Without matching: ipw: "
              "inverse probability weighting (Hajek; estimands ATE, ATT, ATC and ATO, the "
              "overlap weights), sandwich SEs with the propensity model stacked; aipw: "
              "cross-fitted augmented IPW (doubly robust), influence-function SEs.")
@click.option("--stabilize", is_flag=True, help="--method ipw: stabilised ATE weights.")
@click.option("--trim", type=click.FloatRange(0, 0.5, max_open=True), default=0.0,
              show_default=True,
              help="--method ipw: drop units with a propensity outside [T, 1 - T] first.")
@click.option("--learner", type=click.Choice(["linear", "gbm"]), default="linear",
              show_default=True,
              help="--method aipw: scikit-learn learners for the propensity and outcome models "
              "(linear: logistic / least squares; gbm: histogram gradient boosting).")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="--method aipw: cross-fitting folds.")
@click.option("--subclass", "n_subclass", type=click.IntRange(min=2), default=6,
              show_default=True, help="Number of subclasses (--method subclass).")
@click.option("--max-pairs", type=click.IntRange(min=1), default=10_000_000,
              show_default=True,
              help="--method optimal/full: refuse a stratum with more treated x control pairs.")
@click.option("--estimator", type=click.Choice(["diff", "bias-corrected", "regression"]),
              default="diff", show_default=True,
              help="diff: weighted difference in means of the matched sample; "
              "bias-corrected: the same with each match's outcome moved to its focal unit's "
              "covariates by a linear regression (Abadie-Imbens 2011; inexact matches, as "
              "within a caliper without replacement, otherwise leave a bias); regression: "
              "g-computation (outcome on treatment, centred covariates and their "
              "interactions) on the matched sample, cluster-robust SEs by matched set.")
@click.option("--ratio", "-k", type=click.IntRange(min=1), default=1, show_default=True,
              help="Matches per focal unit (1:k).")
@click.option("--replace/--no-replace", default=False, show_default=True,
              help="Match with or without replacement.")
@click.option("--distance", type=click.Choice(["logit", "ps", "mahalanobis",
                                               "robust-mahalanobis"]),
              default="logit", show_default=True,
              help="What nearest matching measures: the logit of the propensity score "
              "(MatchIt link='linear.logit'), the propensity score itself (MatchIt's default), "
              "or a (rank-based robust) Mahalanobis distance on every covariate.")
@click.option("--m-order", type=click.Choice(["largest", "smallest", "random", "data"]),
              default=None,
              help="Order in which focal units pick their matches without replacement "
              "[default: MatchIt's: largest distance first for the ATT, smallest for the ATC, "
              "data order for a Mahalanobis distance]. random uses --seed.")
@click.option("--ties", type=click.Choice(["canonical", "all", "data", "matchit-4.5.1"]),
              default="canonical", show_default=True,
              help="canonical: equidistant candidates are ordered by the canonical unit order "
              "(results independent of the input's row order); all: with replacement, every "
              "unit as near as the k-th match joins the set, each weighted 1/(set size) "
              "(Abadie-Imbens; use it with discrete covariates, where one tie rule would send "
              "every tied unit to the same match; without replacement or with a Mahalanobis "
              "distance or --caliper-on it is canonical); data: R MatchIt's rule (sort "
              "by distance keeping the input's row order, take the nearer neighbour, the left "
              "one on a tie); matchit-4.5.1: as data, plus the integer truncation of distance "
              "differences in MatchIt 4.5.1-4.5.3 (MatchIt issue #163: the propensity "
              "caliper never binds and the lower neighbour wins), only to reproduce results "
              "made with those versions (Debian's r-cran-matchit is 4.5.1).")
@click.option("--caliper", type=float, default=None, callback=_caliper,
              help="Caliper in SDs of the distance (SD over the units kept by --discard, as "
              "MatchIt computes it) [default: 0.2; none for a Mahalanobis --distance, where "
              "a given caliper applies to the logit propensity].")
@click.option("--no-caliper", is_flag=True, help="Match without a caliper.")
@click.option("--caliper-on", "caliper_on", multiple=True, metavar="COL=SD",
              help="A caliper on a numeric column, in SDs of that column (repeatable; "
              "MatchIt's named caliper). Candidates outside it are skipped.")
@click.option("--common-support", "--discard", "common_support",
              type=click.Choice(["both", "treated", "control", "none"]),
              default="both", show_default=True,
              help="Discard units whose propensity lies outside the other group's range "
              "(MatchIt's discard; MatchIt's default is none).")
@click.option("--exact", default=None,
              help="Comma-separated columns to match exactly (units are matched only within "
              "a stratum of equal values).")
@click.option("--mahvars", default=None,
              help="Comma-separated columns: match on their Mahalanobis distance within the "
              "propensity caliper (MatchIt's mahvars).")
@click.option("--pool-short", type=click.Choice(["replace", "subset", "refuse"]),
              default="replace", show_default=True,
              help="When matching without replacement cannot give every focal unit its matches "
              "(e.g. the ATC with far more controls than treated): replace: match that "
              "direction with replacement (reported); subset: match whom it can, as MatchIt "
              "does (the estimate is then for a subset, reported); refuse: exit 3.")
@click.option("--estimand", "estimands", default="ATT,ATC,ATE", show_default=True,
              help="Comma-separated estimands among ATT, ATC, ATE.")
@click.option("--se", type=click.Choice(["ai", "bootstrap"]), default="ai", show_default=True,
              help="ai: Abadie-Imbens standard errors; bootstrap: paired (matched-set) bootstrap.")
@click.option("--n-boot", type=click.IntRange(min=50), default=1000, show_default=True,
              help="Bootstrap replicates (with --se bootstrap).")
@click.option("--refute/--no-refute", default=True, show_default=True,
              help="Run DoWhy's placebo, random-common-cause and data-subset refuters.")
@click.option("--refute-sims", type=click.IntRange(min=2), default=50, show_default=True,
              help="Simulations per refuter (each re-runs the propensity fit and matching).")
@click.option("--refute-max-units", type=click.IntRange(min=0), default=REFUTE_MAX_UNITS,
              show_default=True,
              help="Refute a contrast with more units than this on a random subsample of "
              "this many (treated and controls in their proportions; the refuters' tests "
              "compare with the estimate on that sample; recorded in the summary's "
              "refutation.sample). 0: always all units.")
@click.option("--balance-terms", "balance_terms", default="",
              help="Also report balance on these terms of the covariates, as cobalt's "
              "poly = 2 / int = TRUE: 'squares' (each non-binary covariate squared, "
              "'x^2'), 'interactions' (each pair of encoded columns, 'a*b'; levels of one "
              "categorical are skipped), or 'squares,interactions'.")
@click.option("--dropna", is_flag=True,
              help="Drop rows with missing treatment/outcome/covariates (reported).")
@output_option(help="Summary JSON ('-' for stdout).")
@click.option("--pairs", type=click.Path(dir_okay=False), default=None,
              help="Matched pairs Parquet [default: <output>.pairs.parquet].")
@click.option("--balance", type=click.Path(dir_okay=False), default=None,
              help="Balance table Parquet [default: <output>.balance.parquet].")
@click.option("--units", type=click.Path(dir_okay=False), default=None,
              help="Per-unit propensity and weights Parquet [default: <output>.units.parquet].")
@seed_option
def main(run, table, treatment, outcome, covariates, dag_path, reference, id_column, propensity,
         match_method, stabilize, trim, learner, folds, n_subclass, max_pairs, estimator, ratio,
         replace, distance, m_order,
         ties, caliper, no_caliper, caliper_on, common_support, exact, mahvars, pool_short,
         estimands, se, n_boot, refute, refute_sims, refute_max_units, balance_terms, dropna,
         output, pairs, balance, units, force, seed):
    """Propensity score matching of TABLE: balance, ATT/ATC/ATE, sensitivity.

    Every level of --treatment is compared with the reference level. Writes the summary
    (JSON, -o), the matched pairs, the balance table and per-unit scores (Parquet).
    """
    from dolm.formats import available_schemas, check_output, read_json, read_table, write_json
    from dolm.formats import write_table as _write

    est = tuple(e.strip().upper() for e in estimands.split(",") if e.strip())
    allowed = ("ATT", "ATC", "ATE", "ATO") if match_method == "ipw" else ("ATT", "ATC", "ATE")
    bad = [e for e in est if e not in allowed]
    if bad or not est:
        raise InputError(f"--estimand: expected some of {', '.join(allowed)} with --method "
                         f"{match_method}, found {estimands!r}")
    if (covariates is None) == (dag_path is None):
        raise InputError("give either --covariates or --dag (exactly one)")
    paths = {}
    for key, given in (("pairs", pairs), ("balance", balance), ("units", units)):
        p = given or _sibling(output, key)
        if p and not given:
            check_output(p, force, option=f"--{key}")
        paths[key] = p

    df, meta = read_table(table, run=run)
    cols = [str(c) for c in df.columns]
    dag_info = None
    if dag_path is not None:
        from dolm_tools.psm.dag import backdoor_set

        schema = "dag" if "dag" in available_schemas() else None
        obj, _ = read_json(dag_path, schema=schema, run=run)
        dag_info = backdoor_set(obj, dag_path, cols, treatment, outcome)
        covs = dag_info["adjustment_set"]
        if not covs:
            raise InputError(
                f"--dag {dag_path}: the backdoor set is empty (the DAG implies no confounding "
                f"of {treatment!r} and {outcome!r}), so there is nothing to match on; the "
                "naive difference is already unbiased under this DAG"
            )
        log(f"dolm-psm: DoWhy backdoor adjustment set from {dag_path}: {', '.join(covs)}")
    else:
        covs = expand_columns(covariates, cols, "--covariates")

    from dolm_tools.psm.core import Options, run_psm
    from dolm_tools.psm.data import prepare

    exact_cols = expand_columns(exact, cols, "--exact") if exact else []
    mah_cols = expand_columns(mahvars, cols, "--mahvars") if mahvars else []
    cal_on = [_caliper_on(v) for v in caliper_on]
    u = prepare(df, treatment, outcome, covs, path=table, reference=reference,
                id_column=id_column, dropna=dropna,
                extra={"--exact": exact_cols, "--mahvars": mah_cols,
                       "--caliper-on": [c for c, _ in cal_on]})
    for c, _ in cal_on:
        x = u.df[c]
        if not _numeric(x) or x.nunique() <= 2:
            raise InputError(f"--caliper-on {c}: expected a numeric column with more than two "
                             f"values, found {x.dtype} with {x.nunique()} distinct values")
    mahal = distance in ("mahalanobis", "robust-mahalanobis")
    if no_caliper:
        cal = None
    elif caliper is None:
        cal = None if mahal or match_method != "nearest" else 0.2
    else:
        cal = caliper
    if u.dropped_na:
        log(f"dolm-psm: --dropna: dropped {u.dropped_na['rows']} rows with missing values "
            f"({u.dropped_na['by_column']})")
    terms = tuple(x.strip() for x in balance_terms.split(",") if x.strip())
    bad_terms = sorted(set(terms) - {"squares", "interactions"})
    if bad_terms:
        raise InputError(f"--balance-terms: expected 'squares' and/or 'interactions', "
                         f"found {', '.join(map(repr, bad_terms))}")
    opt = Options(method=propensity, ratio=ratio, replace=replace, caliper=cal,
                  common_support=common_support, distance=distance, m_order=m_order,
                  ties=ties, exact=tuple(exact_cols), mahvars=tuple(mah_cols),
                  caliper_on=tuple(cal_on), pool_short=pool_short,
                  match_method=match_method, n_subclass=n_subclass, max_pairs=max_pairs,
                  estimator=estimator, stabilize=stabilize, trim=trim, learner=learner,
                  folds=folds,
                  estimands=est, se=se, n_boot=n_boot, seed=seed, refute=refute,
                  refute_sims=refute_sims, balance_terms=terms,
                  refute_max_units=refute_max_units)
    res = run_psm(u, opt)
    summary = {"tool": "psm", "input": str(table), **res.summary,
               "covariates_from": "dag" if dag_info else "option", "dag": dag_info}
    extra = {"treatment": treatment, "outcome": outcome}
    from dolm.formats import all_or_none

    with all_or_none():  # the four outputs appear together or not at all
        for key, frame, schema in (("pairs", res.pairs, "psm_pairs"),
                                   ("balance", res.balance, "psm_balance"),
                                   ("units", res.units, "psm_units")):
            if paths[key]:
                _write(frame, paths[key], schema=schema, run=run, force=force, extra=extra)
        write_json(summary, output, schema="psm_summary", run=run, force=force)
    _report(summary)


def _report(summary: dict) -> None:
    prop = summary["contrasts"][0]["propensity"]["description"]
    log(f"dolm-psm: propensity: {prop}")
    for c in summary["contrasts"]:
        if c["positivity"].get("warning"):
            log(f"dolm-psm: {c['contrast']}: {c['positivity']['warning']}")
        for e in c["effects"]:
            log(f"dolm-psm: {c['contrast']}: {e['estimand']:>5} = {_f(e['estimate'])} "
                f"[{_f(e['ci_low'])}, {_f(e['ci_high'])}] (n_sets={e['n_sets']})")
        ref = c.get("refutation")
        if ref:
            smp = ref.get("sample")
            on = (f"a random subsample of {smp['n_units']} of {smp['of_units']} units "
                  f"(--refute-max-units; {ref['estimand']} there = {_f(smp['estimate'])})"
                  if smp else f"all {ref.get('n_units')} units")
            res = ", ".join(
                f"{r['refuter']} {_f(r['new_effect'])} (p={_f(r['p_value'])})"
                if "error" not in r else f"{r['refuter']} failed" for r in ref["results"])
            log(f"dolm-psm: {c['contrast']}: refuters ({ref['estimand']}, "
                f"{ref['num_simulations']} simulations each, on {on}): {res}")


def _f(v) -> str:
    return "nan" if v is None else f"{v:.4g}"
