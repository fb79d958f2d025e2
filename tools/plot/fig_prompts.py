"""Figures for ``prompts`` and ``outcomes`` tables, and the two joined on ``prompt_id``
(accuracy per family; the evidence sweep of the bayes family against the exact Bayes
posterior)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from dolm_tools.plot import common as C
from dolm_tools.plot import style
from dolm_tools.plot.registry import combo, compare, figure, unique_labels

ATTN_RE = re.compile(r"^attn_to\.(?P<span>[^.]+)\.L(?P<layer>\d+)\.H(?P<head>\d+)$")


# ------------------------------------------------------------------ prompts


@figure("prompts", "overview", "prompts per family and split; prompt lengths", size="wide")
def draw_prompts(fig: Any, src: Any, _v: Any) -> None:
    df = src.data
    bayes = C.has(df, "posterior_x", "n_x")
    axes = fig.subplots(1, 3 if bayes else 2)
    ax = axes[0]
    counts = df.groupby(["family", "split"]).size().unstack(fill_value=0) if "split" in \
        df.columns else df.groupby("family").size().to_frame("all")
    left = np.zeros(len(counts))
    y = np.arange(len(counts))
    for i, split in enumerate(counts.columns):
        ax.barh(y, counts[split], left=left, height=0.6, color=style.colour(i), label=str(split))
        left += counts[split].to_numpy()
    ax.set_yticks(y)
    ax.set_yticklabels(counts.index)
    ax.set_ylim(-0.7, len(counts) - 0.3)
    ax.invert_yaxis()
    ax.set_xlabel("prompts")
    ax.set_ylabel("family")
    ax.legend(title="split", frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.14),
              ncol=len(counts.columns))
    ax.set_title(f"{len(df)} prompts")
    ax = axes[1]
    lengths = df["prompt"].astype(str).str.len()
    lo, hi = int(lengths.min()), int(lengths.max())
    bins = np.arange(lo, hi + 2) - 0.5 if hi - lo < 30 else 30
    for i, (fam, sub) in enumerate(df.assign(_len=lengths).groupby("family")):
        ax.hist(sub["_len"], bins=bins, alpha=0.6, color=style.colour(i), label=str(fam))
    C.integer_axis(ax, "x")
    C.integer_axis(ax, "y")
    ax.set_xlabel("prompt length (characters)")
    ax.set_ylabel("prompts")
    ax.legend(frameon=False)
    ax.set_title("prompt lengths")
    if bayes:
        ax = axes[2]
        d = df.dropna(subset=["posterior_x", "n_x"])
        tpl = d["template"].astype(str) if "template" in d.columns else "all"
        for i, (name, sub) in enumerate(d.assign(_tpl=tpl).groupby("_tpl")):
            agg = sub.groupby("n_x")["posterior_x"].mean()
            ax.plot(agg.index, agg.to_numpy(), "--o", ms=3, color=style.colour(i),
                    label=str(name))
        ax.legend(frameon=False, title="template", fontsize=8)
        C.integer_axis(ax, "x")
        ax.set_xlabel("X draws in the prompt (n_x)")
        ax.set_ylabel("P(next = X), exact Bayes")
        ax.set_ylim(0, 1)
        ax.set_title("bayes: truth by evidence")
    C.title(fig, "Prompt table", src.model_label)


# ------------------------------------------------------------------ outcomes


def choice_p0(df: Any) -> Any:
    """P(first choice) per row from ``choice_probs`` (NaN where absent)."""
    return df["choice_probs"].map(
        lambda v: float(v[0]) if v is not None and len(v) > 0 else np.nan)


@figure("outcomes", "scores", "target log-probability, rank and accuracy", size="wide")
def draw_outcomes(fig: Any, src: Any, _v: Any) -> None:
    df = src.data
    ax1, ax2, ax3 = fig.subplots(1, 3)
    lp = df["target_logprob"].dropna()
    if len(lp):
        ax1.hist(lp, bins=30, color=style.PALETTE[0])
        ax1.axvline(lp.mean(), color="black", ls="--", lw=1, label=f"mean {lp.mean():.2f}")
        ax1.legend(frameon=False)
    else:
        C.no_data(ax1, "no targets")
    ax1.set_xlabel("log P(target | prompt)")
    ax1.set_ylabel("prompts")
    C.integer_axis(ax1, "y")
    ax1.set_title("target log-probability")
    rank = df["target_rank"].dropna().astype(int)
    bins = [("0", 0, 0), ("1", 1, 1), ("2-4", 2, 4), ("5-9", 5, 9), ("10-99", 10, 99),
            ("100+", 100, 10**12)]
    ax2.bar([b[0] for b in bins], [int(((rank >= lo) & (rank <= hi)).sum()) for _, lo, hi in bins],
            color=style.PALETTE[2])
    ax2.set_xlabel("rank of the target's first token (0 = top)")
    ax2.set_ylabel("prompts")
    ax2.set_title("target rank")
    rates = {}
    for col, name in (("correct", "greedy correct"), ("exact_match", "exact match")):
        if C.has(df, col):
            rates[name] = df[col].dropna().astype(float).mean()
    if C.has(df, "choice_pred"):
        rates["choice 0 picked"] = (df["choice_pred"].dropna() == 0).mean()
    if rates:
        ax3.bar(list(rates), list(rates.values()), color=style.PALETTE[4])
        for i, v in enumerate(rates.values()):
            ax3.text(i, v, f"{v:.0%}", ha="center", va="bottom", fontsize=9)
        ax3.set_ylim(0, 1.1)
    else:
        C.no_data(ax3, "no correctness columns")
    ax3.set_ylabel("fraction of prompts")
    ax3.set_title("accuracy")
    C.title(fig, f"Outcomes on {len(df)} prompts", src.model_label)


def attention_columns(df: Any) -> list[tuple[str, str, int, int]]:
    out = []
    for c in df.columns:
        m = ATTN_RE.match(str(c))
        if m:
            out.append((c, m["span"], int(m["layer"]), int(m["head"])))
    return out


def _attn_size(src: Any, _v: Any) -> tuple[float, float]:
    return C.panels_size(len({s for _, s, _, _ in attention_columns(src.data)}))


@figure("outcomes", "attention", "attention from the last token to each span (layer x head)",
        size=_attn_size, when=lambda s: bool(attention_columns(s.data)))
def draw_attention(fig: Any, src: Any, _v: Any) -> None:
    from matplotlib.colors import Normalize

    cols = attention_columns(src.data)
    spans = list(dict.fromkeys(s for _, s, _, _ in cols))
    layers = sorted({lay for _, _, lay, _ in cols})
    heads = sorted({h for _, _, _, h in cols})
    axes = C.panel_grid(fig, len(spans))
    im = None
    for ax, span in zip(axes, spans, strict=True):
        grid = np.full((len(layers), len(heads)), np.nan)
        for c, s, lay, h in cols:
            if s == span:
                grid[layers.index(lay), heads.index(h)] = src.data[c].astype(float).mean()
        im = C.heatmap(ax, grid, heads, layers, style.SEQUENTIAL, Normalize(0, 1))
        ax.set_title(f"to span '{span}'")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    fig.colorbar(im, ax=axes, label="mean attention mass from the last token", shrink=0.9)
    C.title(fig, "Attention to prompt spans", src.model_label)


@compare("outcomes", "scores", "accuracy and mean target log-probability per model",
         size="wide")
def compare_outcomes(fig: Any, srcs: list, _v: Any) -> None:
    ax1, ax2 = fig.subplots(1, 2)
    labels = unique_labels(srcs)
    y = np.arange(len(srcs))
    cols = [style.colour(i) for i in range(len(srcs))]
    acc = [s.data["correct"].dropna().astype(float).mean() if C.has(s.data, "correct")
           else np.nan for s in srcs]
    lp = [s.data["target_logprob"].dropna().mean() for s in srcs]
    ax1.barh(y, acc, color=cols)
    ax1.invert_yaxis()
    ax1.set_xlim(0, 1)
    ax1.set_xlabel("greedy accuracy")
    ax2.barh(y, lp, color=cols)
    ax2.invert_yaxis()
    ax2.set_xlabel("mean log P(target)")
    for ax in (ax1, ax2):
        ax.set_yticks(y)
        ax.set_yticklabels(labels)
    C.title(fig, f"Outcomes, {len(srcs)} models", labels)


# ------------------------------------------------------------------ outcomes + prompts


def joined(bundle: dict) -> Any:
    o, p = bundle["outcomes"].data, bundle["prompts"].data
    keep = [c for c in p.columns if c not in o.columns or c == "prompt_id"]
    return o.merge(p[keep], on="prompt_id", how="inner")


def _is_sweep(bundles: list) -> bool:
    for b in bundles:
        p, o = b["prompts"].data, b["outcomes"].data
        if C.has(p, "posterior_x", "n_x") and C.has(o, "choice_probs"):
            return True
    return False


def _templates(bundles: list) -> list[str]:
    p = bundles[0]["prompts"].data
    if "template" in p.columns and p["template"].notna().any():
        return sorted(set(p["template"].dropna().astype(str)))
    return ["all"]


def _sweep_size(bundles: list, _v: Any) -> tuple[float, float]:
    return C.panels_size(min(len(_templates(bundles)), 3) + 1, max_cols=4)


@combo(("outcomes", "prompts"), "evidence_sweep",
       "model P(X) against the exact Bayes posterior by number of X draws (bayes)",
       size=_sweep_size, when=_is_sweep)
def draw_sweep(fig: Any, bundles: list, _v: Any) -> None:
    templates = _templates(bundles)[:3]
    axes = C.panel_grid(fig, len(templates) + 1, max_cols=4)
    data = []
    labels = unique_labels([b["outcomes"] for b in bundles])
    for label, b in zip(labels, bundles, strict=True):
        d = joined(b)
        if "posterior_x" not in d.columns or "n_x" not in d.columns:
            continue  # a file of several compared here is not a bayes sweep
        d = d[d["posterior_x"].notna() & d["n_x"].notna()].copy()
        d["p_model"] = choice_p0(d)
        d = d[d["p_model"].notna()]
        if "template" not in d.columns or d["template"].isna().all():
            d["template"] = "all"
        data.append((label, d))
    for ax, tpl in zip(axes, templates, strict=False):
        truth = None
        for i, (label, d) in enumerate(data):
            sub = d[d["template"].astype(str) == tpl]
            if sub.empty:
                continue
            g = sub.groupby("n_x")
            m, sd = g["p_model"].mean(), g["p_model"].std(ddof=0).fillna(0)
            col = style.colour(i)
            ax.plot(m.index, m.to_numpy(), "-o", ms=3.5, color=col, label=label)
            ax.fill_between(m.index, (m - sd).to_numpy(), (m + sd).to_numpy(), color=col,
                            alpha=0.18, linewidth=0)
            truth = g["posterior_x"].mean()
        if truth is not None:
            ax.plot(truth.index, truth.to_numpy(), "k--", lw=1.5, label="exact Bayes")
        ax.set_ylim(0, 1)
        ax.set_xlabel("X draws in the prompt (n_x)")
        ax.set_ylabel("P(next = X)  (model: mean ± SD)")
        ax.set_title(f"template: {tpl}")
        ax.legend(frameon=False, loc="upper left", fontsize=8)
    ax = axes[-1]
    for i, (label, d) in enumerate(data):
        mae = float((d["p_model"] - d["posterior_x"]).abs().mean())
        ax.scatter(d["posterior_x"], d["p_model"], s=9, alpha=0.5, color=style.colour(i),
                   label=f"{label}: MAE {mae:.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("exact Bayes posterior P(X)")
    ax.set_ylabel("model P(X)")
    ax.set_title("calibration against Bayes")
    ax.legend(frameon=False, loc="upper left", fontsize=8)
    C.title(fig, "Evidence sweep: model against the exact posterior",
            labels)


def _by_model(bundles: list) -> list[tuple[str, Any]]:
    """Joined tables per model (the files of one model, e.g. one per family, together)."""
    import pandas as pd

    out: dict[str, list] = {}
    for b in bundles:
        out.setdefault(b["outcomes"].model_label, []).append(joined(b))
    return [(lab, pd.concat(fr, ignore_index=True)) for lab, fr in out.items()]


@combo(("outcomes", "prompts"), "accuracy", "greedy accuracy (95% Wilson CI) per prompt family, "
       "one bar per model", together=True,
       when=lambda bs: all(C.has(b["outcomes"].data, "correct") for b in bs)
       and len(_by_model(bs)) * len({f for b in bs for f in joined(b)["family"].astype(str)}) > 1)
def draw_accuracy(fig: Any, bundles: list, _v: Any) -> None:
    ax = fig.subplots()
    frames = _by_model(bundles)
    fams = sorted({f for _, d in frames for f in d["family"].astype(str)})
    width = 0.8 / len(frames)
    x = np.arange(len(fams))
    for i, (label, d) in enumerate(frames):
        g = d.dropna(subset=["correct"]).groupby("family")["correct"]
        k, n = g.sum(), g.count()
        vals, lo, hi = (np.array([C.wilson(int(k.get(f, 0)), int(n.get(f, 0)))[j] for f in fams])
                        for j in range(3))
        xs = x + (i - (len(frames) - 1) / 2) * width
        ax.bar(xs, vals, width, yerr=np.clip([vals - lo, hi - vals], 0, None),
               color=style.colour(i), label=label, error_kw={"lw": 0.8})
        for xi, v, f in zip(xs, vals, fams, strict=True):
            if v == v:
                ax.text(xi, min(hi[list(fams).index(f)], 0.9) + 0.02,
                        f"{v:.0%}\nn={int(n.get(f, 0))}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(fams)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("prompt family")
    ax.set_ylabel("greedy accuracy")
    ax.legend(frameon=False)
    C.title(fig, "Accuracy by family", [lab for lab, _ in frames])
