"""TransformerLens 3.9 parity on a post-norm architecture (Gemma 2: norms after attention
and MLP outputs, attention and final-logit soft-caps, grouped-query attention).

TransformerLens is built from the HF config (HookedTransformerConfig with Gemma 2's
settings) and loaded with ``convert_gemma_weights``, no folding, so both compute the same
function; dolm's patching grids (``resid_pre.L`` and ``head.L.H`` over all positions,
written through ``lm.trace``) then equal TransformerLens's ``get_act_patch_resid_pre`` and
``get_act_patch_attn_head_out_all_pos``.

Direct logit attribution: the real ``dolm-dla`` on a Gemma 2 whose norm gains are
randomised and whose final soft-cap is small enough to bend the logits (0.5) equals
TransformerLens's ``cache.logit_attrs`` (final norm folded into W_U, as it expects) per
component (embed, attn.L, mlp.L) and per head; a head's TL attribution is its
``hook_result`` through ``ln1_post`` linearised by TL's own cached scale, and both
attribute the pre-soft-cap logit difference.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.reference, pytest.mark.usefixtures("one_thread")]


def _transformer_lens(lm, fold_ln=False):
    """TransformerLens's Gemma 2 with the weights of dolm's loaded model."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gemma_weights

    c = lm.config
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=c.head_dim, n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers, n_ctx=64, eps=c.rms_norm_eps,
        d_vocab=c.vocab_size, act_fn="gelu_pytorch_tanh", normalization_type="RMS",
        rotary_base=c.rope_parameters["rope_theta"], positional_embedding_type="rotary",
        rotary_dim=c.head_dim, use_attn_scale=True, attn_scale=c.query_pre_attn_scalar ** 0.5,
        n_key_value_heads=c.num_key_value_heads, window_size=c.sliding_window,
        use_local_attn=True,
        attn_types=["local" if t == "sliding_attention" else "global" for t in c.layer_types],
        attn_scores_soft_cap=c.attn_logit_softcapping,
        output_logits_soft_cap=c.final_logit_softcapping, gated_mlp=True, final_rms=True,
        use_normalization_before_and_after=True, original_architecture="Gemma2ForCausalLM",
        default_prepend_bos=False, device="cpu",
    )
    tl = HookedTransformer(cfg)
    if fold_ln:  # logit_attrs expects the final norm's gain in W_U
        tl.load_and_process_state_dict(convert_gemma_weights(lm.model, cfg), fold_ln=True,
                                       center_writing_weights=False, center_unembed=False,
                                       fold_value_biases=False)
    else:
        tl.load_state_dict(convert_gemma_weights(lm.model, cfg), strict=False)
    return tl.eval()


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    pytest.importorskip("transformer_lens")
    from dolm.models import census, load

    lm = load(str(census.build("gemma2", tmp_path_factory.mktemp("gemma2") / "g")))
    return lm, _transformer_lens(lm)


def _pair(lm):
    clean = lm.encode(["- the cat sat on the mat and the dog"]).input_ids
    corrupt = clean.clone()
    corrupt[0, 3] = (corrupt[0, 3] + 7) % lm.d_vocab
    return clean, corrupt


def test_same_function(gemma2):
    lm, tl = gemma2
    clean, _ = _pair(lm)
    with torch.no_grad():
        assert (lm.model(input_ids=clean).logits - tl(clean)).abs().max() < 1e-4


def test_resid_and_head_grids_equal_transformer_lens(gemma2):
    from transformer_lens import patching

    lm, tl = gemma2
    clean, corrupt = _pair(lm)
    a, b = 5, 9

    def metric(logits):
        return logits[0, -1, a] - logits[0, -1, b]

    with torch.no_grad():
        _, cache = tl.run_with_cache(clean)
        ref_resid = patching.get_act_patch_resid_pre(tl, corrupt, cache, metric)
        ref_head = patching.get_act_patch_attn_head_out_all_pos(tl, corrupt, cache, metric)
    names = lm.expand_sites(["resid_pre.*", "head.*.*"])
    with torch.no_grad(), lm.trace(read=names) as ct:
        lm.model(input_ids=clean)
    n, s = lm.n_layers, clean.shape[1]
    resid = torch.zeros(n, s)
    head = torch.zeros(n, lm.n_heads)
    with torch.no_grad():
        for layer in range(n):
            for pos in range(s):
                def put(x, bi, site=f"resid_pre.{layer}", p=pos):
                    x = x.clone()
                    x[:, p] = ct[site][:, p]
                    return x
                with lm.trace(write={f"resid_pre.{layer}": put}):
                    resid[layer, pos] = metric(lm.model(input_ids=corrupt).logits)
            for h in range(lm.n_heads):
                site = f"head.{layer}.{h}"
                with lm.trace(write={site: lambda x, bi, site=site: ct[site]}):
                    head[layer, h] = metric(lm.model(input_ids=corrupt).logits)
    assert resid.abs().max() > 1e-3 and head.abs().max() > 1e-4
    assert torch.allclose(resid, ref_resid.float(), atol=1e-4)
    assert torch.allclose(head, ref_head.float(), atol=1e-4)
    # the post-norm sites decompose the residual stream as TransformerLens's do
    names = lm.expand_sites(["attn_out.*", "mlp_out.*", "resid_post.*"])
    with torch.no_grad(), lm.trace(read=names) as tr:
        lm.model(input_ids=clean)
    for layer in range(n):
        for ours, theirs in (("attn_out", "attn_out"), ("mlp_out", "mlp_out"),
                             ("resid_post", "resid_post")):
            diff = tr[f"{ours}.{layer}"] - cache[f"blocks.{layer}.hook_{theirs}"]
            assert diff.abs().max() < 1e-5, (ours, layer)


def test_dla_equals_transformer_lens_logit_attrs(tmp_path):
    pytest.importorskip("transformer_lens")
    import json
    import os
    import subprocess

    import pandas as pd
    from dolm.formats import write_table
    from dolm.models import census, load
    from transformers import AutoModelForCausalLM

    folder = census.build("gemma2", tmp_path / "g")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # Gemma's norms scale by 1 + w: make every gain differ from 1
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(0.4 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["final_logit_softcapping"] = 0.5  # logits of ~1 are bent well away from linear
    (folder / "config.json").write_text(json.dumps(cfg))
    lm = load(str(folder))
    tl = _transformer_lens(lm, fold_ln=True)
    rows = [("the cat sat on the mat", "t", "s"), ("- a dog", "a", "b"),
            ("the mat sat on a cat and", "x", "q")]
    df = pd.DataFrame([{"prompt_id": f"p{i}", "family": "test", "prompt": p, "target": t,
                        "foil": f, "choices": None, "split": "eval",
                        **dict.fromkeys(["cf_prompt", "cf_target", "cf_foil", "spans",
                                         "cf_spans", "group_id"])}
                       for i, (p, t, f) in enumerate(rows)])
    write_table(df, str(tmp_path / "p.parquet"), schema="prompts", run=None)
    env = dict(os.environ, DOLM_PROGRESS="0", OMP_NUM_THREADS="1")
    r = subprocess.run(["dolm-dla", str(tmp_path / "p.parquet"), "--model", str(folder),
                        "-o", str(tmp_path / "a.parquet")], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    ours = pd.read_parquet(tmp_path / "a.parquet")
    worst = {"components": 0.0, "heads": 0.0, "total": 0.0}
    bent = 0.0
    nh = lm.n_heads
    for _, row in df.iterrows():
        ids = lm.encode([row.prompt]).input_ids
        t, f = (torch.tensor([lm.token_id(x)]) for x in (row.target, row.foil))
        with torch.no_grad():
            logits, cache = tl.run_with_cache(ids)
            stack, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
            attrs = cache.logit_attrs(stack, tokens=t, incorrect_tokens=f, pos_slice=-1)[:, 0]
            heads = cache.stack_head_results(layer=-1, pos_slice=-1)  # before ln1_post
            post = torch.cat([heads[layer * nh:(layer + 1) * nh] * tl.blocks[layer].ln1_post.w
                              / cache[f"blocks.{layer}.ln1_post.hook_scale"][:, -1]
                              for layer in range(lm.n_layers)])
            hattrs = cache.logit_attrs(post, tokens=t, incorrect_tokens=f, pos_slice=-1)[:, 0]
        mine = ours[ours.prompt_id == row.prompt_id].set_index("component")
        for lab, v in zip(labels, attrs.tolist(), strict=True):
            name = lab if lab == "embed" else f"{lab.split('_')[1]}.{lab.split('_')[0]}"
            worst["components"] = max(worst["components"], abs(mine.value[name] - v))
        for i, v in enumerate(hattrs.tolist()):
            name = f"head.{i // nh}.{i % nh}"
            worst["heads"] = max(worst["heads"], abs(mine.value[name] - v))
        assert mine.value[f"attn_bias.{lm.n_layers - 1}"] == 0  # no bias, no post-norm beta
        precap = float(attrs.sum())  # TL attributes the logit difference before the cap
        worst["total"] = max(worst["total"], abs(mine.metric_value.iloc[0] - precap),
                             abs(mine.value[mine.in_total].sum() - precap))
        capped = float(logits[0, -1, t] - logits[0, -1, f])
        bent = max(bent, abs(capped - precap))
    print(f"\nGemma 2 DLA vs TransformerLens logit_attrs ({len(df)} prompts): max |difference| "
          f"{worst}; the cap moves the logit difference by up to {bent:.3f}")
    assert bent > 0.05  # the soft-cap matters here, so pre- and post-cap cannot be confused
    assert max(worst.values()) < 1e-4
