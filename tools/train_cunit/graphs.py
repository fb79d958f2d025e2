"""Graphs for dolm-train-cunit: canonical graphs, random ER / scale-free DAGs, metrics.

A graph is a ``(d, d)`` 0/1 numpy array ``B`` with ``B[i, j] = 1`` for an edge i -> j,
plus a list of node names.
"""

from __future__ import annotations

import numpy as np
from dolm.graphs import find_cycle  # one cycle search for dolm (also imported from here)

CANONICAL: dict[str, tuple[list[str], list[tuple[str, str]]]] = {
    "chain": (["A", "B", "C"], [("A", "B"), ("B", "C")]),
    "fork": (["A", "B", "C"], [("B", "A"), ("B", "C")]),
    "collider": (["A", "B", "C"], [("A", "C"), ("B", "C")]),
    # an observed confounder U of treatment X and outcome Y, plus the effect X -> Y
    "confounder": (["U", "X", "Y"], [("U", "X"), ("U", "Y"), ("X", "Y")]),
    # six nodes: a fork, a collider, a mediated path and a long chain in one graph
    "complex": (
        ["A", "B", "C", "D", "E", "F"],
        [("A", "B"), ("A", "C"), ("B", "D"), ("C", "D"), ("D", "E"), ("C", "F"), ("E", "F")],
    ),
}
CANONICAL["v-structure"] = CANONICAL["collider"]


def canonical(name: str) -> tuple[list[str], np.ndarray]:
    nodes, edges = CANONICAL[name]
    return nodes, edges_to_matrix(nodes, edges)


def edges_to_matrix(nodes: list[str], edges: list[tuple[str, str]]) -> np.ndarray:
    index = {n: i for i, n in enumerate(nodes)}
    B = np.zeros((len(nodes), len(nodes)), dtype=np.int64)
    for a, b in edges:
        B[index[a], index[b]] = 1
    return B


def random_dag(d: int, edges_per_node: float, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A random DAG: ``er`` (Erdos-Renyi, ``edges_per_node * d`` edges expected, as in
    NOTEARS/DAGMA's "ER2") or ``sf`` (scale-free, Barabasi-Albert with that many
    edges per new node). Nodes are randomly permuted so that the index is no order."""
    if kind == "er":
        m = edges_per_node * d
        p = min(1.0, m / (d * (d - 1) / 2)) if d > 1 else 0.0
        B = np.tril((rng.random((d, d)) < p).astype(np.int64), k=-1)
    elif kind == "sf":
        k = max(1, int(round(edges_per_node)))
        B = np.zeros((d, d), dtype=np.int64)
        degree = np.zeros(d)
        for new in range(1, d):
            weights = degree[:new] + 1.0
            picks = rng.choice(new, size=min(k, new), replace=False, p=weights / weights.sum())
            B[picks, new] = 1
            degree[picks] += 1
            degree[new] += len(picks)
    else:
        raise ValueError(f"unknown graph kind {kind!r}: expected er or sf")
    perm = rng.permutation(d)
    P = np.eye(d, dtype=np.int64)[perm]
    return P.T @ B @ P


def is_dag(B: np.ndarray) -> bool:
    return topological_order(B) is not None


def topological_order(B: np.ndarray) -> list[int] | None:
    B = np.asarray(B) != 0
    d = B.shape[0]
    indeg = B.sum(0).astype(int)
    order = []
    ready = [i for i in range(d) if indeg[i] == 0]
    while ready:
        i = ready.pop(0)
        order.append(i)
        for j in np.flatnonzero(B[i]):
            indeg[j] -= 1
            if indeg[j] == 0:
                ready.append(int(j))
    return order if len(order) == d else None


def make_acyclic(B: np.ndarray, strength: np.ndarray) -> np.ndarray:
    """Remove the weakest edge of each cycle until the graph is a DAG."""
    B = (np.asarray(B) != 0).astype(np.int64)
    while True:
        cycle = find_cycle(B)
        if cycle is None:
            return B
        pairs = [(cycle[k - 1], cycle[k]) for k in range(len(cycle))]
        a, b = min(pairs, key=lambda e: abs(strength[e[0], e[1]]))
        B[a, b] = 0


def structure_metrics(B_true: np.ndarray, B_est: np.ndarray) -> dict[str, float]:
    """Directed-edge precision/recall/F1, TPR, FDR, skeleton F1 and SHD (a reversed edge
    counts 1).

    TPR = correctly directed edges / true edges; FDR = (reversed + extra) / predicted;
    SHD = extra + missing + reversed (over the skeleton, as NOTEARS/DAGMA count it).
    ``B_est`` may be a CPDAG / I-essential graph: an undirected edge (``B[i, j] =
    B[j, i] = 1``) counts as both directions -- one correct and one reversed prediction
    in the directed scores, SHD 1 (as cdt's SHD with ``double_for_anticausal=False``);
    ``skeleton_f1`` ignores direction."""
    T = np.asarray(B_true) != 0
    E = np.asarray(B_est) != 0
    np.fill_diagonal(E, False)
    tp = int((T & E).sum())
    n_pred = int(E.sum())
    n_true = int(T.sum())
    # a reversed edge: predicted j -> i where i -> j is true and j -> i is not; an
    # undirected prediction (both directions) of a true edge counts one reversal
    reversed_ = int((E & T.T & ~T).sum())
    skel_t = T | T.T
    skel_e = E | E.T
    extra = int(np.triu(skel_e & ~skel_t, 1).sum())
    missing = int(np.triu(skel_t & ~skel_e, 1).sum())
    precision = tp / n_pred if n_pred else (1.0 if n_true == 0 else 0.0)
    recall = tp / n_true if n_true else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    st, se = np.triu(skel_t, 1), np.triu(skel_e, 1)
    s_tp, s_pred, s_true = int((st & se).sum()), int(se.sum()), int(st.sum())
    s_prec = s_tp / s_pred if s_pred else (1.0 if s_true == 0 else 0.0)
    s_rec = s_tp / s_true if s_true else 1.0
    return {
        "f1": f1,
        "skeleton_f1": 2 * s_prec * s_rec / (s_prec + s_rec) if s_prec + s_rec else 0.0,
        "precision": precision,
        "tpr": recall,
        "fdr": (n_pred - tp) / n_pred if n_pred else 0.0,
        "shd": float(extra + missing + reversed_),
        "n_edges_true": float(n_true),
        "n_edges_pred": float(n_pred),
        "n_reversed": float(reversed_),
    }
