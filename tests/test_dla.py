"""dolm-dla: attributions sum to the model's own logit (difference) on every adapter
family, parity with TransformerLens's logit attribution on GPT-2 weights (toy when built,
else a tiny GPT-2), and the real executable's outputs and errors.

Every 1-D parameter (norm gains and biases, every bias) of the tiny models is randomised
first, so the final norm's gain and bias, the output projections' biases and the
unembedding direction all enter the sums.
"""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

FAMILIES = ["gpt2", "gpt_neox", "llama", "qwen2"]

PROMPTS = [
    # prompt, target, foil, choices
    ("the king of the city was", " the", " a", [" the", " a"]),
    ("one two three", " four", " one", None),
    ("A B C D X Y yes no", " no", None, [" yes", " no"]),
    ("the river of Rome is the capital of", " Italy", " France", None),
    ("red blue green cat dog", " bird", " tree", [" tree", " bird"]),
]


def prompts_frame(rows=PROMPTS) -> pd.DataFrame:
    out = []
    for i, (prompt, target, foil, choices) in enumerate(rows):
        out.append({"prompt_id": f"p{i}", "family": "test", "prompt": prompt, "target": target,
                    "foil": foil, "choices": choices, "split": "eval",
                    **dict.fromkeys(["cf_prompt", "cf_target", "cf_foil", "spans", "cf_spans",
                                     "group_id"])})
    return pd.DataFrame(out)


def _run(*args):
    env = dict(os.environ, DOLM_PROGRESS="0", OMP_NUM_THREADS="1")
    return subprocess.run(["dolm-dla", *map(str, args)], capture_output=True, text=True, env=env)


def randomise_1d(src, dst):
    """Save the model at ``src`` to ``dst`` with every 1-D parameter randomised (norm gains
    around 1, biases around 0) and return ``dolm.models.load(dst)``."""
    from dolm.models import load
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                base = 1.0 if "norm" in name or ".ln" in name else 0.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
    m.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return load(str(dst))


@pytest.fixture(scope="module")
def randomised(tiny_model_dir, tmp_path_factory):
    """family -> LoadedModel of the tiny model with every 1-D parameter randomised."""
    made = {}

    def get(family):
        if family not in made:
            made[family] = randomise_1d(tiny_model_dir(family),
                                        tmp_path_factory.mktemp(f"dla-{family}"))
        return made[family]

    return get


def attribute(lm, df, metric="auto", heads=True):
    from dolm_tools.dla import core

    req = core.resolve(lm, df, "prompts", metric=metric, target=None, foil=None,
                       first_token=False)
    enc = lm.encode(df.prompt.tolist(), names=df.prompt_id.tolist())
    res = core.dla_batch(lm, enc, req, list(range(len(df))), heads, core.final_norm_linear(lm),
                         *core.unembed_matrix(lm))
    return core.to_frame(lm, df, req, [res], heads)


def _actual(lm, prompt, target, foil):
    """The model's own logit (difference), batch of one, no dolm hooks."""
    enc = lm.encode([prompt])
    with torch.no_grad():
        logits = lm.model(input_ids=enc.input_ids).logits[0, -1].double()
    v = logits[lm.token_id(target)]
    return float(v - logits[lm.token_id(foil)]) if foil else float(v)


@pytest.mark.parametrize("family", FAMILIES)
def test_components_sum_to_the_logit(randomised, family):
    lm = randomised(family)
    full = prompts_frame()
    for metric, df in (("logit", full), ("logit_diff", full[full.foil.notna() |
                                                            full.choices.notna()])):
        table = attribute(lm, df.reset_index(drop=True), metric=metric)
        assert set(table.metric) == {metric}
        for pid, g in table.groupby("prompt_id"):
            row = df[df.prompt_id == pid].iloc[0]
            foil = None if metric == "logit" or pd.isna(row.foil) else row.foil
            if metric == "logit_diff" and foil is None:  # the other of two choices
                foil = [c for c in row.choices if c != row.target][0]
            want = _actual(lm, row.prompt, row.target, foil)
            total = g[g.in_total].value.sum()
            assert abs(total - want) < 1e-4, (family, metric, pid, total, want)
            assert abs(g.metric_value.iloc[0] - want) < 1e-4
            for layer in range(lm.n_layers):
                parts = g[(g.layer == layer) & g.kind.isin(["head", "attn_bias"])].value.sum()
                attn = g[g.component == f"attn.{layer}"].value.iloc[0]
                assert abs(parts - attn) < 1e-4
        kinds = set(table.kind)
        assert ("pos_embed" in kinds) == (family == "gpt2")
        bias = table[table.kind == "bias"].value.abs().max()
        if lm.adapter.norm == "layernorm":
            assert bias > 0  # the final norm's bias enters the sum
        else:
            assert bias == 0  # RMSNorm has none
    assert len(table[table.kind == "head"]) == len(df) * lm.n_layers * lm.n_heads


@pytest.mark.parametrize("model_type", ["cohere", "granite", "olmo2"])
def test_multipliers_and_post_norms_still_sum(tmp_path, model_type):
    """Logit multipliers (Cohere logit_scale 0.5, Granite / logits_scaling 2 with a residual
    multiplier) are folded in, so components sum to the model's own logit difference; a
    post-attention norm (OLMo 2) is linearised, so heads still sum to attn.L."""
    from dolm.models import census

    lm = randomise_1d(census.build(model_type, tmp_path / "src"), tmp_path / "dst")
    df = prompts_frame([("the cat sat on the mat", "t", "s", None), ("- a dog", "a", "b", None)])
    table = attribute(lm, df, metric="logit_diff")
    for _, row in df.iterrows():
        g = table[table.prompt_id == row.prompt_id]
        want = _actual(lm, row.prompt, row.target, row.foil)
        assert abs(g[g.in_total].value.sum() - want) < 1e-4, (model_type, row.prompt_id)
        assert abs(g.metric_value.iloc[0] - want) < 1e-4
        for layer in range(lm.n_layers):
            parts = g[(g.layer == layer) & g.kind.isin(["head", "attn_bias"])].value.sum()
            assert abs(parts - g[g.component == f"attn.{layer}"].value.iloc[0]) < 1e-4


def test_study_columns(randomised):
    lm = randomised("gpt2")
    df = prompts_frame()
    t = attribute(lm, df, metric="logit", heads=False)
    assert not (t.kind == "head").any()
    with_choices = set(df.prompt_id[df.choices.notna()])
    layer_rows = t[t.layer.notna() & t.prompt_id.isin(with_choices)]
    assert layer_rows[["attn_to_1", "mlp_to_1", "decision_diff"]].notna().all().all()
    assert t[~t.prompt_id.isin(with_choices)].attn_to_1.isna().all()
    assert t[t.layer.isna()].attn_to_1.isna().all()
    np.testing.assert_allclose(layer_rows.total_to_1, layer_rows.attn_to_1 + layer_rows.mlp_to_1)
    np.testing.assert_allclose(layer_rows.decision_diff,
                               layer_rows.total_to_1 - layer_rows.total_to_2)
    assert layer_rows.attn_mlp_ratio.between(0, 1).all()
    # p0 attributes logit(' the'), which is choice 1: attn_to_1 is attn.L's value
    p0 = t[(t.prompt_id == "p0") & (t.kind == "attn")]
    np.testing.assert_allclose(p0.attn_to_1, p0.value, atol=1e-10)
    # logit_diff of p4 (target ' bird' = choice 2): the layer's value is -decision_diff
    d = attribute(lm, df, metric="logit_diff", heads=False)
    p4 = d[(d.prompt_id == "p4") & d.kind.isin(["attn", "mlp"])].groupby("layer")
    np.testing.assert_allclose(p4.value.sum(), -p4.decision_diff.first(), atol=1e-10)


# ---------------------------------------------------------------- TransformerLens


def _toy_or_none():
    from dolm.errors import InputError
    from dolm.models import load

    try:
        return load("toy")
    except InputError:
        return None


@pytest.mark.reference
def test_parity_with_transformer_lens(randomised):
    pytest.importorskip("transformer_lens")
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    lm = _toy_or_none()
    if lm is not None:
        from dolm.tasks import generate

        ev = generate("dilemma", split="eval", seed=0).head(6)
        df = ev.reset_index(drop=True)
    else:
        lm = randomised("gpt2")
        df = prompts_frame()[lambda d: d.foil.notna()].reset_index(drop=True)
    hf = lm.model
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions,
        act_fn=c.activation_function, normalization_type="LN", eps=c.layer_norm_epsilon,
        positional_embedding_type="standard", default_prepend_bos=False, device="cpu")
    tl = HookedTransformer(cfg)
    # logit_attrs expects the final norm's gain folded into W_U (its bias into b_U);
    # no centring, so TL computes the same function as the HF model
    tl.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=True,
                                   center_writing_weights=False, center_unembed=False,
                                   fold_value_biases=False)
    tl.eval()
    ours = attribute(lm, df, metric="logit_diff")
    worst = {"components": 0.0, "heads": 0.0, "bias": 0.0}
    for _, row in df.iterrows():
        ids = lm.encode([row.prompt]).input_ids
        t, f = lm.token_id(row.target), lm.token_id(row.foil)
        with torch.no_grad():
            _, cache = tl.run_with_cache(ids)
            stack, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
            attrs = cache.logit_attrs(stack, tokens=torch.tensor([t]),
                                      incorrect_tokens=torch.tensor([f]), pos_slice=-1)[:, 0]
            hstack, hlabels = cache.stack_head_results(layer=-1, pos_slice=-1,
                                                       return_labels=True)
            hattrs = cache.logit_attrs(hstack, tokens=torch.tensor([t]),
                                       incorrect_tokens=torch.tensor([f]), pos_slice=-1)[:, 0]
        g = ours[ours.prompt_id == row.prompt_id].set_index("component").value
        for lab, v in zip(labels, attrs.tolist(), strict=True):
            name = lab if lab in ("embed", "pos_embed") else \
                f"{lab.split('_')[1]}.{lab.split('_')[0]}"
            worst["components"] = max(worst["components"], abs(g[name] - v))
        for lab, v in zip(hlabels, hattrs.tolist(), strict=True):
            layer, head = lab[1:].split("H")
            worst["heads"] = max(worst["heads"], abs(g[f"head.{layer}.{head}"] - v))
        b = g[[n for n in g.index if n.startswith("bias.")]].sum()
        worst["bias"] = max(worst["bias"], abs(b - float((tl.b_U[t] - tl.b_U[f]).detach())))
    print(f"\nDLA vs TransformerLens logit_attrs on {lm.info.get('spec')} "
          f"({len(df)} prompts): max |difference| {worst}")
    assert max(worst.values()) < 1e-4


# ---------------------------------------------------------------- the executable


def test_cli(tiny_model_dir, tmp_path, in_process):
    from dolm.formats import validate_file, write_table

    model = tiny_model_dir("gpt2")
    prompts = str(tmp_path / "p.parquet")
    write_table(prompts_frame(), prompts, schema="prompts", run=None)
    out = tmp_path / "dla.parquet"
    r = _run(prompts, "--model", model, "-o", out)
    assert r.returncode == 0, r.stderr
    assert validate_file(str(out)) == ("attributions", [])
    t = pd.read_parquet(out)
    n = 3  # layers of the tiny models
    per_prompt = 2 + n * (2 + 4 + 1) + 1  # embed, pos_embed, attn/heads/bias/mlp, bias
    assert len(t) == len(PROMPTS) * per_prompt
    assert set(t.metric) == {"logit_diff"}  # every prompt has a foil or two choices
    sums = t[t.in_total].groupby("prompt_id").agg(v=("value", "sum"), m=("metric_value", "first"))
    np.testing.assert_allclose(sums.v, sums.m, atol=1e-4)
    assert t[t.prompt_id == "p2"].foil.iloc[0] == " yes"
    # bad input (in-process: no cold import per case): a foil that is not one token; an
    # empty table
    df = prompts_frame()
    df.loc[3, "foil"] = " Franceland"
    write_table(df, prompts, schema="prompts", run=None, force=True)
    r = in_process("dolm-dla", prompts, "--model", model, "-o", tmp_path / "x.parquet")
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert "prompt p3, column 'foil'" in r.stderr and "expected exactly one" in r.stderr
    write_table(df.iloc[:0], prompts, schema="prompts", run=None, force=True)
    r = in_process("dolm-dla", prompts, "--model", model, "-o", tmp_path / "x.parquet")
    assert r.returncode == 3 and "empty" in r.stderr


def test_token_ids_override_column_and_null():
    from types import SimpleNamespace

    from dolm.errors import InputError
    from dolm.metrics import is_missing
    from dolm.tokens import TokenIds

    class Stub:
        def token_id(self, s):
            if " " in s.strip():
                raise InputError(f"token {s!r} is 2 tokens; expected exactly one")
            return len(s)

    ids = TokenIds(Stub())
    row = SimpleNamespace(prompt_id="p1", target=" yes", foil=float("nan"))
    assert ids.cell(row, "target", None, "f.parquet") == (" yes", 4)
    assert ids.cell(row, "foil", None, "f.parquet") == (None, None)
    assert ids.cell(row, "foil", " no", "f.parquet") == (" no", 3)
    with pytest.raises(InputError, match=r"^--target ' a b': token .* \(or pass --first-token"):
        ids.cell(row, "target", " a b", "f.parquet")
    row.target = " a b"
    with pytest.raises(InputError, match=r"^f.parquet: prompt p1, column 'target': token"):
        ids.cell(row, "target", None, "f.parquet")
    assert is_missing(pd.NA) and is_missing(None) and is_missing(float("nan"))
    assert not is_missing("x")
