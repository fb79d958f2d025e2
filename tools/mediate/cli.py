"""dolm-mediate: causal mediation analysis.

``dolm-mediate statistical``: Imai-Keele-Tingley mediation on a unit table, for one or many
candidate mediators at once (with Benjamini-Hochberg control across them).
An ``interventional`` subcommand (patching mediator sites on a model, on paired prompts)
registers on the same group and writes the same ``mediation`` table with
``method = interventional``, so both estimates sit side by side.
"""

from __future__ import annotations

import click
from dolm.cli import log, output_option, seed_option, subcommand, tool_group
from dolm.errors import InputError


@tool_group("mediate")
def main():
    """Causal mediation analysis: statistical (on a table) or interventional (on a model)."""


def _sibling(output: str, suffix: str) -> str | None:
    if output == "-":
        return None
    base = output[:-8] if output.endswith(".parquet") else output
    return f"{base}.{suffix}"


@subcommand(main, "statistical", "mediate", outputs=("output", "sensitivity", "summary"))
@click.argument("table", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--treatment", "-t", required=True,
              help="Treatment column: binary, two-level categorical, or numeric with "
              "--control-value/--treat-value.")
@click.option("--outcome", "-y", required=True, help="Outcome column (numeric or 0/1).")
@click.option("--mediator", "-m", "mediators", multiple=True, required=True,
              help="Mediator column(s): names or glob patterns, comma-separated or repeated "
              "(e.g. 'attn_to.numbers.*'). Each is analysed on its own.")
@click.option("--covariates", "-c", default="",
              help="Pre-treatment covariates for both models (names or patterns).")
@click.option("--mediator-model", type=click.Choice(["auto", "linear", "logistic"]),
              default="auto", show_default=True, help="auto: logistic for 0/1 columns.")
@click.option("--outcome-model", type=click.Choice(["auto", "linear", "logistic"]),
              default="auto", show_default=True, help="auto: logistic for 0/1 columns.")
@click.option("--interaction", is_flag=True,
              help="Treatment x mediator interaction in the outcome model.")
@click.option("--ci", "ci_method", type=click.Choice(["quasi-bayesian", "bootstrap"]),
              default="quasi-bayesian", show_default=True)
@click.option("--sims", type=click.IntRange(min=100), default=1000, show_default=True,
              help="Simulation draws (quasi-Bayesian) or bootstrap resamples.")
@click.option("--control-value", default=None, help="Treatment value of the control condition.")
@click.option("--treat-value", default=None, help="Treatment value of the treated condition.")
@click.option("--p-method", type=click.Choice(["normal", "empirical"]), default="normal",
              show_default=True,
              help="p-values for the FDR control: normal = 2 Phi(-|mean|/sd) of the draws; "
              "empirical = 2 min(P(>0), P(<0)) as R (resolution 2/--sims).")
@click.option("--fdr", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=0.05, show_default=True, help="Benjamini-Hochberg level across mediators.")
@click.option("--dropna", is_flag=True, help="Drop rows with missing values (reported).")
@output_option(help="Mediation effects table (Parquet; '-' for stdout).")
@click.option("--sensitivity", type=click.Path(dir_okay=False), default=None,
              help="ACME as a function of rho [default: <output>.sensitivity.parquet].")
@click.option("--summary", type=click.Path(dir_okay=False), default=None,
              help="Summary JSON [default: <output>.summary.json].")
@seed_option
def statistical(run, table, treatment, outcome, mediators, covariates, mediator_model,
                outcome_model, interaction, ci_method, sims, control_value, treat_value,
                p_method, fdr, dropna, output, sensitivity, summary, force, seed):
    """Imai-Keele-Tingley mediation of TREATMENT -> MEDIATOR -> OUTCOME in TABLE.

    Writes ACME (control, treated, average), ADE, total effect and proportion mediated with
    CIs per mediator (-o), the rho sensitivity curves and a summary JSON.
    """
    from dolm.cli import progress
    from dolm.formats import check_output, read_table, write_json, write_table
    from dolm_tools.mediate import core

    paths = {}
    for key, given, suffix in (("sensitivity", sensitivity, "sensitivity.parquet"),
                               ("summary", summary, "summary.json")):
        p = given or _sibling(output, suffix)
        if p and not given:
            check_output(p, force, option=f"--{key}")
        paths[key] = p

    df, _ = read_table(table, run=run)
    cols = [str(c) for c in df.columns]
    covs = core.expand_columns([covariates], cols, "--covariates") if covariates else []
    meds = core.expand_columns(list(mediators), cols, "--mediator")
    meds = [m for m in meds if m not in (treatment, outcome) and m not in covs]
    if not meds:
        raise InputError("--mediator: no mediator column left after removing the treatment, "
                         "outcome and covariates")
    d = core.prepare(df, treatment, outcome, meds, covs, path=table,
                     control_value=control_value, treat_value=treat_value, dropna=dropna)
    if d.dropped.get("rows"):
        log(f"dolm-mediate: --dropna: dropped {d.dropped['rows']} rows with missing values "
            f"({d.dropped['by_column']})")
    for s in d.skipped:
        log(f"dolm-mediate: skipping mediator {s['mediator']!r}: {s['reason']}")
    opt = core.Options(mediator_model=mediator_model, outcome_model=outcome_model,
                       interaction=interaction, ci=ci_method, sims=sims, seed=seed,
                       p_method=p_method, fdr=fdr)

    def bar(it):
        return progress(it, total=len(d.mediators), desc="mediators", unit="mediator")

    eff, sens, results = core.run_statistical(d, opt, outcome, progress=bar)
    summ = {"tool": "mediate", "method": "statistical", "input": str(table),
            "treatment": treatment, "outcome": outcome, "covariates": covs,
            **core.summary(d, opt, eff, results)}
    extra = {"treatment": treatment, "outcome": outcome, "method": "statistical"}
    if paths["sensitivity"]:
        write_table(sens, paths["sensitivity"], schema="mediation_sensitivity", run=run,
                    force=force, extra=extra)
    if paths["summary"]:
        write_json(summ, paths["summary"], schema="mediation_summary", run=run, force=force)
    write_table(eff, output, schema="mediation", run=run, force=force, extra=extra)
    _report(summ)


def _report(summ: dict) -> None:
    log(f"dolm-mediate: {summ['n_mediators']} mediator(s), {summ['n_units']} units; "
        f"{summ['inference']}")
    log(f"dolm-mediate: {summ['n_significant_acme']} with ACME != 0 at FDR "
        f"{summ['options']['fdr']}")
    top = {m["mediator"]: m for m in summ["mediators"]}
    for name in summ["top"][:5]:
        m = top[name]
        rho = "" if m["rho_at_zero"] is None else f", ACME = 0 at rho = {m['rho_at_zero']:.3f}"
        log(f"dolm-mediate:   {name}: ACME = {_f(m['acme_average'])} "
            f"[{_f(m['ci_low'])}, {_f(m['ci_high'])}], q = {_f(m['q_value'])}{rho}")


def _f(v) -> str:
    return "nan" if v is None else f"{v:.4g}"
