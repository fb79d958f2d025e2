"""dolm-train-cunit: learn a causal graph with a causal-unit network under do().

Subcommands: ``simulate`` (a synthetic SCM -> variable table), ``fit`` (a variable table
-> checkpoint, metrics, learned dag), ``check-gradients`` (the do() gradient checks).
Heavy imports (torch, numpy, pandas) stay inside the commands so ``--help`` is fast.
"""

from __future__ import annotations

import os

import click
from dolm.cli import log, output_option, progress, seed_option, subcommand, tool_group
from dolm.errors import InputError

MLP_ROWS_PER_PARAM = 2  # --mechanism mlp: training rows per parameter of one node's MLP
GRAPHS = ["chain", "fork", "collider", "v-structure", "confounder", "complex", "er", "sf"]


@tool_group("train-cunit")
def main():
    """Causal-unit networks: learn a DAG from observational and interventional data.

    \b
    dolm-train-cunit simulate --graph er --d 10 -o data.parquet
    dolm-train-cunit fit data.parquet -o fit/
    dolm-train-cunit check-gradients
    """


# ------------------------------------------------------------------ simulate


@subcommand(main, "simulate", "train-cunit")
@click.option("--graph", type=click.Choice(GRAPHS), default="er", show_default=True,
              help="A canonical graph, or a random Erdos-Renyi (er) / scale-free (sf) DAG.")
@click.option("--dag", "dag_path", type=click.Path(dir_okay=False), default=None,
              help="Simulate from this dag JSON file instead of --graph.")
@click.option("--d", "d", type=click.IntRange(2, 2000), default=10, show_default=True,
              help="Nodes of a random graph.")
@click.option("--edges-per-node", type=click.FloatRange(0.0, 50.0), default=2.0,
              show_default=True, help="Expected edges per node (ER2 = 2).")
@click.option("--mechanism", type=click.Choice(["linear", "nonlinear", "mlp"]), default="linear",
              show_default=True, help="Linear-Gaussian; nonlinear: a sum of one tanh (sigmoid) "
              "term per parent; mlp: a random tanh network of all parents per node. Additive "
              "Gaussian noise in all three.")
@click.option("--n-obs", type=click.IntRange(0), default=1000, show_default=True,
              help="Observational training rows.")
@click.option("--n-per-target", type=click.IntRange(0), default=200, show_default=True,
              help="Rows per single-node intervention regime.")
@click.option("--targets", default="all", show_default=True,
              help="Intervened nodes: 'all', 'none', or comma-separated names.")
@click.option("--n-test", type=click.IntRange(0), default=0, show_default=True,
              help="Held-out rows per regime (split = test), for the interventional NLL.")
@click.option("--test-pairs", type=click.IntRange(0), default=3, show_default=True,
              help="Unseen two-node intervention regimes among the test rows.")
@click.option("--int-shift", type=float, default=0.0, show_default=True,
              help="Intervention mean, in observational sds from the node's mean.")
@click.option("--int-scale", type=click.FloatRange(0.0, min_open=True), default=1.0,
              show_default=True, help="Intervention sd, in observational sds.")
@click.option("--noise-min", type=click.FloatRange(0.0, min_open=True), default=1.0,
              show_default=True, help="Noise sds are uniform in [noise-min, noise-max].")
@click.option("--noise-max", type=click.FloatRange(0.0, min_open=True), default=1.0,
              show_default=True)
@click.option("--standardize", is_flag=True,
              help="Standardise every column (mean 0, sd 1 over all rows): hides the "
                   "variance ordering that observational methods exploit.")
@output_option(help="Output variable table (Parquet; '-' for stdout).")
@seed_option
def simulate(run, graph, dag_path, d, edges_per_node, mechanism, n_obs, n_per_target, targets,
             n_test, test_pairs, int_shift, int_scale, noise_min, noise_max, standardize,
             output, force, seed):
    """Simulate a structural causal model into a variable table (Parquet)."""
    import numpy as np
    import pandas as pd
    from dolm.formats import read_json, write_table

    from .data import dag_to_matrix, matrix_to_dag
    from .scm import graph_from_spec, make_scm, simulate_regimes

    if noise_max < noise_min:
        raise InputError(f"--noise-max {noise_max}: expected >= --noise-min {noise_min}")
    rng = np.random.default_rng(seed)
    if dag_path:
        obj, _ = read_json(dag_path, schema="dag", run=run)
        nodes = [str(n) for n in obj.get("nodes", [])]
        if len(nodes) < 2 or len(set(nodes)) != len(nodes):
            raise InputError(f"--dag {dag_path}: expected at least 2 distinct nodes")
        B = dag_to_matrix(obj, nodes, f"--dag {dag_path}")
        graph = "dag-file"
    else:
        nodes, B = graph_from_spec(graph, d, edges_per_node, rng)
    scm = make_scm(nodes, B, mechanism, rng, noise_range=(noise_min, noise_max))
    if targets == "all":
        tlist = list(range(len(nodes)))
    elif targets == "none":
        tlist = []
    else:
        index = {n: i for i, n in enumerate(nodes)}
        names = [t.strip() for t in targets.split(",") if t.strip()]
        bad = [t for t in names if t not in index]
        if bad:
            raise InputError(f"--targets: {bad[0]!r} is not a node; expected 'all', 'none' or "
                             f"names among {', '.join(nodes)}")
        tlist = [index[t] for t in names]
    X, tg, regimes, split = simulate_regimes(
        scm, rng, n_obs=n_obs, n_per_target=n_per_target, targets=tlist, n_test=n_test,
        test_pairs=test_pairs, int_shift=int_shift, int_scale=int_scale)
    if len(X) == 0:
        raise InputError("--n-obs / --n-per-target: no rows to write; expected at least one")
    std = None
    if standardize:
        loc, scale = X.mean(0), X.std(0)
        scale[scale == 0] = 1.0
        X = (X - loc) / scale
        std = {"loc": loc.tolist(), "scale": scale.tolist()}
    df = pd.DataFrame(X, columns=nodes)
    df["target"] = [",".join(nodes[i] for i in t) if t else None for t in tg]
    df["regime"] = regimes
    df["split"] = split
    extra = {"variables": nodes, "graph": graph, "mechanism": mechanism,
             "true_dag": matrix_to_dag(B, nodes, scm.W * B), "scm": scm.to_dict(),
             "standardized": std}
    write_table(df, output, schema="variables", run=run, force=force, extra=extra)
    log(f"dolm-train-cunit: {len(df)} rows, {len(nodes)} variables, {int(B.sum())} edges, "
        f"{len(set(regimes))} regimes -> {output}")


# ------------------------------------------------------------------ fit


@subcommand(main, "fit", "train-cunit")
@click.argument("data", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Output folder: checkpoint.safetensors, metrics.parquet, dag.json.")
@click.option("--force", is_flag=True, help="Overwrite an existing output folder's files.")
@click.option("--target-column", default="target", show_default=True,
              help="Column naming the intervened variables per row (comma-separated; "
                   "empty = observational). Optional.")
@click.option("--variables", default=None, help="Comma-separated variable columns "
              "(default: every column but target/regime/split and --exclude).")
@click.option("--exclude", default=None, help="Comma-separated columns to leave out.")
@click.option("--true-dag", "true_dag", type=click.Path(dir_okay=False), default=None,
              help="A dag JSON file with the true graph (default: the simulate file's own).")
@click.option("--mechanism", type=click.Choice(["linear", "mlp"]), default="linear",
              show_default=True, help="Per-node mechanisms. mlp needs at least 2 training "
              "rows per parameter of one node's MLP (d * hidden + 2 * hidden + 1).")
@click.option("--hidden", type=click.IntRange(1), default=16, show_default=True,
              help="Hidden units per node (mlp).")
@click.option("--lambda-sparse", type=click.FloatRange(0.0), default=0.005, show_default=True,
              help="Sparsity weight on the soft adjacency.")
@click.option("--acyclicity", type=click.Choice(["notears", "dagma"]), default="notears",
              show_default=True, help="notears: tr(exp(E o E)) - d; dagma: -logdet(I - E o E).")
@click.option("--lr", type=click.FloatRange(0.0, min_open=True), default=3e-2,
              show_default=True)
@click.option("--rounds", type=click.IntRange(1), default=12, show_default=True,
              help="Augmented-Lagrangian rounds (temperature anneals over them).")
@click.option("--steps-per-round", type=click.IntRange(1), default=100, show_default=True)
@click.option("--batch-size", type=click.IntRange(0), default=0, show_default=True,
              help="Rows per step (0 = all rows).")
@click.option("--temperature", "temps", default="1.0,0.25", show_default=True,
              help="Start,end temperature of the soft adjacency.")
@click.option("--p-intervene", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              help="Per row and step: probability of an extra random do() during training.")
@click.option("--cf-weight", type=click.FloatRange(0.0), default=0.0, show_default=True,
              help="Weight of the counterfactual (interventional rollout) loss.")
@click.option("--edge-threshold", type=click.FloatRange(0.0), default=0.05, show_default=True,
              help="|effective weight| (standardised units) for an edge to count.")
@click.option("--patience", type=click.IntRange(1), default=3, show_default=True,
              help="Early stopping: rounds without validation improvement once acyclic.")
@click.option("--no-polish", is_flag=True, help="Skip the greedy edge search.")
@click.option("--ignore-targets", is_flag=True, help="Ablation: treat every row as "
              "observational.")
@click.option("--targets", "targets_mode", type=click.Choice(["known", "unknown"]),
              default="known", show_default=True,
              help="known: the target column names each row's intervened variables. "
              "unknown: only the 'regime' column (or the target column's grouping) is used; "
              "each regime's targets are learned with the graph and, where the target column "
              "is there, scored against it (target_f1).")
@click.option("--observational-regime", default="obs", show_default=True,
              help="--targets unknown: the regime whose rows are observational.")
@click.option("--no-gradient-blocking", is_flag=True,
              help="Ablation: straight-through do() (gradients pass into intervened nodes). "
              "Measured: the learned graph is the same for fit's objectives.")
@click.option("--threads", type=click.IntRange(0), default=1, show_default=True,
              help="torch threads (0 = torch's default; the tensors are small: 1 is "
                   "fastest on a shared machine).")
@seed_option
def fit_cmd(run, data, output, force, target_column, variables, exclude, true_dag, mechanism,
            hidden, lambda_sparse, acyclicity, lr, rounds, steps_per_round, batch_size, temps,
            p_intervene, cf_weight, edge_threshold, patience, no_polish, ignore_targets,
            targets_mode, observational_regime, no_gradient_blocking, threads, seed):
    """Fit a causal-unit network to a variable table (Parquet/CSV)."""
    import numpy as np
    import pandas as pd
    from dolm.cli import parse_float_list
    from dolm.formats import read_json, write_json, write_table

    from .data import dag_to_matrix, from_frame, matrix_to_dag
    from .graphs import structure_metrics
    from .scm import SCM

    t_start, t_end = _two_floats(parse_float_list(temps, "--temperature"), "--temperature")
    df, meta = _read_variables(data, run)
    vd = from_frame(df, data, meta.extra, target_column,
                    [v.strip() for v in variables.split(",")] if variables else None,
                    [v.strip() for v in exclude.split(",")] if exclude else None)
    if mechanism == "mlp":
        n_train = int((vd.split == "train").sum())
        per_node = len(vd.nodes) * hidden + 2 * hidden + 1
        if n_train < MLP_ROWS_PER_PARAM * per_node:
            raise InputError(
                f"{data}: {n_train} training rows for --mechanism mlp with {len(vd.nodes)} "
                f"variables and --hidden {hidden} ({per_node} parameters per node's MLP); "
                f"expected at least {MLP_ROWS_PER_PARAM} rows per parameter "
                f"({MLP_ROWS_PER_PARAM * per_node} rows), or a smaller --hidden, or "
                "--mechanism linear")
    unknown = targets_mode == "unknown"
    true_targets = None
    if unknown:
        _check_unknown_targets(vd, data, observational_regime, ignore_targets)
        if target_column and target_column in df.columns:
            true_targets = dict(zip(vd.regimes, vd.targets, strict=True))
    B_true = None
    if true_dag:
        obj, _ = read_json(true_dag, schema="dag", run=run)
        B_true = dag_to_matrix(obj, vd.nodes, f"--true-dag {true_dag}")
    elif isinstance(vd.extra.get("true_dag"), dict):
        try:
            B_true = dag_to_matrix(vd.extra["true_dag"], vd.nodes, f"{data} (metadata true_dag)")
        except InputError:
            B_true = None  # variables renamed or subset: no ground truth to compare with

    # input checked: now the heavy imports
    import torch

    from . import checkpoint
    from .metrics import counterfactual_metrics, interventional_nll, metric_rows
    from .train import TrainConfig, fit

    if threads:
        torch.set_num_threads(threads)
    cfg = TrainConfig(mechanism=mechanism, hidden=hidden, lambda_sparse=lambda_sparse,
                      acyclicity=acyclicity, lr=lr, max_rounds=rounds,
                      inner_steps=steps_per_round, batch_size=batch_size, temp_start=t_start,
                      temp_end=t_end, p_random_intervention=p_intervene, cf_weight=cf_weight,
                      edge_threshold=edge_threshold, patience=patience, polish=not no_polish,
                      use_targets=not ignore_targets, unknown_targets=unknown,
                      obs_regime=observational_regime,
                      block_gradients=not no_gradient_blocking, seed=seed)
    tr = vd.rows("train")
    res = fit(vd.X[tr], [vd.targets[i] for i in tr], cfg, progress=progress,
              regimes=[vd.regimes[i] for i in tr])
    net = res.network
    learned = None
    if unknown:
        # held-out rows: a training regime's learned targets; a regime seen only in the
        # test rows keeps the target column's (there is nothing to learn them from)
        learned = res.regime_targets
        vd.targets = [learned.get(r, t) for r, t in zip(vd.regimes, vd.targets, strict=True)]

    structure = structure_metrics(B_true, res.adjacency) if B_true is not None else None
    te = vd.rows("test")
    nll = {}
    if len(te):
        per_row = interventional_nll(net, vd.X[te], [vd.targets[i] for i in te])
        regimes = np.asarray([vd.regimes[i] for i in te])
        nll["all"] = (float(per_row.mean()), len(te))
        for r in sorted(set(regimes)):
            sel = regimes == r
            nll[r] = (float(per_row[sel].mean()), int(sel.sum()))
    cf = None
    scm_obj = vd.extra.get("scm")
    if isinstance(scm_obj, dict) and scm_obj.get("nodes") == vd.nodes:
        scm = SCM.from_dict(scm_obj)
        obs = np.asarray([not t for t in vd.targets])
        pool = np.flatnonzero(obs & (vd.split == "test"))
        if len(pool) == 0:
            pool = np.flatnonzero(obs)
        if len(pool):
            cf = counterfactual_metrics(net, scm, vd.X[pool], np.random.default_rng(seed),
                                        vd.extra.get("standardized"))
    training = {"seconds": res.seconds, "steps": res.steps, "rounds": len(res.history),
                "final_h": res.history[-1]["h"] if res.history else None,
                "n_train": len(tr), "n_test": len(te), "edges": int(res.adjacency.sum())}
    target_scores = target_recovery(learned, true_targets) if unknown else None
    rows = metric_rows(structure, cf, nll, training, res.history, target_scores)
    metrics_df = pd.DataFrame(rows, columns=["metric", "value", "group", "regime", "step", "n"])
    metrics_df["step"] = metrics_df["step"].astype("Int64")
    metrics_df["n"] = metrics_df["n"].astype("Int64")

    os.makedirs(output, exist_ok=True)
    extra = {"nodes": vd.nodes, "config": cfg.to_dict()}
    if learned is not None:
        extra["learned_targets"] = {r: [vd.nodes[j] for j in js] for r, js in learned.items()}
    checkpoint.save(net, vd.nodes, os.path.join(output, "checkpoint.safetensors"), run=run,
                    force=True, config=cfg.to_dict())
    write_table(metrics_df, os.path.join(output, "metrics.parquet"), schema="cunit_metrics",
                run=run, force=True, extra=extra)
    dag = matrix_to_dag(res.adjacency, vd.nodes, res.strength)
    write_json(dag, os.path.join(output, "dag.json"), schema="dag", run=run, force=True)
    msg = f"dolm-train-cunit: {int(res.adjacency.sum())} edges in {res.seconds:.1f}s"
    if structure:
        msg += (f"; F1 {structure['f1']:.3f}, SHD {structure['shd']:.0f}, "
                f"TPR {structure['tpr']:.3f}, FDR {structure['fdr']:.3f}")
    if cf:
        msg += f"; counterfactual corr {cf['cf_corr']:.3f}, MSE {cf['cf_mse']:.4f}"
    if "all" in nll:
        msg += f"; held-out interventional NLL {nll['all'][0]:.3f}"
    if learned is not None:
        msg += f"; {sum(map(len, learned.values()))} learned targets in {len(learned)} regimes"
        if target_scores:
            msg += f" (target F1 {target_scores['target_f1']:.3f})"
    log(msg + f" -> {output}")


def _check_unknown_targets(vd, data, obs, ignore_targets):
    """--targets unknown needs regimes to learn from and an observational one."""
    if ignore_targets:
        raise InputError("--ignore-targets: cannot be combined with --targets unknown "
                         "(expected one of them)")
    names = sorted({vd.regimes[i] for i in vd.rows("train")})
    if len(names) < 2:
        raise InputError(f"{data}: --targets unknown needs rows of two or more regimes "
                         f"(a 'regime' column, or a target column to group rows by); "
                         f"found {len(names)} ({', '.join(names)})")
    if obs not in names:
        raise InputError(f"--observational-regime {obs}: no training rows of that regime in "
                         f"{data}; expected one of {', '.join(names)}")


def target_recovery(learned: dict, truth: dict) -> dict | None:
    """Precision / recall / F1 of the learned (regime, variable) intervention pairs against
    the target column's; None without a target column to compare with."""
    if not truth:
        return None
    pred = {(r, j) for r, js in learned.items() for j in js}
    true = {(r, j) for r, js in truth.items() if r in learned for j in js}
    tp = len(pred & true)
    prec = tp / len(pred) if pred else 1.0
    rec = tp / len(true) if true else 1.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"target_f1": f1, "target_precision": prec, "target_recall": rec,
            "n_targets_true": len(true), "n_targets_pred": len(pred)}


def _two_floats(vals, option):
    if len(vals) != 2 or min(vals) <= 0:
        raise InputError(f"{option}: expected two positive numbers 'start,end', found {vals}")
    return vals[0], vals[1]


def _read_variables(path, run):
    from dolm.formats import read_table

    df, meta = read_table(path, run=run)
    if meta.schema not in (None, "variables"):
        raise InputError(f"{path}: is a {meta.schema!r} file, expected a variable table "
                         "(Parquet/CSV with one numeric column per variable)")
    if meta.schema is None:
        # a user's plain table: check the bookkeeping columns against the schema
        from dolm.formats.io import to_arrow
        from dolm.formats.schema import check_table, load_schema

        problems = check_table(to_arrow(df), load_schema("variables"), path)
        if problems:
            raise InputError(problems[0])
    return df, meta


# ------------------------------------------------------------------ check-gradients


@subcommand(main, "check-gradients", "train-cunit", outputs=())
@click.option("--d", "d", type=click.IntRange(3, 64), default=6, show_default=True)
@click.option("--targets", "target_sets", default=None,
              help="Intervention sets, ';'-separated, each comma-separated node indices "
                   "(default: one node, then two at once).")
@click.option("--mechanism", type=click.Choice(["linear", "mlp", "both"]), default="both",
              show_default=True)
@click.option("--no-gradient-blocking", is_flag=True,
              help="Check the straight-through ablation instead (the checks should fail).")
@seed_option
def check_gradients_cmd(run, d, target_sets, mechanism, no_gradient_blocking, seed):
    """Check that do() gives exactly zero gradient upstream of intervened nodes and
    plain-autograd gradients everywhere else. Exit 0 when every check passes, 1 if not."""
    import sys

    from .gradcheck import check_gradients

    sets = None
    if target_sets:
        sets = []
        for part in target_sets.split(";"):
            try:
                idx = sorted({int(s) for s in part.split(",") if s.strip()})
            except ValueError:
                raise InputError(f"--targets: expected node indices like '2;1,4', found "
                                 f"{part!r}") from None
            if not idx or min(idx) < 0 or max(idx) >= d:
                raise InputError(f"--targets: {part!r}: expected indices in 0..{d - 1}")
            sets.append(idx)
    mechs = ("linear", "mlp") if mechanism == "both" else (mechanism,)
    rows = check_gradients(d=d, target_sets=sets, mechanisms=mechs, seed=seed,
                           block=not no_gradient_blocking)
    cols = ["mechanism", "targets", "check", "max_abs_blocked_grad",
            "max_abs_diff_vs_autograd", "ok"]
    click.echo("\t".join(cols))
    for r in rows:
        click.echo("\t".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c])
                             for c in cols))
    failed = [r for r in rows if not r["ok"]]
    if failed:
        log(f"dolm-train-cunit: {len(failed)} of {len(rows)} gradient checks failed")
        sys.exit(1)
    log(f"dolm-train-cunit: all {len(rows)} gradient checks passed")
