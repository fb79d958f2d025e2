"""Direct logit attribution at the final position.

The residual stream at the last prompt token, ``x = resid_post.<n_layers-1>``, is a sum of
components: the token embedding (``embed``), the position embedding (``pos_embed``, models
with learned absolute positions: ``resid_pre.0 - embed``; otherwise ``embed`` is all of
``resid_pre.0``), and each layer's attention output ``attn.L`` (``attn_out.L``) and MLP
output ``mlp.L`` (``mlp_out.L``). ``attn.L`` splits further into heads, ``head.L.H`` (the
head's slice of the output projection's input, through the projection), plus the
projection's bias ``attn_bias.L``.

The final norm is linearised with its scale ``s`` cached from the actual run::

    LayerNorm (GPT-2, GPT-NeoX):  N(x) = g * (x - mean(x)) / s + b,  s = sqrt(var(x) + eps)
    RMSNorm (Llama, Qwen2, ...):  N(x) = g * x / s,                   s = sqrt(mean(x^2) + eps)

so that each component ``c`` contributes ``(P(c) / s) . (g * u)`` to the metric, where P
centres for LayerNorm and ``u`` is the unembedding direction: ``W_U[target]`` (metric
``logit``) or ``W_U[target] - W_U[foil]`` (metric ``logit_diff``). The bias terms are
``b . u`` (``bias.final_norm``) and the unembedding bias (``bias.unembed``, when the model
has one). The components with ``in_total`` (embed, pos_embed, attn.L, mlp.L, bias.*) sum
to the model's own logit (difference), given as ``metric_value``.

Logit multipliers (Cohere ``logit_scale``, Granite and MiniCPM3 ``logits_scaling``) are
folded into ``u``, so the sum is still the model's logit. A final soft-cap (Gemma 2:
``cap * tanh(z / cap)``) is not linear: there the attributions and ``metric_value`` are of
the pre-cap logits ``z`` (what TransformerLens's ``cache.logit_attrs`` attributes; the cap
is monotone, so ranks are those of ``z``); the file's ``extra.logits`` says which. A norm
after the attention output (Gemma 2/3, OLMo 2) is linearised by its cached scale like the
final norm, so ``head.L.H`` still sum (with ``attn_bias.L``) to ``attn.L``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from dolm.errors import DolmRuntimeError, InputError
from dolm.metrics import is_missing
from dolm.tokens import TokenIds

SCHEMA = "attributions"


# ------------------------------------------------------------------ final norm


@dataclass
class NormLinear:
    """The final norm as ``g * P(x) / s + b`` (P centres when ``centre``)."""

    gamma: torch.Tensor  # (d,) float64
    beta: torch.Tensor  # (d,) float64
    eps: float
    centre: bool
    name: str

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d) float64 -> (B,) the norm's scale s."""
        if self.centre:
            v = x.var(dim=-1, unbiased=False)
        else:
            v = x.pow(2).mean(dim=-1)
        return torch.sqrt(v + self.eps)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=-1, keepdim=True) if self.centre else x

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The norm itself, (..., d) float64."""
        return self.gamma * self.project(x) / self.scale(x)[..., None] + self.beta


def norm_linear(lm: Any, m: Any = None) -> NormLinear:
    """Read a norm's parameters: the final norm by default, or ``m`` (a post-attention norm).

    Whether it centres (LayerNorm, Cohere's bias-free LayerNorm) or not (RMSNorm, T5-style
    norms), and whether it scales by ``w`` or ``1 + w`` (Gemma), is found by running the
    module on a probe input and keeping the form that reproduces it; no form does -> a
    :class:`DolmRuntimeError` (dolm-dla does not know this norm).
    """
    final = m is None
    m = lm.adapter.final_norm if final else m
    d = lm.d_model
    cls = type(m).__name__
    what = "final norm" if final else "post-attention norm"
    weight = getattr(m, "weight", None)
    bias = getattr(m, "bias", None)
    eps = getattr(m, "eps", None)
    if eps is None:
        eps = getattr(m, "variance_epsilon", None)
    if eps is None:
        raise DolmRuntimeError(f"{what} {cls}: no eps/variance_epsilon attribute; "
                               "dolm-dla cannot linearise it")
    w = torch.ones(d, dtype=torch.float64) if weight is None else \
        weight.detach().to("cpu", torch.float64).reshape(-1)
    b = torch.zeros(d, dtype=torch.float64) if bias is None else \
        bias.detach().to("cpu", torch.float64).reshape(-1)
    if w.shape != (d,) or b.shape != (d,):
        raise DolmRuntimeError(f"{what} {cls}: parameters of shape {tuple(w.shape)}, "
                               f"expected ({d},)")
    ref = weight if weight is not None else next(m.parameters(), None)
    dev = ref.device if ref is not None else "cpu"
    dtype = ref.dtype if ref is not None and ref.dtype.is_floating_point else torch.float32
    x = 2.0 * torch.randn(4, d, generator=torch.Generator().manual_seed(0),
                          dtype=torch.float64) + 1.5
    with torch.no_grad():
        y = m(x.to(dev, dtype)[None]).to("cpu", torch.float64)[0]
    best = None
    for centre in (True, False):
        for g in (w, 1.0 + w):
            cand = NormLinear(gamma=g, beta=b,
                              eps=float(eps), centre=centre, name=cls)
            err = float((cand.apply(x) - y).norm() / y.norm().clamp_min(1e-12))
            if best is None or err < best[0]:
                best = (err, cand)
    if best[0] > (1e-3 if dtype in (torch.float32, torch.float64) else 5e-2):
        raise DolmRuntimeError(f"{what} {cls}: neither a LayerNorm nor an RMSNorm of its "
                               f"weight (relative error {best[0]:.2e}); dolm-dla cannot "
                               "linearise it")
    return best[1]


def final_norm_linear(lm: Any) -> NormLinear:
    """The final norm as a :class:`NormLinear`."""
    return norm_linear(lm)


@dataclass
class LogitMap:
    """What the unembedding's output goes through before it is the model's logits.

    ``pre`` multiplies the final norm's output (MiniCPM3 ``/ logits_scaling``), ``post`` the
    unembedding's output (Cohere ``logit_scale``, Granite ``/ logits_scaling``); both are
    folded into the attributions, so they still sum to the model's logits. ``softcap`` (Gemma
    2: ``cap * tanh(z / cap)``) is not linear: the attributions and ``metric_value`` are then
    those of the pre-cap logits ``z``, as TransformerLens's ``logit_attrs`` gives them (the
    cap is monotone, so the target's rank is that of ``z``).
    """

    pre: float = 1.0
    post: float = 1.0
    softcap: float | None = None

    def describe(self) -> str:
        parts = [f"x {v:g} {w}" for v, w in ((self.pre, "before the unembedding"),
                                             (self.post, "after it")) if v != 1.0]
        if self.softcap is not None:
            parts.append(f"pre-soft-cap logits (the model caps them at {self.softcap:g})")
        return "; ".join(parts) or "the unembedding's output"


def _factor(ops: tuple, where: str, model_type: Any) -> float:
    k = 1.0
    for op, val in ops:
        if op not in ("mul", "div"):
            raise InputError(f"--model: {model_type} applies {op} {val:g} {where} the "
                             "unembedding; dolm-dla attributes logits linearly and does not "
                             "serve it")
        k = k * val if op == "mul" else k / val
    return k


def logit_map(lm: Any) -> LogitMap:
    """The adapter's logit operations as a :class:`LogitMap`; InputError when they are not
    linear multipliers followed by at most one final soft-cap."""
    ad = lm.adapter
    mt = lm.info.get("model_type")
    ops = list(ad.logit_ops)
    cap = None
    if ops and ops[-1][0] == "softcap":
        cap = float(ops.pop()[1])
    return LogitMap(pre=_factor(ad.pre_unembed, "before", mt),
                    post=_factor(tuple(ops), "after", mt), softcap=cap)


def check_decomposable(lm: Any, heads: bool) -> LogitMap:
    """The model's :class:`LogitMap`; InputError when its logits are not linear in the
    components up to a final soft-cap, or (``heads``) when a post-attention norm stands
    between the heads and the residual stream that is not a (Layer/RMS) norm dolm-dla can
    linearise by its cached scale."""
    ad = lm.adapter
    lmap = logit_map(lm)
    if heads and ad.spec.post_attn_norm:
        try:
            norm_linear(lm, ad.block_module(0, "post_attn_norm"))
        except DolmRuntimeError as e:
            raise InputError(
                f"--heads: {lm.info.get('model_type')} normalises the attention output after "
                f"the heads are summed, and {e}; run without --heads") from None
    return lmap


def unembed_matrix(lm: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W_U as (vocab, d) on its device, bias or None)."""
    m = lm.adapter.unembed
    w = getattr(m, "weight", None)
    if w is None or w.dim() != 2 or w.shape[1] != lm.d_model or not w.dtype.is_floating_point:
        raise DolmRuntimeError(
            f"unembedding {type(m).__name__}: expected a (vocab, {lm.d_model}) floating-point "
            "weight; direct logit attribution needs an unquantised unembedding")
    b = getattr(m, "bias", None)
    return w.detach(), (None if b is None else b.detach())


# ------------------------------------------------------------------ tokens


@dataclass
class Request:
    """Per prompt: target id, foil id (or None), the two choice ids (or None)."""

    target: list[int]
    foil: list[int | None]
    choices: list[tuple[int, int] | None]
    target_str: list[str]
    foil_str: list[str | None]
    metric: str


def resolve(lm: Any, df: Any, path: str, *, metric: str, target: str | None,
            foil: str | None, first_token: bool) -> Request:
    """Token ids for each prompt; named InputErrors for what cannot be attributed."""
    one = TokenIds(lm, first_token)
    t_ids, f_ids, c_ids, t_str, f_str = [], [], [], [], []
    missing_t, missing_f = [], []
    has_choices = "choices" in df.columns
    for row in df.itertuples(index=False):
        pid = str(row.prompt_id)
        t, tid = one.cell(row, "target", target, path)
        if tid is None:
            missing_t.append(pid)
        t_ids.append(-1 if tid is None else tid)
        t_str.append(t or "")
        ch = getattr(row, "choices", None) if has_choices else None
        pair = None
        if not is_missing(ch) and ch is not None and len(ch) == 2:
            a = one(str(ch[0]), f"{path}: prompt {pid}, column 'choices'")
            b = one(str(ch[1]), f"{path}: prompt {pid}, column 'choices'")
            if a == b:
                raise InputError(f"{path}: prompt {pid}, column 'choices': {ch[0]!r} and "
                                 f"{ch[1]!r} are the same token")
            pair = (a, b)
        c_ids.append(pair)
        f, fid = one.cell(row, "foil", foil, path)
        if fid is None and pair is not None and t_ids[-1] in pair:
            # two choices and the target among them: the foil is the other one
            fid = pair[1] if t_ids[-1] == pair[0] else pair[0]
            f = str(ch[1] if fid == pair[1] else ch[0])
        if fid is None:
            missing_f.append(pid)
        f_ids.append(fid)
        f_str.append(None if fid is None else str(f))
    if missing_t:
        raise InputError(
            f"{path}: {len(missing_t)} prompt(s) without a target (column 'target' is null: "
            f"{', '.join(missing_t[:5])}{' ...' if len(missing_t) > 5 else ''}); "
            "pass --target TOKEN")
    if metric == "auto":
        metric = "logit_diff" if not missing_f else "logit"
    if metric == "logit_diff":
        if missing_f:
            raise InputError(
                f"{path}: --metric logit_diff needs a foil, but {len(missing_f)} prompt(s) have "
                f"none (column 'foil' is null and no two choices name it: "
                f"{', '.join(missing_f[:5])}{' ...' if len(missing_f) > 5 else ''}); "
                "pass --foil TOKEN or --metric logit")
        for pid, t, f in zip(df["prompt_id"].astype(str), t_ids, f_ids, strict=True):
            if t == f:
                raise InputError(f"{path}: prompt {pid}: target and foil are the same token")
    else:
        f_ids, f_str = [None] * len(t_ids), [None] * len(t_ids)
    return Request(target=t_ids, foil=f_ids, choices=c_ids, target_str=t_str, foil_str=f_str,
                   metric=metric)


# ------------------------------------------------------------------ attribution


def _component_names(lm: Any, heads: bool) -> list[tuple[str, str, int | None, int | None, bool]]:
    """(component, kind, layer, head, in_total) in table order."""
    out = [("embed", "embed", None, None, True)]
    if lm.adapter.pos_embed is not None:
        out.append(("pos_embed", "pos_embed", None, None, True))
    for layer in range(lm.n_layers):
        out.append((f"attn.{layer}", "attn", layer, None, True))
        if heads:
            for h in range(lm.n_heads):
                out.append((f"head.{layer}.{h}", "head", layer, h, False))
            out.append((f"attn_bias.{layer}", "attn_bias", layer, None, False))
        out.append((f"mlp.{layer}", "mlp", layer, None, True))
    out.append(("bias.final_norm", "bias", None, None, True))
    if getattr(lm.adapter.unembed, "bias", None) is not None:
        out.append(("bias.unembed", "bias", None, None, True))
    return out


def _head_outputs(lm: Any, layer: int, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's contribution through the output projection, and the projection's bias.

    ``z`` (B, n_heads * d_head) is the projection's input at the final position. Computed by
    calling the projection on inputs with all heads but one zeroed (works for any linear
    module type), minus its output on zeros (the bias).
    """
    o_proj = lm.adapter.block_module(layer, "attn_o")
    n_h = lm.n_heads
    bsz, width = z.shape
    dh = width // n_h
    masked = torch.zeros(bsz, n_h, n_h, dh, dtype=z.dtype, device=z.device)
    zv = z.reshape(bsz, n_h, dh)
    idx = torch.arange(n_h, device=z.device)
    masked[:, idx, idx, :] = zv
    with torch.no_grad():
        per_head = o_proj(masked.reshape(bsz, n_h, width))
        bias = o_proj(torch.zeros(1, 1, width, dtype=z.dtype, device=z.device))[0, 0]
    return per_head - bias, bias


def _heads_to_residual(lm: Any, layer: int, per_head: torch.Tensor, bias: torch.Tensor,
                       attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's part of ``attn_out.L`` (float64), and the rest (``attn_bias.L``).

    A post-attention norm (Gemma 2/3, OLMo 2) is linearised by its scale on the summed
    output, as the final norm is: head h contributes ``g * P(o_h) / s`` and the bias part is
    ``g * P(b) / s + beta``; a residual multiplier (Granite) scales both. The parts must add
    up to the ``attn_out.L`` read (``attn``), or dolm-dla refuses the model.
    """
    ad = lm.adapter
    ph = per_head.detach().to("cpu", torch.float64)  # (B, H, d)
    bp = bias.detach().to("cpu", torch.float64).expand(ph.shape[0], -1)  # (B, d)
    if ad.spec.post_attn_norm:
        pn = norm_linear(lm, ad.block_module(layer, "post_attn_norm"))
        s = pn.scale(ph.sum(1) + bp)[:, None]  # the norm's input is the projection's output
        ph = pn.gamma * pn.project(ph) / s[:, None]
        bp = pn.gamma * pn.project(bp) / s + pn.beta
    if ad.residual_scale is not None:
        ph, bp = ph * ad.residual_scale, bp * ad.residual_scale
    err = float(((ph.sum(1) + bp - attn).norm(dim=-1) /
                 attn.norm(dim=-1).clamp_min(1e-12)).max())
    if err > (1e-3 if lm.dtype == torch.float32 else 5e-2):
        raise DolmRuntimeError(
            f"layer {layer}: the heads do not add up to attn_out.{layer} for this model "
            f"({lm.adapter.name}; relative error {err:.2e}); run dolm-dla with --no-heads")
    return ph, bp


def dla_batch(lm: Any, enc: Any, req: Request, rows: list[int], heads: bool,
              norm: NormLinear, w_u: torch.Tensor, b_u: torch.Tensor | None,
              lmap: LogitMap | None = None) -> dict:
    """Attributions for one batch: (B, n_components) values, metric values, scales.
    ``lmap``: the model's logit multipliers and soft-cap (default: :func:`logit_map`)."""
    lmap = logit_map(lm) if lmap is None else lmap
    n = lm.n_layers
    has_pos = lm.adapter.pos_embed is not None
    reads = ["resid_pre.0", f"resid_post.{n - 1}", "final_norm", "attn_out.*", "mlp_out.*"]
    if has_pos:
        reads.append("embed")
    if heads:
        reads.append("head.*.*")
    with torch.no_grad(), lm.trace(read=reads) as tr:
        out = lm.forward(enc)
    last = enc.last_index
    bidx = torch.arange(len(enc), device=last.device)

    def at(site: str) -> torch.Tensor:
        t = tr[site]
        return t[bidx.to(t.device), last.to(t.device)]

    def f64(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float64)

    comps: list[torch.Tensor] = []
    pre0 = f64(at("resid_pre.0"))
    if has_pos:
        emb = f64(at("embed"))
        comps += [emb, pre0 - emb]
    else:
        comps.append(pre0)
    attn_total = torch.zeros_like(pre0)
    mlp_total = torch.zeros_like(pre0)
    attn_parts, mlp_parts = [], []
    for layer in range(n):
        a = f64(at(f"attn_out.{layer}"))
        m = f64(at(f"mlp_out.{layer}"))
        attn_total += a
        mlp_total += m
        attn_parts.append(a)
        mlp_parts.append(m)
        comps.append(a)
        if heads:
            z = torch.cat([at(f"head.{layer}.{h}") for h in range(lm.n_heads)], dim=-1)
            ph, bp = _heads_to_residual(lm, layer, *_head_outputs(lm, layer, z), a)
            comps += [ph[:, h] for h in range(lm.n_heads)]
            comps.append(bp)
        comps.append(m)
    x = f64(at(f"resid_post.{n - 1}"))
    recon = comps[0] + (comps[1] if has_pos else 0) + attn_total + mlp_total
    err = float(((recon - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).max())
    tol = 1e-3 if lm.dtype == torch.float32 else 5e-2
    if err > tol:
        raise DolmRuntimeError(
            f"the residual stream at the final position is not the sum of embeddings, "
            f"attention and MLP outputs for this model ({lm.adapter.name}; relative error "
            f"{err:.2e}); dolm-dla cannot decompose it")
    s = norm.scale(x)  # (B,)
    y_hat = norm.apply(x)
    y = f64(at("final_norm"))
    nerr = float(((y_hat - y).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-12)).max())
    if nerr > tol:
        raise DolmRuntimeError(
            f"final norm {norm.name}: its linearisation does not reproduce its output "
            f"(relative error {nerr:.2e}); dolm-dla does not know this norm")

    wdev = w_u.device
    t_ids = torch.tensor([req.target[i] for i in rows], device=wdev)
    u = w_u[t_ids].to("cpu", torch.float64)
    ub = None if b_u is None else b_u[t_ids].to("cpu", torch.float64)
    if req.metric == "logit_diff":
        f_ids = torch.tensor([req.foil[i] for i in rows], device=wdev)
        u = u - w_u[f_ids].to("cpu", torch.float64)
        if ub is not None:
            ub = ub - b_u[f_ids].to("cpu", torch.float64)
    if lmap.softcap is None:  # the model's own logits
        logits = out.logits[bidx.to(out.logits.device), last.to(out.logits.device)]
        logits = logits.detach().to("cpu", torch.float64)
        actual = logits[torch.arange(len(rows)), t_ids.cpu()]
        if req.metric == "logit_diff":
            actual = actual - logits[torch.arange(len(rows)), f_ids.cpu()]
    else:  # the logits before the soft-cap, from the final norm's output
        actual = lmap.post * (lmap.pre * (y * u).sum(-1) + (0 if ub is None else ub))
    k = lmap.pre * lmap.post  # linear multipliers, folded into the unembedding direction
    u = k * u
    if ub is not None:
        ub = lmap.post * ub
    gu = norm.gamma * u  # (B, d)

    def attribute(c: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        return (norm.project(c) * direction).sum(-1) / s

    values = [attribute(c, gu) for c in comps]
    values.append((norm.beta * u).sum(-1))
    if ub is not None:
        values.append(ub)
    vals = torch.stack(values, dim=1)  # (B, n_components)

    # the original study's columns: per layer, toward option 1 and option 2 (two choices)
    study = None
    pairs = [req.choices[i] for i in rows]
    if any(p is not None for p in pairs):
        c1 = torch.tensor([p[0] if p else 0 for p in pairs], device=wdev)
        c2 = torch.tensor([p[1] if p else 0 for p in pairs], device=wdev)
        g1 = k * norm.gamma * w_u[c1].to("cpu", torch.float64)
        g2 = k * norm.gamma * w_u[c2].to("cpu", torch.float64)
        study = {
            "attn_to_1": torch.stack([attribute(a, g1) for a in attn_parts], 1),
            "attn_to_2": torch.stack([attribute(a, g2) for a in attn_parts], 1),
            "mlp_to_1": torch.stack([attribute(m, g1) for m in mlp_parts], 1),
            "mlp_to_2": torch.stack([attribute(m, g2) for m in mlp_parts], 1),
            "has": torch.tensor([p is not None for p in pairs]),
        }
    return dict(values=vals.numpy(), actual=actual.numpy(), scale=s.numpy(),
                position=last.cpu().numpy(), study=study, rows=rows)


def to_frame(lm: Any, df: Any, req: Request, results: list[dict], heads: bool) -> Any:
    import pandas as pd

    names = _component_names(lm, heads)
    k = len(names)
    comp = [c for c, *_ in names]
    kind = [x[1] for x in names]
    layer = pd.array([x[2] for x in names], dtype="Int64")
    head = pd.array([x[3] for x in names], dtype="Int64")
    in_total = np.array([x[4] for x in names])
    ids = df["prompt_id"].astype(str).to_numpy()
    frames = []
    study_cols = ["attn_to_1", "attn_to_2", "mlp_to_1", "mlp_to_2", "total_to_1", "total_to_2",
                  "attn_mlp_ratio", "decision_diff"]
    layer_np = np.array([-1 if x[2] is None else x[2] for x in names])
    for res in results:
        rows = res["rows"]
        b = len(rows)
        vals = res["values"]
        if vals.shape[1] != k:  # pragma: no cover - guarded by construction
            raise DolmRuntimeError(f"internal: {vals.shape[1]} values for {k} components")
        frame = pd.DataFrame({
            "prompt_id": np.repeat(ids[rows], k),
            "position": np.repeat(res["position"].astype(np.int64), k),
            "metric": req.metric,
            "target": np.repeat(np.array([req.target_str[i] for i in rows], dtype=object), k),
            "foil": np.repeat(np.array([req.foil_str[i] for i in rows], dtype=object), k),
            "target_id": np.repeat(np.array([req.target[i] for i in rows], dtype=np.int64), k),
            "foil_id": pd.array(np.repeat(np.array([req.foil[i] for i in rows], dtype=object), k),
                                dtype="Int64"),
            "component": np.tile(np.array(comp, dtype=object), b),
            "kind": np.tile(np.array(kind, dtype=object), b),
            "layer": pd.array(np.tile(np.asarray(layer, dtype=object), b), dtype="Int64"),
            "head": pd.array(np.tile(np.asarray(head, dtype=object), b), dtype="Int64"),
            "value": vals.reshape(-1),
            "in_total": np.tile(in_total, b),
            "metric_value": np.repeat(res["actual"], k),
            "norm_scale": np.repeat(res["scale"], k),
        })
        st = res["study"]
        cols = {c: np.full((b, k), np.nan) for c in study_cols}
        if st is not None:
            has = st["has"].numpy()
            a1, a2 = st["attn_to_1"].numpy(), st["attn_to_2"].numpy()
            m1, m2 = st["mlp_to_1"].numpy(), st["mlp_to_2"].numpy()
            for j, lay in enumerate(layer_np):
                if lay < 0:
                    continue
                sel = has
                cols["attn_to_1"][sel, j] = a1[sel, lay]
                cols["attn_to_2"][sel, j] = a2[sel, lay]
                cols["mlp_to_1"][sel, j] = m1[sel, lay]
                cols["mlp_to_2"][sel, j] = m2[sel, lay]
            cols["total_to_1"] = cols["attn_to_1"] + cols["mlp_to_1"]
            cols["total_to_2"] = cols["attn_to_2"] + cols["mlp_to_2"]
            den = np.abs(cols["attn_to_1"]) + np.abs(cols["mlp_to_1"])
            with np.errstate(invalid="ignore", divide="ignore"):
                cols["attn_mlp_ratio"] = np.where(den > 0, np.abs(cols["attn_to_1"]) / den,
                                                  np.nan)
            cols["decision_diff"] = cols["total_to_1"] - cols["total_to_2"]
        for c in study_cols:
            frame[c] = cols[c].reshape(-1)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _shard(df: Any, req: Request, run: Any) -> tuple[Any, Request]:
    """The run's block of prompts (``--shard``/Ray) and their token ids."""
    from dataclasses import replace

    from dolm.executor import shard_offset, shard_rows

    block = shard_rows(df, run)
    if block is df:
        return df, req
    lo, hi = shard_offset(run), shard_offset(run) + len(block)
    return block, replace(req, **{f: getattr(req, f)[lo:hi] for f in
                                  ("target", "foil", "choices", "target_str", "foil_str")})


def run_dla(run: Any, *, df: Any, prompts: str, model_opts: Any, output: str, force: bool,
            metric: str, target: str | None, foil: str | None, heads: bool,
            first_token: bool) -> None:
    from dolm.cli import load_model, log, progress
    from dolm.formats import write_table
    from dolm.models import iter_batched

    lm = load_model(model_opts, run=run)
    lmap = check_decomposable(lm, heads)
    req = resolve(lm, df, prompts, metric=metric, target=target, foil=foil,
                  first_token=first_token)  # the whole table: --metric auto sees every prompt
    df, req = _shard(df, req, run)
    norm = final_norm_linear(lm)
    w_u, b_u = unembed_matrix(lm)
    texts = df["prompt"].astype(str).tolist()
    names = df["prompt_id"].astype(str).tolist()
    results: list[dict] = []

    def fn(start: int, stop: int) -> dict:
        enc = lm.encode(texts[start:stop], names=names[start:stop])
        return dla_batch(lm, enc, req, list(range(start, stop)), heads, norm, w_u, b_u, lmap)

    bar = progress(total=len(df), desc="dla", unit="prompt")
    for start, stop, res in iter_batched(len(df), fn, model_opts.batch_size):
        results.append(res)
        bar.update(stop - start)
    bar.close()
    table = to_frame(lm, df, req, results, heads)
    extra = {"metric": req.metric, "heads": heads, "norm": norm.name,
             "logits": lmap.describe(),
             "final_position": "last prompt token", "components": "see dolm_tools.dla.core"}
    write_table(table, output, schema=SCHEMA, run=run, force=force, extra=extra)
    if output != "-":
        log(f"dolm-dla: {len(table)} rows ({len(df)} prompts, metric {req.metric}) -> {output}")
