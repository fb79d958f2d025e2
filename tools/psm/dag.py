"""Backdoor adjustment sets from a ``dag`` file, identified by DoWhy.

DoWhy's ``CausalModel.identify_effect`` picks the backdoor set; nodes the table lacks must
be declared ``latent`` and are treated as unobserved. When no observed set satisfies the
backdoor criterion, we name a path that stays open: it is d-connecting given the
"adjustment" set of van der Zander, Liskiewicz & Textor (2014) (observed ancestors of
treatment or outcome that are not descendants of the treatment), which blocks every
backdoor path that any observed set can block.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from dolm.errors import InputError


def parse_dag(obj: Any, path: str):
    import networkx as nx

    if not isinstance(obj, dict) or "nodes" not in obj or "edges" not in obj:
        raise InputError(f"--dag {path}: expected a JSON object with 'nodes' and 'edges'")
    g = nx.DiGraph()
    g.add_nodes_from(str(n) for n in obj["nodes"])
    for i, e in enumerate(obj["edges"]):
        if not isinstance(e, dict) or "source" not in e or "target" not in e:
            raise InputError(f"--dag {path}: edge {i}: expected {{'source': ..., 'target': ...}}")
        s, t = str(e["source"]), str(e["target"])
        for v in (s, t):
            if v not in g:
                raise InputError(f"--dag {path}: edge {i} names {v!r}, which is not in 'nodes'")
        g.add_edge(s, t)
    if not nx.is_directed_acyclic_graph(g):
        cyc = nx.find_cycle(g)
        raise InputError(
            f"--dag {path}: expected a DAG, found a cycle: "
            + " -> ".join([str(a) for a, _ in cyc] + [str(cyc[0][0])])
        )
    latent = [str(v) for v in obj.get("latent", []) or []]
    return g, latent


def _d_open(g, path: list[str], Z: set[str]) -> bool:
    import networkx as nx

    for a, b, c in zip(path, path[1:], path[2:], strict=False):
        collider = g.has_edge(a, b) and g.has_edge(c, b)
        if collider:
            if b not in Z and not (nx.descendants(g, b) & Z):
                return False
        elif b in Z:
            return False
    return True


def open_backdoor_path(g, treatment: str, outcome: str, observed: set[str]) -> list[str] | None:
    """A backdoor path from treatment to outcome that no observed set blocks, or None."""
    import networkx as nx

    desc = nx.descendants(g, treatment)
    anc = nx.ancestors(g, treatment) | nx.ancestors(g, outcome)
    Z = (anc & observed) - desc - {treatment, outcome}
    ug = g.to_undirected(as_view=True)
    for parent in sorted(g.predecessors(treatment)):
        for p in nx.all_simple_paths(ug, parent, outcome, cutoff=12):
            path = [treatment, *p]
            if treatment in p:
                continue
            if _d_open(g, path, Z):
                return path
    return None


def _fmt_path(g, path: list[str]) -> str:
    out = path[0]
    for a, b in zip(path, path[1:], strict=False):
        out += f" -> {b}" if g.has_edge(a, b) else f" <- {b}"
    return out


def backdoor_set(
    obj: Any, path: str, columns: list[str], treatment: str, outcome: str
) -> dict[str, Any]:
    """Identify the backdoor adjustment set with DoWhy; refuse non-identifiable effects."""
    g, latent = parse_dag(obj, path)
    for role, v in (("--treatment", treatment), ("--outcome", outcome)):
        if v not in g:
            raise InputError(f"--dag {path}: {role} {v!r} is not a node of the DAG")
    missing = [v for v in g.nodes if v not in columns and v not in latent]
    if missing:
        raise InputError(
            f"--dag {path}: node(s) {', '.join(map(repr, missing))} are not columns of the "
            "table; add them, or declare them in the DAG's 'latent' list"
        )
    for v in (treatment, outcome):
        if v in latent:
            raise InputError(f"--dag {path}: {v!r} is declared latent but is the {v} column")
    observed = {v for v in g.nodes if v not in latent}

    import networkx as nx

    if outcome not in nx.descendants(g, treatment):
        raise InputError(
            f"--dag {path}: the DAG has no directed path from {treatment!r} to {outcome!r}, "
            "so it implies no effect to estimate"
        )
    import pandas as pd

    logging.getLogger("dowhy").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from dowhy import CausalModel

        # DoWhy needs a table with the observed nodes; identification uses only the graph
        fake = pd.DataFrame({v: [0.0, 1.0] for v in sorted(observed)})
        model = CausalModel(data=fake, treatment=treatment, outcome=outcome, graph=g)
        est = model.identify_effect(proceed_when_unidentifiable=False)
    backdoor = est.estimands.get("backdoor")
    if backdoor is None:
        p = open_backdoor_path(g, treatment, outcome, observed)
        if p:
            lat = [v for v in p if v in latent]
            where = f"the backdoor path {_fmt_path(g, p)} stays open"
            if lat:
                where += f" (through latent {', '.join(lat)})"
        else:
            where = "no observed set satisfies the backdoor criterion"
        raise InputError(
            f"--dag {path}: the effect of {treatment!r} on {outcome!r} is not identifiable by "
            f"adjustment: {where}; matching cannot remove that confounding"
        )
    adj = sorted(est.get_backdoor_variables())
    return {
        "adjustment_set": adj,
        "identified_by": "DoWhy CausalModel.identify_effect (backdoor criterion)",
        "latent": latent,
        "estimand": str(backdoor.get("estimand")),
    }
