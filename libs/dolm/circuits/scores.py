"""Edge scores (EAP, EAP-IG, exact edge patching) and circuit evaluation.

All of them run on :class:`dolm.circuits.graph.GraphRunner` passes over a
:class:`Prompts` batch set (clean token ids, the corrupted input, read positions,
metric token ids).

- ``exact``: the metric of the clean run with one edge patched (its sender's output
  replaced by the corrupted run's output at that receiver's input) minus the clean
  metric. Rows start at the receiver's layer from the cached clean run (layers below
  are unchanged), so a batch of edge variants costs only the layers each one changes.
- ``eap`` (edge attribution patching, Syed et al. 2023): the first-order estimate of
  ``exact``, ``(corrupt_out[s] - clean_out[s]) . dM/d input_r`` summed over positions,
  from one clean pass (with gradients), one corrupted pass and one backward.
- ``eap-ig`` (Hanna et al. 2024, "Have Faith in Faithfulness"): the same with the
  gradient averaged over ``steps`` inputs interpolated between the corrupted and the
  clean embeddings (``steps`` backward passes).

Circuit evaluation (:func:`evaluate`): every edge outside the circuit is ablated (its
sender's output at that receiver replaced by an ablation value: the counterfactual run,
noise, the mean over the prompts' tokens, another prompt of the same length
(resample), or zero); faithfulness = mean circuit metric / mean full-model metric;
completeness ablates the circuit's edges instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dolm.circuits.graph import GraphRunner
from dolm.errors import InputError

METRICS = ("logit_diff", "prob_target")
ABLATIONS = ("cf", "noise", "mean", "resample", "zero")


@dataclass
class Prompts:
    """Token ids of the clean prompts (N, T) (right-padded), the corrupted ids (or None
    for noise corruption), read positions (N,), target and foil token ids (N,)."""

    prompt_ids: list[str]
    ids: torch.Tensor
    cf_ids: torch.Tensor | None
    positions: torch.Tensor
    target: torch.Tensor
    foil: torch.Tensor | None
    lengths: torch.Tensor


def prepare(lm, df, path: str, metric: str, corruption: str) -> Prompts:
    """Tokenise a prompts table for edge scoring (InputError naming prompt/column)."""
    from dolm.metrics import prompt_targets

    if metric not in METRICS:
        raise InputError(f"--metric: expected one of {', '.join(METRICS)}, found {metric!r}")
    targets = prompt_targets(df, lm, path)
    pids = [t.prompt_id for t in targets]
    if metric == "logit_diff":
        missing = [t.prompt_id for t in targets if t.foil_id is None]
        if missing:
            raise InputError(f"{path}: --metric logit_diff needs a foil (column foil, or a "
                             f"cf_target other than the target); prompt {missing[0]} has "
                             "none")
    enc = lm.encode([str(p) for p in df["prompt"]])
    ids = enc.input_ids.cpu()
    last = torch.as_tensor(enc.last_index).cpu()
    cf = None
    if corruption == "cf":
        if "cf_prompt" not in df.columns:
            raise InputError(f"{path}: --corruption cf needs a cf_prompt column (or use "
                             "--corruption noise)")
        cfp = list(df["cf_prompt"])
        for pid, c in zip(pids, cfp, strict=True):
            if c is None or (isinstance(c, float) and np.isnan(c)) or str(c) == "":
                raise InputError(f"{path}: prompt {pid}: column 'cf_prompt' is empty "
                                 "(--corruption cf)")
        cenc = lm.encode([str(c) for c in cfp])
        clast = torch.as_tensor(cenc.last_index).cpu()
        bad = (clast != last).nonzero().flatten().tolist()
        if bad:
            i = bad[0]
            raise InputError(f"{path}: prompt {pids[i]}: cf_prompt has {int(clast[i]) + 1} "
                             f"tokens, prompt has {int(last[i]) + 1}; edge patching needs "
                             "counterfactuals of the same token length")
        cf = cenc.input_ids.cpu()
        width = max(ids.shape[1], cf.shape[1])
        ids, cf = _pad(ids, width), _pad(cf, width)
    tid = torch.as_tensor([t.target_id for t in targets])
    fid = torch.as_tensor([t.foil_id if t.foil_id is not None else t.target_id
                           for t in targets])
    return Prompts(pids, ids, cf, last, tid, fid, last + 1)


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    if x.shape[1] >= width:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], width - x.shape[1])], dim=1)


def metric_of(logits: torch.Tensor, target: torch.Tensor, foil: torch.Tensor | None,
              metric: str) -> torch.Tensor:
    """Per-row metric (B,) from read logits (B, V), differentiable."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    lf = logits.float()
    t = lf[rows, target.to(lf.device)]
    if metric == "logit_diff":
        return t - lf[rows, foil.to(lf.device)]
    return (t - torch.logsumexp(lf, -1)).exp()


def batches(n: int, size: int):
    for a in range(0, n, size):
        yield a, min(n, a + size)


class Scorer:
    """Clean and corrupted runs of one prompt batch set, and the scores built on them."""

    def __init__(self, lm, data: Prompts, metric: str, *, corruption: str = "cf",
                 noise: float = 3.0, seed: int = 0, batch_size: int = 16):
        self.runner = GraphRunner(lm)
        self.g = self.runner.graph
        self.lm, self.data, self.metric = lm, data, metric
        self.corruption, self.noise, self.seed = corruption, noise, seed
        self.batch_size = max(1, int(batch_size))
        self.dev = self.runner.device

    # ----------------------------------------------------------- base runs
    def _b(self, a: int, z: int):
        d = self.data
        t = int(d.lengths[a:z].max())
        return d.ids[a:z, :t].to(self.dev), d.positions[a:z], t

    def corrupt_embeds(self, a: int, z: int) -> torch.Tensor:
        """The corrupted run's embed output for prompts a..z."""
        ids, _, t = self._b(a, z)
        if self.corruption == "cf":
            return self.runner.embed(self.data.cf_ids[a:z, :t].to(self.dev))
        clean = self.runner.embed(ids)
        gen = torch.Generator().manual_seed(self.seed + a)
        std = float(clean.float().std())
        noise = torch.randn(clean.shape, generator=gen) * (self.noise * std)
        return clean + noise.to(clean.device, clean.dtype)

    def base(self, a: int, z: int):
        """(clean Pass, corrupt Pass) with outs and entries for prompts a..z."""
        ids, pos, _ = self._b(a, z)
        with torch.no_grad():
            clean = self.runner.run(ids, pos, keep=True)
            corrupt = self.runner.run(None, pos, embeds=self.corrupt_embeds(a, z), keep=True)
        return clean, corrupt

    def _metric(self, logits, a: int, z: int, rep: int = 1) -> torch.Tensor:
        d = self.data
        tg = d.target[a:z].repeat_interleave(rep)
        fo = d.foil[a:z].repeat_interleave(rep)
        return metric_of(logits, tg, fo, self.metric)

    def base_metrics(self) -> tuple[np.ndarray, np.ndarray]:
        """Clean and corrupted metric per prompt."""
        c, k = [], []
        for a, z in batches(len(self.data.prompt_ids), self.batch_size):
            clean, corrupt = self.base(a, z)
            c.append(self._metric(clean.logits, a, z))
            k.append(self._metric(corrupt.logits, a, z))
        return torch.cat(c).double().numpy(), torch.cat(k).double().numpy()

    # ----------------------------------------------------------- attribution
    def _edge_products(self, diff: torch.Tensor, grads: list) -> torch.Tensor:
        """Per prompt, sum over positions of diff[s] . grad[r] for every edge -> (B, E)."""
        g, lm = self.g, self.lm
        b, t = diff.shape[:2]
        out = torch.zeros(b, g.n_receivers, g.n_senders, dtype=torch.float32)
        nh = lm.n_heads
        # (B, S, T * d): one batched matrix product per receiver group (float32 sums over
        # T * d terms; the products are summed in the model's float32 anyway)
        dm = diff.float().permute(0, 2, 1, 3).reshape(b, g.n_senders, -1)
        for lyr in range(lm.n_layers):
            up = g.head_sender(lyr)
            r0 = g.head_recv0[lyr]
            gh, gm = grads[2 * lyr], grads[2 * lyr + 1]
            gh = gh.float().permute(0, 2, 1, 3).reshape(b, 3 * nh, -1)
            out[:, r0:r0 + 3 * nh, :up] = torch.bmm(gh, dm[:, :up].transpose(1, 2)).cpu()
            upm = g.n_upstream(g.mlp_recv[lyr])
            out[:, g.mlp_recv[lyr], :upm] = torch.bmm(
                dm[:, :upm], gm.float().reshape(b, -1, 1))[..., 0].cpu()
        out = out.double()
        return out, grads[-1]

    def attribution(self, steps: int = 1) -> np.ndarray:
        """EAP (steps=1: gradient at the clean run) or EAP-IG (``steps`` interpolation
        points between the corrupted and the clean embeddings): (N, E) scores."""
        g = self.g
        src = torch.as_tensor([e[0] for e in g.edges])
        dst = torch.as_tensor([e[1] for e in g.edges])
        res = []
        for a, z in batches(len(self.data.prompt_ids), self.batch_size):
            ids, pos, t = self._b(a, z)
            e_clean, e_cor = self.runner.embed(ids), self.corrupt_embeds(a, z)
            with torch.no_grad():
                corrupt = self.runner.run(None, pos, embeds=e_cor, keep=True)
            alphas = [1.0] if steps <= 1 else [(k + 0.5) / steps for k in range(steps)]
            acc, clean_outs = None, None

            def metric(lg, a=a, z=z):
                return self._metric(lg, a, z).sum()

            for al in alphas:
                emb = e_cor + al * (e_clean - e_cor)
                if al == 1.0:  # the gradient pass is the clean run: keep its outputs
                    grads, clean_outs = self.runner.receiver_grads(emb, pos, metric, True)
                else:
                    grads = self.runner.receiver_grads(emb, pos, metric)
                acc = grads if acc is None else [x + y for x, y in zip(acc, grads, strict=True)]
            grads = [x / len(alphas) for x in acc]
            if clean_outs is None:
                with torch.no_grad():
                    clean_outs = self.runner.run(ids, pos, keep=True).outs
            diff = corrupt.outs - clean_outs
            prod, g_logits = self._edge_products(diff, grads)
            rows = torch.arange(z - a)
            dl = diff[rows, pos.to(diff.device)].double()  # (B, S, d)
            prod[:, g.logits_recv, :] = torch.einsum("bsd,bd->bs", dl,
                                                     g_logits.double()).cpu()
            res.append(prod[:, dst, src])
        return torch.cat(res).numpy()

    # ----------------------------------------------------------- exact patching
    def exact(self, edge_ids, rows_per_batch: int = 256) -> np.ndarray:
        """(N, len(edge_ids)) metric(clean with that edge patched) - metric(clean)."""
        g = self.g
        edge_ids = list(edge_ids)
        n = len(self.data.prompt_ids)
        out = np.zeros((n, len(edge_ids)))
        by_layer: dict[int, list[int]] = {}
        for j, e in enumerate(edge_ids):
            by_layer.setdefault(g.receiver_layer(g.edges[e][1]), []).append(j)
        masks = None
        for a, z in batches(n, self.batch_size):
            clean, corrupt = self.base(a, z)
            ids, pos, t = self._b(a, z)
            b = z - a
            m0 = self._metric(clean.logits, a, z).double().numpy()
            per = max(1, rows_per_batch // b)
            for lyr, js in by_layer.items():
                for c0, c1 in batches(len(js), per):
                    chunk = js[c0:c1]
                    k = len(chunk)
                    masks = torch.zeros(k, g.n_receivers, g.n_senders)
                    for i, j in enumerate(chunk):
                        s, r = g.edges[edge_ids[j]]
                        masks[i, r, s] = 1.0
                    # rows: prompt-major (prompt p, edge i) -> p * k + i
                    mask = masks.repeat(b, 1, 1).to(self.dev)
                    def rep(x, k=k):
                        return x.repeat_interleave(k, dim=0)
                    entry = rep(clean.entries[lyr]) if lyr < len(clean.entries) else None
                    with torch.no_grad():
                        p = self.runner.run(None, rep(pos), patch=rep(corrupt.outs),
                                            mask=mask, start=lyr, entry=entry,
                                            outs0=rep(clean.outs))
                    mv = self._metric(p.logits, a, z, rep=k).double().numpy().reshape(b, k)
                    out[a:z, chunk] = mv - m0[:, None]
        return out

    # ----------------------------------------------------------- ablation
    def ablation_values(self, ablate: str, a: int, z: int, clean, corrupt, mean=None):
        if ablate in ("cf", "noise"):
            return corrupt.outs
        if ablate == "zero":
            return torch.zeros_like(clean.outs)
        if ablate == "mean":
            return mean.to(clean.outs)[None, None].expand_as(clean.outs)
        raise AssertionError(ablate)

    def mean_outs(self) -> torch.Tensor:
        """Mean sender outputs over every real token of every prompt (S, d)."""
        tot, cnt = None, 0
        for a, z in batches(len(self.data.prompt_ids), self.batch_size):
            clean, _ = self.base(a, z)
            lens = self.data.lengths[a:z]
            t = clean.outs.shape[1]
            real = (torch.arange(t)[None] < lens[:, None]).to(clean.outs)
            s = (clean.outs * real[:, :, None, None]).sum((0, 1)).double()
            tot = s if tot is None else tot + s
            cnt += int(lens.sum())
        return (tot / cnt).float()

    def resample_partner(self) -> list[int]:
        """For each prompt another prompt of the same token length (seeded)."""
        rng = np.random.default_rng(self.seed)
        lens = self.data.lengths.numpy()
        partner = []
        for i, ln in enumerate(lens):
            others = [j for j in np.flatnonzero(lens == ln) if j != i]
            if not others:
                raise InputError(f"--ablate resample: prompt {self.data.prompt_ids[i]} has "
                                 f"no other prompt of its token length ({ln}) to resample "
                                 "from")
            partner.append(int(rng.choice(others)))
        return partner

    def evaluate(self, circuits: list, ablate: str) -> dict[str, np.ndarray]:
        """Metrics per prompt: ``full`` (the model), ``ablated`` (every edge ablated),
        and per circuit (a list of edge ids) ``circuit.i`` (edges outside ablated) and
        ``complement.i`` (the circuit's edges ablated)."""
        g = self.g
        n = len(self.data.prompt_ids)
        mean = self.mean_outs() if ablate == "mean" else None
        partner = self.resample_partner() if ablate == "resample" else None
        allm = g.all_edges_mask()
        masks = {"ablated": allm}
        for i, c in enumerate(circuits):
            cm = g.mask(c)
            masks[f"circuit.{i}"] = allm - cm
            masks[f"complement.{i}"] = cm
        res = {k: np.zeros(n) for k in ["full", *masks]}
        for a, z in batches(n, self.batch_size):
            clean, corrupt = self.base(a, z)
            ids, pos, t = self._b(a, z)
            res["full"][a:z] = self._metric(clean.logits, a, z).double().numpy()
            if partner is not None:
                other = [partner[i] for i in range(a, z)]
                pid = self.data.ids[other, :t].to(self.dev)
                with torch.no_grad():
                    values = self.runner.run(pid, pos, keep=True).outs
            else:
                values = self.ablation_values(ablate, a, z, clean, corrupt, mean)
            for name, m in masks.items():
                with torch.no_grad():
                    p = self.runner.run(ids, pos, patch=values, mask=m[None].to(self.dev))
                res[name][a:z] = self._metric(p.logits, a, z).double().numpy()
        return res


def faithfulness(circuit: np.ndarray, full: np.ndarray) -> float:
    """mean circuit metric / mean full-model metric."""
    f = float(np.mean(full))
    return float(np.mean(circuit)) / f if f != 0 else float("nan")
