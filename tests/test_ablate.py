"""dolm-ablate: ablations against independent hook computations, invariants (mean
ablation with the prompt itself as reference changes nothing; a batched scan equals
ablating heads one at a time), the bayes metrics against numpy, ranking an effects
file, and the CLI (real executable) with its bad-input errors."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from dolm.metrics import ids_matrix, metrics_table, prompt_targets, read_logits
from dolm_tools.ablate.components import parse_sets, pick_sets, rank_components, scan_sets
from dolm_tools.ablate.core import Ablator, Condition, draw_donors, positional_mean

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sweep():
    """A small bayes evidence sweep: 4 draws, up to 3 orderings per multiset (11 prompts)."""
    from dolm.tasks import generate

    return generate("bayes", n_draws=4, sweep=True, permutations=3)


def run_ablator(lm, df, sets, kind="zero", **kw):
    tg = prompt_targets(df, lm, "prompts")
    conds = [Condition(s, kind, 0 if kind == "resample" else None) for s in sets]
    ab = Ablator(lm, tg, list(df["prompt"]), conds, **kw)
    clean, per = ab.run()
    return tg, clean, per


def hooked_metrics(lm, df, tg, hooks):
    """Metrics of one plain forward with ``hooks`` [(module, kind, fn)] registered."""
    enc = lm.encode(list(df["prompt"]))
    handles = []
    for mod, kind, fn in hooks:
        if kind == "pre":
            handles.append(mod.register_forward_pre_hook(fn, with_kwargs=True))
        else:
            handles.append(mod.register_forward_hook(fn))
    try:
        with torch.no_grad():
            out = lm.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    finally:
        for h in handles:
            h.remove()
    lg = out.logits[torch.arange(len(df)), enc.last_index]
    return metrics_table(read_logits(lg, torch.tensor(ids_matrix(tg))).numpy(), tg)


def zero_slice(lo, hi, positions=None):
    def pre(module, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).clone()
        if positions is None:
            x[..., lo:hi] = 0
        else:
            x[positions[0], positions[1], lo:hi] = 0
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    return pre


def zero_output(module, args, output):
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


def assert_close(a: dict, b: dict, tol=1e-4):
    assert set(a) == set(b)
    for m in a:
        np.testing.assert_allclose(a[m], b[m], atol=tol, rtol=0, err_msg=m)


# ----------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_zero_head_scan_equals_zeroing_the_slice_before_the_output_projection(
        tiny_lm, sweep, family):
    lm = tiny_lm(family)
    sets = scan_sets(lm, "heads")
    # batch size 7 mixes heads of different layers and prompts in one batch
    tg, clean, per = run_ablator(lm, sweep, sets, batch_size=7)
    assert_close(clean, hooked_metrics(lm, sweep, tg, []))
    for cset, got in zip(sets, per, strict=True):
        s = lm.parse_site(cset.sites[0])
        mod = lm.adapter.block_module(s.layer, "attn_o")
        d = lm.d_head
        want = hooked_metrics(lm, sweep, tg, [(mod, "pre", zero_slice(s.head * d,
                                                                       (s.head + 1) * d))])
        assert_close(got, want)
    # ablation changes the metrics at all (the comparison is not vacuous)
    assert max(np.abs(p["logit_diff"] - clean["logit_diff"]).max() for p in per) > 1e-3


def test_zero_attention_mlp_and_whole_layer_equal_zeroed_module_outputs(tiny_lm, sweep):
    lm = tiny_lm("gpt2")
    sets = parse_sets(lm, ["attn_out.1,mlp_out.0,layer.2,head.0.1+mlp_out.2"])
    tg, _, per = run_ablator(lm, sweep, sets, batch_size=5)
    attn = [lm.adapter.block_module(i, "attn") for i in range(lm.n_layers)]
    mlp = [lm.adapter.block_module(i, "mlp") for i in range(lm.n_layers)]
    d = lm.d_head
    wants = [
        [(attn[1], "post", zero_output)],
        [(mlp[0], "post", zero_output)],
        [(attn[2], "post", zero_output), (mlp[2], "post", zero_output)],
        [(lm.adapter.block_module(0, "attn_o"), "pre", zero_slice(d, 2 * d)),
         (mlp[2], "post", zero_output)],
    ]
    for got, hooks in zip(per, wants, strict=True):
        assert_close(got, hooked_metrics(lm, sweep, tg, hooks))


def test_zero_at_the_last_position_only(tiny_lm, sweep):
    lm = tiny_lm("gpt2")
    sets = parse_sets(lm, ["head.1.3"])
    tg, _, per = run_ablator(lm, sweep, sets, positions=("last", None))
    enc = lm.encode(list(sweep["prompt"]))
    rows = (torch.arange(len(sweep)), enc.last_index)
    mod = lm.adapter.block_module(1, "attn_o")
    d = lm.d_head
    assert_close(per[0], hooked_metrics(lm, sweep, tg, [(mod, "pre",
                                                         zero_slice(3 * d, 4 * d, rows))]))


@pytest.mark.parametrize("align", ["start", "end"])
def test_mean_ablation_with_the_prompt_itself_as_reference_changes_nothing(tiny_lm, sweep,
                                                                           align):
    lm = tiny_lm("gpt2")
    sets = scan_sets(lm, "heads") + scan_sets(lm, "layers") + parse_sets(lm, ["attn_out.0"])
    for i in (0, 5):
        one = sweep.iloc[[i]].reset_index(drop=True)
        _, clean, per = run_ablator(lm, one, sets, kind="mean", align=align,
                                    ref_texts=list(one["prompt"]), ref_names=["ref"])
        for got in per:
            for m in got:
                np.testing.assert_allclose(got[m], clean[m], atol=1e-5, rtol=0)


def test_mean_ablation_aligned_at_the_end_equals_a_hand_computed_mean(tiny_lm, sweep):
    """Reference prompts of other lengths, matched from the last token back; positions no
    reference reaches get the mean over every reference token."""
    lm = tiny_lm("gpt2")
    one = sweep.iloc[[4]].reset_index(drop=True)
    refs = ["The sky is blue. " + sweep["prompt"][6], sweep["prompt"][7][:-4]]
    sets = parse_sets(lm, ["head.1.2+mlp_out.0"])
    tg, _, per = run_ablator(lm, one, sets, kind="mean", align="end", ref_texts=refs,
                             ref_names=["r0", "r1"])
    sites = ["head.1.2", "mlp_out.0"]
    enc_r = lm.encode(refs)
    with torch.no_grad(), lm.trace(read=sites) as tr:
        lm.forward(enc_r)
    length = len(lm.encode(list(one["prompt"])).input_ids[0])
    want = {}
    for s in sites:
        a = tr[s].double().numpy()
        rows = [a[r, :n] for r, n in enumerate(enc_r.lengths)]
        overall = np.concatenate(rows).mean(0)
        m = np.zeros((length, a.shape[-1]))
        for t in range(length):
            back = length - 1 - t
            hit = [row[len(row) - 1 - back] for row in rows if len(row) > back]
            m[t] = np.mean(hit, axis=0) if hit else overall
        want[s] = torch.tensor(m, dtype=torch.float32)
    assert length > min(enc_r.lengths)  # some positions are reached by one reference only
    write = {s: (lambda act, bi, s=s: want[s].expand_as(act).clone()) for s in sites}
    enc = lm.encode(list(one["prompt"]))
    with torch.no_grad(), lm.trace(write=write):
        lg = lm.forward(enc).logits[:, -1]
    expect = metrics_table(read_logits(lg, torch.tensor(ids_matrix(tg))).numpy(), tg)
    assert_close(per[0], expect, tol=1e-5)


def test_scan_equals_ablating_heads_one_at_a_time(tiny_lm, sweep):
    """Mean ablation over the sweep: the batched scan against one run per head."""
    lm = tiny_lm("llama")
    sets = scan_sets(lm, "heads")
    _, _, scan = run_ablator(lm, sweep, sets, kind="mean", batch_size=16)
    for cset, got in zip(sets[::3], scan[::3], strict=True):
        _, _, alone = run_ablator(lm, sweep, [cset], kind="mean", batch_size=1)
        assert_close(got, alone[0], tol=1e-5)


def test_positional_mean_over_unequal_lengths():
    acts = torch.tensor([[[1.0], [2.0], [0.0]], [[3.0], [4.0], [5.0]]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    got = positional_mean(acts, mask, 5)[:, 0].tolist()
    overall = (1 + 2 + 3 + 4 + 5) / 5
    assert got == pytest.approx([2.0, 3.0, 5.0, overall, overall])


def test_resample_donors_are_other_long_enough_prompts_and_seeded(tiny_lm, sweep):
    names = ["a", "b", "c", "d", "e"]
    lengths = [5, 3, 5, 9, 9]
    d1 = draw_donors(names, lengths, names, lengths, 50, seed=3)
    d2 = draw_donors(names, lengths, names, lengths, 50, seed=3)
    assert (d1 == d2).all()
    for i, row in enumerate(d1):
        assert i not in row
        assert all(lengths[j] >= lengths[i] for j in row)
    assert set(d1[0]) == {2, 3, 4}
    with pytest.raises(Exception, match="prompt d .* no other"):
        draw_donors(names[:4], lengths[:4], names[:4], lengths[:4], 1, seed=0)
    # resampling from copies of the prompt itself changes nothing
    lm = tiny_lm("gpt2")
    one = sweep.iloc[[3]].reset_index(drop=True)
    _, clean, per = run_ablator(lm, one, scan_sets(lm, "layers"), kind="resample",
                                ref_texts=[one["prompt"][0]] * 2, ref_names=["r1", "r2"])
    for got in per:
        for m in got:
            np.testing.assert_allclose(got[m], clean[m], atol=1e-5, rtol=0)


def test_bayes_metrics_against_numpy(tiny_lm, sweep):
    lm = tiny_lm("gpt2")
    tg = prompt_targets(sweep, lm, "prompts")
    rng = np.random.default_rng(0)
    k = ids_matrix(tg).shape[1]
    read = rng.normal(size=(len(tg), k + 2))
    got = metrics_table(read, tg)
    lx, ly = read[:, 2], read[:, 3]
    p = np.exp(lx) / (np.exp(lx) + np.exp(ly))
    post = sweep["posterior_x"].to_numpy()
    np.testing.assert_allclose(got["p_x"], p)
    np.testing.assert_allclose(got["mae_bayes"], np.abs(p - post))
    np.testing.assert_allclose(got["logit_diff"], read[:, 0] - read[:, 1])
    np.testing.assert_allclose(got["prob_target"], np.exp(read[:, 0] - read[:, k]))
    g = sweep["group_id"].to_numpy()
    drift = np.full(len(tg), np.nan)
    for key in set(g):
        m = g == key
        if m.sum() > 1:
            drift[m] = np.abs(p[m] - p[m].mean())
    np.testing.assert_allclose(got["order_drift"], drift)
    assert np.isnan(drift).sum() == 2  # n_x = 0 and n_x = 4 have one ordering each


def test_rank_top_and_bottom_components(tiny_lm):
    lm = tiny_lm("gpt2")
    rows = []
    effect = {"head.0.1": 0.3, "head.2.2": -0.2, "head.1.0": 0.1, "mlp_out.1": 0.0}
    for site, e in effect.items():
        for pid, base in (("p0", 1.0), ("p1", 2.0)):
            rows.append(dict(prompt_id=pid, site=site, metric="mae_bayes", kind="zero",
                             alpha=None, component=site, value=base + e, clean_value=base))
            rows.append(dict(prompt_id=pid, site=site, metric="logit_diff", kind="zero",
                             alpha=None, component=site, value=0.0, clean_value=0.0))
    df = pd.DataFrame(rows)
    metric, ranked = rank_components(df, "f", "mae_bayes", None, "effect")
    assert [s for s, _, _ in ranked] == ["head.0.1", "head.1.0", "mlp_out.1", "head.2.2"]
    assert ranked[0][1] == pytest.approx(0.3)
    top, bottom = pick_sets(lm, ranked, metric, "f", 2, 1, "effect")
    assert top.components == ("head.0.1", "head.1.0") and top.name == "top2[mae_bayes]"
    assert bottom.components == ("head.2.2",)
    with pytest.raises(Exception, match="offers only 4"):
        pick_sets(lm, ranked, metric, "f", 5, None, "effect")
    with pytest.raises(Exception, match="several metrics"):
        rank_components(df, "f", None, None, "effect")


# ----------------------------------------------------------------------------- CLI


def dolm(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(list(args), capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def sweep_file(sweep, tmp_path_factory):
    from dolm.formats import write_table

    path = tmp_path_factory.mktemp("ablate") / "sweep.parquet"
    write_table(sweep, path, schema="prompts", run=None)
    return path


def test_cli_scan_then_top_and_bottom_from_the_scan(tiny_gpt2_dir, tiny_model_dir, sweep_file,
                                                    tmp_path, in_process):
    model = str(tiny_gpt2_dir)
    scan = tmp_path / "scan.parquet"
    r = dolm("dolm-ablate", str(sweep_file), "--model", model, "--scan", "heads",
             "-o", str(scan))
    assert r.returncode == 0, r.stderr
    from dolm.formats import read_table

    df, meta = read_table(str(scan))
    assert meta.schema == "effects"
    heads = df[df["head"].notna()]
    assert len(heads[heads["metric"] == "mae_bayes"]) == 12 * len(pd.read_parquet(sweep_file))
    assert set(df["metric"]) >= {"logit_diff", "prob_target", "p_x", "mae_bayes", "order_drift"}
    base = df[df["intervention"] == "baseline"]
    assert (base["value"] == base["clean_value"]).all()
    # top/bottom 2 by the change in mae_bayes, ablated together
    d = df[(df["metric"] == "mae_bayes") & df["head"].notna()]
    score = (d["value"] - d["clean_value"]).groupby(d["site"]).mean().sort_values()
    out = tmp_path / "topk.parquet"
    r = dolm("dolm-ablate", str(sweep_file), "--model", model, "--from", str(scan), "--by",
             "mae_bayes", "--top", "2", "--bottom", "2", "--kind", "zero,mean", "-o", str(out))
    assert r.returncode == 0, r.stderr
    got, meta = read_table(str(out))
    comps = set(got["component"].dropna())
    want_top = "+".join(score.index[::-1][:2])
    want_bottom = "+".join(score.index[:2])
    assert comps == {want_top, want_bottom}
    assert set(got["kind"]) == {"none", "zero", "mean"}
    assert meta.extra["from"]["metric"] == "mae_bayes"
    # bad input, each exit 3 with the culprit named (in-process: no cold import per case)
    r = in_process("dolm-ablate", sweep_file, "--model", model, "--from", scan, "--by",
                   "mae_bayes", "--top", "13", "-o", tmp_path / "x.parquet")
    assert r.returncode == 3 and "--top 13" in r.stderr and "offers only 12" in r.stderr
    r = in_process("dolm-ablate", sweep_file, "--model", tiny_model_dir("llama"), "--from",
                   scan, "--by", "mae_bayes", "--top", "2", "-o", tmp_path / "x.parquet")
    assert r.returncode == 3 and "--allow-model-mismatch" in r.stderr, r.stderr
    r = in_process("dolm-ablate", sweep_file, "--model", model, "--components", "head.1.7",
                   "-o", tmp_path / "x.parquet")
    assert r.returncode == 3 and "head.1.7" in r.stderr and "out of range" in r.stderr
    assert not (tmp_path / "x.parquet").exists()


def test_cli_bad_input_before_loading_a_model(sweep_file, tmp_path):
    out = str(tmp_path / "x.parquet")
    r = dolm("dolm-ablate", str(sweep_file), "--components", "head.0.0", "--kind", "zero,void",
             "-o", out)
    assert r.returncode == 3 and "--kind" in r.stderr
    r = dolm("dolm-ablate", str(sweep_file), "--top", "3", "-o", out)
    assert r.returncode == 3 and "--from" in r.stderr
    r = dolm("dolm-ablate", str(sweep_file), "--components", "head.0.0", "--where",
             "n_x >", "-o", out)
    assert r.returncode == 3 and "--where" in r.stderr
