"""Figures for dolm-steer fit outputs: where a label is linearly decodable (``probes``)
and the fitted ``directions`` (held-out scores and raw norms per site, from the
safetensors metadata; plot never loads the tensors)."""

from __future__ import annotations

from typing import Any

import numpy as np
from dolm_tools.plot import common as C
from dolm_tools.plot import style
from dolm_tools.plot.registry import compare, figure, unique_labels


def site_order(sites: Any) -> list[str]:
    """Sites by layer (then name); sites without a layer keep their order at the end."""
    def key(s: str) -> tuple[int, str]:
        parts = str(s).split(".")
        return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 10**6, str(s))

    return sorted(dict.fromkeys(str(s) for s in sites), key=key)


def _x(d: Any, order: list[str]) -> Any:
    if "layer" in d.columns and d["layer"].notna().all():
        return d["layer"].astype(int).to_numpy()
    return np.array([order.index(str(s)) for s in d["site"]])


@figure("probes", "localisation", "held-out probe scores per site: where the label is "
        "linearly decodable (best site starred)")
def draw_probes(fig: Any, src: Any, _v: Any) -> None:
    df = src.data
    ax = fig.subplots()
    order = site_order(df["site"])
    by_layer = "layer" in df.columns and df["layer"].notna().all()
    held = [m for m in dict.fromkeys(df["metric"].astype(str)) if not m.startswith("train_")]
    for i, metric in enumerate(held):
        for method in dict.fromkeys(df["method"].astype(str)):
            d = df[(df["metric"] == metric) & (df["method"] == method)]
            if d.empty:
                continue
            d = d.assign(_x=_x(d, order)).sort_values("_x")
            col = style.colour(i)
            label = f"{metric} ({method})" if df["method"].nunique() > 1 else metric
            ax.plot(d["_x"], d["value"], "-o", ms=4, color=col, label=label)
            train = df[(df["metric"] == f"train_{metric}") & (df["method"] == method)]
            if len(train):
                train = train.assign(_x=_x(train, order)).sort_values("_x")
                ax.plot(train["_x"], train["value"], ":", color=col, lw=1,
                        label=f"{label}, training rows")
            best = d[d["best"].astype(bool)] if "best" in d.columns else d.iloc[:0]
            if len(best):
                ax.plot(best["_x"], best["value"], marker="*", ms=15, color=col, ls="",
                        markeredgecolor="black", zorder=5)
    if not by_layer:
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels(order, rotation=45, ha="right")
    ax.set_xlabel("layer" if by_layer else "site")
    ax.set_ylabel("held-out score")
    ax.legend(frameon=False, fontsize=8)
    lab = df["label"].dropna().astype(str) if "label" in df.columns else []
    what = f" of '{lab.iloc[0]}'" if len(lab) else ""
    n = f"{int(df['n_train'].iloc[0])} train / {int(df['n_test'].iloc[0])} test rows"
    C.title(fig, f"Probing{what} by site ({n}; ★ best site)", src.model_label)


@compare("probes", "localisation", "held-out probe score by relative depth, per model",
         when=lambda s: "layer" in s.data.columns and s.data["layer"].notna().all())
def compare_probes(fig: Any, srcs: list, _v: Any) -> None:
    ax = fig.subplots()
    labels = unique_labels(srcs)
    metric = str(srcs[0].data.loc[~srcs[0].data["metric"].astype(str).str.startswith(
        "train_"), "metric"].iloc[0])
    for i, (src, label) in enumerate(zip(srcs, labels, strict=True)):
        d = src.data[src.data["metric"] == metric].sort_values("layer")
        if d.empty:
            continue
        depth = C.model_layers(src, src.data) or int(d["layer"].max()) + 1
        x = d["layer"].to_numpy(dtype=float) / max(depth - 1, 1)
        ax.plot(x, d["value"], "-o", ms=4, color=style.colour(i), label=label)
        best = d["best"].astype(bool).to_numpy()
        ax.plot(x[best], d["value"].to_numpy()[best], marker="*", ms=15, ls="",
                color=style.colour(i), markeredgecolor="black")
    ax.set_xlabel("relative depth (layer / last layer)")
    ax.set_ylabel(f"held-out {metric}")
    ax.legend(frameon=False, fontsize=8)
    C.title(fig, f"Probing by depth, {C.how_many(srcs)}", labels)


def _directions(src: Any) -> dict:
    return src.data or {}


@figure("directions", "sites", "fitted directions: held-out score and raw norm per site",
        size="wide", when=lambda s: bool(_directions(s).get("norms")))
def draw_directions(fig: Any, src: Any, _v: Any) -> None:
    ex = _directions(src)
    norms = ex.get("norms") or {}
    order = site_order(norms)
    x = np.arange(len(order))
    ax1, ax2 = fig.subplots(1, 2)
    scores = ex.get("scores") or {}
    metrics = list(dict.fromkeys(m for s in scores.values() for m in s
                                 if not str(m).startswith("train_")))
    for i, m in enumerate(metrics):
        vals = [scores.get(s, {}).get(m, np.nan) for s in order]
        ax1.plot(x, vals, "-o", ms=4, color=style.colour(i), label=m)
    best = ex.get("best_site")
    if best in order:
        for ax in (ax1, ax2):
            ax.axvline(order.index(best), color="0.5", ls="--", lw=1)
    if metrics:
        ax1.legend(frameon=False, fontsize=8)
        ax1.set_ylabel("held-out score")
    else:
        C.no_data(ax1, f"no probe scores (method {ex.get('method', '?')})")
    ax1.set_title(f"held-out score (dashed: best site {best})" if best else "held-out score")
    ax2.bar(x, [norms[s] for s in order], color=style.PALETTE[2])
    ax2.set_ylabel("norm of the raw direction")
    ax2.set_title("raw norm per site (directions are stored unit-norm)")
    for ax in (ax1, ax2):
        ax.set_xticks(x)
        ax.set_xticklabels(order, rotation=45 if len(order) > 6 else 0,
                           ha="right" if len(order) > 6 else "center")
        ax.set_xlabel("site")
    label = ex.get("label")
    what = f" for '{label}'" if label else ""
    C.title(fig, f"Steering directions ({ex.get('method', '?')}){what}", src.model_label)
