"""The studies a run folder holds, and the answer each gives, for ``dolm-plot report``.

A study is recognised by its folder (``runs/demo/bayes``, ``runs/demo/formats-psm``, ... as
the recipes in ``pipelines/`` write them; the run folder itself when it is one). For each
study: the causal question, the answer in numbers with 95% intervals read from the study's
own files (its summary tables: the PSM comparison, the mediation comparison, the patching
grids, the lens KL, the cunit scores), and the figures that show it, in order. Files in a
folder no study claims are reported under their folder's name with no headline.

Intervals: means over prompts (or units) get a t interval; proportions a Wilson interval;
intervals a tool already computed (bootstrap, simulation) are taken as written.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from dolm_tools.plot.common import mean_ci, wilson

#: (label, value) pairs: the study's headline numbers, shown on the first screen
Headline = list[tuple[str, str]]


@dataclass
class Answer:
    """What a study found: headline numbers (first screen) and tables (its section)."""

    headline: Headline = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Study:
    key: str
    title: str
    question: str
    folders: tuple[str, ...]
    #: (file name, figure name, variant or None): the figures that show the answer, in order
    key_figures: tuple[tuple[str, str, str | None], ...]
    answer: Callable[[dict[str, Any]], Answer]
    #: files (by name) of other folders that belong to this study: (folder, file name)
    borrows: tuple[tuple[str, str], ...] = ()


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


# ------------------------------------------------------------------ numbers


def num(x: Any, nd: int = 3, sign: bool = False) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "–"
    if not np.isfinite(x):
        return "–"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def ci(m: Any, lo: Any, hi: Any, nd: int = 3, sign: bool = False) -> str:
    """``0.123 [0.100, 0.150]``; the interval left out where it is not known."""
    s = num(m, nd, sign)
    if num(lo) != "–" and num(hi) != "–":
        s += f" [{num(lo, nd, sign)}, {num(hi, nd, sign)}]"
    return s


def table(header: list[str], rows: list[list[Any]], caption: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    cap = f'<p class="cap">{esc(caption)}</p>' if caption else ""
    return f'<div class="answer">{cap}<table><tr>{head}</tr>{body}</table></div>'


def _data(files: dict[str, Any], name: str) -> Any:
    src = files.get(name)
    return None if src is None else src.data


def _metric(df: Any, *names: str) -> str | None:
    have = set(df["metric"].astype(str))
    return next((n for n in names if n in have), None)


# ------------------------------------------------------------------ tracing (patch)


def trace_peaks(df: Any, metric: str) -> list[dict]:
    """Per site family: the (layer, position) cell with the largest |mean| over prompts,
    with its t interval over prompts."""
    from dolm_tools.plot.common import site_family
    from dolm_tools.plot.fig_effects import trace_rows

    d = trace_rows(df)
    d = d[d["metric"] == metric].copy()
    d["_fam"] = d["site"].map(site_family)
    if "window" in d.columns and d["window"].notna().any():
        import pandas as pd

        d["_fam"] = d["_fam"] + d["window"].map(
            lambda w: "" if pd.isna(w) else f" (window {int(w)})")
    # prompts of different lengths: align them at their last token (position from the end)
    last = d.groupby("prompt_id")["position"].transform("max")
    aligned = last.nunique() > 1
    if aligned:
        d["position"] = d["position"] - last
    n_prompts = d["prompt_id"].nunique()
    out = []
    for fam, g in d.groupby("_fam", sort=False):
        per = g.groupby(["layer", "position", "prompt_id"])["value"].mean()
        cell = per.groupby(level=[0, 1]).agg(["mean", "count"])
        cell = cell[cell["count"] >= max(1, n_prompts / 2)]  # cells most prompts have
        final = cell.index.get_level_values(1).max()
        for where, c in (("", cell), (" (before the last token)",
                                      cell[cell.index.get_level_values(1) < final])):
            if c.empty:
                continue
            layer, pos = c["mean"].abs().idxmax()
            m, lo, hi, n = mean_ci(per.loc[(layer, pos)].to_numpy())
            out.append({"site": fam + where, "layer": int(layer), "position": int(pos),
                        "mean": m, "lo": lo, "hi": hi, "n": n,
                        "where": (("last token" if pos == 0 else f"last{int(pos)}")
                                  if aligned else f"pos {int(pos)}")})
    order = ("resid_pre", "attn_out", "mlp_out")
    return sorted(out, key=lambda r: (order.index(r["site"].split(" ")[0])
                                      if r["site"].split(" ")[0] in order else 9, r["site"]))


def tracing_answer(files: dict[str, Any], what: str) -> Answer:
    eff = _data(files, "effects.parquet")
    a = Answer()
    if eff is None:
        return a
    metric = _metric(eff, "recovery", "prob_target", "logit_diff") or str(eff["metric"].iloc[0])
    peaks = trace_peaks(eff, metric)
    rows = [[p["site"], p["layer"], p["where"], ci(p["mean"], p["lo"], p["hi"]), p["n"]]
            for p in peaks]
    a.tables.append(table(["site", "peak layer", "token", f"mean {metric} [95% CI]",
                           "prompts"], rows, f"{what}: the cell where restoring the clean "
                                              f"state recovers most ({metric})"))
    a.headline = [(f"{p['site']} peak", f"L{p['layer']} @ {p['where']}: "
                   f"{ci(p['mean'], p['lo'], p['hi'], 2)}") for p in peaks[:3]]
    a.notes.append("A peak at the last token in the last layers is expected (the state there "
                   "is the output); where the effect sits before the last token shows where "
                   "the information is read from.")
    summ = _data(files, "summary.parquet")
    if summ is not None and "peak_layer" in summ.columns:
        rows = []
        for grid, g in summ.groupby("grid", sort=False):
            mode = g["peak_layer"].mode()
            share = float((g["peak_layer"] == mode.iloc[0]).mean()) if len(mode) else np.nan
            rows.append([grid, int(mode.iloc[0]) if len(mode) else "–",
                         f"{share:.0%}", ci(*mean_ci(g["gini_coefficient"])[:3], 2)
                         if "gini_coefficient" in g else "–", len(g)])
        a.tables.append(table(["grid", "most common peak layer", "prompts peaking there",
                               "Gini of |effects| [95% CI]", "prompts"], rows,
                              "per-prompt peaks (patch summary)"))
    att = _data(files, "attribution.parquet")
    if att is not None:
        r = attribution_agreement(eff, att, metric)
        if r is not None:
            a.notes.append(f"Attribution patching against exact patching, over the same "
                           f"cells (mean over prompts, {metric if r[2] else 'shared metric'}): "
                           f"Pearson r = {r[0]:.3f} over {r[1]} cells.")
    return a


def attribution_agreement(eff: Any, att: Any, metric: str) -> tuple[float, int, bool] | None:
    """Correlation of the per-cell means of attribution and exact patching."""
    from dolm_tools.plot.fig_effects import trace_rows

    m = metric if metric in set(att["metric"]) else _metric(att, "logit_diff")
    if m is None or m not in set(eff["metric"]):
        return None
    key = ["site", "position"]
    e = trace_rows(eff[eff["metric"] == m]).groupby(key)["value"].mean()
    t = trace_rows(att[att["metric"] == m]).groupby(key)["value"].mean()
    both = e.to_frame("e").join(t.to_frame("t"), how="inner").dropna()
    if len(both) < 3 or both["e"].std() == 0 or both["t"].std() == 0:
        return None
    return float(np.corrcoef(both["e"], both["t"])[0, 1]), len(both), m == metric


def dilemma_answer(files: dict[str, Any]) -> Answer:
    return tracing_answer(files, "exact patching, clean into options-swapped")


def factual_answer(files: dict[str, Any]) -> Answer:
    return tracing_answer(files, "noise on the subject, clean state restored")


# ------------------------------------------------------------------ bayes


def bayes_answer(files: dict[str, Any]) -> Answer:
    a = Answer()
    abl = _data(files, "ablate.parquet")
    if abl is not None and "mae_bayes" in set(abl["metric"]):
        rows = []
        names = list(dict.fromkeys(abl["intervention"].astype(str)))
        comp = abl.drop_duplicates("intervention").set_index("intervention")
        for name in names:
            g = abl[abl["intervention"] == name]
            mae = mean_ci(g[g["metric"] == "mae_bayes"].groupby("prompt_id")["value"].mean())
            drift = mean_ci(g[g["metric"] == "order_drift"].groupby("prompt_id")["value"].mean())
            c = comp["component"].get(name) if "component" in comp else None
            rows.append([name, ci(*mae[:3]), ci(*drift[:3]), mae[3],
                         "" if c is None or c != c else c])
        a.tables.append(table(["intervention", "MAE to Bayes [95% CI]",
                               "order drift [95% CI]", "prompts", "components"], rows,
                              "evidence sweep: |model P(X) - exact posterior|, mean over prompts"))
        base = next((r for r in rows if r[0] == "baseline"), rows[0])
        a.headline.append((f"MAE to Bayes, {base[0]}", base[1]))
        others = [r for r in rows if r is not base]
        if others:
            worst = max(others, key=lambda r: float(r[1].split()[0]) if r[1] != "–" else -1)
            a.headline.append((f"MAE to Bayes, {worst[0]}",
                               f"{worst[1]} ({worst[4]})" if worst[4] else worst[1]))
    probe = _data(files, "probe_posterior.parquet")
    if probe is not None and "r2" in set(probe["metric"]):
        d = probe[probe["metric"] == "r2"].sort_values("layer")
        best = d.loc[d["value"].idxmax()]
        a.headline.append(("posterior decodable (probe R²)",
                           f"{num(best['value'])} at {best['site']}"))
        a.tables.append(table(["site", "held-out R²"],
                              [[r.site, num(r.value)] for r in d.itertuples()],
                              "ridge probe of the exact posterior per layer (held out by "
                              "multiset)"))
    steer = files.get("steer.parquet")
    if steer is not None and "p_x" in set(steer.data["metric"]):
        x = steer.meta.extra or {}
        d = steer.data[steer.data["metric"] == "p_x"]
        rows = []
        for site, g in d.groupby("site", sort=False):
            per = g.groupby(["prompt_id", "alpha"])["value"].mean().unstack()
            alphas = per.columns.to_numpy(dtype=float)
            slopes = [np.polyfit(alphas, r.to_numpy(float), 1)[0] for _, r in per.iterrows()
                      if np.isfinite(r.to_numpy(float)).all()]
            rows.append([site, ci(*mean_ci(slopes)[:3], 4, sign=True), len(slopes),
                         f"{alphas.min():g} .. {alphas.max():g} ({x.get('scale', 'unit')})"])
        a.tables.append(table(["site", "slope dP(X)/dα [95% CI]", "prompts", "α range"], rows,
                              "steering along the posterior probe direction, ambiguous evidence"))
        if rows:
            a.headline.append(("steering slope dP(X)/dα", f"{rows[0][1]} at {rows[0][0]}"))
    return a


# ------------------------------------------------------------------ lens and DLA


def lenses_of(ch: Any) -> list[str]:
    """The lenses of a choice frame, the tuned lens first (it reads early layers better)."""
    from dolm_tools.plot.fig_lens import lenses

    return sorted(lenses(ch), key=lambda n: (n != "tuned", n))


def lens_answer(files: dict[str, Any]) -> Answer:
    a = Answer()
    tr = files.get("translators.safetensors")
    kl = ((tr.data or {}).get("heldout_kl") if tr is not None else None) or {}
    if kl.get("layer") and kl.get("logit"):
        layers, logit, tuned = kl["layer"], kl["logit"], kl.get("tuned") or [None] * len(
            kl["layer"])
        a.tables.append(table(["layer", "logit lens KL", "tuned lens KL"],
                              [[lay, num(lg), num(tu)] for lay, lg, tu in
                               zip(layers, logit, tuned, strict=True)],
                              f"held-out KL(final ‖ lens) in nats, "
                              f"{kl.get('n_tokens', '?')} tokens"))
        a.headline.append(("held-out KL, layer 0: logit → tuned",
                           f"{num(logit[0], 2)} → {num(tuned[0], 2)} nats"))
    for study in ("dilemma", "bayes"):
        lens = _data(files, f"{study}/lens.parquet")
        if lens is not None and "kl_to_final" in lens.columns:
            from dolm_tools.plot.fig_lens import _lens_of, cells, choice_frame, crossing

            d = cells(lens)
            names = list(dict.fromkeys(_lens_of(d)))
            by: dict[int, list] = {}
            for name in names:
                for layer, g in d[_lens_of(d) == name].groupby("layer"):
                    per = g.groupby("prompt_id")["kl_to_final"].mean()
                    by.setdefault(int(layer), []).append(ci(*mean_ci(per)[:3]))
            a.tables.append(table(["layer", *(f"{n} lens KL [95% CI]" for n in names)],
                                  [[lay, *v] for lay, v in sorted(by.items())],
                                  f"{study} prompts ({d['prompt_id'].nunique()}): KL to the "
                                  "final distribution by layer, last position, nats"))
            ch = choice_frame(lens)
            if ch is not None:
                for name in lenses_of(ch):
                    cross, n_cross, n_never = crossing(ch[_lens_of(ch) == name])
                    if cross is not None:
                        a.headline.append((f"{study}: intended option leads from ({name} lens)",
                                           f"layer {cross:g} (median; {n_cross} prompts"
                                           + (f", {n_never} never" if n_never else "") + ")"))
                        break
        dla = _data(files, f"{study}/attributions.parquet")
        if dla is not None:
            from dolm_tools.plot.fig_dla import attn_share

            share = attn_share(dla)
            if share is not None:
                a.notes.append(f"{study}: attention carries {share:.0%} of the direct logit "
                               "attribution summed over layers (MLP the rest).")
                if study == "dilemma":
                    a.headline.append(("dilemma DLA: attention share", f"{share:.0%}"))
    return a


# ------------------------------------------------------------------ PSM


def psm_answer(files: dict[str, Any]) -> Answer:
    a = Answer()
    comp = files.get("comparison.parquet")
    if comp is None:
        return a
    d = comp.data
    outcome = (comp.meta.extra or {}).get("outcome", "outcome")
    rows = []
    for r in d.itertuples():
        rows.append([r.contrast, r.estimand,
                     ci(r.naive, r.naive_ci_low, r.naive_ci_high, sign=True),
                     ci(r.matched, r.matched_ci_low, r.matched_ci_high, sign=True),
                     ci(r.true, r.true_ci_low, r.true_ci_high, sign=True),
                     "yes" if r.matched_ci_covers_true else "no",
                     num(getattr(r, "max_abs_smd_before", np.nan), 2) + " → "
                     + num(getattr(r, "max_abs_smd_after", np.nan), 2)])
    a.tables.append(table(["contrast", "estimand", "naive [95% CI]", "matched [95% CI]",
                           "true, experiment [95% CI]", "matched CI covers true",
                           "max |SMD| before → after"], rows,
                          f"effect of the format on {outcome}: naive difference, "
                          "propensity-matched estimate, and the experiment's truth"))
    att = d[d["estimand"] == "ATT"] if (d["estimand"] == "ATT").any() else d
    for r in att.head(2).itertuples():
        a.headline.append((f"{r.contrast} ({r.estimand}): naive / matched / true",
                           f"{ci(r.naive, r.naive_ci_low, r.naive_ci_high, 2, True)} / "
                           f"{ci(r.matched, r.matched_ci_low, r.matched_ci_high, 2, True)} / "
                           f"{ci(r.true, r.true_ci_low, r.true_ci_high, 2, True)}"))
    return a


# ------------------------------------------------------------------ mediation


def mediation_answer(files: dict[str, Any]) -> Answer:
    a = Answer()
    comp = _data(files, "comparison.parquet")
    if comp is None:
        return a
    rows = []
    for r in comp.itertuples():
        rows.append([r.site, r.method, r.outcome,
                     ci(r.acme_average, r.acme_ci_low, r.acme_ci_high, 4, True),
                     num(r.ade_average, 4, True), num(r.total, 4, True), num(r.q_value, 3),
                     r.n_units])
    a.tables.append(table(["site", "method", "outcome", "ACME [95% CI]", "ADE", "total",
                           "q", "units"], rows,
                          "indirect effect of chain-of-thought through each head: "
                          "statistical (sequential ignorability) vs interventional (patching)"))
    # the head the statistical analysis ranks first, and what patching that head shows
    stat = comp[comp["method"] == "statistical"]
    site = stat.loc[stat["acme_average"].abs().idxmax(), "site"] if len(stat) else None
    for method in ("statistical", "interventional"):
        g = comp[comp["method"] == method]
        if method == "interventional" and (g["outcome"] == "target_correct").any():
            g = g[g["outcome"] == "target_correct"]
        if site is not None:
            g = g[g["site"] == site]
        if g.empty:
            continue
        top = g.loc[g["acme_average"].abs().idxmax()]
        a.headline.append((f"ACME, {method} ({top['outcome']})",
                           f"{top['site']}: " + ci(top["acme_average"], top["acme_ci_low"],
                                                   top["acme_ci_high"], 3, True)))
    tot = comp[comp["method"] == "statistical"]["total"].dropna()
    if len(tot):
        a.headline.append(("total effect of CoT (statistical)", num(tot.iloc[0], 3, True)))
    return a


# ------------------------------------------------------------------ cunit


def cunit_answer(files: dict[str, Any]) -> Answer:
    from dolm_tools.plot.fig_cunit import METRIC_NAMES, _group, _scores

    a = Answer()
    met = _data(files, "fit/metrics.parquet")
    if met is None:
        return a
    sc = _scores(met)
    extra = {r.metric: r.value for r in _group(met, "structure").itertuples()}
    rows = [[METRIC_NAMES.get(k, k), num(v)] for k, v in sc.items()]
    rows += [[k, f"{v:g}"] for k, v in extra.items() if k in ("shd", "n_edges_true",
                                                              "n_edges_pred", "n_reversed")]
    lik = _group(met, "likelihood").dropna(subset=["value"])
    rows += [[f"held-out NLL, {r.regime}", num(r.value)] for r in lik.itertuples()]
    a.tables.append(table(["score", "value"], rows, "learned graph against the true graph "
                          "of the simulated SCM (one fit; no interval)"))
    if "f1" in sc:
        a.headline.append(("edge F1", num(sc["f1"])))
    if "shd" in extra:
        a.headline.append(("SHD (edges wrong)", f"{extra['shd']:g} of "
                           f"{extra.get('n_edges_true', float('nan')):g} true edges"))
    if "cf_corr" in sc:
        a.headline.append(("counterfactual corr", num(sc["cf_corr"])))
    return a


# ------------------------------------------------------------------ circuits


def circuit_answer(files: dict[str, Any]) -> Answer:
    from dolm_tools.circuit.summary import METHODS, task_summary

    a = Answer()
    tasks = sorted({k.rsplit("/", 1)[0] for k in files
                    if k.endswith("/faithfulness.parquet")})
    rows, curves = [], []
    for t in tasks:
        s = task_summary({m: _data(files, f"{t}/edges.{m}.parquet") for m in METHODS},
                         _data(files, f"{t}/faithfulness.parquet"))
        src = files.get(f"{t}/edges.exact.parquet")
        extra = (src.meta.extra or {}) if src is not None else {}
        rho, circ = s["rho"], s["circuit"] or {}
        small = s["smallest"]
        rows.append([t, extra.get("n_prompts", ""), num(extra.get("clean_metric")),
                     num(rho.get(("eap", "exact"))), num(rho.get(("eap-ig", "exact"))),
                     num(rho.get(("eap", "eap-ig"))), circ.get("n_edges", ""),
                     num(circ.get("faithfulness")), num(circ.get("complement_ratio")),
                     "none" if small is None else small, s["n_edges_graph"]])
        curves.append([t, ", ".join(f"{n}: {f:.2f}" for n, f in s["curve"])])
        a.headline.append((f"{t}: smallest circuit, faithfulness >= 0.8",
                           f"{'none' if small is None else small} of {s['n_edges_graph']} "
                           f"edges; rho(EAP-IG, exact) {num(rho.get(('eap-ig', 'exact')), 2)}"))
    if rows:
        a.tables.append(table(
            ["task", "prompts", "clean logit diff", "rho(EAP, exact)", "rho(EAP-IG, exact)",
             "rho(EAP, EAP-IG)", "circuit edges", "faithfulness", "complement ratio",
             "smallest n with faithfulness >= 0.8", "edges in graph"], rows,
            "Spearman rank correlation of |edge score| over every edge of the graph; the "
            "circuit = the top edges of the exact ranking, every other edge patched from the "
            "counterfactual run (faithfulness = circuit metric / full metric; complement ratio "
            "= the metric with the circuit's edges patched / full). One run, no interval."))
        a.tables.append(table(["task", "faithfulness of the top-n exact edges (n: value)"],
                              curves, "the faithfulness curve"))
    return a


# ------------------------------------------------------------------ families


def families_answer(files: dict[str, Any]) -> Answer:
    a = Answer()
    rows = []
    for name in sorted(files):
        if not name.endswith(".outcomes.parquet"):
            continue
        d = files[name].data
        fam = name[: -len(".outcomes.parquet")]
        c = d["correct"].dropna().astype(bool) if "correct" in d.columns else []
        p, lo, hi = wilson(int(np.sum(c)), len(c))
        lp = mean_ci(d["target_logprob"]) if "target_logprob" in d.columns else (np.nan,) * 4
        rows.append([fam, ci(p, lo, hi, 2), len(c), ci(*lp[:3], 2)])
    if rows:
        a.tables.append(table(["family", "greedy accuracy [95% Wilson CI]", "prompts",
                               "target log-prob [95% CI]"], rows,
                              "the model on each task family (collect-acts smoke run)"))
        a.headline.append(("accuracy", ", ".join(f"{r[0]} {r[1].split()[0]}" for r in rows)))
    return a


STUDIES: tuple[Study, ...] = (
    Study("bayes", "Bayesian updating",
          "Does the model track the exact Bayes posterior as evidence accumulates, where is "
          "the posterior decodable, and which heads carry it (ablation, steering)?",
          ("bayes",),
          (("outcomes.parquet", "evidence_sweep", None), ("scan.parquet", "heads", "mae_bayes"),
           ("ablate.parquet", "ablation", "mae_bayes"), ("steer.parquet", "dose_response", "p_x")),
          bayes_answer),
    Study("dilemma", "Dilemma: causal tracing",
          "Which layer and token position carry the model's choice between two options? "
          "Clean states are patched into the run with the options swapped.", ("dilemma",),
          (("effects.parquet", "trace", "recovery"), ("summary.parquet", "peaks", None),
           ("effects.parquet", "heads", "recovery")), dilemma_answer),
    Study("factual", "Factual recall: noise tracing",
          "Where is the attribute recalled? The subject is noised and the clean state of one "
          "site restored at a time (ROME-style).", ("factual",),
          (("effects.parquet", "trace", "prob_target"), ("summary.parquet", "peaks", None)),
          factual_answer),
    Study("lens_dla", "Logit / tuned lens and direct logit attribution",
          "At which layer does the answer become readable, and which components write it "
          "(dilemma and bayes prompts)?", ("lens",),
          (("translators.safetensors", "heldout_kl", None), ("lens.parquet", "trajectories", None),
           ("attributions.parquet", "decision", None), ("lens.parquet", "kl", None)),
          lens_answer,
          borrows=(("dilemma", "lens.parquet"), ("dilemma", "attributions.parquet"),
                   ("bayes", "lens.parquet"), ("bayes", "attributions.parquet"))),
    Study("formats-psm", "Instruction format → completion (propensity score matching)",
          "Does the instruction format (polite, few-shot vs direct) change whether the model "
          "completes the task? Matching on an observational design, checked against an "
          "experiment on the same units.", ("formats-psm", "formats_psm"),
          (("comparison.parquet", "check", None), ("psm.balance.parquet", "love", None),
           ("psm.units.parquet", "overlap", None), ("dag.json", "dag", None),
           ("psm.units.parquet", "covariates", None)), psm_answer),
    Study("cot-mediation", "Chain-of-thought → accuracy, through attention (mediation)",
          "Does chain-of-thought raise accuracy through the heads that attend to the "
          "question's numbers? The statistical estimate beside what patching the heads shows.",
          ("cot-mediation", "cot_mediation"),
          (("comparison.parquet", "methods", None), ("stat.parquet", "decomposition", None)),
          mediation_answer),
    Study("cunit", "Causal-unit network: learning a DAG under do()",
          "Can the causal-unit network recover the graph of a simulated linear SCM from "
          "interventional data?", ("cunit",),
          (("*", "dags", None), ("fit/metrics.parquet", "scores", None),
           ("fit/metrics.parquet", "history", None)), cunit_answer),
    Study("circuit", "Edge-level circuits: which connections carry each task",
          "Which head-to-head connections (through a head's query, key or value), MLPs and "
          "the embedding carry the answer of each task, and how small can a circuit be that "
          "keeps it? Edges are scored by exact edge patching from the counterfactual prompt "
          "and by its gradient estimates EAP and EAP-IG.", ("circuit",),
          (("*faithfulness.parquet", "curve", None), ("*circuit.json", "graph", None),
           ("*edges.exact.parquet", "matrix", None)), circuit_answer),
    Study("families", "Task families (smoke run)",
          "Has the model learned each task? Greedy accuracy and the target's log-probability "
          "on 24 prompts per family.", ("families",),
          (("*.outcomes.parquet", "accuracy", None),), families_answer),
)


def study_for_folder(name: str) -> Study | None:
    return next((s for s in STUDIES if name in s.folders), None)


def borrowed(rel: Path) -> Study | None:
    """The study that claims a file of another study's folder (e.g. dilemma/lens.parquet)."""
    parts = rel.parts
    if len(parts) < 2:
        return None
    return next((s for s in STUDIES if (parts[-2], parts[-1]) in s.borrows), None)
