"""CUDA-only checks (skipped without a GPU): half precision, 4-bit/8-bit bitsandbytes and
``device_map="auto"`` on the GPU keep the site vocabulary's invariants and the logits.

CI has no GPU; these ran on a lent H100 (see BENCHMARKS.md, "GPU checks").
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TEXTS = ["the cat sat on the mat", "a dog ran", "the bird flew over the house today"]
FAMILIES = ["gpt2", "gpt_neox", "llama", "qwen2"]


def _run(lm, read=(), write=None):
    enc = lm.encode(TEXTS)
    with lm.trace(read=read, write=write) as tr:
        out = lm.model(input_ids=enc.input_ids.to(lm.device),
                       attention_mask=enc.attention_mask.to(lm.device), use_cache=False)
    return enc, out, tr


def _sites(lm, layer=1):
    return [f"resid_pre.{layer}", f"attn_out.{layer}", f"resid_mid.{layer}",
            f"mlp_out.{layer}", f"resid_post.{layer}"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["fp32", "fp16", "device_map", "4bit", "8bit"])
def test_cuda_loading_keeps_invariants(tiny_model_dir, family, mode):
    from dolm.models import load

    path = str(tiny_model_dir(family))
    ref = load(path, device="cpu", dtype="float32")
    kw = {
        "fp32": dict(device="cuda", dtype="float32"),
        "fp16": dict(device="cuda", dtype="float16"),
        "device_map": dict(device_map="auto"),
        "4bit": dict(device_map="auto", load_in_4bit=True),
        "8bit": dict(device_map="auto", load_in_8bit=True),
    }[mode]
    if mode in ("4bit", "8bit"):
        pytest.importorskip("bitsandbytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = load(path, **kw)
    assert lm.device.type == "cuda"
    enc, out, tr = _run(lm, read=_sites(lm))
    _, ref_out, _ = _run(ref)
    m = enc.attention_mask.bool().cpu()
    q = out.logits.float().cpu()[m].flatten()
    r = ref_out.logits.float()[m].flatten()
    assert torch.isfinite(q).all()
    if mode in ("fp32", "device_map"):
        assert (q - r).abs().max() < 1e-4
    else:
        assert torch.corrcoef(torch.stack([q, r]))[0, 1] > (0.9 if mode == "4bit" else 0.99)
    pre, attn, mid = tr["resid_pre.1"], tr["attn_out.1"], tr["resid_mid.1"]
    assert torch.equal(mid, pre + attn)
    if not lm.parallel_residual:
        tol = 1e-5 if mode in ("fp32", "device_map") else 1e-2
        assert (tr["resid_post.1"].float() - (mid + tr["mlp_out.1"]).float()).abs().max() < tol
    # a write downstream changes the logits; the clean run is unchanged afterwards
    _, patched, _ = _run(lm, write={"resid_post.0": lambda a, b: a * 0})
    assert not torch.allclose(patched.logits, out.logits)
    _, again, _ = _run(lm)
    assert torch.equal(again.logits, out.logits)
    # run_from_layer equals the full forward on the GPU as loaded
    logits = lm.run_from_layer(tr["resid_pre.1"], 1, enc.attention_mask.to(lm.device))
    diff = (logits.float().cpu() - out.logits.float().cpu())[m].abs().max()
    assert diff < (1e-4 if mode in ("fp32", "device_map") else 5e-2)


# One architecture per layout beyond the named rows: post-norm + soft-cap (Gemma 2),
# parallel with an in-place add (Falcon), MoE (Mixtral), state-space (Mamba). Built tiny
# by the census; the identities of dolm.models.verify must hold as loaded on the GPU.
LAYOUTS = ["gemma2", "falcon", "mixtral", "mamba"]


@pytest.fixture(scope="module")
def census_model(tmp_path_factory):
    from dolm.models import census

    built = {}

    def get(model_type):
        if model_type not in built:
            built[model_type] = census.build(model_type,
                                             tmp_path_factory.mktemp("gpu") / model_type)
        return built[model_type]

    return get


@pytest.mark.parametrize("model_type", LAYOUTS)
@pytest.mark.parametrize("mode", ["fp16", "device_map", "4bit"])
def test_cuda_layouts_keep_identities(census_model, model_type, mode):
    from dolm.models import load
    from dolm.models.verify import verify

    kw = {
        "fp16": dict(device="cuda", dtype="float16"),
        "device_map": dict(device_map="auto"),
        "4bit": dict(device_map="auto", load_in_4bit=True),
    }[mode]
    if mode == "4bit":
        pytest.importorskip("bitsandbytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = load(str(census_model(model_type)), verify=False, **kw)
    failed = [(c.name, c.detail) for c in verify(lm) if not c.ok]
    assert not failed, failed
