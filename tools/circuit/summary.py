"""One task's circuit study in numbers (shared by pipelines/circuit_report.py and the
demo report's circuit section): rank agreement of the edge scores between methods, the
circuit's faithfulness, and the smallest top-n circuit reaching a faithfulness level."""

from __future__ import annotations

from typing import Any

METHODS = ("eap", "eap-ig", "exact")
PAIRS = (("eap", "exact"), ("eap-ig", "exact"), ("eap", "eap-ig"))


def aggregated(edges: Any) -> Any:
    """Aggregated edge scores (rows with no prompt_id) indexed by (src, dst, channel)."""
    e = edges[edges["prompt_id"].isna()] if "prompt_id" in edges.columns else edges
    return e.set_index(["src", "dst", e["channel"].fillna("-")])["score"]


def task_summary(edges: dict[str, Any], faith: Any, level: float = 0.8) -> dict:
    """``edges``: method -> edges table (any of eap, eap-ig, exact); ``faith``: the
    faithfulness table. Spearman rho of |score| for every method pair present, the
    circuit row's numbers, the curve, and the smallest n with faithfulness >= ``level``."""
    from scipy.stats import spearmanr

    sc = {m: aggregated(edges[m]) for m in METHODS if edges.get(m) is not None}
    rho = {}
    for a, b in PAIRS:
        if a in sc and b in sc:
            rho[(a, b)] = float(spearmanr(sc[a].abs(), sc[b].loc[sc[a].index].abs()).statistic)
    out: dict = {"rho": rho, "n_edges_graph": len(next(iter(sc.values()))) if sc else None}
    if faith is not None:
        circ = faith[faith["kind"] == "circuit"]
        curve = faith[faith["kind"] == "curve"].sort_values("n_edges")
        ok = curve[curve["faithfulness"] >= level]
        out.update(
            circuit=None if circ.empty else circ.iloc[0].to_dict(),
            curve=[(int(r.n_edges), float(r.faithfulness)) for r in curve.itertuples()],
            smallest=int(ok["n_edges"].iloc[0]) if len(ok) else None, level=level)
    return out
