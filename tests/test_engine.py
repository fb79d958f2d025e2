"""The one intervention engine (dolm.engine) and every tool on it (patch, ablate, steer,
mediate interventional) against one independent oracle: a hand-written loop that runs each
variant alone (no padding, one full forward) with plain PyTorch hooks on the Hugging Face
modules, never through dolm's hooks or layer stepping. Batches mix start layers and pad
lengths; the engine's rows join at their own layers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["the capital of France is", "a red cat and a blue dog is", "the king is"]


def _module(model, site: str):
    """(module, hook kind) of a GPT-2 site, spelled out by hand (not the adapter)."""
    kind, layer = site.split(".")
    block = model.transformer.h[int(layer)]
    return {"resid_pre": (block, "pre"), "resid_post": (block, "out"),
            "attn_out": (block.attn, "out"), "mlp_out": (block.mlp, "out")}[kind]


def oracle(model, ids: list[int], edits, read=()):
    """One unpadded forward of ``ids`` with ``edits`` [(site, fn(x) -> x)]; returns the
    logits (T, vocab) and the (edited) values of the ``read`` sites (T, d)."""
    seen, handles = {}, []

    def out_hook(fn, name):
        def hook(module, args, output):
            x = output if isinstance(output, torch.Tensor) else output[0]
            x = fn(x[0])[None] if fn else x
            seen[name] = x[0].clone()
            if isinstance(output, torch.Tensor):
                return x
            return (x, *output[1:])
        return hook

    def pre_hook(fn, name):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            x = fn(x[0])[None] if fn else x
            seen[name] = x[0].clone()
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}
        return hook

    todo = [(s, fn) for s, fn in edits] + [(s, None) for s in read]
    for site, fn in todo:
        mod, kind = _module(model, site)
        if kind == "pre":
            handles.append(mod.register_forward_pre_hook(pre_hook(fn, site), with_kwargs=True))
        else:
            handles.append(mod.register_forward_hook(out_hook(fn, site)))
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    finally:
        for h in handles:
            h.remove()
    return logits, seen


def put(pos, value):
    def fn(x):
        x = x.clone()
        x[pos] = value.to(x.dtype)
        return x
    return fn


def test_run_rows_mixes_start_layers_and_pad_lengths(tiny_lm):
    from dolm.engine import entry_site, row_writer, rows_start, run_rows, unembed

    lm = tiny_lm("gpt2")
    enc = lm.encode(TEXTS)
    n = lm.n_layers
    with torch.no_grad():
        hs = lm.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                      output_hidden_states=True, use_cache=False).hidden_states
    entries = {lyr: hs[lyr] for lyr in range(n)}  # resid_pre.l, independent of dolm's hooks
    rng = torch.Generator().manual_seed(0)
    variants = [(0, "resid_pre.0", 1), (2, "attn_out.0", 0), (1, "mlp_out.1", 3),
                (0, "resid_post.0", 2), (2, "resid_pre.1", 1), (1, "attn_out.1", 5),
                (1, f"resid_post.{n - 1}", 4), (2, f"resid_post.{n - 1}", 0)]
    variants = [(p, s, pos, torch.randn(lm.d_model, generator=rng)) for p, s, pos in variants]
    variants.sort(key=lambda v: rows_start(lm, [v[1]]))
    starts = [rows_start(lm, [s]) for _, s, _, _ in variants]
    assert starts == sorted(starts) and set(starts) == {0, 1, n}
    assert entry_site(lm, n) == f"resid_post.{n - 1}"
    last = torch.zeros_like(hs[0])  # the last block's output (GPT-2's hidden_states[n] is
    for p in range(len(TEXTS)):     # after the final norm): read by the oracle
        ids = enc.input_ids[p, : enc.lengths[p]].tolist()
        last[p, : len(ids)] = oracle(lm.model, ids, [], read=[f"resid_post.{n - 1}"])[1][
            f"resid_post.{n - 1}"]
    entries[n] = last
    prompts = [p for p, _, _, _ in variants]
    t = max(enc.lengths[p] for p in prompts)
    writes = {}
    for site in {s for _, s, _, _ in variants}:
        rows = [i for i, v in enumerate(variants) if v[1] == site]
        mask = torch.zeros(len(rows), t, dtype=torch.bool)
        value = torch.zeros(len(rows), t, lm.d_model)
        for q, i in enumerate(rows):
            mask[q, variants[i][2]] = True
            value[q, variants[i][2]] = variants[i][3]
        writes[site] = row_writer(rows, mask, value)

    def entry(layer, a, z):
        return entries[layer][prompts[a:z]]

    with torch.no_grad():
        h = run_rows(lm, starts, entry, t, writes)
        got = unembed(lm, h, enc.last_index[prompts])
    for i, (p, site, pos, value) in enumerate(variants):
        ids = enc.input_ids[p, : enc.lengths[p]].tolist()
        ref, _ = oracle(lm.model, ids, [(site, put(pos, value))])
        torch.testing.assert_close(got[i], ref[-1], atol=1e-4, rtol=0)


def test_patch_matches_oracle(tiny_lm):
    from test_patch_helpers import PAIRS, patch_rows, prompts_df

    lm = tiny_lm("gpt2")
    df = prompts_df(PAIRS)
    tid, fid = lm.token_id(" Paris"), lm.token_id(" Rome")
    rows, _, _ = patch_rows(lm, df, sites="resid_pre,resid_post,attn_out,mlp_out",
                            direction="denoise", batch_size=5)
    got = [r for r in rows if r["metric"] == "logit_diff"]
    rng = np.random.default_rng(1)
    for r in rng.choice(got, size=24, replace=False):
        p, cf, _ = PAIRS[int(r["prompt_id"][1:])]
        src = lm.encode([p]).input_ids[0].tolist()
        base = lm.encode([cf]).input_ids[0].tolist()
        _, seen = oracle(lm.model, src, [], read=[r["site"]])
        pos = int(r["position"])
        logits, _ = oracle(lm.model, base, [(r["site"], put(pos, seen[r["site"]][pos]))])
        assert abs(float(logits[-1, tid] - logits[-1, fid]) - r["value"]) < 1e-4


def test_ablate_and_steer_match_oracle(tiny_lm):
    from dolm.metrics import ids_matrix, prompt_targets, read_logits
    from dolm_tools.ablate.components import parse_sets
    from dolm_tools.ablate.core import Ablator, Condition
    from dolm_tools.steer.apply import run_steering

    lm = tiny_lm("gpt2")
    df = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(3)], "prompt": TEXTS,
                       "target": " Paris", "foil": " Rome"})
    tg = prompt_targets(df, lm, "prompts")
    ids = torch.tensor(ids_matrix(tg))
    sets = parse_sets(lm, ["mlp_out.1,attn_out.0,layer.0,attn_out.1+mlp_out.0"])
    conds = [Condition(s, "zero", None) for s in sets]
    _, per = Ablator(lm, tg, TEXTS, conds, batch_size=4).run()
    u = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(2))
    u = u / u.norm()
    _, steer, _ = run_steering(lm, tg, TEXTS, "resid_post.0", u.numpy(), [-2.0, 3.0], "add",
                               "last", batch_size=4)
    for i, text in enumerate(TEXTS):
        tokens = lm.encode([text]).input_ids[0].tolist()
        for c, values in zip(conds, per, strict=True):
            edit = [(s, torch.zeros_like) for s in c.cset.sites]
            logits, _ = oracle(lm.model, tokens, edit)
            ref = read_logits(logits[-1:], ids[i:i + 1])[0]
            assert abs(values["logit_diff"][i] - float(ref[0] - ref[1])) < 1e-4
        for alpha, values in zip([-2.0, 3.0], steer, strict=True):
            last = len(tokens) - 1

            def add(x, alpha=alpha, last=last):
                x = x.clone()
                x[last] = x[last] + alpha * u
                return x

            logits, _ = oracle(lm.model, tokens, [("resid_post.0", add)])
            ref = read_logits(logits[-1:], ids[i:i + 1])[0]
            assert abs(values["logit_diff"][i] - float(ref[0] - ref[1])) < 1e-4


def test_mediate_interventional_matches_oracle(tiny_lm):
    from dolm_tools.mediate import interventional as iv
    from test_mediate_interventional import _prompts

    lm = tiny_lm("gpt2")
    df = _prompts(n=4)
    pairs, _ = iv.make_pairs(df, treatment="cot", pair_by=None, control_value=None,
                             treat_value=None, text_column="text")
    prep = iv.prepare(lm, pairs, "a")
    sites = ["mlp_out.1", "resid_pre.1", "attn_out.0"]
    res = iv.run_pairs(lm, prep, sites, 3)
    for i in range(len(pairs)):
        for si, site in enumerate(sites):
            _, vc = oracle(lm.model, prep.ids_c[i], [], read=[site])
            _, vt = oracle(lm.model, prep.ids_t[i], [], read=[site])
            for ids, read, tgt, pos, donor, pos_d, key in (
                    (prep.ids_c[i], prep.read_c[i], prep.tgt_c[i], prep.pos_c[i], vt,
                     prep.pos_t[i], "CM1"),
                    (prep.ids_t[i], prep.read_t[i], prep.tgt_t[i], prep.pos_t[i], vc,
                     prep.pos_c[i], "TM0")):
                logits, _ = oracle(lm.model, ids, [(site, put(pos, donor[site][pos_d]))])
                lp = torch.log_softmax(logits[read: read + len(tgt)].float(), -1)
                ref = float(lp.gather(1, torch.tensor(tgt)[:, None]).sum())
                assert abs(res[key][i, si, 0] - ref) < 1e-4, (key, site, i)


LONG = ["the capital of France is a city on the river and the king is",
        "a red cat and a blue dog is", "the king of the city and the queen of the land are"]


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "gpt_neox"])
def test_prefix_kv_equals_full_recompute(tiny_lm, family):
    """run_rows with the prefix's keys/values from the clean run (lm.forward_kv) gives the
    full recompute's states at every real position, in batches that mix start layers,
    patched positions and pad lengths (mistral: prompts longer than its window of 8)."""
    from dolm.engine import row_writer, rows_start, run_rows

    lm = tiny_lm(family)
    assert lm.supports_prefix_kv()
    enc = lm.encode(LONG)
    n, t = lm.n_layers, enc.input_ids.shape[1]
    assert min(enc.lengths) < t and (family != "mistral" or t > 8)
    with torch.no_grad():
        hs = lm.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                      output_hidden_states=True, use_cache=False).hidden_states
        _, kv = lm.forward_kv(enc.input_ids, enc.attention_mask)
    rng = torch.Generator().manual_seed(0)
    variants = [(0, "resid_pre.0", 5), (1, "attn_out.0", 6), (2, "mlp_out.1", 7),
                (0, f"resid_pre.{n - 1}", 9), (2, "resid_pre.1", 5), (1, "mlp_out.0", 4)]
    variants.sort(key=lambda v: rows_start(lm, [v[1]]))
    prompts = [p for p, _, _ in variants]
    starts = [rows_start(lm, [s]) for _, s, _ in variants]
    values = torch.randn(len(variants), lm.d_model, generator=rng)

    def run(prefix):
        writes = {}
        for site in {s for _, s, _ in variants}:
            rows = [i for i, v in enumerate(variants) if v[1] == site]
            mask = torch.zeros(len(rows), t, dtype=torch.bool)
            value = torch.zeros(len(rows), t, lm.d_model)
            for q, i in enumerate(rows):
                mask[q, variants[i][2]] = True
                value[q, variants[i][2]] = values[i]
            writes[site] = row_writer(rows, mask[:, prefix:], value[:, prefix:])

        def past(layer, k):
            return kv[layer][0][prompts[:k]], kv[layer][1][prompts[:k]]

        with torch.no_grad():
            return run_rows(lm, starts, lambda lyr, a, z: hs[lyr][prompts[a:z]], t, writes,
                            prefix=prefix, past=past if prefix else None)

    full = run(0)
    for prefix in (1, 4):
        got = run(prefix)
        assert got.shape[1] == t - prefix
        for i, p in enumerate(prompts):
            real = enc.lengths[p] - prefix
            torch.testing.assert_close(got[i, :real], full[i, prefix:prefix + real],
                                       atol=1e-5, rtol=1e-5)


def _values(rows):
    """Logit differences and probabilities (recovery divides by small differences)."""
    return [r["value"] for r in rows if r["metric"] in ("logit_diff", "prob_target")]


def test_patch_prefix_kv_matches_full_recompute(tiny_lm):
    """dolm-patch's grid (every position, joint and windowed cells, both directions) is the
    same with and without prefix KV reuse."""
    from test_patch_helpers import PAIRS, patch_rows, prompts_df

    lm = tiny_lm("gpt2")
    df = prompts_df(PAIRS)
    out = {}
    for reuse in (True, False):
        lm._prefix_kv_ok = reuse
        try:
            for direction in ("denoise", "noise"):
                rows, _, _ = patch_rows(lm, df, sites="resid_pre,mlp_out,head.1.*",
                                        direction=direction, window=3, batch_size=7)
                out[reuse, direction] = _values(rows)
            rows, _, _ = patch_rows(lm, df, sites="resid_post,attn_out", positions="span:subject",
                                    joint=True, batch_size=4)
            out[reuse, "joint"] = _values(rows)
        finally:
            lm._prefix_kv_ok = None
    for key in ("denoise", "noise", "joint"):
        a = np.array(out[True, key], dtype=float)
        b = np.array(out[False, key], dtype=float)
        assert len(a) > 20
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
