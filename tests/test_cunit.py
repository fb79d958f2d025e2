"""dolm-train-cunit engine: do() gradients, acyclicity, metrics, learning on small SCMs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dolm_tools.train_cunit.engine import CausalNetwork, CausalUnit, GramStats, do
from dolm_tools.train_cunit.gradcheck import check_gradients
from dolm_tools.train_cunit.graphs import (
    canonical,
    find_cycle,
    is_dag,
    make_acyclic,
    random_dag,
    structure_metrics,
)
from dolm_tools.train_cunit.metrics import counterfactual_metrics
from dolm_tools.train_cunit.scm import SCM, graph_from_spec, make_scm, simulate_regimes
from dolm_tools.train_cunit.search import greedy_polish
from dolm_tools.train_cunit.train import TrainConfig, acyclicity, fit, polish

torch.set_num_threads(1)

FAST = dict(inner_steps=100, max_rounds=6, refine_steps=50)


def chain_unit(mechanism="linear"):
    """A hard chain A -> B -> C (gates saturated) with non-trivial weights."""
    g = torch.Generator().manual_seed(0)
    unit = CausalUnit(3, mechanism, hidden=4, init_scale=0.7, generator=g).double()
    with torch.no_grad():
        unit.logits.copy_(torch.tensor([[-9.0, 9, -9], [-9, -9, 9], [-9, -9, -9]]))
    return unit


# ------------------------------------------------------------------ do() and gradients


def test_do_forward_replaces_values_and_cuts_incoming_edges():
    unit = chain_unit()
    z = torch.randn(5, 3, dtype=torch.float64)
    mask = torch.zeros(5, 3, dtype=torch.bool)
    mask[:, 1] = True
    vals = torch.full((5, 3), 7.0, dtype=torch.float64)
    out = unit(z, mask, vals)
    assert torch.equal(out[:, 1], vals[:, 1])  # replaced
    # C reads the intervened value of B, not B's own input
    plain = unit(torch.where(mask, vals, z))
    assert torch.allclose(out[:, 2], plain[:, 2])
    # a do() on B: changing A changes nothing downstream of B in a rollout
    net = CausalNetwork(3)
    net.unit = unit
    net = net.double()
    z2 = z.clone()
    z2[:, 0] += 5.0
    r1 = net.rollout(z, mask, vals, steps=3, hard=True)
    r2 = net.rollout(z2, mask, vals, steps=3, hard=True)
    assert torch.equal(r1[:, 1:], r2[:, 1:])


@pytest.mark.parametrize("mechanism", ["linear", "mlp"])
def test_chain_gradient_through_intervened_node_is_exactly_zero(mechanism):
    unit = chain_unit(mechanism)
    net = CausalNetwork(3, mechanism, hidden=4).double()
    net.unit = unit
    z0 = torch.randn(8, 3, dtype=torch.float64)
    noise = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    vals = torch.randn(8, 3, dtype=torch.float64)
    mask = torch.zeros(8, 3, dtype=torch.bool)
    mask[:, 1] = True  # do(B)
    in_w = unit.weight if mechanism == "linear" else unit.w1
    # soft graph: the logits and weights of the edges into B get exactly 0.0
    net.rollout(z0, mask, vals, noise=noise, steps=3)[:, 2].sum().backward()
    assert (unit.logits.grad[:, 1] == 0.0).all()
    assert (in_w.grad[:, 1] == 0.0).all()
    assert unit.logits.grad[1, 2] != 0 and in_w.grad[1, 2].abs().sum() > 0  # B -> C learns
    # hard graph: A's noise (B's parent) cannot reach C past do(B) ...
    noise.grad = None
    net.rollout(z0, mask, vals, noise=noise, steps=3, hard=True)[:, 2].sum().backward()
    assert (noise.grad[:, 0] == 0.0).all()
    # ... though it does without the do()
    noise.grad = None
    net.rollout(z0, None, None, noise=noise, steps=3, hard=True)[:, 2].sum().backward()
    assert (noise.grad[:, 0] != 0).all()


@pytest.mark.parametrize("targets", [[[2]], [[1, 4]], [[0, 2, 5]]])
def test_gradient_checks_single_and_multiple_interventions(targets):
    rows = check_gradients(d=6, target_sets=targets, seed=1)
    assert len(rows) == 6
    for r in rows:
        assert r["max_abs_blocked_grad"] == 0.0, r  # exactly zero upstream of do()
        assert r["max_abs_diff_vs_autograd"] == pytest.approx(0.0, abs=1e-12), r
        assert r["nonzero_grads_elsewhere"] > 0, r  # the check is not vacuous


def test_straight_through_ablation_leaks_gradient():
    rows = check_gradients(d=6, target_sets=[[2]], mechanisms=("linear",), block=False)
    leaked = {r["check"]: r["max_abs_blocked_grad"] for r in rows}
    assert leaked["intervened-outputs"] > 0


def test_do_values_receive_the_gradient_of_the_intervened_entries():
    pred = torch.randn(4, 3, requires_grad=True)
    vals = torch.randn(4, 3, requires_grad=True)
    mask = torch.tensor([[True, False, False]] * 4)
    coef = torch.randn(4, 3)
    (coef * do(pred, vals, mask)).sum().backward()
    assert torch.equal(pred.grad, torch.where(mask, 0.0, coef))
    assert torch.equal(vals.grad, torch.where(mask, coef, 0.0))


# ------------------------------------------------------------------ graphs and penalties


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("with_targets", [False, True])
def test_gram_nll_equals_the_row_by_row_nll_and_its_gradients(hard, with_targets):
    """The linear engine's NLL from sufficient statistics (what training uses) against the
    row-by-row teacher-forced NLL: same value and the same gradient for every parameter."""
    gen = torch.Generator().manual_seed(3)
    n, d = 400, 6
    z = torch.randn(n, d, generator=gen)
    mask = (torch.rand(n, d, generator=gen) < 0.15) if with_targets else None
    net = CausalNetwork(d, "linear", generator=gen)
    with torch.no_grad():
        for p in (net.log_scale, net.unit.logits, net.unit.bias, net.unit.weight):
            p.copy_(torch.randn(p.shape, generator=gen))
    params = [net.log_scale, net.unit.logits, net.unit.bias, net.unit.weight]
    rows = net.nll_terms(z, mask, hard=hard).sum(1).mean()
    g_rows = torch.autograd.grad(rows, params, allow_unused=True)
    gram = net.gram_nll(GramStats(z, mask), hard=hard)
    g_gram = torch.autograd.grad(gram, params, allow_unused=True)
    assert gram.item() == pytest.approx(rows.item(), rel=1e-6)
    for a, b in zip(g_rows, g_gram, strict=True):
        if a is None:  # hard gates: no gradient into the logits on either path
            assert b is None or float(b.abs().max()) == 0.0
            continue
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    if with_targets:  # the intervened entries really are left out
        assert not torch.allclose(gram, net.gram_nll(GramStats(z, None), hard=hard))


def test_acyclicity_penalties_are_zero_exactly_on_dags():
    E = torch.tensor([[0.0, 0.8, 0.0], [0.0, 0.0, 0.5], [0.0, 0.0, 0.0]])
    for kind in ("notears", "dagma"):
        assert float(acyclicity(E, kind)) == pytest.approx(0.0, abs=1e-9)
        E2 = E.clone()
        E2[2, 0] = 0.6
        assert float(acyclicity(E2, kind)) > 1e-3


def test_structure_metrics_count_reversals_and_extras():
    nodes, B = canonical("chain")  # A -> B -> C
    E = np.array([[0, 1, 1], [0, 0, 0], [0, 1, 0]])  # A->B ok, C->B reversed, A->C extra
    m = structure_metrics(B, E)
    assert m["tpr"] == 0.5 and m["n_reversed"] == 1
    assert m["shd"] == 2.0  # one reversed + one extra
    assert m["f1"] == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))
    assert m["skeleton_f1"] == pytest.approx(0.8)  # skeleton {AB, BC, AC} vs {AB, BC}
    # a CPDAG: A - B undirected, B -> C: one correct + one reversed prediction, SHD 1
    U = np.array([[0, 1, 0], [1, 0, 1], [0, 0, 0]])
    m = structure_metrics(B, U)
    assert m["shd"] == 1.0 and m["n_reversed"] == 1 and m["skeleton_f1"] == 1.0
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 1.0 / (2 / 3 + 1.0))


def test_random_graphs_are_dags_and_cycles_are_found():
    rng = np.random.default_rng(0)
    for kind in ("er", "sf"):
        B = random_dag(15, 2, kind, rng)
        assert is_dag(B) and B.sum() > 0
    C = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]])
    assert sorted(find_cycle(C)) == [0, 1, 2]
    strength = np.array([[0, 0.9, 0], [0, 0, 0.8], [0.1, 0, 0]])
    assert (make_acyclic(C, strength) == np.array([[0, 1, 0], [0, 0, 1], [0, 0, 0]])).all()


def test_scm_counterfactual_is_abduction_action_prediction():
    rng = np.random.default_rng(0)
    nodes, B = canonical("chain")
    scm = make_scm(nodes, B, "linear", rng)
    X = scm.sample(50, rng)
    cf = scm.counterfactual(X, {1: np.full(50, 2.0)})
    U = X - scm.parent_term(X)
    assert np.allclose(cf[:, 0], X[:, 0])  # non-descendants unchanged
    assert np.allclose(cf[:, 2], scm.W[1, 2] * 2.0 + U[:, 2])
    assert SCM.from_dict(scm.to_dict()).to_dict() == scm.to_dict()


def test_greedy_polish_repairs_a_reversed_edge():
    rng = np.random.default_rng(3)
    nodes, B = canonical("collider")  # A -> C <- B
    scm = make_scm(nodes, B, "linear", rng)
    X, tg, _, _ = simulate_regimes(scm, rng, n_obs=1000, n_per_target=300)
    X = (X - X.mean(0)) / X.std(0)
    mask = np.zeros(X.shape, dtype=bool)
    for r, t in enumerate(tg):
        mask[r, t] = True
    wrong = np.array([[0, 0, 1], [0, 0, 0], [0, 1, 0]])  # A -> C, C -> B (reversed)
    fixed = greedy_polish(X, mask, wrong)
    assert (fixed == B).all()


# ------------------------------------------------------------------ learning


def _data(graph, seed, standardize=True, n_obs=800, n_per_target=300, mechanism="linear"):
    rng = np.random.default_rng(seed)
    nodes, B = canonical(graph)
    scm = make_scm(nodes, B, mechanism, rng)
    X, tg, _, _ = simulate_regimes(scm, rng, n_obs=n_obs, n_per_target=n_per_target)
    if standardize:
        X = (X - X.mean(0)) / X.std(0)
    return scm, B, X, tg


@pytest.mark.parametrize("graph", ["chain", "collider"])
def test_learning_recovers_small_graphs_with_interventions(graph):
    for seed in (0,):
        _, B, X, tg = _data(graph, seed)
        res = fit(X, tg, TrainConfig(seed=seed, **FAST))
        assert structure_metrics(B, res.adjacency)["f1"] == 1.0, (graph, seed, res.adjacency)
        # the hardened gates are exactly the learned graph
        hard = res.network.unit.adjacency(hard=True).numpy()
        assert (hard == res.adjacency).all()


def test_learning_without_polish_still_recovers_a_chain():
    _, B, X, tg = _data("chain", 2)
    res = fit(X, tg, TrainConfig(seed=2, polish=False, **FAST))
    assert structure_metrics(B, res.adjacency)["f1"] == 1.0


def test_learned_counterfactuals_match_the_true_scm():
    scm, B, X, tg = _data("chain", 0, standardize=False)
    res = fit(X, tg, TrainConfig(seed=0, **FAST))
    obs = np.flatnonzero([not t for t in tg])
    cf = counterfactual_metrics(res.network, scm, X[obs], np.random.default_rng(0), n_max=200)
    assert cf["cf_corr"] > 0.99
    assert cf["cf_mse"] < 0.01


def test_fit_is_deterministic_for_a_seed():
    _, _, X, tg = _data("collider", 5)
    cfg = dict(seed=5, inner_steps=40, max_rounds=3, refine_steps=10)
    a = fit(X, tg, TrainConfig(**cfg)).strength
    b = fit(X, tg, TrainConfig(**cfg)).strength
    assert np.array_equal(a, b)


def test_mlp_scm_round_trips_and_reads_only_parents():
    rng = np.random.default_rng(0)
    nodes, B = graph_from_spec("er", 6, 2.0, rng)
    scm = make_scm(nodes, B, "mlp", rng)
    X = rng.standard_normal((50, 6))
    again = SCM.from_dict(scm.to_dict())
    np.testing.assert_allclose(again.parent_term(X), scm.parent_term(X))
    j = int(np.argmax(B.sum(0)))
    other = [i for i in range(6) if not B[i, j]]
    X2 = X.copy()
    X2[:, other] += 5.0  # moving non-parents leaves node j's mechanism unchanged
    np.testing.assert_allclose(scm.parent_term(X2)[:, j], scm.parent_term(X)[:, j])


def _nonlinear_table(mech, seed, d=6):
    rng = np.random.default_rng(seed)
    nodes, B = graph_from_spec("er", d, 2.0, rng)
    scm = make_scm(nodes, B, mech, rng)
    X, tg, _, _ = simulate_regimes(scm, rng, 600, 150)
    M = np.zeros(X.shape, dtype=bool)
    for r, t in enumerate(tg):
        M[r, t] = True
    return B, (X - X.mean(0)) / X.std(0), M


def test_spline_polish_recovers_nonlinear_graphs_the_linear_score_misses():
    empty = np.zeros((6, 6), dtype=np.int64)
    # additive tanh mechanisms: the spline surrogate is exact where linear BIC is not
    B, Z, M = _nonlinear_table("nonlinear", 0)
    assert structure_metrics(B, polish(Z, M, empty, knots=3))["f1"] == 1.0
    assert structure_metrics(B, polish(Z, M, empty))["f1"] < 0.95
    # random MLP mechanisms (measured: spline 0.833, linear 0.417)
    B, Z, M = _nonlinear_table("mlp", 1)
    f1_spline = structure_metrics(B, polish(Z, M, empty, knots=3))["f1"]
    assert f1_spline >= 0.8
    assert f1_spline > structure_metrics(B, polish(Z, M, empty))["f1"] + 0.3


# ------------------------------------------------------------------ unknown targets


def test_regime_scorer_finds_the_planted_targets_given_the_parents():
    """Chain X -> Y -> Z; regime 1 sets Y, regime 2 sets X and Z at once. Given the true
    parents each node is flagged in exactly its regimes; given a missing parent the
    marginal shift of a descendant is flagged instead (what the joint search trades off
    against adding the edge), and the search over graphs and targets finds both."""
    from dolm_tools.train_cunit.search import RegimeTargetScorer

    rng = np.random.default_rng(0)
    n = 400
    reg = np.repeat([0, 1, 2], [2 * n, n, n])
    x = rng.normal(size=4 * n)
    x[reg == 2] = rng.normal(2.0, 1.0, n)
    y = 1.5 * x + rng.normal(size=4 * n)
    y[reg == 1] = rng.normal(-1.0, 0.5, n)
    z = -y + 0.5 * rng.normal(size=4 * n)
    z[reg == 2] = rng.normal(1.0, 1.0, n)
    Z = np.column_stack([x, y, z])
    Z = (Z - Z[reg == 0].mean(0)) / Z[reg == 0].std(0)
    s = RegimeTargetScorer(Z, reg, obs=0)
    assert s.targets(0, []) == (2,)
    assert s.targets(1, [0]) == (1,)
    assert s.targets(2, [1]) == (2,)
    assert s.targets(2, []) == (1, 2)  # Y's regime shifts Z's marginal, not its mechanism
    # with the true parents, flagging the targets beats flagging nothing by a wide margin
    assert s.score(1, (0,)) < s.score(1, ()) - 100
    B = greedy_polish(Z, None, np.zeros((3, 3), dtype=int), scorer=s)
    assert (B == np.array([[0, 1, 0], [0, 0, 1], [0, 0, 0]])).all()
    M = s.target_mask(B)
    assert (M[reg == 0] == 0).all() and M[reg == 1].all(0).tolist() == [False, True, False]
    assert M[reg == 2].all(0).tolist() == [True, False, True]


def test_fit_with_unknown_targets_learns_graph_and_targets():
    rng = np.random.default_rng(1)
    nodes, B = canonical("collider")
    scm = make_scm(nodes, B, "linear", rng)
    X, tg, regimes, _ = simulate_regimes(scm, rng, n_obs=600, n_per_target=200, int_shift=2.0)
    X = (X - X.mean(0)) / X.std(0)
    res = fit(X, None, TrainConfig(seed=0, unknown_targets=True, **FAST), regimes=regimes)
    assert structure_metrics(B, res.adjacency)["f1"] == 1.0
    assert res.regime_targets == {"obs": [], "do(A)": [0], "do(B)": [1], "do(C)": [2]}
