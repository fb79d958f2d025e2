"""Tuned lens: one affine translator per layer, trained to match the final distribution.

Translator of layer L (read at ``resid_post.L``), residual form, zero-initialised::

    T_L(h) = h + W_L h + b_L          (W_L: d_model x d_model, b_L: d_model)

and the tuned-lens readout of layer L is ``unembed(final_norm(T_L(h)))`` with the model's
own final norm and unembedding. The last layer has no translator (its logit lens is the
model's output).

Training (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the
Tuned Lens"; defaults of their ``tuned-lens`` trainer unless said otherwise):

- loss: KL(final || lens) = sum_v p_final(v) (log p_final(v) - log p_lens(v)), averaged
  over tokens, summed over layers (the translators share no parameter, so this is
  training each one on its own KL);
- SGD with Nesterov momentum 0.9, learning rate ``lr_scale * (1 - momentum)`` with
  ``lr_scale = 1`` (i.e. 0.1: PyTorch's momentum scales the step by 1/(1 - momentum), the
  paper undoes that), weight decay 1e-3 on W and b, no warm-up, linear decay to 0 over
  ``steps`` = 250 steps; no gradient clipping;
- dolm's deviations, for CPUs: ``tokens_per_step`` is 4096 (paper: 2^18), and the
  tokens of a step are drawn at random (seeded) from residuals cached once from the
  training texts (at most ``max_tokens``), rather than re-running the model on new
  sequences every step. A translator acts on one token at a time, so the loss is the
  same; only the sampling differs.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import torch
from dolm.errors import InputError
from dolm_tools.lens.options import TrainConfig

SCHEMA = "translators"
SITE = "resid_post"


class Translators(torch.nn.Module):
    """Affine translators ``h + W_L h + b_L`` for the layers in ``layers``."""

    def __init__(self, d_model: int, layers: list[int], n_layers: int):
        super().__init__()
        self.d_model = int(d_model)
        self.n_layers = int(n_layers)
        self.layers = [int(x) for x in layers]
        self._index = {layer: i for i, layer in enumerate(self.layers)}
        k = len(self.layers)
        self.weight = torch.nn.Parameter(torch.zeros(k, self.d_model, self.d_model))
        self.bias = torch.nn.Parameter(torch.zeros(k, self.d_model))

    def has(self, layer: int) -> bool:
        return layer in self._index

    def forward(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Translate ``h`` (..., d_model) read at ``resid_post.<layer>``; identity for a
        layer without translator. Computed in float32, returned in ``h``'s dtype."""
        i = self._index.get(int(layer))
        if i is None:
            return h
        x = h.float()
        w = self.weight[i].to(x.device)
        b = self.bias[i].to(x.device)
        return (x + x @ w.T + b).to(h.dtype)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, layer in enumerate(self.layers):
            out[f"translator.{layer}.weight"] = self.weight[i].detach().float().cpu()
            out[f"translator.{layer}.bias"] = self.bias[i].detach().float().cpu()
        return out


# ------------------------------------------------------------------ readout helpers


def readout(lm: Any, h: torch.Tensor) -> torch.Tensor:
    """The model's own final norm and unembedding on residuals ``h`` (N, d) -> logits."""
    ad = lm.adapter
    param = next(ad.final_norm.parameters(), None)
    if param is not None and param.device != h.device:
        h = h.to(param.device)
    return ad.logits_from_final_norm(ad.final_norm(h))


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def kl_to(logp_final: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(final || lens) per row, in nats (0 * log 0 = 0)."""
    p = logp_final.exp()
    terms = torch.where(p > 0, p * (logp_final - logp), torch.zeros_like(p))
    return terms.sum(-1)


# ------------------------------------------------------------------ training data


def tokenize_texts(lm: Any, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each text (BOS as the tokenizer does it), cut into chunks of at most
    ``max_length`` tokens; empty texts are dropped."""
    tok = lm.tokenizer
    bos = tok.bos_token_id if lm.prepends_bos else None
    out: list[list[int]] = []
    enc = tok(list(texts), add_special_tokens=False)["input_ids"]
    for ids in enc:
        ids = list(ids)
        if not ids:
            continue
        if bos is not None and ids[0] != bos:
            ids = [bos, *ids]
        for s in range(0, len(ids), max_length):
            chunk = ids[s : s + max_length]
            if len(chunk) >= 2 or s == 0:
                out.append(chunk)
    return out


def collect_residuals(
    lm: Any, seqs: list[list[int]], batch_size: Any, max_tokens: int | None, desc: str
) -> torch.Tensor:
    """Residuals ``resid_post.L`` of every real token: (n_layers, T, d_model), on CPU in
    float32, at most ``max_tokens`` tokens (the first sequences, in the given order)."""
    from dolm.cli import progress
    from dolm.models import iter_batched, pad_right

    if max_tokens is not None:
        kept, total = [], 0
        for s in seqs:
            if total >= max_tokens:
                break
            s = s[: max_tokens - total]
            kept.append(s)
            total += len(s)
        seqs = kept
    n = len(seqs)
    sites = [f"{SITE}.{layer}" for layer in range(lm.n_layers)]
    pad = lm.pad_id
    chunks: list[torch.Tensor] = []

    def fn(start: int, stop: int) -> torch.Tensor:
        batch = seqs[start:stop]
        ids, mask = pad_right(batch, pad, lm.device)
        with torch.no_grad(), lm.trace(read=sites) as tr:
            lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
        keep = mask.bool()
        return torch.stack([tr[s][keep].float().cpu() for s in sites])

    bar = progress(total=n, desc=desc, unit="seq")
    for start, stop, res in iter_batched(n, fn, batch_size, max_batch_size=32):
        chunks.append(res)
        bar.update(stop - start)
    bar.close()
    if not chunks:
        return torch.zeros(lm.n_layers, 0, lm.d_model)
    return torch.cat(chunks, dim=1)


# ------------------------------------------------------------------ training


def _final_logp(lm: Any, h_last: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return log_probs(readout(lm, h_last.to(lm.dtype)))


def heldout_kl(lm: Any, states: torch.Tensor, tr: Translators | None,
               chunk: int = 2048) -> dict[str, list[float]]:
    """Mean KL(final || lens) per layer over the tokens in ``states``, for the logit lens
    and (when ``tr`` is given) the tuned lens."""
    n_layers, total, _ = states.shape
    sums = {"logit": [0.0] * n_layers, "tuned": [0.0] * n_layers}
    with torch.no_grad():
        for s in range(0, total, chunk):
            hs = states[:, s : s + chunk]
            lf = _final_logp(lm, hs[-1].to(lm.device))
            for layer in range(n_layers):
                h = hs[layer].to(lm.device)
                kl_logit = kl_to(lf, log_probs(readout(lm, h.to(lm.dtype))))
                sums["logit"][layer] += float(kl_logit.double().sum())
                if tr is not None:
                    ht = tr(h, layer).to(lm.dtype)
                    sums["tuned"][layer] += float(kl_to(lf, log_probs(readout(lm, ht))).double()
                                                  .sum())
    out = {"layer": list(range(n_layers)),
           "logit": [v / max(total, 1) for v in sums["logit"]]}
    if tr is not None:
        out["tuned"] = [v / max(total, 1) for v in sums["tuned"]]
    out["n_tokens"] = int(total)
    return out


def train(lm: Any, states: torch.Tensor, cfg: TrainConfig) -> tuple[Translators, list[float]]:
    """Train translators for layers 0..n_layers-2 on cached residuals ``states``.

    Returns the translators (on CPU) and the loss of every step.
    """
    from dolm.cli import progress

    n_layers, total, d = states.shape
    if total == 0:
        raise InputError("tuned lens: no training tokens")
    layers = list(range(n_layers - 1))
    tr = Translators(d, layers, n_layers).to(lm.device)
    beta = float(cfg.momentum)
    opt = torch.optim.SGD(tr.parameters(), lr=cfg.lr_scale * (1.0 - beta), momentum=beta,
                          nesterov=beta > 0, weight_decay=cfg.weight_decay)
    steps = int(cfg.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / max(steps, 1)))
    gen = torch.Generator().manual_seed(int(cfg.seed))
    losses: list[float] = []
    bar = progress(range(steps), total=steps, desc="training tuned lens", unit="step")
    for _ in bar:
        idx = torch.randint(total, (min(cfg.tokens_per_step, total),), generator=gen)
        hs = states[:, idx].to(lm.device)
        lf = _final_logp(lm, hs[-1])
        loss = torch.zeros((), device=lm.device)
        for layer in layers:
            ht = tr(hs[layer], layer).to(lm.dtype)
            loss = loss + kl_to(lf, log_probs(readout(lm, ht))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            from dolm.errors import DolmRuntimeError

            raise DolmRuntimeError(
                f"tuned lens training diverged (loss {value}); lower --lr-scale")
        losses.append(value)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{value:.4f}")
    return tr.cpu(), losses


# ------------------------------------------------------------------ files


def save(tr: Translators, path: str, run: Any, force: bool, lm: Any, cfg: TrainConfig,
         report: dict) -> None:
    from dolm.formats import save_safetensors

    extra = {
        "site": SITE,
        "d_model": tr.d_model,
        "n_layers": tr.n_layers,
        "layers": tr.layers,
        "form": "h + W h + b",
        "model_spec": lm.info.get("spec"),
        "weights_sha256": lm.info.get("weights_sha256"),
        "train": {k: v for k, v in asdict(cfg).items() if k != "extra"} | cfg.extra,
        "heldout_kl": report,
    }
    save_safetensors(tr.state_tensors(), path, SCHEMA, run, force=force, extra=extra)


def load(path: str, lm: Any, run: Any, allow_mismatch: bool) -> Translators:
    """Translators from ``path``; refuses another model's (InputError) unless allowed,
    and always refuses ones whose shapes do not fit this model."""
    from dolm.formats import load_safetensors

    tensors, meta = load_safetensors(path, schema=SCHEMA, run=run)
    if meta.schema != SCHEMA:
        raise InputError(f"--translators {path}: not a dolm translators file "
                         "(no 'dolm.schema' metadata naming 'translators')")
    extra = meta.extra or {}
    recorded = meta.model_entry() or {}
    want = extra.get("weights_sha256") or recorded.get("weights_sha256")
    have = lm.info.get("weights_sha256")
    if not allow_mismatch and want and have and want != have:
        raise InputError(
            f"--translators {path}: trained on model {extra.get('model_spec')!r} (weights "
            f"{want[:12]}), but the model given is {lm.info.get('spec')!r} (weights "
            f"{have[:12]}); pass --allow-model-mismatch to use them anyway")
    layers = sorted(int(k.split(".")[1]) for k in tensors if k.endswith(".weight"))
    d = lm.d_model
    for layer in layers:
        w = tensors[f"translator.{layer}.weight"]
        b = tensors.get(f"translator.{layer}.bias")
        if layer >= lm.n_layers or tuple(w.shape) != (d, d) or b is None or \
                tuple(b.shape) != (d,):
            raise InputError(
                f"--translators {path}: translator of layer {layer} has shape "
                f"{tuple(w.shape)}, but the model has {lm.n_layers} layers of width {d}")
    tr = Translators(d, layers, lm.n_layers)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            tr.weight[i].copy_(tensors[f"translator.{layer}.weight"])
            tr.bias[i].copy_(tensors[f"translator.{layer}.bias"])
    tr.requires_grad_(False)
    return tr.to(lm.device)


def describe_report(report: dict) -> str:
    """A per-layer KL table (logit vs tuned) as text."""
    lines = [f"held-out KL(final || lens), nats, mean over {report.get('n_tokens', 0)} tokens:",
             "layer   logit    tuned"]
    tuned = report.get("tuned") or [float("nan")] * len(report["layer"])
    for layer, a, b in zip(report["layer"], report["logit"], tuned, strict=True):
        lines.append(f"{layer:>5} {a:8.4f} {b:8.4f}")
    return "\n".join(lines)
