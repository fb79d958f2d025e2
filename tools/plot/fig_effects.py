"""Figures for ``effects`` tables (dolm-patch, dolm-ablate, dolm-steer, mediate).

Values are averaged over prompts (mean; bands and bars show the SEM across prompts).
Signed effects use a diverging colour map centred at 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from dolm_tools.plot import common as C
from dolm_tools.plot import style
from dolm_tools.plot.registry import compare, figure, unique_labels

PREFERRED_FAMILIES = ("resid_pre", "resid_post", "resid_mid", "attn_out", "mlp_out")


# ------------------------------------------------------------------ row selections


def _notna(df: Any, col: str) -> Any:
    return df[col].notna() if col in df.columns else np.zeros(len(df), dtype=bool)


def _isna(df: Any, col: str) -> Any:
    return df[col].isna() if col in df.columns else np.ones(len(df), dtype=bool)


def trace_rows(df: Any) -> Any:
    """Rows of a layer x position scan (no head, no steering strength)."""
    return df[_notna(df, "layer") & _notna(df, "position") & _isna(df, "head") & _isna(df, "alpha")]


def layer_rows(df: Any) -> Any:
    return df[_notna(df, "layer") & _isna(df, "head") & _isna(df, "alpha")]


def head_rows(df: Any) -> Any:
    return df[_notna(df, "layer") & _notna(df, "head") & _isna(df, "alpha")]


def ablation_rows(df: Any) -> Any:
    is_ablate = df["tool"].astype(str).eq("ablate")
    return df[(_notna(df, "component") | is_ablate) & _isna(df, "alpha")]


def steer_rows(df: Any) -> Any:
    return df[_notna(df, "alpha")]


def with_panels(df: Any) -> Any:
    """Add ``_panel``: the site family, and kind / window where those vary in the table."""
    import pandas as pd

    d = df.copy()
    if "site" in d.columns:
        label = d["site"].map(C.site_family).astype(str)
    else:
        label = pd.Series("", index=d.index)
    if "kind" in d.columns and d["kind"].nunique(dropna=True) > 1:
        label = label + " · " + d["kind"].fillna("").astype(str)
    if "window" in d.columns and d["window"].nunique(dropna=True) > 1:
        win = d["window"].map(lambda v: "" if v != v or v is None else f"window {int(v)}")
        label = label + " · " + win
    d["_panel"] = label.str.strip(" ·").replace("", "all sites")
    return d


def ordered_panels(d: Any) -> list[str]:
    names = list(dict.fromkeys(d["_panel"]))

    def key(name: str) -> tuple[int, str]:
        fam = name.split(" · ")[0]
        return (PREFERRED_FAMILIES.index(fam) if fam in PREFERRED_FAMILIES else 99, name)

    return sorted(names, key=key)


def panel_title(name: str, d: Any) -> str:
    """A panel's title; a bare ``head`` panel says which intervention it shows."""
    if name not in ("head", "all sites"):
        return name
    kinds = sorted(set(d["kind"].dropna().astype(str))) if "kind" in d.columns else []
    tools = sorted(set(d["tool"].astype(str)))
    return f"{', '.join(tools)}: {', '.join(kinds)}" if kinds else ", ".join(tools)


def _metrics_of(select):
    def variants(src: Any) -> list[str]:
        return C.metrics(select(src.data))

    return variants


def _n_panels(select):
    def size(src: Any, metric: str | None) -> tuple[float, float]:
        d = select(src.data)
        d = with_panels(d[d["metric"] == metric] if metric else d)
        return C.panels_size(len(set(d["_panel"])))

    return size


# ------------------------------------------------------------------ causal trace


def position_label(xs: list) -> str:
    return "token position (from the end)" if xs and max(xs) < 0 else "token position"


def trace_grid(d: Any) -> tuple[Any, list, list]:
    agg = C.mean_sem(d, ["layer", "position"])
    grid = C.pivot(agg, "layer", "position")
    return grid.to_numpy(), [int(c) for c in grid.columns], [int(i) for i in grid.index]


@figure("effects", "trace", "causal-trace heatmap (layer x position), mean over prompts",
        size=_n_panels(trace_rows), when=lambda s: len(trace_rows(s.data)) > 0,
        variants=_metrics_of(trace_rows))
def draw_trace(fig: Any, src: Any, metric: str) -> None:
    d = with_panels(trace_rows(src.data).query("metric == @metric"))
    names = ordered_panels(d)
    axes = C.panel_grid(fig, len(names))
    grids = {n: trace_grid(d[d["_panel"] == n]) for n in names}
    cmap, norm = style.signed_norm(np.concatenate([g[0].ravel() for g in grids.values()]))
    im = None
    for ax, name in zip(axes, names, strict=True):
        grid, xs, ys = grids[name]
        im = C.heatmap(ax, grid, xs, ys, cmap, norm, annotate=False)
        ax.set_title(name)
        ax.set_xlabel(position_label(xs))
        ax.set_ylabel("layer")
    fig.colorbar(im, ax=axes, label=f"mean {metric} ({C.n_prompts(d)} prompts)", shrink=0.9)
    tools = ", ".join(sorted(set(d["tool"].astype(str))))
    C.title(fig, f"Causal trace ({tools}): {metric} by layer and position", src.model_label)


# ------------------------------------------------------------------ per-layer curve


def layer_curve(d: Any) -> tuple[Any, str]:
    """Per-layer mean and SEM over prompts; at the peak position when there are positions."""
    note = ""
    if "position" in d.columns and d["position"].notna().any():
        agg = C.mean_sem(d, ["layer", "position"])
        best = agg.loc[agg["mean"].abs().idxmax(), "position"]
        d = d[d["position"] == best]
        note = f" at position {int(best)}"
    return C.mean_sem(d, ["layer"]).sort_values("layer"), note


def main_panel(d: Any) -> Any:
    """The rows of the most telling panel (residual stream first)."""
    d = with_panels(d)
    name = ordered_panels(d)[0]
    return d[d["_panel"] == name], name


@figure("effects", "layers", "per-layer effect curve with the peak layer marked",
        when=lambda s: len(layer_rows(s.data)) > 0, variants=_metrics_of(layer_rows))
def draw_layers(fig: Any, src: Any, metric: str) -> None:
    d = with_panels(layer_rows(src.data).query("metric == @metric"))
    ax = fig.subplots()
    for i, name in enumerate(ordered_panels(d)):
        agg, note = layer_curve(d[d["_panel"] == name])
        col = style.colour(i)
        C.sem_band(ax, agg["layer"], agg["mean"], agg["sem"], col, f"{name}{note}")
        j = C.mark_peak(ax, agg["layer"].to_numpy(), agg["mean"].to_numpy(), col, "")
        if j >= 0:
            ax.annotate(f"peak L{int(agg['layer'].iloc[j])}",
                        (agg["layer"].iloc[j], agg["mean"].iloc[j]), xytext=(6, 6),
                        textcoords="offset points", fontsize=8, color=col)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlabel("layer")
    C.integer_axis(ax)
    ax.set_ylabel(f"mean {metric} (± SEM, {C.n_prompts(d)} prompts)")
    ax.legend(loc="best", frameon=False)
    C.title(fig, f"Effect by layer: {metric}", src.model_label)


# ------------------------------------------------------------------ head maps


@figure("effects", "heads", "head map (layer x head), mean over prompts",
        size=_n_panels(head_rows), when=lambda s: len(head_rows(s.data)) > 0,
        variants=_metrics_of(head_rows))
def draw_heads(fig: Any, src: Any, metric: str) -> None:
    d = with_panels(head_rows(src.data).query("metric == @metric"))
    names = ordered_panels(d)
    axes = C.panel_grid(fig, len(names))
    grids = {}
    for n in names:
        agg = C.mean_sem(d[d["_panel"] == n], ["layer", "head"])
        grids[n] = C.pivot(agg, "layer", "head")
    cmap, norm = style.signed_norm(np.concatenate([g.to_numpy().ravel() for g in grids.values()]))
    im = None
    for ax, n in zip(axes, names, strict=True):
        g = grids[n]
        im = C.heatmap(ax, g.to_numpy(), [int(c) for c in g.columns], [int(i) for i in g.index],
                       cmap, norm)
        ax.set_title(panel_title(n, d[d["_panel"] == n]))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    fig.colorbar(im, ax=axes, label=f"mean {metric} ({C.n_prompts(d)} prompts)", shrink=0.9)
    C.title(fig, f"Heads: {metric} by layer and head", src.model_label)


# ------------------------------------------------------------------ ablation bars


def _bar_label(row: Any) -> str:
    comp = row.get("component")
    if comp is not None and comp == comp:
        return str(comp)
    return str(row.get("intervention"))


MAX_BARS = 25


def bars(fig: Any, d: Any, metric: str, ylabel: str) -> None:
    """Horizontal bars of the mean per ``_label`` (± SEM), the largest |mean| first."""
    if "kind" in d.columns and d["kind"].nunique(dropna=True) > 1:
        d = d.assign(_label=d["_label"] + " (" + d["kind"].astype(str) + ")")
    agg = C.mean_sem(d, ["_label"])
    agg = agg.reindex(agg["mean"].abs().sort_values(ascending=False).index).head(MAX_BARS)
    agg = agg.iloc[::-1]
    ax = fig.subplots()
    colours = [style.PALETTE[1] if m < 0 else style.PALETTE[0] for m in agg["mean"]]
    y = np.arange(len(agg))
    ax.barh(y, agg["mean"], xerr=agg["sem"], color=colours, error_kw={"lw": 0.8})
    ax.set_yticks(y)
    ax.set_yticklabels([style.short(s, 38) for s in agg["_label"]])
    ax.axvline(0, color="0.4", lw=0.8)
    n_all = d["_label"].nunique()
    shown = f"top {len(agg)} of {n_all}" if n_all > len(agg) else f"{len(agg)}"
    ax.set_xlabel(f"mean {metric} (± SEM, {C.n_prompts(d)} prompts)")
    ax.set_ylabel(f"{ylabel} ({shown}, by |effect|)")


@figure("effects", "ablation", "ablation bars: mean effect per component set (± SEM)",
        size="tall", when=lambda s: len(ablation_rows(s.data)) > 0,
        variants=_metrics_of(ablation_rows))
def draw_ablation(fig: Any, src: Any, metric: str) -> None:
    d = ablation_rows(src.data).query("metric == @metric").copy()
    d["_label"] = [_bar_label(r) for r in d.to_dict("records")]
    bars(fig, d, metric, "component set ablated")
    C.title(fig, f"Ablation: {metric} per component set", src.model_label)


def other_rows(df: Any) -> Any:
    """Rows no other effects figure draws (no layer, component or steering strength)."""
    return df[_isna(df, "layer") & _isna(df, "component") & _isna(df, "alpha")
              & ~df["tool"].astype(str).eq("ablate")]


@figure("effects", "interventions", "mean effect per intervention, for rows without layer, "
        "component or strength", size="tall", when=lambda s: len(other_rows(s.data)) > 0,
        variants=_metrics_of(other_rows))
def draw_interventions(fig: Any, src: Any, metric: str) -> None:
    d = other_rows(src.data).query("metric == @metric").copy()
    d["_label"] = d["intervention"].astype(str)
    bars(fig, d, metric, "intervention")
    tools = ", ".join(sorted(set(d["tool"].astype(str))))
    C.title(fig, f"Interventions ({tools}): {metric}", src.model_label)


# ------------------------------------------------------------------ steering


MAX_LINES = 8


def steer_lines(d: Any) -> Any:
    d = d.copy()
    parts = [d[c].astype(str) for c in ("site", "kind", "component") if c in d.columns
             and d[c].notna().any() and d[c].nunique() > 0]
    d["_line"] = parts[0] if parts else d["intervention"].astype(str)
    for p in parts[1:]:
        d["_line"] = d["_line"] + " " + p
    d["_line"] = d["_line"].str.replace(" None", "", regex=False)
    return d


@figure("effects", "dose_response", "steering dose-response: effect against strength alpha",
        when=lambda s: len(steer_rows(s.data)) > 0, variants=_metrics_of(steer_rows))
def draw_dose(fig: Any, src: Any, metric: str) -> None:
    d = steer_lines(steer_rows(src.data).query("metric == @metric"))
    agg = C.mean_sem(d, ["_line", "alpha"])
    strength = agg.groupby("_line")["mean"].apply(lambda s: s.abs().max())
    lines = strength.sort_values(ascending=False).index[:MAX_LINES]
    ax = fig.subplots()
    for i, line in enumerate(sorted(lines)):
        a = agg[agg["_line"] == line].sort_values("alpha")
        C.sem_band(ax, a["alpha"], a["mean"], a["sem"], style.colour(i), style.short(line, 40))
    ax.axhline(0, color="0.6", lw=0.8)
    ax.axvline(0, color="0.8", lw=0.8)
    ax.set_xlabel("steering strength alpha")
    ax.set_ylabel(f"mean {metric} (± SEM, {C.n_prompts(d)} prompts)")
    ax.legend(loc="best", frameon=False, title="site / kind")
    C.title(fig, f"Steering dose-response: {metric}", src.model_label)


# ------------------------------------------------------------------ several models


def _common_metrics(select):
    def variants(srcs: list) -> list[str]:
        sets = [C.metrics(select(s.data)) for s in srcs]
        return [m for m in sets[0] if all(m in s for s in sets[1:])]

    return variants


def _relative(srcs: list) -> bool:
    depths = {C.model_layers(s, s.data) for s in srcs}
    return len(depths) > 1


@compare("effects", "layers", "per-layer curves of several models overlaid, peaks marked",
         when=lambda s: len(layer_rows(s.data)) > 0,
         variants=_common_metrics(layer_rows))
def compare_layers(fig: Any, srcs: list, metric: str) -> None:
    ax = fig.subplots()
    labels = unique_labels(srcs)
    rel = _relative(srcs)
    panel = ""
    for i, src in enumerate(srcs):
        d, panel = main_panel(layer_rows(src.data).query("metric == @metric"))
        agg, note = layer_curve(d)
        x = agg["layer"].to_numpy(dtype=float)
        depth = C.model_layers(src, src.data) or 1
        if rel:
            x = x / max(depth - 1, 1)
        j = int(np.nanargmax(np.abs(agg["mean"].to_numpy()))) if len(agg) else 0
        peak = int(agg["layer"].iloc[j]) if len(agg) else -1
        col = style.colour(i)
        C.sem_band(ax, x, agg["mean"], agg["sem"], col, f"{labels[i]}: peak L{peak}{note}")
        ax.plot([x[j]], [agg["mean"].iloc[j]], marker="*", ms=14, color=col,
                markeredgecolor="white", zorder=5)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlabel("relative depth (layer / last layer)" if rel else "layer")
    ax.set_ylabel(f"mean {metric} ({panel})")
    ax.legend(loc="best", frameon=False)
    C.title(fig, f"Effect by layer, {C.how_many(srcs)}: {metric}{prompt_note(srcs)}", labels)


@compare("effects", "trace", "causal traces of several models side by side",
         size=lambda g, v: C.panels_size(len(g), max_cols=4),
         when=lambda s: len(trace_rows(s.data)) > 0,
         variants=_common_metrics(trace_rows))
def compare_trace(fig: Any, srcs: list, metric: str) -> None:
    axes = C.panel_grid(fig, len(srcs), max_cols=4)
    grids = []
    for src in srcs:
        d, panel = main_panel(trace_rows(src.data).query("metric == @metric"))
        grids.append((trace_grid(d), panel))
    cmap, norm = style.signed_norm(np.concatenate([g[0][0].ravel() for g in grids]))
    im = None
    labels = unique_labels(srcs)
    for ax, label, ((grid, xs, ys), panel) in zip(axes, labels, grids, strict=True):
        im = C.heatmap(ax, grid, xs, ys, cmap, norm, annotate=False)
        ax.set_title(f"{label} ({panel})")
        ax.set_xlabel(position_label(xs))
        ax.set_ylabel("layer")
    fig.colorbar(im, ax=axes, label=f"mean {metric}", shrink=0.9)
    C.title(fig, f"Causal traces side by side: {metric}{prompt_note(srcs)}", labels)


def prompt_note(srcs: list) -> str:
    """' (prompt sets differ)' when the files were not run on the same prompts."""
    sets = [frozenset(s.data["prompt_id"].astype(str)) for s in srcs]
    return "" if len(set(sets)) == 1 else " (prompt sets differ)"


def attn_mlp_share(df: Any) -> float | None:
    """Share of |effect| carried by attention outputs vs MLP outputs (summed over layers)."""
    d = layer_rows(df).copy()
    d["_fam"] = d["site"].map(C.site_family) if "site" in d.columns else ""
    agg = C.mean_sem(d, ["_fam", "layer"])
    attn = agg.loc[agg["_fam"] == "attn_out", "mean"].abs().sum()
    mlp = agg.loc[agg["_fam"] == "mlp_out", "mean"].abs().sum()
    return None if attn + mlp == 0 else float(attn / (attn + mlp))


@compare("effects", "summary", "peak layer and attention-vs-MLP share per model",
         size="wide", when=lambda s: len(layer_rows(s.data)) > 0,
         variants=_common_metrics(layer_rows))
def compare_summary(fig: Any, srcs: list, metric: str) -> None:
    ax1, ax2 = fig.subplots(1, 2)
    labels = unique_labels(srcs)
    peaks, rel, shares = [], [], []
    for src in srcs:
        d = layer_rows(src.data).query("metric == @metric")
        agg, _ = layer_curve(main_panel(d)[0])
        j = int(np.nanargmax(np.abs(agg["mean"].to_numpy())))
        peak = int(agg["layer"].iloc[j])
        depth = C.model_layers(src, src.data) or peak + 1
        peaks.append(peak)
        rel.append(peak / max(depth - 1, 1))
        shares.append(attn_mlp_share(d))
    y = np.arange(len(srcs))
    ax1.barh(y, peaks, color=[style.colour(i) for i in range(len(srcs))])
    for yi, p, r in zip(y, peaks, rel, strict=True):
        ax1.text(p, yi, f"  L{p} ({r:.0%} depth)", va="center", fontsize=8)
    ax1.set_yticks(y)
    ax1.set_yticklabels(labels)
    ax1.set_xlabel("peak layer (largest |mean effect|)")
    ax1.set_xlim(0, max(peaks) * 1.5 + 1)
    ax1.invert_yaxis()
    ax1.set_title("peak layer")
    if any(s is not None for s in shares):
        att = [s if s is not None else np.nan for s in shares]
        ax2.barh(y, att, color=style.PALETTE[0], label="attention (attn_out)")
        ax2.barh(y, [1 - a if a == a else np.nan for a in att], left=att,
                 color=style.PALETTE[1], label="MLP (mlp_out)")
        ax2.set_xlim(0, 1)
        ax2.set_yticks(y)
        ax2.set_yticklabels(labels)
        ax2.set_xlabel("share of |effect| summed over layers")
        ax2.invert_yaxis()
        ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    else:
        C.no_data(ax2, "no attn_out / mlp_out sites in these files")
    ax2.set_title("attention vs MLP")
    C.title(fig, f"Comparison of {C.how_many(srcs)}: {metric}{prompt_note(srcs)}", labels)
