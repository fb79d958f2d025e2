"""dolm-mediate: causal mediation analysis.

``dolm-mediate statistical``: Imai-Keele-Tingley mediation on a unit table, for one or many
candidate mediators at once (with Benjamini-Hochberg control across them).
``dolm-mediate interventional``: patching mediator sites on a model, on paired prompts;
it writes the same ``mediation`` table with
``method = interventional``, so both estimates sit side by side.
"""

from __future__ import annotations

import click
from dolm.cli import log, model_options, output_option, seed_option, subcommand, tool_group
from dolm.columns import expand_columns
from dolm.errors import InputError
from dolm.executor import executor_options


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
              "(e.g. 'attn_to.numbers.*'). Each is analysed on its own (as one set with "
              "--joint).")
@click.option("--covariates", "-c", default="",
              help="Pre-treatment covariates for both models (names or patterns).")
@click.option("--mediator-model", type=click.Choice(["auto", "linear", "logistic", "probit"]),
              default="auto", show_default=True,
              help="auto: logistic for 0/1 columns; probit as in R mediation's framing example.")
@click.option("--outcome-model", type=click.Choice(["auto", "linear", "logistic", "probit"]),
              default="auto", show_default=True,
              help="auto: logistic for 0/1 columns; probit as in R mediation's framing example.")
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
@click.option("--moderator", default=None,
              help="A discrete pre-treatment column (at most 10 levels): moderated mediation, "
              "both models fitted within each level (every coefficient moderated); rows are "
              "labelled 'MEDIATOR | COL=LEVEL'.")
@click.option("--joint", "joint_name", default=None, metavar="NAME",
              help="Analyse the --mediator columns jointly as one set called NAME (e.g. "
              "'heads'), in the order given: the set's ACME/ADE/total, each mediator's own "
              "interventional indirect effect within the set ('NAME: via COL') and the mutual "
              "dependence remainder ('NAME: mutual'); Vansteelandt & Daniel 2017. "
              "Quasi-Bayesian intervals only.")
@click.option("--dag", "dag_path", type=click.Path(dir_okay=False), default=None,
              help="A dag JSON: a --moderator that is a descendant of the treatment in it is "
              "refused (it is not pre-treatment).")
@output_option(help="Mediation effects table (Parquet; '-' for stdout).")
@click.option("--sensitivity", type=click.Path(dir_okay=False), default=None,
              help="ACME as a function of rho [default: <output>.sensitivity.parquet].")
@click.option("--summary", type=click.Path(dir_okay=False), default=None,
              help="Summary JSON [default: <output>.summary.json].")
@seed_option
def statistical(run, table, treatment, outcome, mediators, covariates, mediator_model,
                outcome_model, interaction, ci_method, sims, control_value, treat_value,
                p_method, fdr, dropna, moderator, joint_name, dag_path, output, sensitivity,
                summary, force, seed):
    """Imai-Keele-Tingley mediation of TREATMENT -> MEDIATOR -> OUTCOME in TABLE.

    Writes ACME (control, treated, average), ADE, total effect and proportion mediated with
    CIs per mediator (-o), the rho sensitivity curves and a summary JSON.

    Assumptions. One mediator: sequential ignorability (no unmeasured treatment-mediator,
    treatment-outcome or mediator-outcome confounding given the covariates, and no
    mediator-outcome confounder affected by the treatment). The rho curves say how far an
    unmeasured mediator-outcome confounder moves the ACME: for a linear mediator with a
    linear or probit outcome model, no interaction (Imai, Keele & Yamamoto 2010).

    --joint NAME: the mediators as one set (e.g. a set of heads). The set's ACME is the
    joint indirect effect through all of them under sequential ignorability for the set
    (Imai & Yamamoto 2013). Each mediator's own path ('NAME: via COL') is an interventional
    indirect effect (Vansteelandt & Daniel 2017): COL drawn from its distribution under
    treatment instead of control, the other mediators drawn independently from their
    control distributions. It needs no assumption on how the mediators affect each other or
    whether they share unobserved causes, and includes the paths into COL through the other
    mediators. 'NAME: mutual' is the joint ACME minus the sum of the via ACMEs: what the
    mediators' dependence adds (0 for a linear outcome). The mediators' joint distribution
    is modelled as a chain in the order given (mediator k on T, X and mediators 1..k-1).
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
    covs = expand_columns(covariates, cols, "--covariates") if covariates else []
    meds = expand_columns(list(mediators), cols, "--mediator")
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
                       p_method=p_method, fdr=fdr, joint=joint_name)
    if joint_name is not None and joint_name in d.mediators:
        raise InputError(f"--joint {joint_name!r}: also a mediator column; name the set "
                         "differently")

    def bar(it):
        return progress(it, total=len(d.mediators), desc="mediators", unit="mediator")

    if moderator is None:
        eff, sens, results = core.run_statistical(d, opt, outcome, progress=bar)
    else:
        eff, sens, results = _moderated(df, d, opt, table, treatment, outcome, meds, covs,
                                        moderator, dag_path, run, control_value, treat_value,
                                        dropna, bar)
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


def _moderated(df, d, opt, table, treatment, outcome, meds, covs, moderator, dag_path, run,
               control_value, treat_value, dropna, bar):
    """Mediation within each level of a pre-treatment moderator (checked against --dag)."""
    import pandas as pd
    from dolm.formats import read_json
    from dolm_tools.mediate import core

    if moderator not in df.columns:
        raise InputError(f"--moderator: column {moderator!r} not in {table}")
    if moderator in (treatment, outcome) or moderator in meds:
        raise InputError(f"--moderator {moderator!r}: is the treatment, outcome or a mediator")
    if dag_path is not None:
        import networkx as nx

        obj, _ = read_json(dag_path, schema="dag", run=run)
        g = nx.DiGraph([(e["source"], e["target"]) for e in obj.get("edges", [])])
        g.add_nodes_from(obj.get("nodes", []))
        if moderator not in g or treatment not in g:
            miss = moderator if moderator not in g else treatment
            raise InputError(f"--dag {dag_path}: {miss!r} is not a node of the DAG")
        if moderator in nx.descendants(g, treatment):
            path = " -> ".join(nx.shortest_path(g, treatment, moderator))
            raise InputError(
                f"--moderator {moderator!r}: a descendant of the treatment {treatment!r} in "
                f"--dag {dag_path} ({path}), so it is not pre-treatment; moderated mediation "
                "conditions on a moderator the treatment cannot change")
    levels = sorted(df[moderator].dropna().unique().tolist(), key=str)
    if not 2 <= len(levels) <= 10:
        raise InputError(f"--moderator {moderator!r}: expected a discrete column with 2 to 10 "
                         f"levels, found {len(levels)}")
    effs, senss, results = [], [], []
    for lv in levels:
        sub = df[df[moderator] == lv]
        dl = core.prepare(sub, treatment, outcome, meds, covs, path=f"{table} [{moderator}={lv}]",
                          control_value=control_value, treat_value=treat_value, dropna=dropna)
        e, s, r = core.run_statistical(dl, opt, outcome, progress=bar)
        tag = f" | {moderator}={lv}"
        e["mediator"] = e["mediator"] + tag
        s["mediator"] = s["mediator"] + tag
        for x in r:
            x["mediator"] += tag
        effs.append(e)
        senss.append(s)
        results += r
    return (pd.concat(effs, ignore_index=True), pd.concat(senss, ignore_index=True), results)


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


def _fill_siblings(params: dict) -> None:
    """--executor ray: name the effects and summary files the run writes by default, so
    that every shard writes them and they are merged (refused now if they exist)."""
    from dolm.formats import check_output

    for key, suffix in (("effects", "effects.parquet"), ("summary", "summary.json")):
        if not params.get(key):
            params[key] = _sibling(params["output"], suffix)
            check_output(params[key], bool(params.get("force")), option=f"--{key}")


def _merge_interventional(run, shard_files, outputs, force) -> None:
    """--executor ray: the shards' per-pair effects tables concatenated (pair order) give
    the whole run's per-pair runs; the bootstrap, q-values and summary are computed once
    over all pairs, as in one process."""
    import pandas as pd
    from dolm.executor import adopt_chain
    from dolm.formats import all_or_none, read_json, read_table
    from dolm_tools.mediate import interventional as iv

    adopt_chain(run, shard_files[0]["output"])
    effects = pd.concat([read_table(s["effects"], schema="effects")[0] for s in shard_files],
                        ignore_index=True)
    summaries = [read_json(s["summary"], schema="mediation_summary")[0] for s in shard_files]
    first = read_table(shard_files[0]["output"], schema="mediation")[0]
    pos = first.loc[first["method"] == "interventional", "position"]
    res, parser = iv.res_from_effects(effects)
    p = run.params
    desc = {k: summaries[0][k] for k in ("treatment", "control_value", "treat_value")}
    desc["pair_by"] = summaries[0]["options"]["pair_by"]
    stat_frames = [iv.statistical_rows(read_table(path, schema="mediation")[0])
                   for path in p.get("statistical_tables") or ()]
    with all_or_none():
        _finish_interventional(
            run, res=res, effects=effects, sites=parser.sites, parser=parser,
            position_label=None if pos.isna().all() else int(pos.iloc[0]),
            notes=[n for sm in summaries for n in sm.get("notes") or []], desc=desc,
            stat_frames=stat_frames, params=p, paths=outputs, output=outputs["output"],
            force=force)


@subcommand(main, "interventional", "mediate", outputs=("output", "effects", "summary"))
@executor_options(outputs=("output", "effects", "summary"), merge=_merge_interventional,
                  fill=_fill_siblings)
@click.argument("prompts", type=click.Path(dir_okay=False, allow_dash=True))
@model_options
@click.option("--sites", "-s", "sites", multiple=True, required=True,
              help="Mediator sites: names or patterns, comma-separated or repeated "
              "(e.g. 'head.*.*', 'attn_out.3', 'resid_post.5'). Each is analysed on its own.")
@click.option("--treatment", "-t", default=None,
              help="Treatment column of PROMPTS (e.g. cot, format); pairs share --pair-by. "
              "Without it each row's prompt (control) is paired with its cf_prompt (treated).")
@click.option("--pair-by", default=None,
              help="Column that pairs a control with a treated prompt [default: group_id, "
              "else unit_id].")
@click.option("--control-value", default=None, help="Treatment value of the control prompt.")
@click.option("--treat-value", default=None, help="Treatment value of the treated prompt.")
@click.option("--position", default="last", show_default=True,
              help="Mediator position, aligned across each pair: last (the position that "
              "reads the first target token), -k (k-th from the end), or a span name from "
              "the spans column (all its tokens; the counts must match in the pair).")
@click.option("--text-column", default=None,
              help="Score the target after this column's text with the target cut from its "
              "end (e.g. 'text': a teacher-forced chain of thought) instead of after the "
              "prompt.")
@click.option("--anchor", type=click.Choice(["context", "prompt"]), default="context",
              show_default=True,
              help="Where last/-k count from with --text-column: the end of the scored "
              "context, or the end of the prompt column.")
@click.option("--metric", type=click.Choice(["target_logprob", "target_correct"]),
              default="target_logprob", show_default=True,
              help="Outcome of a run in the mediation table: teacher-forced target log-prob "
              "(summed over its tokens) or 1 if every target token is the argmax. The effects "
              "table has both.")
@click.option("--sims", type=click.IntRange(min=100), default=1000, show_default=True,
              help="Bootstrap resamples of the pairs.")
@click.option("--fdr", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=0.05, show_default=True, help="Benjamini-Hochberg level across sites.")
@click.option("--statistical", "statistical_tables", multiple=True,
              type=click.Path(dir_okay=False),
              help="mediation table(s) of dolm-mediate statistical on the same units: their "
              "rows are added to the output (attn_to.<span>.L<l>.H<h> mediators matched to "
              "head.<l>.<h>) and compared in the summary. Repeatable.")
@output_option(help="Mediation table (Parquet; '-' for stdout).")
@click.option("--effects", type=click.Path(dir_okay=False), default=None,
              help="Per-pair effects table [default: <output>.effects.parquet].")
@click.option("--summary", type=click.Path(dir_okay=False), default=None,
              help="Summary JSON [default: <output>.summary.json].")
@seed_option
def interventional(run, prompts, model_opts, sites, treatment, pair_by, control_value,
                   treat_value, position, text_column, anchor, metric, sims, fdr,
                   statistical_tables, output, effects, summary, force, seed):
    """Mediation measured on a model by patching mediator SITES between paired PROMPTS.

    Per pair: control run C, treated run T, C with the mediator's treated value (C+m1) and
    T with its control value (T+m0). NIE = acme_control = C+m1 - C, NDE = ade_control =
    T+m0 - C, acme_treated = T - T+m0, ade_treated = T - C+m1, total = T - C; means over
    pairs with bootstrap CIs (-o, method=interventional), per-pair runs (--effects).
    """
    from dolm.cli import load_model, progress
    from dolm.executor import shard_rows
    from dolm.formats import check_output, read_table
    from dolm_tools.mediate import interventional as iv

    paths = {}
    for key, given, suffix in (("effects", effects, "effects.parquet"),
                               ("summary", summary, "summary.json")):
        p = given or _sibling(output, suffix)
        if p and not given:
            check_output(p, force, option=f"--{key}")
        paths[key] = p
    df, _ = read_table(prompts, schema="prompts", run=run)
    stat_frames = []
    for path in statistical_tables:
        sdf, smeta = read_table(path, schema="mediation", run=run)
        stat_frames.append(iv.statistical_rows(sdf))
    pairs, desc = iv.make_pairs(df, treatment=treatment, pair_by=pair_by,
                                control_value=control_value, treat_value=treat_value,
                                text_column=text_column, path=prompts)
    if not pairs:
        raise InputError(f"{prompts}: no prompt pairs")
    pairs = shard_rows(pairs, run, what="prompt pairs")
    lm = load_model(model_opts, run=run)
    site_list = lm.expand_sites([x.strip() for s in sites for x in s.split(",") if x.strip()])
    for s in site_list:
        if lm.parse_site(s).kind in ("attn", "logits"):
            raise InputError(f"--sites: {s} cannot be patched as a mediator (read-only); use "
                             "head.L.H, attn_out.L, mlp_out.L or resid_*.L")
    prep = iv.prepare(lm, pairs, position, anchor=anchor)
    for note in prep.notes[:3]:
        log(f"dolm-mediate: note: {note}")
    log(f"dolm-mediate: {len(pairs)} pairs ({desc['control_value']} -> "
        f"{desc['treat_value']}), {len(site_list)} site(s), position {position}")

    def bar(total):
        return progress(total=total, desc="pairs", unit="pair")

    res = iv.run_pairs(lm, prep, site_list, model_opts.batch_size, progress=bar)
    _finish_interventional(run, res=res, effects=iv.effects_table(prep, res, site_list, lm),
                           sites=site_list, parser=lm, position_label=prep.position_label,
                           notes=prep.notes, desc=desc, stat_frames=stat_frames,
                           params=run.params, paths=paths, output=output, force=force)


def _finish_interventional(run, *, res, effects, sites, parser, position_label, notes, desc,
                           stat_frames, params, paths, output, force) -> None:
    """The mediation table, the summary and the effects table from the per-pair runs
    ``res`` (in one process, or merged from Ray shards); write them and report."""
    import pandas as pd
    from dolm.formats import json_safe, write_json, write_table
    from dolm_tools.mediate import interventional as iv

    metric, sims, seed, fdr = params["metric"], params["sims"], params["seed"], params["fdr"]
    m = iv.METRICS.index(metric)
    pp = iv.per_pair(res, m)
    table = iv.mediation_table(pp, sites, parser, position_label, sims, seed, fdr)
    comp = []
    if stat_frames:
        stat = pd.concat(stat_frames, ignore_index=True)
        comp = iv.comparison(table, stat)
        table = pd.concat([table, stat], ignore_index=True)
    for c in ("layer", "head", "position"):
        table[c] = table[c].astype("Int64")
    avg = table[(table.method == "interventional") & (table.effect == "acme_average")]
    per = [{"mediator": r.mediator, "acme_average": r.estimate, "ci_low": r.ci_low,
            "ci_high": r.ci_high, "p_value": r.p_value, "q_value": r.q_value,
            "significant": bool(r.significant), "rho_at_zero": None} for r in avg.itertuples()]
    order = sorted(per, key=lambda x: -abs(x["acme_average"] or 0.0))
    C, T = res["C"][:, m], res["T"][:, m]
    n_pairs = len(C)
    summ = json_safe({
        "tool": "mediate", "method": "interventional", "input": str(params["prompts"]),
        "treatment": desc["treatment"], "outcome": metric, "covariates": [],
        "n_units": n_pairs, "control_value": desc["control_value"],
        "treat_value": desc["treat_value"],
        "options": {"sites": list(params["sites"]), "position": params["position"],
                    "anchor": params["anchor"], "text_column": params["text_column"],
                    "pair_by": desc["pair_by"], "sims": sims, "seed": seed, "fdr": fdr,
                    "metric": metric},
        "inference": f"{metric} of the target teacher-forced after the context; per-pair "
                     f"effects from patched runs; means over pairs; 95% percentile intervals "
                     f"from {sims} bootstrap resamples of the pairs (seeded); p = 2 Phi(-|est|/"
                     "se); Benjamini-Hochberg q-values across sites, per effect",
        "n_mediators": len(per), "n_significant_acme": int(sum(p["significant"] for p in per)),
        "skipped": [], "mediators": per, "top": [p["mediator"] for p in order[:10]],
        "control_mean": float(C.mean()), "treated_mean": float(T.mean()),
        "total_effect": float((T - C).mean()),
        "comparison": comp, "notes": notes,
    })
    extra = {"treatment": desc["treatment"], "outcome": metric, "method": "interventional"}
    if paths["effects"]:
        write_table(effects, paths["effects"], schema="effects", run=run, force=force,
                    extra=extra)
    if paths["summary"]:
        write_json(summ, paths["summary"], schema="mediation_summary", run=run, force=force)
    write_table(table, output, schema="mediation", run=run, force=force, extra=extra)
    log(f"dolm-mediate: control {metric} {C.mean():.4g}, treated {T.mean():.4g}, total "
        f"effect {(T - C).mean():.4g} over {n_pairs} pairs")
    for name in summ["top"][:5]:
        r = next(p for p in per if p["mediator"] == name)
        log(f"dolm-mediate:   {name}: ACME = {_f(r['acme_average'])} "
            f"[{_f(r['ci_low'])}, {_f(r['ci_high'])}], q = {_f(r['q_value'])}")
    for c in comp[:5]:
        log(f"dolm-mediate:   {c['site']} vs {c['statistical_mediator']}: interventional ACME "
            f"{_f(c['interventional_acme_average'])}, statistical ACME "
            f"{_f(c['statistical_acme_average'])}")
