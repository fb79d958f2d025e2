"""TransformerLens 3.9 parity on a post-norm architecture (Gemma 2: norms after attention
and MLP outputs, attention and final-logit soft-caps, grouped-query attention).

TransformerLens is built from the HF config (HookedTransformerConfig with Gemma 2's
settings) and loaded with ``convert_gemma_weights``, no folding, so both compute the same
function; dolm's patching grids (``resid_pre.L`` and ``head.L.H`` over all positions,
written through ``lm.trace``) then equal TransformerLens's ``get_act_patch_resid_pre`` and
``get_act_patch_attn_head_out_all_pos``.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.reference, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    pytest.importorskip("transformer_lens")
    from dolm.models import census, load
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gemma_weights

    lm = load(str(census.build("gemma2", tmp_path_factory.mktemp("gemma2") / "g")))
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
    tl.load_state_dict(convert_gemma_weights(lm.model, cfg), strict=False)
    return lm, tl.eval()


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
