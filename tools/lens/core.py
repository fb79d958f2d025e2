"""Logit lens and tuned lens readouts of the residual stream, as a tidy ``lens`` table.

The site read is ``resid_post.L`` (the output of block L, before the final norm) for
every layer L = 0..n_layers-1. The logit lens of layer L is the model's own final norm
and unembedding applied to it; at the last layer it is the model's output. The tuned
lens first applies layer L's translator (:mod:`dolm_tools.lens.tuned`).

One row per (prompt, lens, layer, position, rank): the rank-th most probable token and
its probability; the per-cell values (entropy, KL to the final distribution, target and
choice log-probs, crossing layer) repeat over the top-k ranks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from dolm.errors import InputError
from dolm_tools.lens.tuned import SITE, kl_to, log_probs, readout

SCHEMA = "lens"
LENS_ORDER = {"logit": 0, "tuned": 1}


def positions_for(mode: str, ints: list[int], length: int, name: str) -> list[int]:
    if mode == "last":
        return [length - 1]
    if mode == "all":
        return list(range(length))
    out = []
    for p in ints:
        q = p if p >= 0 else length + p
        if not 0 <= q < length:
            raise InputError(
                f"--positions {p}: prompt {name} has {length} tokens (valid: "
                f"{-length}..{length - 1})")
        out.append(q)
    return sorted(set(out))


def crossing_layer(margins: list[float]) -> int | None:
    """First layer from which the intended option leads at every later layer (margin > 0);
    None when it does not lead at the last layer."""
    if not margins or not margins[-1] > 0:
        return None
    cross = len(margins) - 1
    for layer in range(len(margins) - 1, -1, -1):
        if margins[layer] > 0:
            cross = layer
        else:
            break
    return cross


class _Decoder:
    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids: np.ndarray) -> list[str]:
        out = []
        for i in ids.tolist():
            s = self.cache.get(i)
            if s is None:
                s = self.tok.decode([i])
                self.cache[i] = s
            out.append(s)
        return out


def lens_batch(lm: Any, enc: Any, row_ids: list[int], toks: Any, pos_mode: str,
               pos_ints: list[int], top_k: int, lenses: list[str], tr: Any) -> list[dict]:
    """Readouts for one encoded batch; ``row_ids`` index the prompts table rows."""
    n_layers = lm.n_layers
    sites = [f"{SITE}.{layer}" for layer in range(n_layers)]
    with torch.no_grad(), lm.trace(read=sites) as trace:
        out = lm.forward(enc)
        r_list, p_list = [], []
        for b in range(len(enc)):
            for p in positions_for(pos_mode, pos_ints, enc.lengths[b], enc.names[b]):
                r_list.append(b)
                p_list.append(p)
        dev = out.logits.device
        r = torch.tensor(r_list, dtype=torch.long, device=dev)
        p = torch.tensor(p_list, dtype=torch.long, device=dev)
        lf = log_probs(out.logits[r, p])
        n_cells = len(r_list)
        rows = [row_ids[b] for b in r_list]
        tgt = [toks.target[i] for i in rows]
        t_mask = torch.tensor([t is not None for t in tgt], device=dev)
        t_ids = torch.tensor([t if t is not None else 0 for t in tgt], device=dev)
        ch = [toks.choices[i] for i in rows]
        k = min(top_k, lf.shape[-1])
        results = []
        for lens in lenses:
            per_layer = []
            for layer in range(n_layers):
                h = trace[sites[layer]][r.to(trace[sites[layer]].device),
                                        p.to(trace[sites[layer]].device)]
                if lens == "tuned":
                    h = tr(h, layer)
                lp = log_probs(readout(lm, h)).to(dev)
                pr = lp.exp()
                entropy = -torch.where(pr > 0, pr * lp, torch.zeros_like(lp)).sum(-1)
                kl = kl_to(lf, lp)
                top_v, top_i = lp.topk(k, dim=-1)
                t_lp = lp.gather(1, t_ids[:, None])[:, 0]
                t_rank = (lp > t_lp[:, None]).sum(-1)
                c_lp = [None if c is None else lp[n, c].tolist() for n, c in enumerate(ch)]
                per_layer.append(dict(
                    entropy=entropy.cpu().numpy(), kl=kl.clamp_min(0).cpu().numpy(),
                    top_v=top_v.cpu().numpy(), top_i=top_i.cpu().numpy(),
                    t_lp=torch.where(t_mask, t_lp, torch.nan).cpu().numpy(),
                    t_rank=t_rank.cpu().numpy(), c_lp=c_lp))
            cross: list[int | None] = []
            for n in range(n_cells):
                ix = toks.intended[rows[n]]
                if ch[n] is None or ix is None:
                    cross.append(None)
                    continue
                margins = []
                for d in per_layer:
                    c = d["c_lp"][n]
                    others = [v for j, v in enumerate(c) if j != ix]
                    margins.append(c[ix] - max(others))
                cross.append(crossing_layer(margins))
            results.append(dict(lens=lens, per_layer=per_layer, cross=cross, rows=rows,
                                positions=p_list, tgt=tgt, k=k))
    return results


def to_frame(lm: Any, df: Any, toks: Any, results: list[dict]) -> Any:
    """The tidy lens table from the batch results."""
    import pandas as pd

    dec = _Decoder(lm.tokenizer)
    frames = []
    ids = df["prompt_id"].astype(str).to_numpy()
    for res in results:
        k = res["k"]
        rows = np.asarray(res["rows"])
        n_cells = len(rows)
        for layer, d in enumerate(res["per_layer"]):
            def rep(a: Any, k: int = k) -> np.ndarray:
                return np.repeat(np.asarray(a), k)

            has_t = np.array([t is not None for t in res["tgt"]])
            frame = pd.DataFrame({
                "prompt_id": rep(ids[rows]),
                "lens": res["lens"],
                "site": f"{SITE}.{layer}",
                "layer": np.int64(layer),
                "position": rep(np.asarray(res["positions"], dtype=np.int64)),
                "rank": np.tile(np.arange(k, dtype=np.int64), n_cells),
                "token": dec(d["top_i"].reshape(-1)),
                "token_id": d["top_i"].reshape(-1).astype(np.int64),
                "prob": np.exp(d["top_v"].reshape(-1).astype(np.float64)),
                "logprob": d["top_v"].reshape(-1).astype(np.float64),
                "entropy": rep(d["entropy"].astype(np.float64)),
                "kl_to_final": rep(d["kl"].astype(np.float64)),
                "target_logprob": rep(d["t_lp"].astype(np.float64)),
                "target_rank": pd.array(np.repeat(np.where(has_t, d["t_rank"], 0), k),
                                        dtype="Int64"),
                "choice_logprobs": [c for c in d["c_lp"] for _ in range(k)],
                "intended": pd.array([toks.intended[i] for i in rows for _ in range(k)],
                                     dtype="Int64"),
                "crossing_layer": pd.array([c for c in res["cross"] for _ in range(k)],
                                           dtype="Int64"),
            })
            frame.loc[~np.repeat(has_t, k), "target_rank"] = pd.NA
            frame["_row"] = np.repeat(rows, k)
            frames.append(frame)
    out = pd.concat(frames, ignore_index=True)
    out["target_logprob"] = out["target_logprob"].astype("float64")
    out["_lens"] = out["lens"].map(LENS_ORDER)
    out = out.sort_values(["_row", "_lens", "layer", "position", "rank"], kind="stable")
    return out.drop(columns=["_row", "_lens"]).reset_index(drop=True)


def run_lens(run: Any, *, df: Any, prompts: str, model_opts: Any, output: str, force: bool,
             positions: str, pos: tuple[str, list[int]], lenses: list[str], top_k: int,
             translators: str | None, allow_model_mismatch: bool, target: str | None,
             first_token: bool) -> None:
    from dolm.cli import load_model, log, progress
    from dolm.formats import write_table
    from dolm.models import iter_batched
    from dolm_tools.lens import tokens as tokmod
    from dolm_tools.lens import tuned

    pos_mode, pos_ints = pos
    lm = load_model(model_opts, run=run)
    tr = tuned.load(translators, lm, run, allow_model_mismatch) if translators else None
    toks = tokmod.resolve(lm, df, prompts, target=target, first_token=first_token)
    texts = df["prompt"].astype(str).tolist()
    names = df["prompt_id"].astype(str).tolist()
    results: list[dict] = []

    def fn(start: int, stop: int) -> list[dict]:
        enc = lm.encode(texts[start:stop], names=names[start:stop])
        return lens_batch(lm, enc, list(range(start, stop)), toks, pos_mode, pos_ints, top_k,
                          lenses, tr)

    bar = progress(total=len(df), desc="lens", unit="prompt")
    for start, stop, res in iter_batched(len(df), fn, model_opts.batch_size):
        results.extend(res)
        bar.update(stop - start)
    bar.close()
    table = to_frame(lm, df, toks, results)
    extra = {"site": SITE, "lenses": lenses, "top_k": top_k, "positions": positions,
             "translators": translators}
    write_table(table, output, schema=SCHEMA, run=run, force=force, extra=extra)
    if output != "-":
        log(f"dolm-lens: {len(table)} rows ({len(df)} prompts x {lm.n_layers} layers x "
            f"{', '.join(lenses)}) -> {output}")


# ------------------------------------------------------------------ training command


def run_train(run: Any, *, texts: list[str], model_opts: Any, output: str, force: bool,
              cfg: Any) -> None:
    from dolm.cli import load_model, log
    from dolm_tools.lens import tuned

    lm = load_model(model_opts, run=run)
    if lm.n_layers < 2:
        raise InputError(f"--model {model_opts.model}: a tuned lens needs at least 2 layers")
    seqs = tuned.tokenize_texts(lm, texts, min(cfg.max_length, lm.n_ctx or cfg.max_length))
    order = np.random.default_rng(cfg.seed).permutation(len(seqs))
    seqs = [seqs[i] for i in order]
    n_hold = int(round(cfg.holdout * len(seqs)))
    if cfg.holdout > 0 and len(seqs) >= 2:
        n_hold = min(max(n_hold, 1), len(seqs) - 1)
    else:
        n_hold = 0
    held, train_seqs = seqs[:n_hold], seqs[n_hold:]
    states = tuned.collect_residuals(lm, train_seqs, model_opts.batch_size, cfg.max_tokens,
                                     "caching residuals")
    log(f"dolm-lens train: {states.shape[1]} training tokens from {len(train_seqs)} sequences"
        f"; {cfg.steps} steps x {cfg.tokens_per_step} tokens")
    tr, losses = tuned.train(lm, states, cfg)
    del states
    report: dict = {}
    if held:
        hstates = tuned.collect_residuals(lm, held, model_opts.batch_size, cfg.max_tokens,
                                          "held-out residuals")
        report = tuned.heldout_kl(lm, hstates, tr.to(lm.device))
        report["n_sequences"] = len(held)
        log(tuned.describe_report(report))
    report["final_loss"] = losses[-1] if losses else None
    report["loss_first"] = losses[0] if losses else None
    tuned.save(tr.cpu(), output, run, force, lm, cfg, report)
    log(f"dolm-lens train: translators for layers 0..{lm.n_layers - 2} -> {output}")
