"""Figures for direct-logit-attribution tables (dolm-dla).

Written against the planned columns: prompt_id, component (embed, attn.L, mlp.L, head.L.H,
bias), layer, head, kind, value, plus the study columns attn_to_1, mlp_to_1, total_to_1,
attn_mlp_ratio, decision_diff. Values are averaged over prompts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from dolm_tools.plot import common as C
from dolm_tools.plot import style
from dolm_tools.plot.registry import compare, figure, unique_labels

SCHEMA = "attributions"


def with_type(df: Any) -> Any:
    d = df.copy()
    d["_type"] = d["component"].astype(str).str.split(".").str[0]
    return d


def layer_parts(df: Any) -> tuple[Any, float, float]:
    """Per-layer mean attention and MLP attribution, and the embed and bias totals."""
    d = with_type(df)
    per_prompt = d.groupby(["prompt_id", "component", "_type"], dropna=False)["value"].sum()
    per_prompt = per_prompt.reset_index()
    mean = per_prompt.groupby(["component", "_type"])["value"].mean().reset_index()
    layer = mean["component"].str.split(".").str[1]
    mean["_layer"] = np.where(mean["_type"].isin(["attn", "mlp"]), layer, None)
    parts = mean[mean["_type"].isin(["attn", "mlp"])].copy()
    parts["_layer"] = parts["_layer"].astype(int)
    table = parts.pivot_table(index="_layer", columns="_type", values="value", aggfunc="sum")
    table = table.reindex(columns=["attn", "mlp"]).fillna(0.0).sort_index()
    embed = float(mean.loc[mean["_type"] == "embed", "value"].sum())
    bias = float(mean.loc[mean["_type"] == "bias", "value"].sum())
    return table, embed, bias


def _has_layers(src: Any) -> bool:
    return C.has(src.data, "component", "value") and with_type(src.data)["_type"].isin(
        ["attn", "mlp"]).any()


@figure(SCHEMA, "stacked", "attention and MLP attribution per layer (stacked), with embed/bias",
        size="wide", when=_has_layers)
def draw_stacked(fig: Any, src: Any, _v: Any) -> None:
    table, embed, bias = layer_parts(src.data)
    ax = fig.subplots()
    labels = ["embed"] + [f"L{i}" for i in table.index] + ["bias"]
    x = np.arange(len(labels))
    attn = np.r_[0, table["attn"].to_numpy(), 0]
    mlp = np.r_[0, table["mlp"].to_numpy(), 0]
    other = np.zeros(len(labels))
    other[0], other[-1] = embed, bias
    pos_base, neg_base = np.zeros(len(x)), np.zeros(len(x))
    for vals, col, name in ((other, "0.55", "embed / bias"), (attn, style.PALETTE[0],
                            "attention"), (mlp, style.PALETTE[1], "MLP")):
        base = np.where(vals >= 0, pos_base, neg_base)
        ax.bar(x, vals, bottom=base, color=col, label=name, width=0.75)
        pos_base += np.where(vals >= 0, vals, 0)
        neg_base += np.where(vals < 0, vals, 0)
    total = np.cumsum(attn + mlp + other)
    ax.plot(x, total, "k-o", ms=3, lw=1.2, label="running total")
    ax.axhline(0, color="0.4", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=90 if len(labels) > 30 else 0)
    ax.set_xlabel("component")
    ax.set_ylabel(f"mean direct logit attribution ({C.n_prompts(src.data)} prompts)")
    ax.legend(frameon=False, ncol=4, loc="best")
    C.title(fig, "Direct logit attribution by layer", src.model_label)


def head_grid(df: Any) -> Any:
    d = with_type(df)
    d = d[d["_type"] == "head"].copy()
    parts = d["component"].str.split(".")
    d["_layer"] = parts.str[1].astype(int)
    d["_head"] = parts.str[2].astype(int)
    agg = C.mean_sem(d, ["_layer", "_head"])
    return C.pivot(agg, "_layer", "_head")


@figure(SCHEMA, "heads", "per-head attribution heatmap (layer x head)",
        when=lambda s: C.has(s.data, "component")
        and with_type(s.data)["_type"].eq("head").any())
def draw_heads(fig: Any, src: Any, _v: Any) -> None:
    g = head_grid(src.data)
    ax = fig.subplots()
    cmap, norm = style.signed_norm(g.to_numpy().ravel())
    im = C.heatmap(ax, g.to_numpy(), [int(c) for c in g.columns], [int(i) for i in g.index],
                   cmap, norm)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label=f"mean direct logit attribution ({C.n_prompts(src.data)} "
                 "prompts)")
    C.title(fig, "Direct logit attribution per head", src.model_label)


def attn_share(df: Any) -> float | None:
    table, _, _ = layer_parts(df)
    a, m = table["attn"].abs().sum(), table["mlp"].abs().sum()
    return None if a + m == 0 else float(a / (a + m))


@compare(SCHEMA, "share", "attention-vs-MLP share of the attribution per model",
         when=_has_layers)
def compare_share(fig: Any, srcs: list, _v: Any) -> None:
    ax = fig.subplots()
    labels = unique_labels(srcs)
    y = np.arange(len(srcs))
    shares = np.array([attn_share(s.data) or np.nan for s in srcs])
    ax.barh(y, shares, color=style.PALETTE[0], label="attention")
    ax.barh(y, 1 - shares, left=shares, color=style.PALETTE[1], label="MLP")
    for yi, s in zip(y, shares, strict=True):
        if s == s:
            ax.text(s / 2, yi, f"{s:.0%}", ha="center", va="center", color="white")
    ax.set_yticks(y)
    ax.set_yticklabels(labels)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("share of |attribution| summed over layers")
    ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    C.title(fig, "Attention vs MLP in the direct logit attribution", labels)
