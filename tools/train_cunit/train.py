"""Trainer for a CausalNetwork.

The objective, per step (standardised data, a mini-batch or all rows):

* interventional likelihood (DCDI): the Gaussian NLL of every node's conditional,
  teacher-forced, with the terms of each row's known intervention targets left out;
* random interventions: with probability ``p_random_intervention`` a row gets an extra
  do() on a random node at its observed value (its term is left out and its incoming
  edges are cut for that row);
* a counterfactual loss (``cf_weight``): for rows with known targets the network rolls
  do(X_T = x_T) forward through its units from zero noise and is scored (squared error in
  noise-sd units) on the non-intervened nodes -- the interventional prediction its
  units imply. This is the only loss where gradient blocking changes the gradients:
  without it, gradients reach the parents of the intervened nodes. It did not change the
  learned graph in the ablation (BENCHMARKS.md); off by default.
* sparsity ``lambda_sparse * sum(A)`` on the soft adjacency and an L2 on the weights;
* acyclicity: NOTEARS' trace exponential ``h(E) = tr(exp(E o E)) - d`` on the effective
  edge weights ``E`` (``A * W``), under an augmented Lagrangian (``alpha h + rho/2 h^2``,
  rho x10 when h falls by less than 4x per round). DAGMA's log-det is available
  (``acyclicity="dagma"``) but NOTEARS' is the default: it is defined everywhere, while
  the log-det needs the spectral radius of ``E o E`` below ``s`` after every step.

The temperature of ``sigmoid(logits / T)`` anneals geometrically over the rounds; training
stops early once the thresholded graph is a DAG and unchanged for ``patience`` rounds.
The graph is then thresholded (|E| > edge_threshold), cycles broken at their weakest
edge, the gates hardened to exactly that graph, and polished by a greedy
add/delete/reverse search under the same interventional likelihood (search.py: closed
form for linear mechanisms; for MLP mechanisms an additive linear-spline surrogate of
the conditional, started from the network's graph and from the empty graph); finally
the mechanisms are refit on the fixed graph."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .engine import CausalNetwork, GramStats
from .graphs import is_dag, make_acyclic
from .search import greedy_polish, search_graph_and_targets


@dataclass
class TrainConfig:
    mechanism: str = "linear"  # linear | mlp
    hidden: int = 16
    lambda_sparse: float = 0.005  # per unit of soft adjacency, per row of data
    lambda_l2: float = 1e-3
    acyclicity: str = "notears"  # notears: tr(exp(E o E)) - d ; dagma: -logdet(sI - E o E)
    lr: float = 3e-2
    batch_size: int = 0  # 0 = full batch
    inner_steps: int = 100  # optimiser steps per augmented-Lagrangian round
    warmup_steps: int = 0  # steps before the acyclicity penalty starts
    max_rounds: int = 12
    rho_start: float = 10.0
    rho_factor: float = 10.0
    rho_max: float = 1e8
    h_tol: float = 1e-8
    temp_start: float = 1.0
    temp_end: float = 0.25
    p_random_intervention: float = 0.0  # per row: an extra do() on a random node
    cf_weight: float = 0.0  # weight of the counterfactual (interventional rollout) loss
    cf_steps: int = 0  # rollout steps (0 = d)
    use_targets: bool = True  # False: ignore known targets (ablation)
    unknown_targets: bool = False  # True: learn each regime's targets (fit's ``regimes``)
    obs_regime: str = "obs"  # unknown targets: the observational regime (never a target)
    block_gradients: bool = True  # False: straight-through do() (ablation)
    gates: bool = True  # False: no learnable adjacency, a plain per-node MLP (ablation)
    val_fraction: float = 0.1
    patience: int = 2  # stop once the thresholded DAG is unchanged this many rounds
    edge_threshold: float = 0.05  # |effective weight| in standardised units
    polish: bool = True  # greedy edge search on the interventional likelihood
    polish_knots: int = 3  # mlp: hinge features per parent in the polish's surrogate score
    polish_random_features: int = 8  # mlp: random tanh features per parent in that score
    refine_steps: int = 200  # steps refitting mechanisms on the final graph (0: off)
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def acyclicity(E: torch.Tensor, kind: str = "notears", s: float = 1.0) -> torch.Tensor:
    """NOTEARS: ``tr(exp(E o E)) - d``; DAGMA: ``-logdet(sI - E o E) + d log s``."""
    S = (E * E).double()
    d = S.shape[0]
    if kind == "notears":
        return torch.linalg.matrix_exp(S).diagonal().sum() - d
    if kind == "dagma":
        M = s * torch.eye(d, dtype=S.dtype) - S
        sign, logabs = torch.linalg.slogdet(M)
        if sign <= 0:
            return torch.tensor(float("inf"), dtype=S.dtype)
        return -logabs + d * math.log(s)
    raise ValueError(f"acyclicity: expected notears or dagma, found {kind!r}")


@dataclass
class FitResult:
    network: CausalNetwork
    adjacency: np.ndarray  # learned DAG, 0/1
    strength: np.ndarray  # effective edge weights (standardised units)
    history: list[dict]
    config: TrainConfig
    steps: int
    seconds: float
    regime_targets: dict[str, list[int]] | None = None  # unknown targets: learned per regime


def _targets_to_mask(targets: list[list[int]], d: int) -> torch.Tensor:
    mask = torch.zeros((len(targets), d), dtype=torch.bool)
    for r, t in enumerate(targets):
        if t:
            mask[r, t] = True
    return mask


def fit(
    X: np.ndarray,
    targets: list[list[int]] | None,
    config: TrainConfig | None = None,
    progress=None,
    regimes: list[str] | None = None,
) -> FitResult:
    """Fit a CausalNetwork to the rows ``X`` (n, d) whose intervention targets are
    ``targets`` (a list per row, empty for observational rows). With
    ``config.unknown_targets`` the targets are not used: ``regimes`` (a name per row)
    groups the rows, and each regime's targets are learned with the graph
    (``RegimeTargetScorer``: a search over graphs and targets on the interventional BIC,
    ``search_graph_and_targets``, gives the targets the network trains with; the polish
    then searches again from the network's graph too and re-chooses them)."""
    import time

    cfg = config or TrainConfig()
    t0 = time.perf_counter()
    n, d = X.shape
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    targets = targets if targets is not None else [[] for _ in range(n)]
    tmask_all = _targets_to_mask(targets, d)
    if not cfg.use_targets:
        tmask_all = torch.zeros_like(tmask_all)

    Xt = torch.as_tensor(X, dtype=torch.float32)
    scorer = None
    if cfg.unknown_targets:
        names = sorted(set(regimes or []))
        if cfg.obs_regime not in names:
            raise ValueError(f"unknown targets: no rows of the observational regime "
                             f"{cfg.obs_regime!r} among {names}")
        reg_ids = np.asarray([names.index(r) for r in regimes])
        obs_rows = torch.as_tensor(reg_ids == names.index(cfg.obs_regime))
        loc = Xt[obs_rows].mean(0)
        scale = Xt[obs_rows].std(0, unbiased=False).clamp(min=1e-8)
        scorer, known = _regime_scorer(((Xt - loc) / scale).double().numpy(), reg_ids,
                                       names.index(cfg.obs_regime), cfg)
        B0, s0 = search_graph_and_targets(scorer, known)
        tmask_all = torch.as_tensor(scorer.target_mask(B0))
    # standardise with the observational rows where a node is not intervened on
    free = ~tmask_all
    cnt = free.sum(0).clamp(min=1)
    loc = (Xt * free).sum(0) / cnt
    var = (((Xt - loc) * free) ** 2).sum(0) / cnt
    scale = var.sqrt().clamp(min=1e-8)
    Z = (Xt - loc) / scale

    net = CausalNetwork(d, "mlp" if cfg.mechanism == "mlp" else "linear", cfg.hidden,
                        temperature=cfg.temp_start, generator=gen)
    net.loc.copy_(loc)
    net.scale.copy_(scale)
    if not cfg.gates:
        with torch.no_grad():
            net.unit.logits.fill_(50.0)
        net.unit.logits.requires_grad_(False)

    perm = rng.permutation(n)
    n_val = int(round(cfg.val_fraction * n)) if n >= 20 else 0
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    Ztr, Mtr = Z[tr_idx], tmask_all[tr_idx]
    Zva, Mva = Z[val_idx], tmask_all[val_idx]
    has_int = Mtr.any(1)
    cf_steps = cfg.cf_steps or d

    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    rho, alpha = cfg.rho_start, 0.0
    h_prev = math.inf
    history: list[dict] = []
    prev_graph, stable = None, 0
    steps = 0
    total_rounds = cfg.max_rounds
    bar = progress(range(total_rounds), desc="training", unit="round") if progress else None

    # the linear mechanism on the full training set: the NLL from sufficient statistics
    # (same value and gradients, O(d^3) a step instead of O(n d^2))
    full_batch = not cfg.batch_size or cfg.batch_size >= len(Ztr)
    gram = (GramStats(Ztr, Mtr if Mtr.any() else None) if cfg.mechanism == "linear"
            and full_batch and cfg.p_random_intervention <= 0 else None)

    def penalised(Zb, Mb, hb_int, train=True):
        if gram is not None:
            nll = net.gram_nll(gram)
        else:
            terms = net.nll_terms(Zb, Mb if Mb.any() else None, block=cfg.block_gradients)
            nll = terms.sum(1).mean()
        A = net.unit.adjacency()
        E = net.unit.edge_strength()
        loss = nll + cfg.lambda_sparse * A.sum() + cfg.lambda_l2 * sum(
            (p * p).sum() for n_, p in net.unit.named_parameters() if n_ != "logits")
        cf = torch.zeros(())
        if cfg.cf_weight > 0 and hb_int.any():
            Zi, Mi = Zb[hb_int], Mb[hb_int]
            zhat = net.rollout(torch.zeros_like(Zi), Mi, Zi, steps=cf_steps,
                               block=cfg.block_gradients)
            err = ((zhat - Zi) * torch.exp(-net.log_scale.detach())).pow(2).masked_fill(Mi, 0)
            cf = err.sum(1).mean()
            loss = loss + cfg.cf_weight * cf
        return loss, nll, cf, E

    for rnd in range(-1 if cfg.warmup_steps else 0, total_rounds):
        frac = max(rnd, 0) / max(1, total_rounds - 1)
        temp = cfg.temp_start * (cfg.temp_end / cfg.temp_start) ** frac
        net.unit.temperature.fill_(temp)
        for _ in range(cfg.inner_steps if rnd >= 0 else cfg.warmup_steps):
            if cfg.batch_size and cfg.batch_size < len(Ztr):
                idx = torch.as_tensor(rng.choice(len(Ztr), cfg.batch_size, replace=False))
                Zb, Mb, hb = Ztr[idx], Mtr[idx], has_int[idx]
            else:
                Zb, Mb, hb = Ztr, Mtr, has_int
            if cfg.p_random_intervention > 0:
                pick = torch.rand(len(Zb), generator=gen) < cfg.p_random_intervention
                node = torch.randint(0, d, (len(Zb),), generator=gen)
                extra = torch.zeros_like(Mb)
                extra[pick, node[pick]] = True
                Mb = Mb | extra
            loss, nll, cf, E = penalised(Zb, Mb, hb)
            h = acyclicity(E, cfg.acyclicity)
            if rnd >= 0:
                loss = loss + (alpha * h + 0.5 * rho * h * h).float()
            total = loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            steps += 1
        net.eval()
        with torch.no_grad():
            E = net.unit.edge_strength()
            h_val = float(acyclicity(E, cfg.acyclicity))
            if len(Zva):
                vterms = net.nll_terms(Zva, Mva if Mva.any() else None)
                val_nll = float(vterms.sum(1).mean())
            else:
                val_nll = float(nll)
        history.append({"round": rnd, "temperature": temp, "rho": rho, "alpha": alpha,
                        "h": h_val, "train_nll": float(nll.detach()),
                        "val_nll": val_nll, "cf_loss": float(cf.detach()),
                        "edges": int((np.abs(E.numpy()) > cfg.edge_threshold).sum())})
        net.train()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(h=f"{h_val:.2e}", nll=f"{val_nll:.3f}")
        if rnd < 0:
            continue
        # augmented Lagrangian update
        alpha += rho * h_val
        if h_val > 0.25 * h_prev and rho < cfg.rho_max:
            rho *= cfg.rho_factor
        h_prev = h_val
        # early stopping: the thresholded graph is a DAG and has not changed for
        # `patience` rounds (or the penalty is numerically zero)
        graph = (np.abs(E.numpy()) > cfg.edge_threshold)
        np.fill_diagonal(graph, False)
        if is_dag(graph) and prev_graph is not None and (graph == prev_graph).all():
            stable += 1
        else:
            stable = 0
        prev_graph = graph
        if h_val < cfg.h_tol or stable >= cfg.patience:
            break
    if bar is not None:
        bar.close()

    net.eval()
    adjacency, strength = extract_graph(net, cfg.edge_threshold)
    regime_targets = None
    if scorer is not None and cfg.gates:
        # unknown targets: the same search over graphs and targets, from the network's
        # graph; the better of it and the empty-graph start wins
        if cfg.polish:
            B1, s1 = search_graph_and_targets(scorer, known, [B0, adjacency])
            adjacency = B1 if s1 < s0 - 1e-9 else B0
        M = scorer.target_mask(adjacency)
        tmask_all = torch.as_tensor(M)
        Mtr = tmask_all[tr_idx]
        regime_targets = {names[r]: [j for j in range(d) if r in
                                     scorer.targets(j, np.flatnonzero(adjacency[:, j]))]
                          for r in range(len(names))}
        net.unit.harden(torch.as_tensor(adjacency))
    elif cfg.polish and cfg.gates:
        # every row the network saw or validated on: the closed-form score needs no
        # held-out rows, and BIC is sharper with all of them
        knots = None if cfg.mechanism == "linear" else cfg.polish_knots
        adjacency = polish(Z.double().numpy(), tmask_all.numpy(), adjacency, knots,
                           cfg.polish_random_features, cfg.seed)
        net.unit.harden(torch.as_tensor(adjacency))
    if cfg.refine_steps and cfg.gates:
        refine(net, Ztr, Mtr, adjacency, cfg)
        with torch.no_grad():
            strength = net.unit.edge_strength(hard=True).numpy() * adjacency
    return FitResult(net, adjacency, strength, history, cfg, steps, time.perf_counter() - t0,
                     regime_targets)


def _regime_scorer(Z: np.ndarray, reg_ids: np.ndarray, obs: int, cfg: TrainConfig):
    """The search's scorer for unknown targets (linear conditionals, or for mlp the
    polish's spline + random-feature surrogate) and the known-target search it
    alternates with."""
    from .search import NodeScorer, RegimeTargetScorer, SplineFeatureScorer

    def spline(M):
        return SplineFeatureScorer(Z, M, cfg.polish_knots, cfg.polish_random_features,
                                   cfg.seed)

    design = None if cfg.mechanism == "linear" else spline(np.zeros(Z.shape, dtype=bool))
    def make(M):
        return NodeScorer(Z, M) if design is None else spline(M)

    def known(M):  # the known-target greedy search from the empty graph
        d = Z.shape[1]
        return greedy_polish(Z, M, np.zeros((d, d), dtype=np.int64), scorer=make(M))

    return RegimeTargetScorer(Z, reg_ids, obs, design), known


def polish(Z: np.ndarray, M: np.ndarray, B: np.ndarray, knots: int | None = None,
           random_features: int = 8, seed: int = 0) -> np.ndarray:
    """The greedy search on the interventional BIC (search.py) started from the network's
    graph ``B`` and from the empty graph; the better penalised score wins. ``knots``:
    None = linear conditionals (closed form); an integer = the MLP mechanisms' surrogate
    conditional: ``knots`` hinges per parent plus ``random_features`` random tanh
    features of the parent set per parent."""
    from .search import NodeScorer, SplineFeatureScorer, greedy_polish

    if knots is None:
        scorer = NodeScorer(Z, M)
    else:
        scorer = SplineFeatureScorer(Z, M, knots, random_features, seed)
    d = Z.shape[1]
    best = None
    for start in (B, np.zeros((d, d), dtype=np.int64)):
        A, score = greedy_polish(Z, M, start, return_score=True, scorer=scorer)
        if best is None or score < best[1] - 1e-9:
            best = (A, score)
    return best[0]


def extract_graph(net: CausalNetwork, threshold: float):
    """The learned DAG: edges whose effective weight exceeds ``threshold`` (cycles broken
    at their weakest edge); the gates are then hardened to exactly that graph."""
    with torch.no_grad():
        E = net.unit.edge_strength().numpy()
    B = (np.abs(E) > threshold).astype(np.int64)
    np.fill_diagonal(B, 0)
    B = make_acyclic(B, E)
    net.unit.harden(torch.as_tensor(B))
    with torch.no_grad():
        E = net.unit.edge_strength().numpy()
    return B, E * B


def refine(net: CausalNetwork, Z, M, B: np.ndarray, cfg: TrainConfig):
    """Fine-tune mechanisms and noise scales on the hardened graph (structure fixed)."""
    params = [p for n_, p in net.named_parameters() if p.requires_grad and n_ != "unit.logits"]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    net.train()
    gram = GramStats(Z, M if M.any() else None) if net.unit.mechanism == "linear" else None
    for _ in range(cfg.refine_steps):
        if gram is not None:
            loss = net.gram_nll(gram, hard=True)
        else:
            loss = net.nll_terms(Z, M if M.any() else None, hard=True).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
