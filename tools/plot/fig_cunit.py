"""Figures for dolm-train-cunit files: training history and scores (``cunit_metrics``),
and a look at a variable table (``variables``: correlations, regimes)."""

from __future__ import annotations

from typing import Any

import numpy as np
from dolm_tools.plot import common as C
from dolm_tools.plot import style
from dolm_tools.plot.registry import compare, figure, unique_labels

HISTORY_PANELS = (
    (("train_nll", "val_nll"), "negative log-likelihood per row", "linear"),
    (("h",), "acyclicity penalty h(W)", "log"),
    (("edges",), "edges in the graph", "linear"),
    (("temperature", "rho"), "temperature / penalty weight rho", "log"),
)
UNIT_METRICS = ("f1", "precision", "tpr", "fdr", "cf_corr")
METRIC_NAMES = {"f1": "F1", "precision": "precision", "tpr": "TPR (recall)", "fdr": "FDR",
                "cf_corr": "counterfactual corr"}


def _group(df: Any, group: str) -> Any:
    return df[df["group"].astype(str) == group]


@figure("cunit_metrics", "history", "training history: likelihood, acyclicity, edges",
        size=(10.0, 7.0), when=lambda s: len(_group(s.data, "history")) > 0)
def draw_history(fig: Any, src: Any, _v: Any) -> None:
    h = _group(src.data, "history").dropna(subset=["step"])
    axes = C.panel_grid(fig, 4, max_cols=2)
    for ax, (names, label, scale) in zip(axes, HISTORY_PANELS, strict=True):
        drawn = False
        for i, name in enumerate(names):
            d = h[h["metric"] == name].sort_values("step")
            if d.empty or d["value"].isna().all():
                continue
            y = d["value"].to_numpy(dtype=float)
            if scale == "log" and np.all(y[np.isfinite(y)] > 0):
                ax.set_yscale("log")
            ax.plot(d["step"].astype(int), y, "-o", ms=3.5, color=style.colour(i), label=name)
            drawn = True
        if not drawn:
            C.no_data(ax, f"no {', '.join(names)} in the history")
        else:
            ax.legend(frameon=False, fontsize=8)
        ax.set_xlabel("training round")
        ax.set_ylabel(label)
        C.integer_axis(ax)
    C.title(fig, "Causal-unit network: training history", src_label(src))


def src_label(src: Any) -> str:
    """cunit fits use no language model: name the file's data instead."""
    if src.model:
        return src.model_label
    chain = src.meta.provenance if src.meta is not None else []
    ins = chain[-1].get("inputs") if chain else None
    data = ins[0].get("path") if ins else None
    return f"none (fit to {data})" if data else "none"


def _scores(df: Any) -> dict[str, float]:
    d = df[df["metric"].isin(UNIT_METRICS) & df["group"].isin(["structure", "counterfactual"])]
    return {m: float(v) for m, v in zip(d["metric"], d["value"], strict=True) if v == v}


@figure("cunit_metrics", "scores", "structure recovery, counterfactual accuracy and held-out "
        "interventional likelihood", size="wide",
        when=lambda s: bool(_scores(s.data)) or len(_group(s.data, "likelihood")) > 0)
def draw_scores(fig: Any, src: Any, _v: Any) -> None:
    df = src.data
    ax1, ax2 = fig.subplots(1, 2)
    scores = _scores(df)
    if scores:
        names = [m for m in UNIT_METRICS if m in scores]
        x = np.arange(len(names))
        ax1.bar(x, [scores[m] for m in names],
                color=[style.colour(0 if m != "fdr" else 1) for m in names])
        for xi, m in zip(x, names, strict=True):
            ax1.text(xi, scores[m], f"{scores[m]:.2f}", ha="center", va="bottom", fontsize=9)
        ax1.set_xticks(x)
        ax1.set_xticklabels([METRIC_NAMES[m] for m in names])
        ax1.set_ylim(0, 1.12)
        extra = {r.metric: r.value for r in _group(df, "structure").itertuples()
                 if r.metric in ("shd", "n_edges_true", "n_edges_pred", "n_reversed")}
        note = ", ".join(f"{k} {v:g}" for k, v in extra.items() if v == v)
        ax1.set_title(f"structure and counterfactuals\n{note}" if note else
                      "structure and counterfactuals", fontsize=10)
    else:
        C.no_data(ax1, "no true graph: structure metrics not computed")
    ax1.set_ylabel("score")
    lik = _group(df, "likelihood").dropna(subset=["value"])
    if len(lik):
        regimes = [str(r) for r in lik["regime"]]
        y = np.arange(len(regimes))
        ax2.barh(y, lik["value"], color=style.PALETTE[2])
        ax2.set_yticks(y)
        ax2.set_yticklabels(regimes)
        ax2.invert_yaxis()
        ax2.set_xlabel("interventional NLL per row (held out; lower is better)")
        ax2.set_ylabel("regime")
    else:
        C.no_data(ax2, "no held-out regimes: likelihood not computed")
    ax2.set_title("held-out likelihood")
    C.title(fig, "Causal-unit network: how well the graph was learned", src_label(src))


@compare("cunit_metrics", "scores", "structure and counterfactual scores of several fits",
         when=lambda s: bool(_scores(s.data)))
def compare_scores(fig: Any, srcs: list, _v: Any) -> None:
    ax = fig.subplots()
    labels = unique_labels(srcs)
    names = [m for m in UNIT_METRICS if any(m in _scores(s.data) for s in srcs)]
    x = np.arange(len(names))
    width = 0.8 / len(srcs)
    for i, (src, label) in enumerate(zip(srcs, labels, strict=True)):
        sc = _scores(src.data)
        ax.bar(x + (i - (len(srcs) - 1) / 2) * width, [sc.get(m, np.nan) for m in names],
               width, color=style.colour(i), label=label)
    ax.set_xticks(x)
    ax.set_xticklabels([METRIC_NAMES[m] for m in names])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("score")
    ax.legend(frameon=False, fontsize=8)
    C.title(fig, f"Causal-unit fits compared ({len(srcs)} files)", labels,
            key="model" if any(s.model for s in srcs) else "files")


# ------------------------------------------------------------------ variable tables

BOOKKEEPING = {"target", "regime", "split"}


def variable_columns(df: Any) -> list[str]:
    import pandas as pd

    return [c for c in df.columns if c not in BOOKKEEPING
            and pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]


@figure("variables", "overview", "variable correlations (observational rows) and regime sizes",
        size="wide", when=lambda s: len(variable_columns(s.data)) >= 2)
def draw_variables(fig: Any, src: Any, _v: Any) -> None:
    df = src.data
    cols = variable_columns(df)[:30]
    ax1, ax2 = fig.subplots(1, 2)
    obs = df
    if "target" in df.columns:
        t = df["target"].fillna("").astype(str)
        if (t == "").any():
            obs = df[t == ""]
    corr = obs[cols].corr().to_numpy()
    from matplotlib.colors import TwoSlopeNorm

    im = C.heatmap(ax1, corr, cols, cols, style.DIVERGING, TwoSlopeNorm(0, -1, 1),
                   annotate=len(cols) <= 10)
    ax1.invert_yaxis()
    ax1.set_title(f"correlation, {len(obs)} observational rows")
    fig.colorbar(im, ax=ax1, shrink=0.85, label="Pearson correlation")
    key = "regime" if C.has(df, "regime") else "target" if "target" in df.columns else None
    if key:
        counts = df[key].fillna("").astype(str).replace("", "obs").value_counts().sort_index()
        y = np.arange(len(counts))
        ax2.barh(y, counts.to_numpy(), color=style.PALETTE[0])
        ax2.set_yticks(y)
        ax2.set_yticklabels(counts.index)
        ax2.invert_yaxis()
        ax2.set_xlabel("rows")
        ax2.set_title("rows per regime")
    else:
        C.no_data(ax2, "no regime / target column: observational data")
    C.title(fig, f"Variable table: {len(cols)} variables, {len(df)} rows", src_label(src))
