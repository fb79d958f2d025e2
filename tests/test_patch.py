"""dolm-patch: the batched layer-stepping engine against a plain hook-per-cell loop,
patching invariants, noise tracing, alignment, summaries, and the CLI (real executable).

Reference parity with TransformerLens and attribution-vs-exact correlation are in
tests/test_patch_reference.py.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from dolm.errors import InputError
from test_patch_helpers import PAIRS, patch_rows, prompts_df, values

KINDS = "resid_pre,resid_mid,resid_post,attn_out,mlp_out,head"


# ----------------------------------------------------------------------------- engine


def naive_value(lm, base_text, src_text, site, positions, tid, fid):
    """One full forward per cell: the textbook way (hook, replace, read the metric)."""
    eb, es = lm.encode([base_text]), lm.encode([src_text])
    with torch.no_grad():
        with lm.trace(read=[site]) as tr:
            lm.forward(es)
        src = tr[site].clone()

        def fn(act, bi):
            out = act.clone()
            out[:, positions] = src[:, positions]
            return out

        with lm.trace(write={site: fn}):
            lg = lm.forward(eb).logits[0, -1]
    return float(lg[tid] - lg[fid])


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_engine_matches_one_forward_per_cell(tiny_lm, family):
    lm = tiny_lm(family)
    df = prompts_df(PAIRS[:2])
    tid, fid = lm.token_id(" Paris"), lm.token_id(" Rome")
    for direction in ("denoise", "noise"):
        rows, _, _ = patch_rows(lm, df, sites=KINDS, direction=direction, head_positions="each",
                                batch_size=7)
        got = [r for r in rows if r["metric"] == "logit_diff"]
        assert len(got) == sum(
            (lm.n_layers * 5 + lm.n_layers * lm.n_heads) * n
            for n in (len(lm.encode([p]).input_ids[0]) for p, _, _ in PAIRS[:2]))
        rng = np.random.default_rng(0)
        for r in rng.choice(got, size=40, replace=False):
            p, cf, _ = PAIRS[int(r["prompt_id"][1:])]
            base, src = (cf, p) if direction == "denoise" else (p, cf)
            ref = naive_value(lm, base, src, r["site"], [r["position"]], tid, fid)
            assert abs(ref - r["value"]) < 1e-4, (r["intervention"], ref, r["value"])


def test_batch_plan_cuts_where_the_prefix_jumps():
    """BatchPlan: batches cover every cell once, hold at most `size` rows, and a batch is
    cut where the first patched position jumps (rows after it would recompute positions
    they do not change) rather than filled to `size`."""
    from dolm_tools.patch.engine import BatchPlan

    prefix = np.array([0] * 6 + [14] * 6)  # 12 cells, T = 16
    start = np.array([0, 1, 2, 3, 4, 5] * 2)
    plan = BatchPlan(prefix, start, np.full(12, 16), n_layers=6)
    i, batches = 0, []
    while i < 12:
        z = plan.cut(i, 8)
        assert i < z <= min(i + 8, 12)
        batches.append((i, z))
        i = z
    assert batches == [(0, 6), (6, 12)]
    # a second size (out-of-memory back-off) re-plans from the current cell
    assert plan.cut(6, 3) in (7, 8, 9)
    # without a jump, batches are filled (fewer layer steps)
    flat = BatchPlan(np.zeros(12, dtype=int), start, np.full(12, 16), n_layers=6)
    assert flat.cut(0, 12) == 12


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_patching_clean_run_into_itself_changes_nothing(tiny_lm, direction):
    lm = tiny_lm("gpt2")
    same = [(p, p, s) for p, _, s in PAIRS]
    rows, summ, _ = patch_rows(lm, prompts_df(same), sites=KINDS, window=3, direction=direction,
                               head_positions="each")
    ld = [r for r in rows if r["metric"] == "logit_diff"]
    assert ld
    for r in ld:
        assert abs(r["value"] - r["clean_value"]) < 1e-5, r["intervention"]
        assert abs(r["clean_value"] - r["corrupt_value"]) < 1e-5
    # recovery is undefined (clean == corrupt) and reported as null, not inf
    assert all(r["value"] is None for r in rows if r["metric"] == "recovery")
    assert all(s["num_choice_flips"] == 0 for s in summ)


def test_patching_every_position_of_resid_pre0_restores_clean(tiny_lm):
    lm = tiny_lm("gpt2")
    df = prompts_df()
    rows, _, _ = patch_rows(lm, df, sites="resid_pre.0", joint=True)
    by = {r["metric"]: r for r in rows if r["prompt_id"] == "p0"}
    assert by["logit_diff"]["position"] is None
    assert abs(by["logit_diff"]["clean_value"] - by["logit_diff"]["corrupt_value"]) > 1e-4
    for r in rows:
        if r["metric"] in ("logit_diff", "prob_target"):
            assert abs(r["value"] - r["clean_value"]) < 1e-5
        if r["metric"] == "recovery":
            assert abs(r["value"] - 1.0) < 1e-4
    # noising direction: the corrupted run's states everywhere give the corrupted metric
    rows, _, _ = patch_rows(lm, df, sites="resid_pre.0", joint=True, direction="noise")
    for r in rows:
        if r["metric"] == "logit_diff":
            assert abs(r["value"] - r["corrupt_value"]) < 1e-5


def test_last_layer_resid_post_at_last_position_restores_clean(tiny_lm):
    # the metric reads only the last position after the last block
    lm = tiny_lm("llama")
    rows, _, _ = patch_rows(lm, prompts_df(), sites=f"resid_post.{lm.n_layers - 1}",
                            positions="last")
    for r in rows:
        if r["metric"] == "logit_diff":
            assert abs(r["value"] - r["clean_value"]) < 1e-5


def test_window_follows_rome():
    from dolm_tools.patch.run import window_sites

    assert window_sites("mlp_out", 5, 10, 12) == tuple(f"mlp_out.{i}" for i in range(0, 10))
    assert window_sites("attn_out", 0, 3, 4) == ("attn_out.0", "attn_out.1")
    assert window_sites("attn_out", 3, 3, 4) == ("attn_out.2", "attn_out.3")
    assert window_sites("mlp_out", 2, 1, 4) == ("mlp_out.2",)


def test_window_equals_patching_the_layers_together(tiny_lm):
    lm = tiny_lm("gpt2")
    df = prompts_df(PAIRS[:1])
    win, _, _ = patch_rows(lm, df, sites="mlp_out.1", window=3, positions="last")
    tid, fid = lm.token_id(" Paris"), lm.token_id(" Rome")
    p, cf, _ = PAIRS[0]
    eb, es = lm.encode([cf]), lm.encode([p])
    sites = ["mlp_out.0", "mlp_out.1", "mlp_out.2"]
    with torch.no_grad():
        with lm.trace(read=sites) as tr:
            lm.forward(es)
        src = {s: tr[s].clone() for s in sites}

        def mk(s):
            def fn(act, bi):
                out = act.clone()
                out[:, -1] = src[s][:, -1]
                return out
            return fn

        with lm.trace(write={s: mk(s) for s in sites}):
            lg = lm.forward(eb).logits[0, -1]
    ref = float(lg[tid] - lg[fid])
    (got,) = [r for r in win if r["metric"] == "logit_diff"]
    assert got["window"] == 3 and got["intervention"].endswith("w3")
    assert abs(got["value"] - ref) < 1e-5


# ----------------------------------------------------------------------------- noise


def test_noise_tracing(tiny_lm):
    lm = tiny_lm("gpt2")
    df = prompts_df()
    kw = dict(mode="noise", span="subject", samples=3, metric="prob_target")
    # restoring the clean embeddings-plus-positions on the whole span undoes the noise
    rows, _, pt = patch_rows(lm, df, sites="resid_pre.0", positions="span:subject", joint=True,
                             **kw)
    for r in rows:
        if r["metric"] == "prob_target":
            assert abs(r["value"] - r["clean_value"]) < 1e-6
            assert abs(r["corrupt_value"] - r["clean_value"]) > 1e-7
    # positions before the span are untouched by the noise: restoring them does nothing
    rows, summ, _ = patch_rows(lm, df, sites="resid_pre.0", positions="0", **kw)
    for r in rows:
        if r["metric"] == "prob_target":
            assert abs(r["value"] - r["corrupt_value"]) < 1e-7
    # same seed, same numbers; another seed, other numbers
    a, _, _ = patch_rows(lm, df, sites="mlp_out", window=3, seed=1, **kw)
    b, _, _ = patch_rows(lm, df, sites="mlp_out", window=3, seed=1, **kw)
    c, _, _ = patch_rows(lm, df, sites="mlp_out", window=3, seed=2, **kw)
    va, vb, vc = (values(x, "prob_target") for x in (a, b, c))
    assert va == vb
    assert va != vc
    assert pt.embed_std == pytest.approx(float(lm.adapter.embed.weight.std()), rel=1e-6)


def test_noise_mode_unknown_span_is_named(tiny_lm):
    lm = tiny_lm("gpt2")
    with pytest.raises(InputError, match=r"--span object: prompt p0 has no span 'object'.*"
                                         r"subject"):
        patch_rows(lm, prompts_df(), mode="noise", span="object", samples=2)


# ----------------------------------------------------------------------------- alignment


def test_unequal_pairs_need_align_last(tiny_lm):
    lm = tiny_lm("gpt2")
    pairs = [("a red cat and a blue dog is", "the red cat and a blue dog is", "cat")]
    assert len(lm.encode([pairs[0][0]]).input_ids[0]) != len(lm.encode([pairs[0][1]]).input_ids[0])
    with pytest.raises(InputError, match=r"prompt p0: clean prompt is \d+ tokens but cf_prompt "
                                         r"is \d+ tokens.*--align last"):
        patch_rows(lm, prompts_df(pairs))
    rows, summ, _ = patch_rows(lm, prompts_df(pairs), align="last")
    n_short = min(len(lm.encode([t]).input_ids[0]) for t in pairs[0][:2])
    pos = sorted({r["position"] for r in rows})
    assert pos == list(range(-n_short, 0))
    assert summ[0]["peak_position"] < 0
    # equal-length pairs: --align last gives the same numbers, counted from the end
    a = values(patch_rows(lm, prompts_df(PAIRS[:1]))[0])
    b = values(patch_rows(lm, prompts_df(PAIRS[:1]), align="last")[0])
    n = len(lm.encode([PAIRS[0][0]]).input_ids[0])
    assert {(k[0], k[1], k[2] - n): v for k, v in a.items()} == pytest.approx(b)


def test_out_of_range_sites_and_positions_are_named(tiny_lm):
    lm = tiny_lm("gpt2")
    df = prompts_df()
    with pytest.raises(InputError, match=r"--sites: site 'resid_pre.9': layer 9 out of range"):
        patch_rows(lm, df, sites="resid_pre.9")
    with pytest.raises(InputError, match=r"--sites: site 'head.1.7': head 7 out of range"):
        patch_rows(lm, df, sites="head.1.7")
    with pytest.raises(InputError, match=r"--sites: 'attn.1' cannot be patched"):
        patch_rows(lm, df, sites="attn.1")
    with pytest.raises(InputError, match=r"--positions: position 40 is out of range for prompt"):
        patch_rows(lm, df, positions="40")


def test_parse_positions_span_only_where_allowed():
    from dolm.positions import parse_positions

    assert parse_positions(None) == ("all", None)
    assert parse_positions(" Last ") == ("last", None)
    assert parse_positions("0, -1,") == ("list", [0, -1])
    assert parse_positions("span:subject", allow_span=True) == ("span", "subject")
    with pytest.raises(InputError, match=r"expected all, last, span:NAME or comma-separated"):
        parse_positions("x", allow_span=True)
    with pytest.raises(InputError, match=r"expected span:NAME, found 'span:'"):
        parse_positions("span:", allow_span=True)
    with pytest.raises(InputError) as exc:
        parse_positions("span:subject")
    assert "span" not in str(exc.value).split("found")[0]
    assert "all, last or comma-separated integers (negative = from the end)" in str(exc.value)
    with pytest.raises(InputError, match="expected at least one integer"):
        parse_positions(",")


# ----------------------------------------------------------------------------- summary


def test_gini_and_top5():
    from dolm_tools.patch.summary import gini, top_k_share

    assert gini([1, 1, 1, 1]) == pytest.approx(0.0)
    assert gini([0, 0, 0, 4]) == pytest.approx(0.75)  # (n - 1) / n for one non-zero of n
    assert gini([0, 0, 0, 0]) == 0.0
    assert top_k_share([1] * 10, 5) == pytest.approx(0.5)
    assert top_k_share([5, 1, 1, 1, 1, 1], 5) == pytest.approx(9 / 10)


def test_summary_agrees_with_effects(tiny_lm):
    lm = tiny_lm("gpt2")
    df = prompts_df(choices=[[" Paris", " Rome"]] * 3, intended_option=[1, 2, 1])
    rows, summ, _ = patch_rows(lm, df, sites="resid_pre,mlp_out")
    eff = pd.DataFrame(rows)
    for s in summ:
        sub = eff[(eff.prompt_id == s["prompt_id"]) & eff.site.str.startswith(s["grid"])]
        rec = sub[sub.metric == "recovery"]
        ld = sub[sub.metric == "logit_diff"]
        assert s["n_cells"] == len(ld)
        best = rec.loc[rec.value.idxmax()]
        assert s["peak_layer"] == best.layer and s["peak_position"] == best.position
        assert s["peak_value"] == pytest.approx(best.value)
        flips = int((np.sign(ld.value) != np.sign(s["corrupt_value"])).sum())
        assert s["num_choice_flips"] == flips
        effects = (ld.value - s["corrupt_value"]).abs().to_numpy()
        top5 = np.sort(effects)[::-1][:5].sum() / effects.sum()
        assert s["top5_concentration"] == pytest.approx(top5)
        clean_choice = " Paris" if s["clean_value"] > 0 else " Rome"
        assert s["clean_choice"] == clean_choice
        intended = {"p0": " Paris", "p1": " Rome", "p2": " Paris"}[s["prompt_id"]]
        assert s["clean_chose_intended"] == (clean_choice == intended)


# ----------------------------------------------------------------------------- CLI


def run_cli(*args):
    return subprocess.run(["dolm-patch", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("patch-cli")
    path = d / "prompts.parquet"
    prompts_df().to_parquet(path)
    return path


@pytest.fixture(scope="module")
def cli_outputs(tiny_gpt2_dir, prompts_file):
    eff = prompts_file.parent / "effects.parquet"
    summ = prompts_file.parent / "summary.parquet"
    r = run_cli(prompts_file, "--model", tiny_gpt2_dir, "--sites", "resid_pre,attn_out",
                "-o", eff, "--summary", summ)
    assert r.returncode == 0, r.stderr
    return eff, summ


def test_cli_counterfactual_and_noise(tiny_gpt2_dir, prompts_file, cli_outputs):
    from dolm.formats import read_table, validate_file

    eff, summ = cli_outputs
    for path, schema in ((eff, "effects"), (summ, "patch_summary")):
        name, problems = validate_file(str(path))
        assert (name, problems) == (schema, [])
    df, meta = read_table(str(eff))
    assert set(df.metric) == {"logit_diff", "prob_target", "recovery"}
    assert set(df.kind) == {"denoise"} and set(df.tool) == {"patch"}
    assert meta.provenance[-1]["tool"] == "patch"
    assert meta.provenance[-1]["model"]["weights_sha256"]
    assert meta.extra["mode"] == "counterfactual"
    sdf, _ = read_table(str(summ))
    assert sorted(sdf.grid.unique()) == ["attn_out", "resid_pre"] and len(sdf) == 6
    # existing output without --force: refused
    r = run_cli(prompts_file, "--model", tiny_gpt2_dir, "-o", eff)
    assert r.returncode != 0 and "--force" in r.stderr
    # noise tracing with a window, to stdout
    r = subprocess.run(["dolm-patch", str(prompts_file), "--model", str(tiny_gpt2_dir),
                        "--mode", "noise", "--samples", "2", "--sites", "mlp_out",
                        "--window", "3", "--positions", "last", "-o", "-"],
                       capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    import io

    df = pd.read_parquet(io.BytesIO(r.stdout))
    assert set(df.window.dropna()) == {3} and len(df) == 3 * 3 * 3


@pytest.mark.parametrize("case", ["unequal", "span", "site", "head", "effects", "column"])
def test_cli_bad_input_exit_3(tiny_gpt2_dir, prompts_file, cli_outputs, tmp_path, case):
    out = tmp_path / "e.parquet"
    args = [prompts_file, "--model", tiny_gpt2_dir, "-o", out]
    if case == "unequal":
        bad = tmp_path / "bad.parquet"
        prompts_df([("a red cat and a blue dog is", "the red cat and a blue dog is",
                     "cat")]).to_parquet(bad)
        args[0] = bad
        want = "prompt p0: clean prompt is"
    elif case == "span":
        args += ["--mode", "noise", "--span", "object"]
        want = "no span 'object'"
    elif case == "site":
        args += ["--sites", "mlp_out.3"]
        want = "layer 3 out of range 0..2"
    elif case == "head":
        args += ["--sites", "head.0.4"]
        want = "head 4 out of range 0..3"
    elif case == "effects":
        args[0] = cli_outputs[0]
        want = "expected a 'prompts' file"
    else:
        bad = tmp_path / "nocf.parquet"
        df = prompts_df()
        df.loc[1, "cf_prompt"] = None
        df.to_parquet(bad)
        args[0] = bad
        want = "prompt p1: column 'cf_prompt' is empty"
    r = run_cli(*args)
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert want in r.stderr
    assert r.stderr.startswith("dolm-patch: error:") and "Traceback" not in r.stderr
    assert not out.exists()


def test_spans_json_errors_are_named(tiny_lm):
    lm = tiny_lm("gpt2")
    df = prompts_df()
    df.loc[0, "spans"] = json.dumps({"subject": [5, 2]})
    with pytest.raises(InputError, match=r"column 'spans' of prompt 'p0': span 'subject' must be"):
        patch_rows(lm, df, mode="noise")
