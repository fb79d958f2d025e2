"""dolm-circuit's work: read inputs, score edges, prune, evaluate, write outputs."""

from __future__ import annotations

import numpy as np
from dolm.errors import InputError


def _model_record(lm) -> dict:
    return {"spec": str(lm.info.get("spec")), "weights_sha256": lm.info.get("weights_sha256"),
            "n_layers": int(lm.n_layers), "n_heads": int(lm.n_heads)}


def _batch(model_opts) -> int:
    b = model_opts.batch_size
    return 16 if b == "auto" else int(b)


def _scorer(run, prompts, model_opts, metric, corruption, noise, where, limit, seed,
            check=None):
    """Prompts, model and :class:`Scorer`; ``check(lm)`` runs before the prompts are
    tokenised (a circuit file checked against the model)."""
    from dolm.circuits.graph import GraphRunner
    from dolm.circuits.scores import Scorer, prepare
    from dolm.cli import load_model
    from dolm.executor import shard_rows
    from dolm.formats import read_table
    from dolm.metrics import select_prompts

    df, _ = read_table(prompts, schema="prompts", run=run)
    df = shard_rows(select_prompts(df, where, limit, prompts), run)  # edges: --shard / Ray
    lm = load_model(model_opts, run=run)
    GraphRunner(lm)  # refuses other architectures before any work
    if check is not None:
        check(lm)
    data = prepare(lm, df, prompts, metric, corruption)
    sc = Scorer(lm, data, metric, corruption=corruption, noise=noise, seed=seed,
                batch_size=_batch(model_opts))
    sc.runner.check(data.ids[:4, : int(data.lengths[:4].max())], data.positions[:4])
    return lm, sc


def run_edges(run, *, prompts, model_opts, method, metric, corruption, noise, steps, budget,
              force_budget, per_prompt, where, limit, output, force, seed) -> None:
    """``dolm-circuit edges``: score every edge; write the edges table."""
    from dolm.cli import log
    from dolm.formats import write_table

    sharded = getattr(run, "shard", None) is not None
    if sharded and corruption == "noise":
        raise InputError("--corruption noise: cannot run in shards yet (the noise draws "
                         "follow the batches of the whole prompt list); run it in one process")
    lm, sc = _scorer(run, prompts, model_opts, metric, corruption, noise, where, limit, seed)
    g = sc.g
    n_edges = len(g.edges)
    if method == "exact" and n_edges > budget and not force_budget:
        raise InputError(f"--method exact: this model has {n_edges} edges, over the budget of "
                         f"{budget} (--budget); each costs a partial forward per prompt. Use "
                         "eap or eap-ig, raise --budget, or pass --force-budget")
    log(f"{method}: {n_edges} edges, {len(sc.data.prompt_ids)} prompts")
    if method == "exact":
        scores = sc.exact(range(n_edges))
    else:
        scores = sc.attribution(steps if method == "eap-ig" else 1)
    clean, corrupt = sc.base_metrics()
    names = [g.edge_name(e) for e in g.edges]
    edges = ([n[0] for n in names], [n[1] for n in names], [n[2] for n in names])
    # a shard writes every prompt's rows and metrics: the merge averages over all prompts
    out = edges_table(edges, scores, sc.data.prompt_ids, method, metric,
                      per_prompt or sharded)
    extra = {"model": _model_record(lm), "corruption": corruption,
             "noise": noise if corruption == "noise" else None,
             "steps": steps if method == "eap-ig" else None, "n_prompts": len(clean),
             "clean_metric": float(np.mean(clean)), "corrupt_metric": float(np.mean(corrupt))}
    if sharded:
        extra["shard_metrics"] = {"clean": clean.tolist(), "corrupt": corrupt.tolist()}
    write_table(out, output, schema="edges", run=run, force=force, extra=extra)


def edges_table(edges, scores, prompt_ids, method: str, metric: str, per_prompt: bool):
    """The edges table: the mean over prompts of ``scores`` (N, E) per edge (``edges``:
    src, dst, channel lists), ranked by |score|, then with ``per_prompt`` every prompt's."""
    import pandas as pd
    from dolm.formats import frame

    src, dst, ch = edges

    def rows(vals, pid):
        a = np.abs(vals)
        rank = np.empty(len(vals), dtype=np.int64)
        rank[np.argsort(-a, kind="stable")] = np.arange(1, len(vals) + 1)
        return pd.DataFrame({"src": src, "dst": dst, "channel": ch, "score": vals,
                             "abs_score": a, "rank": rank, "method": method,
                             "metric": metric, "prompt_id": pid})

    parts = [rows(scores.mean(0), None)]
    if per_prompt:
        parts += [rows(scores[i], p) for i, p in enumerate(prompt_ids)]
    return frame(pd.concat(parts, ignore_index=True), "edges")


def merge_edges(run, shard_files, outputs, force) -> None:
    """--executor ray: every prompt's scores from the shards (in prompt order), averaged
    over all prompts as one process does; the prompt rows kept with --per-prompt."""
    from dolm.executor import adopt_chain
    from dolm.formats import all_or_none, read_table, write_table

    adopt_chain(run, shard_files[0]["output"])
    tables, metas = zip(*(read_table(s["output"], schema="edges") for s in shard_files),
                        strict=True)
    agg = tables[0][tables[0]["prompt_id"].isna()]
    per = [t[t["prompt_id"].notna()] for t in tables]
    pids = [str(p) for t in per for p in t["prompt_id"].to_numpy()[:: len(agg)]]
    scores = np.concatenate([t["score"].to_numpy(np.float64).reshape(-1, len(agg))
                             for t in per])
    edges = (list(agg["src"]), list(agg["dst"]), list(agg["channel"]))
    out = edges_table(edges, scores, pids, str(agg["method"].iloc[0]),
                      str(agg["metric"].iloc[0]), bool(run.params.get("per_prompt")))
    extra = dict(metas[0].extra)
    clean = np.concatenate([m.extra["shard_metrics"]["clean"] for m in metas])
    corrupt = np.concatenate([m.extra["shard_metrics"]["corrupt"] for m in metas])
    del extra["shard_metrics"]
    extra.update(n_prompts=len(clean), clean_metric=float(np.mean(clean)),
                 corrupt_metric=float(np.mean(corrupt)))
    with all_or_none():
        write_table(out, outputs["output"], schema="edges", run=run, force=force, extra=extra)


def _aggregated(df, path: str):
    agg = df[df["prompt_id"].isna()]
    if len(agg) == 0:  # only per-prompt rows: average them
        agg = (df.groupby(["src", "dst", "channel"], dropna=False, sort=False)["score"]
               .mean().reset_index())
        agg["abs_score"] = agg["score"].abs()
    if len(agg) == 0:
        raise InputError(f"{path}: no edges")
    return agg.sort_values("abs_score", ascending=False, kind="stable")


def run_prune(run, *, edges_path, top_n, threshold, output, force) -> None:
    """``dolm-circuit prune``: the top-n / threshold edges -> circuit JSON."""
    from dolm.formats import read_table, write_json

    if (top_n is None) == (threshold is None):
        raise InputError("prune: give exactly one of --top-n N and --threshold X")
    df, meta = read_table(edges_path, schema="edges", run=run)
    agg = _aggregated(df, edges_path)
    keep = agg.head(top_n) if top_n is not None else agg[agg["abs_score"] >= threshold]
    extra = meta.extra or {}
    model = extra.get("model")
    if not model:
        raise InputError(f"{edges_path}: no model record in its metadata (dolm.extra.model); "
                         "expected an edges table written by dolm-circuit edges")
    edges = [{"source": r.src, "target": r.dst,
              "channel": None if not isinstance(r.channel, str) else r.channel,
              "score": float(r.score)} for r in keep.itertuples()]
    nodes = []
    for e in edges:
        for n in (e["source"], e["target"]):
            if n not in nodes:
                nodes.append(n)
    obj = {"model": model, "method": str(df["method"].iloc[0]),
           "metric": str(df["metric"].iloc[0]), "corruption": extra.get("corruption"),
           "nodes": nodes, "edges": edges,
           "selection": {"top_n": top_n, "threshold": threshold, "n_candidates": len(agg)}}
    write_json(obj, output, schema="circuit", run=run, force=force)


def read_circuit(path: str, lm, graph, run=None) -> tuple[dict, list[int]]:
    """A circuit JSON checked against the loaded model -> (object, edge ids)."""
    from dolm.formats import read_json

    obj, _ = read_json(path, schema="circuit", run=run)
    m = obj["model"]
    want, have = m.get("weights_sha256"), lm.info.get("weights_sha256")
    if (want and have and want != have) or m["n_layers"] != lm.n_layers \
            or m["n_heads"] != lm.n_heads:
        raise InputError(f"{path}: the circuit was found on model {m.get('spec')!r} "
                         f"({m['n_layers']} layers, {m['n_heads']} heads, weights "
                         f"{str(want)[:12]}), not on the model given {lm.info.get('spec')!r} "
                         f"({lm.n_layers} layers, {lm.n_heads} heads, weights "
                         f"{str(have)[:12]})")
    ids = [graph.find_edge(e["source"], e["target"], e.get("channel"), where=path)
           for e in obj["edges"]]
    return obj, ids


def _ranking(path: str, graph, run) -> list[int]:
    from dolm.formats import read_table

    df, _ = read_table(path, schema="edges", run=run)
    agg = _aggregated(df, path)
    return [graph.find_edge(r.src, r.dst, r.channel if isinstance(r.channel, str) else None,
                            where=path) for r in agg.itertuples()]


def size_grid(n: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to n (n included)."""
    out, base = [], 1
    while base <= n:
        for m in (1, 2, 5):
            if m * base <= n:
                out.append(m * base)
        base *= 10
    if not out or out[-1] != n:
        out.append(n)
    return out


def run_evaluate(run, *, prompts, model_opts, circuit_path, ablate, metric, corruption, noise,
                 edges_path, sizes, where, limit, output, force, seed) -> None:
    """``dolm-circuit evaluate``: faithfulness of the circuit and the curve over sizes."""
    import pandas as pd
    from dolm.circuits.scores import faithfulness
    from dolm.cli import parse_int_list
    from dolm.formats import frame, write_table

    if ablate in ("cf", "noise"):
        corruption = ablate
    from dolm.circuits.graph import graph_for

    got = {}

    def check(lm):
        got["circ"], got["ids"] = read_circuit(circuit_path, lm, graph_for(lm), run=run)

    lm, sc = _scorer(run, prompts, model_opts, metric, corruption, noise, where, limit, seed,
                     check=check)
    g = sc.g
    circ, ids = got["circ"], got["ids"]
    if edges_path:
        ranking = _ranking(edges_path, g, run)
    else:
        order = np.argsort([-abs(e["score"]) for e in circ["edges"]], kind="stable")
        ranking = [ids[i] for i in order]
    grid = size_grid(len(ranking)) if sizes is None else parse_int_list(sizes, "--sizes")
    bad = [s for s in grid if s < 0 or s > len(ranking)]
    if bad:
        raise InputError(f"--sizes: {bad[0]} is outside 0..{len(ranking)} (the ranking's "
                         "length)")
    sets = [ids] + [ranking[:k] for k in grid]
    res = sc.evaluate(sets, ablate)
    full, abl = res["full"], res["ablated"]
    rows = []
    for i, k in enumerate([len(ids)] + list(grid)):
        c, comp = res[f"circuit.{i}"], res[f"complement.{i}"]
        fm, am = float(np.mean(full)), float(np.mean(abl))
        rows.append({"kind": "circuit" if i == 0 else "curve", "n_edges": k, "metric": metric,
                     "ablate": ablate, "full": fm, "circuit": float(np.mean(c)),
                     "complement": float(np.mean(comp)), "ablated": am,
                     "faithfulness": faithfulness(c, full),
                     "faithfulness_norm": (float(np.mean(c)) - am) / (fm - am)
                     if fm != am else None,
                     "complement_ratio": faithfulness(comp, full), "n_prompts": len(full)})
    out = frame(pd.DataFrame(rows), "faithfulness")
    write_table(out, output, schema="faithfulness", run=run, force=force,
                extra={"model": _model_record(lm), "circuit_method": circ["method"],
                       "circuit_edges": len(ids)})
