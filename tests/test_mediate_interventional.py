"""dolm-mediate interventional: invariants of the patched runs on a tiny model, CLI, bad input."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pandas as pd
import pytest
from dolm.formats import Run, write_table
from dolm_tools.mediate import interventional as iv

WORDS = ["red", "blue", "green", "cat", "dog", "tree", "book"]  # one token each (tiny gpt2)


def _prompts(n=6, seed=0, cot=True):
    """Pairs (group_id) of a short control prompt and a longer treated one (treatment
    column ``cot``); both end the same way; the treated text teacher-forces an extra
    sentence before the target. Spans ``a`` cover one word in both."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a, b, c = rng.choice(WORDS, 3, replace=False)
        target = f" {c}"
        for t in (False, True):
            prompt = f"The {a} and the {b} are" if not t else f"Look: the {a} and the {b} are"
            text = prompt + (f" so nice. The {b} is" if t else "") + target
            start = prompt.index(a)
            rows.append({
                "prompt_id": f"p{i}-{int(t)}", "family": "test", "prompt": prompt,
                "target": target, "foil": None, "choices": None, "cf_prompt": None,
                "cf_target": None, "cf_foil": None,
                "spans": json.dumps({"a": [start, start + len(a)],
                                     "tail": [prompt.index(" are"), len(prompt)]}),
                "cf_spans": None, "group_id": f"g{i}", "split": "eval", "text": text,
                "cot": t,
            })
    return pd.DataFrame(rows)


def _write(df, path):
    write_table(df, str(path), schema="prompts", run=Run(tool="test", argv=["test"]), force=True)
    return str(path)


def _run(lm, df, sites, position="last", **kw):
    pairs, _ = iv.make_pairs(df, treatment="cot", pair_by=None, control_value=None,
                             treat_value=None, text_column=kw.pop("text_column", None))
    prep = iv.prepare(lm, pairs, position, anchor=kw.pop("anchor", "context"))
    return prep, iv.run_pairs(lm, prep, lm.expand_sites(sites), 4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_full_residual_at_read_position_gives_nie_equal_total(tiny_lm, family):
    lm = tiny_lm(family)
    df = _prompts()
    last = f"resid_post.{lm.n_layers - 1}"
    _, res = _run(lm, df, [last], text_column="text")
    for m in (0, 1):
        pp = iv.per_pair(res, m)
        # the final residual at the read position decides the first target token; with a
        # one-token target NIE = total and NDE = 0, per pair
        np.testing.assert_allclose(pp["acme_control"][:, 0], pp["total"][:, 0], atol=1e-4)
        np.testing.assert_allclose(pp["ade_control"][:, 0], 0.0, atol=1e-4)
        np.testing.assert_allclose(pp["acme_treated"][:, 0], pp["total"][:, 0], atol=1e-4)
    assert np.abs(iv.per_pair(res, 0)["total"]).max() > 1e-3  # the pairs differ at all


def test_site_off_every_path_gives_nie_zero(tiny_lm):
    lm = tiny_lm("gpt2")
    df = _prompts()
    last = lm.n_layers - 1
    # the last layer's residual two tokens before the read position reaches no later
    # position: nothing flows from it to the read position's logits
    _, res = _run(lm, df, [f"resid_post.{last}", f"mlp_out.{last}"], position="-2")
    pp = iv.per_pair(res, 0)
    np.testing.assert_allclose(pp["acme_control"], 0.0, atol=1e-5)
    np.testing.assert_allclose(pp["acme_treated"], 0.0, atol=1e-5)
    np.testing.assert_allclose(pp["ade_control"], pp["total"], atol=1e-5)
    # an earlier site at the same position is on a path (attention of later layers)
    _, res0 = _run(lm, df, ["resid_post.0"], position="-2")
    assert np.abs(iv.per_pair(res0, 0)["acme_control"]).max() > 1e-5


def test_patch_matches_a_hand_written_hook_and_decomposition(tiny_lm):
    import torch

    lm = tiny_lm("gpt2")
    df = _prompts(n=3)
    prep, res = _run(lm, df, ["head.1.2"], position="a", text_column="text")
    # by hand: pair 0, C with head.1.2 at span 'a' taken from T
    i = 0
    ids_c = torch.tensor([prep.ids_c[i]])
    ids_t = torch.tensor([prep.ids_t[i]])
    with torch.no_grad():
        with lm.trace(read=["head.1.2"]) as tr:
            lm.model(input_ids=ids_t)
        donor = tr["head.1.2"][0, prep.pos_t[i]].clone()

        def fn(act, bi):
            act = act.clone()
            act[0, prep.pos_c[i]] = donor
            return act

        with lm.trace(write={"head.1.2": fn}):
            logits = lm.model(input_ids=ids_c).logits
        lp = torch.log_softmax(logits[0, prep.read_c[i]], -1)[prep.tgt_c[i][0]]
    assert len(prep.tgt_c[i]) == 1
    assert abs(float(lp) - res["CM1"][i, 0, 0]) < 1e-4
    pp = iv.per_pair(res, 0)
    # identities: total = NIE(control) + NDE(treated) = NDE(control) + NIE(treated)
    np.testing.assert_allclose(pp["acme_control"] + pp["ade_treated"], pp["total"], atol=1e-9)
    np.testing.assert_allclose(pp["ade_control"] + pp["acme_treated"], pp["total"], atol=1e-9)


def test_patching_a_run_into_itself_changes_nothing(tiny_lm):
    lm = tiny_lm("gpt2")
    df = _prompts(n=3)
    same = df.copy()
    for c in ("prompt", "spans"):
        same.loc[same.cot, c] = same.loc[~same.cot, c].to_numpy()
    same["text"] = None
    _, res = _run(lm, same, ["head.0.1", "attn_out.1"], position="a")
    pp = iv.per_pair(res, 0)
    for k in ("acme_control", "ade_control", "total"):
        np.testing.assert_allclose(pp[k], 0.0, atol=1e-5)


def test_bootstrap_table_is_seeded_and_brackets_the_mean():
    rng = np.random.default_rng(1)
    pp = {k: rng.normal(0.3, 1, size=(40, 2)) for k in
          ("acme_control", "ade_control", "acme_treated", "ade_treated", "total")}

    class L:
        @staticmethod
        def parse_site(s):
            from types import SimpleNamespace
            return SimpleNamespace(layer=int(s.split(".")[1]), head=None)

    a = iv.mediation_table(pp, ["resid_post.0", "resid_post.1"], L, -1, 500, 3, 0.05)
    b = iv.mediation_table(pp, ["resid_post.0", "resid_post.1"], L, -1, 500, 3, 0.05)
    pd.testing.assert_frame_equal(a, b)
    r = a[(a.effect == "acme_control") & (a.mediator == "resid_post.0")].iloc[0]
    assert r.estimate == pytest.approx(pp["acme_control"][:, 0].mean())
    assert r.ci_low < r.estimate < r.ci_high
    se = pp["acme_control"][:, 0].std(ddof=1) / np.sqrt(40)
    assert r.se == pytest.approx(se, rel=0.2)


def mediate(*args):
    return subprocess.run(["dolm-mediate", *args], capture_output=True, text=True, timeout=300)


def test_cli_end_to_end_with_statistical_side_by_side(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("gpt2"))
    prompts = _write(_prompts(n=5), tmp_path / "prompts.parquet")
    # a statistical table naming one head's attention feature
    stat = pd.DataFrame({
        "method": "statistical", "mediator": "attn_to.a.L1.H0",
        "effect": ["acme_average", "ade_average", "total", "acme_control"],
        "estimate": [0.1, 0.2, 0.3, 0.1], "ci_low": 0.0, "ci_high": 0.4, "se": 0.1,
        "p_value": 0.2, "q_value": 0.2, "significant": False, "n_units": 10,
        "ci_method": "quasi-bayesian", "mediator_model": "linear", "outcome_model": "linear"})
    write_table(stat, str(tmp_path / "stat.parquet"), schema="mediation",
                run=Run(tool="test", argv=["test"]))
    out = tmp_path / "iv.parquet"
    r = mediate("interventional", prompts, "--model", model, "--sites", "head.1.*,resid_post.2",
                "-t", "cot", "--text-column", "text", "--sims", "200",
                "--statistical", str(tmp_path / "stat.parquet"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    t = pd.read_parquet(out)
    assert set(t.method) == {"interventional", "statistical"}
    iv_rows = t[t.method == "interventional"]
    assert set(iv_rows.mediator) == {"head.1.0", "head.1.1", "head.1.2", "head.1.3",
                                     "resid_post.2"}
    assert (iv_rows.n_units == 5).all()
    assert t[t.method == "statistical"].site.iloc[0] == "head.1.0"
    summ = json.loads((tmp_path / "iv.summary.json").read_text())
    assert summ["comparison"][0]["site"] == "head.1.0"
    assert summ["comparison"][0]["statistical_acme_average"] == pytest.approx(0.1)
    eff = pd.read_parquet(tmp_path / "iv.effects.parquet")
    assert len(eff) == 5 * 5 * 2 * 2
    # the table's means are the per-pair effects' means
    e = eff[(eff.site == "head.1.1") & (eff.kind == "nie") & (eff.metric == "target_logprob")]
    row = iv_rows[(iv_rows.mediator == "head.1.1") & (iv_rows.effect == "acme_control")]
    assert row.estimate.iloc[0] == pytest.approx((e.value - e.clean_value).mean())
    tot = iv_rows[(iv_rows.mediator == "head.1.1") & (iv_rows.effect == "total")]
    assert tot.estimate.iloc[0] == pytest.approx((e.corrupt_value - e.clean_value).mean())
    # the per-pair outcomes are the in-process engine's
    lm = __import__("dolm.models", fromlist=["load"]).load(model)
    _, res = _run(lm, _prompts(n=5), ["head.1.1"], text_column="text")
    np.testing.assert_allclose(np.sort(e.value.to_numpy()), np.sort(res["CM1"][:, 0, 0]),
                               atol=1e-5)


def test_bad_pairs_name_the_pair(tiny_lm):
    from dolm.errors import InputError

    lm = tiny_lm("gpt2")
    df = _prompts(n=3)

    def prep(d, position="last", treatment="cot"):
        pairs, _ = iv.make_pairs(d, treatment=treatment, pair_by=None, control_value=None,
                                 treat_value=None, text_column=None)
        return iv.prepare(lm, pairs, position)

    with pytest.raises(InputError, match=r"pair g0 .*position -40 does not exist"):
        prep(df, "-40")
    with pytest.raises(InputError, match=r"pair g2: expected one control and one treated"):
        prep(df[df.prompt_id != "p2-1"])
    with pytest.raises(InputError, match=r"--treatment: column 'nope'"):
        prep(df, treatment="nope")
    with pytest.raises(InputError, match=r"no span 'zzz'"):
        prep(df, "zzz")
    with pytest.raises(InputError, match=r"--position: expected last"):
        prep(df, "0")
    t = df.copy()
    t.loc[0, "text"] = "something else"
    with pytest.raises(InputError, match=r"prompt p0-0: expected the text to end with"):
        iv.make_pairs(t, treatment="cot", pair_by=None, control_value=None, treat_value=None,
                      text_column="text")


def test_cli_bad_input_exit_3(tiny_model_dir, tmp_path, in_process):
    """In-process (the click command's own error handling; no cold import per case)."""
    model = str(tiny_model_dir("gpt2"))
    df = _prompts(n=3)
    # span with a different token count in one pair
    bad = df.copy()
    i = bad.index[(bad.group_id == "g1") & bad.cot][0]
    bad.loc[i, "spans"] = json.dumps({"a": [0, len(bad.loc[i, "prompt"])]})
    badp = _write(bad, tmp_path / "bad.parquet")
    r = in_process("dolm-mediate", "interventional", badp, "--model", model, "--sites",
                   "head.0.0", "-t", "cot", "--position", "a", "-o", tmp_path / "x.parquet")
    assert r.returncode == 3, r.stderr
    assert "pair g1" in r.stderr and "align" in r.stderr
    assert "Traceback" not in r.stderr
    r = in_process("dolm-mediate", "interventional", _write(df, tmp_path / "good.parquet"),
                   "--model", model, "--sites", "head.9.0", "-t", "cot", "-o",
                   tmp_path / "x.parquet")
    assert r.returncode == 3 and "head.9.0" in r.stderr
    assert not (tmp_path / "x.parquet").exists()
