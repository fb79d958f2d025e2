"""Benchmark of dolm-train-cunit against GIES and DAGMA, side by side on the same data.

    python benchmarks/cunit.py                      # everything, 3 seeds (tens of minutes)
    python benchmarks/cunit.py --only canonical,er  # some sections
    python benchmarks/cunit.py --quick              # 1 seed, small sizes (a smoke run)

Sections (results as Markdown tables in benchmarks/results/cunit.md, raw rows as JSON
beside it):

* canonical -- chain, fork, collider, confounder, complex (6 nodes); raw and per-column
  standardised data. cunit gets the interventional table (observational rows + one
  perfect-intervention regime per node, known targets); DAGMA gets an observational
  sample of the same size and, for reference, the same interventional table pooled.
* er -- ER2 graphs (2d expected edges), d = 10 and 20, linear-Gaussian (weights +-[0.5, 2],
  unit noise: NOTEARS/DAGMA's setting), raw and standardised.
* speed -- forward pass of a causal unit vs a plain per-node MLP / linear map with the
  same parameters, and the wall time of a d = 50 fit on 2 threads.
* ablation -- ER2 d = 10 standardised: no interventions (targets ignored), no gradient
  blocking (with and without the counterfactual loss, where blocking can matter),
  no polish, MLP mechanisms with gates, a vanilla per-node MLP (no gates).

* unknown -- ER2 (``--mechanisms``, ``--nonlinear-dims``), standardised: cunit with known
  targets and with ``--targets unknown`` (regimes only) side by side, and the learned
  targets' precision / recall / F1.
* nonlinear -- ER2 d = 10 and 20 with MLP (``--mechanism mlp``) and additive tanh
  (``nonlinear``) SCMs, standardised, perfect known targets: cunit ``--mechanism mlp``
  against GIES and (``--dagma-mlp-max-d``) DagmaMLP on the pooled table.

GIES: ``gies.fit_bic(data, I)`` (the pure-Python ``gies`` package, Gaussian BIC) on the
same interventional table split by environment (known targets); its I-essential graph
is scored with undirected edges counted as both directions (one correct, one reversed:
SHD 1). DAGMA: ``DagmaLinear(loss_type="l2").fit(X, lambda1=0.02)`` (the package
defaults: w_threshold 0.3, T = 5, s = [1.0, .9, .8, .7, .6]). CPU seconds
(``time.process_time``) are recorded beside wall seconds: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))  # works without an install too

from train_cunit.graphs import canonical, structure_metrics  # noqa: E402
from train_cunit.scm import graph_from_spec, make_scm, simulate_regimes  # noqa: E402

CANONICAL = ["chain", "fork", "collider", "confounder", "complex"]
RESULTS = ROOT / "benchmarks" / "results"


def make_data(graph: str, d: int, seed: int, n_obs: int, n_int: int,
              mechanism: str = "linear"):
    """The interventional table (cunit), an observational sample of the same size
    (DAGMA), both raw; standardised copies are made by the caller."""
    rng = np.random.default_rng(seed)
    if graph in CANONICAL:
        nodes, B = canonical(graph)
    else:
        nodes, B = graph_from_spec(graph, d, 2.0, rng)
    scm = make_scm(nodes, B, mechanism, rng)
    X, tg, _, _ = simulate_regimes(scm, rng, n_obs=n_obs, n_per_target=n_int)
    X_obs = scm.sample(len(X), rng)
    return B, X, tg, X_obs


def standardise(X):
    return (X - X.mean(0)) / X.std(0)


def run_cunit(X, tg, seed, threads=1, regimes=None, full=False, **cfg):
    import torch
    from train_cunit.train import TrainConfig, fit

    torch.set_num_threads(threads)
    c0 = time.process_time()
    res = fit(X, tg, TrainConfig(seed=seed, **cfg), regimes=regimes)
    return (res if full else res.adjacency), res.seconds, time.process_time() - c0


def split_by_environment(X, tg):
    """Rows grouped by their target set: (list of arrays, list of target lists), the
    observational environment first -- GIES's input."""
    envs: dict[tuple[int, ...], list[int]] = {}
    for r, t in enumerate(tg):
        envs.setdefault(tuple(sorted(t)), []).append(r)
    keys = sorted(envs, key=lambda k: (len(k), k))
    return [X[envs[k]] for k in keys], [list(k) for k in keys]


def run_gies(X, tg, cpu_limit=None):
    """GIES (Hauser & Buehlmann 2012; the pure-Python ``gies`` package) with its Gaussian
    BIC score on the same interventional table, split by environment (known targets).
    Returns the I-essential graph (undirected edges as both directions). ``cpu_limit``
    (CPU seconds): run it in a child process and give up after that much CPU (the graph
    is then None and the times are what it had used)."""
    if cpu_limit:
        return run_limited(run_gies, (X, tg), cpu_limit)
    import gies

    data, interventions = split_by_environment(X, tg)
    t0, c0 = time.perf_counter(), time.process_time()
    est, _ = gies.fit_bic(data, interventions)
    return (np.asarray(est) != 0).astype(int), time.perf_counter() - t0, time.process_time() - c0


def _child(fn, args, cpu_limit, queue):
    import resource

    # the kernel stops the child (SIGXCPU, then SIGKILL) once it has used cpu_limit CPU
    # seconds: a budget in CPU, not wall, time, because the machine may be shared
    resource.setrlimit(resource.RLIMIT_CPU, (int(cpu_limit), int(cpu_limit) + 5))
    queue.put(fn(*args))


def run_limited(fn, args, cpu_limit):
    """Run ``fn(*args)`` (returning ``(graph, wall, cpu)``) in a forked child limited to
    ``cpu_limit`` CPU seconds; ``(None, wall, cpu used)`` if it ran out."""
    import multiprocessing as mp
    import queue as q

    ctx = mp.get_context("fork")
    results = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, cpu_limit, results))
    t0 = time.perf_counter()
    proc.start()
    stat = Path(f"/proc/{proc.pid}/stat")
    cpu = 0.0
    while True:
        try:
            return results.get(timeout=5)
        except q.Empty:
            if stat.exists():
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            if not proc.is_alive():
                proc.join()
                return None, time.perf_counter() - t0, cpu


def run_dagma(X, seed):
    import contextlib

    from dagma import utils
    from dagma.linear import DagmaLinear

    utils.set_random_seed(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # its tqdm bar
        W = DagmaLinear(loss_type="l2").fit(X, lambda1=0.02)
    return (W != 0).astype(int), time.perf_counter() - t0, time.process_time() - c0


DAGMA_MLP_ITERS = (50000, 80000)  # the package's warm_iter, max_iter


def run_dagma_mlp(X, seed, iters=DAGMA_MLP_ITERS, cpu_limit=None):
    """DAGMA's nonlinear version: ``DagmaNonlinear(DagmaMLP(dims=[d, 10, 1]))`` with its
    README's call ``fit(X, lambda1=0.02, lambda2=0.005)``, one torch thread (as cunit).
    ``iters`` = (warm_iter, max_iter): the package's (50k, 80k) Adam steps cost about
    15-30 ms each here at d = 10 (about an hour of CPU a fit), so a smaller budget can be
    given and is recorded; ``cpu_limit`` as for GIES."""
    if cpu_limit:
        return run_limited(run_dagma_mlp, (X, seed, iters), cpu_limit)
    import contextlib

    import torch
    from dagma import utils
    from dagma.nonlinear import DagmaMLP, DagmaNonlinear

    utils.set_random_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.double)
    d = X.shape[1]
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            model = DagmaNonlinear(DagmaMLP(dims=[d, 10, 1], bias=True, dtype=torch.double),
                                   dtype=torch.double)
            W = model.fit(np.asarray(X, dtype=float), lambda1=0.02, lambda2=0.005,
                          warm_iter=int(iters[0]), max_iter=int(iters[1]))
    finally:
        torch.set_default_dtype(torch.float32)
        torch.set_num_threads(threads)
    return (W != 0).astype(int), time.perf_counter() - t0, time.process_time() - c0


def section_nonlinear(rows, mechanisms, dims, seeds, n_obs, n_int, dagma_max_d,
                      methods=("cunit", "gies", "dagma-mlp"), dagma_iters=DAGMA_MLP_ITERS,
                      cpu_limit=None):
    """Nonlinear SCMs (standardised), perfect known targets: cunit with MLP mechanisms
    against GIES (linear-Gaussian BIC) on the same table and DagmaMLP on the pooled one."""
    for mech in mechanisms:
        for d in dims:
            for seed in seeds:
                B, X, tg, _ = make_data("er", d, seed, n_obs, n_int, mechanism=mech)
                Xs = standardise(X)
                if "cunit" in methods:
                    A, wall, cpu = run_cunit(Xs, tg, seed, mechanism="mlp")
                    record(rows, "nonlinear", graph=f"er/{mech}", d=d, seed=seed,
                           scaling="standardised", method="cunit --mechanism mlp",
                           wall_s=wall, cpu_s=cpu, metrics=structure_metrics(B, A))
                if "gies" in methods:
                    A, wall, cpu = run_gies(Xs, tg, cpu_limit)
                    record(rows, "nonlinear", graph=f"er/{mech}", d=d, seed=seed,
                           scaling="standardised", method="GIES (interventional)",
                           wall_s=wall, cpu_s=cpu, metrics=structure_metrics(B, A))
                if "dagma-mlp" in methods and d <= dagma_max_d:
                    A, wall, cpu = run_dagma_mlp(Xs, seed, dagma_iters, cpu_limit)
                    name = "DagmaMLP (same table, pooled)"
                    if tuple(dagma_iters) != DAGMA_MLP_ITERS:
                        name = (f"DagmaMLP (same table, pooled; {dagma_iters[0]}/"
                                f"{dagma_iters[1]} steps)")
                    record(rows, "nonlinear", graph=f"er/{mech}", d=d, seed=seed,
                           scaling="standardised", method=name, wall_s=wall, cpu_s=cpu,
                           finished=A is not None, metrics=_metrics(B, A))


def section_unknown(rows, mechanisms, dims, seeds, n_obs, n_int, methods=("known", "unknown")):
    """Unknown targets (standardised): cunit with the targets given, and with only the
    regimes given (``unknown_targets``), side by side on the same table; the learned
    (regime, node) targets scored against the truth. In this simulator an intervened
    node is drawn from its own observational marginal, so a do() on a root node leaves
    the data's distribution unchanged: no method can see it; the recall over the other
    nodes is reported beside the plain one."""
    for mech in mechanisms:
        for d in dims:
            for seed in seeds:
                B, X, tg, _ = make_data("er", d, seed, n_obs, n_int, mechanism=mech)
                Xs = standardise(X)
                mm = "linear" if mech == "linear" else "mlp"
                if "known" in methods:
                    A, wall, cpu = run_cunit(Xs, tg, seed, mechanism=mm)
                    record(rows, "unknown", graph=f"er/{mech}", d=d, seed=seed,
                           scaling="standardised",
                           method=f"cunit --mechanism {mm}, known targets", wall_s=wall,
                           cpu_s=cpu, metrics=structure_metrics(B, A))
                if "unknown" not in methods:
                    continue
                regimes = ["obs" if not t else "do(" + ",".join(map(str, t)) + ")" for t in tg]
                res, wall, cpu = run_cunit(Xs, tg, seed, mechanism=mm, unknown_targets=True,
                                           regimes=regimes, full=True)
                truth = {(r, j) for r, t in zip(regimes, tg, strict=True) for j in t}
                pred = {(r, j) for r, js in res.regime_targets.items() for j in js}
                roots = {j for j in range(d) if B[:, j].sum() == 0}
                seen = {(r, j) for r, j in truth if j not in roots}
                tp = len(pred & truth)
                prec = tp / len(pred) if pred else 1.0
                rec = tp / len(truth) if truth else 1.0
                record(rows, "unknown", graph=f"er/{mech}", d=d, seed=seed,
                       scaling="standardised",
                       method=f"cunit --mechanism {mm}, --targets unknown", wall_s=wall,
                       cpu_s=cpu, metrics=structure_metrics(B, res.adjacency),
                       targets={"f1": 2 * prec * rec / (prec + rec) if tp else 0.0,
                                "precision": prec, "recall": rec,
                                "recall_non_root": len(pred & seen) / max(len(seen), 1),
                                "n_true": len(truth), "n_pred": len(pred),
                                "n_root_targets": len(truth) - len(seen)})


def targets_table(rows):
    out = ["| graph | d | seeds | target F1 | precision | recall | recall (non-root targets) "
           "| true / learned targets per seed |", "|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        if r["section"] == "unknown" and r.get("targets"):
            groups.setdefault((r["graph"], r["d"]), []).append(r["targets"])
    for (g, d), ts in groups.items():
        out.append(f"| {g} | {d} | {len(ts)} | " + _ms([t["f1"] for t in ts]) + " | "
                   + _ms([t["precision"] for t in ts]) + " | " + _ms([t["recall"] for t in ts])
                   + " | " + _ms([t["recall_non_root"] for t in ts]) + " | "
                   + " ; ".join(f"{t['n_true']} / {t['n_pred']}" for t in ts) + " |")
    return "\n".join(out)


_JSON: Path | None = None  # rows are appended here as they come (a long run can be cut)


def record(rows, section, **kw):
    import resource

    # peak resident memory of this process so far (Linux: kB)
    kw["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows.append({"section": section, **kw})
    if _JSON is not None:
        _JSON.write_text(json.dumps(rows, indent=1, default=float))
    m = kw.get("metrics", {})
    print(f"[{section}] " + " ".join(f"{k}={v}" for k, v in kw.items() if k != "metrics")
          + (f" f1={m['f1']:.3f} shd={m['shd']:.0f}" if m else ""), flush=True)


def _metrics(B, A):
    """Structure metrics, or None for a run that did not finish (A is None)."""
    return None if A is None else structure_metrics(B, A)


# ------------------------------------------------------------------ sections


def section_structure(rows, graphs, seeds, n_obs, n_int, section, pooled=True,
                      scalings=("raw", "standardised"), gies_max_d=100, dagma=True,
                      gies_timeout=None, cunit=True):
    for graph, d in graphs:
        for seed in seeds:
            B, X, tg, X_obs = make_data(graph, d, seed, n_obs, n_int)
            for scaling in scalings:
                Xi = X if scaling == "raw" else standardise(X)
                Xo = X_obs if scaling == "raw" else standardise(X_obs)
                if cunit:
                    A, wall, cpu = run_cunit(Xi, tg, seed)
                    record(rows, section, graph=graph, d=len(B), seed=seed, scaling=scaling,
                           method="cunit (interventional)", wall_s=wall, cpu_s=cpu,
                           metrics=structure_metrics(B, A))
                if gies_max_d and len(B) <= gies_max_d:
                    A, wall, cpu = run_gies(Xi, tg, gies_timeout)
                    record(rows, section, graph=graph, d=len(B), seed=seed, scaling=scaling,
                           method="GIES (interventional)", wall_s=wall, cpu_s=cpu,
                           finished=A is not None, metrics=_metrics(B, A))
                if not dagma:
                    continue
                A, wall, cpu = run_dagma(Xo, seed)
                record(rows, section, graph=graph, d=len(B), seed=seed, scaling=scaling,
                       method="DAGMA (observational)", wall_s=wall, cpu_s=cpu,
                       metrics=structure_metrics(B, A))
                if not pooled:
                    continue
                A, wall, cpu = run_dagma(Xi, seed)
                record(rows, section, graph=graph, d=len(B), seed=seed, scaling=scaling,
                       method="DAGMA (same table, pooled)", wall_s=wall, cpu_s=cpu,
                       metrics=structure_metrics(B, A))


def section_speed(rows, quick):
    import torch
    from train_cunit.engine import CausalUnit

    torch.set_num_threads(1)
    for mech, d, h, batch in [("mlp", 20, 16, 4096), ("mlp", 50, 16, 1024),
                              ("linear", 20, 0, 4096), ("linear", 50, 0, 4096)]:
        unit = CausalUnit(d, mech, hidden=max(h, 1)).eval()
        z = torch.randn(batch, d)
        vals = torch.randn(batch, d)
        mask = torch.zeros(batch, d, dtype=torch.bool)
        mask[:, [1, d // 2]] = True  # two simultaneous interventions

        if mech == "mlp":
            def plain(z, unit=unit):
                hh = torch.einsum("bi,ijk->bjk", z, unit.w1) + unit.b1
                hh = torch.nn.functional.leaky_relu(hh, 0.1)
                return (hh * unit.w2).sum(-1) + unit.b2
        else:
            def plain(z, unit=unit):
                return z @ unit.weight + unit.bias
        fns = {"plain": lambda z=z, plain=plain: plain(z),
               "unit": lambda z=z, unit=unit: unit(z),
               "unit+do": lambda z=z, unit=unit, m=mask, v=vals: unit(z, m, v)}
        times = {k: [] for k in fns}
        with torch.no_grad():
            for _ in range(20 if quick else 80):
                for k, f in fns.items():  # interleaved, min over repeats (a shared machine)
                    t = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t)
        best = {k: min(v) for k, v in times.items()}
        for k in ("unit", "unit+do"):
            record(rows, "forward", mechanism=mech, d=d, hidden=h, batch=batch, variant=k,
                   ms=best[k] * 1e3, plain_ms=best["plain"] * 1e3,
                   ratio=best[k] / best["plain"])


def section_d50(rows, seeds, quick):
    d = 20 if quick else 50
    for seed in seeds:
        B, X, tg, _ = make_data("er", d, seed, 1000, 200)
        A, wall, cpu = run_cunit(standardise(X), tg, seed, threads=2)
        record(rows, "d50", graph="er", d=d, seed=seed, scaling="standardised",
               method="cunit (interventional)", wall_s=wall, cpu_s=cpu,
               metrics=structure_metrics(B, A))


ABLATIONS = [
    ("full (linear, gates, do() blocking, polish)", {}),
    ("no interventions (targets ignored)", {"use_targets": False}),
    ("no gradient blocking", {"block_gradients": False}),
    ("+ counterfactual loss (blocking)", {"cf_weight": 0.1, "cf_steps": 3}),
    ("+ counterfactual loss, no gradient blocking",
     {"cf_weight": 0.1, "cf_steps": 3, "block_gradients": False}),
    ("+ random interventions p=0.1", {"p_random_intervention": 0.1}),
    ("no polish (continuous optimiser only)", {"polish": False}),
    ("MLP mechanisms, gates", {"mechanism": "mlp"}),
    ("vanilla MLP (no gates: first-layer norms)", {"mechanism": "mlp", "gates": False}),
]


def section_ablation(rows, seeds, d, n_obs, n_int):
    for seed in seeds:
        B, X, tg, _ = make_data("er", d, seed, n_obs, n_int)
        Xs = standardise(X)
        for name, cfg in ABLATIONS:
            A, wall, cpu = run_cunit(Xs, tg, seed, **cfg)
            record(rows, "ablation", graph="er", d=d, seed=seed, scaling="standardised",
                   method=name, wall_s=wall, cpu_s=cpu, metrics=structure_metrics(B, A))


# ------------------------------------------------------------------ report


def _ms(values, fmt="{:.3f}"):
    values = [v for v in values if v == v]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return (fmt + " ± " + fmt).format(statistics.mean(values), statistics.stdev(values))


def structure_table(rows, section, keys=("graph", "d", "scaling", "method")):
    groups: dict = {}
    for r in rows:
        if r["section"] == section:
            groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = ["| " + " | ".join(keys) + " | seeds | F1 | skeleton F1 | SHD | SHD per seed | TPR "
           "| FDR | CPU s | wall s |", "|" + "---|" * (len(keys) + 9)]
    for key, rs in groups.items():
        unfinished = [r for r in rs if r.get("metrics") is None]
        rs = [r for r in rs if r.get("metrics") is not None]
        for r in unfinished:
            out.append("| " + " | ".join(str(k) for k in key) + f" | seed {r['seed']} | did "
                       f"not finish: stopped after {r['wall_s']:.0f} s wall, "
                       f"{r['cpu_s']:.0f} s CPU" + " |" * 8)
        if not rs:
            continue
        m = [r["metrics"] for r in rs]
        out.append("| " + " | ".join(str(k) for k in key) + f" | {len(rs)} | "
                   + _ms([x["f1"] for x in m]) + " | "
                   + _ms([x.get("skeleton_f1", float("nan")) for x in m]) + " | "
                   + _ms([x["shd"] for x in m], "{:.1f}") + " | "
                   + "/".join(f"{x['shd']:.0f}" for x in m)
                   + " | " + _ms([x["tpr"] for x in m]) + " | " + _ms([x["fdr"] for x in m])
                   + " | " + _ms([r.get("cpu_s", float("nan")) for r in rs], "{:.1f}")
                   + " | " + _ms([r["wall_s"] for r in rs], "{:.1f}") + " |")
    return "\n".join(out)


def forward_table(rows):
    out = ["| mechanism | d | hidden | batch | variant | plain ms | unit ms | ratio |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["section"] == "forward":
            out.append(f"| {r['mechanism']} | {r['d']} | {r['hidden']} | {r['batch']} | "
                       f"{r['variant']} | {r['plain_ms']:.3f} | {r['ms']:.3f} | "
                       f"{r['ratio']:.2f}x |")
    return "\n".join(out)


def report(rows, path: Path, argv: list[str]):
    import platform

    import torch

    lines = [
        "## dolm-train-cunit vs GIES and DAGMA",
        "",
        f"`python benchmarks/cunit.py {' '.join(argv)}` on {platform.machine()}, "
        f"{os.cpu_count()} cores (shared), torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}. Mean ± sd over seeds. cunit: 1 thread unless said.",
        "",
    ]
    if any(r["section"] == "canonical" for r in rows):
        lines += ["### Canonical graphs", "", structure_table(rows, "canonical"), ""]
    if any(r["section"] == "er" for r in rows):
        lines += ["### ER2, linear-Gaussian", "", structure_table(rows, "er"), ""]
    if any(r["section"] == "nonlinear" for r in rows):
        lines += ["### Nonlinear SCMs, known targets (standardised)", "",
                  structure_table(rows, "nonlinear"), ""]
    if any(r["section"] == "unknown" for r in rows):
        lines += ["### Unknown intervention targets (standardised)", "",
                  structure_table(rows, "unknown"), "", "Target recovery:", "",
                  targets_table(rows), ""]
    if any(r["section"] == "forward" for r in rows):
        lines += ["### Forward pass vs a plain network with the same parameters", "",
                  forward_table(rows), ""]
    if any(r["section"] == "d50" for r in rows):
        lines += ["### Training time, ER2 d = 50 (standardised, 2 threads)", "",
                  structure_table(rows, "d50"), ""]
    if any(r["section"] == "ablation" for r in rows):
        lines += ["### Ablation (ER2, standardised)", "",
                  structure_table(rows, "ablation", keys=("d", "method")), ""]
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="canonical,er,speed,ablation")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dims", default="10,20", help="ER graph sizes.")
    ap.add_argument("--seed-list", default=None, help="Comma-separated seeds (overrides "
                    "--seeds).")
    ap.add_argument("--no-pooled", action="store_true",
                    help="Skip DAGMA on the pooled interventional table.")
    ap.add_argument("--graphs", default=None,
                    help="Canonical graphs to run, in this order (default: all five).")
    ap.add_argument("--scalings", default="raw,standardised")
    ap.add_argument("--gies-max-d", type=int, default=50,
                    help="Run GIES on graphs up to this size (0: never).")
    ap.add_argument("--gies-timeout", type=float, default=None,
                    help="Give GIES (and DagmaMLP) this many CPU seconds, then record that "
                         "it did not finish.")
    ap.add_argument("--dagma-mlp-iters", default=None,
                    help="nonlinear: DagmaMLP's warm_iter,max_iter (package: 50000,80000).")
    ap.add_argument("--no-cunit", action="store_true", help="er: skip cunit (GIES only).")
    ap.add_argument("--methods", default="cunit,gies,dagma-mlp",
                    help="Methods of the nonlinear section (cunit, gies, dagma-mlp) or of "
                         "the unknown one (known, unknown).")
    ap.add_argument("--no-dagma", action="store_true", help="Skip DAGMA (er, canonical).")
    ap.add_argument("--mechanisms", default="mlp,nonlinear",
                    help="SCMs of the nonlinear section.")
    ap.add_argument("--nonlinear-dims", default="10,20")
    ap.add_argument("--dagma-mlp-max-d", type=int, default=10)
    ap.add_argument("--out", default=str(RESULTS / "cunit.md"))
    ap.add_argument("--append-json", action="store_true",
                    help="Keep rows of other sections from an earlier run's JSON.")
    ap.add_argument("--from-json", default=None,
                    help="Comma-separated JSON files of earlier runs (e.g. sections run in "
                         "parallel): only write the report from them.")
    args = ap.parse_args(argv)
    global _JSON
    if args.from_json:
        rows = []
        seen = set()
        for f in args.from_json.split(","):
            for r in json.loads(Path(f).read_text()):
                key = json.dumps({k: v for k, v in r.items()
                                  if k not in ("wall_s", "cpu_s", "metrics", "ms", "plain_ms",
                                               "ratio", "max_rss_mb", "targets",
                                               "finished")}, sort_keys=True)
                if key not in seen:  # sections run twice in parallel: keep the first
                    seen.add(key)
                    rows.append(r)
        report(rows, Path(args.out), sys.argv[1:] if argv is None else argv)
        return
    seeds = list(range(1 if args.quick else args.seeds))
    if args.seed_list:
        seeds = [int(x) for x in args.seed_list.split(",")]
    only = set(args.only.split(","))
    out = Path(args.out)
    json_path = out.with_suffix(".json")
    _JSON = json_path
    rows: list[dict] = []
    if args.append_json and json_path.exists():
        old = json.loads(json_path.read_text())
        redo = {"canonical": {"canonical"}, "er": {"er"}, "speed": {"forward", "d50"},
                "forward": {"forward"}, "d50": {"d50"}, "ablation": {"ablation"},
                "nonlinear": {"nonlinear"}, "unknown": {"unknown"}}
        drop = set().union(*(redo[s] for s in only if s in redo))
        rows = [r for r in old if r["section"] not in drop]
    n_obs, n_int = (500, 100) if args.quick else (1000, 200)
    if "canonical" in only:
        names = args.graphs.split(",") if args.graphs else CANONICAL
        graphs = [(g, 0) for g in (names[:2] if args.quick else names)]
        section_structure(rows, graphs, seeds, n_obs, n_int, "canonical")
    if "er" in only:
        graphs = [("er", 10)] if args.quick else [("er", int(x)) for x in args.dims.split(",")]
        section_structure(rows, graphs, seeds, n_obs, n_int, "er", pooled=not args.no_pooled,
                          scalings=tuple(args.scalings.split(",")),
                          gies_max_d=args.gies_max_d, dagma=not args.no_dagma,
                          gies_timeout=args.gies_timeout, cunit=not args.no_cunit)
    if "nonlinear" in only:
        section_nonlinear(rows, args.mechanisms.split(","),
                          [int(x) for x in args.nonlinear_dims.split(",")], seeds, n_obs,
                          n_int, args.dagma_mlp_max_d, args.methods.split(","),
                          dagma_iters=(tuple(int(x) for x in args.dagma_mlp_iters.split(","))
                                       if args.dagma_mlp_iters else DAGMA_MLP_ITERS),
                          cpu_limit=args.gies_timeout)
    if "unknown" in only:
        section_unknown(rows, args.mechanisms.split(","),
                        [int(x) for x in args.nonlinear_dims.split(",")], seeds, n_obs, n_int,
                        args.methods.split(","))
    if "speed" in only or "forward" in only:
        section_speed(rows, args.quick)
    if "speed" in only or "d50" in only:
        section_d50(rows, seeds, args.quick)
    if "ablation" in only:
        section_ablation(rows, seeds, 10, n_obs, n_int)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(rows, indent=1, default=float))
    report(rows, out, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
