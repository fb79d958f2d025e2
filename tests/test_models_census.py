"""Verify-then-trust and the census: adapters chosen from the module structure, checked by
the identities of ``dolm.models.verify`` before a model is served.

A fast subset of the census (one type per layout dolm knows, plus the refusals) runs here,
and the committed docs/models.md is checked to be the census of the installed transformers
(every type listed, the counts, the subset's verdicts); the whole census over every
causal-LM type is ``just census`` (about 5 minutes on one core; it writes docs/models.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from dolm.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

# model_type -> (verdict, text the layout or reason must contain)
CASES = {
    "gemma2": ("SUPPORTED", "post-norm, logits softcap"),
    "olmo2": ("SUPPORTED", "post-norm"),
    "falcon": ("SUPPORTED", "parallel"),
    "cohere": ("SUPPORTED", "parallel, logits mul logit_scale"),
    "granite": ("SUPPORTED", "residual*residual_multiplier, logits div logits_scaling"),
    "bloom": ("SUPPORTED", "residual inside attn+mlp"),
    "mpt": ("SUPPORTED", "residual inside mlp"),
    "biogpt": ("SUPPORTED", "no-mlp-module"),
    "opt": ("SUPPORTED", "no-mlp-module"),  # its MLP runs on (batch * seq, d)
    "mixtral": ("SUPPORTED", "sequential"),
    "deepseek_v3": ("SUPPORTED", "sequential"),
    "mamba": ("SUPPORTED", "ssm"),
    "bart": ("REFUSED", "encoder-decoder"),
    "bert": ("REFUSED", "encoder-only"),
    "jamba": ("REFUSED", "hybrid"),
}


@pytest.fixture(scope="module")
def census_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("census")


@pytest.fixture(scope="module")
def built(census_dir):
    from dolm.models import census

    out = {}

    def get(mt):
        if mt not in out:  # test_census_verdicts may have built it (same seed) already
            folder = census_dir / mt
            done = (folder / "config.json").exists() and (folder / "tokenizer.json").exists()
            out[mt] = folder if done else census.build(mt, folder)
        return out[mt]

    return get


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_census_verdicts(census_dir, model_type):
    from dolm.models.census import census_one

    verdict, why = census_one(model_type, census_dir)
    want, text = CASES[model_type]
    assert verdict == want, why
    assert text in why


def test_committed_census_is_this_installations():
    """docs/models.md (the whole census, ``just census``) is for the installed transformers,
    lists every causal-LM type it maps, and agrees with the verdicts measured above."""
    import re
    from pathlib import Path

    import transformers
    from dolm.models.census import causal_lm_types

    text = (Path(__file__).parents[1] / "docs" / "models.md").read_text()
    assert f"transformers {transformers.__version__} maps" in text, \
        "docs/models.md is for another transformers: run `just census`"
    rows = dict(re.findall(r"^\| (\S+) \| (SUPPORTED|REFUSED|SKIPPED|CRASH) \|", text, re.M))
    assert sorted(rows) == causal_lm_types()
    counts = {v: list(rows.values()).count(v) for v in ("SUPPORTED", "REFUSED", "SKIPPED")}
    assert f"**{counts['SUPPORTED']} supported, {counts['REFUSED']} refused, " \
           f"{counts['SKIPPED']} skipped, 0 crashed**" in text
    assert counts["SUPPORTED"] >= 100 and "CRASH" not in rows.values()
    for mt, (verdict, _) in CASES.items():
        assert rows[mt] == verdict, mt


def test_olmo_is_layernorm_and_mla_head_width(built):
    from dolm.models import load

    olmo = load(str(built("olmo")))
    assert olmo.adapter.norm == "layernorm"  # OLMo's final norm is a LayerNorm
    ds = load(str(built("deepseek_v3")))
    cfg = ds.config
    assert ds.d_head == cfg.v_head_dim == 16 != cfg.qk_nope_head_dim + 0 * cfg.qk_rope_head_dim
    with torch.no_grad(), ds.trace(read=["head.0.*"]) as tr:
        ds.forward(ds.encode(["the cat sat"]))
    assert tr["head.0.3"].shape[-1] == 16


def test_reads_are_copies_taken_at_hook_time(built, tiny_lm):
    # falcon adds the attention output into the MLP output in place (mlp_output += attn)
    from dolm.models import load

    lm = load(str(built("falcon")))
    seen = {}
    mlp = lm.adapter.block_module(0, "mlp")
    h = mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("mlp", o.detach().clone()))
    try:
        with torch.no_grad(), lm.trace(read=["mlp_out.0", "attn_out.0"]) as tr:
            lm.forward(lm.encode(["the cat sat on the mat"]))
    finally:
        h.remove()
    assert torch.equal(tr["mlp_out.0"], seen["mlp"])
    assert not torch.allclose(tr["mlp_out.0"], seen["mlp"] + tr["attn_out.0"])
    # any module editing its output in place after dolm's hook
    g = tiny_lm("gpt2")
    block = g.adapter.block(0)
    enc = g.encode(["the cat sat on the mat"])
    with torch.no_grad(), g.trace(read=["resid_post.0"]) as clean:
        g.forward(enc)
    with torch.no_grad(), g.trace(read=["resid_post.0"]) as tr:
        h = block.register_forward_hook(lambda m, a, o: o.mul_(2.0))
        try:
            g.forward(enc)
        finally:
            h.remove()
    assert torch.equal(tr["resid_post.0"], clean["resid_post.0"])


def test_a_wrong_row_fails_a_named_identity(built):
    from dolm.models import load
    from dolm.models.adapters import Adapter
    from dolm.models.verify import verify

    lm = load(str(built("granite")))
    for wrong, name in (
        (dict(residual_scale=None), "resid_pre + attn_out + mlp_out"),
        (dict(logit_ops=()), "logits"),
        (dict(parallel=True), "mlp input"),
    ):
        lm.adapter = Adapter(replace(lm.adapter.spec, **wrong), lm.model)
        failed = [c.name for c in verify(lm) if not c.ok]
        assert any(name in f for f in failed), (wrong, failed)


def test_ssm_sites_and_head_refusal(built):
    from dolm.models import load

    lm = load(str(built("mamba")))
    assert lm.n_heads == 0
    with torch.no_grad(), lm.trace(read=["mixer_out.*", "resid_pre.*", "resid_post.*"]) as tr:
        lm.forward(lm.encode(["the cat sat"]))
    for layer in range(lm.n_layers):
        total = tr[f"resid_pre.{layer}"] + tr[f"mixer_out.{layer}"]
        assert (total - tr[f"resid_post.{layer}"]).abs().max() < 1e-5
    for site in ("head.0.0", "q.0.1", "pattern.1.0", "attn_out.1", "mlp_out.0"):
        with pytest.raises(InputError, match="no attention"):
            lm.expand_sites(site)
    att = load(str(built("biogpt")))
    with pytest.raises(InputError, match="mixer_out"):
        att.expand_sites("mixer_out.0")


def test_validate_model_cli(built):
    ok = subprocess.run(["dolm-validate", "--model", str(built("gemma2"))],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "identities hold" in ok.stdout and "ok   run_from_layer(0)" in ok.stderr
    # failures: see test_census_verdicts (bart, bert) and test_identity_failure_refuses_on_load


def test_identity_failure_refuses_on_load(built, monkeypatch):
    from dolm.models import adapters, load

    path = str(built("granite"))
    broken = dict(adapters.EXTRAS)
    broken["granite"] = {}  # forget Granite's multipliers: the row is now wrong
    monkeypatch.setattr(adapters, "EXTRAS", broken)
    with pytest.raises(InputError, match="identity 'resid_post.0 = resid_pre \\+ attn_out"):
        load(path)


def test_dla_logit_maps(built, monkeypatch):
    from dolm.models import load
    from dolm_tools.dla.core import check_decomposable

    gemma2 = load(str(built("gemma2")))
    lmap = check_decomposable(gemma2, heads=True)  # its post-norm is linearised
    assert (lmap.pre, lmap.post, lmap.softcap) == (1.0, 1.0, 30.0)
    assert "pre-soft-cap" in lmap.describe()
    granite = load(str(built("granite")))
    assert check_decomposable(granite, heads=True).post == 0.5  # / logits_scaling 2
    # a multiplier after the cap would make the logits nonlinear in the components
    monkeypatch.setattr(gemma2.adapter, "logit_ops", (("softcap", 30.0), ("mul", 2.0)))
    with pytest.raises(InputError, match="gemma2 applies softcap 30 after the unembedding"):
        check_decomposable(gemma2, heads=False)


def test_moe_router_sites(built):
    from dolm.models import load

    lm = load(str(built("mixtral")))
    enc = lm.encode(["the cat sat on the mat", "a dog"])
    gate = lm.adapter.block_module(1, "router")
    seen = {}
    h = gate.register_forward_hook(lambda m, a, o: seen.__setitem__("logits", o[0].clone()))
    try:
        with torch.no_grad(), lm.trace(read=["router.1", "mlp_out.1"]) as tr:
            lm.forward(enc)
    finally:
        h.remove()
    b, s = enc.input_ids.shape
    n_experts = lm.config.num_local_experts
    assert tr["router.1"].shape == (b, s, n_experts)
    assert torch.equal(tr["router.1"].reshape(b * s, n_experts), seen["logits"])
    with pytest.raises(InputError, match="read-only"):
        lm.trace(write={"router.0": lambda a, i: a})
    # expert.L.E: each expert's weighted term, zero where the router did not pick it; the
    # experts sum to mlp_out.L (Mixtral has no shared expert); a write replaces one term
    names = lm.expand_sites("expert.1.*")
    assert names == [f"expert.1.{e}" for e in range(n_experts)]
    with torch.no_grad(), lm.trace(read=names + ["mlp_out.1", "router.1"]) as tr:
        base = lm.forward(enc).logits
    assert (sum(tr[x] for x in names) - tr["mlp_out.1"]).abs().max() < 1e-6
    top = tr["router.1"].topk(lm.config.num_experts_per_tok, dim=-1).indices
    for e, name in enumerate(names):
        picked = (top == e).any(-1)
        assert (tr[name][~picked] == 0).all() and (tr[name][picked].abs().sum(-1) > 0).all()
    with torch.no_grad(), lm.trace(write={"expert.1.0": lambda a, i: torch.zeros_like(a)}):
        ablated = lm.forward(enc).logits
    with torch.no_grad(), lm.trace(write={"mlp_out.1": lambda a, i: a - tr["expert.1.0"]}):
        by_hand = lm.forward(enc).logits
    assert (ablated - base).abs().max() > 1e-3 and (ablated - by_hand).abs().max() < 1e-5
    with pytest.raises(InputError, match="expert 4 out of range 0..3"):
        lm.expand_sites("expert.0.4")
    olmo = load(str(built("olmo")))
    for site in ("router.0", "expert.0.0"):
        with pytest.raises(InputError, match="not a mixture of experts"):
            olmo.expand_sites(site)


# ---------------------------------------------------------------- refusals by the executables


def _cli(*args):
    env = dict(os.environ, DOLM_PROGRESS="0", OMP_NUM_THREADS="1")
    return subprocess.run(list(map(str, args)), capture_output=True, text=True, env=env)


def test_encoder_decoder_exits_3(tmp_path):
    """A tiny T5 (an encoder-decoder with no causal-LM class) saved as a user has it."""
    from transformers import T5Config, T5ForConditionalGeneration

    folder = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32,
                                        num_layers=1, num_heads=2)).save_pretrained(folder)
    r = _cli("dolm-validate", "--model", folder)
    assert r.returncode == 3, r.stderr
    assert "'t5' is an encoder-decoder model" in r.stderr and str(folder) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_identity_failure_exits_3(built):
    """dolm-validate as a user runs it, with Granite's row stripped of its multipliers (the
    defect the census guards against): the failed identity is named, exit 3."""
    code = ("import sys; from dolm.models import adapters; adapters.EXTRAS['granite'] = {}; "
            "from dolm_tools.validate.cli import main; sys.argv[0] = 'dolm-validate'; main()")
    folder = built("granite")
    r = _cli(sys.executable, "-c", code, "--model", folder)
    assert r.returncode == 3, r.stderr
    assert "identity 'resid_post.0 = resid_pre + attn_out" in r.stderr, r.stderr
    assert "granite" in r.stderr and "Traceback" not in r.stderr


def test_head_site_on_ssm_exits_3(built, tmp_path):
    import pandas as pd
    from dolm.formats import write_table

    prompts = tmp_path / "p.parquet"
    write_table(pd.DataFrame([{"prompt_id": "p0", "family": "test", "prompt": "the cat sat",
                               "target": "t", "split": "eval",
                               **dict.fromkeys(["foil", "choices", "cf_prompt", "cf_target",
                                                "cf_foil", "spans", "cf_spans", "group_id"])}]),
                str(prompts),
                schema="prompts", run=None)
    r = _cli("dolm-collect-acts", prompts, "--model", built("mamba"), "-o",
             tmp_path / "o.parquet", "--acts", tmp_path / "a.h5", "--sites", "head.0.0")
    assert r.returncode == 3, r.stderr
    assert "head.0.0" in r.stderr and "mamba" in r.stderr and "no attention" in r.stderr, r.stderr
    assert not (tmp_path / "o.parquet").exists() and not (tmp_path / "a.h5").exists()
