"""Metrics of a fitted network: structure, held-out interventional NLL, counterfactuals."""

from __future__ import annotations

import math

import numpy as np
import torch

from .engine import CausalNetwork, intervention_mask
from .graphs import structure_metrics
from .scm import SCM


@torch.no_grad()
def interventional_nll(net: CausalNetwork, X: np.ndarray, targets: list[list[int]]):
    """Per-row NLL (table units) with the intervened nodes' terms left out (DCDI)."""
    x = torch.as_tensor(X, dtype=torch.float32)
    z = net.to_z(x)
    mask = intervention_mask(len(X), net.d, targets)
    terms = net.nll_terms(z, mask if mask.any() else None, hard=True)
    # change of variables from z back to the table's units
    terms = terms + torch.log(net.scale).masked_fill(mask, 0.0) * (~mask)
    return terms.sum(1).double().numpy()


@torch.no_grad()
def counterfactual_metrics(
    net: CausalNetwork,
    scm: SCM,
    X: np.ndarray,
    rng: np.random.Generator,
    standardized: dict | None = None,
    n_max: int = 500,
) -> dict[str, float]:
    """For observational rows: do(X_k = v) on one random node per row, v taken from
    another row; the model's counterfactual (abduction - action - prediction) against
    the SCM's true one. ``cf_corr``: Pearson correlation of the counterfactual changes
    (x_cf - x) over the non-intervened entries; ``cf_mse``: mean squared error of x_cf in
    the model's standardised units."""
    n, d = X.shape
    if n == 0:
        return {}
    rows = rng.choice(n, size=min(n, n_max), replace=False)
    x = X[rows]
    k = rng.integers(0, d, size=len(rows))
    donors = rng.integers(0, n, size=len(rows))
    v = X[donors, k]
    loc = np.asarray(standardized["loc"]) if standardized else np.zeros(d)
    sc = np.asarray(standardized["scale"]) if standardized else np.ones(d)
    raw = x * sc + loc
    truth = np.empty_like(x)
    for node in np.unique(k):
        sel = k == node
        do_vals = v[sel] * sc[node] + loc[node]
        truth[sel] = (scm.counterfactual(raw[sel], {int(node): do_vals}) - loc) / sc
    mask = torch.zeros((len(rows), d), dtype=torch.bool)
    mask[torch.arange(len(rows)), torch.as_tensor(k)] = True
    xt = torch.as_tensor(x, dtype=torch.float32)
    vals = xt.clone()
    vals[torch.arange(len(rows)), torch.as_tensor(k)] = torch.as_tensor(v, dtype=torch.float32)
    pred = net.from_z(net.counterfactual(net.to_z(xt), mask, net.to_z(vals))).double().numpy()
    free = ~mask.numpy()
    scale = net.scale.double().numpy()
    err = ((pred - truth) / scale)[free]
    dp, dt = (pred - x)[free], (truth - x)[free]
    corr = float(np.corrcoef(dp, dt)[0, 1]) if dp.std() > 0 and dt.std() > 0 else math.nan
    return {"cf_corr": corr, "cf_mse": float(np.mean(err**2)), "cf_rows": float(len(rows))}


def metric_rows(
    structure: dict | None,
    cf: dict | None,
    nll_by_regime: dict[str, tuple[float, int]] | None,
    training: dict,
    history: list[dict],
    targets: dict | None = None,
) -> list[dict]:
    rows: list[dict] = []

    def add(metric, value, group, regime=None, step=None, n=None):
        value = None if value is None or (isinstance(value, float) and math.isnan(value)) \
            else float(value)
        rows.append({"metric": metric, "value": value, "group": group, "regime": regime,
                     "step": step, "n": n})

    for k, v in (structure or {}).items():
        add(k, v, "structure")
    for k, v in (targets or {}).items():
        add(k, v, "targets")
    for k, v in (cf or {}).items():
        if k != "cf_rows":
            add(k, v, "counterfactual", n=int(cf.get("cf_rows", 0)))
    for regime, (v, cnt) in (nll_by_regime or {}).items():
        add("int_nll", v, "likelihood", regime=regime, n=cnt)
    for k, v in training.items():
        add(k, v, "training")
    for h in history:
        for k in ("h", "train_nll", "val_nll", "temperature", "rho", "edges", "cf_loss"):
            if k in h:
                add(k, h[k], "history", step=int(h["round"]))
    return rows


__all__ = ["interventional_nll", "counterfactual_metrics", "metric_rows", "structure_metrics"]
