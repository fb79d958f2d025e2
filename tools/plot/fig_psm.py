"""Figures for dolm-psm files: balance (Love plot), propensity overlap, matched pairs and
the effect forest (psm_balance, psm_units, psm_pairs, psm_summary)."""

from __future__ import annotations

from typing import Any

import numpy as np
from dolm_tools.plot import common as C
from dolm_tools.plot import style
from dolm_tools.plot.registry import compare, figure, unique_labels

SMD_THRESHOLD = 0.1
ESTIMANDS = ("ATT", "ATC", "ATE")


# ------------------------------------------------------------------ balance


def _contrasts(df: Any) -> list[str]:
    return list(dict.fromkeys(df["contrast"].astype(str)))


def _love_size(src: Any, contrast: str | None) -> tuple[float, float]:
    d = src.data[src.data["contrast"].astype(str) == contrast] if contrast else src.data
    n_est = d["estimand"].nunique()
    n_var = d["variable"].nunique()
    w, _ = C.panels_size(n_est, per=4.2)
    return (w, max(4.6, 0.32 * n_var + 2.0))


@figure("psm_balance", "love", "covariate balance before and after matching (Love plot)",
        size=_love_size, variants=lambda s: _contrasts(s.data))
def draw_love(fig: Any, src: Any, contrast: str) -> None:
    d = src.data[src.data["contrast"].astype(str) == contrast]
    ests = [e for e in ESTIMANDS if e in set(d["estimand"])] or sorted(set(d["estimand"]))
    axes = C.panel_grid(fig, len(ests), sharey=True)
    variables = list(dict.fromkeys(d["variable"].astype(str)))
    y = np.arange(len(variables))
    for ax, est in zip(axes, ests, strict=True):
        sub = d[d["estimand"] == est]
        for sample, marker, fill, col in (("all", "o", "none", style.PALETTE[1]),
                                          ("matched", "o", None, style.PALETTE[0])):
            s = sub[sub["sample"] == sample].set_index("variable")["smd"].abs()
            vals = [float(s.get(v, np.nan)) for v in variables]
            ax.plot(vals, y, ls="", marker=marker, ms=6, color=col,
                    markerfacecolor=fill if fill else col,
                    label="before matching" if sample == "all" else "after matching")
        before = sub[sub["sample"] == "all"].set_index("variable")["smd"].abs()
        after = sub[sub["sample"] == "matched"].set_index("variable")["smd"].abs()
        for i, v in enumerate(variables):
            if v in before.index and v in after.index:
                ax.plot([before[v], after[v]], [i, i], color="0.75", lw=1, zorder=0)
        ax.axvline(SMD_THRESHOLD, color="0.4", ls="--", lw=1)
        ax.axvline(0, color="0.7", lw=0.8)
        ax.set_title(est)
        ax.set_xlabel("|standardised mean difference|")
        ax.set_yticks(y)
        ax.set_yticklabels(variables)
        ax.set_ylim(-0.7, len(variables) - 0.3)
        ax.invert_yaxis()
    axes[0].set_ylabel("covariate")
    axes[0].legend(frameon=False, loc="lower right", fontsize=8)
    C.title(fig, f"Covariate balance: {contrast} (dashed: |SMD| = {SMD_THRESHOLD})",
            src.model_label)


# ------------------------------------------------------------------ propensity overlap


def _weight_column(df: Any) -> str | None:
    for est in ESTIMANDS:
        col = f"weight_{est.lower()}"
        if col in df.columns and df[col].notna().any():
            return col
    return None


@figure("psm_units", "overlap", "propensity-score overlap of treated and control units",
        size=lambda s, v: C.panels_size(len(_contrasts(s.data))))
def draw_overlap(fig: Any, src: Any, _v: Any) -> None:
    from matplotlib.ticker import FuncFormatter

    df = src.data
    names = _contrasts(df)
    axes = C.panel_grid(fig, len(names))
    wcol = _weight_column(df)
    bins = np.linspace(0, 1, 26)
    for ax, name in zip(axes, names, strict=True):
        d = df[df["contrast"].astype(str) == name]
        for treated, sign, col in ((True, 1, style.PALETTE[0]), (False, -1, style.PALETTE[1])):
            g = d[d["treated"] == treated]
            grp = "treated" if treated else "control"
            h_all, _ = np.histogram(g["propensity"], bins=bins)
            ax.stairs(sign * h_all, bins, color=col, lw=1.2, baseline=0,
                      label=f"{grp}: all ({len(g)})")
            if wcol:
                h_m, _ = np.histogram(g["propensity"], bins=bins, weights=g[wcol].fillna(0))
                ax.stairs(sign * h_m, bins, color=col, alpha=0.45, fill=True, baseline=0,
                          label=f"{grp}: matched ({wcol[7:].upper()} weights)")
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("propensity score")
        ax.set_ylabel("units (treated up, control down)")
        ax.set_title(name)
        ax.legend(frameon=False, fontsize=8, loc="upper right")
        lim = max(abs(v) for v in ax.get_ylim())
        ax.set_ylim(-lim, lim * 1.35)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{abs(v):g}"))
    C.title(fig, "Propensity overlap before and after matching", src.model_label)


# ------------------------------------------------------------------ covariate distributions

MAX_COVARIATES = 12


def _covariates(df: Any) -> list[str]:
    return [c for c in df.columns if str(c).startswith("x.") and df[c].notna().any()]


def _weight_columns(df: Any) -> list[tuple[str, str]]:
    out = []
    for est in (*ESTIMANDS, "ATO"):
        col = f"weight_{est.lower()}"
        if col in df.columns and df[col].notna().any():
            out.append((est, col))
    return out


def _cov_size(src: Any, _v: Any) -> tuple[float, float]:
    n = min(len(_covariates(src.data)), MAX_COVARIATES)
    cols = 1 + len(_weight_columns(src.data))
    return (2.9 * cols + 1.2, 1.9 * n + 1.4)


@figure("psm_units", "covariates", "each covariate's distribution in treated and control units "
        "before and after matching (cobalt's bal.plot)", size=_cov_size,
        when=lambda s: bool(_covariates(s.data)), variants=lambda s: _contrasts(s.data))
def draw_covariates(fig: Any, src: Any, contrast: str) -> None:
    """Rows: covariates; columns: all units, then the matched sample under each estimand's
    weights. Continuous: weighted density (histogram on shared bins); 0/1: weighted share."""
    d = src.data[src.data["contrast"].astype(str) == contrast]
    covs = _covariates(d)
    shown = covs[:MAX_COVARIATES]
    samples = [("all units", None)] + [(f"matched: {e} weights", c)
                                       for e, c in _weight_columns(d)]
    axes = np.atleast_2d(fig.subplots(len(shown), len(samples), squeeze=False))
    treated = d["treated"].to_numpy(dtype=bool)
    groups = ((treated, "treated", style.PALETTE[0]), (~treated, "control", style.PALETTE[1]))
    for i, cov in enumerate(shown):
        x = d[cov].to_numpy(dtype=float)
        ok = np.isfinite(x)
        binary = bool(np.all(np.isin(x[ok], (0.0, 1.0))))
        bins = None if binary else np.histogram_bin_edges(x[ok], bins=min(30, max(
            5, int(np.sqrt(ok.sum())))))
        for j, (sample, wcol) in enumerate(samples):
            ax = axes[i, j]
            w = np.ones(len(d)) if wcol is None else d[wcol].fillna(0).to_numpy(dtype=float)
            for k, (mask, name, col) in enumerate(groups):
                sel = mask & ok & (w > 0)
                if not sel.any():
                    continue
                if binary:
                    share = float(np.sum(w[sel] * x[sel]) / np.sum(w[sel]))
                    ax.bar([k], [share], width=0.6, color=col, label=name)
                    ax.annotate(f"{share:.2f}", (k, share), xytext=(0, 2),
                                textcoords="offset points", ha="center", fontsize=7)
                else:
                    h, _ = np.histogram(x[sel], bins=bins, weights=w[sel], density=True)
                    ax.stairs(h, bins, color=col, lw=1.4, label=name)
            if binary:
                ax.set_xticks([0, 1])
                ax.set_xticklabels(["treated", "control"], fontsize=7)
                ax.set_xlim(-0.7, 1.7)
                ax.set_ylim(0, 1.12)
            ax.tick_params(labelsize=7)
            if i == 0:
                ax.set_title(sample, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{cov[2:]}\n" + ("share = 1" if binary else "density"), fontsize=8)
    C.legend_unique(axes[0, 0], loc="upper right")
    more = f"; first {MAX_COVARIATES} of {len(covs)} covariates" if len(covs) > len(shown) else ""
    C.title(fig, f"Covariate distributions before and after matching: {contrast}{more}",
            src.model_label)


# ------------------------------------------------------------------ matched pairs


@figure("psm_pairs", "pairs", "matched pairs: propensity of pair members, outcome differences",
        size="wide")
def draw_pairs(fig: Any, src: Any, _v: Any) -> None:
    df = src.data
    ax1, ax2 = fig.subplots(1, 2)
    ests = list(dict.fromkeys(df["estimand"].astype(str)))
    all_diff = (df["treated_outcome"] - df["control_outcome"]).to_numpy(dtype=float)
    bins = np.histogram_bin_edges(all_diff[np.isfinite(all_diff)], bins=30)
    for i, est in enumerate(ests):
        d = df[df["estimand"] == est]
        col = style.colour(i)
        ax1.scatter(d["treated_ps"], d["control_ps"], s=9, alpha=0.5, color=col,
                    label=f"{est} ({d['set_id'].nunique()} sets)")
        diff = d["treated_outcome"] - d["control_outcome"]
        w = d["weight"].to_numpy(dtype=float)
        mean = float(np.sum(diff * w) / np.sum(w)) if np.sum(w) else float("nan")
        ax2.hist(diff, bins=bins, alpha=0.45, color=col, weights=w,
                 label=f"{est}: weighted mean {mean:.3g}")
        ax2.axvline(mean, color=col, lw=1.5)
    ax1.plot([0, 1], [0, 1], "k--", lw=1)
    ax1.set_xlim(0, 1)
    ax1.set_ylim(0, 1)
    ax1.set_aspect("equal")
    ax1.set_xlabel("propensity of the treated unit")
    ax1.set_ylabel("propensity of its control match")
    ax1.set_title("match quality")
    ax1.legend(frameon=False, fontsize=8)
    ax2.axvline(0, color="0.4", lw=0.8)
    ax2.set_xlabel("outcome: treated - control (per pair)")
    ax2.set_ylabel("pairs (weighted)")
    ax2.set_title("within-pair outcome differences")
    ax2.legend(frameon=False, fontsize=8)
    contrasts = ", ".join(_contrasts(df))
    C.title(fig, f"Matched pairs: {contrasts}", src.model_label)


# ------------------------------------------------------------------ effect forest


def effect_rows(summary: dict) -> list[dict]:
    rows = []
    for c in summary.get("contrasts", []):
        for e in c.get("effects", []):
            if e.get("estimate") is None:
                continue
            rows.append({"contrast": c["contrast"], **e})
    return rows


def _forest_size(srcs: Any, _v: Any) -> tuple[float, float]:
    srcs = srcs if isinstance(srcs, list) else [srcs]
    n = max(len(effect_rows(s.data)) for s in srcs)
    return (8.0, max(4.0, 0.42 * n * (1 + 0.35 * (len(srcs) - 1)) + 2.0))


def forest(ax: Any, labelled: list[tuple[str, dict]], outcome: str) -> None:
    keys = []
    for _, summary in labelled:
        for r in effect_rows(summary):
            k = (r["contrast"], r["estimand"])
            if k not in keys:
                keys.append(k)
    n = len(labelled)
    off = np.linspace(-0.25, 0.25, n) if n > 1 else np.zeros(1)
    for i, (label, summary) in enumerate(labelled):
        rows = {(r["contrast"], r["estimand"]): r for r in effect_rows(summary)}
        for j, k in enumerate(keys):
            r = rows.get(k)
            if r is None:
                continue
            naive = r["estimand"] == "naive"
            col = "0.55" if naive and n == 1 else style.colour(i)
            y = j + off[i]
            lo, hi = r.get("ci_low"), r.get("ci_high")
            if lo is not None and hi is not None:
                ax.plot([lo, hi], [y, y], color=col, lw=2)
            ax.plot([r["estimate"]], [y], marker="D" if not naive else "o", ms=6, color=col,
                    label=label if j == 0 and n > 1 else None)
            ax.annotate(f"{r['estimate']:.3g}", (r["estimate"], y), xytext=(0, 6),
                        textcoords="offset points", ha="center", fontsize=7, color=col)
    ax.axvline(0, color="0.4", lw=0.8)
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels([f"{c}: {e}" for c, e in keys])
    ax.set_ylim(-0.7, len(keys) - 0.3)
    ax.invert_yaxis()
    ax.set_xlabel(f"effect on {outcome} (estimate and 95% CI)")
    if n > 1:
        ax.legend(frameon=False, fontsize=8)


@figure("psm_summary", "forest", "matched effects (ATT/ATC/ATE) and the naive difference, 95% CI",
        size=_forest_size)
def draw_forest(fig: Any, src: Any, _v: Any) -> None:
    ax = fig.subplots()
    s = src.data
    forest(ax, [("", s)], str(s.get("outcome", "outcome")))
    C.title(fig, f"Effect of {s.get('treatment', 'treatment')} on {s.get('outcome', 'outcome')}"
            " (naive in grey)", src.model_label)


@compare("psm_summary", "forest", "matched effects of several models side by side",
         size=_forest_size)
def compare_forest(fig: Any, srcs: list, _v: Any) -> None:
    ax = fig.subplots()
    labels = unique_labels(srcs)
    forest(ax, list(zip(labels, [s.data for s in srcs], strict=True)),
           str(srcs[0].data.get("outcome", "outcome")))
    s = srcs[0].data
    C.title(fig, f"Effect of {s.get('treatment', 'treatment')} on {s.get('outcome', 'outcome')}",
            labels)


# ------------------------------------------------------------------ check against an experiment

CHECK_SERIES = (("naive", "naive (observational)", "0.55", "o"),
                ("matched", "matched (dolm-psm)", style.PALETTE[0], "D"),
                ("true", "true (experiment)", style.PALETTE[1], "s"))


def _check_size(src: Any, _v: Any) -> tuple[float, float]:
    return (8.0, max(4.0, 0.75 * len(src.data) + 2.0))


@figure("psm_check", "check", "naive and matched effects against the experiment's true effect, "
        "95% CI", size=_check_size)
def draw_check(fig: Any, src: Any, _v: Any) -> None:
    """One row per contrast x estimand; the matched CI should cover the true effect."""
    d = src.data.reset_index(drop=True)
    ax = fig.subplots()
    off = dict(zip([k for k, *_ in CHECK_SERIES], (-0.22, 0.0, 0.22), strict=True))
    for key, label, col, marker in CHECK_SERIES:
        for j, r in d.iterrows():
            est = r.get(key)
            if est is None or not np.isfinite(est):
                continue
            y = j + off[key]
            lo, hi = r.get(f"{key}_ci_low"), r.get(f"{key}_ci_high")
            if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi):
                ax.plot([lo, hi], [y, y], color=col, lw=2)
            ax.plot([est], [y], ls="", marker=marker, ms=6, color=col, label=label)
            if key == "matched":
                ax.annotate(f"{est:+.3f} (n={int(r['matched_n_sets'])})", (est, y),
                            xytext=(0, 6), textcoords="offset points", ha="center",
                            fontsize=7, color=col)
    labels = []
    for _, r in d.iterrows():
        covers = r.get("matched_ci_covers_true")
        mark = "" if covers is None or covers != covers else (" ✓" if covers else " ✗")
        labels.append(f"{r['contrast']}: {r['estimand']}{mark}")
    ax.axvline(0, color="0.4", lw=0.8)
    ax.set_yticks(range(len(d)))
    ax.set_yticklabels(labels)
    ax.set_ylim(-0.7, len(d) - 0.3)
    ax.invert_yaxis()
    outcome = str((src.meta.extra or {}).get("outcome", "the outcome")) if src.meta else "outcome"
    ax.set_xlabel(f"effect on {outcome} (estimate and 95% CI)")
    C.legend_unique(ax)
    C.title(fig, "Matching checked against the experiment (✓: matched CI covers the truth)",
            src.model_label)


# ------------------------------------------------------------------ unit tables

UNIT_OUTCOMES = ("correct", "exact_match", "target_logprob")
NOT_CONDITIONS = {"prompt_id", "unit_id", "group_id", "family", "split", "prompt", "target",
                  "foil", "cf_prompt", "cf_target", "cf_foil", "generation", "answer", "design",
                  "chain", "prompt_tokens", "n_tokens", *UNIT_OUTCOMES}
MAX_LEVELS = 6


def unit_conditions(df: Any) -> list[str]:
    """Columns that split the units into 2..6 groups (treatments, covariate levels)."""
    out = []
    for c in df.columns:
        if c in NOT_CONDITIONS or c.startswith(("attn_to.", "ps_", "choice_", "target_")):
            continue
        col = df[c]
        if col.dtype.kind == "f":
            continue
        if col.dtype.kind == "O" and not col.dropna().map(
                lambda v: isinstance(v, (str, bool, int, np.integer, np.bool_))).all():
            continue  # lists, arrays, dicts: not a grouping
        if 2 <= col.nunique(dropna=True) <= MAX_LEVELS:
            out.append(str(c))
    return out


def _unit_outcomes(df: Any) -> list[str]:
    return [c for c in UNIT_OUTCOMES if c in df.columns and df[c].notna().any()]


def _units_size(src: Any, _v: Any) -> tuple[float, float]:
    w, _ = C.panels_size(len(_unit_outcomes(src.data)), per=4.0)
    return (w, 4.4)


@figure("units", "by_condition", "mean outcome per level of each treatment or covariate "
        "(95% CI)", size=_units_size, when=lambda s: bool(_unit_outcomes(s.data))
        and bool(unit_conditions(s.data)), variants=lambda s: unit_conditions(s.data))
def draw_units(fig: Any, src: Any, condition: str) -> None:
    """Raw (unadjusted) means: in an observational design they mix treatment and confounding."""
    d = src.data
    outcomes = _unit_outcomes(d)
    axes = C.panel_grid(fig, len(outcomes))
    levels = sorted(d[condition].dropna().unique(), key=lambda v: (str(type(v)), v))
    for ax, outcome in zip(axes, outcomes, strict=True):
        g = d.groupby(condition)[outcome]
        mean, sem, n = g.mean(), g.sem(), g.count()
        x = np.arange(len(levels))
        m = np.array([mean.get(v, np.nan) for v in levels], dtype=float)
        e = 1.96 * np.nan_to_num(np.array([sem.get(v, np.nan) for v in levels], dtype=float))
        ax.bar(x, m, yerr=e, color=style.PALETTE[0], capsize=3, width=0.6)
        ax.set_xticks(x)
        ax.set_xticklabels([f"{v}\n{mi:.3g} (n={int(n.get(v, 0))})"
                            for v, mi in zip(levels, m, strict=True)], fontsize=8)
        ax.set_xlabel(condition)
        ax.set_ylabel(f"mean {outcome}")
        if outcome != "target_logprob":
            ax.set_ylim(0, 1.12)
        ax.axhline(0, color="0.6", lw=0.8)
    C.title(fig, f"Outcomes by {condition} ({len(d)} units; raw means, not adjusted)",
            src.model_label)
