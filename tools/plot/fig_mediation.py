"""Figures for dolm-mediate files: the effect decomposition (ACME, ADE, total with CIs per
mediator) and the rho sensitivity curve.

Schemas ``mediation`` (one figure per method: statistical, interventional; averages where
given, else the effects at the control value), ``mediation_sensitivity`` and
``mediation_summary``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from dolm_tools.plot import common as C
from dolm_tools.plot import style
from dolm_tools.plot.registry import compare, figure, unique_labels

EFFECTS = "mediation"
SENSITIVITY = "mediation_sensitivity"
SUMMARY = "mediation_summary"
MAX_MEDIATORS = 12
PARTS = (("acme", "ACME (indirect)", 0), ("ade", "ADE (direct)", 1), ("total", "total", 7))


def part_rows(df: Any, which: str) -> Any:
    """Rows of one part (acme, ade, total): the average where given, else at control."""
    eff = df["effect"].astype(str)
    if which == "total":
        return df[eff == "total"]
    for suffix in ("average", "control", "treated"):
        d = df[eff == f"{which}_{suffix}"]
        if len(d):
            return d
    return df.iloc[:0]


def methods(src: Any) -> list[str]:
    if "method" not in src.data.columns:
        return [None]
    return list(dict.fromkeys(src.data["method"].astype(str)))


def _of_method(df: Any, method: str | None) -> Any:
    return df if method is None else df[df["method"].astype(str) == method]


def top_mediators(df: Any, n: int = MAX_MEDIATORS) -> list[str]:
    acme = part_rows(df, "acme")
    if acme.empty:
        return list(dict.fromkeys(df["mediator"].astype(str)))[:n]
    order = acme.assign(_a=acme["estimate"].abs()).sort_values("_a", ascending=False)
    return list(dict.fromkeys(order["mediator"].astype(str)))[:n]


def _size(src: Any, method: str | None) -> tuple[float, float]:
    n = len(top_mediators(_of_method(src.data, method)))
    return (8.0, max(4.0, 0.55 * n + 2.2))


def _intervals(ax: Any, y: Any, est: Any, lo: Any, hi: Any, col: str, label: str,
               filled: Any = None) -> None:
    est, lo, hi = (np.asarray(a, dtype=float) for a in (est, lo, hi))
    ax.hlines(y, lo, hi, color=col, lw=2)
    face = [col if f else "white" for f in (filled if filled is not None else [True] * len(y))]
    ax.scatter(est, y, s=36, color=face, edgecolors=col, zorder=3, label=label)


@figure(EFFECTS, "decomposition", "mediation decomposition: ACME, ADE and total effect per "
        "mediator (95% CI; hollow ACME = not significant after FDR), per method", size=_size,
        when=lambda s: C.has(s.data, "mediator", "effect", "estimate"), variants=methods)
def draw_decomposition(fig: Any, src: Any, method: str | None) -> None:
    df = _of_method(src.data, method)
    meds = top_mediators(df)
    ax = fig.subplots()
    y0 = np.arange(len(meds))
    offsets = {"acme": -0.22, "ade": 0.0, "total": 0.22}
    for which, label, ci in PARTS:
        d = part_rows(df, which).drop_duplicates("mediator").set_index("mediator")
        at = str(d["effect"].iloc[0]).split("_")[-1] if len(d) and which != "total" else ""
        if at in ("control", "treated"):
            label = f"{label}, at {at}"
        rows = [m for m in meds if m in d.index]
        if not rows:
            continue
        sub = d.loc[rows]
        y = np.array([meds.index(m) for m in rows]) + offsets[which]
        filled = sub["significant"].fillna(False).astype(bool).tolist() if which == "acme" \
            and "significant" in sub.columns else None
        _intervals(ax, y, sub["estimate"], sub["ci_low"], sub["ci_high"], style.colour(ci),
                   label, filled)
    ax.axvline(0, color="0.4", lw=0.8)
    ax.set_yticks(y0)
    ax.set_yticklabels([style.short(m, 32) for m in meds])
    ax.set_ylim(-0.7, len(meds) - 0.3)
    ax.invert_yaxis()
    ax.set_xlabel("effect on the outcome (estimate and 95% CI)")
    ax.set_ylabel("mediator" + (f" (top {len(meds)} by |ACME|)" if
                                df["mediator"].nunique() > len(meds) else ""))
    ax.legend(frameon=False, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12),
              ncol=3)
    how = f" ({method})" if method else ""
    C.title(fig, f"Mediation{how}: indirect (ACME), direct (ADE) and total effects",
            src.model_label)


def zero_crossing(rho: Any, acme: Any) -> float | None:
    """The rho at which the ACME changes sign (linear interpolation), None if it never does."""
    rho, acme = np.asarray(rho, dtype=float), np.asarray(acme, dtype=float)
    order = np.argsort(rho)
    rho, acme = rho[order], acme[order]
    for i in range(len(rho) - 1):
        a, b = acme[i], acme[i + 1]
        if a == 0:
            return float(rho[i])
        if a * b < 0:
            return float(rho[i] - a * (rho[i + 1] - rho[i]) / (b - a))
    return None


@figure(SENSITIVITY, "sensitivity", "sensitivity of the ACME to mediator-outcome confounding "
        "(rho), with the rho at which it vanishes",
        when=lambda s: C.has(s.data, "mediator", "rho", "acme"))
def draw_sensitivity(fig: Any, src: Any, _v: Any) -> None:
    df = src.data
    ax = fig.subplots()
    meds = list(dict.fromkeys(df["mediator"].astype(str)))
    if len(meds) > 6:  # the six with the largest ACME at rho = 0
        at0 = df.loc[(df["rho"] - 0).abs().groupby(df["mediator"]).idxmin()]
        meds = list(at0.assign(_a=at0["acme"].abs()).sort_values("_a", ascending=False)
                    ["mediator"].astype(str))[:6]
    for i, m in enumerate(meds):
        d = df[df["mediator"].astype(str) == m].sort_values("rho")
        col = style.colour(i)
        z = zero_crossing(d["rho"], d["acme"])
        label = f"{style.short(m, 30)}: ACME = 0 at rho {z:.2f}" if z is not None else \
            f"{style.short(m, 30)}: no sign change"
        ax.plot(d["rho"], d["acme"], color=col, lw=1.8, label=label)
        if z is not None:
            ax.plot([z], [0], marker="o", ms=7, color=col, markeredgecolor="black")
    ax.axhline(0, color="0.4", lw=0.8)
    ax.axvline(0, color="0.8", lw=0.8)
    ax.set_xlabel("rho: correlation of mediator and outcome model errors")
    ax.set_ylabel("ACME (average)")
    ax.legend(frameon=False, fontsize=8, loc="best")
    C.title(fig, "Mediation sensitivity analysis", src.model_label)


def _summary_rows(obj: dict) -> list[dict]:
    rows = [m for m in obj.get("mediators", []) if m.get("acme_average") is not None]
    rows.sort(key=lambda m: -abs(m["acme_average"]))
    return rows[:MAX_MEDIATORS]


def _summary_size(srcs: Any, _v: Any) -> tuple[float, float]:
    srcs = srcs if isinstance(srcs, list) else [srcs]
    n = max(len(_summary_rows(s.data)) for s in srcs)
    return (8.0, max(4.0, 0.5 * n * (1 + 0.3 * (len(srcs) - 1)) + 2.2))


def _acme_forest(ax: Any, labelled: list[tuple[str, dict]]) -> None:
    meds: list[str] = []
    for _, obj in labelled:
        meds += [m["mediator"] for m in _summary_rows(obj) if m["mediator"] not in meds]
    meds = meds[:MAX_MEDIATORS]
    n = len(labelled)
    off = np.linspace(-0.2, 0.2, n) if n > 1 else np.zeros(1)
    for i, (label, obj) in enumerate(labelled):
        rows = {m["mediator"]: m for m in obj.get("mediators", [])}
        have = [m for m in meds if m in rows and rows[m].get("acme_average") is not None]
        y = np.array([meds.index(m) for m in have]) + off[i]
        _intervals(ax, y, [rows[m]["acme_average"] for m in have],
                   [rows[m].get("ci_low", np.nan) for m in have],
                   [rows[m].get("ci_high", np.nan) for m in have], style.colour(i),
                   label or "ACME", [bool(rows[m].get("significant")) for m in have])
    ax.axvline(0, color="0.4", lw=0.8)
    ax.set_yticks(range(len(meds)))
    ax.set_yticklabels([style.short(m, 32) for m in meds])
    ax.set_ylim(-0.7, len(meds) - 0.3)
    ax.invert_yaxis()
    ax.set_xlabel("ACME (average; 95% CI; hollow = not significant after FDR)")
    ax.legend(frameon=False, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14),
              ncol=min(n, 4))


@figure(SUMMARY, "acme", "indirect effect (ACME) per mediator from the summary",
        size=_summary_size, when=lambda s: bool(_summary_rows(s.data)))
def draw_acme(fig: Any, src: Any, _v: Any) -> None:
    ax = fig.subplots()
    _acme_forest(ax, [("", src.data)])
    s = src.data
    what = f" of {s['treatment']} on {s['outcome']}" if s.get("treatment") else ""
    C.title(fig, f"Mediation{what}: ACME of {len(s.get('mediators', []))} mediator(s)",
            src.model_label)


@compare(SUMMARY, "acme", "ACME per mediator for several models",
         size=_summary_size, when=lambda s: bool(_summary_rows(s.data)))
def compare_acme(fig: Any, srcs: list, _v: Any) -> None:
    ax = fig.subplots()
    labels = unique_labels(srcs)
    _acme_forest(ax, list(zip(labels, [s.data for s in srcs], strict=True)))
    C.title(fig, "Mediation: ACME per mediator across models", labels)


# ------------------------------------------------------------------ statistical vs interventional

COMPARISON = "mediation_comparison"


def _comparison_size(src: Any, _v: Any) -> tuple[float, float]:
    d = src.data
    n_out = max(1, d["outcome"].nunique())
    w, _ = C.panels_size(n_out, per=4.6)
    return (w, max(4.0, 0.55 * d["site"].nunique() + 2.2))


@figure(COMPARISON, "methods", "indirect effect (ACME) per component: statistical vs "
        "interventional, 95% CI", size=_comparison_size)
def draw_methods(fig: Any, src: Any, _v: Any) -> None:
    """One panel per outcome (their scales differ); one row per site, one marker per method."""
    d = src.data
    outcomes = list(dict.fromkeys(d["outcome"].astype(str)))
    sites = sorted(dict.fromkeys(d["site"].astype(str)))
    axes = C.panel_grid(fig, len(outcomes), sharey=True)
    meths = list(dict.fromkeys(d["method"].astype(str)))
    off = np.linspace(-0.15, 0.15, len(meths)) if len(meths) > 1 else np.zeros(1)
    for ax, outcome in zip(axes, outcomes, strict=True):
        sub = d[d["outcome"].astype(str) == outcome]
        for i, m in enumerate(meths):
            col = style.colour(i)
            rows = sub[sub["method"].astype(str) == m].set_index("site")
            for j, site in enumerate(sites):
                if site not in rows.index:
                    continue
                r = rows.loc[site]
                est = r["acme_average"]
                if est is None or not np.isfinite(est):
                    continue
                y = j + off[i]
                lo, hi = r["acme_ci_low"], r["acme_ci_high"]
                if np.isfinite(lo) and np.isfinite(hi):
                    ax.plot([lo, hi], [y, y], color=col, lw=2)
                ax.plot([est], [y], ls="", marker="D", ms=6, color=col, label=m)
        ax.axvline(0, color="0.4", lw=0.8)
        ax.set_title(f"outcome: {outcome}")
        ax.set_xlabel("ACME (average) and 95% CI")
        ax.set_yticks(range(len(sites)))
        ax.set_yticklabels(sites)
        ax.set_ylim(-0.7, len(sites) - 0.3)
        C.legend_unique(ax)
    axes[0].invert_yaxis()
    C.title(fig, "Indirect effect through each component: statistical vs interventional",
            src.model_label)
