"""Figures for ``attributions`` tables (dolm-dla: direct logit attribution at the last
prompt token).

Rows with ``in_total`` (embed, pos_embed, attn.L, mlp.L, bias.*) sum to the model's own
``metric_value``; head.L.H and attn_bias.L refine attn.L. The two-choice study columns
(attn_to_1/2, mlp_to_1/2, total_to_1/2, attn_mlp_ratio, decision_diff) are per layer and
repeat on every row of that layer. Values are averaged over prompts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from dolm_tools.plot import common as C
from dolm_tools.plot import style
from dolm_tools.plot.registry import compare, figure, unique_labels

SCHEMA = "attributions"
EMBED_KINDS = ("embed", "pos_embed")


def with_kind(df: Any) -> Any:
    """``_kind`` per row: the ``kind`` column, else the component's first part."""
    d = df.copy()
    if "kind" in d.columns and d["kind"].notna().all():
        d["_kind"] = d["kind"].astype(str)
    else:
        d["_kind"] = d["component"].astype(str).str.split(".").str[0]
    if "layer" not in d.columns or d["layer"].isna().all():
        part = d["component"].astype(str).str.split(".").str[1]
        d["layer"] = np.where(d["_kind"].isin(["attn", "mlp", "head"]), part, None)
    return d


def _partition(d: Any) -> Any:
    if "in_total" in d.columns:
        return d[d["in_total"].astype(bool)]
    return d[~d["_kind"].isin(["head", "attn_bias"])]


def layer_parts(df: Any) -> tuple[Any, float, float]:
    """Per-layer mean attention and MLP attribution, and the embedding and bias totals
    (means over prompts of the in-total components)."""
    d = _partition(with_kind(df))
    n = d["prompt_id"].nunique()
    sums = d.groupby(["_kind", "layer"], dropna=False)["value"].sum() / max(n, 1)
    sums = sums.reset_index()
    parts = sums[sums["_kind"].isin(["attn", "mlp"])].copy()
    parts["layer"] = parts["layer"].astype(int)
    table = parts.pivot_table(index="layer", columns="_kind", values="value", aggfunc="sum")
    table = table.reindex(columns=["attn", "mlp"]).fillna(0.0).sort_index()
    embed = float(sums.loc[sums["_kind"].isin(EMBED_KINDS), "value"].sum())
    bias = float(sums.loc[sums["_kind"] == "bias", "value"].sum())
    return table, embed, bias


def _has_layers(src: Any) -> bool:
    return C.has(src.data, "component", "value") and with_kind(src.data)["_kind"].isin(
        ["attn", "mlp"]).any()


def _metric(df: Any) -> str:
    if "metric" in df.columns and df["metric"].notna().any():
        m = str(df["metric"].dropna().iloc[0])
        return "logit(target) - logit(foil)" if m == "logit_diff" else "logit of the target"
    return "the logit"


@figure(SCHEMA, "stacked", "attention and MLP attribution per layer (stacked), with embeddings "
        "and biases, the running total and the model's own value", size="wide",
        when=_has_layers)
def draw_stacked(fig: Any, src: Any, _v: Any) -> None:
    df = src.data
    table, embed, bias = layer_parts(df)
    ax = fig.subplots()
    labels = ["embed"] + [f"L{i}" for i in table.index] + ["bias"]
    x = np.arange(len(labels))
    attn = np.r_[0, table["attn"].to_numpy(), 0]
    mlp = np.r_[0, table["mlp"].to_numpy(), 0]
    other = np.zeros(len(labels))
    other[0], other[-1] = embed, bias
    pos_base, neg_base = np.zeros(len(x)), np.zeros(len(x))
    for vals, col, name in ((other, "0.55", "embeddings / biases"),
                            (attn, style.PALETTE[0], "attention"),
                            (mlp, style.PALETTE[1], "MLP")):
        base = np.where(vals >= 0, pos_base, neg_base)
        ax.bar(x, vals, bottom=base, color=col, label=name, width=0.75)
        pos_base += np.where(vals >= 0, vals, 0)
        neg_base += np.where(vals < 0, vals, 0)
    total = np.cumsum(attn + mlp + other)
    ax.plot(x, total, "k-o", ms=3, lw=1.2, label="running total")
    if "metric_value" in df.columns and df["metric_value"].notna().any():
        actual = float(df.drop_duplicates("prompt_id")["metric_value"].mean())
        ax.plot([x[-1]], [actual], marker="D", ms=8, color=style.PALETTE[2], ls="",
                markeredgecolor="black", label=f"model's value ({actual:.3g})")
    ax.axhline(0, color="0.4", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=90 if len(labels) > 30 else 0)
    ax.set_xlabel("component")
    ax.set_ylabel(f"direct attribution to {_metric(df)}\n(mean over {C.n_prompts(df)} prompts)")
    ax.legend(frameon=False, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    C.title(fig, "Direct logit attribution by layer", src.model_label)


def head_grid(df: Any) -> Any:
    d = with_kind(df)
    d = d[d["_kind"] == "head"].copy()
    if "head" in d.columns and d["head"].notna().all() and d["layer"].notna().all():
        d["_layer"], d["_head"] = d["layer"].astype(int), d["head"].astype(int)
    else:
        parts = d["component"].astype(str).str.split(".")
        d["_layer"], d["_head"] = parts.str[1].astype(int), parts.str[2].astype(int)
    agg = C.mean_sem(d, ["_layer", "_head"])
    return C.pivot(agg, "_layer", "_head")


@figure(SCHEMA, "heads", "per-head attribution heatmap (layer x head)",
        when=lambda s: C.has(s.data, "component")
        and with_kind(s.data)["_kind"].eq("head").any())
def draw_heads(fig: Any, src: Any, _v: Any) -> None:
    g = head_grid(src.data)
    ax = fig.subplots()
    cmap, norm = style.signed_norm(g.to_numpy().ravel())
    im = C.heatmap(ax, g.to_numpy(), [int(c) for c in g.columns], [int(i) for i in g.index],
                   cmap, norm)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label=f"direct attribution to {_metric(src.data)}\n(mean over "
                 f"{C.n_prompts(src.data)} prompts)")
    C.title(fig, "Direct logit attribution per head", src.model_label)


# ------------------------------------------------------------------ two-choice study columns


def study_layers(df: Any) -> Any:
    """One row per prompt and layer with the study columns (None without them)."""
    cols = [c for c in ("attn_to_1", "attn_to_2", "mlp_to_1", "mlp_to_2", "decision_diff",
                        "attn_mlp_ratio") if c in df.columns]
    if "decision_diff" not in cols or not df["decision_diff"].notna().any():
        return None
    d = df.dropna(subset=["decision_diff", "layer"])
    return d.drop_duplicates(["prompt_id", "layer"])[["prompt_id", "layer", *cols]]


@figure(SCHEMA, "decision", "two-choice study: per-layer push toward choice 1 and the "
        "attention share of it", size="wide", when=lambda s: study_layers(s.data) is not None)
def draw_decision(fig: Any, src: Any, _v: Any) -> None:
    d = study_layers(src.data)
    ax1, ax2 = fig.subplots(1, 2)
    agg = C.mean_sem(d, ["layer"], "decision_diff").sort_values("layer")
    cols = [style.PALETTE[0] if m >= 0 else style.PALETTE[1] for m in agg["mean"]]
    ax1.bar(agg["layer"].astype(int), agg["mean"], yerr=agg["sem"], color=cols,
            error_kw={"lw": 0.8})
    ax1.axhline(0, color="0.4", lw=0.8)
    ax1.set_xlabel("layer")
    ax1.set_ylabel("decision_diff = total_to_1 - total_to_2 (mean ± SEM)")
    ax1.set_title("push toward choice 1 (blue) or choice 2 (orange)")
    if C.has(d, "attn_mlp_ratio"):
        r = C.mean_sem(d, ["layer"], "attn_mlp_ratio").sort_values("layer")
        C.sem_band(ax2, r["layer"], r["mean"], r["sem"], style.PALETTE[0],
                   "|attn_to_1| / (|attn_to_1| + |mlp_to_1|)")
        ax2.axhline(0.5, color="0.6", ls="--", lw=0.8)
        ax2.set_ylim(0, 1)
        ax2.legend(frameon=False, fontsize=8)
    else:
        C.no_data(ax2, "no attn_mlp_ratio column")
    ax2.set_xlabel("layer")
    ax2.set_ylabel("attention share (1 = attention, 0 = MLP)")
    ax2.set_title("attention vs MLP, per layer")
    C.title(fig, f"Choice attribution by layer ({C.n_prompts(d)} prompts)", src.model_label)


# ------------------------------------------------------------------ several models


def attn_share(df: Any) -> float | None:
    """Attention's share of the |attribution| over layers: from the study columns
    (attn_to_1, mlp_to_1) when present, else from the attn.L / mlp.L components."""
    d = study_layers(df)
    if d is not None and C.has(d, "attn_to_1", "mlp_to_1"):
        a = d.groupby("layer")["attn_to_1"].mean().abs().sum()
        m = d.groupby("layer")["mlp_to_1"].mean().abs().sum()
    else:
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
    ax.set_xlabel("share of |direct attribution| summed over layers")
    ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    C.title(fig, f"Attention vs MLP in the direct logit attribution, {C.how_many(srcs)}",
            labels)
