"""Causal diagrams from ``dag`` JSON files (networkx layout, matplotlib drawing).

Nodes are placed in layers by topological generation (causes left, effects right), so
the same file always gives the same picture. Treatment, outcome and mediators are
coloured by role; latent nodes are dashed; edge width follows |weight|, red edges are
negative.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from dolm_tools.plot import style
from dolm_tools.plot.registry import compare, figure, unique_labels

ROLE_NAMES = {
    "treatment": "treatment",
    "treatments": "treatment",
    "outcome": "outcome",
    "outcomes": "outcome",
    "mediator": "mediator",
    "mediators": "mediator",
    "confounder": "confounder",
    "confounders": "confounder",
    "instrument": "instrument",
    "instruments": "instrument",
}


def graph(obj: dict) -> Any:
    import networkx as nx

    g = nx.DiGraph()
    g.add_nodes_from(str(n) for n in obj.get("nodes", []))
    for e in obj.get("edges", []):
        w = e.get("weight")
        g.add_edge(str(e["source"]), str(e["target"]), weight=None if w is None else float(w))
    return g


def node_roles(obj: dict) -> dict[str, str]:
    roles: dict[str, str] = {}
    for key, val in (obj.get("roles") or {}).items():
        role = ROLE_NAMES.get(str(key), str(key))
        for n in [val] if isinstance(val, str) else (val or []):
            roles.setdefault(str(n), role)
    return roles


def layout(g: Any) -> dict[str, tuple[float, float]]:
    """Topological generations left to right (a DAG), nodes within a generation in the
    file's order, top to bottom; a circle when there is a cycle. Independent of hash
    seeds, so the same file always gives the same picture."""
    import networkx as nx

    if len(g) == 0:
        return {}
    order = {n: i for i, n in enumerate(g.nodes)}
    if not nx.is_directed_acyclic_graph(g):
        return {n: (float(x), float(y)) for n, (x, y) in
                nx.circular_layout(sorted(g.nodes, key=order.get)).items()}
    pos = {}
    for i, gen in enumerate(nx.topological_generations(g)):
        nodes = sorted(gen, key=order.get)
        k = len(nodes)
        for j, n in enumerate(nodes):
            pos[n] = (float(i), float((k - 1) / 2 - j))
    return pos


def draw_dag_on(ax: Any, obj: dict, pos: dict | None = None, legend: bool = True) -> None:
    import networkx as nx
    from matplotlib.lines import Line2D

    g = graph(obj)
    roles = node_roles(obj)
    latent = {str(n) for n in obj.get("latent", []) or []}
    pos = layout(g) if pos is None else {n: pos[n] for n in g.nodes}
    if not pos:
        ax.text(0.5, 0.5, "empty graph", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    nodes = sorted(g.nodes)
    size = node_size(ax, pos)
    weights = [abs(d["weight"]) for _, _, d in g.edges(data=True) if d.get("weight") is not None]
    wmax = max(weights) if weights else 1.0
    wmax = wmax or 1.0
    edges = sorted(g.edges(data=True))
    widths = [1.0 + 3.0 * abs(d["weight"]) / wmax if d.get("weight") is not None else 1.5
              for _, _, d in edges]
    colours = {(u, v): "#B2182B" if (d.get("weight") or 0) < 0 else "#444444"
               for u, v, d in edges}
    width_of = {(u, v): w for (u, v, _), w in zip(edges, widths, strict=True)}
    # edges that skip a generation bend more, so they pass around the nodes between
    groups: dict[float, list[tuple[str, str]]] = {}
    for u, v, _ in edges:
        groups.setdefault(_bend(pos, u, v), []).append((u, v))
    # many edges: label only the strong ones (the rest read from width and colour)
    floor = 0.2 * wmax if len(edges) > 8 else -1.0
    labelled = {(u, v): _weight_text(d["weight"]) for u, v, d in edges
                if d.get("weight") is not None and abs(d["weight"]) >= floor}
    for rad, group in sorted(groups.items()):
        style_ = f"arc3,rad={rad}"
        nx.draw_networkx_edges(g, pos, ax=ax, edgelist=group,
                               width=[width_of[e] for e in group],
                               edge_color=[colours[e] for e in group], arrows=True,
                               arrowsize=16, node_size=size, connectionstyle=style_)
        lab = {e: labelled[e] for e in group if e in labelled}
        if lab and len(labelled) <= 30:
            nx.draw_networkx_edge_labels(g, pos, edge_labels=lab, ax=ax, font_size=7,
                                         label_pos=0.5, rotate=False, connectionstyle=style_)
    fills = [style.ROLE_COLOURS.get(roles.get(n, "other"), style.ROLE_COLOURS["other"])
             for n in nodes]
    observed = [n for n in nodes if n not in latent]
    hidden = [n for n in nodes if n in latent]
    for group, dash in ((observed, "solid"), (hidden, "dashed")):
        if group:
            coll = nx.draw_networkx_nodes(
                g, pos, nodelist=group, ax=ax, node_size=size,
                node_color=[fills[nodes.index(n)] for n in group], edgecolors="black",
                linewidths=1.2)
            coll.set_linestyle(dash)
            if dash == "dashed":
                coll.set_alpha(0.55)
    nx.draw_networkx_labels(g, pos, ax=ax, labels={n: _wrap(n) for n in nodes},
                            font_size=8 if size >= 1800 else 7)
    handles = []
    for role in ("treatment", "outcome", "mediator", "confounder", "instrument"):
        if role in roles.values():
            handles.append(Line2D([], [], marker="o", ls="", ms=10, markeredgecolor="black",
                                  markerfacecolor=style.ROLE_COLOURS[role], label=role))
    if weights:
        handles.append(Line2D([], [], color="#444444", lw=2.5, label="edge width ∝ |weight|"))
        if any(d.get("weight") is not None and d["weight"] < 0 for _, _, d in edges):
            handles.append(Line2D([], [], color="#B2182B", lw=2.5, label="negative weight"))
    if hidden:
        handles.append(Line2D([], [], marker="o", ls="", ms=10, markeredgecolor="black",
                              markerfacecolor="white", label="latent (dashed)"))
    if handles and legend:
        ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, -0.12), ncol=len(
            handles), frameon=False, fontsize=8)
    xs = np.array([p[0] for p in pos.values()])
    ys = np.array([p[1] for p in pos.values()])
    padx = 0.25 * (np.ptp(xs) or 1.0)
    pady = 0.25 * (np.ptp(ys) or 1.0)
    ax.set_xlim(xs.min() - padx, xs.max() + padx)
    ax.set_ylim(ys.min() - pady, ys.max() + pady)
    ax.set_axis_off()


def node_size(ax: Any, pos: dict) -> float:
    """Node area (points^2) that leaves room for edges between neighbouring columns."""
    box = ax.get_position()
    w_in, h_in = ax.figure.get_size_inches()
    w_in, h_in = w_in * box.width, h_in * box.height
    cols = len({round(p[0], 6) for p in pos.values()})
    rows = max(sum(1 for p in pos.values() if round(p[0], 6) == x)
               for x in {round(p[0], 6) for p in pos.values()})
    diameter = min(0.72, 0.45 * w_in / (cols + 0.5), 0.5 * h_in / (rows + 0.5))
    return float((diameter * 72) ** 2)


def _weight_text(w: float) -> str:
    return "0" if abs(w) < 5e-3 else f"{w:.2g}"


def _bend(pos: dict, u: str, v: str) -> float:
    """Curvature of an edge: slight for neighbours, more for edges spanning several columns,
    bending away from the middle of the drawing."""
    (x0, y0), (x1, y1) = pos[u], pos[v]
    xs = sorted({round(p[0], 6) for p in pos.values()})
    step = (xs[1] - xs[0]) if len(xs) > 1 else 1.0
    span = abs(x1 - x0) / step if step else 1.0
    if span <= 1.01:
        return 0.08
    ymid = sum(p[1] for p in pos.values()) / len(pos)
    side = 1.0 if (y0 + y1) / 2 >= ymid else -1.0
    # arc3 bends to the right of the direction of travel for positive rad
    direction = 1.0 if x1 >= x0 else -1.0
    return round(-0.3 * side * direction, 2)


def _wrap(name: str, width: int = 12) -> str:
    if len(name) <= width:
        return name
    for sep in ("_", ".", " ", "-"):
        if sep in name:
            parts, line, out = name.split(sep), "", []
            for p in parts:
                cand = f"{line}{sep}{p}" if line else p
                if len(cand) > width and line:
                    out.append(line + sep)
                    line = p
                else:
                    line = cand
            out.append(line)
            return "\n".join(out)
    return name[:width] + "\n" + name[width:]


def dag_title(obj: dict) -> str:
    roles = node_roles(obj)
    t = [n for n, r in roles.items() if r == "treatment"]
    y = [n for n, r in roles.items() if r == "outcome"]
    if t and y:
        return f"Causal diagram: {', '.join(t)} → {', '.join(y)}"
    return "Causal diagram"


@figure("dag", "dag", "causal diagram (DAG) with treatment/outcome/mediator roles", size="single")
def draw_dag(fig: Any, src: Any, _v: Any) -> None:
    from dolm_tools.plot.common import title

    ax = fig.subplots()
    draw_dag_on(ax, src.data)
    obj = src.data
    n_e = len(obj.get("edges", []))
    title(fig, f"{dag_title(obj)} ({len(obj.get('nodes', []))} nodes, {n_e} edges)",
          src.model_label if src.model else _dag_origin(src))


def _dag_origin(src: Any) -> str:
    chain = src.meta.provenance if src.meta is not None else []
    tool = chain[-1].get("tool") if chain else None
    return f"none (DAG written by dolm-{tool})" if tool else "none"


@compare("dag", "dags", "several causal diagrams side by side on one layout (e.g. learned "
         "vs true)", size=lambda g, v: (5.5 * min(len(g), 3) + 0.5, 5.0 * -(-len(g) // 3) + 0.8))
def compare_dags(fig: Any, srcs: list, _v: Any) -> None:
    import networkx as nx
    from dolm_tools.plot.common import panel_grid, title

    union = nx.DiGraph()
    for src in srcs:
        union.add_nodes_from(graph(src.data).nodes)
    for src in srcs:
        union.add_edges_from(graph(src.data).edges)
    pos = layout(union)
    labels = unique_labels(srcs)
    axes = panel_grid(fig, len(srcs))
    for i, (ax, src, label) in enumerate(zip(axes, srcs, labels, strict=True)):
        draw_dag_on(ax, src.data, pos=pos, legend=i == len(srcs) - 1)
        ax.set_title(f"{label}: {len(src.data.get('edges', []))} edges")
    title(fig, f"Causal diagrams compared ({len(srcs)} files)", labels,
          key="model" if any(s.model for s in srcs) else "files")
