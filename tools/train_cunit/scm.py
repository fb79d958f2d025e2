"""Synthetic structural causal models: linear-Gaussian, nonlinear (an additive mixture of
sigmoid-shaped tanh terms, one per parent) and mlp (a random one-hidden-layer network of
all parents per node, additive Gaussian noise: DCDI's "NN" mechanisms), observational
and perfect-intervention regimes with known targets, and true counterfactuals (the SCM
knows its noise)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .graphs import canonical, is_dag, random_dag, topological_order

MECHANISMS = ("linear", "nonlinear", "mlp")
MLP_HIDDEN = 10


@dataclass
class SCM:
    nodes: list[str]
    B: np.ndarray  # (d, d) 0/1, B[i, j] = 1 for i -> j
    mechanism: str = "linear"
    W: np.ndarray = field(default=None)  # edge weights
    A: np.ndarray = field(default=None)  # nonlinear: tanh(A x + C) per edge
    C: np.ndarray = field(default=None)
    noise_scale: np.ndarray = field(default=None)
    bias: np.ndarray = field(default=None)
    W1: np.ndarray = field(default=None)  # mlp: (d, d, H) input weights, parent i -> node j
    b1: np.ndarray = field(default=None)  # mlp: (d, H)
    W2: np.ndarray = field(default=None)  # mlp: (d, H) output weights

    @property
    def d(self) -> int:
        return len(self.nodes)

    def parent_term(self, X: np.ndarray) -> np.ndarray:
        """f_j(parents of j) for every node j, from the full matrix X (n, d)."""
        if self.mechanism == "linear":
            return X @ self.W + self.bias
        if self.mechanism == "mlp":
            H = np.tanh(np.einsum("ni,ijh->njh", X, self.W1 * self.B[:, :, None]) + self.b1)
            return np.einsum("njh,jh->nj", H, self.W2) + self.bias
        # sum_i W_ij tanh(A_ij x_i + C_ij)
        Z = np.tanh(X[:, :, None] * self.A[None] + self.C[None])
        return np.einsum("nij,ij->nj", Z, self.W * self.B) + self.bias

    def _propagate(self, U: np.ndarray, do: dict[int, np.ndarray]) -> np.ndarray:
        n = U.shape[0]
        X = np.zeros((n, self.d))
        for j in topological_order(self.B):
            if j in do:
                X[:, j] = do[j]
            else:
                X[:, j] = self.parent_term(X)[:, j] + U[:, j]
        return X

    def sample(self, n: int, rng: np.random.Generator, do: dict[int, np.ndarray] | None = None):
        U = rng.standard_normal((n, self.d)) * self.noise_scale
        return self._propagate(U, do or {})

    def counterfactual(self, X: np.ndarray, do: dict[int, np.ndarray]) -> np.ndarray:
        """Abduction (U = X - f(X)), action (do), prediction: the true counterfactual."""
        U = X - self.parent_term(X)
        return self._propagate(U, do)

    def to_dict(self) -> dict:
        out = {
            "nodes": list(self.nodes),
            "adjacency": self.B.astype(int).tolist(),
            "mechanism": self.mechanism,
            "weights": self.W.tolist(),
            "noise_scale": self.noise_scale.tolist(),
            "bias": self.bias.tolist(),
        }
        if self.mechanism == "nonlinear":
            out["slope"] = self.A.tolist()
            out["offset"] = self.C.tolist()
        if self.mechanism == "mlp":
            out["mlp"] = {"w1": self.W1.tolist(), "b1": self.b1.tolist(),
                          "w2": self.W2.tolist()}
        return out

    @classmethod
    def from_dict(cls, obj: dict) -> SCM:
        d = len(obj["nodes"])
        nonlinear = obj["mechanism"] == "nonlinear"
        mlp = obj.get("mlp") if obj["mechanism"] == "mlp" else None
        return cls(
            nodes=list(obj["nodes"]),
            B=np.asarray(obj["adjacency"], dtype=np.int64).reshape(d, d),
            mechanism=obj["mechanism"],
            W=np.asarray(obj["weights"], dtype=float).reshape(d, d),
            A=np.asarray(obj["slope"], dtype=float).reshape(d, d) if nonlinear else None,
            C=np.asarray(obj["offset"], dtype=float).reshape(d, d) if nonlinear else None,
            noise_scale=np.asarray(obj["noise_scale"], dtype=float),
            bias=np.asarray(obj["bias"], dtype=float),
            W1=np.asarray(mlp["w1"], dtype=float) if mlp else None,
            b1=np.asarray(mlp["b1"], dtype=float) if mlp else None,
            W2=np.asarray(mlp["w2"], dtype=float) if mlp else None,
        )


def make_scm(
    nodes: list[str],
    B: np.ndarray,
    mechanism: str,
    rng: np.random.Generator,
    w_range: tuple[float, float] = (0.5, 2.0),
    noise_range: tuple[float, float] = (1.0, 1.0),
) -> SCM:
    """Random parameters for a DAG: weights uniform in +-w_range (NOTEARS/DAGMA's
    default), noise sd uniform in noise_range (equal variances by default)."""
    if mechanism not in MECHANISMS:
        raise ValueError(f"unknown mechanism {mechanism!r}")
    if not is_dag(B):
        raise ValueError("the graph is cyclic")
    d = len(nodes)
    sign = rng.choice([-1.0, 1.0], size=(d, d))
    W = B * sign * rng.uniform(*w_range, size=(d, d))
    scm = SCM(
        nodes=list(nodes),
        B=np.asarray(B, dtype=np.int64),
        mechanism=mechanism,
        W=W,
        noise_scale=rng.uniform(*noise_range, size=d),
        bias=np.zeros(d),
    )
    if mechanism == "nonlinear":
        scm.W = B * sign * rng.uniform(1.0, 3.0, size=(d, d))
        scm.A = rng.uniform(0.5, 2.0, size=(d, d))
        scm.C = rng.uniform(-1.0, 1.0, size=(d, d))
    if mechanism == "mlp":
        # every node: tanh(sum_i x_i W1_ij + b1_j) @ W2_j, inputs from its parents only;
        # input weights +-U[0.5, 2] as the linear ones, output weights N(0, 1) scaled so
        # N(0, 1) as DCDI draws them (a signal sd of ~1-4 against unit noise)
        h = MLP_HIDDEN
        scm.W1 = (B[:, :, None] * rng.choice([-1.0, 1.0], size=(d, d, h))
                  * rng.uniform(*w_range, size=(d, d, h)))
        scm.b1 = rng.uniform(-1.0, 1.0, size=(d, h))
        scm.W2 = rng.standard_normal((d, h))
        scm.W = B * np.sqrt((scm.W1**2).sum(-1))  # reported edge strength: ||W1_ij||
    return scm


def graph_from_spec(
    graph: str, d: int, edges_per_node: float, rng: np.random.Generator
) -> tuple[list[str], np.ndarray]:
    """``chain``/``fork``/``collider``/``v-structure``/``confounder``/``complex`` or
    ``er``/``sf`` with ``d`` nodes named x0..x{d-1}."""
    if graph in ("er", "sf"):
        B = random_dag(d, edges_per_node, graph, rng)
        width = len(str(d - 1))
        return [f"x{i:0{width}d}" for i in range(d)], B
    return canonical(graph)


def simulate_regimes(
    scm: SCM,
    rng: np.random.Generator,
    n_obs: int = 1000,
    n_per_target: int = 200,
    targets: list[int] | None = None,
    n_test: int = 0,
    test_pairs: int = 0,
    int_shift: float = 0.0,
    int_scale: float = 1.0,
):
    """Rows of an observational regime and one perfect-intervention regime per target.

    An intervened node is drawn from N(mean + int_shift*sd, (int_scale*sd)^2), mean and sd
    being the node's observational ones (so the values are on the node's own scale).
    Held-out test rows (``split = test``): n_test observational rows, n_test rows of every
    training regime, and n_test rows of ``test_pairs`` unseen two-node interventions.

    Returns (X (n, d), target lists per row, regime names, split names)."""
    d = scm.d
    X_obs = scm.sample(max(n_obs, 2000), rng)
    mean, sd = X_obs.mean(0), X_obs.std(0) + 1e-12
    targets = list(range(d)) if targets is None else list(targets)
    blocks: list[tuple[np.ndarray, tuple[int, ...], str]] = []

    def draw(n: int, tset: tuple[int, ...], split: str):
        do = {t: mean[t] + sd[t] * (int_shift + int_scale * rng.standard_normal(n)) for t in tset}
        blocks.append((scm.sample(n, rng, do), tset, split))

    if n_obs:
        blocks.append((scm.sample(n_obs, rng), (), "train"))
    for t in targets:
        draw(n_per_target, (t,), "train")
    if n_test:
        blocks.append((scm.sample(n_test, rng), (), "test"))
        for t in targets:
            draw(n_test, (t,), "test")
        if d >= 2:
            for _ in range(test_pairs):
                pair = tuple(sorted(int(i) for i in rng.choice(d, size=2, replace=False)))
                draw(n_test, pair, "test")
    X = np.concatenate([b[0] for b in blocks])
    row_targets = [list(b[1]) for b in blocks for _ in range(len(b[0]))]
    regimes = []
    for b in blocks:
        name = "obs" if not b[1] else "do(" + ",".join(scm.nodes[t] for t in b[1]) + ")"
        regimes += [name] * len(b[0])
    splits = [b[2] for b in blocks for _ in range(len(b[0]))]
    return X, row_targets, regimes, splits
