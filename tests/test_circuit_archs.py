"""Edge-level circuits beyond GPT-2: on a tiny random llama (grouped-query attention,
rotary) and gpt_neox (parallel residual, partial rotary), exact edge patching, EAP and
path patching against hand-written hook loops on the HF modules (independent of
``lm.receiver_inputs``: they patch the q/k/v projections' outputs; grouped-query k/v
inputs are checked on an equivalent copy of the llama with one key/value head per query
head)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("llama", "gpt_neox")


# ----------------------------------------------------------------- the hook-loop oracle
class Oracle:
    """Plain hooks on one family's HF modules."""

    def __init__(self, model, family: str):
        self.family = family
        if family == "llama":
            model = _ungrouped(model)
            base = model.model
            self.final = base.norm
        else:
            base = model.gpt_neox
            self.final = base.final_layer_norm
        self.model, self.layers = model, base.layers
        cfg = model.config
        self.nh = cfg.num_attention_heads
        self.dh = cfg.hidden_size // self.nh

    def ln1(self, lyr):
        return self.layers[lyr].input_layernorm

    def ln2(self, lyr):
        return self.layers[lyr].post_attention_layernorm

    def o_proj(self, lyr):
        blk = self.layers[lyr]
        return blk.self_attn.o_proj if self.family == "llama" else blk.attention.dense

    def proj(self, lyr, channel):
        """(module, slice of its output) computing head h's ``channel`` input."""
        blk = self.layers[lyr]
        if self.family == "llama":
            mod = getattr(blk.self_attn, f"{channel}_proj")
            return mod, lambda h: slice(h * self.dh, (h + 1) * self.dh)
        lo = "qkv".index(channel) * self.dh
        return blk.attention.query_key_value, \
            lambda h: slice(h * 3 * self.dh + lo, h * 3 * self.dh + lo + self.dh)

    def run(self, ids, hooks):
        hs = [reg() for reg in hooks]
        try:
            with torch.no_grad():
                return self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        finally:
            for h in hs:
                h.remove()

    def outputs(self, ids):
        """Every sender's output (embed, head.L.H, mlp.L), the raw head inputs z and the
        logits."""
        got, zs = {}, {}
        hooks = [lambda: self.layers[0].register_forward_pre_hook(
            lambda m, a, k: got.__setitem__("embed", (a[0] if a else k["hidden_states"])),
            with_kwargs=True)]
        for lyr in range(len(self.layers)):
            def pre(m, a, lyr=lyr):
                z = a[0]
                zs[lyr] = z.clone()
                for h in range(self.nh):
                    sl = slice(h * self.dh, (h + 1) * self.dh)
                    got[f"head.{lyr}.{h}"] = z[..., sl] @ m.weight[:, sl].T
            hooks.append(lambda pre=pre, lyr=lyr: self.o_proj(lyr).register_forward_pre_hook(pre))
            hooks.append(lambda lyr=lyr: self.layers[lyr].mlp.register_forward_hook(
                lambda m, a, o, lyr=lyr: got.__setitem__(f"mlp.{lyr}", o)))
        logits = self.run(ids, hooks)
        return got, zs, logits

    def receiver_hook(self, dst, channel, value):
        """A hook registration giving receiver ``dst`` (through ``channel``) the input
        ``value(x)``: x is the input it reads in this run."""
        kind = dst.split(".")[0]
        if kind == "logits":
            return lambda: self.final.register_forward_pre_hook(lambda m, a: (value(a[0]),))
        lyr = int(dst.split(".")[1])
        if kind == "mlp":
            return lambda: self.ln2(lyr).register_forward_pre_hook(lambda m, a: (value(a[0]),))
        head = int(dst.split(".")[2])
        mod, sl = self.proj(lyr, channel)
        ln1 = self.ln1(lyr)
        saved = {}

        def keep(m, a, k):
            saved["x"] = a[0] if a else k["hidden_states"]

        def fix(m, a, out):
            if saved.get("busy"):  # the hook calls the projection again
                return None
            saved["busy"] = True
            try:
                out = out.clone()
                out[..., sl(head)] = m(ln1(value(saved["x"])))[..., sl(head)]
                return out
            finally:
                saved["busy"] = False

        block = self.layers[lyr]

        def register():
            return _Handles(block.register_forward_pre_hook(keep, with_kwargs=True),
                            mod.register_forward_hook(fix))
        return register


class _Handles:
    def __init__(self, *handles):
        self.handles = handles

    def remove(self):
        for h in self.handles:
            h.remove()


def _ungrouped(model):
    """The llama with every key/value head repeated per query head (same function)."""
    from transformers import LlamaForCausalLM

    cfg = model.config.__class__.from_dict(model.config.to_dict())
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    cfg.num_key_value_heads = cfg.num_attention_heads
    cfg._attn_implementation = "eager"
    new = LlamaForCausalLM(cfg).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    dh = cfg.hidden_size // cfg.num_attention_heads
    for k in list(sd):
        if k.endswith(("k_proj.weight", "v_proj.weight")):
            w = sd[k]
            sd[k] = w.view(-1, dh, w.shape[-1]).repeat_interleave(g, 0).reshape(-1, w.shape[-1])
    new.load_state_dict(sd)
    return new


def _ld(logits, pos, t, f):
    rows = torch.arange(logits.shape[0])
    lg = logits[rows, pos]
    return (lg[rows, t] - lg[rows, f]).double().numpy()


EDGES = [("embed", "head.1.2", "k"), ("head.0.1", "head.2.0", "q"),
         ("mlp.0", "head.1.3", "v"), ("head.0.2", "head.2.3", "k"),
         ("embed", "head.2.1", "v"), ("head.1.0", "mlp.2", None), ("mlp.1", "logits", None),
         ("embed", "logits", None), ("head.2.3", "logits", None), ("mlp.0", "mlp.1", None)]


@pytest.fixture(scope="module", params=FAMILIES)
def arch(request, circuit_scorer):
    lm, data, scorer = circuit_scorer(request.param)
    return lm, data, scorer, Oracle(lm.model, request.param)


def _prompt(data, i):
    t = int(data.lengths[i])
    return (data.ids[i:i + 1, :t], data.cf_ids[i:i + 1, :t], data.positions[i:i + 1],
            data.target[i:i + 1], data.foil[i:i + 1])


def test_pass_reproduces_the_model_and_the_oracle_copy(arch):
    lm, data, sc, oracle = arch
    assert sc.runner.check(data.ids, data.positions) < 1e-4
    x = data.ids[:1, : int(data.lengths[0])]
    with torch.no_grad():
        ref = lm.model(input_ids=x).logits
    assert torch.allclose(oracle.run(x, []), ref, atol=1e-5)
    if lm.adapter.parallel:  # gpt_neox: the MLP reads the block input
        from dolm.errors import InputError

        with pytest.raises(InputError, match="not upstream"):
            sc.g.find_edge("head.0.0", "mlp.0", None)


def test_exact_equals_hand_written_hook_loop(arch):
    lm, data, sc, oracle = arch
    ids = [sc.g.find_edge(*e) for e in EDGES]
    ours = sc.exact(ids)
    for i in range(len(data.prompt_ids)):
        x, cx, pos, tg, fo = _prompt(data, i)
        clean, _, lc = oracle.outputs(x)
        cor, _, _ = oracle.outputs(cx)
        m0 = _ld(lc, pos, tg, fo)
        for j, (src, dst, ch) in enumerate(EDGES):
            d = cor[src] - clean[src]
            lp = oracle.run(x, [oracle.receiver_hook(dst, ch, lambda v, d=d: v + d)])
            ref = float((_ld(lp, pos, tg, fo) - m0)[0])
            assert ours[i, j] == pytest.approx(ref, abs=2e-4), (i, src, dst, ch)
    assert np.abs(ours).max() > 1e-3


def test_eap_is_the_first_order_term_of_the_hook_loop(arch):
    lm, data, sc, oracle = arch
    eap = sc.attribution(1)
    i, eps = 0, 1e-3
    x, cx, pos, tg, fo = _prompt(data, i)
    clean, _, _ = oracle.outputs(x)
    cor, _, _ = oracle.outputs(cx)
    for src, dst, ch in EDGES:
        d = cor[src] - clean[src]
        up = _ld(oracle.run(x, [oracle.receiver_hook(dst, ch, lambda v, d=d: v + eps * d)]),
                 pos, tg, fo)
        dn = _ld(oracle.run(x, [oracle.receiver_hook(dst, ch, lambda v, d=d: v - eps * d)]),
                 pos, tg, fo)
        fd = float((up - dn)[0] / (2 * eps))
        got = float(eap[i, sc.g.find_edge(src, dst, ch)])
        assert got == pytest.approx(fd, rel=2e-2, abs=2e-3), (src, dst, ch)


def _ioi_path_patch(oracle, x, cx, senders, receivers):
    """The IOI paper's three steps with plain hooks: (1) clean and counterfactual runs;
    (2) a run with the senders' outputs from the counterfactual and every other head and
    MLP frozen at its clean output, recording what the receivers read; (3) the clean run
    with only the receivers' inputs replaced."""
    _, zc, _ = oracle.outputs(x)
    _, zk, _ = oracle.outputs(cx)
    mc, mk = {}, {}
    for ids, store in ((x, mc), (cx, mk)):
        hooks = [lambda lyr=lyr, store=store: oracle.layers[lyr].mlp.register_forward_hook(
            lambda m, a, o, lyr=lyr: store.__setitem__(lyr, o.clone()))
            for lyr in range(len(oracle.layers))]
        oracle.run(ids, hooks)
    nh, dh = oracle.nh, oracle.dh
    seen, hooks = {}, []
    for lyr in range(len(oracle.layers)):
        def freeze_heads(m, a, lyr=lyr):
            z = zc[lyr].clone()
            for h in range(nh):
                if f"head.{lyr}.{h}" in senders:
                    z[..., h * dh:(h + 1) * dh] = zk[lyr][..., h * dh:(h + 1) * dh]
            return (z,)
        hooks.append(lambda f=freeze_heads, lyr=lyr:
                     oracle.o_proj(lyr).register_forward_pre_hook(f))
        hooks.append(lambda lyr=lyr: oracle.layers[lyr].mlp.register_forward_hook(
            lambda m, a, o, lyr=lyr: mk[lyr] if f"mlp.{lyr}" in senders else mc[lyr]))
    for name, ch in receivers:
        hooks.append(oracle.receiver_hook(name, ch, lambda v, name=name, ch=ch:
                                          seen.__setitem__((name, ch), v.clone()) or v))
    oracle.run(cx if "embed" in senders else x, hooks)
    return oracle.run(x, [oracle.receiver_hook(name, ch, lambda v, name=name, ch=ch:
                                               seen[(name, ch)])
                          for name, ch in receivers])


@pytest.mark.parametrize("receivers", [
    [("head.2.0", "k"), ("head.2.1", "k")], [("head.1.2", "v")], [("mlp.1", None)],
    [("logits", None)]])
def test_path_patching_equals_the_ioi_three_step_hook_loop(arch, receivers):
    from dolm.circuits.path import path_edges, path_patch

    lm, data, sc, oracle = arch
    senders = {"head.0.1", "head.0.3", "mlp.0", "embed"}
    ch = receivers[0][1] or "q,k,v"
    ids = path_edges(sc.g, ",".join(sorted(senders)), ",".join(r for r, _ in receivers), ch)
    ref, got = path_patch(sc, ids)
    for i in range(len(data.prompt_ids)):
        x, cx, pos, _, _ = _prompt(data, i)
        want = _ioi_path_patch(oracle, x, cx, senders, receivers)[0, int(pos[0])]
        assert torch.allclose(got[i], want, atol=2e-4), (got[i] - want).abs().max()
        assert (got[i] - ref[i]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["qwen2", "mistral", "qwen3", "gemma", "phi3",
                                    "gpt_neox_seq"])
def test_pass_reproduces_other_families(tiny_lm, family):
    """With no edge patched the edge-level pass equals the model (q/k norms, fused q/k/v
    projections, sliding windows, biases), and patching every edge from the same run
    changes nothing."""
    from dolm.circuits.graph import GraphRunner

    lm = tiny_lm(family)
    run = GraphRunner(lm)
    enc = lm.encode(["the king of France is", "a red cat and a dog"])
    ids, pos = enc.input_ids.cpu(), torch.as_tensor(enc.last_index)
    assert run.check(ids, pos) < 1e-4
    with torch.no_grad():
        clean = run.run(ids, pos, keep=True)
        same = run.run(ids, pos, patch=clean.outs, mask=run.graph.all_edges_mask()[None])
    assert torch.allclose(same.logits, clean.logits, atol=1e-4)


@pytest.mark.parametrize("family,why", [("gptj", "shares the attention's norm"),
                                        ("gpt_neo", "attention interface")])
def test_unresolvable_families_are_refused_with_the_reason(tiny_lm, family, why):
    from dolm.circuits.graph import GraphRunner
    from dolm.errors import InputError

    with pytest.raises(InputError, match=why):
        GraphRunner(tiny_lm(family))


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_fast_receiver_gradients_equal_the_streams(tiny_lm, family):
    """EAP's one-backward path (projection gradients per head through the projection's
    slice and the norm) equals the per-head input streams; grouped-query models (llama)
    keep the streams."""
    import pandas as pd
    from dolm.circuits.scores import Scorer, prepare

    lm = tiny_lm(family)
    df = pd.DataFrame({"prompt_id": ["p0", "p1"], "prompt": ["the king of France",
                                                             "a red cat and a"],
                       "cf_prompt": ["the queen of Italy", "a blue dog and a"],
                       "target": [" is", " dog"], "foil": [" was", " cat"]})
    sc = Scorer(lm, prepare(lm, df, "t", "logit_diff", "cf"), "logit_diff", batch_size=2)
    fast = sc.attribution(1)
    assert sc.runner._fast is (family != "llama")
    sc.runner._fast = False
    streams = sc.attribution(1)
    assert np.abs(fast - streams).max() <= 1e-5 * max(1.0, np.abs(streams).max())
    assert np.abs(streams).max() > 1e-2
