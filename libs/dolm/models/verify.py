"""Verify, then trust: the identities an adapter row must satisfy on a model before dolm
serves it.

On one short batch of two prompts of different lengths (so padding is exercised):

=======================  ==============================================================
identity                 what is compared
=======================  ==============================================================
``resid_pre.0``          ``resid_pre.0`` = the model's ``hidden_states[0]``
``hidden_states``        ``resid_post.L`` = ``hidden_states[L+1]`` (the last one, or its
                         final norm, as the model reports it)
``blocks chain``         ``resid_post.L`` = ``resid_pre.(L+1)``
``residual sum``         ``resid_post.L`` = ``resid_pre.L + attn_out.L + mlp_out.L``
                         (``+ mixer_out.L`` on state-space blocks)
``heads``                the output projection applied to the heads (``head.L.*``) is the
                         attention's output (before a post-norm or multiplier)
``mlp input``            writing ``attn_out.0`` changes ``mlp_out.0`` exactly when the
                         block is sequential (the MLP reads ``resid_mid``), not parallel
``final_norm``           the final norm of ``resid_post.(n-1)`` = the ``final_norm`` site
``logits``               the ``logits`` site, and the unembedding of ``final_norm`` (with
                         the row's multipliers/caps), equal the model's logits
``run_from_layer``       stepping from ``resid_pre.L`` (L = 0, middle, n) = full forward
``identity writes``      writing every site with ``x -> x`` leaves the logits unchanged
``padding``              each prompt alone = its row of the padded batch
=======================  ==============================================================

A verdict is cached per installation (``$DOLM_CACHE_DIR/verified.json``, default
``~/.cache/dolm``) keyed by the transformers version, the model type and the adapter
row, so the check runs once; a failure is never cached. A failed identity is an
:class:`~dolm.errors.InputError` naming it (exit 3). ``dolm-validate --model X`` runs
the check on request (:func:`verify`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from dolm.errors import InputError

TEXTS = ("the capital of France is Paris and the river", "a cat sat")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


def _cache_path():
    from dolm.models.loading import _cache_file

    return _cache_file().with_name("verified.json")


def cache_key(lm) -> str:
    import transformers

    row = hashlib.sha256(repr(lm.adapter.spec).encode()).hexdigest()[:16]
    return f"{transformers.__version__}|{lm.info.get('model_type')}|{lm.adapter.describe()}|{row}"


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(key: str) -> None:
    from dolm.models.loading import write_cache_json

    data = _read_cache()
    data[key] = "verified"
    write_cache_json(_cache_path(), data)


def ensure_verified(lm, where: str = "") -> None:
    """Run :func:`verify` unless this (transformers, model_type, row) passed before."""
    key = cache_key(lm)
    if _read_cache().get(key) == "verified":
        return
    checks = verify(lm)
    failed = [c for c in checks if not c.ok]
    if failed:
        raise InputError(failure_message(lm, failed, where))
    _write_cache(key)


def failure_message(lm, failed, where: str = "") -> str:
    pre = f"{where}: " if where else ""
    first = failed[0]
    more = f" (and {len(failed) - 1} more: {', '.join(c.name for c in failed[1:])})" \
        if len(failed) > 1 else ""
    return (f"{pre}dolm cannot serve model_type {lm.info.get('model_type')!r} with adapter "
            f"{lm.adapter.name!r} ({lm.adapter.describe()}): identity '{first.name}' fails: "
            f"{first.detail}{more}")


def verify(lm, texts=TEXTS) -> list[Check]:
    """Every identity (see the module docstring) on ``lm``; a list of :class:`Check`."""
    import torch

    checks: list[Check] = []
    try:
        with torch.no_grad():
            _verify(lm, list(texts), checks)
    except Exception as exc:  # an identity that cannot even be computed fails
        msg = str(exc).strip().splitlines()
        checks.append(Check("forward with dolm's hooks", False,
                            f"{type(exc).__name__}: {msg[0][:200] if msg else ''}"))
    return checks


def _verify(lm, texts, checks):
    import torch

    ad = lm.adapter
    n = lm.n_layers
    tol = 1e-4 if lm.dtype == torch.float32 else 3e-2
    enc = lm.encode(texts)
    mask = enc.attention_mask.bool()

    def rel(a, b, m=mask):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        if m is not None and a.dim() >= 2 and a.shape[:2] == m.shape:
            a, b = a[m.cpu()], b[m.cpu()]
        return float((a - b).norm() / (b.norm() + 1e-6))

    def check(name, a, b, m=mask):
        if a is None or b is None:
            checks.append(Check(name, False, "no value"))
            return
        if a.shape != b.shape:
            checks.append(Check(name, False, f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"))
            return
        err = rel(a, b, m)
        checks.append(Check(name, err <= tol, f"relative error {err:.2e} (tolerance {tol:.0e})"))

    ssm = ad.spec.mixer is not None
    parts = ["mixer_out"] if ssm else ["attn_out", "mlp_out", "resid_mid"]
    reads = ["embed", "resid_pre.*", "resid_post.*", "final_norm", "logits"]
    reads += [f"{p}.*" for p in parts]
    heads = not ssm and "head" not in ad.unavailable and lm.n_heads > 0
    if heads:
        reads.append("head.*.*")
    raw: dict[int, tuple] = {}
    handles = []
    if heads:
        for layer in range(n):
            handles.append(ad.block_module(layer, "attn").register_forward_hook(
                lambda m, a, o, layer=layer: raw.__setitem__(("a", layer), o)))
    try:
        with lm.trace(read=reads) as tr:
            out = lm.forward(enc, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    logits = out.logits
    hs = getattr(out, "hidden_states", None)
    if hs is not None and len(hs) == n + 1:
        # hidden_states[0] is the embedding output (most models) or, in some (Mamba),
        # the first block's output, with the final-normed state last either way
        shift = 0 if rel(tr["resid_pre.0"], hs[0]) <= tol else 1
        if shift == 0:
            check("resid_pre.0 = hidden_states[0]", tr["resid_pre.0"], hs[0])
        for layer in range(n - 1 + shift):
            check(f"resid_post.{layer} = hidden_states[{layer + 1 - shift}]",
                  tr[f"resid_post.{layer}"], hs[layer + 1 - shift])
        last = tr[f"resid_post.{n - 1}"]
        normed = ad.final_norm(last)
        err = min(rel(last, hs[n]), rel(normed, hs[n]))
        checks.append(Check(f"resid_post.{n - 1} (or its final norm) = hidden_states[{n}]",
                            err <= tol, f"relative error {err:.2e}"))
    for layer in range(n - 1):
        check(f"resid_post.{layer} = resid_pre.{layer + 1}", tr[f"resid_post.{layer}"],
              tr[f"resid_pre.{layer + 1}"])
    for layer in range(n):
        pre, post = tr[f"resid_pre.{layer}"], tr[f"resid_post.{layer}"]
        if ssm:
            check(f"resid_post.{layer} = resid_pre + mixer_out", pre + tr[f"mixer_out.{layer}"],
                  post)
        else:
            check(f"resid_post.{layer} = resid_pre + attn_out + mlp_out",
                  pre + tr[f"attn_out.{layer}"] + tr[f"mlp_out.{layer}"], post)
        if heads:
            a = raw.get(("a", layer))
            a = a if a is None or isinstance(a, torch.Tensor) else a[0]
            width = lm.n_heads * lm.d_head
            hv = torch.cat([tr[f"head.{layer}.{h}"] for h in range(lm.n_heads)], dim=-1)
            proj = ad.block_module(layer, "attn_o")
            if hv.shape[-1] != width:
                checks.append(Check(f"heads of layer {layer}", False,
                                    f"heads are {hv.shape[-1]} wide, expected {width}"))
            elif "attn" in ad.spec.residual_inside:
                site = tr[f"attn_out.{layer}"]
                scale = ad.residual_scale or 1.0
                check(f"head.{layer}.* through the output projection = attn_out.{layer}",
                      proj(hv), site / scale)
            else:
                check(f"head.{layer}.* through the output projection = attention output",
                      proj(hv), a)
    check("final_norm = final norm of the last resid_post",
          ad.final_norm(tr[f"resid_post.{n - 1}"]), tr["final_norm"])
    check("logits site = model logits", tr["logits"], logits)
    check("logits = unembedding of final_norm", ad.logits_from_final_norm(tr["final_norm"]),
          logits)
    ctx = lm.layer_context(enc.attention_mask)
    for layer in sorted({0, n // 2, n}):
        h = tr[f"resid_pre.{layer}"] if layer < n else tr[f"resid_post.{n - 1}"]
        check(f"run_from_layer({layer}) = full forward", lm.run_from_layer(h, layer, context=ctx),
              logits)
    if not ssm:
        g = torch.Generator().manual_seed(0)

        def noise(a, b):
            return a + torch.randn(a.shape, generator=g, dtype=torch.float32).to(a) * (
                a.float().std() + 1e-3)

        with lm.trace(read=["mlp_out.0"], write={"attn_out.0": noise}) as t2:
            lm.forward(enc)
        moved = rel(t2["mlp_out.0"], tr["mlp_out.0"]) > tol
        want = not ad.parallel
        checks.append(Check(
            "mlp input (sequential: writing attn_out.0 moves mlp_out.0; parallel: it does not)",
            moved == want, f"the row says {'parallel' if ad.parallel else 'sequential'}, "
            f"the model {'moved' if moved else 'did not move'} mlp_out.0"))
    same = [s for s in lm.expand_sites(reads) if not s.startswith("head")]

    def ident(a, b):
        return a + 0

    with lm.trace(write={s: ident for s in same}):
        again = lm.forward(enc).logits
    check("identity writes leave the logits unchanged", again, logits)
    for i, text in enumerate(texts):
        one = lm.encode([text])
        single = lm.forward(one).logits[0]
        k = enc.lengths[i]
        check(f"padding: prompt {i} alone = its padded row", logits[i, :k], single[:k], None)


def validate_model(spec: str, quiet: bool = False, echo=None) -> int:
    """``dolm-validate --model SPEC``: load without the cached verdict, run every
    identity, print one line each (failures always); 0 when all hold, else 3."""
    import sys

    from dolm.models.loading import load

    echo = echo or (lambda text: print(text, file=sys.stderr))
    lm = load(spec, verify=False)
    checks = verify(lm)
    failed = [c for c in checks if not c.ok]
    for c in checks:
        if not c.ok or not quiet:
            echo(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    if failed:
        echo(f"dolm-validate: error: {failure_message(lm, failed, f'--model {spec!r}')}")
        return 3
    _write_cache(cache_key(lm))
    print(f"--model {spec}: ok ({lm.info.get('model_type')}, adapter {lm.adapter.name}: "
          f"{lm.adapter.describe()}; {len(checks)} identities hold)")
    return 0
