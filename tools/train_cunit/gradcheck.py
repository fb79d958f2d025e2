"""Gradient checks of the do() operator (``dolm-train-cunit check-gradients`` and tests).

For each set of intervened nodes T (one or several at once):

* ``incoming-edges``: after a rollout through the soft graph and a loss on every output,
  the gradient of the logits and weights of every edge INTO a node of T is exactly 0.0.
* ``intervened-outputs``: a loss on the intervened nodes' outputs gives exactly 0.0
  gradient to every input (the parents' values included).
* ``separated-noise``: in a rollout through the hard graph, the gradient from node j's
  value to the noise of node i is exactly 0.0 whenever every path i -> j passes
  through T (the parents of T and their ancestors cannot reach past T).
* ``vs-autograd``: all other gradients (parameters and inputs) equal those of a plain
  autograd implementation of the same forward pass (``torch.where``, no custom
  Function) -- max |difference| reported, in float64.

With ``block=False`` (the straight-through ablation) the zero checks fail, which shows
they are not vacuous.
"""

from __future__ import annotations

import numpy as np
import torch

from .engine import CausalNetwork, CausalUnit


def _reference_unit(unit: CausalUnit, z, mask, values, noise=None, hard=False):
    """The unit's forward in plain autograd (no custom Function)."""
    A = unit.adjacency(hard)
    z = torch.where(mask, values, z)
    keep = (~mask).to(z.dtype)
    if unit.mechanism == "linear":
        pred = (z @ (A * unit.weight)) * keep + unit.bias
    else:
        h = torch.einsum("bi,ijk->bjk", z, A.unsqueeze(-1) * unit.w1) * keep.unsqueeze(-1)
        h = torch.nn.functional.leaky_relu(h + unit.b1, 0.1)
        pred = (h * unit.w2).sum(-1) + unit.b2
    if noise is not None:
        pred = pred + noise
    return torch.where(mask, values, pred)


def _reference_rollout(net, z0, mask, values, noise, steps, hard):
    z = torch.where(mask, values, z0)
    for _ in range(steps):
        z = _reference_unit(net.unit, z, mask, values, noise, hard)
    return z


def _grads(loss, tensors):
    gs = torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, tensors, strict=True)]


def _separated(B: np.ndarray, T: list[int]) -> np.ndarray:
    """sep[i, j]: i != j, i not in T, and every directed path i -> j passes through T
    (including: no path at all is NOT counted; only pairs connected in the full graph)."""
    d = B.shape[0]

    def reach(M):
        R = M.astype(bool) | np.eye(d, dtype=bool)
        for _ in range(d):
            R = R | ((R.astype(int) @ R.astype(int)) > 0)
        return R

    full = reach(B)
    cut = B.copy()
    cut[:, T] = 0  # edges into T are cut by do()
    R_cut = reach(cut)
    Bt = B.copy()
    Bt[T, :] = 0  # paths not through T
    Bt[:, T] = 0
    R_noT = reach(Bt)
    sep = full & ~R_noT
    sep[T, :] = False
    np.fill_diagonal(sep, False)
    return sep & ~(R_cut & ~full)


def _separating_dag(d: int, T: list[int], g: torch.Generator) -> torch.Tensor:
    others = [i for i in torch.randperm(d, generator=g).tolist() if i not in T]
    half = (len(others) + 1) // 2
    order = others[:half] + list(T) + others[half:]
    dag = torch.zeros(d, d, dtype=torch.float64)
    for a, b in zip(order, order[1:], strict=False):
        dag[a, b] = 1.0
    for side in (others[:half], others[half:]):
        for x in range(len(side)):
            for y in range(x + 2, len(side)):
                if torch.rand((), generator=g) < 0.5:
                    dag[side[x], side[y]] = 1.0
    return dag


def check_gradients(
    d: int = 6,
    target_sets: list[list[int]] | None = None,
    mechanisms: tuple[str, ...] = ("linear", "mlp"),
    n: int = 16,
    seed: int = 0,
    block: bool = True,
) -> list[dict]:
    target_sets = target_sets or [[d // 2], [1, d - 2]]
    rows: list[dict] = []
    for mech in mechanisms:
        g = torch.Generator().manual_seed(seed)
        net = CausalNetwork(d, mech, hidden=8, init_scale=0.5, generator=g).double()
        with torch.no_grad():
            net.unit.logits.copy_(torch.randn(d, d, generator=g, dtype=torch.float64) * 2)
        for T in target_sets:
            label = ",".join(map(str, T))
            mask = torch.zeros((n, d), dtype=torch.bool)
            mask[:, T] = True
            z0 = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
            noise = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
            values = torch.randn(n, d, generator=g, dtype=torch.float64)
            coef = torch.randn(n, d, generator=g, dtype=torch.float64)
            params = [p for _, p in net.named_parameters()]
            names = [k for k, _ in net.named_parameters()]
            in_w = "unit.weight" if mech == "linear" else "unit.w1"

            # 1. incoming edges, soft graph rollout, loss on every output
            out = net.rollout(z0, mask, values, noise=noise, steps=d, block=block)
            ref = _reference_rollout(net, z0, mask, values, noise, d, hard=False)
            ga = _grads((coef * out).sum(), params + [z0, noise])
            gr = _grads((coef * ref).sum(), params + [z0, noise])
            inc = []
            for nm, gg in zip(names, ga, strict=False):
                if nm in ("unit.logits", in_w):
                    inc.append(gg[:, T].abs().max().item())
            blocked = max(inc)
            diff = max((a - b).abs().max().item() for a, b in zip(ga, gr, strict=True))
            nonzero = sum(int((gg != 0).sum()) for gg in ga)
            rows.append({"mechanism": mech, "targets": label, "check": "incoming-edges",
                         "max_abs_blocked_grad": blocked, "max_abs_diff_vs_autograd": diff,
                         "nonzero_grads_elsewhere": nonzero,
                         "ok": blocked == 0.0 and diff <= 1e-12})

            # 2. a loss on the intervened outputs only: nothing upstream gets gradient
            out1 = net.unit(z0, mask, values, block=block)
            ref1 = _reference_unit(net.unit, z0, mask, values)
            ga = _grads((coef * out1)[:, T].sum(), params + [z0])
            blocked = max(gg.abs().max().item() for nm, gg in zip(names + ["z"], ga, strict=True)
                          if nm not in ("log_scale",))
            gfull = _grads((coef * out1).sum(), params + [z0])
            gref = _grads((coef * ref1).sum(), params + [z0])
            diff = max((a - b).abs().max().item() for a, b in zip(gfull, gref, strict=True))
            rows.append({"mechanism": mech, "targets": label, "check": "intervened-outputs",
                         "max_abs_blocked_grad": blocked, "max_abs_diff_vs_autograd": diff,
                         "nonzero_grads_elsewhere": sum(int((x != 0).sum()) for x in gfull),
                         "ok": blocked == 0.0 and diff <= 1e-12})

            # 3. hard DAG rollout: noise of i cannot reach j past T. The DAG: a chain
            # through (upstream nodes, T, downstream nodes) plus random edges within
            # each side, so that T separates the two sides
            dag = _separating_dag(d, T, g)
            saved = net.unit.allowed.clone()
            net.unit.allowed.copy_(dag)
            with torch.no_grad():
                net.unit.logits.copy_(torch.where(dag > 0, 3.0, -3.0))
            B = (net.unit.adjacency(hard=True) > 0).numpy().astype(int)
            sep = _separated(B, T)
            out3 = net.rollout(z0, mask, values, noise=noise, steps=d, hard=True, block=block)
            ref3 = _reference_rollout(net, z0, mask, values, noise, d, hard=True)
            worst, diff = 0.0, 0.0
            for j in range(d):
                gj = _grads(out3[:, j].sum(), [noise])[0]
                rj = _grads(ref3[:, j].sum(), [noise])[0]
                diff = max(diff, (gj - rj).abs().max().item())
                for i in np.flatnonzero(sep[:, j]):
                    worst = max(worst, gj[:, i].abs().max().item())
            net.unit.allowed.copy_(saved)
            rows.append({"mechanism": mech, "targets": label, "check": "separated-noise",
                         "max_abs_blocked_grad": worst, "max_abs_diff_vs_autograd": diff,
                         "nonzero_grads_elsewhere": int(sep.sum()),
                         "ok": worst == 0.0 and diff <= 1e-12})
    return rows
