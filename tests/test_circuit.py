"""Edge-level circuits: exact edge patching against a hand-written hook loop, EAP against
finite differences of that loop, the planted induction circuit (ground truth), and the
dolm-circuit CLI (pipeline, validation, bad input)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------- the hook-loop oracle
def _sender_outputs(model, ids):
    """Clean outputs of every sender by plain hooks on the HF GPT-2 modules."""
    tr = model.transformer
    nh = model.config.n_head
    d = model.config.n_embd
    dh = d // nh
    got, hs = {}, []
    hs.append(tr.drop.register_forward_hook(lambda m, a, o: got.__setitem__("embed", o)))
    for lyr, blk in enumerate(tr.h):
        def pre(m, a, lyr=lyr):
            z = a[0]
            w = m.weight
            for h in range(nh):
                got[f"head.{lyr}.{h}"] = z[..., h * dh:(h + 1) * dh] @ w[h * dh:(h + 1) * dh]
        hs.append(blk.attn.c_proj.register_forward_pre_hook(pre))
        hs.append(blk.mlp.register_forward_hook(
            lambda m, a, o, lyr=lyr: got.__setitem__(f"mlp.{lyr}", o)))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for h in hs:
        h.remove()
    return got, logits


def _patched_logits(model, ids, dst, channel, delta):
    """Logits with ``delta`` added to receiver ``dst``'s input (through ``channel`` for a
    head) and nowhere else."""
    tr = model.transformer
    d = model.config.n_embd
    dh = d // model.config.n_head
    hs = []
    kind = dst.split(".")[0]
    if kind == "logits":
        hs.append(tr.ln_f.register_forward_pre_hook(lambda m, a: (a[0] + delta,)))
    elif kind == "mlp":
        blk = tr.h[int(dst.split(".")[1])]
        hs.append(blk.ln_2.register_forward_pre_hook(lambda m, a: (a[0] + delta,)))
    else:
        lyr, head = int(dst.split(".")[1]), int(dst.split(".")[2])
        blk = tr.h[lyr]
        saved = {}
        hs.append(blk.register_forward_pre_hook(
            lambda m, a, k: saved.__setitem__("x", a[0] if a else k["hidden_states"]),
            with_kwargs=True))
        c = "qkv".index(channel)
        lo = c * d + head * dh

        def fix(m, a, out):
            alt = blk.ln_1(saved["x"] + delta) @ m.weight + m.bias  # Conv1D, not hooked
            out = out.clone()
            out[..., lo:lo + dh] = alt[..., lo:lo + dh]
            return out
        hs.append(blk.attn.c_attn.register_forward_hook(fix))
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        for h in hs:
            h.remove()


def _ld(logits, pos, t, f):
    rows = torch.arange(logits.shape[0])
    lg = logits[rows, pos]
    return (lg[rows, t] - lg[rows, f]).double().numpy()


EDGES = [("embed", "head.1.2", "k"), ("head.0.1", "head.2.0", "q"),
         ("mlp.0", "head.1.3", "v"), ("head.1.0", "mlp.2", None), ("mlp.1", "logits", None),
         ("embed", "logits", None), ("head.0.0", "mlp.0", None), ("head.2.3", "logits", None)]


@pytest.fixture(scope="module")
def tiny_scorer(circuit_scorer):
    return circuit_scorer("gpt2")


def test_graph_pass_reproduces_the_model(tiny_scorer):
    lm, data, sc = tiny_scorer
    assert sc.runner.check(data.ids, data.positions) < 1e-4


def test_exact_equals_hand_written_hook_loop(tiny_scorer):
    lm, data, sc = tiny_scorer
    g = sc.g
    ids = [g.find_edge(*e) for e in EDGES]
    ours = sc.exact(ids)
    model = lm.model
    for i in range(len(data.prompt_ids)):
        t = int(data.lengths[i])
        x, cx = data.ids[i:i + 1, :t], data.cf_ids[i:i + 1, :t]
        pos = data.positions[i:i + 1]
        clean, lc = _sender_outputs(model, x)
        cor, _ = _sender_outputs(model, cx)
        m0 = _ld(lc, pos, data.target[i:i + 1], data.foil[i:i + 1])
        for j, (src, dst, ch) in enumerate(EDGES):
            lp = _patched_logits(model, x, dst, ch, cor[src] - clean[src])
            ref = _ld(lp, pos, data.target[i:i + 1], data.foil[i:i + 1]) - m0
            assert ours[i, j] == pytest.approx(float(ref[0]), abs=2e-4), (i, src, dst, ch)
    assert np.abs(ours).max() > 1e-3  # the edges do something


def test_eap_is_the_first_order_term_of_the_hook_loop(tiny_scorer):
    """EAP score = d/da metric(edge patched by a * delta) at a = 0 (finite differences of
    the independent hook loop)."""
    lm, data, sc = tiny_scorer
    g = sc.g
    eap = sc.attribution(1)
    model = lm.model
    i, eps = 0, 1e-3
    t = int(data.lengths[i])
    x, cx = data.ids[i:i + 1, :t], data.cf_ids[i:i + 1, :t]
    pos = data.positions[i:i + 1]
    clean, lc = _sender_outputs(model, x)
    cor, _ = _sender_outputs(model, cx)
    tg, fo = data.target[i:i + 1], data.foil[i:i + 1]
    for src, dst, ch in EDGES:
        delta = cor[src] - clean[src]
        up = _ld(_patched_logits(model, x, dst, ch, eps * delta), pos, tg, fo)
        dn = _ld(_patched_logits(model, x, dst, ch, -eps * delta), pos, tg, fo)
        fd = float((up - dn)[0] / (2 * eps))
        got = float(eap[i, g.find_edge(src, dst, ch)])
        assert got == pytest.approx(fd, rel=2e-2, abs=2e-3), (src, dst, ch)


# ----------------------------------------------------------------- planted ground truth
@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from dolm.circuits.planted import build_planted_induction, planted_prompts
    from dolm.circuits.scores import Scorer, prepare
    from dolm.models import load

    path = build_planted_induction(tmp_path_factory.mktemp("planted"))
    lm = load(str(path))
    df = planted_prompts(12, seed=1)
    data = prepare(lm, df, "planted", "logit_diff", "cf")
    return path, df, lm, Scorer(lm, data, "logit_diff", batch_size=12)


def test_planted_model_does_induction(planted):
    _, _, _, sc = planted
    clean, corrupt = sc.base_metrics()
    assert (clean > 5).all() and (corrupt < -5).all()


def test_exact_ranks_the_planted_edges_first_and_eap_ig_recovers_them(planted):
    from dolm.circuits.planted import PLANTED_EDGES

    _, _, _, sc = planted
    g = sc.g
    want = {g.find_edge(*e) for e in PLANTED_EDGES}
    k = len(want)
    exact = np.abs(sc.exact(range(len(g.edges))).mean(0))
    assert set(np.argsort(-exact)[:k].tolist()) == want
    ig = np.abs(sc.attribution(10).mean(0))
    assert set(np.argsort(-ig)[:k].tolist()) == want
    # plain EAP (one gradient at the clean run) is fooled by the saturated softmax: it
    # ranks an edge of the planted path below the top k (measured: rank 9)
    eap = np.abs(sc.attribution(1).mean(0))
    assert not want <= set(np.argsort(-eap)[:k].tolist())


def test_planted_edges_alone_are_faithful(planted):
    from dolm.circuits.planted import PLANTED_EDGES
    from dolm.circuits.scores import faithfulness

    _, _, _, sc = planted
    g = sc.g
    circ = [g.find_edge(*e) for e in PLANTED_EDGES]
    res = sc.evaluate([circ, circ[:-1]], "cf")
    assert faithfulness(res["circuit.0"], res["full"]) >= 0.95
    # without the induction head's edge into the logits the answer is gone
    assert faithfulness(res["circuit.1"], res["full"]) < 0.5
    assert faithfulness(res["complement.0"], res["full"]) < 0.0  # ablating it flips it


# ----------------------------------------------------------------- the CLI
def _run(*args):
    return subprocess.run(list(args), capture_output=True, text=True)


def _in_process(capsys, *args):
    """The real click command in this process (no interpreter start-up): exit code, stderr."""
    from dolm_tools.circuit.cli import main

    with pytest.raises(SystemExit) as exc:
        main.main(list(args), prog_name="dolm-circuit")
    return exc.value.code, capsys.readouterr().err


def test_cli_edges_prune_evaluate_and_bad_input(planted, tmp_path, tiny_gpt2_dir, capsys):
    from dolm.circuits.planted import PLANTED_EDGES
    from dolm.formats import read_table, validate_file, write_table

    path, df, _, _ = planted
    prompts = tmp_path / "prompts.parquet"
    write_table(df, prompts, schema="prompts", run=None)
    edges = tmp_path / "edges.parquet"
    r = _run("dolm-circuit", "edges", str(prompts), "--model", str(path), "--method", "exact",
             "-o", str(edges))
    assert r.returncode == 0, r.stderr
    got, _ = read_table(edges)
    agg = got[got.prompt_id.isna()].sort_values("rank")
    top = {(a, b, c if isinstance(c, str) else None)
           for a, b, c in agg[["src", "dst", "channel"]].head(5).itertuples(index=False)}
    assert top == set(PLANTED_EDGES)
    circ = tmp_path / "circuit.json"
    r = _run("dolm-circuit", "prune", str(edges), "--top-n", "5", "-o", str(circ))
    assert r.returncode == 0, r.stderr
    faith = tmp_path / "faith.parquet"
    r = _run("dolm-circuit", "evaluate", str(prompts), "--model", str(path), "--circuit",
             str(circ), "--ablate", "cf", "--edges", str(edges), "--sizes", "1,5,20",
             "-o", str(faith))
    assert r.returncode == 0, r.stderr
    f, _ = read_table(faith)
    row = f[f.kind == "circuit"].iloc[0]
    assert row.n_edges == 5 and row.faithfulness >= 0.95
    assert list(f[f.kind == "curve"].n_edges) == [1, 5, 20]
    for p in (edges, circ, faith):
        assert validate_file(str(p))[1] == []
    from dolm_tools.plot.cli import main as plot_main

    with pytest.raises(SystemExit) as exc:
        plot_main.main(["files", str(edges), str(circ), str(faith), "-o",
                        str(tmp_path / "fig")], prog_name="dolm-plot")
    assert exc.value.code in (0, None), capsys.readouterr().err
    figs = sorted(p.name for p in (tmp_path / "fig").glob("*.png"))
    for want in ("graph", "matrix", "curve"):
        assert any(want in f for f in figs), figs
    # bad input: a circuit from another model
    code, err = _in_process(capsys, "evaluate", str(prompts), "--model", str(tiny_gpt2_dir),
                            "--circuit", str(circ), "-o", str(tmp_path / "x.parquet"))
    assert code == 3 and "circuit was found on model" in err, err
    # an edge naming a node the model lacks
    obj = json.loads(circ.read_text())
    obj["edges"][0]["source"] = "head.7.0"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(obj))
    code, err = _in_process(capsys, "evaluate", str(prompts), "--model", str(path),
                            "--circuit", str(bad), "-o", str(tmp_path / "y.parquet"))
    assert code == 3 and "'head.7.0'" in err and "no such node" in err, err
    # exact over the budget
    code, err = _in_process(capsys, "edges", str(prompts), "--model", str(path), "--method",
                            "exact", "--budget", "10", "-o", str(tmp_path / "z.parquet"))
    assert code == 3 and "--force-budget" in err, err
    assert not (tmp_path / "z.parquet").exists() and not (tmp_path / "x.parquet").exists()


# ----------------------------------------------------------------- path patching
def _ioi_path_patch(model, x, cx, senders, receivers):
    """The IOI paper's three steps with plain hooks: (1) cache both runs; (2) run the
    reference with the senders' outputs from the other run and every other head and MLP
    frozen at the reference, recording the receivers' q/k/v (or MLP / final input); (3)
    rerun the reference with only those inputs replaced."""
    tr = model.transformer
    d, nh = model.config.n_embd, model.config.n_head
    dh = d // nh

    def cache(ids):
        z, mlp, hs = {}, {}, []
        for lyr, blk in enumerate(tr.h):
            hs.append(blk.attn.c_proj.register_forward_pre_hook(
                lambda m, a, lyr=lyr: z.__setitem__(lyr, a[0].clone())))
            hs.append(blk.mlp.register_forward_hook(
                lambda m, a, o, lyr=lyr: mlp.__setitem__(lyr, o.clone())))
        with torch.no_grad():
            model(input_ids=ids)
        for h in hs:
            h.remove()
        return z, mlp

    (zc, mc), (zk, mk) = cache(x), cache(cx)
    hs, seen = [], {}
    for lyr, blk in enumerate(tr.h):
        def freeze_heads(m, a, lyr=lyr):
            z = zc[lyr].clone()
            for h in range(nh):
                if f"head.{lyr}.{h}" in senders:
                    z[..., h * dh:(h + 1) * dh] = zk[lyr][..., h * dh:(h + 1) * dh]
            return (z,)
        hs.append(blk.attn.c_proj.register_forward_pre_hook(freeze_heads))
        hs.append(blk.mlp.register_forward_hook(
            lambda m, a, o, lyr=lyr: mk[lyr] if f"mlp.{lyr}" in senders else mc[lyr]))
        hs.append(blk.attn.c_attn.register_forward_hook(
            lambda m, a, o, lyr=lyr: seen.__setitem__(("qkv", lyr), o.clone())))
        hs.append(blk.ln_2.register_forward_pre_hook(
            lambda m, a, lyr=lyr: seen.__setitem__(("mlp", lyr), a[0].clone())))
    hs.append(tr.ln_f.register_forward_pre_hook(
        lambda m, a: seen.__setitem__("final", a[0].clone())))
    with torch.no_grad():  # the embedding is a node too: from the other run if it sends
        model(input_ids=cx if "embed" in senders else x)
    for h in hs:
        h.remove()
    hs = []
    for name, ch in receivers:
        kind = name.split(".")[0]
        if kind == "logits":
            hs.append(tr.ln_f.register_forward_pre_hook(lambda m, a: (seen["final"],)))
        elif kind == "mlp":
            lyr = int(name.split(".")[1])
            hs.append(tr.h[lyr].ln_2.register_forward_pre_hook(
                lambda m, a, lyr=lyr: (seen[("mlp", lyr)],)))
        else:
            lyr, h = int(name.split(".")[1]), int(name.split(".")[2])
            lo = "qkv".index(ch) * d + h * dh

            def put(m, a, o, lyr=lyr, lo=lo):
                o = o.clone()
                o[..., lo:lo + dh] = seen[("qkv", lyr)][..., lo:lo + dh]
                return o
            hs.append(tr.h[lyr].attn.c_attn.register_forward_hook(put))
    try:
        with torch.no_grad():
            return model(input_ids=x).logits
    finally:
        for h in hs:
            h.remove()


@pytest.mark.parametrize("receivers", [
    [("head.2.0", "k"), ("head.2.3", "k")], [("head.1.2", "q")], [("mlp.1", None)],
    [("logits", None)]])
def test_path_patching_equals_the_ioi_three_step_hook_loop(tiny_scorer, receivers):
    """Receivers of one layer (with receivers downstream of others the IOI loop also
    freezes the paths through the upstream receivers; the edge form keeps them live)."""
    from dolm.circuits.path import path_edges, path_patch

    lm, data, sc = tiny_scorer
    senders = {"head.0.1", "head.0.3", "mlp.0", "embed"}
    ch = receivers[0][1] or "q,k,v"
    ids = path_edges(sc.g, ",".join(sorted(senders)), ",".join(r for r, _ in receivers), ch)
    ref, got = path_patch(sc, ids)
    for i in range(len(data.prompt_ids)):
        t = int(data.lengths[i])
        want = _ioi_path_patch(lm.model, data.ids[i:i + 1, :t], data.cf_ids[i:i + 1, :t],
                               senders, receivers)[0, int(data.positions[i])]
        assert torch.allclose(got[i], want, atol=2e-4), (got[i] - want).abs().max()
        assert (got[i] - ref[i]).abs().max() > 1e-3


def test_patch_cli_path_mode(planted, tmp_path, capsys):
    """dolm-patch --mode path (the click command in this process: the executables are
    exercised by the dolm-circuit test above)."""
    from dolm.formats import read_table, write_table
    from dolm_tools.patch.cli import main

    path, df, _, _ = planted
    prompts = tmp_path / "prompts.parquet"
    write_table(df, prompts, schema="prompts", run=None)
    out = tmp_path / "path.parquet"
    with pytest.raises(SystemExit) as exc:
        main.main([str(prompts), "--model", str(path), "--mode", "path", "--direction",
                   "noise", "--senders", "head.0.0", "--receivers", "head.1.0", "--channels",
                   "k", "-o", str(out)], prog_name="dolm-patch")
    assert exc.value.code in (0, None), capsys.readouterr().err
    eff, _ = read_table(out)
    ld = eff[eff.metric == "logit_diff"]
    # the previous-token head's path into the induction head's key carries the answer:
    # with it from the counterfactual the logit difference collapses (measured: 13.3 -> 1.4)
    assert (ld.clean_value > 5).all() and ld.value.mean() < 0.25 * ld.clean_value.mean()
