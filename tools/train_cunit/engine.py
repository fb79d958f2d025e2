"""The causal-unit engine: soft adjacency, per-node mechanisms and a do() operator whose
backward pass cuts the gradient into intervened nodes.

Everything here works on standardised values ``z`` (``CausalNetwork`` keeps the
per-column location and scale to map raw units in and out).

* ``DoIntervention`` -- a ``torch.autograd.Function``: forward replaces the intervened
  entries of ``pred`` by the intervention values; backward gives exactly ``0.0`` to
  ``pred`` at the intervened entries, so nothing upstream of an intervened node (its
  parents' values, the logits and weights of its incoming edges) receives gradient
  through it. ``block=False`` (used only for the ablation) passes the gradient
  straight through instead, as if the node had not been intervened on.
* ``CausalUnit`` -- adjacency ``A = sigmoid(logits / temperature)`` (diagonal fixed at 0)
  masking each node's parents; per-node mechanisms ``linear`` (``z_j = sum_i A_ij W_ij
  z_i + b_j``) or ``mlp`` (one hidden layer per node over ``A[:, j] * z``). A do() on
  node j replaces its output through ``DoIntervention``: the mechanism's output (the
  only place its incoming edges act) is discarded forward and gets exactly zero
  gradient backward, which cuts the incoming edges. ``hard=True`` thresholds the
  adjacency at 0.5 (used for do() queries, sampling and counterfactuals).
* ``CausalNetwork`` -- the unit unrolled over graph depth (a weight-tied network of
  units) plus a Gaussian noise model per node: interventional NLL (the terms of
  intervened nodes masked, as DCDI does), ancestral sampling under do(), and
  counterfactuals by abduction - action - prediction.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LOG_2PI = math.log(2 * math.pi)


class DoIntervention(torch.autograd.Function):
    """``out = where(mask, values, pred)`` with the gradient into intervened ``pred``
    entries exactly zero (``block=True``) or passed straight through (``block=False``)."""

    @staticmethod
    def forward(ctx, pred, values, mask, block):
        ctx.save_for_backward(mask)
        ctx.block = bool(block)
        return torch.where(mask, values, pred)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
        grad_pred = torch.where(mask, zero, grad) if ctx.block else grad
        grad_values = torch.where(mask, grad, zero) if ctx.needs_input_grad[1] else None
        return grad_pred, grad_values, None, None


def do(pred: torch.Tensor, values, mask, block: bool = True) -> torch.Tensor:
    """Apply do(): ``mask`` (bool, broadcastable to ``pred``) marks intervened entries,
    ``values`` their values (a tensor broadcastable to ``pred``, or a number)."""
    if mask is None:
        return pred
    mask = torch.as_tensor(mask, dtype=torch.bool, device=pred.device).expand_as(pred)
    values = torch.as_tensor(values, dtype=pred.dtype, device=pred.device).expand_as(pred)
    return DoIntervention.apply(pred, values, mask, block)


def intervention_mask(n: int, d: int, targets, device=None) -> torch.Tensor:
    """A (n, d) bool mask from a list of node indices (every row) or a list of lists."""
    mask = torch.zeros((n, d), dtype=torch.bool, device=device)
    if targets and isinstance(targets[0], (list, tuple)):
        for r, t in enumerate(targets):
            mask[r, list(t)] = True
    elif targets:
        mask[:, list(targets)] = True
    return mask


class CausalUnit(nn.Module):
    def __init__(
        self,
        d: int,
        mechanism: str = "linear",
        hidden: int = 16,
        init_logit: float = 2.0,
        init_scale: float = 0.1,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if mechanism not in ("linear", "mlp"):
            raise ValueError(f"mechanism: expected linear or mlp, found {mechanism!r}")
        self.d, self.mechanism, self.hidden = d, mechanism, hidden
        self.logits = nn.Parameter(torch.full((d, d), float(init_logit)))
        self.register_buffer("allowed", 1.0 - torch.eye(d))  # 0 = edge forbidden
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        # training: Bernoulli gates via the straight-through Gumbel-sigmoid (DCDI), so that
        # a gate cannot be traded against the size of its weight
        self.stochastic = False
        self._generator = generator

        def randn(*shape):
            return torch.randn(*shape, generator=generator) * init_scale

        if mechanism == "linear":
            self.weight = nn.Parameter(randn(d, d))
            self.bias = nn.Parameter(torch.zeros(d))
        else:
            self.w1 = nn.Parameter(randn(d, d, hidden) * 3.0)
            self.b1 = nn.Parameter(randn(d, hidden) * 3.0)
            self.w2 = nn.Parameter(randn(d, hidden) * 3.0)
            self.b2 = nn.Parameter(torch.zeros(d))

    # -- adjacency -----------------------------------------------------------------
    def adjacency(self, hard: bool = False) -> torch.Tensor:
        """Soft adjacency sigmoid(logits / temperature); ``hard`` thresholds it at 0.5."""
        soft = torch.sigmoid(self.logits / self.temperature) * self.allowed
        if hard:
            return (soft > 0.5).to(soft.dtype)
        return soft

    def mask(self, hard: bool = False) -> torch.Tensor:
        """The parent mask the mechanisms see: a straight-through Bernoulli sample of the
        soft adjacency while training (forward 0/1, gradient of the relaxed sample), the
        hard adjacency when ``hard``, else the soft adjacency."""
        if hard or not (self.training and self.stochastic):
            return self.adjacency(hard)
        u = torch.rand(self.logits.shape, generator=self._generator).clamp(1e-6, 1 - 1e-6)
        noise = torch.log(u) - torch.log1p(-u)
        soft = torch.sigmoid((self.logits + noise) / self.temperature) * self.allowed
        return soft + ((soft > 0.5).to(soft.dtype) - soft).detach()

    def edge_strength(self, hard: bool = False) -> torch.Tensor:
        """Effective weight of every edge: ``A * W`` (linear, signed) or ``A * ||W1_ij||``
        (MLP: the norm of the first-layer weights that read parent i in node j)."""
        A = self.adjacency(hard)
        if self.mechanism == "linear":
            return A * self.weight
        return A * self.w1.pow(2).sum(-1).add(1e-12).sqrt()

    @torch.no_grad()
    def harden(self, keep: torch.Tensor, big: float = 30.0) -> None:
        """Fold the soft gates into the weights: edges in ``keep`` (0/1) get gate 1 and
        weight ``A * W`` (the function is unchanged), all others are cut (gate 0)."""
        A = self.adjacency()
        if self.mechanism == "linear":
            self.weight.mul_(A)
        else:
            self.w1.mul_(A.unsqueeze(-1))
        keep = keep.to(A.dtype) * self.allowed
        self.logits.copy_((2 * keep - 1) * big * self.temperature)
        self.allowed.copy_(keep)

    # -- forward ---------------------------------------------------------------------
    def forward(self, z, do_mask=None, do_values=None, noise=None, hard=False, block=True):
        """One step of the structural equations: every node's mechanism applied to its
        (masked) parents in ``z``; intervened nodes get their do() value instead.

        The cut of an intervened node's incoming edges is the replacement itself: its
        mechanism's output is discarded in the forward pass and, through
        ``DoIntervention``, gets exactly zero gradient, so neither its parents' values nor
        the logits / weights of its incoming edges receive anything through it. Inputs
        that are intervened on are replaced too (``z`` may hold stale values in a
        rollout); pass ``do_values=z`` (teacher forcing) to skip that no-op."""
        A = self.mask(hard)
        if do_mask is not None and do_values is not z:
            z = do(z, do_values, do_mask, block)
        if self.mechanism == "linear":
            pred = z @ (A * self.weight) + self.bias
        else:
            h = torch.einsum("bi,ijk->bjk", z, A.unsqueeze(-1) * self.w1)
            h = torch.nn.functional.leaky_relu(h + self.b1, 0.1)
            pred = (h * self.w2).sum(-1) + self.b2
        if noise is not None:
            pred = pred + noise
        if do_mask is None:
            return pred
        return do(pred, do_values, do_mask, block)


class GramStats:
    """Sufficient statistics of standardised rows ``z`` (n, d) for the linear mechanism's
    teacher-forced Gaussian NLL: per node j the Gram matrix ``G_j`` (d+1, d+1) of
    ``[z, 1]`` over the rows where j is not intervened on, and their count ``m_j``."""

    def __init__(self, z: torch.Tensor, target_mask: torch.Tensor | None = None):
        n, d = z.shape
        x = torch.cat([z.double(), torch.ones(n, 1, dtype=torch.float64)], 1)
        total = x.T @ x
        self.G = total.expand(d, d + 1, d + 1).clone()  # (d, d+1, d+1)
        self.m = torch.full((d,), float(n), dtype=torch.float64)
        if target_mask is not None:  # each node: all rows less its intervened ones
            for j in range(d):
                xi = x[target_mask[:, j]]
                self.G[j] -= xi.T @ xi
                self.m[j] -= len(xi)
        self.n = n


class CausalNetwork(nn.Module):
    """A causal unit unrolled over graph depth with a Gaussian noise model per node."""

    def __init__(self, d: int, mechanism: str = "linear", hidden: int = 16, **unit_kw):
        super().__init__()
        self.d = d
        self.unit = CausalUnit(d, mechanism, hidden, **unit_kw)
        self.log_scale = nn.Parameter(torch.zeros(d))
        self.register_buffer("loc", torch.zeros(d))
        self.register_buffer("scale", torch.ones(d))

    # standardisation -------------------------------------------------------------------
    def to_z(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.loc) / self.scale

    def from_z(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.scale + self.loc

    # likelihood ------------------------------------------------------------------------
    def nll_terms(self, z, target_mask=None, hard=False, block=True):
        """Per-entry Gaussian NLL (n, d) of the conditionals, teacher-forced, with the
        terms of intervened nodes set to 0 (their conditional is the intervention's,
        not the model's: DCDI's interventional likelihood)."""
        pred = self.unit(z, target_mask, z if target_mask is not None else None, hard=hard,
                         block=block)
        ls = self.log_scale
        terms = 0.5 * ((z - pred) * torch.exp(-ls)).pow(2) + ls + 0.5 * LOG_2PI
        if target_mask is not None:
            terms = terms.masked_fill(target_mask, 0.0)
        return terms

    def gram_nll(self, stats: GramStats, hard: bool = False) -> torch.Tensor:
        """``nll_terms(z, target_mask, hard).sum(1).mean()`` for the linear mechanism from
        the rows' sufficient statistics (``GramStats`` of the same z and mask): node j's
        residual sum of squares over its free rows is ``c_j' G_j c_j`` with ``c_j = e_j -
        [W_eff[:, j]; b_j]``, so a step costs O(d^3) instead of O(n d^2). Same value and
        gradients up to rounding (the quadratic form is evaluated in float64); the
        do()-cut needs no code here, as in ``nll_terms`` the intervened terms are simply
        absent."""
        if self.unit.mechanism != "linear":
            raise ValueError("gram_nll: only the linear mechanism has a closed-form NLL")
        d = self.d
        W = (self.unit.mask(hard) * self.unit.weight).double()
        C = torch.cat([torch.eye(d, dtype=W.dtype) - W, -self.unit.bias.double()[None]], 0)
        Ct = C.T  # (d, d+1): row j is c_j
        rss = (torch.bmm(stats.G, Ct.unsqueeze(-1)).squeeze(-1) * Ct).sum(1)  # (d,)
        ls = self.log_scale.double()
        nll = 0.5 * rss * torch.exp(-2 * ls) + stats.m * (ls + 0.5 * LOG_2PI)
        return (nll.sum() / stats.n).to(self.log_scale.dtype)

    def depth_steps(self, hard: bool = True) -> int:
        """How many unit steps a rollout needs: longest path of the hard graph + 1."""
        A = (self.unit.adjacency(hard=True) > 0).cpu()
        reach = torch.eye(self.d, dtype=torch.bool)
        steps = 1
        frontier = reach.clone()
        for _ in range(self.d):
            frontier = (frontier.float() @ A.float()) > 0
            if not frontier.any():
                break
            steps += 1
        return min(steps, self.d + 1)

    def rollout(self, z0, do_mask=None, do_values=None, noise=None, steps=None, hard=False,
                block=True):
        """Propagate the structural equations ``steps`` times from ``z0`` (for a DAG of
        depth k, k + 1 steps reach the fixed point)."""
        steps = steps or self.d
        z = z0 if do_mask is None else do(z0, do_values, do_mask, block)
        for _ in range(steps):
            z = self.unit(z, do_mask, do_values, noise=noise, hard=hard, block=block)
        return z

    def abduct(self, z, target_mask=None, hard=True):
        """The noise of every row under the model: ``z - f(parents)`` (0 at targets)."""
        pred = self.unit(z, target_mask, z if target_mask is not None else None, hard=hard)
        u = z - pred
        if target_mask is not None:
            u = u.masked_fill(target_mask, 0.0)
        return u

    @torch.no_grad()
    def counterfactual(self, z, do_mask, do_values, factual_mask=None, hard=True):
        """Abduction - action - prediction (in standardised units)."""
        u = self.abduct(z, factual_mask, hard=hard)
        steps = self.depth_steps() if hard else self.d
        return self.rollout(z, do_mask, do_values, noise=u, steps=steps, hard=hard)

    @torch.no_grad()
    def sample(self, n, do_mask=None, do_values=None, hard=True, generator=None):
        """Ancestral samples (standardised units) under do()."""
        noise = torch.randn(n, self.d, generator=generator) * torch.exp(self.log_scale)
        z0 = torch.zeros(n, self.d)
        steps = self.depth_steps() if hard else self.d
        return self.rollout(z0, do_mask, do_values, noise=noise, steps=steps, hard=hard)
