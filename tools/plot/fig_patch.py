"""Figures for ``patch_summary`` tables (dolm-patch's per-prompt summary of a grid)."""

from __future__ import annotations

from typing import Any

import numpy as np
from dolm_tools.plot import common as C
from dolm_tools.plot import style
from dolm_tools.plot.registry import compare, figure, unique_labels


def grids(df: Any) -> Any:
    """A label per grid: site kind, and window / kind / method where those vary."""
    d = df.copy()
    lab = d["grid"].astype(str)
    for col in ("kind", "method"):
        if col in d.columns and d[col].nunique() > 1:
            lab = lab + " · " + d[col].astype(str)
    if "window" in d.columns and d["window"].nunique(dropna=True) > 1:
        lab = lab + " · w" + d["window"].map(lambda v: "1" if v != v or v is None else
                                             str(int(v)))
    d["_grid"] = lab
    return d


@figure("patch_summary", "peaks", "where the per-prompt peaks lie, and how concentrated the "
        "effects are", size="wide", when=lambda s: C.has(s.data, "peak_layer"))
def draw_peaks(fig: Any, src: Any, _v: Any) -> None:
    d = grids(src.data)
    names = list(dict.fromkeys(d["_grid"]))
    ax1, ax2 = fig.subplots(1, 2)
    layers = sorted(int(x) for x in d["peak_layer"].dropna().unique())
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        sub = d[d["_grid"] == name]
        counts = sub["peak_layer"].dropna().astype(int).value_counts()
        x = np.arange(len(layers)) + (i - (len(names) - 1) / 2) * width
        ax1.bar(x, [int(counts.get(lay, 0)) for lay in layers], width, color=style.colour(i),
                label=name)
    ax1.set_xticks(range(len(layers)))
    ax1.set_xticklabels(layers)
    ax1.set_xlabel("layer of the peak cell")
    ax1.set_ylabel("prompts")
    ax1.set_title("peak layer per prompt")
    ax1.legend(frameon=False, title="grid", fontsize=8)
    cols = [c for c in ("gini_coefficient", "top5_concentration", "peak_value") if C.has(d, c)]
    x = np.arange(len(cols))
    for i, name in enumerate(names):
        sub = d[d["_grid"] == name]
        means = [sub[c].mean() for c in cols]
        sems = [sub[c].sem() if len(sub) > 1 else 0.0 for c in cols]
        ax2.bar(x + (i - (len(names) - 1) / 2) * width, means, width, yerr=sems,
                color=style.colour(i), label=name, error_kw={"lw": 0.8})
    ax2.set_xticks(x)
    ax2.set_xticklabels(["Gini of |effects|", "top-5 share", "recovery at peak"][: len(cols)]
                        if cols == ["gini_coefficient", "top5_concentration", "peak_value"]
                        else cols)
    ax2.set_ylabel("mean over prompts (± SEM)")
    ax2.set_title("concentration of the effect")
    ax2.axhline(0, color="0.5", lw=0.8)
    metric = ", ".join(sorted(set(d["metric"].astype(str))))
    C.title(fig, f"Patching summary over {C.n_prompts(d)} prompts ({metric})", src.model_label)


@compare("patch_summary", "peaks", "peak layer per prompt for several models",
         when=lambda s: C.has(s.data, "peak_layer"))
def compare_peaks(fig: Any, srcs: list, _v: Any) -> None:
    ax = fig.subplots()
    labels = unique_labels(srcs)
    data = []
    for src in srcs:
        d = src.data
        first = d["grid"].astype(str).iloc[0]
        data.append(d.loc[d["grid"].astype(str) == first, "peak_layer"].dropna().astype(float))
    rng = np.random.default_rng(0)  # fixed jitter: the same inputs give the same image
    for i, vals in enumerate(data):
        y = i + 1 + rng.uniform(-0.15, 0.15, len(vals))
        ax.scatter(vals, y, s=12, alpha=0.5, color=style.colour(i))
        if len(vals):
            ax.plot([vals.mean()], [i + 1], marker="|", ms=28, mew=3, color="black")
            ax.annotate(f"mean L{vals.mean():.1f}", (vals.mean(), i + 1), xytext=(0, 16),
                        textcoords="offset points", ha="center", fontsize=8)
    ax.set_yticks(range(1, len(srcs) + 1))
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xlabel("layer of the peak cell (per prompt)")
    ax.set_title(f"grid: {srcs[0].data['grid'].astype(str).iloc[0]}")
    C.title(fig, f"Peak layers, {C.how_many(srcs)}", labels)
