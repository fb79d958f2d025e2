"""dolm-mediate statistical: a unit table -> one mediation analysis per candidate mediator.

``prepare`` checks and encodes the table (errors name the column or option, exit 3);
``run_statistical`` runs Imai-Keele-Tingley mediation for every mediator, Benjamini-Hochberg
across mediators per quantity, and the rho sensitivity analysis where it applies.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from dolm.errors import InputError
from dolm.formats import json_safe
from dolm_tools.mediate import statistical as st

RHO_GRID = np.round(np.linspace(-0.95, 0.95, 39), 4)


@dataclass
class Options:
    mediator_model: str = "auto"  # auto | linear | logistic | probit
    outcome_model: str = "auto"
    interaction: bool = False
    ci: str = "quasi-bayesian"  # quasi-bayesian | bootstrap
    sims: int = 1000
    seed: int = 0
    p_method: str = "normal"  # normal | empirical
    fdr: float = 0.05
    level: float = 0.95
    joint: str | None = None  # analyse the mediators jointly as one set, named so
    rho_grid: np.ndarray = field(default_factory=lambda: RHO_GRID.copy())


@dataclass
class Data:
    t: np.ndarray
    y: np.ndarray
    X: np.ndarray
    x_names: list[str]
    mediators: dict[str, np.ndarray]
    t_values: tuple[float, float]
    t_labels: tuple[str, str]
    outcome_binary: bool
    skipped: list[dict]
    dropped: dict


def _binary(v: np.ndarray) -> bool:
    return bool(np.all((v == 0) | (v == 1)))


def _where(rows: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    more = f", ... ({len(rows) - limit} more)" if len(rows) > limit else ""
    return f"rows {shown}{more}"


def _treatment(s: pd.Series, col: str, control: str | None, treat: str | None):
    vals = s.dropna()
    if pd.api.types.is_bool_dtype(vals):
        vals = vals.astype(float)
        s = s.astype(float)
    if pd.api.types.is_numeric_dtype(vals):
        x = s.to_numpy(dtype=float)
        uniq = np.unique(x)
        if control is not None or treat is not None:
            try:
                c = float(control) if control is not None else 0.0
                t = float(treat) if treat is not None else 1.0
            except ValueError:
                raise InputError(f"--control-value/--treat-value: expected numbers for the "
                                 f"numeric treatment {col!r}") from None
        elif set(uniq) <= {0.0, 1.0} and len(uniq) == 2:
            c, t = 0.0, 1.0
        elif len(uniq) == 2:
            c, t = float(uniq[0]), float(uniq[1])
        else:
            raise InputError(
                f"--treatment {col!r}: {len(uniq)} distinct values; expected a binary column, "
                "or give --control-value and --treat-value to compare two values of a "
                "numeric treatment"
            )
        if c == t:
            raise InputError("--control-value and --treat-value must differ")
        return x, (c, t), (f"{c:g}", f"{t:g}")
    levels = sorted(map(str, vals.unique()))
    c = control if control is not None else (levels[0] if len(levels) == 2 else None)
    t = treat if treat is not None else (
        [lv for lv in levels if lv != c][0] if len(levels) == 2 else None)
    if c is None or t is None or c not in levels or t not in levels or c == t:
        raise InputError(
            f"--treatment {col!r}: categorical with levels {levels}; expected two levels, or "
            "--control-value and --treat-value naming two of them"
        )
    sv = s.astype(str)
    x = np.where(sv == t, 1.0, np.where(sv == c, 0.0, np.nan))
    return x, (0.0, 1.0), (c, t)


def prepare(df: pd.DataFrame, treatment: str, outcome: str, mediators: list[str],
            covariates: list[str], *, path: str = "input", control_value: str | None = None,
            treat_value: str | None = None, dropna: bool = False) -> Data:
    cols = [str(c) for c in df.columns]
    for opt, names in (("--treatment", [treatment]), ("--outcome", [outcome]),
                       ("--covariates", covariates)):
        missing = [c for c in names if c not in cols]
        if missing:
            raise InputError(f"{opt}: column(s) {', '.join(map(repr, missing))} not in {path}")
    if not mediators:
        raise InputError("--mediator: expected at least one mediator column")
    for c in mediators:
        if c in (treatment, outcome) or c in covariates:
            raise InputError(f"--mediator: {c!r} is also the treatment, outcome or a covariate")
    work = df.copy()
    t, t_values, t_labels = _treatment(work[treatment], treatment, control_value, treat_value)
    work["_t"] = t
    keep_t = ~np.isnan(t) | work[treatment].isna().to_numpy()
    other_levels = int((~keep_t).sum())
    if other_levels:  # categorical levels other than the two compared
        work = work.loc[keep_t]

    used = ["_t", outcome, *covariates, *mediators]
    nan_cols = {c: np.flatnonzero(work[c].isna().to_numpy()) for c in used}
    nan_cols = {c: r for c, r in nan_cols.items() if len(r)}
    dropped: dict[str, Any] = {"rows": 0, "other_treatment_levels": other_levels}
    if nan_cols:
        label = {"_t": treatment}
        if not dropna:
            parts = [f"column {label.get(c, c)!r}: {len(r)} missing ({_where(r)})"
                     for c, r in list(nan_cols.items())[:6]]
            raise InputError(f"{path}: missing values: " + "; ".join(parts)
                             + "; pass --dropna to drop these rows (the number is reported)")
        bad = work[used].isna().any(axis=1).to_numpy()
        dropped = {"rows": int(bad.sum()), "other_treatment_levels": other_levels,
                   "by_column": {label.get(c, c): int(len(r)) for c, r in nan_cols.items()}}
        work = work.loc[~bad]
    if len(work) < 10:
        raise InputError(f"{path}: {len(work)} usable rows; expected at least 10")
    tt = work["_t"].to_numpy(dtype=float)
    if len(np.unique(tt)) < 2:
        raise InputError(f"--treatment {treatment!r}: only one value among the usable rows")

    ys = work[outcome]
    if not (pd.api.types.is_numeric_dtype(ys) or pd.api.types.is_bool_dtype(ys)):
        raise InputError(f"--outcome {outcome!r}: expected numbers or booleans, found {ys.dtype}")
    y = ys.to_numpy(dtype=float)
    if len(np.unique(y)) < 2:
        raise InputError(
            f"--outcome {outcome!r}: constant (every usable row is {y[0]:g}); "
            "no effect can be estimated on it"
        )

    xs, names = [], []
    for c in covariates:
        s = work[c]
        if s.nunique() < 2:
            raise InputError(f"--covariates: covariate {c!r} is constant (every value is "
                             f"{s.iloc[0]!r}); remove it")
        if pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
            xs.append(s.to_numpy(dtype=float))
            names.append(c)
        else:
            levels = sorted(map(str, s.unique()))
            sv = s.astype(str).to_numpy()
            for lv in levels[1:]:
                xs.append((sv == lv).astype(float))
                names.append(f"{c}[{lv}]")
    X = np.column_stack(xs) if xs else np.zeros((len(work), 0))

    meds, skipped = {}, []
    for c in mediators:
        s = work[c]
        if not (pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s)):
            raise InputError(f"--mediator {c!r}: expected numbers or booleans, found {s.dtype}")
        v = s.to_numpy(dtype=float)
        if np.ptp(v) == 0:
            skipped.append({"mediator": c, "reason": f"constant (every value is {v[0]:g})"})
            continue
        meds[c] = v
    if not meds:
        raise InputError("--mediator: every mediator is constant: "
                         + ", ".join(s["mediator"] for s in skipped[:10]))
    return Data(t=tt, y=y, X=X, x_names=names, mediators=meds, t_values=t_values,
                t_labels=t_labels, outcome_binary=_binary(y), skipped=skipped, dropped=dropped)


def _kind(choice: str, v: np.ndarray, option: str, col: str) -> str:
    if choice == "auto":
        return "logistic" if _binary(v) else "linear"
    if choice in ("logistic", "probit") and not _binary(v):
        raise InputError(f"{option} {choice}: column {col!r} is not 0/1")
    return choice


def analyse_one(name: str, m: np.ndarray, d: Data, opt: Options, outcome: str) -> dict:
    kind_m = _kind(opt.mediator_model, m, "--mediator-model", name)
    kind_y = _kind(opt.outcome_model, d.y, "--outcome-model", outcome)
    spec = st.Spec(interaction=opt.interaction, t_values=d.t_values)
    dm, dy = st.design(d.t, m, d.X, opt.interaction)
    fm = st.fit_model(m, dm, kind_m, ["const", "T", *d.x_names])
    fy = st.fit_model(d.y, dy, kind_y,
                      ["const", "T", "M", *(["T:M"] if opt.interaction else []), *d.x_names])
    rng = np.random.default_rng([opt.seed, zlib.crc32(name.encode())])
    if opt.ci == "bootstrap" and "probit" in (kind_m, kind_y):
        raise InputError("--ci bootstrap: the bootstrap refits logistic and linear models "
                         "only; use the quasi-Bayesian intervals with a probit model")
    if opt.ci == "bootstrap":
        point = st.point_effects(fm, fy, d.X, spec, rng)
        draws = st.bootstrap(d.t, m, d.y, d.X, fm, fy, spec, opt.sims, rng)
        rows = st.summarise(draws, point=point, level=opt.level)
    else:
        draws = st.quasi_bayes(fm, fy, d.X, spec, opt.sims, rng)
        rows = st.summarise(draws, level=opt.level)
    out = {"mediator": name, "mediator_model": kind_m, "outcome_model": kind_y, "rows": rows,
           "converged": bool(fm.converged and fy.converged),
           "coef_t_on_m": float(fm.params[1]), "coef_m_on_y": float(fy.params[2])}
    if kind_m == "linear" and kind_y == "linear" and not opt.interaction:
        sens = st.sensitivity_linear(d.t, m, d.y, d.X, d.t_values, opt.rho_grid)
        out["sensitivity"] = sens
    elif kind_m == "linear" and kind_y == "probit" and not opt.interaction:
        out["sensitivity"] = st.sensitivity_probit_outcome(d.t, m, d.y, d.X, d.t_values,
                                                           opt.rho_grid)
    else:
        out["sensitivity_note"] = (
            "rho sensitivity is implemented for a linear mediator with a linear or probit "
            "outcome model (--outcome-model probit for a 0/1 outcome), without interaction "
            "(Imai, Keele & Yamamoto 2010)"
        )
    return out


def analyse_joint(d: Data, opt: Options, outcome: str) -> dict:
    """The mediators as one set (``joint.py``): the set's effects, each mediator's own
    interventional path and the mutual-dependence remainder, as row groups."""
    from dolm_tools.mediate import joint

    if opt.ci == "bootstrap":
        raise InputError("--joint: only the quasi-Bayesian intervals are implemented for a "
                         "mediator set; drop --ci bootstrap")
    names = list(d.mediators)
    kinds = [_kind(opt.mediator_model, d.mediators[n], "--mediator-model", n) for n in names]
    kind_y = _kind(opt.outcome_model, d.y, "--outcome-model", outcome)
    jf = joint.fit_joint(d.t, [d.mediators[n] for n in names], d.y, d.X, kinds, kind_y,
                         opt.interaction, names, d.x_names, d.t_values)
    rng = np.random.default_rng([opt.seed, zlib.crc32(opt.joint.encode())])
    draws = joint.quasi_bayes(jf, d.X, opt.sims, rng)
    set_kind = kinds[0] if len(set(kinds)) == 1 else None
    groups = [(opt.joint, "joint", set_kind, st.summarise(draws["joint"], level=opt.level))]
    for n, k in zip(names, kinds, strict=True):
        groups.append((f"{opt.joint}: via {n}", "via", k,
                       st.summarise(draws[f"via:{n}"], level=opt.level, names=joint.ACME)))
    groups.append((f"{opt.joint}: mutual", "mutual", set_kind,
                   st.summarise(draws["mutual"], level=opt.level, names=joint.ACME)))
    return {"mediator": opt.joint, "mediator_model": set_kind, "outcome_model": kind_y,
            "groups": groups, "members": names, "rows": groups[0][3],
            "converged": bool(all(f.converged for f in jf.mediators) and jf.outcome.converged),
            "coef_t_on_m": None, "coef_m_on_y": None,
            "sensitivity_note": "rho sensitivity is not implemented for a mediator set"}


def run_statistical(d: Data, opt: Options, outcome: str, progress=None) -> tuple:
    """Return (effects table, sensitivity table, per-mediator summaries)."""
    from statsmodels.stats.multitest import multipletests

    names = list(d.mediators)
    if opt.joint:
        results = [analyse_joint(d, opt, outcome)]
    else:
        it = progress(names) if progress else names
        results = [analyse_one(n, d.mediators[n], d, opt, outcome) for n in it]
    rows, sens_rows = [], []
    for r in results:
        groups = r.get("groups") or [(r["mediator"], None, r["mediator_model"], r["rows"])]
        for label, path, kind_m, grows in groups:
            for e in grows:
                p = e["p_value_normal"] if opt.p_method == "normal" else e["p_value_empirical"]
                rows.append({
                    "method": "statistical", "mediator": label, "effect": e["effect"],
                    "estimate": e["estimate"], "ci_low": e["ci_low"], "ci_high": e["ci_high"],
                    "se": e["se"], "p_value": p, "p_value_empirical": e["p_value_empirical"],
                    "n_units": int(len(d.t)), "ci_method": opt.ci,
                    "mediator_model": kind_m, "outcome_model": r["outcome_model"],
                    **({"path": path, "mediator_set": r["mediator"]} if path else {}),
                })
        if "sensitivity" in r:
            s = r["sensitivity"]
            for i, (rho, a) in enumerate(zip(s["rho"], s["acme"], strict=True)):
                row = {"mediator": r["mediator"], "rho": float(rho), "acme": float(a)}
                for k in ("acme_control", "acme_treated"):
                    if k in s:
                        row[k] = float(s[k][i])
                sens_rows.append(row)
    eff = pd.DataFrame(rows)
    eff["q_value"] = np.nan
    for _, g in eff.groupby("effect", sort=False):
        p = g["p_value"].to_numpy(dtype=float)
        ok = np.isfinite(p)
        q = np.full(len(p), np.nan)
        if ok.any():
            q[ok] = multipletests(p[ok], method="fdr_bh")[1]
        eff.loc[g.index, "q_value"] = q
    eff["significant"] = (eff["q_value"] <= opt.fdr).fillna(False).astype(bool)
    cols = ["method", "mediator", "effect", "estimate", "ci_low", "ci_high", "se", "p_value",
            "p_value_empirical", "q_value", "significant", "n_units", "ci_method",
            "mediator_model", "outcome_model"] + (["path", "mediator_set"] if opt.joint else [])
    sens = pd.DataFrame({
        "mediator": pd.Series([r["mediator"] for r in sens_rows], dtype="string"),
        "rho": pd.Series([r["rho"] for r in sens_rows], dtype=float),
        "acme": pd.Series([r["acme"] for r in sens_rows], dtype=float),
    })
    for k in ("acme_control", "acme_treated"):  # binary outcome: the two ACMEs differ
        if any(k in r for r in sens_rows):
            sens[k] = pd.Series([r.get(k, r["acme"]) for r in sens_rows], dtype=float)
    return eff[cols], sens, results


def summary(d: Data, opt: Options, eff: pd.DataFrame, results: list[dict]) -> dict:
    avg = eff[eff.effect == "acme_average"].set_index("mediator")
    per = []
    for r in results:
        a = avg.loc[r["mediator"]]
        item = {
            "mediator": r["mediator"], "mediator_model": r["mediator_model"],
            "outcome_model": r["outcome_model"], "converged": r["converged"],
            "acme_average": float(a.estimate), "ci_low": float(a.ci_low),
            "ci_high": float(a.ci_high), "p_value": float(a.p_value),
            "q_value": float(a.q_value), "significant": bool(a.significant),
            "coef_t_on_m": r["coef_t_on_m"], "coef_m_on_y": r["coef_m_on_y"],
        }
        if "members" in r:
            item["members"] = r["members"]
        if "sensitivity" in r:
            s = r["sensitivity"]
            item["rho_at_zero"] = s["rho_at_zero"]
            item["r2_star_product_at_zero"] = s["r2_star_product_at_zero"]
            item["r2_tilde_product_at_zero"] = s["r2_tilde_product_at_zero"]
        else:
            item["rho_at_zero"] = None
            item["sensitivity_note"] = r["sensitivity_note"]
        per.append(item)
    order = sorted(per, key=lambda x: -abs(np.nan_to_num(x["acme_average"])))
    return json_safe({
        "n_units": int(len(d.t)),
        "control_value": d.t_labels[0],
        "treat_value": d.t_labels[1],
        "covariates_encoded": d.x_names,
        "dropped_missing": d.dropped,
        "outcome_binary": d.outcome_binary,
        "options": {
            "mediator_model": opt.mediator_model, "outcome_model": opt.outcome_model,
            "interaction": opt.interaction, "ci": opt.ci, "sims": opt.sims, "seed": opt.seed,
            "p_method": opt.p_method, "fdr": opt.fdr, "level": opt.level,
            "joint": opt.joint,
        },
        "inference": (
            f"quasi-Bayesian Monte Carlo, {opt.sims} draws of both models' coefficients "
            "(Imai, Keele & Tingley 2010); estimate = mean of draws (median for proportions)"
            if opt.ci == "quasi-bayesian" else
            f"nonparametric bootstrap, {opt.sims} resamples of units; estimate on the full "
            "sample"
        ) + f"; {int(opt.level * 100)}% percentile intervals; p-values "
        + ("2 Phi(-|mean|/sd) of the draws" if opt.p_method == "normal" else
           "2 min(P(draw>0), P(draw<0))")
        + "; Benjamini-Hochberg q-values across mediators, per quantity",
        "n_mediators": len(per),
        "n_significant_acme": int(sum(p["significant"] for p in per)),
        "skipped": d.skipped,
        "mediators": per,
        "top": [p["mediator"] for p in order[:10]],
    })
