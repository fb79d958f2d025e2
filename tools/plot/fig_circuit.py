"""Figures for circuits: the circuit graph (``circuit`` JSON), the edge-score matrix
(``edges`` tables) and the faithfulness-vs-size curve (``faithfulness`` tables)."""

from __future__ import annotations

from typing import Any

import numpy as np
from dolm_tools.plot import common as C
from dolm_tools.plot import style
from dolm_tools.plot.registry import figure

CHANNEL_COLOURS = {"q": "#1f77b4", "k": "#d62728", "v": "#2ca02c", None: "#555555"}
CURVE = {"q": 0.25, "k": 0.0, "v": -0.25, None: 0.08}  # q/k/v edges of one pair stay apart


def _node_xy(name: str, n_layers: int, n_heads: int) -> tuple[float, float]:
    """Layered position: embed at the bottom, layer L's heads on row 2L+1, its MLP on
    row 2L+2, logits on top."""
    if name == "embed":
        return 0.0, 0.0
    if name == "logits":
        return 0.0, 2.0 * n_layers + 1
    parts = name.split(".")
    lyr = int(parts[1])
    if parts[0] == "mlp":
        return 0.0, 2.0 * lyr + 2
    h = int(parts[2])
    return h - (n_heads - 1) / 2, 2.0 * lyr + 1


@figure("circuit", "graph", "the circuit: nodes in layers, edge width = |score|, colour = the "
        "receiving head's input (q, k, v) or the residual stream", size="wide")
def draw_graph(fig: Any, src: Any, _v: Any) -> None:
    obj = src.data
    m = obj["model"]
    n_layers, n_heads = int(m["n_layers"]), int(m["n_heads"])
    ax = fig.subplots()
    edges = obj["edges"]
    top = max([abs(float(e["score"])) for e in edges] or [1.0]) or 1.0
    for e in edges:
        x0, y0 = _node_xy(e["source"], n_layers, n_heads)
        x1, y1 = _node_xy(e["target"], n_layers, n_heads)
        ch = e.get("channel")
        ax.annotate("", xy=(x1, y1 - 0.15), xytext=(x0, y0 + 0.15),
                    arrowprops={"arrowstyle": "-|>", "lw": 0.5 + 4.5 * abs(e["score"]) / top,
                                "color": CHANNEL_COLOURS.get(ch, "#555555"), "alpha": 0.8,
                                "connectionstyle": f"arc3,rad={CURVE.get(ch, 0.08)}"})
    xy = np.array([_node_xy(n, n_layers, n_heads) for n in obj["nodes"]]).reshape(-1, 2)
    ax.scatter(xy[:, 0], xy[:, 1], s=500, color="white", edgecolors="0.5", zorder=3)
    for n, (x, y) in zip(obj["nodes"], xy, strict=True):
        ax.text(x, y, n, ha="center", va="center", fontsize=6, zorder=4)
    for ch in ("q", "k", "v", None):
        ax.plot([], [], color=CHANNEL_COLOURS[ch], lw=2, label=ch or "residual")
    ax.legend(loc="upper right", fontsize=7, title="into")
    ax.set_xlim(-(n_heads + 1) / 2, (n_heads + 1) / 2)
    ax.set_ylim(-0.8, 2 * n_layers + 1.8)
    ax.set_axis_off()
    C.title(fig, f"circuit: {len(edges)} edges ({obj['method']}, {obj['metric']})",
            src.model_label)


def _agg(df: Any) -> Any:
    d = df[df["prompt_id"].isna()] if df["prompt_id"].isna().any() else df
    return d.groupby(["src", "dst", "channel"], dropna=False)["score"].mean().reset_index()


@figure("edges", "matrix", "edge scores: senders (rows) x receivers and their q/k/v input "
        "(columns), mean over prompts", size="wide")
def draw_matrix(fig: Any, src: Any, _v: Any) -> None:
    d = _agg(src.data)
    d["recv"] = [f"{a}.{c}" if isinstance(c, str) else str(a)
                 for a, c in zip(d["dst"], d["channel"], strict=True)]
    senders = list(dict.fromkeys(d["src"]))
    recvs = list(dict.fromkeys(d["recv"]))
    grid = np.full((len(senders), len(recvs)), np.nan)
    si = {s: i for i, s in enumerate(senders)}
    ri = {r: i for i, r in enumerate(recvs)}
    for s, r, v in zip(d["src"], d["recv"], d["score"], strict=True):
        grid[si[s], ri[r]] = v
    ax = fig.subplots()
    cmap, norm = style.signed_norm(grid[np.isfinite(grid)])
    im = C.heatmap(ax, grid, recvs, senders, cmap, norm, annotate=False)
    ax.set_xlabel("receiver (input)")
    ax.set_ylabel("sender")
    for lab in ax.get_xticklabels():
        lab.set_rotation(90)
    method = str(src.data["method"].iloc[0]) if len(src.data) else "?"
    fig.colorbar(im, ax=ax, label=f"{method} score ({src.data['metric'].iloc[0]})")
    C.title(fig, f"edge scores ({method})", src.model_label)


@figure("faithfulness", "curve", "faithfulness of the top-n edges vs n, with the circuit's "
        "own point")
def draw_curve(fig: Any, src: Any, _v: Any) -> None:
    d = src.data
    ax = fig.subplots()
    cur = d[d["kind"] == "curve"].sort_values("n_edges")
    ax.plot(cur["n_edges"], cur["faithfulness"], marker="o", color=style.PALETTE[0],
            label="top-n edges")
    circ = d[d["kind"] == "circuit"]
    if len(circ):
        ax.scatter(circ["n_edges"], circ["faithfulness"], color=style.PALETTE[1], zorder=3,
                   label="circuit")
    ax.axhline(1.0, color="0.4", lw=0.8)
    ax.axhline(0.8, color="0.6", lw=0.8, ls="--")
    if len(cur) and cur["n_edges"].min() > 0:
        ax.set_xscale("log")
    ax.set_xlabel("edges in the circuit")
    ax.set_ylabel("faithfulness = circuit metric / full metric")
    ax.legend(fontsize=8)
    ablate = str(d["ablate"].iloc[0]) if len(d) else "?"
    C.title(fig, f"faithfulness vs circuit size (other edges: {ablate})", src.model_label)
