"""dolm-steer: directions against numpy (difference of means, PCA of paired
differences), probes on a planted signal, steering invariants (alpha = 0 changes nothing;
a planted direction gives an exactly linear, monotone dose-response; parity with a plain
forward hook), and the CLI (real executables) with its bad-input errors."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch
from dolm.metrics import prompt_targets
from dolm_tools.steer import fit as F
from dolm_tools.steer.apply import run_steering, steer_fn

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sweep():
    from dolm.tasks import generate

    return generate("bayes", n_draws=6, sweep=True, permutations=3)


def hidden_last(lm, texts, layer):
    """resid_post.<layer> at the last token from HF's own hidden states (layer < n - 1)."""
    enc = lm.encode(texts)
    with torch.no_grad():
        out = lm.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                       output_hidden_states=True)
    h = out.hidden_states[layer + 1]
    return h[torch.arange(len(texts)), enc.last_index].double().numpy()


def block0_hooked_logit_diff(lm, enc, edit):
    """logit(" X") - logit(" Y") at the last token, block 0's output edited by a plain
    forward hook (``edit(h) -> h``): the hand-written reference for steering."""

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = edit(h.clone())
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = lm.adapter.block(0).register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = lm.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    finally:
        handle.remove()
    lg = out.logits[torch.arange(enc.input_ids.shape[0]), enc.last_index]
    return (lg[:, lm.token_id(" X")] - lg[:, lm.token_id(" Y")]).numpy()


# ----------------------------------------------------------------------------- directions


def test_model_acts_and_diff_of_means_equal_numpy(tiny_lm, sweep):
    lm = tiny_lm("gpt2")
    texts = list(sweep["prompt"])
    acts = F.model_acts(lm, texts, list(sweep["prompt_id"]), ["resid_post.0", "resid_post.1"],
                        "last", batch_size=4)
    pos = sweep["posterior_b"].to_numpy() > 0.5
    fit = F.diff_means(acts, pos)
    for layer in (0, 1):
        x = hidden_last(lm, texts, layer)
        np.testing.assert_allclose(acts[f"resid_post.{layer}"], x, atol=1e-5)
        d = x[pos].mean(0) - x[~pos].mean(0)
        np.testing.assert_allclose(fit.directions[f"resid_post.{layer}"], d / np.linalg.norm(d),
                                   atol=1e-5)
        assert fit.norms[f"resid_post.{layer}"] == pytest.approx(np.linalg.norm(d), rel=1e-5)
        proj = x @ (d / np.linalg.norm(d))
        assert fit.proj_std[f"resid_post.{layer}"] == pytest.approx(proj.std(), rel=1e-4)


def test_pca_of_paired_differences_equals_numpy_svd():
    rng = np.random.default_rng(1)
    w = rng.normal(size=12)
    a = rng.normal(size=(40, 12))
    b = a - np.outer(rng.uniform(1, 2, size=40), w) + 0.05 * rng.normal(size=(40, 12))
    fit = F.pca_pairs({"resid_post.0": a}, {"resid_post.0": b})
    d = a - b
    v = np.linalg.svd(d, full_matrices=False)[2][0]
    v = v if d.mean(0) @ v > 0 else -v
    np.testing.assert_allclose(fit.directions["resid_post.0"], v, atol=1e-6)
    assert abs(v @ w) / np.linalg.norm(w) > 0.99


def test_probes_find_a_planted_linear_signal():
    rng = np.random.default_rng(0)
    n, d = 240, 16
    w = rng.normal(size=d)
    signal = rng.normal(size=(n, d))
    y_cont = signal @ w
    acts = {"resid_post.0": rng.normal(size=(n, d)), "resid_post.1": signal}
    groups = [f"g{i // 4}" for i in range(n)]
    fit = F.probes(acts, (y_cont > 0).astype(float), "logistic", groups, 0.25, seed=0)
    acc = {r["site"]: r["value"] for r in fit.scores if r["metric"] == "accuracy"}
    assert acc["resid_post.1"] >= 0.95
    assert acc["resid_post.0"] < 0.75
    assert fit.best_site == "resid_post.1"
    assert fit.directions["resid_post.1"] @ w / np.linalg.norm(w) > 0.9
    n_test = {r["n_test"] for r in fit.scores}
    assert n_test == {60}
    dm = F.diff_means(acts, y_cont > 0, groups, 0.25, seed=0)
    acc = {r["site"]: r["value"] for r in dm.scores}
    assert acc["resid_post.1"] >= 0.85 and acc["resid_post.0"] < 0.75
    assert dm.best_site == "resid_post.1"
    ridge = F.probes(acts, y_cont + 0.01 * rng.normal(size=n), "ridge", groups, 0.25, seed=0)
    r2 = {r["site"]: r["value"] for r in ridge.scores if r["metric"] == "r2"}
    assert r2["resid_post.1"] > 0.99 and r2["resid_post.0"] < 0.2
    assert ridge.directions["resid_post.1"] @ w / np.linalg.norm(w) > 0.999


# ----------------------------------------------------------------------------- steering


def test_alpha_zero_changes_nothing_and_a_planted_direction_is_linear_and_monotone(
        tiny_lm, sweep):
    lm = tiny_lm("gpt2")
    tg = prompt_targets(sweep, lm, "prompts")
    texts = list(sweep["prompt"])
    w = lm.adapter.unembed.weight.detach().double()
    diff = (w[lm.token_id(" X")] - w[lm.token_id(" Y")]).numpy()
    u = diff / np.linalg.norm(diff)
    alphas = [-2.0, -1.0, 0.0, 0.5, 1.0, 2.0]
    # after the final norm the logits are linear in the added vector: exactly linear
    clean, per, _ = run_steering(lm, tg, texts, "final_norm", u, alphas, "add", "last",
                                 batch_size=5)
    for a, got in zip(alphas, per, strict=True):
        np.testing.assert_allclose(got["logit_diff"],
                                   clean["logit_diff"] + a * np.linalg.norm(diff), atol=1e-4)
    px = np.stack([p["p_x"] for p in per])
    assert (np.diff(px, axis=0) > 0).all()
    # alpha = 0 changes nothing, at any site and positions
    for site, positions in (("resid_post.1", "all"), ("head.1.2", "last"), ("embed", "all")):
        width = lm.d_head if site.startswith("head") else lm.d_model
        v = np.random.default_rng(0).normal(size=width)
        clean, per, _ = run_steering(lm, tg, texts, site, v / np.linalg.norm(v), [0.0, 3.0],
                                     "add", positions)
        for m in clean:
            np.testing.assert_allclose(per[0][m], clean[m], atol=1e-5, err_msg=(site, m))
        assert np.abs(per[1]["logit_diff"] - clean["logit_diff"]).max() > 1e-4


def test_steering_equals_a_plain_forward_hook(tiny_lm, sweep):
    lm = tiny_lm("llama")
    tg = prompt_targets(sweep, lm, "prompts")
    texts = list(sweep["prompt"])
    v = np.random.default_rng(2).normal(size=lm.d_model)
    u = v / np.linalg.norm(v)
    _, per, _ = run_steering(lm, tg, texts, "resid_post.0", u, [1.5], "add", "last",
                             batch_size=4)
    _, proj, _ = run_steering(lm, tg, texts, "resid_post.0", u, [None], "project", "all")
    enc = lm.encode(texts)
    ut = torch.tensor(u, dtype=torch.float32)

    def run(edit):
        return block0_hooked_logit_diff(lm, enc, edit)

    def add_last(h):
        h[torch.arange(len(texts)), enc.last_index] += 1.5 * ut
        return h

    def project(h):
        return h - (h @ ut)[..., None] * ut

    np.testing.assert_allclose(per[0]["logit_diff"], run(add_last), atol=1e-4)
    np.testing.assert_allclose(proj[0]["logit_diff"], run(project), atol=1e-4)


def test_projecting_out_leaves_no_component_along_the_direction():
    u = torch.tensor([0.6, 0.8, 0.0])
    x = torch.randn(2, 5, 3)
    out = steer_fn("project", u)(np.zeros(2))(x, torch.arange(2))
    assert torch.allclose(out @ u, torch.zeros(2, 5), atol=1e-6)
    assert torch.allclose(out[..., 2], x[..., 2])


# ----------------------------------------------------------------------------- CLI


def dolm(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(list(args), capture_output=True, text=True, env=env)


def test_cli_probe_from_acts_then_dose_response_and_bad_input(tiny_gpt2_dir, tiny_model_dir,
                                                             tiny_lm, sweep, tmp_path):
    from dolm.formats import load_safetensors, read_table, validate_file, write_table
    from safetensors.torch import load_file

    model = str(tiny_gpt2_dir)
    prompts = tmp_path / "sweep.parquet"
    write_table(sweep, prompts, schema="prompts", run=None)
    acts = tmp_path / "acts.h5"
    r = dolm("dolm-collect-acts", str(prompts), "--model", model, "-o",
             str(tmp_path / "outcomes.parquet"), "--acts", str(acts), "--sites",
             "resid_post.0,resid_post.1", "--positions", "last")
    assert r.returncode == 0, r.stderr
    dirs = tmp_path / "dirs.safetensors"
    scores = tmp_path / "probes.parquet"
    r = dolm("dolm-steer", "fit", str(prompts), "--acts", str(acts), "--method", "diffmeans",
             "--label", "posterior_b", "--threshold", "0.5", "-o", str(tmp_path / "dm.st"))
    assert r.returncode == 0, r.stderr
    # the saved direction is the numpy difference of means of HF's own hidden states
    x = hidden_last(tiny_lm("gpt2"), list(sweep["prompt"]), 1)
    pos = sweep["posterior_b"].to_numpy() > 0.5
    d = x[pos].mean(0) - x[~pos].mean(0)
    saved = load_file(str(tmp_path / "dm.st"))["direction.resid_post.1"].double().numpy()
    np.testing.assert_allclose(saved, d / np.linalg.norm(d), atol=1e-5)
    r = dolm("dolm-steer", "fit", str(prompts), "--acts", str(acts), "--method", "probe",
             "--label", "posterior_x", "-o", str(dirs), "--scores", str(scores))
    assert r.returncode == 0, r.stderr
    assert validate_file(str(dirs)) == ("directions", [])
    _, meta = load_safetensors(str(dirs))
    assert meta.extra["probe"] == "ridge" and meta.extra["best_site"] in ("resid_post.0",
                                                                          "resid_post.1")
    assert meta.extra["weights_sha256"] and meta.extra["training_data_sha256"]
    sdf, smeta = read_table(str(scores))
    assert smeta.schema == "probes" and set(sdf["metric"]) == {"r2", "pearson_r", "train_r2"}
    assert sdf["best"].sum() == 3
    out = tmp_path / "steer.parquet"
    r = dolm("dolm-steer", "apply", str(prompts), "--model", model, "--directions", str(dirs),
             "--alphas", "-2,0,2", "--generate", "2", "--where", "n_x >= 2", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "slope" in r.stderr
    eff, emeta = read_table(str(out))
    assert sorted(set(eff["alpha"])) == [-2.0, 0.0, 2.0]
    assert set(eff["prompt_id"]) == set(sweep.loc[sweep["n_x"] >= 2, "prompt_id"])
    zero = eff[eff["alpha"] == 0]
    np.testing.assert_allclose(zero["value"], zero["clean_value"], atol=1e-5)
    assert eff["generation"].notna().all()
    assert list(emeta.extra["slopes"]) == [meta.extra["best_site"]]
    assert "p_x" in emeta.extra["slopes"][meta.extra["best_site"]]
    # bad input: each exit 3 naming the culprit; no output left behind
    bad = str(tmp_path / "bad.parquet")
    r = dolm("dolm-steer", "apply", str(prompts), "--model", model, "--directions", str(dirs),
             "--alphas", "1,two", "-o", bad)
    assert r.returncode == 3 and "--alphas" in r.stderr and "'two'" in r.stderr
    r = dolm("dolm-steer", "apply", str(prompts), "--model", model, "--directions", str(dirs),
             "--site", "resid_post.2", "-o", bad)
    assert r.returncode == 3 and "--site resid_post.2" in r.stderr and "resid_post.0" in r.stderr
    r = dolm("dolm-steer", "apply", str(prompts), "--model", str(tiny_model_dir("llama")),
             "--directions", str(dirs), "-o", bad)
    assert r.returncode == 3 and "--allow-model-mismatch" in r.stderr, r.stderr
    assert not os.path.exists(bad)


def test_positions_language_equals_a_plain_hook_and_old_spellings_agree(tiny_lm, sweep):
    """--positions takes the shared language: `-1` steers what `last` does, `0,-1` the first
    and last token (checked against a hand hook), and a span spec its tokens."""
    import json

    from dolm.positions import parse_spans, token_mask

    lm = tiny_lm("gpt2")
    sub = sweep.head(4)
    tg = prompt_targets(sub, lm, "prompts")
    texts = list(sub["prompt"])
    u = np.random.default_rng(3).normal(size=lm.d_model)
    u /= np.linalg.norm(u)

    def steer(positions, spans=None):
        return run_steering(lm, tg, texts, "resid_post.0", u, [2.0], "add", positions,
                            batch_size=3, spans=spans)[1][0]["logit_diff"]

    np.testing.assert_array_equal(steer("-1"), steer("last"))
    enc = lm.encode(texts)
    ut = torch.tensor(u, dtype=torch.float32)

    def hooked(mask):
        def edit(h):
            h[torch.from_numpy(mask)] += 2.0 * ut
            return h

        return block0_hooked_logit_diff(lm, enc, edit)

    first_last = np.zeros(tuple(enc.input_ids.shape), dtype=bool)
    for i, n in enumerate(enc.lengths):
        first_last[i, [0, n - 1]] = True
    np.testing.assert_array_equal(token_mask(enc, "0,-1"), first_last)
    np.testing.assert_allclose(steer("0,-1"), hooked(first_last), atol=1e-4)
    # a span over the first 5 characters: its tokens, resolved against the encoding
    spans = [parse_spans(json.dumps({"head": [0, 5]}), f"p{i}", "t") for i in range(4)]
    mask = token_mask(enc, "span:head", spans)
    want = np.zeros_like(mask)
    for i in range(4):
        want[i, enc.span_to_tokens(i, 0, 5)] = True
    np.testing.assert_array_equal(mask, want)
    np.testing.assert_allclose(steer("span:head", spans), hooked(want), atol=1e-4)
