"""dolm.models: loading, sites, hooks, encoding, token helpers, layer stepping, batching.

Every check runs on tiny random models of each main family (GPT-2, GPT-NeoX, Llama,
Qwen2, Mistral); the extra families get the core invariants in one test each.
"""

from __future__ import annotations

import hashlib
import json
import warnings

import pytest
import torch
from dolm.errors import DolmRuntimeError, InputError
from dolm.models.tiny import MAIN_FAMILIES

EXTRA_FAMILIES = ("gpt_neox_seq", "qwen3", "gemma", "phi3", "gptj", "gpt_neo")
PROMPTS = [
    "the capital of France is Paris",
    "a cat",
    "one two three four five six seven eight nine ten plus",
]


def all_hooks(model):
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks)
        n += len(getattr(m, "_forward_hooks_with_kwargs", {}))
        n += len(getattr(m, "_forward_pre_hooks_with_kwargs", {}))
    return n


def run(lm, texts=PROMPTS, read=(), write=None, **kw):
    enc = lm.encode(texts)
    with torch.no_grad(), lm.trace(read=read, write=write, **kw) as tr:
        out = lm.forward(enc, output_hidden_states=True)
    return enc, out, tr


def all_sites(lm):
    return lm.expand_sites(
        ["embed", "resid_pre.*", "resid_mid.*", "attn_out.*", "mlp_out.*", "resid_post.*",
         "head.*.*", "final_norm", "logits"]
    )


def _maxdiff(a, b, mask=None):
    d = (a - b).abs()
    if mask is not None:
        d = d[mask]
    return d.max().item()


# --------------------------------------------------------------------------- load


@pytest.mark.parametrize("family", MAIN_FAMILIES)
def test_load_info_and_dims(tiny_lm, tiny_model_dir, family):
    lm = tiny_lm(family)
    info = lm.info
    folder = tiny_model_dir(family)
    assert info["spec"] == str(folder) and info["path"] == str(folder)
    assert info["source"] == "local" and info["revision"] is None
    assert info["model_type"] == lm.config.model_type
    assert info["architecture"].endswith("ForCausalLM") or info["architecture"].endswith(
        "LMHeadModel")
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert info["weights_sha256"] == digest
    assert info["dtype"] == "float32" and info["quantization"] is None
    assert info["n_params"] == sum(p.numel() for p in lm.model.parameters())
    assert (lm.n_layers, lm.n_heads, lm.d_model) == (3, 4, 32)
    assert lm.d_vocab == len(lm.tokenizer) and lm.n_ctx == 64
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())


def test_weights_hash_is_cached(tiny_model_dir, tmp_path, monkeypatch):
    from dolm.models import loading

    monkeypatch.setenv("DOLM_CACHE_DIR", str(tmp_path))
    loading._MEM_CACHE.clear()
    folder = tiny_model_dir("gpt2")
    first = loading.weights_sha256(folder)
    cache = json.loads((tmp_path / "weights_sha256.json").read_text())
    assert list(cache.values()) == [first]
    loading._MEM_CACHE.clear()
    # a poisoned cache entry is used as is: proof that the file is not re-read
    key = next(iter(cache))
    (tmp_path / "weights_sha256.json").write_text(json.dumps({key: "f" * 64}))
    assert loading.weights_sha256(folder) == "f" * 64
    loading._MEM_CACHE.clear()


def test_unknown_spec_says_what_was_tried(monkeypatch, tmp_path):
    from dolm.models import load

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(InputError) as e:
        load("no-such-org/no-such-model-xyz")
    msg = str(e.value)
    for word in ("no-such-org/no-such-model-xyz", "local folder", "HF cache", "offline"):
        assert word in msg
    with pytest.raises(InputError, match="no such local folder"):
        load(str(tmp_path / "missing") + "/")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        load(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="--dtype"):
        load(str(tmp_path / "empty"), dtype="float8")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(InputError, match="bert.* is an encoder-only model"):
        load(str(tmp_path / "bert"))


def test_dtype_option(tiny_model_dir, tiny_lm):
    from dolm.models import load

    lm = load(str(tiny_model_dir("qwen2")), dtype="bfloat16")
    assert lm.info["dtype"] == "bfloat16" and lm.dtype == torch.bfloat16
    enc, out, tr = run(lm, read=["resid_post.1", "head.0.1"])
    assert tr["resid_post.1"].dtype == torch.bfloat16
    _, ref, _ = run(tiny_lm("qwen2"))
    m = enc.attention_mask.bool()
    assert _maxdiff(out.logits.float(), ref.logits.to(out.logits.device), m) < 0.1


def test_hub_id_from_hf_cache_without_network(monkeypatch, tmp_path, tiny_model_dir):
    """A hub id found in the HF cache loads with the hub unreachable (offline)."""
    import os

    from dolm.models import load

    src = tiny_model_dir("gpt2")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-gpt2"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in src.iterdir():
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm = load("tiny-org/tiny-gpt2")
    assert lm.info["source"] == "cache" and lm.info["revision"] == commit
    digest = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    assert lm.info["weights_sha256"] == digest
    with pytest.raises(InputError, match="HF cache at revision 'v9'"):
        load("tiny-org/tiny-gpt2", revision="v9")


def test_toy_not_built(monkeypatch, tmp_path):
    from dolm.models import load

    monkeypatch.setenv("DOLM_TOY_MODEL", str(tmp_path / "toy"))
    with pytest.raises(InputError, match="dolm-toy train"):
        load("toy")


def test_toy_resolves_through_env(monkeypatch, tiny_model_dir):
    from dolm.models import load

    monkeypatch.setenv("DOLM_TOY_MODEL", str(tiny_model_dir("gpt2")))
    lm = load("toy")
    assert lm.info["source"] == "toy" and lm.info["spec"] == "toy"


def test_default_toy_path_is_in_repo():
    from pathlib import Path

    from dolm.models.loading import repo_root

    assert (repo_root() / "libs" / "dolm" / "models").is_dir()
    assert Path(repo_root() / "pyproject.toml").is_file()


@pytest.fixture(scope="module")
def quant_model_dir(tmp_path_factory):
    """Tiny models wide enough for bitsandbytes' CPU kernels (d_model 64: every quantized
    layer has in_features a multiple of 64 and out_features a multiple of 32)."""
    from dolm.models.tiny import build_tiny_model

    built: dict[str, object] = {}

    def make(family: str):
        if family not in built:
            built[family] = build_tiny_model(tmp_path_factory.mktemp(f"q-{family}"), family,
                                             d_model=64)
        return built[family]

    return make


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_quantized_loading_runs_on_cpu(quant_model_dir, family, quant):
    pytest.importorskip("bitsandbytes")
    from dolm.models import load

    ref = load(str(quant_model_dir(family)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = load(str(quant_model_dir(family)), device_map="cpu",
                  load_in_4bit=quant == "4bit", load_in_8bit=quant == "8bit")
        assert lm.info["quantization"] == quant
        assert "bnb" in type(lm.adapter.block_module(0, "attn_o")).__module__ or \
            "bitsandbytes" in type(lm.adapter.block_module(0, "attn_o")).__module__
        enc, out, tr = run(lm, read=["head.1.2", "attn_out.1", "resid_post.2"])
        _, ref_out, _ = run(ref)
    m = enc.attention_mask.bool().cpu()
    assert torch.isfinite(out.logits).all()
    assert tr["head.1.2"].shape == (3, enc.input_ids.shape[1], lm.d_head)
    q, r = out.logits.cpu()[m].flatten(), ref_out.logits.cpu()[m].flatten()
    corr = torch.corrcoef(torch.stack([q, r]))
    assert corr[0, 1] > (0.99 if quant == "8bit" else 0.9)


def test_quantized_layer_the_cpu_kernel_cannot_pack_is_a_named_error(tiny_model_dir,
                                                                     monkeypatch):
    """bitsandbytes >= 0.50.2 repacks 4-bit weights for CPUs with AVX512-BF16 on the first
    forward, in blocks that d_model 32 does not fill. Ask bitsandbytes to take that path (its
    real packing code, which fails on the shape before any AVX512 instruction runs) and
    check that loading refuses with the layer and its shape named, not a traceback."""
    bnb_modules = pytest.importorskip("bitsandbytes.nn.modules")
    if not hasattr(bnb_modules, "has_avx512bf16"):
        pytest.skip("this bitsandbytes has no CPU packing path")
    from dolm.errors import InputError
    from dolm.models import load

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    with warnings.catch_warnings(), pytest.raises(InputError) as err:
        warnings.simplefilter("ignore")
        load(str(tiny_model_dir("gpt2")), device_map="cpu", load_in_4bit=True)
    msg = str(err.value)
    assert "--load-in-4bit" in msg and "transformer.h.0.attn.c_attn" in msg
    assert "in_features 32" in msg and "multiple of 64" in msg


def test_packing_rule_matches_bitsandbytes():
    """The shape rule dolm's message states is bitsandbytes' own: its CPU packing succeeds
    exactly when out_features % 32 == 0 and in_features % 64 == 0."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    if not hasattr(bnb_f, "_convert_weight_packed_for_cpu"):
        pytest.skip("this bitsandbytes has no CPU packing path")
    for n_in in (32, 64, 96, 128):
        for n_out in (16, 32, 48, 64):
            w = torch.randn(n_out, n_in)
            q, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4")
            try:
                bnb_f._convert_weight_packed_for_cpu(q, state)
                ok = True
            except (RuntimeError, AssertionError):
                ok = False
            assert ok == (n_out % 32 == 0 and n_in % 64 == 0), (n_in, n_out)


def test_device_map_auto(tiny_model_dir, tiny_lm):
    pytest.importorskip("accelerate")
    from dolm.models import load

    lm = load(str(tiny_model_dir("llama")), device_map="auto")
    enc, out, tr = run(lm, read=["resid_pre.1"])
    _, ref, _ = run(tiny_lm("llama"))
    ref = ref.logits.to(out.logits.device)
    assert _maxdiff(out.logits, ref) < 1e-5
    logits = lm.run_from_layer(tr["resid_pre.1"], 1, enc.attention_mask)
    assert _maxdiff(logits, ref.to(logits.device), enc.attention_mask.bool()) < 1e-5


# --------------------------------------------------------------------------- sites


@pytest.mark.parametrize("family", MAIN_FAMILIES + EXTRA_FAMILIES)
def test_resid_post_equals_hf_hidden_states(tiny_lm, family):
    lm = tiny_lm(family)
    enc, out, tr = run(lm, read=all_sites(lm))
    hs = out.hidden_states
    n = lm.n_layers
    assert len(hs) == n + 1
    assert torch.equal(tr["resid_pre.0"], hs[0])
    for layer in range(n - 1):
        assert _maxdiff(tr[f"resid_post.{layer}"], hs[layer + 1]) < 1e-6
        assert torch.equal(tr[f"resid_post.{layer}"], tr[f"resid_pre.{layer + 1}"])
    # HF's last hidden state has the final norm applied
    last = tr[f"resid_post.{n - 1}"]
    assert _maxdiff(lm.adapter.final_norm(last), hs[n]) < 1e-6
    assert _maxdiff(tr["final_norm"], hs[n]) < 1e-6
    assert (last - hs[n]).abs().max() > 1e-3  # the norm is not the identity here
    assert torch.equal(tr["logits"], out.logits)
    # embed is the token embedding output
    emb = lm.adapter.embed(enc.input_ids)
    assert torch.equal(tr["embed"], emb)


def _head_contributions(lm, layer, heads):
    """Each head through its slice of the output projection (no bias)."""
    proj = lm.adapter.block_module(layer, "attn_o")
    w = proj.weight
    d = lm.d_head
    outs = []
    for h, x in enumerate(heads):
        if type(proj).__name__ == "Conv1D":  # GPT-2: y = x W + b, W (in, out)
            outs.append(x @ w[h * d:(h + 1) * d, :])
        else:  # nn.Linear: y = x W^T + b, W (out, in)
            outs.append(x @ w[:, h * d:(h + 1) * d].T)
    return outs, getattr(proj, "bias", None)


@pytest.mark.parametrize("family", MAIN_FAMILIES + EXTRA_FAMILIES)
def test_heads_sum_to_attn_out(tiny_lm, family):
    lm = tiny_lm(family)
    enc, out, tr = run(lm, read=all_sites(lm))
    for layer in range(lm.n_layers):
        heads = [tr[f"head.{layer}.{h}"] for h in range(lm.n_heads)]
        assert heads[0].shape == (3, enc.input_ids.shape[1], lm.d_head)
        contrib, bias = _head_contributions(lm, layer, heads)
        total = sum(contrib)
        if bias is not None:
            total = total + bias
        assert _maxdiff(total, tr[f"attn_out.{layer}"]) < 1e-5
        # heads are distinct slices
        assert not torch.equal(heads[0], heads[1])


@pytest.mark.parametrize("family", MAIN_FAMILIES + EXTRA_FAMILIES)
def test_residual_decomposition(tiny_lm, family):
    lm = tiny_lm(family)
    ln2_inputs = {}
    handles = []
    if not lm.parallel_residual:
        for layer in range(lm.n_layers):
            mod = lm.adapter.block_module(layer, "ln2")
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, layer=layer: ln2_inputs.__setitem__(layer, a[0])))
    try:
        enc, out, tr = run(lm, read=all_sites(lm))
    finally:
        for h in handles:
            h.remove()
    for layer in range(lm.n_layers):
        pre, attn, mlp = (tr[f"{k}.{layer}"] for k in ("resid_pre", "attn_out", "mlp_out"))
        mid, post = tr[f"resid_mid.{layer}"], tr[f"resid_post.{layer}"]
        assert torch.equal(mid, pre + attn)
        if lm.parallel_residual:
            assert _maxdiff(post, pre + attn + mlp) < 1e-5
        else:
            # independent check: the pre-MLP norm reads exactly resid_mid
            assert torch.equal(ln2_inputs[layer], mid)
            assert _maxdiff(post, mid + mlp) < 1e-5


def _noise(scale=1.0, seed=0):
    def fn(act, batch_index):
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(act.shape, generator=g, dtype=act.dtype)
        return act + scale * noise.to(act.device)
    return fn


# The order in which sites are computed in one forward (per layer).
def _order(lm):
    names = ["embed"]
    for layer in range(lm.n_layers):
        names += [f"resid_pre.{layer}"] + [f"head.{layer}.{h}" for h in range(lm.n_heads)]
        names += [f"attn_out.{layer}", f"resid_mid.{layer}", f"mlp_out.{layer}",
                  f"resid_post.{layer}"]
    return names + ["final_norm", "logits"]


@pytest.mark.parametrize("family", MAIN_FAMILIES)
@pytest.mark.parametrize("site", ["embed", "resid_pre.1", "head.1.2", "attn_out.1",
                                  "resid_mid.1", "mlp_out.1", "resid_post.1", "final_norm"])
def test_write_changes_downstream_only(tiny_lm, family, site):
    lm = tiny_lm(family)
    sites = all_sites(lm)
    _, clean, ct = run(lm, read=sites)
    _, dirty, dt = run(lm, read=sites, write={site: _noise()})
    order = _order(lm)
    idx = order.index(site)
    unchanged = set(order[:idx])
    if site.startswith("head."):  # the other heads of the layer are computed alongside
        unchanged |= {f"head.1.{h}" for h in range(lm.n_heads)} - {site}
    if lm.parallel_residual and site in ("head.1.2", "attn_out.1", "resid_mid.1"):
        unchanged.add("mlp_out.1")  # parallel blocks: the MLP reads resid_pre
    if site == "resid_mid.1":
        unchanged.discard("attn_out.1")  # resid_mid is written by adjusting attn_out
    for s in order:
        if s in unchanged:
            assert torch.equal(ct[s], dt[s]), f"writing {site} changed upstream {s}"
        elif order.index(s) >= idx:
            assert not torch.equal(ct[s], dt[s]), f"writing {site} did not change {s}"
    assert (clean.logits - dirty.logits).abs().max() > 1e-4


@pytest.mark.parametrize("family", MAIN_FAMILIES)
def test_write_resid_mid_sets_the_value(tiny_lm, family):
    lm = tiny_lm(family)
    target = {}

    def set_mid(act, batch_index):
        target["v"] = torch.randn_like(act)
        return target["v"]

    enc, out, tr = run(lm, read=["resid_pre.1", "attn_out.1", "resid_mid.1", "mlp_out.1",
                                 "resid_post.1"], write={"resid_mid.1": set_mid})
    assert torch.equal(tr["resid_mid.1"], target["v"])
    # the model sees it: resid_pre + (adjusted) attn_out equals the written value
    assert _maxdiff(tr["resid_pre.1"] + tr["attn_out.1"], target["v"]) < 1e-5
    if not lm.parallel_residual:
        assert _maxdiff(tr["resid_post.1"] - tr["mlp_out.1"], target["v"]) < 1e-5


def test_write_receives_batch_index_and_can_target_rows(tiny_lm):
    lm = tiny_lm("gpt2")
    seen = []

    def fn(act, batch_index):
        seen.append(batch_index.clone())
        act = act.clone()
        act[batch_index == 7] += 1.0
        return act

    enc = lm.encode(PROMPTS)
    with torch.no_grad():
        clean = lm.forward(enc).logits
        with lm.trace(write={"resid_post.0": fn}, batch_index=torch.tensor([5, 7, 9])):
            dirty = lm.forward(enc).logits
        with lm.trace(write={"resid_post.0": fn}):
            lm.forward(enc)
    assert seen[0].tolist() == [5, 7, 9] and seen[1].tolist() == [0, 1, 2]
    assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[2], dirty[2])
    assert not torch.equal(clean[1], dirty[1])


def test_trace_mapping_api(tiny_lm):
    lm = tiny_lm("gpt2")
    sites = ["head.1.2", "resid_post.0", "head.0.*"]
    enc, out, tr = run(lm, read=sites)
    names = lm.expand_sites(sites)
    assert list(tr.values) == names == list(tr.keys())
    assert "head.1.2" in tr and "head.1.3" not in tr and tr.get("head.1.3") is None
    assert tr["head.1.2"].shape == (3, enc.input_ids.shape[1], lm.d_head)
    with pytest.raises(KeyError, match="not requested"):
        tr["resid_post.2"]
    with lm.trace(read=sites) as empty:
        pass
    with pytest.raises(KeyError, match="not reached"):
        empty["head.1.2"]


def test_write_errors(tiny_lm):
    lm = tiny_lm("gpt2")
    enc = lm.encode(PROMPTS)
    with pytest.raises(InputError, match="shape"):
        with torch.no_grad(), lm.trace(write={"resid_post.0": lambda a, b: a[:, :1]}):
            lm.forward(enc)
    with pytest.raises(InputError, match="read-only"):
        lm.trace(write={"attn.0": lambda a, b: a})
    with pytest.raises(InputError, match="not callable"):
        lm.trace(write={"attn_out.0": 3})


@pytest.mark.parametrize("family", MAIN_FAMILIES)
def test_no_hook_survives(tiny_lm, family):
    lm = tiny_lm(family)
    model = lm.model
    impl = model.config._attn_implementation
    enc = lm.encode(PROMPTS)
    with torch.no_grad():
        lm.forward(enc, output_hidden_states=True)  # HF installs its own capture hooks once
    before = all_hooks(model)
    sites = all_sites(lm) + lm.expand_sites("attn.*")
    with torch.no_grad(), lm.trace(read=sites, write={"resid_mid.1": _noise()}):
        assert all_hooks(model) > before
        lm.forward(enc)
    assert all_hooks(model) == before
    assert model.config._attn_implementation == impl
    # an exception inside the context
    with pytest.raises(ValueError, match="boom"):
        with lm.trace(read=sites):
            raise ValueError("boom")
    assert all_hooks(model) == before
    assert model.config._attn_implementation == impl

    # an exception inside a hook, during the forward
    def bad(act, batch_index):
        raise ValueError("boom in hook")

    with pytest.raises(ValueError, match="boom in hook"):
        with torch.no_grad(), lm.trace(read=sites, write={"mlp_out.2": bad}):
            lm.forward(enc)
    assert all_hooks(model) == before
    assert model.config._attn_implementation == impl


@pytest.mark.parametrize("family", MAIN_FAMILIES)
def test_padding_batch_equals_single(tiny_lm, family):
    lm = tiny_lm(family)
    sites = lm.expand_sites(["resid_post.*", "head.1.*", "attn_out.2", "logits"])
    enc, _, tr = run(lm, read=sites)
    assert len(set(enc.lengths)) == 3  # really padded
    for i, text in enumerate(PROMPTS):
        e1, _, t1 = run(lm, texts=[text], read=sites)
        n = enc.lengths[i]
        assert e1.lengths[0] == n
        assert torch.equal(e1.input_ids[0], enc.input_ids[i, :n])
        for s in sites:
            assert _maxdiff(tr[s][i, :n], t1[s][0]) < 1e-4, s


@pytest.mark.parametrize("family", MAIN_FAMILIES)
def test_attention_pattern(tiny_lm, family):
    lm = tiny_lm(family)
    impl = lm.model.config._attn_implementation
    enc, _, tr = run(lm, read=["attn.*", "head.0.0"])
    assert lm.model.config._attn_implementation == impl
    b, s = enc.input_ids.shape
    for layer in range(lm.n_layers):
        p = tr[f"attn.{layer}"]
        assert p.shape == (b, lm.n_heads, s, s)
        for i, n in enumerate(enc.lengths):
            q = p[i, :, :n, :n]
            assert torch.allclose(q.sum(-1), torch.ones_like(q[:, :, 0]), atol=1e-5)
            assert q.triu(1).abs().max() == 0  # causal
            if n < s:
                assert p[i, :, :n, n:].abs().max() == 0  # no attention to padding
    # eager attention gives the same numbers as the default implementation
    _, _, t2 = run(lm, read=["head.0.0"])
    assert _maxdiff(tr["head.0.0"], t2["head.0.0"], enc.attention_mask.bool()) < 1e-5


def test_grad_flows_with_detach_false(tiny_lm):
    lm = tiny_lm("llama")
    enc = lm.encode(PROMPTS[:1])
    leaf = {}

    def grab(act, batch_index):
        leaf["x"] = act.detach().requires_grad_()
        return leaf["x"]

    with lm.trace(read=["resid_post.2"], write={"resid_mid.1": grab}, detach=False) as tr:
        out = lm.forward(enc)
    assert tr["resid_post.2"].requires_grad
    out.logits[0, -1].max().backward()
    assert leaf["x"].grad is not None and leaf["x"].grad.abs().sum() > 0


# --------------------------------------------------------------------------- site names


def test_expand_sites_and_errors(tiny_lm):
    lm = tiny_lm("gpt2")
    assert lm.expand_sites("resid_post.*") == ["resid_post.0", "resid_post.1", "resid_post.2"]
    assert lm.expand_sites("head.1.*") == [f"head.1.{h}" for h in range(4)]
    assert len(lm.expand_sites("head.*.*")) == 12
    assert lm.expand_sites(["logits", "embed", "logits"]) == ["logits", "embed"]
    assert lm.expand_sites("resid_pre.0,attn.2") == ["resid_pre.0", "attn.2"]
    assert lm.expand_sites("head.*.3") == ["head.0.3", "head.1.3", "head.2.3"]
    cases = {
        "resid_post.3": "out of range 0..2",
        "head.0.4": "head 4 out of range 0..3",
        "head.0": "two indices",
        "bogus.1": "unknown site kind",
        "resid_post": "one index",
        "logits.1": "no index",
        "resid_post.x": "not a non-negative integer",
    }
    for site, why in cases.items():
        with pytest.raises(InputError) as e:
            lm.expand_sites(site)
        msg = str(e.value)
        assert why in msg and site in msg
        assert "resid_pre.L" in msg and "head.L.H (H in 0..3" in msg and "L in 0..2" in msg
    with pytest.raises(InputError, match="out of range"):
        lm.trace(read=["head.2.9"])


# --------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_encode_bos_and_padding(tiny_lm, family):
    lm = tiny_lm(family)
    tok = lm.tokenizer
    enc = lm.encode(PROMPTS)
    bos = tok.bos_token_id
    plain = [tok(t, add_special_tokens=False)["input_ids"] for t in PROMPTS]
    assert lm.prepends_bos == (family == "llama")
    for i, ids in enumerate(plain):
        n = enc.lengths[i]
        row = enc.input_ids[i].tolist()
        expect = ([bos] if lm.prepends_bos else []) + ids
        assert row[:n] == expect
        assert all(x == lm.pad_id for x in row[n:])
        assert enc.attention_mask[i].tolist() == [1] * n + [0] * (len(row) - n)
        assert enc.last_index[i].item() == n - 1
        assert len(enc.offsets[i]) == n
    # forcing / suppressing BOS, never doubling it
    forced = lm.encode(PROMPTS[:1], add_bos=True)
    assert forced.input_ids[0, 0].item() == bos and forced.input_ids[0, 1].item() != bos
    none = lm.encode(PROMPTS[:1], add_bos=False)
    assert none.input_ids[0, : none.lengths[0]].tolist() == plain[0]
    literal = lm.encode([tok.bos_token + PROMPTS[0]], add_bos=True)
    assert literal.input_ids[0, 0].item() == bos and literal.input_ids[0, 1].item() != bos
    assert literal.lengths[0] == len(plain[0]) + 1


@pytest.mark.parametrize("family", MAIN_FAMILIES)
def test_span_to_tokens(tiny_lm, family):
    lm = tiny_lm(family)
    text = "the capital of France is Paris"
    enc = lm.encode([text])
    start = text.index("France")
    toks = enc.span_to_tokens(0, start, start + len("France"))
    assert toks
    decoded = lm.tokenizer.decode(enc.input_ids[0, toks[0]: toks[-1] + 1].tolist())
    assert "France" in decoded and "capital" not in decoded and "is" not in decoded.split()
    assert enc.span_last_token(0, start, start + 6) == toks[-1]
    if lm.prepends_bos:
        assert 0 not in enc.span_to_tokens(0, 0, 3)
    with pytest.raises(InputError, match="outside the text"):
        enc.span_to_tokens(0, 5, 500)
    with pytest.raises(InputError, match="covers no token"):
        enc.span_last_token(0, 3, 3)


def test_prompt_too_long(tiny_lm):
    lm = tiny_lm("gpt2")
    long = " ".join(["the capital of France"] * 40)
    with pytest.raises(InputError) as e:
        lm.encode(["a cat", long], names=["p-short", "p-long"])
    msg = str(e.value)
    assert "p-long" in msg and "64" in msg and "context" in msg
    assert "p-short" not in msg
    with pytest.raises(InputError, match="longer than"):
        lm.encode(["the capital of France"], max_length=2)


# --------------------------------------------------------------------------- tokens


def test_token_helpers(tiny_lm):
    lm = tiny_lm("gpt2")
    tok = lm.tokenizer
    assert lm.token_id(" Paris") == tok(" Paris", add_special_tokens=False)["input_ids"][0]
    # a word that is one token only with its leading space
    word = next(w for w in ("France", "Paris", "capital", "answer", "Germany")
                if len(tok(w, add_special_tokens=False)["input_ids"]) > 1
                and len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1)
    with pytest.raises(InputError) as e:
        lm.token_id(word)
    msg = str(e.value)
    assert repr(word) in msg and "tokens" in msg and repr(" " + word) in msg
    with pytest.raises(InputError, match="expected exactly one"):
        lm.token_id(" Paris France")
    with pytest.raises(InputError, match="non-empty"):
        lm.token_id("")
    ids = lm.choice_token_ids([" A", " B"])
    assert len(set(ids)) == 2
    with pytest.raises(InputError) as e:
        lm.choice_token_ids([" A", word, " B C"])
    assert repr(word) in str(e.value) and "' B C'" in str(e.value)
    with pytest.raises(InputError, match="share"):
        lm.choice_token_ids([" A", " A"])
    with pytest.raises(InputError, match="share the first token"):
        lm.choice_token_ids([" Paris France", " Paris"], first_token=True)
    assert lm.choice_token_ids([" Paris France", " Rome"], first_token=True) == [
        lm.token_id(" Paris"), lm.token_id(" Rome")]


# --------------------------------------------------------------------------- stepping


@pytest.mark.parametrize("family", MAIN_FAMILIES + EXTRA_FAMILIES)
def test_run_from_layer_equals_full_forward(tiny_lm, family):
    lm = tiny_lm(family)
    sites = lm.expand_sites(["resid_pre.*", f"resid_post.{lm.n_layers - 1}"])
    enc, out, tr = run(lm, read=sites)
    m = enc.attention_mask.bool()
    ctx = lm.layer_context(enc.attention_mask)
    rows = torch.arange(len(enc))
    with torch.no_grad():
        for layer in range(lm.n_layers + 1):
            h = tr[f"resid_pre.{layer}"] if layer < lm.n_layers else tr[
                f"resid_post.{lm.n_layers - 1}"]
            full = lm.run_from_layer(h, layer, enc.attention_mask)
            assert _maxdiff(full, out.logits, m) < 1e-5
            last = lm.run_from_layer(h, layer, context=ctx, positions=enc.last_index)
            assert last.shape == (len(enc), lm.d_vocab)
            assert _maxdiff(last, out.logits[rows, enc.last_index]) < 1e-5
            two = lm.run_from_layer(h, layer, context=ctx,
                                    positions=torch.stack([enc.last_index, enc.last_index * 0], 1))
            assert _maxdiff(two[:, 0], last) < 1e-6


@pytest.mark.parametrize("family", MAIN_FAMILIES)
def test_run_from_layer_patching_matches_full_patch(tiny_lm, family):
    """Patching resid_pre.L at one position: stepping from L == a full patched forward."""
    lm = tiny_lm(family)
    clean = lm.encode(["the capital of France is Paris"])
    corrupt = lm.encode(["the capital of Italy is Rome"])
    assert clean.input_ids.shape == corrupt.input_ids.shape
    text = clean.texts[0]
    layer = 1
    pos = clean.span_last_token(0, text.index("France"), text.index("France") + 6)
    _, _, ct = run(lm, texts=clean.texts, read=["resid_pre.1"])
    _, _, rt = run(lm, texts=corrupt.texts, read=["resid_pre.1", "resid_post.2"])

    assert not torch.equal(ct["resid_pre.1"][:, pos], rt["resid_pre.1"][:, pos])

    def patch(act, batch_index):
        act = act.clone()
        act[:, pos] = ct["resid_pre.1"][:, pos]
        return act

    _, full, _ = run(lm, texts=corrupt.texts, write={"resid_pre.1": patch})
    h = patch(rt["resid_pre.1"], None)
    with torch.no_grad():
        stepped = lm.run_from_layer(h, layer, corrupt.attention_mask,
                                    positions=corrupt.last_index)
        via_write = lm.run_from_layer(rt["resid_pre.1"], layer, corrupt.attention_mask,
                                      write={"resid_pre.1": patch})
        with lm.trace(read=["resid_post.2"]) as tr:
            lm.run_from_layer(h, layer, corrupt.attention_mask)
    assert _maxdiff(stepped[0], full.logits[0, corrupt.last_index[0]]) < 1e-5
    assert _maxdiff(via_write, full.logits) < 1e-5
    assert "resid_post.2" in tr and not torch.equal(tr["resid_post.2"], rt["resid_post.2"])


def test_run_from_layer_context_follows_attention_implementation(tiny_lm):
    lm = tiny_lm("llama")
    enc, out, tr = run(lm, read=["resid_pre.1"])
    ctx = lm.layer_context(enc.attention_mask)
    with torch.no_grad(), lm.trace(read=["attn.2"]) as t2:
        logits = lm.run_from_layer(tr["resid_pre.1"], 1, context=ctx)
    assert t2["attn.2"].shape[1] == lm.n_heads
    assert _maxdiff(logits, out.logits, enc.attention_mask.bool()) < 1e-5
    with pytest.raises(InputError, match="start_layer"):
        lm.run_from_layer(tr["resid_pre.1"], 4, enc.attention_mask)
    with pytest.raises(InputError, match="shape"):
        lm.run_from_layer(tr["resid_pre.1"][:1], 1, context=ctx)
    with pytest.raises(KeyError, match="not reached"):
        with lm.trace(read=["resid_pre.0"]) as t3:
            lm.run_from_layer(tr["resid_pre.1"], 1, context=ctx)
        t3["resid_pre.0"]


# --------------------------------------------------------------------------- batching


def test_run_batched_backs_off_on_oom():
    from dolm.models import is_oom, iter_batched, run_batched

    calls = []

    def fn(i, j):
        calls.append(j - i)
        if j - i > 3:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: "
                               "not enough memory: you tried to allocate 123 bytes.")
        return list(range(i, j))

    out = run_batched(20, fn, "auto", max_batch_size=16)
    assert [x for r in out for x in r] == list(range(20))
    assert calls[:3] == [16, 8, 4] and set(calls[3:]) <= {3, 2}
    sizes = []
    calls.clear()
    res = list(iter_batched(10, fn, 8, on_backoff=sizes.append))
    assert sizes == [4, 2] and res[0][:2] == (0, 2)

    def cuda_oom(i, j):
        if j - i > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return i

    assert run_batched(3, cuda_oom, "auto") == [0, 1, 2]
    assert is_oom(torch.OutOfMemoryError("x")) and not is_oom(ValueError("out of memory"))

    def always(i, j):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(DolmRuntimeError, match="batch size 1"):
        run_batched(4, always, 4)

    def other(i, j):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_batched(4, other, "auto")
    with pytest.raises(InputError, match="batch-size"):
        run_batched(4, fn, 0)
    with pytest.raises(InputError, match="batch-size"):
        run_batched(4, fn, "many")
    assert run_batched(0, fn, "auto") == []


def test_pad_right_pads_after_the_tokens():
    from dolm.models import pad_right

    ids, mask = pad_right([[5, 6, 7], [8], (9, 10)], pad_id=0)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
