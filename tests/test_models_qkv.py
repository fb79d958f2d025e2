"""Sites inside the attention: q.L.H, k.L.H, v.L.H, pattern.L.H.

Writes are checked against hand-written hooks on the HF modules (the projections; for a
pattern, GPT-2's attention recomputed by hand from its probabilities and values), and on
GPT-2 against TransformerLens 3.9's ``get_act_patch_attn_head_{q,k,v,pattern}_all_pos``.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["the capital of France is Paris", "a cat sat"]


def _logits(lm, write=None, enc=None, read=()):
    enc = enc or lm.encode(TEXTS)
    with torch.no_grad(), lm.trace(read=read, write=write) as tr:
        out = lm.forward(enc).logits
    return out, tr


def _hooked(lm, module, hook, enc=None):
    enc = enc or lm.encode(TEXTS)
    h = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return lm.forward(enc).logits
    finally:
        h.remove()


def test_sites_shapes_and_pattern_reads(tiny_lm):
    lm = tiny_lm("llama")  # 4 query heads, 2 kv heads
    enc = lm.encode(TEXTS)
    base, _ = _logits(lm)
    out, tr = _logits(lm, read=["q.1.*", "k.1.*", "v.1.*", "pattern.1.*", "attn.1"], enc=enc)
    assert (out - base).abs().max() < 1e-5  # reading changes nothing (eager vs sdpa)
    b, s = enc.input_ids.shape
    assert tr["q.1.3"].shape == (b, s, lm.d_head) and tr["pattern.1.3"].shape == (b, s, s)
    assert torch.equal(tr["k.1.2"], tr["k.1.3"]) and not torch.equal(tr["k.1.1"], tr["k.1.2"])
    for h in range(lm.n_heads):
        assert torch.equal(tr[f"pattern.1.{h}"], tr["attn.1"][:, h])
    assert lm.model.config._attn_implementation == "sdpa"  # restored


def test_q_and_v_writes_equal_hooks_on_the_projections(tiny_lm):
    # Llama: rotary is linear, so scaling q_proj's slice of head 1 by 0.5 is scaling q.1.1
    lm = tiny_lm("llama")
    d = lm.d_head
    attn = lm.adapter.block_module(1, "attn")

    def halve_q(m, a, o):
        o = o.clone()
        o[..., 1 * d:2 * d] *= 0.5
        return o

    def halve(a, b):
        return a * 0.5

    ours, _ = _logits(lm, write={"q.1.1": halve})
    theirs = _hooked(lm, attn.q_proj, halve_q)
    assert (ours - theirs).abs().max() < 1e-5
    # kv head 1 serves query heads 2 and 3: writing v.1.3 is writing v_proj's slice 1
    noise = torch.randn(d, generator=torch.Generator().manual_seed(0))

    def add_v(m, a, o):
        o = o.clone()
        o[..., 1 * d:2 * d] += noise
        return o

    ours, _ = _logits(lm, write={"v.1.3": lambda a, b: a + noise})
    theirs = _hooked(lm, attn.v_proj, add_v)
    base, _ = _logits(lm)
    assert (ours - theirs).abs().max() < 1e-5 and (ours - base).abs().max() > 1e-3


def test_k_write_equals_a_hook_on_gpt2_c_attn(tiny_lm):
    lm = tiny_lm("gpt2")
    d, dm = lm.d_head, lm.d_model
    attn = lm.adapter.block_module(0, "attn")

    def k_slice(m, a, o):  # c_attn output is [q | k | v]
        o = o.clone()
        o[..., dm + 2 * d:dm + 3 * d] *= -1.5
        return o

    ours, _ = _logits(lm, write={"k.0.2": lambda a, b: a * -1.5})
    theirs = _hooked(lm, attn.c_attn, k_slice)
    assert (ours - theirs).abs().max() < 1e-5


def test_pattern_write_equals_a_hand_written_attention(tiny_lm):
    lm = tiny_lm("gpt2")
    enc = lm.encode(TEXTS)
    mask = enc.attention_mask

    def uniform(p, batch_index=None):
        causal = torch.tril(torch.ones(p.shape[-2:], dtype=p.dtype))[None] * mask[:, None, :]
        return causal / causal.sum(-1, keepdim=True)

    ours, tr = _logits(lm, write={"pattern.1.2": uniform}, read=["pattern.1.2"], enc=enc)
    assert torch.allclose(tr["pattern.1.2"], uniform(tr["pattern.1.2"]))

    # by hand: the eager attention's probabilities and GPT-2's values (c_attn is [q|k|v]),
    # head 2 replaced, multiplied out and projected again by c_proj
    attn = lm.adapter.block_module(1, "attn")
    dm, nh = lm.d_model, lm.n_heads
    vals = {}

    def grab_v(m, a, o):
        b, s, _ = o.shape
        vals["v"] = o[..., 2 * dm:].reshape(b, s, nh, dm // nh).transpose(1, 2)

    def redo(m, a, o):
        w = o[1].clone()
        w[:, 2] = uniform(w[:, 2])
        z = (w @ vals["v"]).transpose(1, 2).reshape(w.shape[0], w.shape[2], dm)
        return (attn.c_proj(z), w)

    impl = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    h = attn.c_attn.register_forward_hook(grab_v)
    try:
        theirs = _hooked(lm, attn, redo, enc)
    finally:
        h.remove()
        lm.model.set_attn_implementation(impl)
    m = mask.bool()
    assert (ours - theirs)[m].abs().max() < 1e-5
    # a one-hot pattern makes the head's output the value at that position
    onehot = {"pattern.0.1": lambda p, b: torch.nn.functional.one_hot(
        torch.zeros(p.shape[:-1], dtype=torch.long), p.shape[-1]).to(p)}
    _, t2 = _logits(lm, write=onehot, read=["head.0.1", "v.0.1"], enc=enc)
    assert (t2["head.0.1"] - t2["v.0.1"][:, :1]).abs().max() < 1e-5


def test_q_k_v_pattern_grids_equal_transformer_lens(tiny_lm):
    pytest.importorskip("transformer_lens")
    from test_patch_reference import tl_model
    from transformer_lens import patching

    lm = tiny_lm("gpt2")
    tl = tl_model(lm)
    clean = lm.encode(["the capital of France is Paris"])
    ids = clean.input_ids.clone()
    ids[0, 3] = lm.token_id(" Italy")
    corrupt = ids
    a, b = lm.token_id(" Paris"), lm.token_id(" Rome")

    def metric(logits):
        return logits[0, -1, a] - logits[0, -1, b]

    with torch.no_grad():
        _, cache = tl.run_with_cache(clean.input_ids)
    kinds = {"q": patching.get_act_patch_attn_head_q_all_pos,
             "k": patching.get_act_patch_attn_head_k_all_pos,
             "v": patching.get_act_patch_attn_head_v_all_pos,
             "pattern": patching.get_act_patch_attn_head_pattern_all_pos}
    names = lm.expand_sites(["q.*.*", "k.*.*", "v.*.*", "pattern.*.*"])
    with torch.no_grad(), lm.trace(read=names) as ct:
        lm.model(input_ids=clean.input_ids)
    for kind, fn in kinds.items():
        ref = fn(tl, corrupt, cache, metric)
        ours = torch.zeros(lm.n_layers, lm.n_heads)
        for layer in range(lm.n_layers):
            for h in range(lm.n_heads):
                site = f"{kind}.{layer}.{h}"
                with torch.no_grad(), lm.trace(write={site: lambda x, bi, s=site: ct[s]}):
                    ours[layer, h] = metric(lm.model(input_ids=corrupt).logits)
        assert ours.abs().max() > 1e-4
        assert torch.allclose(ours, ref.float(), atol=1e-4), kind


def test_site_widths_match_reads(tiny_lm):
    from dolm.errors import InputError
    from dolm_tools.collect_acts.collect import widths

    lm = tiny_lm("llama")
    names = ["q.1.0", "k.1.3", "v.1.2", "head.0.1", "resid_post.2", "logits"]
    _, tr = _logits(lm, read=names)
    assert widths(lm, names) == {n: tr[n].shape[-1] for n in names}
    with pytest.raises(InputError, match="not one vector per token"):
        widths(lm, ["pattern.1.0"])
